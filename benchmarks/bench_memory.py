"""Memory and time of the analog simulation of a real-sized MoE model (OLMoE-1B-7B, 1 or 2 layers).

    python -m benchmarks.bench_memory [--layers 1 2] [--presets ...] [--state-dtypes float32 bfloat16]
                                      [--dtype float32|bfloat16] [--tokens 128] [--timeout S] [--json PATH]
    python -m benchmarks.bench_memory --smoke     # shrunken model, every code path, < 1 min

Every configuration runs in a fresh subprocess (``--worker``), so one run's allocator state and peak RSS
do not leak into the next, and a child killed for memory or time becomes a table row, not a crash. The
child builds the digital model (random weights), then ``analogize_`` (everything but lm_head analog),
``program_analog_``, ``drift_analog_(3600 s)`` and two forwards of 1 x tokens random ids, recording RSS
(VmRSS) and seconds after each step, VmHWM at the end, and the bytes held by the analog chips.
"RSS over digital / param" is (RSS after the step - RSS after building the digital model) / analog
parameters: the simulation's own memory, per weight it simulates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

OLMOE_CONFIG = Path("/work/shared/reference/model-configs/olmoe-1b-7b/config.json")
SMOKE_DIMS = {"hidden_size": 256, "intermediate_size": 128, "num_experts": 8, "vocab_size": 1000}
PRESETS = ["aihwkit-default", "rasch2023", "lightning-8bit", "gaussian-chip"]
STEPS = ["analogize", "program", "drift", "forward 1", "forward 2"]
CHIP_TARGET_BYTES = {"float32": 4.0, "bfloat16": 2.0, "n/a": 4.0}  # n/a: the chip state is float32
T_INFERENCE = 3600.0
GIB = 1024 ** 3


# -- child ----------------------------------------------------------------------------------------
def proc_status_bytes(field: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def has_state_dtype() -> bool:
    from romer_kernels.config.analog import AnalogConfig  # noqa: PLC0415
    return "state_dtype" in {f.name for f in dataclasses.fields(AnalogConfig)}


def analog_matrices(model):
    """Every AnalogMatrix of the model, once: AnalogLinear.analog, AnalogExperts.gate_up / .down,
    AnalogRouter.matrix (found by type in each module's attributes, so new holders are found too)."""
    from romer_kernels.nn import AnalogMatrix  # noqa: PLC0415
    seen = {}
    for module in model.modules():
        for value in vars(module).values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, AnalogMatrix):
                    seen[id(item)] = item
    return list(seen.values())


def tensor_storages(obj, found: dict, visited: set) -> None:
    """Add to ``found`` (storage pointer -> bytes) every tensor reachable through attributes of
    dataclasses and plain containers; a storage shared by several tensors counts once."""
    import torch  # noqa: PLC0415
    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            tensor_storages(item, found, visited)
    elif isinstance(obj, dict):
        for item in obj.values():
            tensor_storages(item, found, visited)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            tensor_storages(getattr(obj, f.name), found, visited)


def chip_bytes(model, matrices) -> tuple[int, str]:
    """(bytes of every tensor the analog chips hold, where that number comes from)."""
    try:
        from romer_kernels.nn import chip_state_bytes  # noqa: PLC0415
    except ImportError:
        found, visited = {}, set()
        for matrix in matrices:
            tensor_storages(vars(matrix), found, visited)
            tensor_storages(vars(matrix.chip), found, visited)
        return sum(found.values()), "fallback walk"
    return int(chip_state_bytes(model)), "chip_state_bytes"


def build_model(layers: int, dtype: str, smoke: bool):
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, OlmoeConfig  # noqa: PLC0415
    values = json.loads(OLMOE_CONFIG.read_text())
    values.update(num_hidden_layers=layers, **(SMOKE_DIMS if smoke else {}))
    values.pop("torch_dtype", None)  # the benchmark's --dtype decides
    config = OlmoeConfig(**values)
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)), config.vocab_size


def worker(spec: dict) -> dict:
    import torch  # noqa: PLC0415
    from romer_kernels import preset  # noqa: PLC0415
    from romer_kernels.moe.convert import Placement, analogize_  # noqa: PLC0415
    from romer_kernels.nn import drift_analog_, program_analog_  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = preset(spec["preset"])
    if spec["state_dtype"] != "n/a":
        config = config.replace(state_dtype=spec["state_dtype"])
    result = {"rss": {}, "seconds": {}, "chip_bytes": {}}
    start = time.perf_counter()
    model, vocab = build_model(spec["layers"], spec["dtype"], spec["smoke"])
    model.eval()
    result["seconds"]["build"] = time.perf_counter() - start
    result["rss"]["build"] = proc_status_bytes("VmRSS")
    input_ids = torch.randint(vocab, (1, spec["tokens"]), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model(input_ids)

    steps = {
        "analogize": lambda: analogize_(model, config, Placement(), seed=0),
        "program": lambda: program_analog_(model, seed=1),
        "drift": lambda: drift_analog_(model, T_INFERENCE),
        "forward 1": forward,
        "forward 2": forward,
    }
    matrices = None
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        result["seconds"][name] = time.perf_counter() - start
        result["rss"][name] = proc_status_bytes("VmRSS")
        matrices = matrices or analog_matrices(model)
        result["chip_bytes"][name], result["chip_bytes_source"] = chip_bytes(model, matrices)
        # a child killed later still tells the parent how far it got
        print("STEP " + json.dumps({"step": name, "rss": result["rss"][name]}), flush=True)
    result["analog_params"] = sum(m.out_features * m.in_features for m in matrices)
    result["digital_params"] = sum(p.numel() for p in model.parameters())
    result["peak_rss"] = proc_status_bytes("VmHWM")
    return result


# -- parent ---------------------------------------------------------------------------------------
def run_child(spec: dict, timeout: float) -> dict:
    """One configuration in a fresh interpreter; a killed or failing child becomes a status string."""
    command = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired as expired:
        row = {"status": f"killed (timeout {timeout:g} s)", "last_step": last_step(expired.stdout)}
    else:
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and lines[-1].startswith("RESULT "):
            row = {"status": "ok", **json.loads(lines[-1][len("RESULT "):])}
        elif done.returncode in (-9, 137):  # SIGKILL (bare, or through a shell): what the OOM killer sends
            row = {"status": f"killed (OOM?) rc={done.returncode}", "last_step": last_step(done.stdout)}
        else:
            error = exception_line(done.stderr)
            row = {"status": f"failed rc={done.returncode}: {error}", "last_step": last_step(done.stdout)}
    return {**spec, **row, "child_seconds": time.perf_counter() - start}


def exception_line(stderr: str) -> str:
    """The ``SomeError: message`` line of a traceback (the last stderr line can be a long argument dump)."""
    lines = stderr.strip().splitlines() or ["no stderr"]
    errors = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line)]
    return (errors or lines)[-1][:200]


def last_step(stdout) -> str | None:
    if isinstance(stdout, bytes):
        stdout = stdout.decode(errors="replace")
    steps = [json.loads(line[5:])["step"] for line in (stdout or "").splitlines() if line.startswith("STEP ")]
    return steps[-1] if steps else None


def targets(row: dict) -> str:
    """The run went end to end (the target for 2 layers) and the chip state fits its state dtype's budget."""
    if row["status"] != "ok":
        return f"no: {row['status']}, last step done: {row.get('last_step') or 'none'}"
    per_param = row["chip_bytes"]["forward 2"] / row["analog_params"]
    limit = CHIP_TARGET_BYTES[row["state_dtype"]]
    return "yes" if per_param <= limit else f"no (chip {per_param:.1f} > {limit:g} B/param)"


def table(rows: list[dict]) -> str:
    head = (["layers", "preset", "state", "analog params"]
            + [f"RSS/p {step}" for step in STEPS]
            + ["peak RSS (GiB)", "chip state (B/param)"]
            + [f"s {step}" for step in ["build"] + STEPS] + ["child s", "targets met?"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["layers"]), row["preset"], row["state_dtype"]]
        if row["status"] == "ok":
            params = row["analog_params"]
            cells.append(f"{params / 1e6:.1f} M")
            cells += [f"{(row['rss'][s] - row['rss']['build']) / params:.2f}" for s in STEPS]
            cells += [f"{row['peak_rss'] / GIB:.2f}", f"{row['chip_bytes']['forward 2'] / params:.2f}"]
            cells += [f"{row['seconds'][s]:.1f}" for s in ["build"] + STEPS]
        else:
            cells += ["-"] * (len(head) - 5)
        cells += [f"{row['child_seconds']:.0f}", targets(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--state-dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="digital weights")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--json", type=Path, help="save the raw numbers here")
    parser.add_argument("--smoke", "--quick", action="store_true",
                        help="shrunken OLMoE (hidden 256, 8 experts x 128, vocab 1000), 2 layers")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec of one child run
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return None

    layers = [2] if args.smoke else args.layers
    state_dtypes = args.state_dtypes if has_state_dtype() else ["n/a"]  # field not there yet: float32 only
    rows = []
    for n in layers:
        for name in args.presets:
            for state in state_dtypes:
                spec = {"layers": n, "preset": name, "state_dtype": state, "dtype": args.dtype,
                        "tokens": args.tokens, "smoke": args.smoke}
                rows.append(run_child(spec, args.timeout))
                print(f"  {n} layer(s) {name} state {state}: {rows[-1]['status']} "
                      f"in {rows[-1]['child_seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.smoke:  # the killed-child path: the last configuration again, given 0.5 s
        rows.append(run_child(spec, timeout=0.5) | {"preset": f"{spec['preset']} (kill check)"})
    model = "OLMoE-1B-7B shrunk (smoke)" if args.smoke else "OLMoE-1B-7B"
    print(f"# Memory of the analog simulation: {model}, {args.dtype} digital weights, {args.tokens} tokens\n")
    print(f"RSS/p: bytes of RSS over the {args.dtype} digital model, per analog parameter, after each step; "
          "chip state after forward 2; s: seconds per step; child s: the whole subprocess.\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""Memory and time of the analog simulation of a real-sized MoE model (OLMoE-1B-7B, 1 or 2 layers).

    python -m benchmarks.bench_memory [--layers 1 2] [--presets ...] [--state-dtypes float32 bfloat16]
                                      [--dtype float32|bfloat16] [--tokens 128] [--timeout S] [--json PATH]
    python -m benchmarks.bench_memory --smoke     # shrunken model, every code path, < 1 min
    python -m benchmarks.bench_memory --layers 16 --dtype bfloat16 --state-dtypes bfloat16 --presets rasch2023 \
        --streaming                               # the whole OLMoE-1B-7B, digital weights dropped

Every configuration runs in a fresh subprocess (``--worker``), so one run's allocator state and peak RSS
do not leak into the next, and a child killed for memory or time becomes a table row, not a crash. The
child builds the digital model (random weights), then ``analogize_`` (everything but lm_head analog),
``program_analog_``, ``drift_analog_(3600 s)`` and two forwards of 1 x tokens random ids, recording RSS
(VmRSS) and seconds after each step, VmHWM at the end, and the bytes held by the analog chips.
"RSS over digital / param" is (RSS after the step - RSS after building the digital model) / analog
parameters: the simulation's own memory, per weight it simulates.

``--streaming`` converts with ``analogize_(..., t_inference=3600, keep_digital=False)`` instead: each layer
is programmed, drifted and freed of its digital weights during the conversion (one step, "convert"), so
the RSS stays at about one weight copy; that is how a whole model fits this machine.
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

OLMOE_CONFIG = Path(__file__).resolve().parent.parent / "romer_kernels" / "assets" / "configs" / "olmoe-1b-7b.json"
SMOKE_DIMS = {"hidden_size": 256, "intermediate_size": 128, "num_experts": 8, "vocab_size": 1000}
PRESETS = ["aihwkit-default", "rasch2023", "lightning-8bit", "gaussian-chip"]
STEPS = ["analogize", "program", "drift", "forward 1", "forward 2"]
STREAMING_STEPS = ["convert", "forward 1", "forward 2"]
CHIP_TARGET_BYTES = {"float32": 4.0, "bfloat16": 2.0}  # the weight-sized state tensor, per analog parameter
T_INFERENCE = 3600.0
GIB = 1024 ** 3


# -- child ----------------------------------------------------------------------------------------
def proc_status_bytes(field: str) -> int:
    """A ``kB`` field (VmRSS, VmHWM) of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


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
    from romer_kernels.nn import analog_matrices, chip_state_bytes, drift_analog_, program_analog_  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = preset(spec["preset"]).replace(state_dtype=spec["state_dtype"])
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

    if spec["streaming"]:
        steps = {"convert": lambda: analogize_(model, config, Placement(), seed=1, t_inference=T_INFERENCE,
                                               keep_digital=False)}
    else:
        steps = {
            "analogize": lambda: analogize_(model, config, Placement(), seed=0),
            "program": lambda: program_analog_(model, seed=1),
            "drift": lambda: drift_analog_(model, T_INFERENCE),
        }
    steps.update({"forward 1": forward, "forward 2": forward})
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        result["seconds"][name] = time.perf_counter() - start
        result["rss"][name] = proc_status_bytes("VmRSS")
        result["chip_bytes"][name] = chip_state_bytes(model)
        # a child killed later still tells the parent how far it got
        print("STEP " + json.dumps({"step": name, "rss": result["rss"][name]}), flush=True)
    matrices = list(analog_matrices(model))
    result["state_bytes"] = sum(m.chip.state.nbytes for m in matrices if m.chip.state is not None)
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
    """The run went end to end (the target for 2 layers) and the one weight-sized state tensor per chip
    fits its state dtype's budget (the per-column vectors, ~0.02 B/param, are reported beside it)."""
    if row["status"] != "ok":
        return f"no: {row['status']}, last step done: {row.get('last_step') or 'none'}"
    per_param = row["state_bytes"] / row["analog_params"]
    limit = CHIP_TARGET_BYTES[row["state_dtype"]]
    return "yes" if per_param <= limit else f"no (state {per_param:.2f} > {limit:g} B/param)"


def table(rows: list[dict], steps: list[str]) -> str:
    head = (["layers", "preset", "state", "analog params"]
            + [f"RSS/p {step}" for step in steps]
            + ["peak RSS (GiB)", "chip state (B/param)", "of it per-column vectors"]
            + [f"s {step}" for step in ["build"] + steps] + ["child s", "targets met?"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["layers"]), row["preset"], row["state_dtype"]]
        if row["status"] == "ok":
            params = row["analog_params"]
            chip = row["chip_bytes"]["forward 2"]
            cells.append(f"{params / 1e6:.1f} M")
            cells += [f"{(row['rss'][s] - row['rss']['build']) / params:.2f}" for s in steps]
            cells += [f"{row['peak_rss'] / GIB:.2f}", f"{chip / params:.3f}", f"{(chip - row['state_bytes']) / params:.3f}"]
            cells += [f"{row['seconds'][s]:.1f}" for s in ["build"] + steps]
        else:
            cells += ["-"] * (len(head) - 6)
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
    parser.add_argument("--streaming", action="store_true",
                        help="analogize_(t_inference=3600, keep_digital=False): program, drift, drop the digital "
                             "weights layer by layer during the conversion")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec of one child run
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return None

    layers = [2] if args.smoke else args.layers
    state_dtypes = args.state_dtypes
    rows = []
    for n in layers:
        for name in args.presets:
            for state in state_dtypes:
                spec = {"layers": n, "preset": name, "state_dtype": state, "dtype": args.dtype,
                        "tokens": args.tokens, "smoke": args.smoke, "streaming": args.streaming}
                rows.append(run_child(spec, args.timeout))
                print(f"  {n} layer(s) {name} state {state}: {rows[-1]['status']} "
                      f"in {rows[-1]['child_seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.smoke:  # the killed-child path: the last configuration again, given 0.5 s
        rows.append(run_child(spec, timeout=0.5) | {"preset": f"{spec['preset']} (kill check)"})
    model = "OLMoE-1B-7B shrunk (smoke)" if args.smoke else "OLMoE-1B-7B"
    mode = ", streaming conversion (digital weights dropped)" if args.streaming else ""
    print(f"# Memory of the analog simulation: {model}, {args.dtype} digital weights, {args.tokens} tokens{mode}\n")
    print(f"RSS/p: bytes of RSS over the {args.dtype} digital model, per analog parameter, after each step; "
          "chip state after forward 2; s: seconds per step; child s: the whole subprocess.\n")
    print(table(rows, STREAMING_STEPS if args.streaming else STEPS))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

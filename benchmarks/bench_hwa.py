"""Memory and time of an HWA training step vs a digital training step, on the bundled model and real dims.

    python -m benchmarks.bench_hwa                 # tiny-olmoe (8 x 128 tokens) and one OLMoE-1B-7B layer (1 x 64)
    python -m benchmarks.bench_hwa --smoke         # shrunken real-dims model only, < 1 min
    python -m benchmarks.bench_hwa --json PATH
    python -m benchmarks.bench_hwa --learn-input-range   # and each configuration again with learned input ranges

Each configuration runs in a fresh subprocess (its peak RSS is its own). The child builds the model (float32;
the real-dims one with random weights from the OLMoE-1B-7B config), runs two digital AdamW steps (LM loss),
then converts it (rasch2023, all analog but lm_head), switches it to HWA training mode and runs two HWA
steps, recording RSS after each step and the peak (VmHWM) of each phase: the peak is reset (Linux
``/proc/self/clear_refs``) after the digital steps, so the HWA steps' peak is their own. The budget of a training step is the weights,
their gradients and AdamW's two moments: 16 bytes per parameter in float32 (no chip: HWA training holds
none, and the backward draws the noisy tile weights again instead of keeping them). "HWA over digital"
is the RSS after the HWA steps minus the RSS after the digital steps, per analog parameter.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_memory import build_model, proc_status_bytes

GIB = 1024 ** 3


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def worker(spec: dict) -> dict:
    import torch  # noqa: PLC0415
    from romer_kernels.config.hwa import HWAConfig  # noqa: PLC0415
    from romer_kernels.models.loading import load_model  # noqa: PLC0415
    from romer_kernels.moe.convert import analogize_  # noqa: PLC0415
    from romer_kernels.nn import analog_matrices, chip_state_bytes  # noqa: PLC0415
    from romer_kernels.nn.hwa import hwa_training_  # noqa: PLC0415

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if spec["model"] == "tiny-olmoe":
        model, _ = load_model("tiny-olmoe", "float32")
        vocab = model.config.vocab_size
    else:
        model, vocab = build_model(spec["layers"], "float32", spec["smoke"])
    out = {"rss": {"build": proc_status_bytes("VmRSS")}, "seconds": {}}
    ids = torch.randint(vocab, (spec["batch"], spec["tokens"]), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(name: str) -> None:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["seconds"][name] = time.perf_counter() - start
        out["rss"][name] = proc_status_bytes("VmRSS")
        print("STEP " + json.dumps({"step": name}), flush=True)

    model.train()
    step("digital 1")
    step("digital 2")
    out["peak_rss"] = {"digital": proc_status_bytes("VmHWM")}
    analogize_(model, "rasch2023")
    training = hwa_training_(model, HWAConfig(learn_input_range=spec.get("learn_input_range", False)))
    if training.input_ranges:  # stepped with the weights, as romer hwa-train does
        optimizer.add_param_group({"params": list(training.input_ranges.values()), "weight_decay": 0.0})
    separate = reset_peak_rss()
    for k in (1, 2):
        training.step = k
        step(f"hwa {k}")
    out["chip_bytes"] = chip_state_bytes(model)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["analog_params"] = sum(m.out_features * m.in_features for m in analog_matrices(model))
    # without the reset (peak_separate False) this peak spans both phases
    out["peak_rss"]["hwa"] = proc_status_bytes("VmHWM")
    out["peak_separate"] = separate
    return out


def run_child(spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_hwa", "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {**spec, "status": f"killed (timeout {timeout:g} s)"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines and lines[-1].startswith("RESULT "):
        return {**spec, "status": "ok", **json.loads(lines[-1][len("RESULT "):])}
    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
    return {**spec, "status": f"failed rc={done.returncode}: {tail}"}


def table(rows: list[dict]) -> str:
    head = ("| model | params | digital step (s) | HWA step (s) | HWA / digital | RSS after digital steps | "
            "after HWA steps | peak RSS digital steps | peak RSS HWA steps | HWA over digital / analog param | "
            "chip bytes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status']} |")
            continue
        rss, secs = row["rss"], row["seconds"]
        extra = (rss["hwa 2"] - rss["digital 2"]) / row["analog_params"]
        peak = row["peak_rss"]
        hwa_peak = f"{peak['hwa'] / GIB:.2f} GiB" + ("" if row["peak_separate"] else " (both phases: no reset)")
        lines.append(f"| {row['label']} | {row['params'] / 1e6:.1f} M | {secs['digital 2']:.2f} | {secs['hwa 2']:.2f} | "
                     f"{secs['hwa 2'] / secs['digital 2']:.1f}x | {rss['digital 2'] / GIB:.2f} GiB | "
                     f"{rss['hwa 2'] / GIB:.2f} GiB | {peak['digital'] / GIB:.2f} GiB | {hwa_peak} | {extra:+.2f} B | "
                     f"{row['chip_bytes']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a shrunken real-dims model only")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--learn-input-range", action="store_true", help="each configuration also with learned "
                        "input ranges (HWAConfig.learn_input_range)")
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return 0
    specs = [] if args.smoke else [dict(label="tiny-olmoe, 8 x 128 tokens", model="tiny-olmoe", batch=8, tokens=128)]
    specs.append(dict(label=f"OLMoE-1B-7B dims, 1 layer{' (smoke)' if args.smoke else ''}, 1 x 64 tokens",
                      model="olmoe", layers=1, smoke=args.smoke, batch=1, tokens=64))
    if args.learn_input_range:
        specs += [dict(spec, label=spec["label"] + ", learned input ranges", learn_input_range=True) for spec in specs]
    rows = [run_child(spec, args.timeout) for spec in specs]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

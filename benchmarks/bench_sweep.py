"""Trials per minute of a Monte Carlo sweep: local (one process) vs Ray with 1 and 2 workers.

    python -m benchmarks.bench_sweep [--layers 1] [--json PATH]   # the demo sweep and a real-dims OLMoE sweep
    python -m benchmarks.bench_sweep --smoke                     # shrunken real-dims model, < 2 min

Two sweeps: the demo (tiny-olmoe, rasch2023, 3 seeds x 4 noise scales at t = 1 h, 8 windows of 256) and
a real-dims one: OLMoE-1B-7B's dimensions (hidden 2048, 64 experts x 1024, top-8, vocabulary 50304) with
``--layers`` decoder layers of random bfloat16 weights, written once to a temporary folder with the
bundled tokenizer so that every worker loads it from disk, rasch2023, 2 seeds x 2 scales at t = 1 h, 2
windows of 128 tokens. Every configuration runs in a fresh subprocess (its driver RSS is its own):
``copy per trial (before)`` (what the sweep did before: a deep copy of the clean model converted,
programmed and drifted for every trial), ``local`` (the driver runs the trials on its one model,
re-programmed in place, 2 torch threads), ``ray 1x1`` and ``ray 2x1`` (1 or 2 workers of 1 CPU on a
local Ray with 2 CPUs). Reported: start-up (model load, clean evaluation, actors), trials
per minute once started, the first trial's seconds (it converts the model and allocates the chips; on
Ray, the first trial of the first worker) and the mean of the others, and peak RSS of the driver and of each worker. For
``local`` the per-trial cost is also split: one program + drift of every chip, one evaluation.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLMOE_CONFIG = ROOT / "romer_kernels" / "assets" / "configs" / "olmoe-1b-7b.json"
TOKENIZER = ROOT / "romer_kernels" / "assets" / "models" / "tiny-olmoe"
SMOKE_DIMS = {"hidden_size": 256, "intermediate_size": 128, "num_experts": 8, "vocab_size": 4096}
EXECUTORS = {"copy per trial (before)": "copy", "local": None, "ray 1x1": (1, 1), "ray 2x1": (2, 1)}
GIB = 1024 ** 3


def sweeps(model_dir: str | None) -> dict[str, dict]:
    demo = dict(model="tiny-olmoe", seeds=3, scales=[0.5, 1.0, 2.0, 4.0], seq_len=256, batch_size=8, windows=8)
    out = {"demo (tiny-olmoe)": demo}
    if model_dir is not None:
        out["real-dims OLMoE"] = dict(model=model_dir, seeds=2, scales=[1.0, 2.0], seq_len=128, batch_size=2,
                                      windows=2)
    return out


def write_real_dims_model(layers: int, smoke: bool, directory: Path) -> Path:
    """OLMoE-1B-7B dims, ``layers`` layers of random bfloat16 weights, with the bundled tokenizer."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, OlmoeConfig  # noqa: PLC0415

    values = json.loads(OLMOE_CONFIG.read_text())
    values.update(num_hidden_layers=layers, **(SMOKE_DIMS if smoke else {}))
    values.pop("torch_dtype", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(OlmoeConfig(**values), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, directory / name)
    return directory


# -- child ------------------------------------------------------------------------------------------
def child(spec: dict) -> dict:
    import torch  # noqa: PLC0415

    from romer_kernels.config import preset  # noqa: PLC0415
    from romer_kernels.evaluation.executors import LocalExecutor, RayExecutor, peak_rss, run_trials  # noqa: PLC0415
    from romer_kernels.evaluation.lm_metrics import evaluate_lm  # noqa: PLC0415
    from romer_kernels.evaluation.montecarlo import ResultsStore, grid  # noqa: PLC0415
    from romer_kernels.evaluation.runner import SweepSettings, Workload  # noqa: PLC0415
    from romer_kernels.nn.model_helpers import drift_analog_, program_analog_  # noqa: PLC0415

    torch.set_num_threads(2)
    sweep = spec["sweep"]
    settings = SweepSettings(config=preset("rasch2023"), seeds=tuple(range(sweep["seeds"])),
                             noise_scales=tuple(sweep["scales"]), times=(3600.0,), seq_len=sweep["seq_len"],
                             batch_size=sweep["batch_size"], max_windows=sweep["windows"])
    workload = Workload(sweep["model"])
    shape = spec["ray"]
    if shape == "copy":
        executor = None
    elif shape is None:
        executor = LocalExecutor()
    else:
        import ray  # noqa: PLC0415

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        executor = RayExecutor(workers=shape[0], cpus_per_worker=shape[1])
    trials = grid(settings.seeds, settings.noise_scales, settings.times)
    start = time.perf_counter()
    session = executor.open(workload, settings) if executor is not None else copy_per_trial(workload, settings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        store = ResultsStore(Path(run_dir) / "results.sqlite", {"bench": True})
        run_trials(store, trials, session, progress=False)
        finished = time.perf_counter()
        seconds = [float(row[0]) for row in store.connection.execute("SELECT seconds FROM trials ORDER BY rowid")]
        store.close()
    result = {"startup_s": started - start, "run_s": finished - started, "trials": len(trials),
              "trial_seconds": seconds, "driver_peak_rss": peak_rss()}
    if shape is None:  # the parts of one trial: program + drift of every chip, one evaluation
        runner = session.runner
        model = runner.prepare(trials[0])
        t0 = time.perf_counter()
        program_analog_(model, 7)
        drift_analog_(model, 3600.0, drift_index=0)
        t1 = time.perf_counter()
        evaluate_lm(model, runner.eval_ids, clean=runner.clean.trace, **settings.eval_args)
        result.update(program_drift_s=t1 - t0, evaluate_s=time.perf_counter() - t1)
    elif shape != "copy":
        result["worker_peak_rss"] = session.worker_peak_rss()
    session.close()
    return result


def copy_per_trial(workload, settings):
    """The sweep as it was before in-place re-programming: every trial on a deep copy of the clean model."""
    import copy  # noqa: PLC0415

    from romer_kernels.config.scaling import scale_noise  # noqa: PLC0415
    from romer_kernels.evaluation.executors import FunctionSession  # noqa: PLC0415
    from romer_kernels.evaluation.lm_metrics import evaluate_lm  # noqa: PLC0415
    from romer_kernels.evaluation.runner import trial_metrics  # noqa: PLC0415
    from romer_kernels.moe.convert import analogize_  # noqa: PLC0415
    from romer_kernels.nn.model_helpers import drift_analog_, program_analog_  # noqa: PLC0415

    model, eval_ids, *_ = workload.load()
    clean = evaluate_lm(model, eval_ids, **settings.eval_args)

    def run_trial(trial):
        analog = copy.deepcopy(model)
        config = scale_noise(settings.config, trial.noise_scale)
        analogize_(analog, config, settings.placement, seed=trial.seed)
        program_analog_(analog, trial.seed)
        drift_analog_(analog, trial.t_inference)
        return trial_metrics(evaluate_lm(analog, eval_ids, clean=clean.trace, **settings.eval_args))

    return FunctionSession(run_trial)


# -- parent -----------------------------------------------------------------------------------------
def run_child(spec: dict, timeout: float) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_sweep", "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(lines[-1])


def table(results: dict[str, dict[str, dict]]) -> str:
    head = ("| sweep | executor | trials | start-up s | trials / min | first trial s | later trials s "
            "| program+drift s | eval s | driver peak RSS | worker peak RSS |")
    rows = [head, "|" + "---|" * 11]
    for sweep, by_executor in results.items():
        for name, r in by_executor.items():
            if "error" in r:
                rows.append(f"| {sweep} | {name} | - | - | - | - | - | - | - | - | {r['error']} |")
                continue
            workers = ", ".join(f"{b / GIB:.2f}" for b in r.get("worker_peak_rss", [])) or "-"
            seconds = r["trial_seconds"]  # a worker's first trial converts the model and allocates the chips
            later = seconds[1:] or seconds
            rows.append(f"| {sweep} | {name} | {r['trials']} | {r['startup_s']:.1f} | "
                        f"{60 * r['trials'] / r['run_s']:.1f} | {seconds[0]:.2f} | {sum(later) / len(later):.2f} | "
                        f"{r.get('program_drift_s', float('nan')):.2f} | {r.get('evaluate_s', float('nan')):.2f} | "
                        f"{r['driver_peak_rss'] / GIB:.2f} GiB | {workers} GiB |")
        base = by_executor.get("ray 1x1", {})
        two = by_executor.get("ray 2x1", {})
        if "run_s" in base and "run_s" in two:
            rows.append(f"| {sweep} | 2 vs 1 workers | | | {base['run_s'] / two['run_s']:.2f}x | | | | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the real-dims model")
    parser.add_argument("--smoke", action="store_true", help="shrunken real-dims model (fast)")
    parser.add_argument("--no-real-dims", action="store_true", help="only the demo sweep")
    parser.add_argument("--executors", nargs="+", default=list(EXECUTORS), choices=list(EXECUTORS))
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        model_dir = None
        if not args.no_real_dims:
            start = time.perf_counter()
            model_dir = str(write_real_dims_model(args.layers, args.smoke, Path(tmp) / "olmoe-real-dims"))
            print(f"real-dims model ({args.layers} layer(s){', smoke' if args.smoke else ''}) written in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
        results: dict[str, dict[str, dict]] = {}
        for sweep_name, sweep in sweeps(model_dir).items():
            for name in args.executors:
                print(f"{sweep_name}: {name} ...", file=sys.stderr, flush=True)
                results.setdefault(sweep_name, {})[name] = run_child({"sweep": sweep, "ray": EXECUTORS[name]},
                                                                     args.timeout)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``romer`` command line: ``romer demo`` is the main job (see ``romer --help``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from romer_kernels.kernels.backends import BACKENDS, resolve_backend, set_backend
from romer_kernels.config.presets import PRESETS, config_label, load_config, preset

# wide enough for module names when the output is a file or a CI log, not a terminal
console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_MODEL = "tiny-olmoe"


# -- shared pieces ---------------------------------------------------------------------------------
TIME_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0, "y": 365 * 86400.0}


def seconds(text: str) -> float:
    """A time in seconds from ``3600``, ``60s``, ``5min``, ``1h``, ``1d``, ``2w`` or ``1y`` (365 days)."""
    import re  # noqa: PLC0415

    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|min|h|d|w|y)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give seconds (3600) or a number with a unit "
                                         f"({', '.join(TIME_UNITS)}), e.g. 1h, 1d, 1y")
    return float(match.group(1)) * TIME_UNITS[match.group(2) or "s"]

PRESET_HELP = (f"a preset ({', '.join(PRESETS)}) or a JSON config file (start from `romer presets NAME --out "
               "FILE`); default rasch2023")
SET_HELP = ("override config fields on top of --preset, e.g. --set io.out_noise=0.02 noise.prog_noise_scale=1.5 "
            "(values as JSON)")


def _config(args):
    """The analog config of a command: --preset (a name or a JSON file) with the --set overrides."""
    return load_config(args.preset, getattr(args, "set", None) or [])


def _label(args) -> str:
    """The config's name in titles and default run folders (overrides add a short digest, so that two
    configs never share a folder)."""
    import hashlib  # noqa: PLC0415

    sets = getattr(args, "set", None) or []
    digest = f"+{hashlib.sha1(' '.join(sets).encode()).hexdigest()[:6]}" if sets else ""
    return config_label(args.preset) + digest


ALLOW_DIGITAL_HELP = ("let weight matrices the package cannot put on crossbars (convolutions, unknown layouts) stay "
                      "digital: 'all', or comma-separated parameter-name patterns such as '*.conv1d.weight'; "
                      "without it such a model is refused with the list")


def _placement(args):
    from romer_kernels.moe.convert import Placement  # noqa: PLC0415

    placement = Placement()
    if args.placement:
        path = Path(args.placement)
        if not path.is_file():
            raise FileNotFoundError(f"placement file {path} not found")
        try:
            placement = Placement.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"placement file {path}: {error}") from None
    allow = getattr(args, "allow_digital", None)
    if allow:
        allow = True if allow == "all" else tuple(p.strip() for p in allow.split(",") if p.strip())
        placement = dataclasses.replace(placement, allow_digital=allow)
    return placement


def _settings(args, placement=None):
    from romer_kernels.evaluation.sweep import SweepSettings  # noqa: PLC0415
    from romer_kernels.moe.convert import Placement  # noqa: PLC0415

    return SweepSettings(config=_config(args), placement=placement or Placement(), seeds=tuple(range(args.seeds)),
                         noise_scales=tuple(args.scales), times=tuple(args.times), seq_len=args.seq_len,
                         batch_size=args.batch_size, max_windows=args.windows, tasks=_tasks(args),
                         task_limit=args.task_limit, hwa_checkpoint=_hwa_checkpoint(args))


def _hwa_checkpoint(args) -> str | None:
    """--hwa-checkpoint: the model folder romer hwa-train wrote, given as it or as its run folder."""
    path = getattr(args, "hwa_checkpoint", None)
    if not path:
        return None
    folder = Path(path)
    if (folder / "model" / "model.safetensors").is_file():
        folder = folder / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"--hwa-checkpoint {path}: no HWA checkpoint there (the run folder of romer "
                                "hwa-train, or its model/ folder)")
    return str(folder)


def _tasks(args) -> tuple[str, ...]:
    """The --tasks list; ``none`` = no task; ``auto`` (romer demo's default) = the bundled task when
    lm-evaluation-harness is installed, else none."""
    text = (args.tasks or "").strip()
    if text == "auto":
        import importlib.util  # noqa: PLC0415

        from romer_kernels.evaluation.tasks import BUNDLED_TASKS  # noqa: PLC0415

        return BUNDLED_TASKS if importlib.util.find_spec("lm_eval") is not None else ()
    if text == "none":
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _task_columns(args) -> list[str]:
    """The task metric shown in the printed tables (accuracy; acc_norm is in the CSV and JSON files)."""
    return [f"acc:{task}" for task in _tasks(args)]


def _fmt(cell, digits=3):
    if cell is None:
        return "-"
    mean, std, low, high = cell
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _executor(args):
    from romer_kernels.evaluation.executors import make_executor  # noqa: PLC0415

    options = dict(address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                   gpus_per_worker=args.gpus_per_worker)
    if args.executor == "local":
        given = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --executor ray")
    return make_executor(args.executor, **options)


def _workload(args, model_name: str, calib_split: str | None = None):
    from romer_kernels.evaluation.runner import Workload  # noqa: PLC0415

    device = "cuda" if (args.gpus_per_worker or 0) > 0 else "cpu"
    return Workload(model_name, args.data, args.split, calib_split, args.dtype, device, args.backend)


def _print_clean(clean) -> None:
    routing = f", LIS {clean.routing.lis:.3f}" if clean.routing else ""
    share = (f" ({100 * clean.tokens / clean.stream_tokens:.1f} % of the split's {clean.stream_tokens} tokens; "
             "--windows 0 scores all)") if clean.stream_tokens else ""
    console.print(f"clean: PPL {clean.perplexity:.2f}{routing} on {clean.tokens} scored tokens{share}")


def _change(cell) -> str:
    """A paired relative change with its interval; * when the interval excludes 0 (beyond the seed spread)."""
    if cell is None:
        return "-"
    change, low, high, n = cell
    if n < 2:
        return f"{100 * change:+.1f} %"
    star = " *" if low > 0 or high < 0 else ""
    return f"{100 * change:+.1f} % [{100 * low:+.1f}, {100 * high:+.1f}]{star}"


def _warn_few_seeds(args) -> None:
    if args.seeds < 3:
        console.print(f"[yellow]note:[/] {args.seeds} chip seed(s): a std or interval from fewer than 3 chips says little; "
                      "use --seeds 3 or more", highlight=False)


def _print_failures(failed) -> None:
    if failed:
        console.print(f"[yellow]{len(failed)} trial(s) failed and are in no row above[/]; the first: "
                      f"{failed[0][1]}", highlight=False)


def _sweep(args, model_name: str, run_dir: Path, title: str) -> int:
    from romer_kernels.evaluation.montecarlo import Trial  # noqa: PLC0415
    from romer_kernels.evaluation.sweep import noise_sweep, plot_sweep  # noqa: PLC0415

    settings = _settings(args, _placement(args))
    executor = _executor(args)
    console.print(f"[bold]{title}[/]: model {model_name}, preset {_label(args)}, {args.seeds} chip seeds x noise "
                  f"scales {args.scales} x t {args.times} s on {args.data}/{args.split}, windows of {args.seq_len} "
                  f"(at most {args.windows}), run folder {run_dir}, executor {executor.describe()}")
    start = time.perf_counter()
    worst = Trial(0, max(args.scales), max(args.times))
    noisy = {}
    result = noise_sweep(_workload(args, model_name), None, settings, run_dir, on_clean=_print_clean,
                         executor=executor, on_session=lambda session: noisy.update(trace=session.evaluate(worst).trace))
    table = Table(title=f"{model_name} on analog hardware ({_label(args)}), mean ± std over chip seeds")
    tasks = _task_columns(args)
    for column in ("noise scale", "t (s)", "n", "PPL", "LIS", "flip rate", "top-k overlap", "KL(noisy‖clean)",
                   *(task.replace(":", " ") for task in tasks)):
        table.add_column(column, justify="right")
    clean = result.clean
    table.add_row("clean", "-", "1", f"{clean.perplexity:.3f}", f"{clean.routing.lis:.3f}" if clean.routing else "-",
                  "0", "1", "0", *(f"{clean.tasks[task]:.3f}" for task in tasks))
    for row in result.table():
        table.add_row(f"{row['noise_scale']:g}", f"{row['t']:g}", str(row["n"]), _fmt(row.get("ppl")),
                      _fmt(row.get("lis")), _fmt(row.get("flip_rate")), _fmt(row.get("overlap")),
                      _fmt(row.get("kl_to_clean"), 4), *(_fmt(row.get(task)) for task in tasks))
    console.print(table)
    _warn_few_seeds(args)
    _print_failures(result.failed)
    plot = plot_sweep(result, noisy["trace"], run_dir / f"sweep.{args.plot_format}",
                      f"{model_name}, {_label(args)}; expert load of chip seed 0 at noise scale "
                      f"{worst.noise_scale:g}, t = {worst.t_inference:g} s")
    console.print(f"{result.trials_run} trials run now; {run_dir}: results.sqlite (resumable store), results.csv "
                  f"(one row per trial), summary.json (this table), plot {plot.name}; "
                  f"{time.perf_counter() - start:.0f} s")
    return 0


def _add_sweep_arguments(parser: argparse.ArgumentParser, run_dir: str) -> None:
    parser.add_argument("--preset", default="rasch2023", help=PRESET_HELP)
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="PART.FIELD=VALUE", help=SET_HELP)
    parser.add_argument("--placement", help="JSON file with a Placement (default: all analog but lm_head)")
    parser.add_argument("--allow-digital", metavar="all|PATTERNS", help=ALLOW_DIGITAL_HELP)
    parser.add_argument("--data", default="bundled", help="'bundled', a text file, or hf:NAME:CONFIG[:SPLIT]")
    parser.add_argument("--split", default="test", choices=["train", "valid", "test"], help="the split evaluated")
    parser.add_argument("--seeds", type=int, default=3, help="chip instances per setting")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="noise scales")
    parser.add_argument("--times", type=seconds, nargs="+", default=[3600.0],
                        help="times after programming: seconds or with a unit (1h, 1d, 1y = 365 days); default 1h")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (one routing batch for LIS)")
    parser.add_argument("--windows", type=int, default=8, help="at most this many windows per trial (0 = all)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="dtype of the digital weights; auto = the checkpoint's own (a bfloat16 checkpoint "
                             "stays bfloat16, with no float32 copy)")
    parser.add_argument("--tasks", metavar="TASK[,TASK...]",
                        help="also score lm-evaluation-harness tasks on the clean model and every chip (pip install "
                             "'romer_kernels[lm_eval]'), e.g. wiki_cloze (bundled, offline) or hellaswag,arc_easy,piqa "
                             "(data from the local datasets cache; runs are offline); none = no task (romer demo's "
                             "default, auto, runs wiki_cloze when lm_eval is installed)")
    parser.add_argument("--task-limit", type=int, help="--tasks: the first N documents of each task (default: all)")
    parser.add_argument("--plot-format", default="png", choices=["png", "svg"], help="file format of the plot")
    parser.add_argument("--run-dir", default=run_dir)
    parser.add_argument("--executor", default="local", choices=["local", "ray"],
                        help="where the trials run: local = this process (default), ray = Ray workers that each "
                             "load the model once (pip install 'romer_kernels[ray]'); results are the same")
    parser.add_argument("--address", help="--executor ray: auto (the cluster this machine is part of) or HOST:PORT "
                        "of a head node (default: start a local Ray)")
    parser.add_argument("--workers", type=int, help="--executor ray: workers (default: one per cluster CPU / "
                        "--cpus-per-worker)")
    parser.add_argument("--cpus-per-worker", type=float, help="--executor ray: CPUs (and torch threads) per worker "
                        "(default 1)")
    parser.add_argument("--gpus-per-worker", type=float, help="--executor ray: GPUs per worker (default 0; > 0 runs "
                        "each worker's model on its GPU)")


# -- commands --------------------------------------------------------------------------------------
def _run_folder(args, base: str) -> Path:
    """The default run folder: ``base`` plus every choice the folder's fingerprint keeps that differs from
    the command's defaults (placement, data, split, window settings, dtype, tasks), so that two runs with
    different settings never meet in one folder (the store would refuse the second)."""
    import re  # noqa: PLC0415

    defaults = build_parser().parse_args([args.command] + (["--model", args.model] if args.command == "eval" else []))
    parts = []
    if args.placement:
        parts.append(f"placement-{Path(args.placement).stem}")
    if getattr(args, "allow_digital", None):
        parts.append("allow-digital")
    if getattr(args, "hwa_checkpoint", None):
        parts.append("hwa-" + Path(_hwa_checkpoint(args)).parent.name)
    for name, prefix in (("data", "data-"), ("split", ""), ("seq_len", "L"), ("batch_size", "b"), ("windows", "w"),
                         ("dtype", "")):
        value, default = getattr(args, name), getattr(defaults, name)
        if (value or None) != (default or None):
            text = "all" if value in (0, None) else Path(str(value)).stem if name == "data" else str(value)
            parts.append(prefix + text)
    def tasks_of(namespace):   # the limit matters only with tasks (as in the fingerprint)
        tasks = _tasks(namespace)
        return tasks, namespace.task_limit if tasks else None

    if tasks_of(args) != tasks_of(defaults):
        tasks, limit = tasks_of(args)
        parts.append("tasks-" + ("+".join(tasks) or "none") + (f"-{limit}" if limit else ""))
    return Path("-".join([base, *(re.sub(r"[^A-Za-z0-9_.+-]", "_", part) for part in parts)]))


def _demo(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir) if args.run_dir != "runs/demo" else _run_folder(args, "runs/demo")
    args.windows = args.windows or None
    return _sweep(args, args.model, run_dir, "romer demo")


def _eval(args: argparse.Namespace) -> int:
    args.windows = args.windows or None
    run_dir = Path(args.run_dir) if args.run_dir else _run_folder(args, f"runs/eval-{Path(args.model).name}-{_label(args)}")
    args.run_dir = str(run_dir)
    return _sweep(args, args.model, run_dir, "romer eval")


def _compare(args: argparse.Namespace) -> int:
    from romer_kernels.evaluation.compare import compare_methods, plot_compare  # noqa: PLC0415

    if args.placement:
        raise ValueError("romer compare sets the placement per variant; --placement is not used here")
    args.windows = args.windows or None
    run_dir = Path(args.run_dir) if args.run_dir else _run_folder(args, f"runs/compare-{Path(args.model).name}-{_label(args)}")
    args.run_dir = str(run_dir)
    settings = _settings(args)
    executor = _executor(args)
    console.print(f"[bold]romer compare[/]: {args.model}, preset {_label(args)}, variants {', '.join(args.variants)}, "
                  f"{args.seeds} chip seeds x scales {args.scales} x t {args.times} s; calibration on "
                  f"{args.calib_windows} windows of the {args.calib_split} split, evaluation on {args.split}; "
                  f"executor {executor.describe()}")
    start = time.perf_counter()
    result = compare_methods(_workload(args, args.model, args.calib_split), None, None, settings, tuple(args.variants),
                             run_dir, calib_windows=args.calib_windows, executor=executor)
    table = Table(title=f"{args.model} ({_label(args)}): methods, mean ± std over {args.seeds} chip seeds; LIS of the "
                        "router's top-k and of the crossbars (after copies / replicas share an expert's tokens); "
                        "PPL vs noisy: change on the same chips, 95 % t-interval on log PPL, * = beyond the seed spread")
    tasks = _task_columns(args)
    from romer_kernels.evaluation.compare import paired_change  # noqa: PLC0415

    change = paired_change(result.rows) if "noisy" in args.variants else {}
    training = any(s.metric == "train_steps" for s in result.summaries)   # an hwa variant: show its cost
    for column in ("noise scale", "t (s)", "variant", "n", "digital", "PPL", "PPL vs noisy (95 % CI, paired)", "LIS",
                   "crossbar LIS", "flip rate", *(task.replace(":", " ") for task in tasks),
                   *(["training"] if training else [])):
        table.add_column(column, justify="left" if column == "variant" else "right")
    clean = result.clean
    table.add_row("-", "-", "clean", "1", "100 %", f"{clean.perplexity:.3f}", "-", f"{clean.routing.lis:.3f}",
                  "-" if clean.crossbar_lis is None else f"{clean.crossbar_lis:.3f}", "0",
                  *(f"{clean.tasks[task]:.3f}" for task in tasks), *(["none"] if training else []))
    by_key: dict[tuple, dict] = {}
    for s in result.summaries:
        by_key.setdefault((s.noise_scale, s.t_inference, args.variants.index(s.variant)
                           if s.variant in args.variants else 99, s.variant), {})[s.metric] = (s.mean, s.std, s.ci_low, s.ci_high)
    for (scale, t, _, variant), metrics in sorted(by_key.items()):
        share = metrics.get("digital_share")
        table.add_row(f"{scale:g}", f"{t:g}", variant, str(args.seeds),
                      "-" if share is None else f"{100 * share[0]:.1f} %", _fmt(metrics.get("ppl")),
                      _change(change.get((scale, t, variant))), _fmt(metrics.get("lis")),
                      _fmt(metrics.get("crossbar_lis")), _fmt(metrics.get("flip_rate")),
                      *(_fmt(metrics.get(task)) for task in tasks),
                      *([_training_cost(metrics)] if training else []))
    console.print(table)
    console.print("digital: share of the weight-matrix parameters the variant keeps digital (lm_head included)",
                  style="dim")
    for variant in args.variants:   # say when a method did nothing, so that equal rows are not a mystery
        done = [m for (_, _, _, v), m in by_key.items() if v == variant]
        for metric, what in (("replaced_experts", "stage 1 replaced no expert (none under the threshold)"),
                             ("replicas", "R&Q added no replica")):
            if done and all(metric in m and m[metric][0] == 0 for m in done):
                console.print(f"[yellow]note:[/] {variant}: {what} on any chip", highlight=False)
    _warn_few_seeds(args)
    _print_failures(result.failed)
    plot = plot_compare(result, run_dir / f"compare.{args.plot_format}", f"{args.model}, {_label(args)}")
    console.print(f"{result.trials_run} trials run now; {run_dir}: results.sqlite, results.csv, summary.json, "
                  f"plot {plot.name}; {time.perf_counter() - start:.0f} s")
    return 0


def _training_cost(metrics: dict) -> str:
    if "train_steps" not in metrics:
        return "none"
    return f"{metrics['train_steps'][0]:.0f} steps, {metrics['train_seconds'][0]:.0f} s"


def _hwa_train(args: argparse.Namespace) -> int:
    from romer_kernels.config.hwa import HWAConfig  # noqa: PLC0415
    from romer_kernels.evaluation.hwa import hwa_train  # noqa: PLC0415
    from romer_kernels.methods.hwa import HWATrainSettings  # noqa: PLC0415

    args.windows = args.windows or None
    placement = _placement(args)
    train = HWATrainSettings(steps=args.steps, lr=args.lr, batch_size=args.train_batch_size,
                             seq_len=args.train_seq_len, warmup=args.warmup, weight_decay=args.weight_decay,
                             grad_clip=args.grad_clip, save_every=args.save_every, data_seed=args.data_seed)
    range_flags = [flag for flag, value in (("--input-range-decay", args.input_range_decay),
                                            ("--input-range-init-alpha", args.input_range_init_alpha))
                   if value is not None]
    if range_flags and not args.learn_input_range:
        raise ValueError(f"{', '.join(range_flags)} {'apply' if len(range_flags) > 1 else 'applies'} only to learned "
                         "input ranges: add --learn-input-range")
    ranges = {name: value for name, value in (("input_range_decay", args.input_range_decay),
                                              ("input_range_init_alpha", args.input_range_init_alpha))
              if value is not None}
    hwa = HWAConfig(weight_noise=args.weight_noise, weight_noise_scale=args.weight_noise_scale,
                    gaussian_sigma=args.gaussian_sigma, mvm_noise=not args.no_mvm_noise, clip_sigma=args.clip_sigma,
                    seed=args.seed, learn_input_range=args.learn_input_range, **ranges)
    run_dir = Path(args.run_dir or f"runs/hwa-{Path(args.model).name}-{_label(args)}-s{args.steps}")
    console.print(f"[bold]romer hwa-train[/]: {args.model}, preset {_label(args)}, {args.steps} steps of "
                  f"{args.train_batch_size} x {args.train_seq_len} tokens of the {args.data} train split, weight noise "
                  f"{args.weight_noise}; evaluated before and after on {args.seeds} chip seeds at t {args.times} s; run "
                  f"folder {run_dir}")
    start = time.perf_counter()
    result = hwa_train(args.model, _config(args), run_dir, train, hwa, placement, _settings(args, placement),
                       data=args.data, progress=True)
    table = Table(title=f"{args.model} ({_label(args)}): HWA fine-tuning, {result.run.steps} steps in "
                        f"{result.run.seconds:.0f} s; noisy PPL mean ± std over {args.seeds} chip seeds (95 % interval)")
    for column in ("model", "clean PPL", *(f"noisy PPL, scale {r['noise_scale']:g}, t {r['t']:g} s"
                                         for r in result.report["before"]["noisy"])):
        table.add_column(column, justify="left" if column == "model" else "right")
    for side, label in (("before", "before (base)"), ("after", "after HWA")):
        part = result.report[side]
        table.add_row(label, f"{part['clean_ppl']:.3f}",
                      *(f"{r['ppl']:.3f} ± {r['ppl_std']:.3f} ({r['ppl_low']:.2f}..{r['ppl_high']:.2f})"
                        for r in part["noisy"]))
    change = {(c["noise_scale"], c["t"]): (c["change"], c["low"], c["high"], c["n"]) for c in result.report["change"]}
    table.add_row("change (paired)", "", *(_change(change.get((r["noise_scale"], r["t"])))
                                             for r in result.report["before"]["noisy"]))
    console.print(table)
    _warn_few_seeds(args)
    console.print(f"{run_dir}: model/ (checkpoint: romer eval --model {result.run.checkpoint}; romer compare "
                  f"--hwa-checkpoint {run_dir} --variants noisy hwa hwa+romer), before/, after/, report.json, "
                  f"loss.png; {time.perf_counter() - start:.0f} s")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from romer_kernels.evaluation.sensitivity import plot_sensitivity, sensitivity_sweep, sweep_parts  # noqa: PLC0415

    if args.placement:
        raise ValueError("romer sensitivity places one part at a time; --placement is not used here")
    args.windows = args.windows or None
    run_dir = Path(args.run_dir) if args.run_dir else _run_folder(args, f"runs/sensitivity-{Path(args.model).name}-{_label(args)}")
    categories = tuple(c.strip() for c in args.categories.split(",")) if args.categories else None
    workload = _workload(args, args.model)
    parts = sweep_parts(workload, not args.no_per_layer, args.per_expert, categories)
    settings = _settings(args)
    executor = _executor(args)
    console.print(f"[bold]romer sensitivity[/]: {args.model}, preset {_label(args)}, {len(parts)} parts (one analog at "
                  f"a time, the rest digital) x {args.seeds} chip seeds x scales {args.scales} x t {args.times} s; "
                  f"run folder {run_dir}, executor {executor.describe()}")
    start = time.perf_counter()
    result = sensitivity_sweep(workload, None, settings, run_dir, parts=parts, executor=executor)
    _print_clean(result.clean)
    table = Table(title=f"{args.model} ({_label(args)}): one part analog, mean ± std over {args.seeds} chip seeds; "
                        "increase over clean with its 95 % interval")
    for column in ("analog part", "layer", "expert", "noise scale", "t (s)", "n", "PPL", "PPL increase",
                   "LIS increase"):
        table.add_column(column, justify="left" if column == "analog part" else "right")

    def increase(cell, digits=2):
        return "-" if cell is None else f"{cell[0]:+.{digits}f} [{cell[1]:+.{digits}f}, {cell[2]:+.{digits}f}]"

    for row in result.rows():
        table.add_row(row["category"], "all" if row["layer"] is None else str(row["layer"]),
                      "-" if row["expert"] is None else str(row["expert"]), f"{row['noise_scale']:g}", f"{row['t']:g}",
                      str(row["n"]), _fmt(row.get("ppl")), increase(row.get("ppl_increase")),
                      increase(row.get("lis_increase"), 3))
    console.print(table)
    _warn_few_seeds(args)
    _print_failures(result.failed)
    if args.per_expert:
        _print_score_correlations(args, result)
    has_layers = any(part.layer is not None for part in parts)
    plot = plot_sensitivity(result, run_dir / f"sensitivity.{args.plot_format}",
                            f"{args.model}, {_label(args)}") if has_layers else None
    console.print(f"{result.trials_run} trials run now; {run_dir}: results.sqlite, results.csv, summary.json"
                  + (f", heatmap {plot.name}" if plot else "") + f"; {time.perf_counter() - start:.0f} s")
    return 0


def _print_score_correlations(args, result) -> None:
    """How well the placement scores predict the measured per-expert sensitivity (Spearman per layer)."""
    from romer_kernels.evaluation.sensitivity import expert_points, plot_expert_scores, score_correlations  # noqa: PLC0415
    from romer_kernels.evaluation.variants import calibration_windows  # noqa: PLC0415

    loaded = _workload(args, args.model, "valid").load()          # the digital model, scores read its weights
    calib = calibration_windows(loaded.calib_ids, args.seq_len, 8)
    rows = score_correlations(result, loaded.model, calib)
    plot = plot_expert_scores(expert_points(result, loaded.model, calib), result.run_dir / f"expert-scores.{args.plot_format}",
                              f"{args.model}: expert scores vs measured sensitivity")
    table = Table(title="Spearman rank correlation of each expert score with the PPL increase when that expert "
                        "alone is analog (p-value); > 0: the score ranks sensitive experts first")
    for column in ("layer", "experts", "MaxNNScore", "frequency (valid split)", "random"):
        table.add_column(column, justify="right")

    def cell(value):
        return "-" if value is None else f"{value[0]:+.2f} (p={value[1]:.2f})"

    for row in rows:
        table.add_row(str(row["layer"]), str(row["experts"]), cell(row.get("maxnn")), cell(row.get("frequency")),
                      cell(row.get("random")))
    console.print(table)
    console.print(f"scatter of scores vs sensitivity: {plot}")


def _info(args: argparse.Namespace) -> int:
    if args.memory:
        return _info_memory(args)
    given = [flag for flag, value in (("--dtype", args.dtype), ("--state-dtype", args.state_dtype),
                                      ("--device", args.device), ("--fit", args.fit), ("--tokens", args.tokens))
             if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to the memory estimate: "
                         "add --memory")

    from romer_kernels.models.loading import load_model_and_tokenizer  # noqa: PLC0415
    from romer_kernels.moe.convert import analogize_, placement_report  # noqa: PLC0415

    model, _ = load_model_and_tokenizer(args.model)
    analogize_(model, _config(args), _placement(args))
    check = None
    if args.check:
        from romer_kernels.moe.check import check_conversion  # noqa: PLC0415

        check = check_conversion(model)  # one forward of 8 tokens: programs every chip
    table = Table(title=f"{args.model}: placement with preset {_label(args)}")
    for column in ("module", "category", "analog/digital", "parameters", "tiles"):
        table.add_column(column, justify="right" if column in ("parameters", "tiles") else "left")
    analog_params = total = tiles = 0
    rows = placement_report(model)
    for row in rows:
        table.add_row(row.module, row.category, row.kind, f"{row.parameters:,}", str(row.tiles))
        total += row.parameters
        tiles += row.tiles
        analog_params += row.parameters if row.kind.startswith("analog") else 0
    console.print(table)
    console.print(f"{analog_params:,} of {total:,} weight-matrix parameters analog, {tiles} tiles")
    unsupported = [row for row in rows if row.unsupported]
    if unsupported:
        console.print(f"[yellow]{len(unsupported)} weight matrices stay digital because the package cannot put them "
                      f"on crossbars (allowed by --allow-digital)[/]: {', '.join(row.module for row in unsupported[:5])}"
                      + (" ..." if len(unsupported) > 5 else ""), highlight=False)
    if check is not None:
        for line in check.lines():
            console.print(f"[yellow]{line}[/]", highlight=False)
        if check.ok:
            console.print("checked by one forward: every analog module computes, no other weight matrix enters a "
                          "matrix product digitally")
    return 0


def _info_memory(args: argparse.Namespace) -> int:
    """romer info --memory: the memory estimate from the model's config on the meta device (no weights)."""
    from romer_kernels.evaluation.memory import estimate_memory, parse_size  # noqa: PLC0415

    limit = parse_size(args.fit) if args.fit is not None else None  # a bad size fails before any work
    estimate = estimate_memory(args.model, _config(args), _placement(args), weight_dtype=args.dtype or "float32",
                               state_dtype=args.state_dtype, device=args.device or "cpu",
                               tokens=2048 if args.tokens is None else args.tokens)
    print(estimate.table())
    if limit is not None:
        print(estimate.fit_line(args.fit))
    return 0


def _layers(args: argparse.Namespace) -> int:
    from romer_kernels.evaluation.layer_error import layer_error_table  # noqa: PLC0415

    names = args.presets or list(PRESETS)
    console.print(f"AnalogLinear {args.in_features}->{args.out_features}, batch {args.batch}, {args.seeds} chip seeds, "
                  f"t = {args.t:g} s after programming")
    with console.status("simulating"):
        rows = layer_error_table({name: name for name in names}, args.in_features, args.out_features, args.batch,
                                 args.seeds, args.t)
    table = Table(title="Output error and cost of one analog layer per preset")
    for column in ("preset", "t (s)", "rel. error (mean ± std)", "forward ms", "nn.Linear ms", "slowdown",
                   "program+drift ms"):
        table.add_column(column, justify="left" if column == "preset" else "right")
    for row in rows:
        table.add_row(row.name, f"{row.t_inference:g}" + (" (nearest fitted)" if row.t_inference != args.t else ""),
                      f"{row.error_mean:.4f} ± {row.error_std:.4f}", f"{row.forward_ms:.2f}",
                      f"{row.digital_ms:.2f}", f"{row.slowdown:.1f}x", f"{row.program_drift_ms:.1f}")
    console.print(table)
    return 0


def _presets(args: argparse.Namespace) -> int:
    if args.out and not args.name:
        raise ValueError("--out needs a preset NAME to write")
    if args.name:
        text = preset(args.name).to_json(indent=2)
        if args.out:
            from romer_kernels.evaluation.montecarlo import write_text_atomic  # noqa: PLC0415

            write_text_atomic(Path(args.out), text + "\n")
            console.print(f"wrote {args.out}: edit it and pass it as --preset {args.out}")
        else:
            print(text)
        return 0
    for name, factory in PRESETS.items():
        print(f"{name:16s} {(factory.__doc__ or '').strip().splitlines()[0]}")
    return 0


def _results(args: argparse.Namespace) -> int:
    from romer_kernels.evaluation.results import format_paired, format_summary, format_trials, read_run  # noqa: PLC0415

    if args.against and args.trials:
        raise ValueError("--trials and --against exclude each other (--against pairs the trials)")
    record = read_run(args.run_dir)
    if args.against:
        text = format_paired(record, read_run(args.against), args.format)
    else:
        text = format_trials(record.trials, args.format) if args.trials else format_summary(record, args.format)
    sys.stdout.write(text)
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    from romer_kernels.models import tiny  # noqa: PLC0415

    return tiny.main(args.rest) or 0


def _check_options(args) -> None:
    """Every option that can be checked without the model, in the order a user reads them: the config,
    the sweep's numbers, the tasks (named and with local data), the variants, then the settings as a whole
    (options that contradict the config, e.g. ReRAM read times)."""
    _config(args)
    for value in getattr(args, "analog", None) or ():   # --analog experts,router -> variant only:experts+router
        name = "only:" + "+".join(c.strip() for c in value.split(",") if c.strip())
        if name not in args.variants:
            args.variants.append(name)
    for flag, value, least in (("--seeds", getattr(args, "seeds", None), 1),
                               ("--windows", getattr(args, "windows", None), 0),
                               ("--task-limit", getattr(args, "task_limit", None), 1)):
        if value is not None and value < least:
            meaning = {"--seeds": "chip seeds", "--windows": "windows (0 = all)",
                       "--task-limit": "documents per task"}[flag]
            raise ValueError(f"{flag} must be at least {least} ({meaning}), got {value}")
    for flag in ("scales", "times"):
        bad = [v for v in getattr(args, flag, None) or () if not v >= 0 or v == float("inf")]
        if bad:
            raise ValueError(f"--{flag} must be finite and >= 0, got {', '.join(f'{v:g}' for v in bad)}")
    if getattr(args, "tasks", None):
        from romer_kernels.evaluation.tasks import BUNDLED_TASKS, check_tasks, load_task_dict  # noqa: PLC0415

        check_tasks(_tasks(args))
        # a task whose data is not in the local cache fails now, not after the model loaded
        load_task_dict(tuple(t for t in _tasks(args) if t not in BUNDLED_TASKS))
    if getattr(args, "variants", None):
        from romer_kernels.evaluation.variants import variant_of  # noqa: PLC0415

        hwa = [name for name in args.variants if getattr(variant_of(name), "weights", "base") == "hwa"]
        if hwa and not getattr(args, "hwa_checkpoint", None):
            raise ValueError(f"variant(s) {', '.join(hwa)} need --hwa-checkpoint (the run folder of romer hwa-train)")
    if getattr(args, "hwa_checkpoint", None):
        _hwa_checkpoint(args)
    if getattr(args, "times", None) is not None:
        _settings(args)        # options that contradict the config (e.g. ReRAM read times) fail here
    if getattr(args, "seeds", None) is not None and getattr(args, "model", None):
        from romer_kernels.models.loading import resolve_model_path  # noqa: PLC0415

        resolve_model_path(args.model)   # a model that is nowhere here fails now, with the offline message


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help already names it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, False, [], "", argparse.SUPPRESS) or "default" in text or not action.option_strings
                or isinstance(action, argparse._HelpAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="romer", description="Analog in-memory-computing simulation for MoE LLMs",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error, "
                        "lm-evaluation-harness' logs and the model loading bar")
    parser.add_argument("--backend", default=None, choices=list(BACKENDS),
                        help="analog MVM backend (default: $ROMER_BACKEND or auto = C++ on CPU, Triton on CUDA)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", formatter_class=DefaultsHelpFormatter, help="the main job: bundled MoE model, clean vs analog at several noise scales")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name, local folder or hub id")
    _add_sweep_arguments(demo, "runs/demo")
    # the demo shows downstream accuracy too: the bundled task on its first 100 documents (~3 s per chip)
    demo.set_defaults(func=_demo, tasks="auto", task_limit=100)

    evaluate = commands.add_parser("eval", formatter_class=DefaultsHelpFormatter, help="the same sweep for any supported model")
    evaluate.add_argument("--model", required=True, help="bundled model name, local folder or hub id")
    _add_sweep_arguments(evaluate, "")
    evaluate.set_defaults(func=_eval)

    from romer_kernels.evaluation.compare import DEFAULT_VARIANTS, VARIANTS  # noqa: PLC0415

    from romer_kernels.moe.convert import CATEGORIES  # noqa: PLC0415

    compare = commands.add_parser("compare", formatter_class=DefaultsHelpFormatter, help="clean vs noisy vs noisy + each robustness method")
    compare.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name, local folder or hub id")
    compare.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                         help="; ".join(f"{name}: {v.description}" for name, v in VARIANTS.items()).replace("%", "%%")
                              + "; ROMER stage 1 swept: romer-replace-rN / romer-rN (the N "
                              "coldest experts per layer replaced), romer-replace-tauX / romer-tauX (cold under X/E); "
                              "a part alone: only:CATEGORY[@LAYER][#EXPERT] (default: %(default)s)")
    compare.add_argument("--analog", nargs="+", default=[], metavar="CAT[,CAT...]",
                         help="placements as variants: each value puts only these module categories on crossbars "
                              f"(of {', '.join(CATEGORIES)}), e.g. --analog experts experts,router: the variants "
                              "only:experts and only:experts+router")
    compare.add_argument("--calib-split", default="valid", choices=["train", "valid", "test"],
                         help="split the methods calibrate on (never the evaluated one)")
    compare.add_argument("--calib-windows", type=int, default=8, help="calibration windows of --seq-len tokens")
    compare.add_argument("--hwa-checkpoint", metavar="DIR", help="the run folder of romer hwa-train (or its model/ "
                         "folder): the variants hwa (the fine-tuned weights, no method) and hwa+VARIANT (VARIANT on "
                         "the fine-tuned weights) evaluate it on the same chip seeds")
    _add_sweep_arguments(compare, "")
    compare.set_defaults(func=_compare, seeds=5, scales=[1.0, 2.0])

    sensitivity = commands.add_parser("sensitivity", formatter_class=DefaultsHelpFormatter, help="which part of the model is sensitive: one part analog at a "
                                                          "time (per category and layer), a table and a heatmap")
    sensitivity.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name, local folder or hub id")
    sensitivity.add_argument("--categories", metavar="CAT[,CAT...]",
                             help=f"module categories to visit (default: every one the model has; of {', '.join(CATEGORIES)})")
    sensitivity.add_argument("--no-per-layer", action="store_true", help="whole categories only, not per decoder layer")
    sensitivity.add_argument("--per-expert", action="store_true", help="also every routed expert of every layer alone "
                             "(for the placement methods)")
    _add_sweep_arguments(sensitivity, "")
    sensitivity.set_defaults(func=_sensitivity, scales=[1.0])

    hwa = commands.add_parser("hwa-train", formatter_class=DefaultsHelpFormatter,
                              help="hardware-aware fine-tuning (Rasch 2023): noise injection on the train split, "
                                   "checkpoint, PPL before and after")
    hwa.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name, local folder or hub id")
    hwa.add_argument("--preset", default="rasch2023", help=PRESET_HELP)
    hwa.add_argument("--set", nargs="+", action="extend", default=[], metavar="PART.FIELD=VALUE", help=SET_HELP)
    hwa.add_argument("--placement", help="JSON file with a Placement (default: all analog but lm_head)")
    hwa.add_argument("--allow-digital", metavar="all|PATTERNS", help=ALLOW_DIGITAL_HELP)
    hwa.add_argument("--data", default="bundled", help="'bundled', a text file, or hf:NAME:CONFIG[:SPLIT]")
    hwa.add_argument("--steps", type=int, default=300, help="optimizer steps")
    hwa.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (warm-up, cosine to 10 %%); "
                     "0 with --learn-input-range: only calibrate the ranges on the data")
    hwa.add_argument("--train-batch-size", type=int, default=8, help="windows per step")
    hwa.add_argument("--train-seq-len", type=int, default=128, help="tokens per training window")
    hwa.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    hwa.add_argument("--weight-decay", type=float, default=0.0)
    hwa.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    hwa.add_argument("--save-every", type=int, default=50, help="steps between save points (resume from the last)")
    hwa.add_argument("--data-seed", type=int, default=0, help="which training windows each step draws")
    hwa.add_argument("--weight-noise", default="device", choices=["device", "gaussian", "none"],
                     help="weight noise per mini-batch: device = a fresh chip of the preset's device model (its "
                          "programming noise), gaussian = additive N(0, sigma x column max), none")
    hwa.add_argument("--weight-noise-scale", type=float, default=1.0,
                     help="multiplies the injected weight noise (1 = the chip's own; 2 gained more at 1x and 2x on "
                          "the bundled models, docs/results.md)")
    hwa.add_argument("--gaussian-sigma", type=float, default=0.02, help="--weight-noise gaussian: sigma")
    hwa.add_argument("--no-mvm-noise", action="store_true", help="train without the preset's per-MVM noise "
                     "(output, input and read noise)")
    hwa.add_argument("--clip-sigma", type=float, default=0.0, help="clip analog weights to +-N std after each step "
                     "(0: no clipping)")
    hwa.add_argument("--learn-input-range", action="store_true", help="learn a static input range per crossbar "
                     "(aihwkit's StandardHWATrainingPreset): each tile then clips its inputs at the learned range instead "
                     "of scaling them by their abs-max; the checkpoint keeps the ranges and every later evaluation uses them")
    hwa.add_argument("--input-range-decay", type=float, help="--learn-input-range: how fast a range that clips fewer "
                     "than 5 %% of its inputs shrinks (default 0.01, aihwkit's)")
    hwa.add_argument("--input-range-init-alpha", type=float, help="--learn-input-range: each range starts at this many "
                     "standard deviations of its inputs, mean over the first 100 forwards (default 3, aihwkit's)")
    hwa.add_argument("--seed", type=int, default=0, help="seed of the training chips (never an evaluation chip)")
    hwa.add_argument("--seeds", type=int, default=3, help="chip seeds of the before/after evaluation")
    hwa.add_argument("--scales", type=float, nargs="+", default=[1.0], help="noise scales of the evaluation (the "
                     "training injects the preset's own noise, scale 1, times --weight-noise-scale for the weights)")
    hwa.add_argument("--times", type=seconds, nargs="+", default=[3600.0], help="evaluation times after programming")
    hwa.add_argument("--windows", type=int, default=16, help="evaluation windows of 256 tokens (0 = all)")
    hwa.add_argument("--run-dir", help="run folder (default runs/hwa-MODEL-PRESET-sSTEPS)")
    hwa.set_defaults(func=_hwa_train, seq_len=256, batch_size=8, tasks=None, task_limit=None)

    info = commands.add_parser("info", formatter_class=DefaultsHelpFormatter, help="print which modules of a model are analog, or (--memory) the memory "
                                            "it needs")
    info.add_argument("--model", default=DEFAULT_MODEL, help="bundled model or config name (e.g. olmoe-1b-7b), local "
                      "folder, config.json file (--memory) or hub id")
    info.add_argument("--preset", default="rasch2023", help=PRESET_HELP)
    info.add_argument("--set", nargs="+", action="extend", default=[], metavar="PART.FIELD=VALUE", help=SET_HELP)
    info.add_argument("--placement", help="JSON file with a Placement")
    info.add_argument("--allow-digital", metavar="all|PATTERNS", help=ALLOW_DIGITAL_HELP)
    info.add_argument("--no-check", dest="check", action="store_false",
                      help="skip the check forward (8 tokens, programs every chip) that finds analog modules the model "
                           "never calls and weight matrices that compute digitally")
    info.add_argument("--memory", action="store_true", help="estimate memory from the config alone (meta device, "
                      "no weights loaded) instead of listing the placement")
    info.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="--memory: dtype of the digital weights (default float32)")
    info.add_argument("--state-dtype", choices=["float32", "bfloat16", "float16"],
                      help="--memory: dtype of the chip state (default: the preset's, float32)")
    info.add_argument("--device", choices=["cpu", "cuda"], help="--memory: where the chips run (default cpu; cuda = "
                      "the GPU path's design, chips programmed on the fly)")
    info.add_argument("--fit", metavar="SIZE", help="--memory: say whether it fits in SIZE, e.g. 80GB (1e9 B), "
                      "141GiB (2**30 B), 512MB")
    info.add_argument("--tokens", type=int, help="--memory: tokens per forward for the activations (default 2048)")
    info.set_defaults(func=_info)

    layers = commands.add_parser("layers", formatter_class=DefaultsHelpFormatter, help="error and speed of one analog layer under each preset")
    layers.add_argument("--in-features", type=int, default=1024)
    layers.add_argument("--out-features", type=int, default=1024)
    layers.add_argument("--batch", type=int, default=64)
    layers.add_argument("--seeds", type=int, default=3)
    layers.add_argument("--t", type=seconds, default=3600.0, help="time after programming (3600, 1h, 1d, 1y)")
    layers.add_argument("--presets", nargs="*", choices=list(PRESETS), help="subset of presets (default: all)")
    layers.set_defaults(func=_layers)

    presets = commands.add_parser("presets", formatter_class=DefaultsHelpFormatter, help="list presets, or print one as JSON")
    presets.add_argument("name", nargs="?", choices=list(PRESETS))
    presets.add_argument("--out", metavar="FILE", help="write the preset as a JSON config file to edit")
    presets.set_defaults(func=_presets)

    results = commands.add_parser("results", formatter_class=DefaultsHelpFormatter, help="print a stored run (any run folder) as a table, CSV, JSON or "
                                                  "Markdown")
    results.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of romer demo, eval, compare or sensitivity")
    results.add_argument("--format", default="table", choices=["table", "csv", "json", "markdown"])
    results.add_argument("--trials", action="store_true", help="one row per trial instead of the summary")
    results.add_argument("--against", metavar="BASE_RUN_DIR",
                         help="the PPL change of RUN_DIR against this run on the same chip seeds (paired, 95 %% "
                              "interval): e.g. RUN/after of an HWA run against that of a no-noise control")
    results.set_defaults(func=_results)

    train = commands.add_parser("train-tiny", formatter_class=DefaultsHelpFormatter, help="train a bundled tiny MoE model (see romer train-tiny --help)",
                                add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-tiny"]:  # its own parser owns every argument, --help included
        from romer_kernels.models import tiny  # noqa: PLC0415

        return tiny.main([a for a in argv[1:] if a != "--"]) or 0
    args = build_parser().parse_args(argv)
    if args.verbose:
        import os  # noqa: PLC0415

        os.environ["ROMER_VERBOSE"] = "1"   # read by the task runner, also in Ray workers started from here
    if hasattr(args, "preset"):
        try:  # a bad config, option or task list is refused before any model is loaded
            _check_options(args)
        except (ValueError, FileNotFoundError, ImportError) as error:
            console.print(f"[red]error:[/] {error}".replace("\n", " "), highlight=False)
            return 2
    try:
        if args.backend is not None:
            resolve_backend(args.backend)  # fail now, with the reason, if it cannot run here
            set_backend(args.backend)
        return args.func(args)
    except Exception as error:  # one line for the user; -v shows where it came from
        if args.verbose:
            console.print_exception()
        known = (ValueError, FileNotFoundError, ImportError, NotImplementedError, TypeError, RuntimeError,
                 ConnectionError)
        kind = "" if isinstance(error, known) else f"{type(error).__name__}: "
        console.print(f"[red]error:[/] {kind}{error}".replace("\n", " "), highlight=False)
        if not args.verbose:
            console.print("(run with -v for the traceback)", style="dim") if not isinstance(error, known) else None
        return 2
    except KeyboardInterrupt as interrupt:
        from romer_kernels.evaluation.executors import SweepInterrupted  # noqa: PLC0415

        if isinstance(interrupt, SweepInterrupted):
            console.print(f"[yellow]{interrupt}[/]")
        else:
            console.print("[yellow]interrupted[/] before any trial ran; nothing was stored")
        return 130


if __name__ == "__main__":
    sys.exit(main())

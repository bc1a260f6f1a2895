"""Regenerate the device-model sweeps of docs/results.md: every preset, and drift over time.

    .venv/bin/python docs/device_sweeps.py          # runs the sweeps (resumable, runs/devices/), rewrites the doc part
    .venv/bin/python docs/device_sweeps.py --print  # prints the tables instead

1. ``romer demo``-style noise sweeps (tiny-olmoe, 3 chip seeds x noise scales 0.5/1/2/4, 8 test windows)
   for every preset with device noise: aihwkit-default, rasch2023 (PCM-like), rasch2023-hermes,
   rasch2023-reram (read at 1 day, its fitted time nearest to the others' 1 h), lightning-8bit and
   gaussian-chip.
2. Drift: PPL and LIS at t = 1 s, 1 h, 1 day, 1 year (ReRAM: 1 s, 1 day, 2 days, the times its model is
   fitted at) after programming, noise scale 1, 3 chip seeds, with global drift compensation and
   without; plot ``docs/img/drift-tiny-olmoe.png``.

About 4 minutes on a 2-core CPU. Every sweep is an ordinary run folder (``romer results runs/devices/...``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from doc_sections import regenerate  # this folder's section writer

from romer_kernels.config.presets import load_config
from romer_kernels.evaluation.runner import SweepSettings, Workload
from romer_kernels.evaluation.sweep import noise_sweep, save_figure

ROOT = Path(__file__).resolve().parent
DOC = ROOT / "results.md"
START, END = "<!-- device-sweeps:start -->", "<!-- device-sweeps:end -->"
RUNS = Path("runs/devices")
MODEL = "tiny-olmoe"
SEEDS = (0, 1, 2)
SCALES = (0.5, 1.0, 2.0, 4.0)
HOUR, DAY, YEAR = 3600.0, 86400.0, 365 * 86400.0
PRESETS = ("aihwkit-default", "rasch2023", "rasch2023-hermes", "rasch2023-reram", "lightning-8bit", "gaussian-chip")
DRIFT = {"rasch2023": (1.0, HOUR, DAY, YEAR), "rasch2023-hermes": (1.0, HOUR, DAY, YEAR),
         "aihwkit-default": (1.0, HOUR, DAY, YEAR), "rasch2023-reram": (1.0, DAY, 2 * DAY)}


def _time(t: float) -> str:
    return {1.0: "1 s", HOUR: "1 h", DAY: "1 day", 2 * DAY: "2 days", YEAR: "1 year"}[t]


def _cell(row, metric, digits=2) -> str:
    mean, std = row[metric][:2]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _sweep(name: str, config, scales, times):
    settings = SweepSettings(config, seeds=SEEDS, noise_scales=scales, times=times, max_windows=8)
    return noise_sweep(Workload(MODEL), None, settings, RUNS / name, progress=False)


def run() -> str:
    out = [f"Commands: `python docs/device_sweeps.py` (runs in `{RUNS}/`, resumable). {MODEL}, {len(SEEDS)} chip "
           "seeds, 8 test windows of 256 tokens; mean ± std over the chips.", ""]
    out += ["**Every preset, noise scale swept** (t = 1 h; ReRAM: t = 1 day, its nearest fitted time)", "",
            "| preset | device | clean PPL | " + " | ".join(f"PPL at {s:g}" for s in SCALES) + " | LIS at 4 |",
            "|---|---|---|" + "---|" * (len(SCALES) + 1)]
    scale_curves = {}
    for name in PRESETS:
        config = load_config(name)
        t = DAY if name.endswith("reram") else HOUR
        result = _sweep(f"scales-{name}", config, SCALES, (t,))
        rows = {row["noise_scale"]: row for row in result.table()}
        scale_curves[name] = [(s, rows[s]["ppl"][0], rows[s]["ppl"][1]) for s in SCALES]
        device = type(config.noise).__name__.removesuffix("NoiseConfig") if config.noise is not None else "-"
        out.append(f"| {name} | {device} | {result.clean.perplexity:.2f} | "
                   + " | ".join(_cell(rows[s], "ppl") for s in SCALES) + f" | {_cell(rows[4.0], 'lis', 3)} |")
    _plot_scales(scale_curves)
    out += ["", "![presets](img/presets-tiny-olmoe.png)"]
    all_times = sorted({t for times in DRIFT.values() for t in times})
    out += ["", "**Drift** (noise scale 1): PPL with global drift compensation / without", "",
            "| preset | " + " | ".join(_time(t) for t in all_times) + " |", "|---|" + "---|" * len(all_times)]
    curves = {}
    for name, times in DRIFT.items():
        cells: dict[float, list[str]] = {}
        for comp in ("global", "none"):
            config = load_config(name, [f"drift_compensation.kind={comp}"])
            result = _sweep(f"drift-{name}-{comp}", config, (1.0,), times)
            rows = {row["t"]: row for row in result.table()}
            curves[(name, comp)] = [(t, rows[t]["ppl"][0], rows[t]["ppl"][1]) for t in times]
            for t in times:
                cells.setdefault(t, []).append(_cell(rows[t], "ppl"))
        out.append(f"| {name} | " + " | ".join(" / ".join(cells[t]) if t in cells else "-" for t in all_times) + " |")
    _plot(curves)
    out += ["", "![drift](img/drift-tiny-olmoe.png)", ""]
    return "\n".join(out)


def _plot_scales(curves) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    for i, (name, points) in enumerate(curves.items()):
        scales, means, stds = zip(*points)
        offset = 1 + 0.015 * (i - len(curves) / 2)          # side by side at the same noise scale
        ax.errorbar([s * offset for s in scales], means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("noise scale")
    ax.set_ylabel("perplexity (mean ± std over 3 chips)")
    ax.legend(fontsize=7)
    save_figure(fig, ROOT / "img" / "presets-tiny-olmoe.png", f"{MODEL}: every preset, t = 1 h (ReRAM 1 day)")


def _plot(curves) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 4.2), constrained_layout=True)
    colours = {name: f"C{i}" for i, name in enumerate(DRIFT)}     # one colour per preset, dashed = no compensation
    for (name, comp), points in curves.items():
        ts, means, stds = zip(*points)
        ax.errorbar(ts, means, yerr=stds, marker="o" if comp == "global" else "s", capsize=3, color=colours[name],
                    linestyle="-" if comp == "global" else "--",
                    label=f"{name}, {'global compensation' if comp == 'global' else 'no compensation'}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time after programming t (s)")
    ax.set_ylabel("perplexity (mean ± std over 3 chips)")
    ax.legend(fontsize=7)
    save_figure(fig, ROOT / "img" / "drift-tiny-olmoe.png", f"{MODEL}: drift at noise scale 1")


def main(argv: list[str] | None = None) -> int:
    return regenerate(DOC, START, END, lambda: run() + "\n", "the device sweeps", __doc__.splitlines()[0], argv)

if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the per-nonideality sweep of docs/results.md: rasch2023 taken apart, one nonideality at a time.

    .venv/bin/python docs/nonideality_sweep.py          # runs the sweeps (resumable, runs/nonideality/), rewrites the doc part
    .venv/bin/python docs/nonideality_sweep.py --print  # prints the table instead

Both bundled models, 5 chip seeds, noise scale 1, t = 1 h, 8 test windows of 256 tokens; each nonideality
alone at the preset's level (``romer_kernels.evaluation.nonideality``), its PPL change against the tiled
digital model on the same chips. Plot ``docs/img/nonideality.png``. About 3 minutes on a 2-core CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

from doc_sections import regenerate  # this folder's section writer

from romer_kernels.config.presets import load_config
from romer_kernels.evaluation.nonideality import nonideality_sweep
from romer_kernels.evaluation.runner import Workload
from romer_kernels.evaluation.sweep import save_figure

ROOT = Path(__file__).resolve().parent
DOC = ROOT / "results.md"
START, END = "<!-- nonideality:start -->", "<!-- nonideality:end -->"
RUNS = Path("runs/nonideality")
MODELS = ("tiny-olmoe", "tiny-deepseek")
PRESET = "rasch2023"
SEEDS = (0, 1, 2, 3, 4)


def _change(row) -> str:
    if "change" not in row:
        return "-"
    star = " *" if row["low"] > 0 or row["high"] < 0 else ""
    return f"{100 * row['change']:+.1f} % [{100 * row['low']:+.1f}, {100 * row['high']:+.1f}]{star}"


def run() -> str:
    config = load_config(PRESET)
    results = {model: nonideality_sweep(Workload(model), config, RUNS / model, SEEDS) for model in MODELS}
    names = [row["name"] for row in results[MODELS[0]]]
    labels = {row["name"]: row["label"] for row in results[MODELS[0]]}
    out = [f"Command: `python docs/nonideality_sweep.py` (runs in `{RUNS}/`, resumable). {PRESET} taken apart: each "
           f"row switches on one nonideality at the preset's level on the preset's tiles and weight mapping; {len(SEEDS)} "
           "chip seeds, noise scale 1, t = 1 h, 8 test windows of 256 tokens. PPL mean ± std over the chips; change = "
           "against the tiled digital model (`none`) on the same chips, 95 % paired t-interval, * = beyond the seed "
           "spread.", "",
           "| nonideality (level) | " + " | ".join(f"{m} PPL | {m} change" for m in MODELS) + " |",
           "|---|" + "---|---|" * len(MODELS)]
    by_model = {model: {row["name"]: row for row in rows} for model, rows in results.items()}
    for name in names:
        cells = []
        for model in MODELS:
            row = by_model[model][name]
            cells += [f"{row['ppl']:.2f} ± {row['ppl_std']:.2f}", _change(row)]
        out.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    _plot(by_model, names, labels)
    out += ["", "![nonidealities](img/nonideality.png)", ""]
    return "\n".join(out)


def _plot(by_model, names, labels) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    shown = [n for n in names if n != "off"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5), constrained_layout=True)
    height = 0.8 / len(MODELS)
    for i, model in enumerate(MODELS):
        rows = [by_model[model][n] for n in shown]
        ys = [j + (i - (len(MODELS) - 1) / 2) * height for j in range(len(shown))]
        values = [100 * r.get("change", 0.0) for r in rows]
        errors = [[100 * (r["change"] - r["low"]) for r in rows], [100 * (r["high"] - r["change"]) for r in rows]]
        ax.barh(ys, values, height=height, xerr=errors, capsize=2, label=model)
    ax.set_yticks(range(len(shown)), [labels[n].split(" (")[0] for n in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("PPL change vs tiled digital (%, symlog), mean and 95 % paired interval over 5 chips")
    ax.legend(fontsize=8)
    save_figure(fig, ROOT / "img" / "nonideality.png", f"{PRESET}: one nonideality at a time (noise scale 1, t = 1 h)")


if __name__ == "__main__":
    sys.exit(regenerate(DOC, START, END, run, "the nonideality sweep", __doc__.splitlines()[0], sys.argv[1:]))

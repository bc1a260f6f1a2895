"""Which part of the model is sensitive to analog noise: one part analog at a time, the rest digital.

A part (``methods.placement.Part``) is a module category (attention, router, routed experts, shared
experts, dense MLP, lm_head), optionally in one decoder layer, optionally one routed expert of one layer.
``sensitivity_sweep`` runs every part on the same chip seeds (the part's chips are the very chips it has
in a whole-model run: chips are keyed by module name) as variants of the method comparison
(``compare_methods``: same resumable store, executors and run-folder files), and reports per part the
increase of PPL and LIS over the clean model with its 95 % interval over seeds. ``plot_sensitivity``
draws the layers x categories heatmap of the PPL increase (and layers x experts with ``per_expert``).
Embeddings are lookups, not matrix-vector products: they have no analog version and no part.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from romer_kernels.evaluation.compare import compare_methods
from romer_kernels.evaluation.executors import LocalExecutor, RayExecutor
from romer_kernels.evaluation.lm_metrics import LMEval
from romer_kernels.evaluation.montecarlo import Summary
from romer_kernels.evaluation.runner import SweepSettings, Workload
from romer_kernels.evaluation.sweep import save_figure
from romer_kernels.methods.placement import Part, model_parts

SENSITIVITY_METRICS = ("ppl", "lis")


@dataclass
class SensitivityResult:
    clean: LMEval
    parts: list[Part]
    summaries: list[Summary]
    run_dir: Path
    trials_run: int
    failed: list = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """Per (part, noise scale, time): n, each metric (mean, std, low, high) and its increase over the
        clean model (mean, low, high of the 95 % interval; the clean model is one fixed number, so the
        interval of the increase is the metric's shifted)."""
        clean = {"ppl": self.clean.perplexity, "lis": getattr(self.clean.routing, "lis", None)}
        by_key: dict[tuple, dict[str, Any]] = {}
        order = {part.name: i for i, part in enumerate(self.parts)}
        for s in self.summaries:
            if s.variant not in order or s.metric not in SENSITIVITY_METRICS:
                continue
            part = self.parts[order[s.variant]]
            row = by_key.setdefault((order[s.variant], s.noise_scale, s.t_inference), {
                "part": part.name, "category": part.category, "layer": part.layer, "expert": part.expert,
                "noise_scale": s.noise_scale, "t": s.t_inference, "n": s.n})
            row[s.metric] = (s.mean, s.std, s.ci_low, s.ci_high)
            if clean[s.metric] is not None:
                base = clean[s.metric]
                row[f"{s.metric}_increase"] = (s.mean - base, s.ci_low - base, s.ci_high - base)
        return [by_key[key] for key in sorted(by_key)]


def sweep_parts(model: nn.Module | Workload, per_layer: bool = True, per_expert: bool = False,
                categories: tuple[str, ...] | None = None) -> list[Part]:
    """The parts of a model object, or of a workload's model built on the meta device (no weights read)."""
    if isinstance(model, Workload):
        from romer_kernels.evaluation.memory import load_model_config, meta_model  # noqa: PLC0415

        model = meta_model(load_model_config(model.model))
    parts = model_parts(model, per_layer, per_expert, categories)
    if not parts:
        raise ValueError(f"no part of {type(model).__name__} can be analog"
                         + (f" among the categories {', '.join(categories)}" if categories else ""))
    return parts


def sensitivity_sweep(model: nn.Module | Workload, eval_ids: torch.Tensor | None, settings: SweepSettings,
                      run_dir: str | Path, parts: list[Part] | None = None, per_layer: bool = True,
                      per_expert: bool = False, categories: tuple[str, ...] | None = None,
                      model_id: str | None = None, data_id: str | None = None, progress: bool = True,
                      executor: LocalExecutor | RayExecutor | None = None) -> SensitivityResult:
    """Every part (default: ``sweep_parts``) analog alone, on ``settings``' seeds, noise scales and times;
    resumable in ``run_dir`` like every sweep. ``settings.placement`` is not used (each part is its own)."""
    parts = list(parts) if parts is not None else sweep_parts(model, per_layer, per_expert, categories)
    result = compare_methods(model, eval_ids, None, settings, tuple(part.name for part in parts), run_dir,
                             model_id=model_id, data_id=data_id, progress=progress, executor=executor)
    return SensitivityResult(result.clean, parts, result.summaries, result.run_dir, result.trials_run, result.failed)


def plot_sensitivity(result: SensitivityResult, path: str | Path, title: str = "", metric: str = "ppl") -> Path:
    """Heatmap of the relative increase of ``metric`` (mean over seeds, % of clean) when one part is
    analog: decoder layers x categories, and layers x experts when the sweep has per-expert parts. The
    first noise scale and time of the sweep are shown (named in the title)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = result.rows()
    if not rows:
        raise ValueError("the sensitivity sweep has no finished trial to plot")
    scale, t = rows[0]["noise_scale"], rows[0]["t"]
    rows = [r for r in rows if r["noise_scale"] == scale and r["t"] == t and f"{metric}_increase" in r]
    clean = result.clean.perplexity if metric == "ppl" else getattr(result.clean.routing, "lis", None)
    layered = [r for r in rows if r["layer"] is not None and r["expert"] is None]
    experts = [r for r in rows if r["expert"] is not None]
    panels = [p for p in (layered, experts) if p]
    if not panels:
        raise ValueError("the sweep has no per-layer part: run it with per_layer=True for a heatmap")
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 + 5 * (len(panels) - 1), 4.4), constrained_layout=True,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        columns = sorted({r["category"] for r in panel}) if panel is layered else \
            sorted({r["expert"] for r in panel})
        layers = sorted({r["layer"] for r in panel})
        grid = torch.full((len(layers), len(columns)), float("nan"))
        for r in panel:
            column = r["category"] if panel is layered else r["expert"]
            grid[layers.index(r["layer"]), columns.index(column)] = 100.0 * r[f"{metric}_increase"][0] / clean
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="magma_r")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=30 if panel is layered else 0)
        ax.set_ylabel("decoder layer")
        ax.set_xlabel("module category" if panel is layered else "routed expert")
        if panel is layered:
            for i in range(len(layers)):
                for j in range(len(columns)):
                    if torch.isfinite(grid[i, j]):
                        ax.text(j, i, f"{float(grid[i, j]):.1f}", ha="center", va="center", fontsize=8,
                                color="white" if float(grid[i, j]) > float(grid.nan_to_num(0).max()) / 2 else "black")
        fig.colorbar(image, ax=ax, label=f"{metric.upper()} increase over clean (%)")
    subtitle = f"one part analog, the rest digital; noise scale {scale:g}, t = {t:g} s, mean of n = {rows[0]['n']} chips"
    return save_figure(fig, path, f"{title}\n{subtitle}" if title else subtitle)


def expert_points(result: SensitivityResult, model: nn.Module, calib_ids: torch.Tensor | None = None,
                  scores: tuple[str, ...] = ("maxnn", "frequency", "random"), metric: str = "ppl",
                  seed: int = 0) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """Per layer and score: (score, measured increase of ``metric``) of every expert of the sweep's
    per-expert parts (first noise scale and time; mean over chip seeds)."""
    from romer_kernels.methods.placement import decoder_layers, expert_scores  # noqa: PLC0415

    rows = [r for r in result.rows() if r["expert"] is not None and f"{metric}_increase" in r]
    if not rows:
        raise ValueError("the sweep has no per-expert part: run it with per_expert=True")
    scale, t = rows[0]["noise_scale"], rows[0]["t"]
    measured: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["noise_scale"] == scale and r["t"] == t:
            measured.setdefault(r["layer"], {})[r["expert"]] = r[f"{metric}_increase"][0]
    prefix, _ = decoder_layers(model)
    values = {name: expert_scores(model, name, calib_ids=calib_ids, seed=seed) for name in scores}
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for layer, increases in sorted(measured.items()):
        for name, per_module in values.items():
            module = next((m for m in per_module if m.startswith(f"{prefix}.{layer}.")), None)
            if module is not None:
                out.setdefault(layer, {})[name] = [(float(per_module[module][e]), increases[e]) for e in sorted(increases)]
    return out


def plot_expert_scores(points: dict[int, dict[str, list[tuple[float, float]]]], path: str | Path,
                       title: str = "") -> Path:
    """One panel per score: each expert's score (rank within its layer, 0 = lowest) against its measured
    PPL increase, one colour per layer."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = sorted({name for per_layer in points.values() for name in per_layer})
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for layer, per_layer in points.items():
            pairs = per_layer.get(name, [])
            order = sorted(range(len(pairs)), key=lambda i: pairs[i][0])
            ranks = [order.index(i) for i in range(len(pairs))]
            ax.scatter(ranks, [y for _, y in pairs], s=14, label=f"layer {layer}")
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xlabel(f"{name} score rank within the layer")
        ax.set_ylabel("PPL increase, expert alone analog")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path, title)


def score_correlations(result: SensitivityResult, model: nn.Module, calib_ids: torch.Tensor | None = None,
                       scores: tuple[str, ...] = ("maxnn", "frequency", "random"), metric: str = "ppl",
                       seed: int = 0) -> list[dict[str, Any]]:
    """Per decoder layer with per-expert parts: the Spearman rank correlation of each expert score
    (``methods.placement.expert_scores`` on the digital ``model``; ``frequency`` needs ``calib_ids``)
    with the measured increase of ``metric`` when that expert alone is analog (mean over chip seeds, the
    sweep's first noise scale and time). A placement score that predicts sensitivity correlates
    positively (it keeps the experts digital whose noise costs most)."""
    from scipy.stats import spearmanr  # noqa: PLC0415

    out = []
    for layer, per_layer in expert_points(result, model, calib_ids, scores, metric, seed).items():
        row: dict[str, Any] = {"layer": layer, "experts": len(next(iter(per_layer.values())))}
        for name, pairs in per_layer.items():
            rho = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
            row[name] = (float(rho.statistic), float(rho.pvalue))
        out.append(row)
    return out

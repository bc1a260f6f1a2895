"""The field's question in one call: what analog noise does to an MoE LM's perplexity and expert load.

``noise_sweep`` evaluates the clean model once, then every trial (chip seed x noise scale x drift time)
on a fresh analog copy of it, with the same token windows, and stores each finished trial in the run
folder's SQLite store (resumable, see ``montecarlo``). ``plot_sweep`` draws PPL and LIS against the noise
scale and the per-layer expert load of the clean and of one noisy model.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.scaling import scale_noise
from romer_kernels.evaluation.lm_eval import LMEval, evaluate_lm
from romer_kernels.evaluation.montecarlo import ResultsStore, Summary, Trial, grid, run_sweep, summarize_trials
from romer_kernels.moe.convert import Placement, analogize_
from romer_kernels.moe.routing import RoutingTrace
from romer_kernels.nn.model_helpers import drift_analog_, program_analog_

METRICS = ("ppl", "lis", "flip_rate", "overlap", "kl_to_clean", "cv", "entropy")


@dataclass
class SweepSettings:
    config: AnalogConfig
    placement: Placement = field(default_factory=Placement)
    seeds: tuple[int, ...] = (0, 1, 2)
    noise_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    times: tuple[float, ...] = (3600.0,)
    seq_len: int = 256
    batch_size: int = 8
    max_windows: int | None = 16

    def fingerprint(self, model_id: str, data_id: str) -> dict[str, Any]:
        return {"model": model_id, "data": data_id, "config": self.config.to_dict(),
                "placement": self.placement.to_dict(), "seq_len": self.seq_len, "batch_size": self.batch_size,
                "max_windows": self.max_windows}


@dataclass
class SweepResult:
    clean: LMEval
    summaries: list[Summary]
    run_dir: Path
    trials_run: int

    def table(self) -> list[dict[str, Any]]:
        """One row per (noise scale, time) with mean, std and 95% interval of each metric."""
        rows: dict[tuple[float, float, str], dict[str, Any]] = {}
        for s in self.summaries:
            row = rows.setdefault((s.noise_scale, s.t_inference, s.variant),
                                  {"noise_scale": s.noise_scale, "t": s.t_inference, "variant": s.variant})
            row["n"] = s.n
            row[s.metric] = (s.mean, s.std, s.ci_low, s.ci_high)
        return list(rows.values())


def analog_copy(model: nn.Module, settings: SweepSettings, trial: Trial, placement: Placement | None = None) -> nn.Module:
    """A programmed (and drifted) analog copy of the clean ``model`` for one trial
    (``placement`` overrides ``settings.placement``)."""
    analog = copy.deepcopy(model)
    config = scale_noise(settings.config, trial.noise_scale)
    analogize_(analog, config, placement or settings.placement, seed=trial.seed)
    program_analog_(analog, trial.seed)
    if config.noise is not None:
        drift_analog_(analog, trial.t_inference)
    return analog


def trial_metrics(result: LMEval) -> dict[str, float]:
    routing = result.routing
    metrics = {"ppl": result.perplexity, "nll": result.nll}
    if routing is not None:
        metrics.update(lis=routing.lis, cv=routing.cv, entropy=routing.entropy, max_over_mean=routing.max_over_mean)
        for name in ("flip_rate", "overlap", "kl_to_clean"):
            if getattr(routing, name) is not None:
                metrics[name] = getattr(routing, name)
    return metrics


def noise_sweep(model: nn.Module, token_ids: torch.Tensor, settings: SweepSettings, run_dir: str | Path,
                model_id: str, data_id: str, progress: bool = True,
                on_clean: Callable[[LMEval], None] | None = None) -> SweepResult:
    """Clean evaluation plus every trial of ``settings`` (resuming any already stored in ``run_dir``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    eval_args = dict(seq_len=settings.seq_len, batch_size=settings.batch_size, max_windows=settings.max_windows)
    clean = evaluate_lm(model, token_ids, **eval_args)
    if on_clean is not None:
        on_clean(clean)
    (run_dir / "clean.json").write_text(json.dumps(trial_metrics(clean), indent=1))
    store = ResultsStore(run_dir / "results.sqlite", settings.fingerprint(model_id, data_id))
    try:
        def run_trial(trial: Trial) -> dict[str, float]:
            analog = analog_copy(model, settings, trial)
            return trial_metrics(evaluate_lm(analog, token_ids, clean=clean.trace, **eval_args))

        trials = grid(settings.seeds, settings.noise_scales, settings.times)
        ran = run_sweep(store, trials, run_trial, progress=progress)
        summaries = summarize_trials(store.rows())
    finally:
        store.close()
    return SweepResult(clean, summaries, run_dir, ran)


def plot_sweep(result: SweepResult, noisy_trace: RoutingTrace | None, path: str | Path, title: str = "") -> Path:
    """PPL and LIS vs noise scale (mean and 95% interval), and per-layer expert load clean vs noisy."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    clean_trace = result.clean.trace
    layers = list(clean_trace.layers) if clean_trace is not None else []
    n_rows = 1 + (1 if layers and noisy_trace is not None else 0)
    fig = plt.figure(figsize=(11, 3.6 * n_rows), constrained_layout=True)
    top = fig.add_gridspec(n_rows, 1)
    axes = top[0].subgridspec(1, 2).subplots()
    for ax, metric, clean_value, label in ((axes[0], "ppl", result.clean.perplexity, "perplexity"),
                                           (axes[1], "lis", getattr(result.clean.routing, "lis", None), "LIS")):
        for t in sorted({s.t_inference for s in result.summaries}):
            errorbar_vs_scale(ax, [s for s in result.summaries if s.metric == metric and s.t_inference == t],
                              f"analog, t={t:g}s")
        finish_axis(ax, clean_value, label)
        ax.legend(fontsize=8)
    if n_rows == 2:
        shown = layers[: min(len(layers), 4)]
        load_axes = top[1].subgridspec(1, len(shown)).subplots(squeeze=False)[0]
        for ax, name in zip(load_axes, shown):
            clean_counts = clean_trace.layers[name].counts()
            noisy_counts = noisy_trace.layers[name].counts()
            experts = torch.arange(clean_counts.numel()).double()
            ax.bar((experts - 0.2).tolist(), (clean_counts / clean_counts.sum()).tolist(), width=0.4, label="clean")
            ax.bar((experts + 0.2).tolist(), (noisy_counts / noisy_counts.sum()).tolist(), width=0.4, label="noisy")
            ax.set_title(name.replace("model.layers.", "layer ").replace(".mlp.gate", ""), fontsize=9)
            ax.set_xlabel("expert")
        load_axes[0].set_ylabel("share of routed tokens")
        load_axes[0].legend(fontsize=8)
    return save_figure(fig, path, title)


def errorbar_vs_scale(ax, summaries: list[Summary], label: str) -> None:
    """One metric's mean and 95% interval against the noise scale."""
    rows = sorted(summaries, key=lambda s: s.noise_scale)
    if rows:
        err = [[s.mean - s.ci_low if s.n > 1 else 0 for s in rows], [s.ci_high - s.mean if s.n > 1 else 0 for s in rows]]
        ax.errorbar([s.noise_scale for s in rows], [s.mean for s in rows], yerr=err, marker="o", capsize=3, label=label)


def finish_axis(ax, clean_value: float | None, label: str) -> None:
    if clean_value is not None:
        ax.axhline(clean_value, color="k", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("noise scale")
    ax.set_ylabel(label)


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

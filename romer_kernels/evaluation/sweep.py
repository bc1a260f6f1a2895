"""The field's question in one call: what analog noise does to an MoE LM's perplexity and expert load.

``noise_sweep`` evaluates the clean model once, then every trial (chip seed x noise scale x drift time)
with the same token windows, and stores each finished trial in the run folder's SQLite store (resumable,
see ``montecarlo``). The trials run on an executor (``executors``): in this process on the one model,
re-programmed in place per trial (``runner.TrialRunner``), or on Ray workers that each load the model
once. ``plot_sweep`` draws PPL and LIS against the noise scale and the per-layer expert load of the
clean and of one noisy model.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from romer_kernels.evaluation.executors import LoadedWorkload, LocalExecutor, RayExecutor, Session, run_trials
from romer_kernels.evaluation.lm_metrics import LMEval
from romer_kernels.evaluation.results import write_run_files
from romer_kernels.evaluation.montecarlo import ResultsStore, Summary, grid, summarize_trials, write_text_atomic
from romer_kernels.evaluation.runner import METRICS, SweepSettings, Workload, trial_metrics  # noqa: F401  (API)
from romer_kernels.moe.routing import RoutingTrace


@dataclass
class SweepResult:
    clean: LMEval
    summaries: list[Summary]
    run_dir: Path
    trials_run: int
    failed: list = field(default_factory=list)   # (Trial, reason) of this request's failed trials
    rows: list = field(default_factory=list)     # (Trial, metrics) of this request's trials, for paired statistics

    def table(self) -> list[dict[str, Any]]:
        """One row per (noise scale, time) with mean, std and 95% interval of each metric."""
        rows: dict[tuple[float, float, str], dict[str, Any]] = {}
        for s in self.summaries:
            row = rows.setdefault((s.noise_scale, s.t_inference, s.variant),
                                  {"noise_scale": s.noise_scale, "t": s.t_inference, "variant": s.variant})
            row["n"] = s.n
            row[s.metric] = (s.mean, s.std, s.ci_low, s.ci_high)
        return list(rows.values())


def workload_of(model: nn.Module | Workload, token_ids: torch.Tensor | None, calib_ids: torch.Tensor | None = None,
                model_id: str | None = None, data_id: str | None = None) -> tuple[Workload | LoadedWorkload, str, str]:
    """(workload, model id, data id) of a sweep given a model object and its tokens, or a ``Workload``."""
    if isinstance(model, Workload):
        if token_ids is not None or calib_ids is not None:
            raise ValueError("a Workload loads its own tokens: pass token_ids=None (and no calib_ids)")
        return model, model_id or model.model_id, data_id or model.data_id
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a model (nn.Module) or a Workload, got {type(model).__name__}")
    if token_ids is None or model_id is None or data_id is None:
        raise ValueError("a sweep on a model object needs token_ids, model_id and data_id")
    return LoadedWorkload(model, token_ids, calib_ids), model_id, data_id


def open_session(executor: LocalExecutor | RayExecutor | None, workload, settings: SweepSettings,
                 calib_windows: int = 8) -> Session:
    return (executor or LocalExecutor()).open(workload, settings, calib_windows)


def noise_sweep(model: nn.Module | Workload, token_ids: torch.Tensor | None, settings: SweepSettings,
                run_dir: str | Path, model_id: str | None = None, data_id: str | None = None, progress: bool = True,
                on_clean: Callable[[LMEval], None] | None = None,
                executor: LocalExecutor | RayExecutor | None = None,
                on_session: Callable[[Session], None] | None = None) -> SweepResult:
    """Clean evaluation plus every trial of ``settings`` (resuming any already stored in ``run_dir``).

    ``model``: a model object (its ``token_ids``, ``model_id`` and ``data_id`` given; local executor only;
    the model is converted in place while the sweep runs and handed back digital, weights untouched) or
    a ``Workload`` that every worker loads itself. ``executor``: ``LocalExecutor()`` (default) or
    ``RayExecutor(...)``. ``on_session``: called with the open session before the trials (e.g. to draw
    one more trial's routing with ``session.evaluate(trial)`` before it closes).
    """
    workload, model_id, data_id = workload_of(model, token_ids, None, model_id, data_id)
    run_dir = Path(run_dir)
    trials = grid(settings.seeds, settings.noise_scales, settings.times)
    session = open_session(executor, workload, settings)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # refused here, naming what differs, before anything in the folder is written
        store = ResultsStore(run_dir / "results.sqlite", settings.fingerprint(model_id, data_id) | session.identity)
        try:
            clean = session.clean
            if on_clean is not None:
                on_clean(clean)
            write_text_atomic(run_dir / "clean.json", json.dumps(trial_metrics(clean), indent=1))
            ran = run_trials(store, trials, session, progress=progress)
            if on_session is not None:
                on_session(session)
            keys = [trial.key for trial in trials]
            rows = store.rows(keys)
            summaries = summarize_trials(rows)  # this request's trials only
            failed = store.failures(keys)
            write_run_files(run_dir, trial_metrics(clean), summaries)
        finally:
            store.close()
    finally:
        session.close()
    return SweepResult(clean, summaries, run_dir, ran, failed, rows)


def plot_sweep(result: SweepResult, noisy_trace: RoutingTrace | None, path: str | Path, title: str = "") -> Path:
    """PPL, LIS and each task's accuracy vs noise scale (mean and 95% interval), and per-layer expert load
    clean vs noisy."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    clean_trace = result.clean.trace
    layers = list(clean_trace.layers) if clean_trace is not None else []
    n_rows = 1 + (1 if layers and noisy_trace is not None else 0)
    fig = plt.figure(figsize=(11 + 4 * sum(name.startswith("acc:") for name in result.clean.tasks), 3.6 * n_rows),
                     constrained_layout=True)
    top = fig.add_gridspec(n_rows, 1)
    panels = [("ppl", result.clean.perplexity, "perplexity"), ("lis", getattr(result.clean.routing, "lis", None), "LIS")]
    panels += [(name, value, f"{name.split(':', 1)[1]} accuracy") for name, value in result.clean.tasks.items()
               if name.startswith("acc:")]
    axes = top[0].subgridspec(1, len(panels)).subplots()
    times = sorted({s.t_inference for s in result.summaries})
    n = min((s.n for s in result.summaries), default=None)
    for ax, (metric, clean_value, label) in zip(axes, panels):
        for i, t in enumerate(times):
            errorbar_vs_scale(ax, [s for s in result.summaries if s.metric == metric and s.t_inference == t],
                              f"analog, t={t:g}s", i, len(times))
        finish_axis(ax, clean_value, {"LIS": "LIS (load-imbalance score)"}.get(label, label), n, log=metric == "ppl")
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
            ax.set_title(name.replace("model.layers.", "layer ").replace(".mlp.gate", "")
                         + ": clean vs one noisy chip", fontsize=9)
            ax.set_xlabel("expert")
        load_axes[0].set_ylabel("share of routed tokens")
        load_axes[0].legend(fontsize=8)
    return save_figure(fig, path, title + interval_note(result.summaries))


def errorbar_vs_scale(ax, summaries: list[Summary], label: str, index: int = 0, count: int = 1) -> None:
    """One metric's mean and 95% interval (``summarize_trials``': log scale for PPL, clipped to the
    metric's range) against the noise scale; series ``index`` of ``count`` is shifted sideways by a few
    percent so that series at the same noise scale do not hide each other."""
    rows = sorted(summaries, key=lambda s: s.noise_scale)
    if rows:
        shift = 1.0 + 0.025 * (index - (count - 1) / 2)
        err = [[max(s.mean - s.ci_low, 0.0) if s.n > 1 else 0 for s in rows],
               [max(s.ci_high - s.mean, 0.0) if s.n > 1 else 0 for s in rows]]
        ax.errorbar([s.noise_scale * shift for s in rows], [s.mean for s in rows], yerr=err, marker="o", capsize=3,
                    label=label)


def finish_axis(ax, clean_value: float | None, label: str, n: int | None = None, log: bool = False) -> None:
    """Clean line, axis labels (what the bars are, with n), and a log y axis for PPL."""
    if clean_value is not None:
        ax.axhline(clean_value, color="k", linestyle="--", linewidth=1, label="clean")
    ax.set_xlabel("noise scale")
    ax.set_ylabel(f"{label}\n(mean, 95 % t-interval{'' if n is None else f' over n = {n} chips'})", fontsize=9)
    if log:
        ax.set_yscale("log")


def interval_note(summaries: list[Summary]) -> str:
    """A warning for the plot title when the intervals rest on fewer than 3 chips."""
    n = min((s.n for s in summaries), default=0)
    return f"  [n = {n} chips: intervals are wide, use 3 or more seeds]" if 0 < n < 3 else ""


def save_figure(fig, path: str | Path, title: str = "") -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if title:
        fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # written whole, then renamed: never half a plot
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path

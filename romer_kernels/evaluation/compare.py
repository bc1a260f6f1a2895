"""Compare the robustness methods on the same chips: clean, noisy, and noisy + each method.

Every trial (chip seed x noise scale x drift time x variant) is the model converted with the variant's
placement, programmed and drifted with the trial's seed, with the variant's method applied using
calibration tokens (never the evaluation tokens), evaluated for perplexity and routing against the clean
model on the evaluation windows. The trials run like ``noise_sweep``'s (one model re-programmed in
place per trial, on the local or the Ray executor) and go to the same resumable SQLite store, with the
variant in the key. Variants share the chip seed, so their differences are paired. The variants
themselves are in ``variants``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from romer_kernels.evaluation.executors import LocalExecutor, RayExecutor, run_trials
from romer_kernels.evaluation.lm_metrics import LMEval
from romer_kernels.evaluation.results import write_run_files
from romer_kernels.evaluation.montecarlo import (ResultsStore, Summary, Trial, grid, summarize_trials, t_half_width,
                                                 write_text_atomic)
from romer_kernels.evaluation.runner import SweepSettings, Workload, trial_metrics
from romer_kernels.evaluation.sweep import (errorbar_vs_scale, finish_axis, interval_note, open_session, save_figure,
                                           workload_of)
from romer_kernels.evaluation.variants import (DEFAULT_VARIANTS, VARIANTS, Variant,  # noqa: F401
                                               calibration_windows, variant_of)


@dataclass
class CompareResult:
    clean: LMEval
    summaries: list[Summary]
    run_dir: Path
    trials_run: int
    failed: list = field(default_factory=list)   # (Trial, reason) of this request's failed trials
    rows: list = field(default_factory=list)     # (Trial, metrics) of this request's trials, for paired statistics


def compare_methods(model: nn.Module | Workload, eval_ids: torch.Tensor | None, calib_ids: torch.Tensor | None,
                    settings: SweepSettings, variants: tuple[str, ...], run_dir: str | Path,
                    model_id: str | None = None, data_id: str | None = None, calib_windows: int = 8,
                    progress: bool = True, executor: LocalExecutor | RayExecutor | None = None) -> CompareResult:
    """Clean evaluation plus every (seed, noise scale, time, variant) trial; resumable like ``noise_sweep``.

    ``model``: a model object with its ``eval_ids`` / ``calib_ids`` (local executor), or a ``Workload``
    with a ``calib_split`` (any executor)."""
    needs_calib = [spec.name for spec in map(variant_of, variants) if spec is not None and spec.needs_calib]
    if needs_calib and isinstance(model, Workload) and model.calib_split is None:
        raise ValueError(f"variants {', '.join(needs_calib)} need calibration tokens: give the Workload a calib_split")
    if needs_calib and not isinstance(model, Workload) and calib_ids is None:
        raise ValueError(f"variants {', '.join(needs_calib)} need calib_ids")
    workload, model_id, data_id = workload_of(model, eval_ids, calib_ids, model_id, data_id)
    run_dir = Path(run_dir)
    trials = grid(settings.seeds, settings.noise_scales, settings.times, variants)
    session = open_session(executor, workload, settings, calib_windows)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = settings.fingerprint(model_id, data_id) | {"calib_windows": calib_windows} | session.identity
        store = ResultsStore(run_dir / "results.sqlite", fingerprint)  # refused before anything is written
        try:
            clean = session.clean
            write_text_atomic(run_dir / "clean.json", json.dumps(trial_metrics(clean), indent=1))
            ran = run_trials(store, trials, session, progress=progress)
            keys = [trial.key for trial in trials]
            rows = store.rows(keys)
            summaries = summarize_trials(rows)
            failed = store.failures(keys)
            write_run_files(run_dir, trial_metrics(clean), summaries)
        finally:
            store.close()
    finally:
        session.close()
    return CompareResult(clean, summaries, run_dir, ran, failed, rows)


def plot_compare(result: CompareResult, path: str | Path, title: str = "") -> Path:
    """PPL and LIS against noise scale, one line per variant (mean and 95% interval)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    clean_values = {"ppl": result.clean.perplexity, "lis": getattr(result.clean.routing, "lis", None),
                    "flip_rate": 0.0}
    variants = list(dict.fromkeys(s.variant for s in result.summaries))
    n = min((s.n for s in result.summaries), default=None)
    for ax, metric, label in zip(axes, ("ppl", "lis", "flip_rate"),
                                 ("perplexity", "LIS (load-imbalance score)", "flip rate (share of tokens whose top-k changed)")):
        for i, variant in enumerate(variants):
            errorbar_vs_scale(ax, [s for s in result.summaries if s.metric == metric and s.variant == variant], variant,
                              i, len(variants))
        finish_axis(ax, clean_values[metric], label, n, log=metric == "ppl")
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title + interval_note(result.summaries))


def paired_change(rows: list[tuple[Trial, dict[str, float]]], baseline: str = "noisy", metric: str = "nll",
                  confidence: float = 0.95) -> dict[tuple[float, float, str], tuple[float, float, float, int]]:
    """Per (noise scale, time, variant): the change of PPL against ``baseline`` on the same chips (seeds),
    as a relative change ``exp(mean d) - 1`` with its Student-t interval, where ``d`` is the per-seed
    difference of the mean NLL (= log PPL, so the interval is computed on the log scale and mapped back)
    -- ``(change, low, high, n pairs)``. Variants and baseline pair by seed; unpaired seeds are skipped."""
    by_key: dict[tuple[float, float, str], dict[int, float]] = {}
    for trial, metrics in rows:
        if metric in metrics:
            by_key.setdefault((trial.noise_scale, trial.t_inference, trial.variant), {})[trial.seed] = metrics[metric]
    out = {}
    for (scale, t, variant), values in by_key.items():
        base = by_key.get((scale, t, baseline))
        if variant == baseline or base is None:
            continue
        diffs = [values[seed] - base[seed] for seed in sorted(values) if seed in base]
        if not diffs:
            continue
        mean, half = statistics.fmean(diffs), t_half_width(diffs, confidence)
        out[(scale, t, variant)] = (math.expm1(mean), math.expm1(mean - half), math.expm1(mean + half), len(diffs))
    return out


def paired_runs(rows: list[tuple[Trial, dict[str, float]]], base_rows: list[tuple[Trial, dict[str, float]]],
                metric: str = "nll") -> dict[tuple[float, float], tuple[float, float, float, int]]:
    """``paired_change`` of one set of trials against another of the same variant (two runs, e.g. a model
    before and after fine-tuning): per (noise scale, time), ``(change, low, high, n pairs)``, paired by seed."""
    sides = [(dataclasses.replace(trial, variant=side), metrics)
             for side, side_rows in (("run", rows), ("base", base_rows)) for trial, metrics in side_rows]
    return {(scale, t): cell for (scale, t, _), cell in paired_change(sides, "base", metric).items()}

"""Compare the robustness methods on the same chips: clean, noisy, and noisy + each method.

Every trial (chip seed x noise scale x drift time x variant) converts a fresh copy of the clean model
with the variant's placement, programs and drifts it with the trial's seed, applies the variant's method
with calibration tokens (never the evaluation tokens), and evaluates perplexity and routing against the
clean model on the evaluation windows. Trials go to the same resumable SQLite store as ``noise_sweep``,
with the variant in the key. Variants share the chip seed, so their differences are paired.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from romer_kernels.evaluation.lm_eval import LMEval, evaluate_lm, windows
from romer_kernels.evaluation.montecarlo import ResultsStore, Summary, Trial, grid, run_sweep, summarize_trials
from romer_kernels.evaluation.sweep import SweepSettings, analog_copy, errorbar_vs_scale, finish_axis, save_figure, trial_metrics
from romer_kernels.methods import RomerConfig, RQConfig, digital_placement, replicate_quantize_, romer_
from romer_kernels.moe.convert import Placement

PlacementFn = Callable[[nn.Module, torch.Tensor], Placement]
MethodFn = Callable[[nn.Module, torch.Tensor], None]


@dataclass(frozen=True)
class Variant:
    """A robustness method: how the model is placed, and what is done to the chip after programming."""

    name: str
    placement: PlacementFn
    method: MethodFn | None = None
    description: str = ""


def _all_analog(model: nn.Module, calib: torch.Tensor) -> Placement:
    return Placement()


def _digital(fraction: float, score: str) -> PlacementFn:
    def placement(model: nn.Module, calib: torch.Tensor) -> Placement:
        return digital_placement(model, fraction, score, calib_ids=calib, seed=0)
    return placement


def _romer(*stages: str) -> MethodFn:
    def method(model: nn.Module, calib: torch.Tensor) -> None:
        romer_(model, calib, RomerConfig(stages=stages))
    return method


def _rq(model: nn.Module, calib: torch.Tensor) -> None:
    replicate_quantize_(model, calib, RQConfig())


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("noisy", _all_analog, None, "everything analog but lm_head, no method"),
    Variant("dense-digital", _digital(0.0, "maxnn"), None, "attention, shared experts, dense MLPs digital"),
    Variant("maxnn-12.5", _digital(0.125, "maxnn"), None, "dense digital + top 12.5% experts by MaxNNScore digital"),
    Variant("random-12.5", _digital(0.125, "random"), None, "dense digital + random 12.5% experts digital"),
    Variant("frequency-12.5", _digital(0.125, "frequency"), None, "dense digital + most used 12.5% experts digital"),
    Variant("romer-replace", _all_analog, _romer("replace"), "ROMER stage 1: cold experts become copies"),
    Variant("romer-recal", _all_analog, _romer("recalibrate"), "ROMER stage 2: percentile router recalibration"),
    Variant("romer", _all_analog, _romer("replace", "recalibrate"), "ROMER stages 1 + 2"),
    Variant("rq", _all_analog, _rq, "Replicate-and-Quantize (1 int8 replica per layer)"),
    Variant("maxnn-12.5+romer", _digital(0.125, "maxnn"), _romer("replace", "recalibrate"), "MaxNN placement + ROMER"),
)}
DEFAULT_VARIANTS = ("noisy", "maxnn-12.5", "random-12.5", "romer-recal", "romer", "rq")


def calibration_windows(token_ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """[count, seq_len] non-overlapping windows from the start of ``token_ids`` (the calibration set)."""
    spans = windows(int(torch.as_tensor(token_ids).numel()), seq_len)[:count]
    return torch.stack([torch.as_tensor(token_ids)[start:end] for start, end, _ in spans])


def variant_model(model: nn.Module, settings: SweepSettings, trial: Trial, calib: torch.Tensor) -> nn.Module:
    """The analog copy of ``model`` for one trial, with the variant's placement and method applied."""
    try:
        variant = VARIANTS[trial.variant]
    except KeyError:
        raise ValueError(f"unknown variant {trial.variant!r}; known: {', '.join(VARIANTS)}") from None
    analog = analog_copy(model, settings, trial, variant.placement(model, calib))
    if variant.method is not None:
        variant.method(analog, calib)
    return analog


@dataclass
class CompareResult:
    clean: LMEval
    summaries: list[Summary]
    run_dir: Path
    trials_run: int


def compare_methods(model: nn.Module, eval_ids: torch.Tensor, calib_ids: torch.Tensor, settings: SweepSettings,
                    variants: tuple[str, ...], run_dir: str | Path, model_id: str, data_id: str,
                    calib_windows: int = 8, progress: bool = True) -> CompareResult:
    """Clean evaluation plus every (seed, noise scale, time, variant) trial; resumable like ``noise_sweep``."""
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    calib = calibration_windows(calib_ids, settings.seq_len, calib_windows)
    eval_args = dict(seq_len=settings.seq_len, batch_size=settings.batch_size, max_windows=settings.max_windows)
    clean = evaluate_lm(model, eval_ids, **eval_args)
    (run_dir / "clean.json").write_text(json.dumps(trial_metrics(clean), indent=1))
    fingerprint = settings.fingerprint(model_id, data_id) | {"calib_windows": calib_windows}
    store = ResultsStore(run_dir / "results.sqlite", fingerprint)
    try:
        def run_trial(trial: Trial) -> dict[str, float]:
            with torch.no_grad():
                analog = variant_model(model, settings, trial, calib)
            return trial_metrics(evaluate_lm(analog, eval_ids, clean=clean.trace, **eval_args))

        trials = grid(settings.seeds, settings.noise_scales, settings.times, variants)
        ran = run_sweep(store, trials, run_trial, progress=progress)
        summaries = summarize_trials(store.rows())
    finally:
        store.close()
    return CompareResult(clean, summaries, run_dir, ran)


def plot_compare(result: CompareResult, path: str | Path, title: str = "") -> Path:
    """PPL and LIS against noise scale, one line per variant (mean and 95% interval)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    clean_values = {"ppl": result.clean.perplexity, "lis": getattr(result.clean.routing, "lis", None),
                    "flip_rate": 0.0}
    for ax, metric, label in zip(axes, ("ppl", "lis", "flip_rate"), ("perplexity", "LIS", "flip rate")):
        for variant in sorted({s.variant for s in result.summaries}):
            errorbar_vs_scale(ax, [s for s in result.summaries if s.metric == metric and s.variant == variant], variant)
        finish_axis(ax, clean_values[metric], label)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path, title)

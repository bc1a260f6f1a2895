"""The robustness methods a comparison runs, by name: how each places the model and what it does to a chip.

A ``Variant`` is a placement (computed once on the clean model, with calibration tokens) and an optional
method applied to the programmed chip (with the same calibration tokens, never the evaluation ones).
The methods change the model only through its analog modules' hooks, so ``methods.undo_methods_``
removes them without any weight having been copied.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from romer_kernels.evaluation.lm_metrics import windows
from romer_kernels.methods import RomerConfig, RQConfig, digital_placement, replicate_quantize_, romer_
from romer_kernels.methods.placement import PART_PREFIX, Part, part_placement
from romer_kernels.moe.convert import Placement

PlacementFn = Callable[[nn.Module, torch.Tensor], Placement]
# a method changes the chip in place and returns what it did, as trial metrics (e.g. experts replaced)
MethodFn = Callable[[nn.Module, torch.Tensor], "dict[str, float] | None"]


@dataclass(frozen=True)
class Variant:
    """A robustness method: how the model is placed, and what is done to the chip after programming."""

    name: str
    placement: PlacementFn
    method: MethodFn | None = None
    description: str = ""
    needs_calib: bool = True      # whether placement or method read calibration tokens
    weights: str = "base"         # "hwa": the HWA fine-tuned checkpoint's weights (SweepSettings.hwa_checkpoint)


def _all_analog(model: nn.Module, calib: torch.Tensor) -> Placement:
    return Placement()


def _digital(fraction: float, score: str) -> PlacementFn:
    def placement(model: nn.Module, calib: torch.Tensor) -> Placement:
        return digital_placement(model, fraction, score, calib_ids=calib, seed=0)
    return placement


def _romer(*stages: str, **settings) -> MethodFn:
    def method(model: nn.Module, calib: torch.Tensor) -> dict[str, float]:
        report = romer_(model, calib, RomerConfig(stages=stages, **settings))
        if "replace" not in stages:
            return {}
        return {"replaced_experts": float(sum(len(r.replaced) for r in report.replacements))}
    return method


# ROMER stage 1 swept: romer-replace-r2 (the 2 coldest experts per layer), romer-replace-tau1 (cold below
# 1/E), and the same with stage 2 (romer-r2, romer-tau1)
_ROMER_SWEEP = re.compile(r"(romer-replace|romer)-(?:r(\d+)|tau(\d+(?:\.\d+)?))")


def _romer_sweep_variant(name: str) -> Variant | None:
    match = _ROMER_SWEEP.fullmatch(name)
    if match is None:
        return None
    base, budget, tau = match.groups()
    stages = ("replace",) if base == "romer-replace" else ("replace", "recalibrate")
    settings = {"replace_budget": int(budget)} if budget is not None else {"tau_under": float(tau)}
    RomerConfig(stages=stages, **settings)  # a bad value fails here, naming it
    what = (f"the {budget} coldest experts per layer replaced" if budget is not None
            else f"experts under {tau}/E replaced (at most 12.5 % per layer)")
    return Variant(name, _all_analog, _romer(*stages, **settings), f"ROMER stage 1{' + 2' if len(stages) > 1 else ''}: "
                   + what)


def _rq(model: nn.Module, calib: torch.Tensor) -> dict[str, float]:
    report = replicate_quantize_(model, calib, RQConfig())
    return {"replicas": float(sum(len(layer.replicated) for layer in report.layers))}


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("noisy", _all_analog, None, "everything analog but lm_head, no method", needs_calib=False),
    Variant("dense-digital", _digital(0.0, "maxnn"), None, "attention, shared experts, dense MLPs digital",
            needs_calib=False),
    Variant("maxnn-12.5", _digital(0.125, "maxnn"), None, "dense digital + top 12.5% experts by MaxNNScore digital"),
    Variant("random-12.5", _digital(0.125, "random"), None, "dense digital + random 12.5% experts digital"),
    Variant("frequency-12.5", _digital(0.125, "frequency"), None, "dense digital + most used 12.5% experts digital"),
    Variant("romer-replace", _all_analog, _romer("replace"), "ROMER stage 1: cold experts become copies"),
    Variant("romer-recal", _all_analog, _romer("recalibrate"), "ROMER stage 2: percentile router recalibration"),
    Variant("romer", _all_analog, _romer("replace", "recalibrate"), "ROMER stages 1 + 2"),
    Variant("rq", _all_analog, _rq, "Replicate-and-Quantize (1 int8 replica per layer)"),
    Variant("maxnn-12.5+romer", _digital(0.125, "maxnn"), _romer("replace", "recalibrate"), "MaxNN placement + ROMER"),
)}
HWA_PREFIX = "hwa+"  # hwa+VARIANT: VARIANT's placement and method on the HWA fine-tuned weights
DEFAULT_VARIANTS = ("noisy", "maxnn-12.5", "random-12.5", "romer-recal", "romer", "rq")


def variant_of(name: str) -> Variant | None:
    """The variant ``name``: a registered one, or a part of the model (``only:CATEGORY[@LAYER][#EXPERT]``,
    that part analog and everything else digital, see ``methods.placement.Part``); ``""`` (a plain noise
    sweep) is None."""
    if name == "":
        return None
    if name == "hwa":
        return Variant("hwa", _all_analog, None, "the HWA fine-tuned checkpoint (--hwa-checkpoint), no method",
                       needs_calib=False, weights="hwa")
    if name.startswith(HWA_PREFIX):
        inner = variant_of(name[len(HWA_PREFIX):])
        if inner is None or inner.weights == "hwa":
            raise ValueError(f"variant {name!r}: give hwa+ a retraining-free variant, e.g. hwa+romer")
        return dataclasses.replace(inner, name=name, weights="hwa",
                                   description=f"HWA checkpoint + {inner.name} ({inner.description})")
    swept = _romer_sweep_variant(name)
    if swept is not None:
        return swept
    if name.startswith(PART_PREFIX):
        part = Part.parse(name)
        return Variant(name, lambda model, calib: part_placement(model, part), None,
                       f"only {' and '.join(part.categories)} analog", needs_calib=False)
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}; ROMER stage 1 swept: "
                         "romer-replace-rN / romer-rN (N coldest experts per layer), romer-replace-tauX / romer-tauX "
                         "(cold under X/E); a part: only:CATEGORY[@LAYER][#EXPERT]; HWA: hwa, hwa+VARIANT") from None


def calibration_windows(token_ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """[count, seq_len] non-overlapping windows from the start of ``token_ids`` (the calibration set)."""
    spans = windows(int(torch.as_tensor(token_ids).numel()), seq_len)[:count]
    return torch.stack([torch.as_tensor(token_ids)[start:end] for start, end, _ in spans])

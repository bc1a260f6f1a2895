"""Undo every retraining-free method on a converted model, without having copied any weight.

The methods change a converted model only through hooks of its analog modules (none writes the model's
weights): the router's logit affine (ROMER's recalibration and masks), the experts' ``dispatch`` and
``extra_experts`` (ROMER's copies, Replicate-and-Quantize's replicas) and ``slot_weights`` (ROMER's
replaced slots, R&Q's quantized experts). ``undo_methods_`` clears them all, so a Monte Carlo applies a
method to one converted model per trial and undoes it for the next. Chips that a method re-programmed
(replaced or quantized slots) are programmed from their own weights again at their next program, drift
or use.
"""
from __future__ import annotations

from torch import nn

from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.analog_router import AnalogRouter


def undo_methods_(model: nn.Module) -> nn.Module:
    """Remove every method hook (router maps, dispatch, replicas, slot weights) from ``model``; returns it."""
    for module in model.modules():
        if isinstance(module, AnalogRouter):
            module.set_logit_affine(None, None)
        elif isinstance(module, AnalogExperts):
            module.dispatch = None
            module.extra_experts = None
            module.clear_slot_weights()
    return model

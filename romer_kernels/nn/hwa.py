"""HWA training mode of a converted model: every analog matrix computes the differentiable training forward.

``hwa_training_(model, HWAConfig())`` switches it on (and frees the programmed chips: training holds none),
``training.step = k`` selects the training chip of step ``k`` (``HWAConfig.step_seed``), ``end_hwa_training_``
switches it off. While it is on and autograd records, ``AnalogLinear``, the analog experts and analog
routers run ``kernels.hwa.hwa_linear``; under ``torch.no_grad()`` (or with ``training.active = False``)
they compute exactly as before, on their own programmed chips. Inference is never changed by this
module: a model that was never switched computes bit-identically to one that never imported it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from romer_kernels.config.hwa import HWAConfig
from romer_kernels.kernels.hwa import hwa_linear, training_weights
from romer_kernels.nn.base import AnalogModule
from romer_kernels.nn.model_helpers import analog_matrices
from romer_kernels.rng import MvmStreams, chip_key


class HWATraining:
    """The training state every analog matrix of one model shares: config, current step, on/off.

    A matrix called several times in one step (e.g. gradient accumulation over micro-batches) gets the
    same training chip every time and fresh per-MVM noise per call (call counter per matrix, restarted at
    every step), so a step's noise depends only on (config.seed, step, call), never on what ran before:
    a resumed training draws what an uninterrupted one draws."""

    def __init__(self, config: HWAConfig) -> None:
        if not isinstance(config, HWAConfig):
            raise TypeError(f"HWA training needs an HWAConfig, got {type(config).__name__}")
        self.config = config
        self.active = True
        self._step = 0
        self._calls: dict[int, int] = {}

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        self.config.step_seed(step)  # checks the range
        self._step = int(step)
        self._calls.clear()

    def matmul(self, matrix, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               row_ids: torch.Tensor | None) -> torch.Tensor:
        """The training forward of ``matrix`` on ``x`` [B, in] (float32, on ``x``'s device)."""
        seed = self.config.step_seed(self._step)
        call = self._calls.get(id(matrix), 0)
        self._calls[id(matrix)] = call + 1
        grid, config, layer_id, hwa = matrix.chip.grid, matrix.config, matrix.layer_id, self.config
        version = weight._version

        def weights():
            if weight._version != version:
                raise RuntimeError(f"{layer_id!r}: the weight changed between the HWA forward and its backward "
                                   "(step the optimizer after backward)")
            return training_weights(weight, grid, config, layer_id, seed, hwa)

        streams = MvmStreams(chip_key(seed, layer_id), call) if hwa.mvm_noise and matrix.mvm_noise else None
        bias32 = None if bias is None else bias.to("cpu")
        y = hwa_linear(x.to("cpu"), weight, bias32, grid, config.io, weights, streams,
                       None if row_ids is None else row_ids.cpu())
        return y.to(x.device)


def hwa_training_(model: nn.Module, config: HWAConfig | None = None) -> HWATraining:
    """Put every analog matrix of ``model`` in HWA training mode (one shared ``HWATraining``, returned)
    and free their programmed chips. Raises if the model has no analog matrix or dropped digital weights."""
    matrices = list(analog_matrices(model))
    if not matrices:
        raise ValueError("HWA training needs a converted model (analogize_ first): it has no analog matrix")
    training = HWATraining(config or HWAConfig())
    for matrix in matrices:
        matrix.free_chip()  # raises for a chip whose digital weights were dropped
        matrix.hwa = training
    return training


def end_hwa_training_(model: nn.Module) -> nn.Module:
    """Back to inference: every analog matrix computes on its own chip again (programmed at next use)."""
    for matrix in analog_matrices(model):
        matrix.hwa = None
    return model


@contextmanager
def hwa_training(model: nn.Module, config: HWAConfig | None = None):
    """``with hwa_training(model, HWAConfig()) as training: ...`` -- HWA training mode inside the block."""
    training = hwa_training_(model, config)
    try:
        yield training
    finally:
        end_hwa_training_(model)


@torch.no_grad()
def clip_analog_weights_(model: nn.Module, sigma: float) -> int:
    """Clip every analog weight matrix to +-sigma x its standard deviation (aihwkit ``LAYER_GAUSSIAN``),
    in place; returns how many weights were clipped. What HWA training does after each optimizer step."""
    if not sigma > 0:
        raise ValueError(f"clip sigma must be > 0, got {sigma}")
    clipped = 0
    seen: set[tuple[int, int]] = set()
    for module in model.modules():
        if not isinstance(module, AnalogModule):
            continue
        try:
            pairs = list(module._matrices())
        except NotImplementedError:   # a module that walks its matrices itself
            continue
        for _, weight in pairs:
            key = (weight.data_ptr(), weight.numel())
            if key in seen or weight.device.type == "meta":
                continue
            seen.add(key)
            bound = float(sigma * weight.float().std())
            clipped += int((weight.abs() > bound).sum())
            weight.clamp_(-bound, bound)
    return clipped

"""HWA training mode of a converted model: every analog matrix computes the differentiable training forward.

``hwa_training_(model, HWAConfig())`` switches it on (and frees the programmed chips: training holds none),
``training.step = k`` selects the training chip of step ``k`` (``HWAConfig.step_seed``), ``end_hwa_training_``
switches it off. While it is on and autograd records, ``AnalogLinear``, the analog experts and analog
routers run ``kernels.hwa.hwa_linear``; under ``torch.no_grad()`` (or with ``training.active = False``)
they compute exactly as before, on their own programmed chips. Inference is never changed by this
module: a model that was never switched computes bit-identically to one that never imported it.
With ``HWAConfig(learn_input_range=True)`` the training also owns one learned input range per matrix
(``training.input_ranges``, Parameters for the optimizer); ``end_hwa_training_`` gives each matrix a copy,
and from then on it computes with it (``AnalogMatrix.set_input_range``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from romer_kernels.config.hwa import HWAConfig
from romer_kernels.kernels.hwa import InputRangeClamp, clamp_to_ranges, hwa_linear, training_weights
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
        # config.learn_input_range: the learned input ranges, owned here while training (one Parameter
        # [n_in_tiles] per matrix, by layer id; the optimizer steps them), and per tile how many forwards
        # have initialised each from the data
        self.input_ranges: dict[str, nn.Parameter] = {}
        self.range_updates: dict[str, torch.Tensor] = {}

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
        x_cpu, ranges = x.to("cpu"), self.input_ranges.get(str(layer_id))
        if ranges is not None:
            self._init_range_from_data(str(layer_id), x_cpu, grid)
            x_cpu = InputRangeClamp.apply(x_cpu, ranges, grid, hwa.input_range_decay, hwa.input_range_min_inside)
        elif matrix.input_range is not None:  # a model trained with learned ranges, trained on with them fixed
            ranges = matrix.input_range
            x_cpu = clamp_to_ranges(x_cpu, ranges, grid)
        y = hwa_linear(x_cpu, weight, bias32, grid, config.io, weights, streams,
                       None if row_ids is None else row_ids.cpu(), ranges)
        return y.to(x.device)

    @torch.no_grad()
    def _init_range_from_data(self, layer_id: str, x: torch.Tensor, grid) -> None:
        """aihwkit's ``init_from_data``: over a tile's first forwards its range is the running mean of
        alpha x std of the inputs it sees (a forward without spread, e.g. one token, is not counted)."""
        updates, ranges = self.range_updates[layer_id], self.input_ranges[layer_id]
        for k, cols in enumerate(grid.in_slices()):
            done = int(updates[k])
            if done >= self.config.input_range_init_batches or x[:, cols].numel() < 2:
                continue
            std = float(x[:, cols].float().std())
            if std > 0 and std == std:
                ranges.data[k] = (ranges.data[k] * done + self.config.input_range_init_alpha * std) / (done + 1)
                updates[k] += 1

    def add_input_ranges(self, matrices, saved: dict[str, torch.Tensor] | None = None,
                         updates: dict[str, torch.Tensor] | None = None) -> None:
        """A learned range for every matrix: ``saved`` (the Parameters themselves when they are Parameters:
        the training goes on after a save point; copies of saved tensors: a resumed training), else the
        matrix's own (a model trained before: already initialised), else aihwkit's initial 3.0, to be
        initialised from the data."""
        for matrix in matrices:
            name, tiles = str(matrix.layer_id), len(matrix.chip.grid.in_sizes)
            if name in self.input_ranges:
                continue
            if saved is not None and name in saved:
                start, done = saved[name], (updates or {}).get(name)
                if isinstance(start, nn.Parameter) and done is not None:  # the training goes on: its own ranges
                    self.input_ranges[name], self.range_updates[name] = start, done
                    continue
            elif matrix.input_range is not None:
                start, done = matrix.input_range, None
            else:
                start, done = torch.full((tiles,), 3.0), torch.zeros(tiles, dtype=torch.int64)
            if done is None:
                done = torch.full((tiles,), self.config.input_range_init_batches, dtype=torch.int64)
            if start.numel() != tiles:
                raise ValueError(f"{name!r}: {start.numel()} saved input ranges for {tiles} input tiles")
            self.input_ranges[name] = nn.Parameter(start.detach().to(torch.float32).reshape(-1).clone())
            self.range_updates[name] = done.detach().to(torch.int64).reshape(-1).clone()


def hwa_training_(model: nn.Module, config: HWAConfig | None = None,
                  input_ranges: dict[str, torch.Tensor] | None = None,
                  range_updates: dict[str, torch.Tensor] | None = None) -> HWATraining:
    """Put every analog matrix of ``model`` in HWA training mode (one shared ``HWATraining``, returned)
    and free their programmed chips. Raises if the model has no analog matrix or dropped digital weights.
    With ``config.learn_input_range`` every matrix gets a learned input range (``input_ranges`` /
    ``range_updates``: those of a save point, by layer id, to resume)."""
    matrices = list(analog_matrices(model))
    if not matrices:
        raise ValueError("HWA training needs a converted model (analogize_ first): it has no analog matrix")
    training = HWATraining(config or HWAConfig())
    for matrix in matrices:
        matrix.free_chip()  # raises for a chip whose digital weights were dropped
        matrix.hwa = training
    if training.config.learn_input_range:
        training.add_input_ranges(matrices, input_ranges, range_updates)
    return training


def end_hwa_training_(model: nn.Module) -> nn.Module:
    """Back to inference: every analog matrix computes on its own chip again (programmed at next use),
    with the input range it learned (a copy) when the training learned them."""
    for matrix in analog_matrices(model):
        training, matrix.hwa = matrix.hwa, None
        if training is not None and str(matrix.layer_id) in training.input_ranges:
            matrix.set_input_range(training.input_ranges[str(matrix.layer_id)])
    return model


@contextmanager
def hwa_training(model: nn.Module, config: HWAConfig | None = None):
    """``with hwa_training(model, HWAConfig()) as training: ...`` -- HWA training mode inside the block
    (``training.input_ranges``: the ranges to hand the optimizer when ``config.learn_input_range``)."""
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

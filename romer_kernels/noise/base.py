"""The interface every device noise model implements.

A device noise model turns target weights into the weights a chip actually holds. It works element-wise
on a whole layer weight ``w[out, in]`` (already scaled by the mapping's weight scaling), and is told the
tile partition through a :class:`~romer_kernels.config.tiling.TileGrid` so that it can map each tile's
abs-max onto ``g_max`` as aihwkit does. All its randomness comes from ``draw(purpose, slot)``, which
returns standard normals of ``w``'s shape from the Philox stream owned by (chip seed, layer, purpose,
slot); slot numbers a device of the pair (0 = G+, 1 = G-) or a part of the model.

A draw may also tell the stream's Philox key: ``draw.seed(purpose, slot) -> int`` such that
``draw(purpose, slot) == normal_like(draw.seed(purpose, slot), shape)`` (element ``(i, j)`` is stream
element ``i * in + j``). :class:`StreamDraw` (what ``LayerChip`` passes) does; the models then run their
fused C++ kernels, which generate the normals inline (:mod:`romer_kernels.noise.fused`). A plain callable
without ``seed`` still works and takes the torch path.

Two steps, as on a chip and as aihwkit's ``program_analog_weights`` / ``drift_analog_weights``:
``program`` fixes the programming noise and the drift exponents once per chip; ``read`` gives the
weights at ``t_inference`` seconds after programming, with freshly drawn read noise each call.

Every per-device quantity (drift exponents, ReRAM target conductances) is a pure function of the target
weights and the streams, so a chip need not keep it: ``program(..., with_drift_exponents=False)`` skips
it and ``read(..., w_target=...)`` derives it again (same values). Both take ``out``, a float32 buffer
the caller owns, to write their result into; ``read`` may write into ``programmed.weights`` itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from romer_kernels.config.tiling import TileGrid
from romer_kernels.rng import Purpose, normal_like

Draw = Callable[[Purpose, int], torch.Tensor]   # a StreamDraw, or any callable giving the normals


class StreamDraw:
    """``draw(purpose, slot)``: the normals of stream ``seed_of(purpose, slot)`` for an array of ``shape``;
    ``draw.seed(purpose, slot)``: that stream's Philox key, for kernels that generate the normals inline."""

    def __init__(self, seed_of: Callable[[Purpose, int], int], shape: Sequence[int]):
        self._seed_of = seed_of
        self.shape = tuple(int(size) for size in shape)

    def seed(self, purpose: Purpose, slot: int) -> int:
        return self._seed_of(purpose, slot)

    def __call__(self, purpose: Purpose, slot: int) -> torch.Tensor:
        return normal_like(self.seed(purpose, slot), self.shape)


def draw_seed(draw: Draw, shape: Sequence[int]) -> Callable[[Purpose, int], int] | None:
    """``draw.seed`` if ``draw`` can name its streams for an array of ``shape``, else None (torch path)."""
    seed = getattr(draw, "seed", None)
    if not callable(seed):
        return None
    draw_shape = getattr(draw, "shape", None)
    if draw_shape is not None and tuple(draw_shape) != tuple(int(size) for size in shape):
        return None
    return seed


@dataclass
class ProgrammedWeights:
    """What programming leaves on the chip: programmed weights and per-device drift exponents."""

    weights: torch.Tensor                   # W_P in weight units, same shape as the target
    drift_nu: torch.Tensor | None = None    # [num_devices, *shape] drift exponents (ReRAM: targets), None if
                                            # the model has none or the caller asked not to keep them


class DeviceNoiseModel(ABC):
    """Programming, drift and read noise of one device technology."""

    @abstractmethod
    def program(self, w_target: torch.Tensor, grid: TileGrid, draw: Draw, out: torch.Tensor | None = None,
                with_drift_exponents: bool = True) -> ProgrammedWeights:
        """Programmed weights (and, if asked, the per-device drift data) for the target weights."""

    @abstractmethod
    def read(self, programmed: ProgrammedWeights, t_inference: float, grid: TileGrid, draw: Draw,
             out: torch.Tensor | None = None, w_target: torch.Tensor | None = None) -> torch.Tensor:
        """Weights seen at ``t_inference`` seconds after programming (drift and read noise applied); the
        per-device drift data from ``programmed`` or, when it was not kept, derived from ``w_target``."""

"""The interface every device noise model implements.

A device noise model turns target weights into the weights a chip actually holds. It works element-wise
on a whole layer weight ``w[out, in]`` (already scaled by the mapping's weight scaling), and is told the
tile partition through a :class:`~romer_kernels.config.tiling.TileGrid` so that it can map each tile's
abs-max onto ``g_max`` as aihwkit does. All its randomness comes from ``draw(purpose, slot)``, which
returns standard normals of ``w``'s shape from the Philox stream owned by (chip seed, layer, purpose,
slot); slot numbers a device of the pair (0 = G+, 1 = G-) or a part of the model.

Two steps, as on a chip and as aihwkit's ``program_analog_weights`` / ``drift_analog_weights``:
``program`` fixes the programming noise and the drift exponents once per chip; ``read`` gives the
weights at ``t_inference`` seconds after programming, with freshly drawn read noise each call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from romer_kernels.config.tiling import TileGrid
from romer_kernels.rng import Purpose

Draw = Callable[[Purpose, int], torch.Tensor]


@dataclass
class ProgrammedWeights:
    """What programming leaves on the chip: programmed weights and per-device drift exponents."""

    weights: torch.Tensor                   # W_P in weight units, same shape as the target
    drift_nu: torch.Tensor | None = None    # [num_devices, *shape] drift exponents, None if no drift


class DeviceNoiseModel(ABC):
    """Programming, drift and read noise of one device technology."""

    @abstractmethod
    def program(self, w_target: torch.Tensor, grid: TileGrid, draw: Draw) -> ProgrammedWeights:
        """Programmed weights (and drift exponents) for the target weights."""

    @abstractmethod
    def read(self, programmed: ProgrammedWeights, t_inference: float, grid: TileGrid, draw: Draw) -> torch.Tensor:
        """Weights seen at ``t_inference`` seconds after programming (drift and read noise applied)."""

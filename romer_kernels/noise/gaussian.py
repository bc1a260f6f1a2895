"""This package's own simple device model: Gaussian weight noise relative to the crossbar column's
w_max, no drift. There is no aihwkit counterpart (the closest is a weight modifier used in training).

* ``program``: ``W_P = w + sigma * w_max * xi_1 + multiplicative_sigma * |w| * xi_2`` with ``w_max`` the
  abs-max of the weight's crossbar column (one output row within one input tile, ``grid.column_absmax``)
  of the target; xi_1 from (PROGRAM, 0), xi_2 from (MULTIPLICATIVE, 0).
* ``read(t)``: ``W = W_P + read_sigma * w_max(W_P) * xi_3`` with xi_3 from (READ, 0), fresh at every
  read (a new drift call index gives a new READ stream), w_max now the column abs-max of the programmed
  weights; ``t_inference`` is ignored. With ``read_sigma = 0`` the programmed tensor itself is returned.

When ``draw`` gives stream seeds, ``program`` and ``read`` run as fused C++ kernels with the same
operations (romer_kernels/noise/fused.py); the torch code below is the reference.
"""
from __future__ import annotations

import torch

from romer_kernels.config.device_noise import GaussianNoiseConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.noise.base import DeviceNoiseModel, Draw, ProgrammedWeights
from romer_kernels.noise.fused import fused
from romer_kernels.noise.pcm import _inplace_buffer, _separate_buffer, check_time, elementwise, standard_normal
from romer_kernels.rng import Purpose


class GaussianNoiseModel(DeviceNoiseModel):
    """Additive (column w_max) and multiplicative Gaussian programming noise, optional read noise."""

    def __init__(self, config: GaussianNoiseConfig):
        if not isinstance(config, GaussianNoiseConfig):
            raise ValueError(f"GaussianNoiseModel needs a GaussianNoiseConfig, got {type(config).__name__}")
        self.config = config
        self.sigma = float(config.sigma)
        self.multiplicative_sigma = float(config.multiplicative_sigma)
        self.read_sigma = float(config.read_sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def program(self, w_target: torch.Tensor, grid: TileGrid, draw: Draw, out: torch.Tensor | None = None,
                with_drift_exponents: bool = True) -> ProgrammedWeights:
        """W_P (no drift exponents: this model does not drift); written into ``out`` when given."""
        w = w_target.detach().to(torch.float32).contiguous()
        buffer = _separate_buffer(out, w)
        path = fused(w, draw)
        if path is not None:
            ops, seed = path
            result = ops.noise_gaussian_program(
                w, grid.in_sizes, self.sigma, self.multiplicative_sigma,
                seed(Purpose.PROGRAM, 0) if self.sigma > 0.0 else None,
                seed(Purpose.MULTIPLICATIVE, 0) if self.multiplicative_sigma > 0.0 else None, buffer)
            return ProgrammedWeights(result, None)
        w_max = grid.column_absmax(w) if self.sigma > 0.0 else None
        xi_add = standard_normal(draw, Purpose.PROGRAM, 0, w) if self.sigma > 0.0 else None
        xi_mul = standard_normal(draw, Purpose.MULTIPLICATIVE, 0, w) if self.multiplicative_sigma > 0.0 else None
        result = torch.empty_like(w) if buffer is None else buffer

        def chunk(w, w_max, xi_add, xi_mul, result):
            result.copy_(w)
            if xi_add is not None:
                result.add_(w_max.mul_(self.sigma).mul_(xi_add))
            if xi_mul is not None:
                result.add_(w.abs().mul_(self.multiplicative_sigma).mul_(xi_mul))

        elementwise(chunk, [w, w_max, xi_add, xi_mul, result])
        return ProgrammedWeights(result, None)

    def read(self, programmed: ProgrammedWeights, t_inference: float, grid: TileGrid, draw: Draw,
             out: torch.Tensor | None = None, w_target: torch.Tensor | None = None) -> torch.Tensor:
        """``W_P + read_sigma * w_max(W_P) * xi``; ``W_P`` itself when ``read_sigma = 0`` (copied into
        ``out`` if another buffer is given). ``out`` may be ``programmed.weights`` (in place); ``w_target``
        is not needed by this model."""
        check_time(t_inference)
        w_prog = programmed.weights
        if self.read_sigma == 0.0:
            if out is not None and out.data_ptr() != w_prog.data_ptr():
                return out.copy_(w_prog)
            return w_prog
        w_prog = w_prog.detach().to(torch.float32).contiguous()
        path = fused(w_prog, draw)
        if path is not None:
            ops, seed = path
            return ops.noise_gaussian_read(w_prog, grid.in_sizes, self.read_sigma, seed(Purpose.READ, 0),
                                           _inplace_buffer(out, w_prog))
        w_max = grid.column_absmax(w_prog)
        xi = standard_normal(draw, Purpose.READ, 0, w_prog)

        def chunk(w, w_max, xi):    # w_max becomes the result, in place
            w_max.mul_(self.read_sigma).mul_(xi).add_(w)

        elementwise(chunk, [w_prog, w_max, xi])
        result = _inplace_buffer(out, w_prog)
        return w_max if result is None else result.copy_(w_max)

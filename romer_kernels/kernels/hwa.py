"""The analog MVM of hardware-aware (HWA) training: the chip's forward, with gradients to the digital weights.

Forward: exactly the reference MVM of a chip (``reference.tiled_mvm``: DAC, IR drop, read and output
noise, ADC, bound management) on the tile weights of a training chip ``W_P`` -- the digital weights
mapped to tile units (``w / s``) with a fresh noise draw (``training_weights``) -- followed by the digital
scaling and bias, as ``reference.analog_linear``.

Backward (the Rasch et al. 2023 / aihwkit convention, an ideal backward pass through the forward's
quantizers):

* DAC and ADC rounding pass gradients straight through; their clipping zeroes the gradient of a value
  beyond the bound (the input after scaling, the output of the bound-management round that was kept);
* the weight noise passes gradients straight through (d W_P / d W = 1 / s, the digital scale s constant);
* the noise-management scale, IR drop and every per-MVM noise term are constants.

``reference.tiled_mvm(..., differentiable=True)`` is the same forward written with autograd-visible
straight-through estimators; ``AnalogMVMFunction`` computes the same gradients by hand without keeping
any weight-sized tensor between forward and backward: the backward draws ``W_P`` again from its streams
(counter-based Philox, so it is the same tensor), and keeps only the input and two small masks
([T, B, out] int8 / bool) from the forward.

Learned static input ranges (``HWAConfig.learn_input_range``): ``InputRangeClamp`` clips each input tile's
columns at its range with aihwkit's range gradient, and ``hwa_linear(..., input_range=r)`` computes the
tile on ``x_k / r_k`` (constant noise management) and scales its partial output by ``r_k``, both
differentiated in ``r``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from romer_kernels.config.analog import AnalogConfig, IOConfig, MappingConfig
from romer_kernels.config.hwa import HWAConfig
from romer_kernels.config.scaling import scale_noise
from romer_kernels.config.tiling import TileGrid, input_tile_scales, mapped_target
from romer_kernels.kernels.reference import (StreamSeed, _noise_management, _quantize, dac_output, input_layout,
                                             range_per_column, split_input, split_weight, tiled_mvm,
                                             with_input_range)
from romer_kernels.noise import build_noise_model
from romer_kernels.noise.base import StreamDraw
from romer_kernels.rng import Purpose, normal_like, stream_seed

# (W_P [out, in] float32 tile units, digital scale s [n_in_tiles, out]) of the current training chip
WeightsFn = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]


def training_weights(weight: torch.Tensor, grid: TileGrid, config: AnalogConfig, layer_id: int | str,
                     chip_seed: int, hwa: HWAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_P, s): the tile weights a training chip ``chip_seed`` holds for the digital ``weight`` ([out, in],
    float32, tile units) and the digital scale of every crossbar column ([n_in_tiles, out]).

    "device" noise is the preset's device model programming the target ``w / s`` exactly as
    ``LayerChip.program`` does (same streams for the same seed: a training chip is a chip), scaled by
    ``hwa.weight_noise_scale``; "gaussian" adds ``gaussian_sigma`` x the crossbar column's max |w / s|."""
    target, scales = mapped_target(weight.detach().to(device="cpu", dtype=torch.float32), grid, config.mapping)
    scale = hwa.weight_noise_scale
    if hwa.weight_noise == "none" or scale == 0 or (hwa.weight_noise == "device" and config.noise is None):
        return target, scales
    if hwa.weight_noise == "device":
        noise = config.noise if scale == 1 else scale_noise(config, scale).noise
        draw = StreamDraw(lambda purpose, slot: stream_seed(chip_seed, layer_id, purpose, slot), grid.shape)
        programmed = build_noise_model(noise).program(target, grid, draw, out=torch.empty_like(target),
                                                      with_drift_exponents=False)
        return programmed.weights, scales
    column_max = input_tile_scales(target, grid, MappingConfig(weight_scaling_omega=1.0, weight_scaling_columnwise=True))
    xi = normal_like(stream_seed(chip_seed, layer_id, Purpose.PROGRAM, 0), target.shape)
    return target + (hwa.gaussian_sigma * scale) * _per_column(column_max, grid) * xi, scales


def _unsplit(split: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[T, rows, n_max] -> [rows, in]: the inverse of ``split_columns`` (padding dropped)."""
    return torch.cat([split[i, :, :cols.stop - cols.start] for i, cols in enumerate(grid.in_slices())], dim=1)


def _per_column(scales: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[T, out] scales of every crossbar column as an [out, in] tensor."""
    return torch.cat([scales[i][:, None].expand(-1, cols.stop - cols.start) for i, cols in enumerate(grid.in_slices())],
                     dim=1)


def hwa_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: TileGrid,
                         io: IOConfig, weights: WeightsFn, stream_seed_fn: StreamSeed | None,
                         row_ids: torch.Tensor | None = None, input_range: torch.Tensor | None = None) -> torch.Tensor:
    """The HWA forward written so that autograd gives its gradients (what tests compare with): the value of
    ``AnalogMVMFunction``, every straight-through estimator visible to autograd. ``x`` [B, in];
    ``input_range`` [n_in_tiles]: static input ranges (``reference.with_input_range``), differentiable."""
    programmed, scales = weights()
    tile_units = weight.float() / _per_column(scales, grid)
    w_tile = programmed + (tile_units - tile_units.detach())  # value W_P exactly, gradient 1 / s
    x, out_scale = x.float(), scales * io.out_scale
    if input_range is not None:
        x, out_scale, io = with_input_range(x, out_scale, io, grid, input_range)
    partial = tiled_mvm(split_input(x, grid), split_weight(w_tile, grid), grid.in_sizes, grid.out_sizes, io,
                        stream_seed_fn, None, row_ids, differentiable=True)
    y = (partial * out_scale[:, None, :]).sum(dim=0)
    return y if bias is None else y + bias.float()


class AnalogMVMFunction(torch.autograd.Function):
    """``y = chip(x; W_P) + b`` with the HWA gradients (module docstring); ``weights`` draws W_P and s.
    With static input ranges ``r`` [n_in_tiles] (``reference.with_input_range``) tile k computes on
    ``x_k / r_k`` and its partial output is scaled by ``r_k``; ``r`` gets the gradient of both."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: TileGrid, io: IOConfig,
                weights: WeightsFn, stream_seed_fn: StreamSeed | None, row_ids: torch.Tensor | None,
                input_range: torch.Tensor | None) -> torch.Tensor:
        programmed, scales = weights()
        x32, out_scale, ranges = x.detach().to(torch.float32), scales * io.out_scale, None
        if input_range is not None:  # x32 is then x / r: what the tiles compute on, kept for the backward
            ranges = input_range.detach().to(torch.float32)
            x32, out_scale, io = with_input_range(x32, out_scale, io, grid, ranges)
        trace: dict = {}
        partial = tiled_mvm(split_input(x32, grid), split_weight(programmed, grid), grid.in_sizes, grid.out_sizes, io,
                            stream_seed_fn, None, row_ids, trace=trace)
        y = (partial * out_scale[:, None, :]).sum(dim=0)
        if bias is not None:
            y = y + bias.detach().float()
        # the partial outputs only when the ranges learn (d y / d r_k needs them)
        keep = partial if input_range is not None and ctx.needs_input_grad[8] else torch.empty(0)
        ctx.save_for_backward(x32, trace["round"], trace["clipped"], keep)
        ctx.setup = (grid, io, weights, stream_seed_fn, row_ids, weight, bias is not None, x.dtype, ranges)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x32, kept_round, clipped, partial = ctx.saved_tensors
        grid, io, weights, stream_seed_fn, row_ids, weight, has_bias, x_dtype, ranges = ctx.setup
        programmed, scales = weights()  # the forward's W_P again, from the same streams
        grad_y = grad_y.to(torch.float32)
        xt, wt = split_input(x32, grid), split_weight(programmed, grid)   # x32: x / r with ranges
        digital_scale = scales * io.out_scale
        out_scale = digital_scale if ranges is None else digital_scale * ranges[:, None]
        grad_partial = grad_y[None] * out_scale[:, None, :]          # [T, B, out]
        grad_partial = grad_partial.masked_fill(clipped, 0.0)
        if io.is_perfect:
            grad_xt = torch.bmm(grad_partial, wt)
            grad_wt = torch.bmm(grad_partial.transpose(1, 2), xt)
        else:
            grad_xt, grad_wt = torch.zeros_like(xt), torch.zeros_like(wt)
            nm_scale = _noise_management(xt, io)
            safe_scale = torch.where(nm_scale > 0, nm_scale, torch.ones_like(nm_scale))
            valid = input_layout(grid.in_sizes)
            rows = torch.arange(xt.shape[1]) if row_ids is None else row_ids.to(torch.int64)
            for bm_round in range(int(kept_round.max()) + 1 if kept_round.numel() else 0):
                input_scale = (1.0 / safe_scale) / float(2 ** bm_round)
                grad_z = torch.where(kept_round == bm_round, grad_partial, 0.0) / input_scale   # d partial / d z
                inside = _quantize(xt * input_scale, io.inp_step).abs() <= io.inp_bound          # DAC not clipped
                grad_xt += torch.bmm(grad_z, wt) * (inside & valid[:, None, :]) * input_scale
                x_dac = dac_output(xt, input_scale, io, stream_seed_fn, bm_round, rows, grid.in_sizes, valid)
                grad_wt += torch.bmm(grad_z.transpose(1, 2), x_dac)
        grad_range = None
        if ranges is not None:
            if partial.numel():  # y = sum_k r_k s_k partial_k(x_k / r_k): the output scale, then the input's
                grad_range = (grad_y[None] * digital_scale[:, None, :] * partial).sum(dim=(1, 2))
                grad_range = grad_range - (grad_xt * xt).sum(dim=(1, 2)) / ranges
            grad_xt = grad_xt / ranges[:, None, None]
        grad_x = _unsplit(grad_xt, grid).to(x_dtype)
        grad_weight = (_unsplit(grad_wt, grid) / _per_column(scales, grid)).to(weight.dtype)
        grad_bias = grad_y.sum(dim=0) if has_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, grad_range


def hwa_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: TileGrid, io: IOConfig,
               weights: WeightsFn, stream_seed_fn: StreamSeed | None, row_ids: torch.Tensor | None = None,
               input_range: torch.Tensor | None = None) -> torch.Tensor:
    """HWA forward of one analog matrix on ``x`` [B, in] (CPU float32 result); differentiable in ``x``,
    ``weight``, ``bias`` and the static input ranges ``input_range`` [n_in_tiles] (None: the preset's
    noise management)."""
    return AnalogMVMFunction.apply(x, weight, bias, grid, io, weights, stream_seed_fn, row_ids, input_range)


class InputRangeClamp(torch.autograd.Function):
    """``clamp(x, -r_k, r_k)`` on the columns of input tile k, with aihwkit's input-range gradient (its
    ``InputRangeForward`` and straight-through clamp, Rasch et al. 2023).

    ``x`` gets the gradient where it lies within its range (strictly beyond: zero). ``r_k`` gets, scaled by
    ``r_k`` (aihwkit's relative gradient), only the gradients that ask for a wider range -- the negative
    gradients of inputs at or above ``+r_k`` and the positive ones at or below ``-r_k`` -- plus
    ``decay * r_k`` while more than ``min_inside`` of the tile's inputs lie within the range, which
    shrinks a range that clips too little."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, input_range: torch.Tensor, grid: TileGrid, decay: float,
                min_inside: float) -> torch.Tensor:
        ctx.save_for_backward(x, input_range)
        ctx.setup = (grid, decay, min_inside)
        return clamp_to_ranges(x, input_range, grid)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, input_range = ctx.saved_tensors
        grid, decay, min_inside = ctx.setup
        ranges = input_range.detach().to(torch.float32)
        columns = range_per_column(ranges.to(x.dtype), grid)
        grad_x = grad.masked_fill(x.abs() > columns, 0.0)
        wider = (grad * (x >= columns)).clamp(max=0.0) - (grad * (x <= -columns)).clamp(min=0.0)
        sizes = torch.tensor(grid.in_sizes)
        tile = torch.repeat_interleave(torch.arange(len(grid.in_sizes)), sizes)   # the input tile of each column

        def per_tile(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(grid.in_sizes)).index_add_(0, tile, values.to(torch.float32).sum(dim=0))

        grad_range = per_tile(wider) * ranges
        if decay > 0 and x.shape[0]:
            inside_share = per_tile(x.abs() < columns) / (x.shape[0] * sizes)
            grad_range = grad_range + decay * ranges * (inside_share > min_inside)
        return grad_x, grad_range.to(input_range.dtype), None, None, None


def clamp_to_ranges(x: torch.Tensor, input_range: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``x`` [B, in] clipped to ``+-r_k`` on the columns of input tile k (no gradient to the ranges)."""
    columns = range_per_column(input_range.detach().to(x.dtype), grid)
    return torch.clamp(x, -columns, columns)

"""Pure-PyTorch reference of the analog tiled MVM: the semantics every backend must reproduce.

One forward of a layer ``y = W x + b`` on a tiled crossbar (aihwkit ``InferenceTile`` +
``ForwardBackwardPassIOManaged::forwardVector``, per input vector and per tile):

1. noise management: scale = abs-max of the vector's slice on this tile (``nm_thres`` caps it), a
   constant, or 1. An all-zero slice gives an exactly zero tile output.
2. DAC: x' = clip(round(x / (scale * r) / dx) * dx, +-inp_bound), then optional input noise.
   r = 1, 2, 4, ... is the bound-management reduction.
3. analog MVM z = W_tile x', IR drop, output-referred weight read noise.
4. output noise, ADC: z = round(z / dy) * dy, clip to +-out_bound. If the vector's output on this tile
   clipped and bound management is iterative, go back to 2 with r doubled (until the aihwkit limits).
5. digital: z * scale * r * out_scale * (weight scaling) * (drift compensation), summed over input
   tiles, plus the digital bias.

Random numbers come from the Philox streams of :mod:`romer_kernels.rng`; the caller gives the stream
seed of each (purpose, bound-management round). Element layout of the per-MVM streams:
``OUT_NOISE``/``W_NOISE``: element ``(b * n_in_tiles + i) * out_features + c`` for token b, input tile i,
output c; ``INP_NOISE``: element ``b * in_features + k`` for input k. Token b is the row of the
flattened input of this call (or the id the caller passes in ``row_ids``, e.g. the token's position in
the whole batch when only the tokens routed to one expert are computed), so a token's noise does not
depend on the batch it came with.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from romer_kernels.config.analog import MAX_BM_ROUNDS, IOConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.rng import Purpose, normal_rows

StreamSeed = Callable[[Purpose, int], int]  # (purpose, bound-management round) -> Philox seed


def split_columns(t: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[rows, in] -> [n_in_tiles, rows, n_max]: the columns of each input tile, zero-padded.

    Used for inputs ([B, in]) and weights ([out, in]); zero padding contributes nothing to any tile sum.
    """
    sizes = grid.in_sizes
    n_max = max(sizes)
    out = t.new_empty(len(sizes), t.shape[0], n_max)
    for i, cols in enumerate(grid.in_slices()):
        out[i, :, : sizes[i]].copy_(t[:, cols])
        if sizes[i] < n_max:
            out[i, :, sizes[i]:].zero_()  # only the padding is zero-filled
    return out


split_input = split_columns   # [B, in] -> [n_in_tiles, B, n_max]
split_weight = split_columns  # [out, in] -> [n_in_tiles, out, n_max]


def stacked_expert_tiles(gate_up_chips: list, down_chips: list, device: torch.device) -> dict[str, torch.Tensor]:
    """The grouped experts kernel's operands: split tile weights [E, T, out, n_max] and out scales
    [E, T, out] of every expert's gate_up and down chip (objects with ``grid``, ``state`` [out, in] and
    ``out_scale``), on ``device``, split one expert at a time."""
    def stack(chips: list) -> tuple[torch.Tensor, torch.Tensor]:
        grid = chips[0].grid
        tiles = torch.empty(len(chips), len(grid.in_sizes), grid.out_features, max(grid.in_sizes),
                            dtype=torch.float32, device=device)
        for e, chip in enumerate(chips):
            tiles[e].copy_(split_weight(chip.state.to(torch.float32), grid))
        return tiles, torch.stack([chip.out_scale for chip in chips]).to(device)

    gate_up, gate_up_scale = stack(gate_up_chips)
    down, down_scale = stack(down_chips)
    return dict(gate_up=gate_up, gate_up_scale=gate_up_scale, down=down, down_scale=down_scale)


def _quantize(v: torch.Tensor, step: float) -> torch.Tensor:
    """Round to the nearest multiple of ``step`` (ties to even, as aihwkit's ``rint``); 0 = identity.

    The step is rounded to float32 first, as aihwkit computes it in the tile's precision, so that the
    ties that bound management creates (x / 2 on a 7-bit DAC) fall the same way.
    """
    if step <= 0:
        return v
    step32 = torch.tensor(step, dtype=torch.float32)
    return torch.round(v / step32) * step32


def _quantize_ste(v: torch.Tensor, step: float) -> torch.Tensor:
    """``_quantize`` with a straight-through gradient: the value is exactly ``_quantize(v)`` (v - v.detach()
    is exactly 0), the gradient that of the identity."""
    return _quantize(v.detach(), step) + (v - v.detach())


def _noise_management(xt: torch.Tensor, io: IOConfig) -> torch.Tensor:
    if io.noise_management == "abs_max":
        scale = xt.abs().amax(dim=-1, keepdim=True)
        return scale.clamp_max(io.nm_thres) if io.nm_thres > 0 else scale
    if io.noise_management == "constant":
        return torch.full_like(xt[..., :1], io.nm_thres if io.nm_thres > 0 else 1.0)
    return torch.ones_like(xt[..., :1])


def _bm_limit_reached(reduction: float, io: IOConfig) -> bool:
    """aihwkit's stop rule: after a pass with this reduction no further round is taken."""
    step = io.inp_step
    return reduction > io.max_bm_factor or (step > 0 and reduction > io.max_bm_res / step)


def tiled_mvm(
    xt: torch.Tensor,
    wt: torch.Tensor,
    in_sizes: list[int],
    out_sizes: list[int],
    io: IOConfig,
    stream_seed: StreamSeed | None,
    abs_wt: torch.Tensor | None = None,
    row_ids: torch.Tensor | None = None,
    trace: dict | None = None,
    differentiable: bool = False,
) -> torch.Tensor:
    """Analog MVM of every (input tile, vector) pair, returned per input tile before digital scaling.

    ``xt`` [T, B, n_max] inputs split per input tile, ``wt`` [T, out, n_max] tile weights (tile units,
    zero-padded), ``in_sizes`` the true tile input sizes, ``out_sizes`` the output split, ``abs_wt``
    optionally ``wt.abs()`` precomputed (needed by PCM-read noise and IR drop), ``row_ids`` the global
    token index of each vector for the noise streams (default 0..B-1). Returns
    ``z * scale * r`` as [T, B, out]. ``stream_seed`` None switches every per-MVM noise off.
    ``trace``: a dict that receives what a backward pass needs (``kernels.hwa``): ``round`` [T, B, out]
    int8, the bound-management round whose output was kept (-1: an all-zero vector, exactly 0), and
    ``clipped`` [T, B, out] bool, where that output was beyond the ADC bound.
    ``differentiable``: the same values, and autograd gives the gradients HWA training defines (the
    reference of ``kernels.hwa``): DAC and ADC rounding straight through, their clipping zeroes the gradient
    beyond the bound, the noise-management scale, IR drop and every noise term constant.
    """
    n_tiles, batch, n_max = xt.shape
    out_features = wt.shape[1]
    rows = torch.arange(batch) if row_ids is None else row_ids.to(torch.int64)
    if rows.shape != (batch,):
        raise ValueError(f"row_ids must have one id per input vector ({batch}), got shape {tuple(rows.shape)}")
    if io.is_perfect:
        if trace is not None:
            trace["round"] = torch.zeros(n_tiles, batch, out_features, dtype=torch.int8)
            trace["clipped"] = torch.zeros(n_tiles, batch, out_features, dtype=torch.bool)
        return torch.bmm(xt, wt.transpose(1, 2))

    quantize = _quantize_ste if differentiable else _quantize
    constant = torch.Tensor.detach if differentiable else (lambda t: t)
    nm_scale = _noise_management(constant(xt), io)           # [T, B, 1]
    # A vector whose scale is 0 (all-zero slice under noise management) gives exactly 0, as in aihwkit.
    dead = (nm_scale <= 0) if io.noise_management != "none" and io.inp_noise <= 0 else None
    safe_scale = torch.where(nm_scale > 0, nm_scale, torch.ones_like(nm_scale))

    out_tile = torch.repeat_interleave(torch.arange(len(out_sizes)), torch.tensor(out_sizes))
    in_pos = torch.arange(n_max, dtype=xt.dtype)
    sizes = torch.tensor(in_sizes, dtype=xt.dtype)[:, None]
    valid_inputs = input_layout(in_sizes, xt.dtype)          # [T, n_max]

    result = torch.zeros(n_tiles, batch, out_features, dtype=xt.dtype)
    pending = torch.ones(n_tiles, batch, out_features, dtype=torch.bool)
    if dead is not None:
        pending &= ~dead
    iterative = io.bound_management == "iterative" and io.out_bound > 0
    abs_w = abs_wt
    if abs_w is None and (io.w_noise_type == "pcm_read" or io.ir_drop > 0):
        abs_w = wt.abs()

    if trace is not None:
        kept_round = torch.full((n_tiles, batch, out_features), -1, dtype=torch.int8)
        beyond = torch.zeros(n_tiles, batch, out_features, dtype=torch.bool)
    for bm_round in range(MAX_BM_ROUNDS):
        reduction = float(2 ** bm_round)
        input_scale = (1.0 / safe_scale) / reduction          # aihwkit: scale = 1/nm, then /= reduction
        x_dac = dac_output(xt, input_scale, io, stream_seed, bm_round, rows, in_sizes, valid_inputs, quantize)

        z = torch.bmm(x_dac, wt.transpose(1, 2))              # [T, B, out]
        x_const, w_const = constant(x_dac), constant(wt)
        if io.ir_drop > 0:
            current = torch.bmm(x_const.abs(), constant(abs_w).transpose(1, 2))
            a = current * (sizes[:, :, None] / io.ir_drop_g_ratio)
            c = a * (a * (0.05 * a - 0.2) + 0.5)
            position = 1.0 - in_pos[None, :] / sizes
            weighted = torch.bmm(x_const * (1.0 - position * position)[:, None, :], w_const.transpose(1, 2))
            z = z - c * io.ir_drop * weighted
        if stream_seed is not None and io.w_noise > 0:
            if io.w_noise_type == "additive_constant":
                std = io.w_noise * x_const.norm(dim=-1, keepdim=True)
            else:
                std = io.w_noise * torch.bmm(x_const * x_const, constant(abs_w).transpose(1, 2)).sqrt()
            z = z + std * _per_output_normals(stream_seed(Purpose.W_NOISE, bm_round), rows, n_tiles, out_features)
        if stream_seed is not None and io.out_noise > 0:
            z = z + io.out_noise * _per_output_normals(stream_seed(Purpose.OUT_NOISE, bm_round), rows, n_tiles,
                                                       out_features)
        z = quantize(z, io.out_step)
        if trace is not None:
            kept_round = torch.where(pending, bm_round, kept_round)
            if io.out_bound > 0:
                beyond = torch.where(pending, z.abs() > io.out_bound, beyond)

        if io.out_bound > 0:
            over = z > io.out_bound
            if io.bm_test_negative_bound:
                over = over | (z < -io.out_bound)
            z = z.clamp(-io.out_bound, io.out_bound)
        result = torch.where(pending, z / input_scale, result)
        if not iterative or _bm_limit_reached(reduction, io):
            break
        clipped = _any_per_out_tile(over, out_tile, len(out_sizes))
        pending = pending & clipped[:, :, out_tile]
        if not bool(pending.any()):
            break
    if trace is not None:
        trace["round"], trace["clipped"] = kept_round, beyond
    return result


def static_input_range_io(io: IOConfig) -> IOConfig:
    """The periphery of a chip with a static (learned) input range: noise management is a constant scale 1,
    the range itself being applied around the tile (``with_input_range``)."""
    return dataclasses.replace(io, noise_management="constant", nm_thres=0.0)


def range_per_column(input_range: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[n_in_tiles] ranges as one value per input column, [in]."""
    return torch.repeat_interleave(input_range, torch.tensor(grid.in_sizes, device=input_range.device))


def with_input_range(x: torch.Tensor, out_scale: torch.Tensor, io: IOConfig, grid: TileGrid,
                     input_range: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, IOConfig]:
    """A static input range ``r_k`` per input tile (aihwkit's learned input range, Rasch et al. 2023): tile
    ``k`` gets ``x_k / r_k`` with a constant noise-management scale 1 (its DAC clips at ``r_k * inp_bound``)
    and its partial output is multiplied by ``r_k`` in the digital periphery, before the sum over tiles.
    Returns what ``analog_linear`` takes instead of (x [B, in], out_scale [n_in_tiles, out], io)."""
    return (x / range_per_column(input_range, grid)[None, :], out_scale * input_range[:, None],
            static_input_range_io(io))


def input_layout(in_sizes: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, n_max] bool: which positions of the split input are real inputs (not padding)."""
    in_pos = torch.arange(max(in_sizes), dtype=dtype)
    return in_pos[None, :] < torch.tensor(in_sizes, dtype=dtype)[:, None]


def dac_output(xt: torch.Tensor, input_scale: torch.Tensor, io: IOConfig, stream_seed: StreamSeed | None,
               bm_round: int, rows: torch.Tensor, in_sizes: list[int], valid_inputs: torch.Tensor,
               quantize: Callable = _quantize) -> torch.Tensor:
    """What the DACs put on the rows in bound-management round ``bm_round``: the scaled input quantized,
    clipped to +-inp_bound, plus input noise (stream INP_NOISE, element ``row * in_features + k``), zero on
    the padding. [T, B, n_max]."""
    x_dac = quantize(xt * input_scale, io.inp_step).clamp(-io.inp_bound, io.inp_bound)
    if io.inp_noise > 0 and stream_seed is not None:
        noise = normal_rows(stream_seed(Purpose.INP_NOISE, bm_round), rows, sum(in_sizes))
        tiles = torch.zeros_like(x_dac)
        start = 0
        for i, size in enumerate(in_sizes):
            tiles[i, :, :size] = noise[:, start:start + size]
            start += size
        x_dac = x_dac + io.inp_noise * tiles
    return x_dac * valid_inputs[:, None, :]


def _any_per_out_tile(over: torch.Tensor, out_tile: torch.Tensor, n_out_tiles: int) -> torch.Tensor:
    counts = torch.zeros(*over.shape[:2], n_out_tiles, dtype=torch.float32)
    counts.index_add_(2, out_tile, over.to(torch.float32))
    return counts > 0


def _per_output_normals(seed: int, rows: torch.Tensor, n_tiles: int, out_features: int) -> torch.Tensor:
    """Normals of element (row * n_tiles + i) * out + c for each row id, returned as [T, B, out]."""
    return normal_rows(seed, rows, n_tiles * out_features).reshape(len(rows), n_tiles, out_features).transpose(0, 1)


def analog_linear(
    x: torch.Tensor,
    tile_weight: torch.Tensor,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None,
    grid: TileGrid,
    io: IOConfig,
    stream_seed: StreamSeed | None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference forward of an analog linear layer on float32 CPU tensors.

    ``x`` [B, in]; ``tile_weight`` the tile weights (tile units), the whole [out, in] matrix (any float
    dtype; split per input tile for this call) or already split by :func:`split_weight`,
    [n_in_tiles, out, n_max]; ``out_scale`` [n_in_tiles, out] the digital factor of each input tile's
    partial output (weight scaling, drift compensation and ``io.out_scale``); ``bias`` [out] or None;
    ``row_ids`` the token index of each row in the noise streams (default 0..B-1).
    Rows of ``x`` holding NaN or Inf give NaN rows and do not affect other rows.
    """
    split_w = tile_weight if tile_weight.dim() == 3 else split_weight(tile_weight.to(torch.float32), grid)
    bad_rows = ~torch.isfinite(x).all(dim=-1)
    if bool(bad_rows.any()):
        x = x.masked_fill(bad_rows[:, None], 0.0)
    partial = tiled_mvm(split_input(x, grid), split_w, grid.in_sizes, grid.out_sizes, io, stream_seed, None, row_ids)
    y = (partial * out_scale[:, None, :]).sum(dim=0)
    if bias is not None:
        y = y + bias
    if bool(bad_rows.any()):
        y = y.masked_fill(bad_rows[:, None], float("nan"))
    return y

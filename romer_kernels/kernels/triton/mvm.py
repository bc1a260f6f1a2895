"""Triton backend of :func:`romer_kernels.kernels.reference.analog_linear` (same signature, same semantics)."""
from __future__ import annotations

from typing import Callable

import torch

from romer_kernels.config.analog import IOConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels.reference import StreamSeed, split_weight
from romer_kernels.kernels.triton._kernel import Blocks, bm_rounds, run
from romer_kernels.rng import Purpose

NOISE_PURPOSES = (Purpose.INP_NOISE, Purpose.W_NOISE, Purpose.OUT_NOISE)  # column order of a seed table


def round_seeds(stream_seed: StreamSeed, bm_round: int) -> list[int]:
    """The three per-MVM Philox keys (INP_NOISE, W_NOISE, OUT_NOISE) of one bound-management round."""
    return [int(stream_seed(purpose, bm_round)) for purpose in NOISE_PURPOSES]


def round_seed_fn(stream_seed: StreamSeed | None, device) -> Callable[[int], torch.Tensor] | None:
    """bm_round -> int64 [1, 3] keys on ``device`` for the kernel (None: no per-MVM noise)."""
    if stream_seed is None:
        return None

    def seeds(bm_round: int) -> torch.Tensor:
        return torch.tensor([round_seeds(stream_seed, bm_round)], dtype=torch.int64, device=device)
    return seeds


def stream_seed_table(stream_seeds: list[StreamSeed], io: IOConfig) -> torch.Tensor:
    """int64 [len(stream_seeds), 3, R]: keys of (INP_NOISE, W_NOISE, OUT_NOISE) for every round
    ``r < R = bm_rounds(io)`` of every chip (e.g. one per expert), computed on the host."""
    n_rounds = bm_rounds(io)
    return torch.tensor([[[int(fn(purpose, r)) for r in range(n_rounds)] for purpose in NOISE_PURPOSES]
                         for fn in stream_seeds], dtype=torch.int64).reshape(len(stream_seeds), 3, n_rounds)


def check_grid(split_w: torch.Tensor, out_scale: torch.Tensor, grid: TileGrid, in_features: int) -> None:
    n_tiles = len(grid.in_sizes)
    if in_features != grid.in_features:
        raise ValueError(f"x has {in_features} inputs, the tile grid {grid.in_features}")
    if tuple(split_w.shape[-3:]) != (n_tiles, grid.out_features, max(grid.in_sizes)):
        raise ValueError(f"split weights of shape {tuple(split_w.shape)} do not fit the grid "
                         f"({n_tiles}, {grid.out_features}, {max(grid.in_sizes)})")
    if tuple(out_scale.shape[-2:]) != (n_tiles, grid.out_features):
        raise ValueError(f"out_scale of shape {tuple(out_scale.shape)} does not fit ({n_tiles}, {grid.out_features})")


def analog_linear_triton(
    x: torch.Tensor,
    tile_weight: torch.Tensor,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None,
    grid: TileGrid,
    io: IOConfig,
    stream_seed: StreamSeed | None,
    row_ids: torch.Tensor | None = None,
    *,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``reference.analog_linear`` on the Triton kernel: ``x`` [B, in] -> [B, out] float32 on x's device.

    ``tile_weight``: the whole [out, in] tile weights (split per input tile for this call: the kernel reads
    a split layout) or their split [n_in_tiles, out, n_max]; ``out_scale`` [n_in_tiles, out], ``bias``
    [out] or None, ``stream_seed(purpose, bm_round)`` the per-MVM Philox keys (None: no per-MVM noise),
    ``row_ids`` [B] token ids of the rows in the noise streams (default 0..B-1). The kernel takes |w| of
    the tile weights it loads. Every IOConfig setting is supported, iterative bound management included
    (one launch per round).
    """
    device = x.device
    x = x.detach().to(torch.float32).contiguous()
    if x.dim() != 2:
        raise ValueError(f"x must be [B, in], got shape {tuple(x.shape)}")
    split_w = tile_weight if tile_weight.dim() == 3 else split_weight(tile_weight.to(torch.float32), grid)
    check_grid(split_w, out_scale, grid, x.shape[1])
    batch = x.shape[0]
    rows = torch.arange(batch, device=device) if row_ids is None else row_ids.to(device=device, dtype=torch.int64)
    if rows.shape != (batch,):
        raise ValueError(f"row_ids must have one id per input vector ({batch}), got shape {tuple(rows.shape)}")
    w = split_w.detach().to(device=device, dtype=torch.float32).contiguous()[None]
    scale = out_scale.detach().to(device=device, dtype=torch.float32).contiguous()[None]
    b = None if bias is None else bias.detach().to(device=device, dtype=torch.float32).contiguous()
    return run(x, w, scale, grid, io, round_seed_fn(stream_seed, device), rows.contiguous(), bias=b,
               blocks=blocks or Blocks())

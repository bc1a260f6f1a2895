"""How a weight matrix is cut into crossbar tiles (aihwkit's ``get_split_sizes`` semantics).

A layer weight ``W[out, in]`` is cut into ``n_in`` input splits and ``n_out`` output splits whose sizes
differ by at most one (larger splits first). Tile ``(i, j)`` holds ``W[out_j, in_i]``; its outputs are
summed digitally over ``i`` and concatenated over ``j``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from romer_kernels.config.analog import MappingConfig


def get_split_sizes(size: int, split_max: int) -> list[int]:
    """Split ``size`` into the fewest parts of at most ``split_max``, as evenly as possible (0 = no split)."""
    if size <= 0:
        raise ValueError(f"cannot split a dimension of size {size}")
    if split_max <= 0:
        return [size]
    n_splits = -(-size // split_max)
    base, rest = divmod(size, n_splits)
    return [base + 1] * rest + [base] * (n_splits - rest)


@dataclass(frozen=True)
class TileGrid:
    """The tile partition of one ``[out_features, in_features]`` weight."""

    out_features: int
    in_features: int
    max_input_size: int
    max_output_size: int

    @property
    def in_sizes(self) -> list[int]:
        return get_split_sizes(self.in_features, self.max_input_size)

    @property
    def out_sizes(self) -> list[int]:
        return get_split_sizes(self.out_features, self.max_output_size)

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight on the grid."""
        return (self.out_features, self.in_features)

    @property
    def num_tiles(self) -> int:
        return len(self.in_sizes) * len(self.out_sizes)

    def in_slices(self) -> list[slice]:
        return _slices(self.in_sizes)

    def out_slices(self) -> list[slice]:
        return _slices(self.out_sizes)

    def tile_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """max |w| over each tile, broadcast back to ``w``'s shape."""
        out = torch.empty_like(w)
        for rows in self.out_slices():
            for cols in self.in_slices():
                out[rows, cols] = w[rows, cols].abs().amax()
        return out

    def column_absmax(self, w: torch.Tensor) -> torch.Tensor:
        """max |w| over each crossbar column (one output inside one tile), broadcast to ``w``'s shape.

        A crossbar column is one output row of ``W`` restricted to one input split.
        """
        out = torch.empty_like(w)
        for cols in self.in_slices():
            out[:, cols] = w[:, cols].abs().amax(dim=1, keepdim=True)
        return out


def _slices(sizes: list[int]) -> list[slice]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append(slice(start, start + size))
        start += size
    return bounds


# -- mapping digital weights onto the tiles (weight scaling) -----------------------------------------------
def input_tile_scales(w: torch.Tensor, grid: TileGrid, mapping: "MappingConfig") -> torch.Tensor:
    """Digital scale s of every crossbar column, one value per (input tile, output): [n_in_tiles, out].

    s = absmax / omega (1 where the absmax is 0) with the absmax over the crossbar column (columnwise) or
    over the whole tile; one reduction pass over ``w`` and no weight-sized temporaries."""
    if mapping.weight_scaling_omega <= 0:
        return torch.ones(len(grid.in_sizes), w.shape[0], dtype=w.dtype, device=w.device)
    absmax = torch.empty(len(grid.in_sizes), w.shape[0], dtype=w.dtype, device=w.device)
    for i, cols in enumerate(grid.in_slices()):
        low, high = torch.aminmax(w[:, cols], dim=1)
        torch.maximum(high, low.neg_(), out=absmax[i])     # max |w| (NaN propagates, as abs().amax())
    if not mapping.weight_scaling_columnwise:
        for rows in grid.out_slices():
            absmax[:, rows] = absmax[:, rows].amax(dim=1, keepdim=True)
    return torch.where(absmax > 0, absmax / mapping.weight_scaling_omega, torch.ones_like(absmax))


def mapped_target(w: torch.Tensor, grid: TileGrid, mapping: "MappingConfig",
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / s, s): the weights the tiles are programmed to (tile units) and the digital scale s of every
    crossbar column, [n_in_tiles, out]. Without weight scaling s = 1 and the target is ``w`` itself (no
    pass over the weight); with it, w / s is divided per input tile from the [n_in_tiles, out] scales, the
    same float32 divisions as with a weight-sized scale tensor, without making one, into ``out`` if given."""
    scales = input_tile_scales(w, grid, mapping)
    if mapping.weight_scaling_omega <= 0:
        return w, scales
    target = torch.empty_like(w) if out is None else out
    for i, cols in enumerate(grid.in_slices()):
        torch.div(w[:, cols], scales[i][:, None], out=target[:, cols])
    return target, scales


def per_input_tile(values: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Take one value per (input tile, output) from a tensor that is constant over each crossbar column."""
    return torch.stack([values[:, cols.start] for cols in grid.in_slices()])

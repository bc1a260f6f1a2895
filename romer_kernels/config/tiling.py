"""How a weight matrix is cut into crossbar tiles (aihwkit's ``get_split_sizes`` semantics).

A layer weight ``W[out, in]`` is cut into ``n_in`` input splits and ``n_out`` output splits whose sizes
differ by at most one (larger splits first). Tile ``(i, j)`` holds ``W[out_j, in_i]``; its outputs are
summed digitally over ``i`` and concatenated over ``j``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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

"""Philox4x32-10 in pure PyTorch: the reference stream every backend must reproduce.

The generator is the textbook Random123 Philox4x32-10, exactly as Triton's ``tl.randint4x`` uses it:
counter = (offset_lo, offset_hi, 0, 0), key = (seed_lo, seed_hi). Uniforms and normals follow Triton's
``uint_to_uniform_float`` and ``pair_uniform_to_normal`` (Box-Muller, cos then sin), so a Triton kernel
that calls ``tl.randn4x(seed, e // 4)`` and takes lane ``e % 4`` reproduces element ``e`` of
:func:`normal`.

Element layout (the contract shared with csrc/philox.h and the Triton kernels): element ``e`` of a
stream is lane ``e % 4`` of the Philox block at counter ``e // 4``. One block gives four 32-bit words,
hence four uniforms or four normals (two Box-Muller pairs: words (0, 1) and (2, 3)).

torch has no unsigned 32-bit multiply-high, so words are held in int64 and the 32x32->64 products are
split into 16-bit halves (every partial product stays below 2**49). This is slow (about 1e7 blocks/s)
and meant as the reference; the C++ extension is the fast path.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # multiplies word 0
PHILOX_M1 = 0xCD9E8D57  # multiplies word 2
PHILOX_W0 = 0x9E3779B9  # key bump, word 0
PHILOX_W1 = 0xBB67AE85  # key bump, word 1
PHILOX_ROUNDS = 10
# Triton's constants; both become float32 when they meet float32 tensors.
UINT_TO_UNIFORM = 4.6566127342e-10
TWO_PI = 6.283185307179586
SEED_MASK = (1 << 63) - 1  # seeds stay in int64 range so every backend can take them as signed ints


def _mulhilo(multiplier: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``multiplier * value`` for value in [0, 2**32), held in int64."""
    prod_lo = multiplier * (value & 0xFFFF)
    prod_hi = multiplier * (value >> 16)
    mid = prod_lo + ((prod_hi & 0xFFFF) << 16)
    return (prod_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """The four Philox4x32-10 words for each 64-bit ``counter`` (int64 tensor, >= 0) and ``seed``.

    Returns an int64 tensor of shape ``counter.shape + (4,)`` with values in [0, 2**32).
    """
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    counter = counter.to(torch.int64)
    if counter.numel() and int(counter.min()) < 0:
        raise ValueError("Philox counters must be non-negative")
    c0 = counter & MASK32
    c1 = counter >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(PHILOX_M1, c2)
        hi_a, lo_a = _mulhilo(PHILOX_M0, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def words_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: reinterpret as int32, fold negatives with ``~x``, scale."""
    folded = torch.where(words >= (1 << 31), MASK32 - words, words)
    return folded.to(torch.float32) * torch.tensor(UINT_TO_UNIFORM, dtype=torch.float32)


def uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal`` in float32: (r cos(theta), r sin(theta))."""
    u1 = torch.clamp_min(u1, 1e-7)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def _block_range(start: int, count: int) -> tuple[torch.Tensor, int]:
    if start < 0 or count < 0:
        raise ValueError(f"stream range must be non-negative, got start={start}, count={count}")
    first = start // 4
    last = (start + count + 3) // 4
    return torch.arange(first, last, dtype=torch.int64), start - 4 * first


def randint(seed: int, start: int, count: int) -> torch.Tensor:
    """Stream elements ``[start, start + count)`` as raw 32-bit words (int64 tensor)."""
    blocks, skip = _block_range(start, count)
    return philox4x32(seed, blocks).reshape(-1)[skip : skip + count]


def uniform(seed: int, start: int, count: int) -> torch.Tensor:
    """Stream elements ``[start, start + count)`` as float32 uniforms in [0, 1)."""
    return words_to_uniform(randint(seed, start, count))


def _block_normals(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """The four normals (randn4x lanes) of each Philox block, shape ``counters.shape + (4,)``."""
    u = words_to_uniform(philox4x32(seed, counters))
    n0, n1 = uniform_to_normal(u[..., 0], u[..., 1])
    n2, n3 = uniform_to_normal(u[..., 2], u[..., 3])
    return torch.stack((n0, n1, n2, n3), dim=-1)


def normal(seed: int, start: int, count: int) -> torch.Tensor:
    """Stream elements ``[start, start + count)`` as float32 standard normals (lane e % 4 of randn4x)."""
    blocks, skip = _block_range(start, count)
    return _block_normals(seed, blocks).reshape(-1)[skip : skip + count]


def normal_rows(seed: int, rows: torch.Tensor, row_len: int) -> torch.Tensor:
    """Normals of the rows ``rows`` of a row-major stream array with ``row_len`` columns.

    Element (r, c) is stream element ``r * row_len + c``; returns [len(rows), row_len]. Used where only
    some rows are needed (the tokens routed to one expert).
    """
    rows = rows.to(torch.int64).reshape(-1)
    if row_len <= 0:
        raise ValueError(f"row_len must be positive, got {row_len}")
    if row_len % 4 == 0:  # rows are whole Philox blocks
        per_row = row_len // 4
        counters = rows[:, None] * per_row + torch.arange(per_row)
        return _block_normals(seed, counters).reshape(len(rows), row_len)
    offsets = rows[:, None] * row_len + torch.arange(row_len)
    normals = _block_normals(seed, offsets // 4)
    return normals.gather(-1, (offsets % 4)[..., None]).squeeze(-1)

"""@triton.jit helpers shared by the analog kernels: Philox normals at a global element index, rounding.

Only interpreter-safe operations are used (no libdevice), so the same code runs on a GPU and under
``TRITON_INTERPRET=1``. Divisions and square roots that the reference computes in IEEE float32 use
``tl.math.div_rn`` / ``tl.math.sqrt_rn`` (a plain ``/`` or ``tl.sqrt`` may be approximate on a GPU).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

TWO_POW_23 = 8388608.0


@triton.jit
def normal_at(seed, e):
    """Standard normal of stream ``seed`` at int64 element index ``e`` (lane e % 4 of Philox block e // 4).

    Equals lane ``e % 4`` of ``tl.randn4x(seed, e // 4)``: only the Box-Muller pair the lane belongs to
    (words 0/1 or 2/3) is transformed.
    """
    block = e // 4
    lane = e % 4
    w0, w1, w2, w3 = tl.randint4x(seed, block)
    low = lane < 2
    u1 = uint_to_uniform_float(tl.where(low, w0, w2))
    u2 = uint_to_uniform_float(tl.where(low, w1, w3))
    n_cos, n_sin = pair_uniform_to_normal(u1, u2)
    return tl.where((lane % 2) == 0, n_cos, n_sin)


@triton.jit
def round_half_even(q):
    """Round float32 to the nearest integer, ties to even (``torch.round`` / ``rint``) without libdevice."""
    a = tl.abs(q)
    r = (a + 8388608.0) - 8388608.0
    r = tl.where(a < 8388608.0, r, a)   # |q| >= 2**23 is already an integer (and keeps inf/nan)
    return tl.where(q < 0, -r, r)


@triton.jit
def quantize(v, step):
    """The reference ``_quantize`` for a positive float32 ``step``: round(v / step) * step."""
    return round_half_even(tl.math.div_rn(v, step)) * step

"""Tiny Triton kernels that expose tl.randint4x / tl.rand / tl.rand4x / tl.randn4x to the RNG tests.

Run under the Triton interpreter (TRITON_INTERPRET=1, set in tests/conftest.py). Two kinds of kernel:

* block kernels take an array of Philox counters (int32 or int64) and write the four lanes of each block;
* element kernels take a stream range [start, start + n) and pick, for element e, lane e % 4 of block
  e // 4 -- the layout contract of romer_kernels.rng.philox, written the way a production kernel would.
"""
import triton
import triton.language as tl


@triton.jit
def randint4x_blocks_kernel(out_ptr, counters_ptr, seed, n_blocks, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_blocks
    counters = tl.load(counters_ptr + idx, mask=mask, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    tl.store(out_ptr + 4 * idx + 0, w0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * idx + 1, w1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * idx + 2, w2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + 4 * idx + 3, w3.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def rand4x_blocks_kernel(out_ptr, lane0_ptr, counters_ptr, seed, n_blocks, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_blocks
    counters = tl.load(counters_ptr + idx, mask=mask, other=0)
    u0, u1, u2, u3 = tl.rand4x(seed, counters)
    tl.store(out_ptr + 4 * idx + 0, u0, mask=mask)
    tl.store(out_ptr + 4 * idx + 1, u1, mask=mask)
    tl.store(out_ptr + 4 * idx + 2, u2, mask=mask)
    tl.store(out_ptr + 4 * idx + 3, u3, mask=mask)
    tl.store(lane0_ptr + idx, tl.rand(seed, counters), mask=mask)  # tl.rand is lane 0


@triton.jit
def randn4x_blocks_kernel(out_ptr, counters_ptr, seed, n_blocks, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_blocks
    counters = tl.load(counters_ptr + idx, mask=mask, other=0)
    n0, n1, n2, n3 = tl.randn4x(seed, counters)
    tl.store(out_ptr + 4 * idx + 0, n0, mask=mask)
    tl.store(out_ptr + 4 * idx + 1, n1, mask=mask)
    tl.store(out_ptr + 4 * idx + 2, n2, mask=mask)
    tl.store(out_ptr + 4 * idx + 3, n3, mask=mask)


@triton.jit
def _pick_lane(lane, v0, v1, v2, v3):
    return tl.where(lane == 0, v0, tl.where(lane == 1, v1, tl.where(lane == 2, v2, v3)))


@triton.jit
def uniform_elements_kernel(out_ptr, seed, start, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    e = idx.to(tl.int64) + start  # global element index, int64 so that e // 4 may exceed 2**32
    u0, u1, u2, u3 = tl.rand4x(seed, e // 4)
    tl.store(out_ptr + idx, _pick_lane(e % 4, u0, u1, u2, u3), mask=mask)


@triton.jit
def normal_elements_kernel(out_ptr, seed, start, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    e = idx.to(tl.int64) + start
    n0, n1, n2, n3 = tl.randn4x(seed, e // 4)
    tl.store(out_ptr + idx, _pick_lane(e % 4, n0, n1, n2, n3), mask=mask)

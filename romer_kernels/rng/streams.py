"""Keys of the random streams: which (seed, layer, purpose, counter) owns which Philox stream.

Every random number in the simulator is element ``e`` of the stream ``stream_seed(chip_seed, layer,
purpose, counter)`` (see :mod:`romer_kernels.rng.philox` for the element layout). The stream seed is a
splitmix64 chain over the four parts, folded to 63 bits so every backend can pass it as a signed int64
(Triton, C++ and CUDA all read it as ``(seed & 0xffffffff, seed >> 32)``). Element indices are global
coordinates of the thing the noise belongs to (weight row/column of the full layer, token/tile/column of
an output), never block sizes, thread counts or batch sizes.
"""
from __future__ import annotations

import enum
import hashlib

import torch

from romer_kernels.rng import philox

_U64 = (1 << 64) - 1


class Purpose(enum.IntEnum):
    """What a stream is used for. The integer codes are part of the documented key layout."""

    PROGRAM = 1          # programming noise, device slot d -> counter d
    DRIFT_NU = 2         # drift exponent, device slot d -> counter d
    READ = 3             # 1/f read noise; counter = device slot + 16 * drift call index
    OUT_NOISE = 4        # per-MVM output noise; counter = mvm_counter(call, round, readout)
    W_NOISE = 5          # per-MVM output-referred weight read noise; counter as OUT_NOISE
    INP_NOISE = 6        # per-MVM input (DAC) noise; counter as OUT_NOISE
    MULTIPLICATIVE = 7   # multiplicative part of Gaussian chip noise


def splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _U64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _U64
    return value ^ (value >> 31)


def mvm_counter(call_index: int, bm_round: int, readout: bool = False) -> int:
    """Counter of a per-MVM stream: forward call (or drift-readout call), bound-management round.

    Layout: ``call_index * 128 + readout * 64 + bm_round`` with ``bm_round < 64``; the readout MVMs of
    drift compensation thus never share noise with ordinary forwards.
    """
    if not 0 <= bm_round < 64:
        raise ValueError(f"bound-management round must be in [0, 64), got {bm_round}")
    return call_index * 128 + (64 if readout else 0) + bm_round


def layer_key(layer: int | str) -> int:
    """A stable 64-bit layer id: ints are taken as they are, strings (module names) are hashed."""
    if isinstance(layer, str):
        return int.from_bytes(hashlib.blake2b(layer.encode(), digest_size=8).digest(), "little")
    if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
        return layer & _U64
    raise ValueError(f"layer id must be a non-negative int or a module name, got {layer!r}")


def chip_key(chip_seed: int, layer: int | str) -> int:
    """The first half of the splitmix64 chain of :func:`stream_seed`: what (chip seed, layer) contribute.

    Kernels take this 64-bit key and finish the chain for their (purpose, counter) themselves.
    """
    if not isinstance(chip_seed, int) or isinstance(chip_seed, bool) or chip_seed < 0:
        raise ValueError(f"chip seed must be a non-negative int, got {chip_seed!r}")
    return splitmix64(splitmix64(chip_seed & _U64) ^ layer_key(layer))


def seed_from_key(key: int, purpose: Purpose, counter: int = 0) -> int:
    """The stream seed of (purpose, counter) under a :func:`chip_key`."""
    if counter < 0:
        raise ValueError(f"stream counter must be non-negative, got {counter}")
    h = splitmix64(key ^ int(purpose))
    h = splitmix64(h ^ (counter & _U64))
    return h & philox.SEED_MASK


def stream_seed(chip_seed: int, layer: int | str, purpose: Purpose, counter: int = 0) -> int:
    """The Philox key of one stream; see the module docstring and docs/analog-model.md."""
    return seed_from_key(chip_key(chip_seed, layer), purpose, counter)


class MvmStreams:
    """The per-MVM streams of one forward call (or one drift-compensation readout) of one chip.

    Callable as ``streams(purpose, bm_round) -> seed`` (what the reference kernel takes); the fused
    kernels take ``key``, ``call_index`` and ``readout`` and derive the same seeds themselves.
    """

    __slots__ = ("key", "call_index", "readout")

    def __init__(self, key: int, call_index: int, readout: bool = False) -> None:
        if call_index < 0:
            raise ValueError(f"call_index must be non-negative, got {call_index}")
        self.key = key
        self.call_index = call_index
        self.readout = readout

    def __call__(self, purpose: Purpose, bm_round: int) -> int:
        return seed_from_key(self.key, purpose, mvm_counter(self.call_index, bm_round, self.readout))

    def __repr__(self) -> str:
        return f"MvmStreams(key={self.key:#x}, call_index={self.call_index}, readout={self.readout})"


def _cpp_ops():
    try:
        from romer_kernels import _C  # noqa: PLC0415  (optional compiled extension)
    except ImportError:
        return None
    return _C


_BACKEND = "cpp" if _cpp_ops() is not None else "torch"


def rng_backend() -> str:
    """``"cpp"`` when the compiled generator is importable, else ``"torch"`` (same integers)."""
    return _BACKEND


def set_rng_backend(name: str) -> None:
    """Force ``"torch"`` (reference) or ``"cpp"``; raises if the C++ extension is not built."""
    global _BACKEND
    if name not in ("torch", "cpp"):
        raise ValueError(f"rng backend must be 'torch' or 'cpp', got {name!r}")
    if name == "cpp" and _cpp_ops() is None:
        raise RuntimeError("rng backend 'cpp' needs the compiled extension romer_kernels._C (run `make build`)")
    _BACKEND = name


def normal(seed: int, start: int, count: int) -> torch.Tensor:
    """Standard normals, elements ``[start, start+count)`` of stream ``seed`` (float32, CPU)."""
    if _BACKEND == "cpp":
        return _cpp_ops().philox_normal(seed, start, count)
    return philox.normal(seed, start, count)


def uniform(seed: int, start: int, count: int) -> torch.Tensor:
    """Uniforms in [0, 1), elements ``[start, start+count)`` of stream ``seed`` (float32, CPU)."""
    if _BACKEND == "cpp":
        return _cpp_ops().philox_uniform(seed, start, count)
    return philox.uniform(seed, start, count)


def normal_rows(seed: int, rows: torch.Tensor, row_len: int) -> torch.Tensor:
    """Rows ``rows`` of the row-major stream array with ``row_len`` columns, as [len(rows), row_len]."""
    if _BACKEND == "cpp" and hasattr(_cpp_ops(), "philox_normal_rows"):
        return _cpp_ops().philox_normal_rows(seed, rows.to(torch.int64).contiguous(), row_len)
    return philox.normal_rows(seed, rows, row_len)


def normal_like(seed: int, shape: tuple[int, ...] | torch.Size, start: int = 0) -> torch.Tensor:
    """Normals for a row-major array of ``shape`` whose element (i, j, ...) has index start + flat(i, j, ...)."""
    count = 1
    for size in shape:
        count *= int(size)
    return normal(seed, start, count).reshape(tuple(shape))

"""Which path a device noise model takes: the fused C++ kernels or the torch reference.

The fused kernels (``romer_kernels._C.noise_*``, csrc/kernels/device_noise.cpp) compute a whole
``program`` or ``read`` of the PCM, HERMES and Gaussian models in one parallel pass, generating the
normals of every stream inline from its Philox key (``draw.seed(purpose, slot)``), without full-size
normal tensors. They follow the torch code operation by operation; with the same normals the results
differ only by log / pow / exp rounding (the kernels' float32 polynomials are within about 2 ulp, torch's
float32 vector maths within 1 ulp), a few ulp of the drift exponents and read weights. ``program`` and
``read`` of the PCM family take an optional ``out`` (a dropped earlier result) to write into. The normals themselves are the C++ Philox
stream's (:func:`romer_kernels.rng.normal`'s ``"cpp"`` backend).

``noise_backend()`` is ``"auto"`` by default: the C++ path when the extension is importable, the weights
are float32 CPU tensors, ``draw`` can give seeds (a :class:`~romer_kernels.noise.base.StreamDraw`) and
the RNG backend is ``"cpp"`` (forcing the torch RNG reference with ``set_rng_backend("torch")`` thus also
selects the torch noise path). ``"torch"`` always takes the reference path; ``"cpp"`` takes the C++ path
whenever the draw gives seeds (raising if the extension is missing).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from romer_kernels.noise.base import Draw, draw_seed
from romer_kernels.rng import Purpose, rng_backend

_BACKENDS = ("auto", "torch", "cpp")
_BACKEND = "auto"


def _ops():
    try:
        from romer_kernels import _C  # noqa: PLC0415  (optional compiled extension)
    except ImportError:
        return None
    return _C if hasattr(_C, "noise_pcm_program") else None


def noise_backend() -> str:
    return _BACKEND


def set_noise_backend(name: str) -> None:
    """``"auto"`` (default), ``"torch"`` (reference) or ``"cpp"`` (fused kernels wherever seeds exist)."""
    global _BACKEND
    if name not in _BACKENDS:
        raise ValueError(f"noise backend must be one of {_BACKENDS}, got {name!r}")
    if name == "cpp" and _ops() is None:
        raise RuntimeError("noise backend 'cpp' needs romer_kernels._C with the noise kernels (run `make build`)")
    _BACKEND = name


@contextlib.contextmanager
def using_noise_backend(name: str) -> Iterator[None]:
    """Temporarily set the noise backend (tests, benchmarks)."""
    previous = _BACKEND
    set_noise_backend(name)
    try:
        yield
    finally:
        set_noise_backend(previous)


def fused(w: torch.Tensor, draw: Draw):
    """``(ops, seed)`` when the C++ path applies to weights ``w`` with ``draw``, else None."""
    if _BACKEND == "torch" or w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2:
        return None
    seed = draw_seed(draw, w.shape)
    if seed is None:
        return None
    ops = _ops()
    if ops is None:
        if _BACKEND == "cpp":
            raise RuntimeError("noise backend 'cpp' needs romer_kernels._C with the noise kernels")
        return None
    if _BACKEND == "auto" and rng_backend() != "cpp":
        return None
    return ops, seed


def pair_seeds(seed: Callable[[Purpose, int], int], purpose: Purpose, needed: bool = True):
    """``(seed(purpose, 0), seed(purpose, 1))``, or None if not needed."""
    return (seed(purpose, 0), seed(purpose, 1)) if needed else None

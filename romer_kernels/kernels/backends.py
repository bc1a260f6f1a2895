"""Backend selection for the analog MVM: ``auto | cpp | triton | reference``.

Every backend computes :func:`romer_kernels.kernels.reference.analog_linear` with the same random streams:

* ``reference``: the pure-PyTorch reference (float32, CPU); slow, always available.
* ``cpp``: the fused C++ CPU kernel (``romer_kernels._C``, csrc/kernels/analog_mvm.cpp); needs the
  compiled extension and CPU tensors. Bit-identical to the reference on this machine (same float32
  operations; only the GEMM summation order and <= a few ulp of the normals may differ elsewhere).
* ``triton``: the fused Triton kernel (romer_kernels/kernels/triton); needs triton and CUDA tensors, or
  ``TRITON_INTERPRET=1`` for CPU tensors (the interpreter: for tests only, very slow).
* ``auto``: ``triton`` for CUDA tensors when triton is importable, else ``cpp`` when built, else
  ``reference``.

The default is ``auto``; change it with :func:`set_backend`, the ``use_backend`` context manager, or the
``ROMER_BACKEND`` environment variable; a layer can also pin its own (``AnalogMatrix.backend``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch

from romer_kernels.config.analog import IOConfig
from romer_kernels.config.device_noise import GaussianNoiseConfig, PCMNoiseConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels import cpp, reference
from romer_kernels.rng import MvmStreams

BACKENDS = ("auto", "cpp", "triton", "reference")


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown MVM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_default = _check_name(os.environ.get("ROMER_BACKEND", "auto"))


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    if device.type != "cpu":
        return ["triton"] if triton_available() and device.type == "cuda" else []
    names = (["cpp"] if cpp.is_available() else []) + ["reference"]
    if triton_available() and triton_interpreter():  # the interpreter is the slowest of all on a CPU
        names.append("triton")
    return names


def supports_on_the_fly(config) -> bool:
    """Whether the Triton kernel can generate an ``AnalogConfig``'s chips on the fly (kernels/triton/program.py):
    no device noise, Gaussian, or PCM with a sigma polynomial of at most 4 coefficients."""
    noise = config.noise
    return (noise is None or type(noise) is GaussianNoiseConfig
            or (type(noise) is PCMNoiseConfig and len(noise.prog_coeff) <= 4))


def get_backend() -> str:
    """The process-wide default backend name (possibly ``auto``)."""
    return _default


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``auto | cpp | triton | reference``)."""
    global _default
    _default = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` runs the block with another default backend."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(name: str | None = None, device: torch.device | str = "cpu") -> str:
    """The concrete backend for ``name`` (None = the default) on ``device``; a clear error if it cannot run."""
    name = _check_name(get_backend() if name is None else name)
    device = torch.device(device)
    if device.type == "cpu" and (name == "reference" or (name in ("auto", "cpp") and cpp.is_available())):
        return "cpp" if name == "auto" else name  # the per-call fast path (every forward resolves its backend)
    available = available_backends(device)
    if name == "auto":
        if device.type == "cuda" and "triton" in available:
            return "triton"
        for candidate in ("cpp", "reference"):
            if candidate in available:
                return candidate
        raise RuntimeError(f"no MVM backend can run on {device}: the CUDA path needs triton (pip install triton)")
    if name in available:
        return name
    if name == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"the 'cpp' backend runs on CPU tensors only, got {device}; use 'triton' or 'auto'")
        raise RuntimeError("the 'cpp' backend needs the compiled extension romer_kernels._C with the analog MVM "
                           "kernel: build it with `make build` (pip install --no-build-isolation -e .)")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("the 'triton' backend needs triton (pip install triton==3.9.0)")
        raise RuntimeError(f"the 'triton' backend needs CUDA tensors, got {device}; set TRITON_INTERPRET=1 before "
                           "importing triton to run it in the (slow) interpreter on CPU tensors")
    raise RuntimeError(f"the 'reference' backend runs on CPU tensors only, got {device}")


def analog_linear(
    x: torch.Tensor,
    tile_weight: torch.Tensor,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None,
    grid: TileGrid,
    io: IOConfig,
    streams: MvmStreams | None,
    row_ids: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The analog forward ``x [B, in] -> [B, out]`` on the chosen backend (see the reference for the
    arguments); ``tile_weight`` is the chip's whole [out, in] state (float32, bfloat16 or float16), read
    in place by the C++ kernel. Every backend gives the reference's result for the same streams."""
    name = resolve_backend(backend, x.device)
    if name == "cpp":
        return cpp.analog_linear_cpp(x, tile_weight, out_scale, bias, grid, io, streams, row_ids)
    if name == "triton":
        from romer_kernels.kernels.triton import analog_linear_triton  # noqa: PLC0415  (needs triton)
        return analog_linear_triton(x, tile_weight, out_scale, bias, grid, io, streams, row_ids)
    return reference.analog_linear(x, tile_weight, out_scale, bias, grid, io, streams, row_ids)


def readout_column_mean(
    tile_weight: torch.Tensor,
    grid: TileGrid,
    io: IOConfig,
    streams: MvmStreams | None,
    probes: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Drift-compensation readout [T, out]: the mean over each input tile's one-hot probes of |tile output|.

    ``tile_weight`` [out, in] in tile units; ``probes`` [n_max, in]: row j holds a 1 at column j of every
    input tile that has one (the one-hot vectors of all tiles at once, as layer inputs)."""
    name = resolve_backend(backend, probes.device)
    if name == "cpp":
        if not (io.inp_noise > 0 and streams is not None):
            return cpp.probe_mean_cpp(probes, tile_weight, grid, io, streams)
        y = cpp.tiled_mvm_cpp(probes, tile_weight, grid, io, streams)  # noisy inputs are not one-hot
    else:  # the readout runs on the CPU reference for the triton backend too
        y = reference.tiled_mvm(reference.split_input(probes, grid),
                                reference.split_weight(tile_weight.to(torch.float32), grid),
                                grid.in_sizes, grid.out_sizes, io, streams)
    return probe_column_mean(y, grid)


def probe_column_mean(partial: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[T, out]: mean over each input tile's own probes (rows b < in_sizes[t]) of |partial[t, b, :]|, from
    the per-tile outputs [T, n_max, out] of the one-hot probes."""
    sizes = torch.tensor(grid.in_sizes, device=partial.device)
    valid = (torch.arange(partial.shape[1], device=partial.device)[None, :] < sizes[:, None]).to(partial.dtype)
    return (partial.abs() * valid[:, :, None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)

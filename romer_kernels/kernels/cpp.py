"""The C++ CPU backend: the fused analog tiled MVM of csrc/kernels/analog_mvm.cpp.

Same arguments and result as :func:`romer_kernels.kernels.reference.analog_linear`, except that the
per-MVM noise is given as an :class:`~romer_kernels.rng.MvmStreams` (chip key + call index), from which
the kernel derives the reference's stream seeds itself. Inputs are float32 CPU tensors.
"""
from __future__ import annotations

import functools

import torch

from romer_kernels.config.analog import MAX_BM_ROUNDS, IOConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.rng import MvmStreams

_NOISE_MANAGEMENT = {"abs_max": 0, "constant": 1, "none": 2}
OUTPUT_LAYER, OUTPUT_PARTIAL, OUTPUT_PROBE_MEAN = 0, 1, 2  # what the kernel returns (csrc/kernels/analog_mvm.h)


@functools.lru_cache(maxsize=1)
def _load():
    try:
        from romer_kernels import _C  # noqa: PLC0415  (optional compiled extension)
    except ImportError:
        return None
    return _C if hasattr(_C, "analog_mvm") else None


def extension():
    """The compiled module if it has the MVM kernel, else None."""
    return _load()


def is_available() -> bool:
    return extension() is not None


@functools.lru_cache(maxsize=64)
def mvm_io(io: IOConfig):
    """The kernel's view of an IOConfig (built once per config)."""
    return extension().MvmIO(
        is_perfect=io.is_perfect,
        noise_management=_NOISE_MANAGEMENT[io.noise_management],
        nm_thres=io.nm_thres,
        inp_step=io.inp_step,
        inp_bound=io.inp_bound,
        inp_noise=io.inp_noise,
        out_step=io.out_step,
        out_bound=io.out_bound,
        out_noise=io.out_noise,
        w_noise=io.w_noise,
        w_noise_pcm=io.w_noise_type == "pcm_read",
        ir_drop=io.ir_drop,
        ir_drop_g_ratio=io.ir_drop_g_ratio,
        iterative=io.bound_management == "iterative" and io.out_bound > 0,
        bm_test_negative=io.bm_test_negative_bound,
        max_bm_factor=float(io.max_bm_factor),
        max_bm_res=io.max_bm_res,
        inp_step_exact=io.inp_step,
        max_rounds=MAX_BM_ROUNDS,
    )


def _streams_args(streams: MvmStreams | None) -> tuple[int | None, int, bool]:
    if streams is None:
        return None, 0, False
    if not isinstance(streams, MvmStreams):
        raise TypeError("the C++ backend needs the per-MVM noise as romer_kernels.rng.MvmStreams (chip key and call "
                        f"index), got {type(streams).__name__}")
    return streams.key, streams.call_index, streams.readout


def analog_linear_cpp(
    x: torch.Tensor,
    tile_weight: torch.Tensor,
    out_scale: torch.Tensor,
    bias: torch.Tensor | None,
    grid: TileGrid,
    io: IOConfig,
    streams: MvmStreams | None,
    row_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused CPU forward of an analog linear layer: ``x [B, in] -> [B, out]`` (see the reference).
    ``tile_weight``: the whole [out, in] tile weights, read in place (float32; a bfloat16 / float16 state is
    upcast for the call), or their split [T, out, n_max]."""
    key, call_index, readout = _streams_args(streams)
    return extension().analog_mvm(
        x.contiguous(), tile_weight.contiguous(), None, out_scale.contiguous(),
        None if bias is None else bias.contiguous(), row_ids, grid.in_sizes, grid.out_sizes, mvm_io(io), key,
        call_index, readout, False, OUTPUT_LAYER)


def tiled_mvm_cpp(
    x: torch.Tensor,
    tile_weight: torch.Tensor,
    grid: TileGrid,
    io: IOConfig,
    streams: MvmStreams | None,
    row_ids: torch.Tensor | None = None,
    probes: bool = False,
) -> torch.Tensor:
    """Per-input-tile outputs ``z * scale * r`` [T, B, out] of ``x [B, in]`` (the reference's ``tiled_mvm``
    of ``split_input(x)``); ``tile_weight``: the whole [out, in] weight or its split. ``probes``: row j of every tile's slice is zero except at position j (the
    drift-compensation readout), which replaces the GEMMs by exact element-wise products."""
    key, call_index, readout = _streams_args(streams)
    return extension().analog_mvm(
        x.contiguous(), tile_weight.contiguous(), None, None, None, row_ids, grid.in_sizes, grid.out_sizes, mvm_io(io),
        key, call_index, readout, probes, OUTPUT_PARTIAL)


def probe_mean_cpp(probes: torch.Tensor, weight: torch.Tensor, grid: TileGrid, io: IOConfig,
                   streams: MvmStreams | None) -> torch.Tensor:
    """The drift-compensation readout [T, out]: mean over tile t's one-hot probes (rows j < in_sizes[t] of
    ``probes``) of |tile output|, without materialising the per-probe outputs. ``weight``: the whole tile
    weight [out, in] (read in place) or its split [T, out, n_max]."""
    key, call_index, readout = _streams_args(streams)
    return extension().analog_mvm(
        probes.contiguous(), weight.contiguous(), None, None, None, None, grid.in_sizes, grid.out_sizes, mvm_io(io),
        key, call_index, readout, True, OUTPUT_PROBE_MEAN)

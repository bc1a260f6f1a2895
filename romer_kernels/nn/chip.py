"""The chip behind one analog layer: mapping, programming, drift, and drift compensation.

``LayerChip`` owns everything that is fixed once a layer is programmed with a seed: the tile grid, the
weight scaling, the programmed weights and drift exponents, and the drift-compensation baseline. It
produces the two tensors the MVM kernels need: the weights on the tiles (tile units) and the digital
scale of every input tile's partial output.
"""
from __future__ import annotations

import inspect
import sys

import torch

from romer_kernels.config.analog import AnalogConfig, MappingConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels.backends import readout_column_mean
from romer_kernels.noise import build_noise_model
from romer_kernels.noise.base import ProgrammedWeights, StreamDraw
from romer_kernels.rng import MvmStreams, Purpose, chip_key, stream_seed

READ_SLOTS = 16  # READ stream counter = device slot + READ_SLOTS * drift call index


# -- reuse of result memory -----------------------------------------------------------------------------
# Re-programming a chip (Monte Carlo over seeds) or drifting it again makes new results of the same shape
# as the ones it drops: a 2048x2048 PCM layer gets 48 MB of programmed weights and drift exponents per
# program() and 16 MB per read, and faulting in fresh memory for them was about a sixth of the fused
# kernels' time. So the chip hands the dropped results back to the noise model as output buffers (the
# ``out`` keyword of PCMNoiseModel.program / .read; models without it get nothing). A tensor is handed
# back only when provably nobody else can see it: the chip held the only Python reference to it (and to
# its ProgrammedWeights), no other tensor (view) shares its memory, and nothing in C++ holds it -- all
# compared against a fresh tensor held the same way, so the check does not depend on the Python version.
# Whoever keeps ``chip.programmed`` (or its tensors) thus always keeps an untouched copy. The values never
# depend on the buffers. Cost: a drifted chip keeps its last read result (one weight-sized tensor) for
# the next drift.
_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _holds(t: torch.Tensor) -> tuple:
    """What refers to ``t`` as seen from here and to its memory (Python references, C++ references,
    tensors on the storage)."""
    return (sys.getrefcount(t), t._use_count(), _USE_COUNT(t.untyped_storage()._cdata))


def _holds_via(t):
    return _holds(t)


def _fresh_holds() -> tuple:
    fresh = torch.empty(1)          # one name, as the caller's tensor has
    return _holds_via(fresh)


def _unshared(t: torch.Tensor | None) -> bool:
    """``t`` is referenced only by the caller's one name (or attribute), its memory by ``t`` alone."""
    if _USE_COUNT is None or t is None or t.requires_grad or t._base is not None:
        return False
    return _holds(t) == _fresh_holds()


def _refcount_via(x) -> int:
    return sys.getrefcount(x)


def _unshared_programmed(p: ProgrammedWeights | None) -> bool:
    """The dropped ``p`` (held by one local name of the caller) and its tensors are nobody else's."""
    if p is None or type(p) is not ProgrammedWeights:
        return False
    fresh = ProgrammedWeights(torch.empty(1), torch.empty(1))   # one name, as the caller's ``p`` has
    if sys.getrefcount(p) != _refcount_via(fresh):
        return False
    return _unshared(p.weights) and (p.drift_nu is None or _unshared(p.drift_nu))


def _takes_out(method) -> bool:
    try:
        return "out" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def input_tile_scales(w: torch.Tensor, grid: TileGrid, mapping: MappingConfig) -> torch.Tensor:
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


def mapped_target(w: torch.Tensor, grid: TileGrid, mapping: MappingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(w / s, s): the weights the tiles are programmed to (tile units) and the digital scale s of every
    crossbar column, [n_in_tiles, out]. Without weight scaling s = 1 and the target is ``w`` itself (no
    pass over the weight); with it, w / s is divided per input tile from the [n_in_tiles, out] scales, the
    same float32 divisions as with a weight-sized scale tensor, without making one."""
    scales = input_tile_scales(w, grid, mapping)
    if mapping.weight_scaling_omega <= 0:
        return w, scales
    target = torch.empty_like(w)
    for i, cols in enumerate(grid.in_slices()):
        torch.div(w[:, cols], scales[i][:, None], out=target[:, cols])
    return target, scales


def per_input_tile(values: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """Take one value per (input tile, output) from a tensor that is constant over each crossbar column."""
    return torch.stack([values[:, cols.start] for cols in grid.in_slices()])


class LayerChip:
    """Programmed state of one analog layer. All tensors are float32 on the CPU or the layer's device."""

    def __init__(self, config: AnalogConfig, out_features: int, in_features: int, layer_id: int | str):
        self.config = config
        self.layer_id = layer_id
        self.grid = TileGrid(out_features, in_features, config.tile.max_input_size, config.tile.max_output_size)
        self.noise_model = None if config.noise is None else build_noise_model(config.noise)
        self.seed: int | None = None
        self.programmed: ProgrammedWeights | None = None
        self.scales: torch.Tensor | None = None      # [n_in_tiles, out] weight scaling s
        self.baseline: torch.Tensor | None = None    # [n_in_tiles, out] drift-compensation readout at t=0
        self.drift_calls = 0
        self._key: tuple[int, int] | None = None     # (seed, chip_key) of the per-MVM streams
        self._probes: torch.Tensor | None = None     # one-hot readout inputs [n_max, in]
        self._read_buffer: torch.Tensor | None = None  # the last read result, reused by the next read
        model = self.noise_model
        self._program_out = model is not None and _takes_out(model.program)
        self._read_out = model is not None and _takes_out(model.read)

    # -- random streams -------------------------------------------------------------------------
    def _draw(self, shape: torch.Size, drift_index: int | None = None) -> StreamDraw:
        """``draw(purpose, slot)`` gives the normals, ``draw.seed(purpose, slot)`` the stream key (fused kernels)."""
        def seed(purpose: Purpose, slot: int) -> int:
            counter = slot if drift_index is None else slot + READ_SLOTS * drift_index
            return stream_seed(self.seed, self.layer_id, purpose, counter)
        return StreamDraw(seed, shape)

    def mvm_stream(self, call_index: int, readout: bool = False) -> MvmStreams:
        """The per-MVM streams of one forward call (or one drift-compensation readout)."""
        if self._key is None or self._key[0] != self.seed:
            self._key = (self.seed, chip_key(self.seed, self.layer_id))
        return MvmStreams(self._key[1], call_index, readout)

    # -- programming and drift ------------------------------------------------------------------
    def program(self, weight: torch.Tensor, seed: int, mvm_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Program the digital ``weight`` with chip ``seed``; returns (tile weights [out, in] in tile units,
        out scales [n_in_tiles, out]). The tile weights are the chip's own state: read them, never write."""
        self.seed = seed
        self.drift_calls = 0
        target, self.scales = mapped_target(weight.detach().to(torch.float32), self.grid, self.config.mapping)
        old, self.programmed = self.programmed, None
        if self.noise_model is None:
            self.programmed = ProgrammedWeights(target.clone())  # never alias the digital weight
        elif self._program_out and _unshared_programmed(old):
            self.programmed = self.noise_model.program(target, self.grid, self._draw(target.shape), out=old)
        else:
            old = None
            self.programmed = self.noise_model.program(target, self.grid, self._draw(target.shape))
        del old
        self.baseline = None
        weights = self.programmed.weights
        if self.config.drift_compensation.kind != "none":
            self.baseline = self.readout(weights, mvm_noise)
        return weights, self._out_scale(weights, mvm_noise)

    def drift(self, t_inference: float, mvm_noise: bool, drift_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``t_inference`` seconds after programming, with fresh read noise; returns as program()."""
        if self.programmed is None:
            raise RuntimeError("drift needs a programmed chip: call program first")
        if not t_inference >= 0 or t_inference == float("inf"):
            raise ValueError(f"t_inference must be a finite time in seconds >= 0, got {t_inference}")
        index = self.drift_calls if drift_index is None else drift_index
        self.drift_calls = index + 1
        reusable = False
        if self.noise_model is None:
            weights = self.programmed.weights
        else:
            draw = self._draw(self.programmed.weights.shape, drift_index=index)
            buffer, self._read_buffer = self._read_buffer, None
            if self._read_out and _unshared(buffer):
                weights = self.noise_model.read(self.programmed, float(t_inference), self.grid, draw, out=buffer)
            else:
                weights = self.noise_model.read(self.programmed, float(t_inference), self.grid, draw)
            del buffer
            reusable = self._read_out and self._foreign(weights)
        if reusable and _unshared(weights):
            # Kept for the next read, which writes into it only if by then nobody else holds it (the
            # AnalogMatrix drops its reference before drifting again).
            self._read_buffer = weights
        return weights, self._out_scale(weights, mvm_noise, readout_index=index + 1)

    def _foreign(self, t: torch.Tensor) -> bool:
        """``t`` shares no memory with the programmed state (a read may return the programmed weights)."""
        ptr = t.untyped_storage().data_ptr()
        held = [self.programmed.weights, self.programmed.drift_nu]
        return all(h is None or h.untyped_storage().data_ptr() != ptr for h in held)

    # -- drift compensation ---------------------------------------------------------------------
    def readout(self, tile_weight: torch.Tensor, mvm_noise: bool, readout_index: int = 0) -> torch.Tensor:
        """aihwkit's compensation readout: mean |output| of one-hot inputs through each tile's periphery.

        Returns [n_in_tiles, out]: per tile (global) or per crossbar column (per_column), clamped at 1e-4.
        """
        grid = self.grid
        if self._probes is None:
            # Probe j of every input tile is the one-hot vector e_j of that tile: as one input row of the
            # layer, row j holds a 1 at column j of each tile that has one.
            self._probes = torch.zeros(max(grid.in_sizes), grid.in_features)
            for cols in grid.in_slices():
                size = cols.stop - cols.start
                self._probes[torch.arange(size), cols.start + torch.arange(size)] = 1.0
        seeds = self.mvm_stream(readout_index, readout=True) if mvm_noise else None
        column_mean = readout_column_mean(tile_weight, grid, self.config.io, seeds, self._probes)  # [T, out]
        if self.config.drift_compensation.kind == "per_column":
            return column_mean.clamp_min(1e-4)
        tile_mean = torch.empty_like(column_mean)
        for rows in grid.out_slices():
            tile_mean[:, rows] = column_mean[:, rows].mean(dim=1, keepdim=True)
        return tile_mean.clamp_min(1e-4)

    def _out_scale(self, tile_weight: torch.Tensor, mvm_noise: bool, readout_index: int = 0) -> torch.Tensor:
        scale = self.scales * self.config.io.out_scale
        if self.baseline is not None and readout_index > 0:
            scale = scale * (self.baseline / self.readout(tile_weight, mvm_noise, readout_index))
        return scale

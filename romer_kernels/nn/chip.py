"""The chip behind one analog matrix: mapping, programming, drift, and drift compensation.

A programmed chip is a pure function of (digital weights, chip seed, layer id, time, config): every random
number comes from the keyed Philox streams. So ``LayerChip`` keeps only what its MVM reads:

* ``state`` -- the one weight-sized tensor, ``[out, in]`` in tile units and ``config.state_dtype``: the
  programmed weights W_P after :meth:`LayerChip.program`, the read (drifted, read-noisy) weights after
  :meth:`LayerChip.drift`. The chip owns it and writes it in place at every program and drift; callers get
  it as a read-only view by contract (``snapshot()`` gives a copy that later calls never touch).
* small per-column vectors ``[n_in_tiles, out]`` float32: the drift-compensation baseline and the digital
  scale of every input tile's partial output (``out_scale``: weight scaling x compensation x io.out_scale).
  The weight scaling itself is recomputed from the digital weights when needed (one reduction pass).

Drift exponents, programming noise and ReRAM target conductances are never stored: a drift draws them
again from the digital weights and the programming streams (same values, see romer_kernels/noise/base.py).
A second drift of the same programming first re-creates W_P in ``state`` (the programming streams again),
then reads it. Temporaries while programming or drifting: the target ``w / s`` (when weight scaling is on,
or the digital weights are not float32) and, for a bfloat16/float16 state, one float32 working copy.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.tiling import TileGrid, mapped_target
from romer_kernels.kernels.backends import probe_column_mean, readout_column_mean
from romer_kernels.noise import build_noise_model
from romer_kernels.noise.base import ProgrammedWeights, StreamDraw
from romer_kernels.rng import MvmStreams, Purpose, chip_key, stream_seed

READ_SLOTS = 16  # READ stream counter = device slot + READ_SLOTS * drift call index
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ChipScratch:
    """Float32 working memory for programming and drifting chips: the float32 copy of a bfloat16 digital
    weight, the mapped target ``w / s``, and the float32 working copy of a bfloat16 / float16 state.

    Owned here, one per process (``SCRATCH``), grown to the largest matrix seen and reused by every chip:
    a fresh temporary per matrix left the allocator holding freed memory it did not give back (+1.3 bytes
    of RSS per parameter after programming real OLMoE layers with rasch2023). Holds at most three float32
    copies of the largest matrix; ``release()`` frees them. A view it hands out is valid until the next
    ``get`` of the same slot: chips use them within one program / drift call and keep none."""

    SLOTS = ("weight", "target", "work")

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: tuple[int, ...]) -> torch.Tensor:
        if slot not in self.SLOTS:
            raise ValueError(f"unknown scratch slot {slot!r}; slots: {', '.join(self.SLOTS)}")
        size = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(slot, None)  # free the smaller one before growing
            buffer = self._buffers[slot] = torch.empty(size, dtype=torch.float32)
        return buffer[:size].view(shape)

    def release(self) -> None:
        self._buffers.clear()

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers.values())


SCRATCH = ChipScratch()


def compensation_readout(column_mean: torch.Tensor, grid: TileGrid, kind: str) -> torch.Tensor:
    """The readout value per crossbar column (per_column) or per tile (global) from the mean |output| of
    each column [T, out], clamped at 1e-4 as aihwkit does."""
    if kind == "per_column":
        return column_mean.clamp_min(1e-4)
    tile_mean = torch.empty_like(column_mean)
    for rows in grid.out_slices():
        tile_mean[:, rows] = column_mean[:, rows].mean(dim=1, keepdim=True)
    return tile_mean.clamp_min(1e-4)


@functools.lru_cache(maxsize=16)
def readout_probes(in_sizes: tuple[int, ...]) -> torch.Tensor:
    """One-hot readout inputs [n_max, in] of a tile geometry: row j holds a 1 at column j of every input
    tile that has one. Shared (read-only) by every chip of that geometry, not held per chip."""
    probes = torch.zeros(max(in_sizes), sum(in_sizes))
    start = 0
    for size in in_sizes:
        probes[torch.arange(size), start + torch.arange(size)] = 1.0
        start += size
    return probes


class LayerChip:
    """Programmed state of one analog matrix (see the module docstring for what it holds and why)."""

    def __init__(self, config: AnalogConfig, out_features: int, in_features: int, layer_id: int | str):
        self.config = config
        self.layer_id = layer_id
        self.grid = TileGrid(out_features, in_features, config.tile.max_input_size, config.tile.max_output_size)
        self.noise_model = None if config.noise is None else build_noise_model(config.noise)
        self.state_dtype = STATE_DTYPES[config.state_dtype]
        self.seed: int | None = None
        self.state: torch.Tensor | None = None       # [out, in] tile units: owned by the chip, written in place
        self.state_is_programmed = False             # state holds W_P (not yet read at any time)
        self.baseline: torch.Tensor | None = None    # [n_in_tiles, out] drift-compensation readout at t=0
        self.out_scale: torch.Tensor | None = None   # [n_in_tiles, out] digital factor of each partial output
        self.drift_calls = 0
        self.version = 0                             # bumped whenever state / out_scale change (device caches)
        self._key: tuple[int, int] | None = None     # (seed, chip_key) of the per-MVM streams

    def set_config(self, config: AnalogConfig) -> None:
        """Take another configuration of the same tiling (e.g. other noise scales): the chip must be
        programmed again; its state tensor is kept (and overwritten then) when its dtype stays."""
        grid = TileGrid(self.grid.out_features, self.grid.in_features, config.tile.max_input_size,
                        config.tile.max_output_size)
        if (grid.in_sizes, grid.out_sizes) != (self.grid.in_sizes, self.grid.out_sizes):
            raise ValueError(f"{self.layer_id!r}: the new configuration tiles the matrix differently "
                             f"({config.tile.max_input_size}x{config.tile.max_output_size} tiles); convert the model "
                             "again to change the tile size")
        self.config = config
        self.noise_model = None if config.noise is None else build_noise_model(config.noise)
        self.state_dtype = STATE_DTYPES[config.state_dtype]
        self.seed = None
        self.state_is_programmed = False
        self.baseline = self.out_scale = None
        self.drift_calls = 0
        self.version += 1

    # -- random streams -------------------------------------------------------------------------
    def _draw(self, drift_index: int | None = None) -> StreamDraw:
        """Normals / stream keys of (purpose, slot). The READ streams of drift call k are slots
        ``slot + READ_SLOTS * k``; every other purpose has the programming's streams, so that a read can
        draw the drift exponents (DRIFT_NU) of its programming again."""
        def seed(purpose: Purpose, slot: int) -> int:
            counter = slot if drift_index is None or purpose != Purpose.READ else slot + READ_SLOTS * drift_index
            return stream_seed(self.seed, self.layer_id, purpose, counter)
        return StreamDraw(seed, self.grid.shape)

    def mvm_stream(self, call_index: int, readout: bool = False) -> MvmStreams:
        """The per-MVM streams of one forward call (or one drift-compensation readout)."""
        if self._key is None or self._key[0] != self.seed:
            self._key = (self.seed, chip_key(self.seed, self.layer_id))
        return MvmStreams(self._key[1], call_index, readout)

    # -- the state tensor -----------------------------------------------------------------------
    def _working_buffer(self) -> torch.Tensor:
        """Where program/read write their float32 result: the state itself for a float32 state (allocated
        once, then reused), else a temporary that :meth:`_store` rounds into the state."""
        shape = self.grid.shape
        if self.state is None or tuple(self.state.shape) != shape or self.state.dtype != self.state_dtype:
            self.state = torch.empty(shape, dtype=self.state_dtype)
        if self.state_dtype == torch.float32:
            return self.state
        return SCRATCH.get("work", shape)

    def _store(self, work: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Put ``result`` (float32) into the state; returns the state's values in float32 (``work``)."""
        if result is not work:
            work.copy_(result)
        if work is not self.state:
            self.state.copy_(work)
            work.copy_(self.state)  # the rounded values, which the MVM and the readout see
        self.version += 1
        return work

    def _programmed_into(self, work: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """W_P of ``target`` (this chip's seed) written into ``work``."""
        if self.noise_model is None:
            return work.copy_(target)
        return self.noise_model.program(target, self.grid, self._draw(), out=work, with_drift_exponents=False).weights

    def _target(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w / s, s) of the digital weight in float32 (scratch memory where a copy or a division is needed)."""
        weight = weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
            weight = SCRATCH.get("weight", self.grid.shape).copy_(weight)
        out = SCRATCH.get("target", self.grid.shape) if self.config.mapping.weight_scaling_omega > 0 else None
        return mapped_target(weight, self.grid, self.config.mapping, out=out)

    def snapshot(self) -> torch.Tensor:
        """A copy of the state that later program/drift calls do not change."""
        if self.state is None:
            raise RuntimeError("the chip is not programmed")
        return self.state.clone()

    # -- programming and drift ------------------------------------------------------------------
    def program(self, weight: torch.Tensor, seed: int, mvm_noise: bool) -> None:
        """Program the digital ``weight`` with chip ``seed``: ``state`` = W_P, baseline readout, out_scale."""
        self.seed = seed
        self.drift_calls = 0
        target, scales = self._target(weight)
        work = self._working_buffer()
        values = self._store(work, self._programmed_into(work, target))
        self.state_is_programmed = True
        self.baseline = None
        if self.config.drift_compensation.kind != "none":
            self.baseline = self.readout(values, mvm_noise)
        self.out_scale = self._out_scale(values, scales, mvm_noise)

    def drift(self, weight: torch.Tensor, t_inference: float, mvm_noise: bool, drift_index: int | None = None) -> None:
        """``state`` = the weights ``t_inference`` seconds after programming, with the read noise of drift
        call ``drift_index`` (default: the next one); the compensation readout updates ``out_scale``.
        ``weight`` must be the digital weight the chip was programmed with."""
        if self.seed is None or self.state is None:
            raise RuntimeError("drift needs a programmed chip: call program first")
        if not t_inference >= 0 or t_inference == float("inf"):
            raise ValueError(f"t_inference must be a finite time in seconds >= 0, got {t_inference}")
        index = self.drift_calls if drift_index is None else drift_index
        self.drift_calls = index + 1
        target, scales = self._target(weight)
        if self.noise_model is None:
            values = self.state if self.state.dtype == torch.float32 else self.state.float()
        else:
            work = self._working_buffer()
            if work is not self.state or not self.state_is_programmed:
                programmed = self._programmed_into(work, target)  # W_P again, from the programming streams
                if programmed is not work:
                    work.copy_(programmed)
            result = self.noise_model.read(ProgrammedWeights(work), float(t_inference), self.grid,
                                           self._draw(drift_index=index), out=work, w_target=target)
            values = self._store(work, result)
            self.state_is_programmed = False
        self.out_scale = self._out_scale(values, scales, mvm_noise, readout_index=index + 1)
        self.version += 1

    # -- drift compensation ---------------------------------------------------------------------
    def readout(self, tile_weight: torch.Tensor, mvm_noise: bool, readout_index: int = 0) -> torch.Tensor:
        """aihwkit's compensation readout: mean |output| of one-hot inputs through each tile's periphery.

        Returns [n_in_tiles, out]: per tile (global) or per crossbar column (per_column), clamped at 1e-4.
        """
        grid = self.grid
        seeds = self.mvm_stream(readout_index, readout=True) if mvm_noise else None
        probes = readout_probes(tuple(grid.in_sizes))
        column_mean = readout_column_mean(tile_weight, grid, self.config.io, seeds, probes)  # [T, out]
        return compensation_readout(column_mean, grid, self.config.drift_compensation.kind)

    def _out_scale(self, tile_weight: torch.Tensor, scales: torch.Tensor, mvm_noise: bool,
                   readout_index: int = 0) -> torch.Tensor:
        scale = scales * self.config.io.out_scale
        if self.baseline is not None and readout_index > 0:
            scale = scale * (self.baseline / self.readout(tile_weight, mvm_noise, readout_index))
        return scale


class OnTheFlyChip:
    """A chip with no weight-sized tensor at all: the Triton kernel generates its weights from the digital
    weights and the chip's streams inside every MVM (programming noise, and after a drift the read step:
    re-conversion, drift exponents drawn again, 1/f read noise; romer_kernels/kernels/triton/program.py).

    It holds only [n_in_tiles, out] vectors: the per-column scales of the programming plan, the
    re-conversion scales of the read step, the compensation baseline and ``out_scale``. Same interface as
    ``LayerChip`` (``state`` is None). The readout runs the same kernel on one-hot probes. Supported device
    models: none, Gaussian and PCM (the on-the-fly programming's); others raise NotImplementedError.
    Results equal ``LayerChip``'s within float rounding (Triton's ln / exp / normals vs the C++ ones).
    """

    state = None
    state_is_programmed = False

    def __init__(self, config: AnalogConfig, out_features: int, in_features: int, layer_id: int | str):
        self.config = config
        self.layer_id = layer_id
        self.grid = TileGrid(out_features, in_features, config.tile.max_input_size, config.tile.max_output_size)
        self.seed: int | None = None
        self.drift_calls = 0
        self.version = 0
        self.baseline: torch.Tensor | None = None
        self.out_scale: torch.Tensor | None = None
        self._base_scale: torch.Tensor | None = None   # weight scaling x io.out_scale, [T, out]
        self._plan = None                              # kernels.triton Program, its weight left out
        self._key: tuple[int, int] | None = None

    mvm_stream = LayerChip.mvm_stream

    @staticmethod
    def _weight32(weight: torch.Tensor) -> torch.Tensor:
        return weight.detach().to(torch.float32).contiguous()   # programming: a temporary for non-float32

    def _with_weight(self, weight: torch.Tensor):
        """The plan with the digital weight as the kernel reads it: in place, in its own dtype."""
        return dataclasses.replace(self._plan, weight=weight.detach().contiguous())

    @property
    def plan(self):
        """The kernel's programming (and read) plan, without the digital weight (given at each call)."""
        return self._plan

    def _keep(self, plan) -> None:
        self._plan = dataclasses.replace(plan, weight=torch.empty(0, device=plan.weight.device))
        self.version += 1

    def program(self, weight: torch.Tensor, seed: int, mvm_noise: bool) -> None:
        from romer_kernels.kernels.triton.program import program_plan  # noqa: PLC0415  (needs triton)

        self.seed = seed
        self.drift_calls = 0
        plan, self._base_scale = program_plan(self._weight32(weight), self.config, seed, self.layer_id, self.grid)
        self._keep(plan)
        self.baseline = None
        if self.config.drift_compensation.kind != "none":
            self.baseline = self.readout(weight, mvm_noise)
        self.out_scale = self._base_scale

    def drift(self, weight: torch.Tensor, t_inference: float, mvm_noise: bool, drift_index: int | None = None) -> None:
        from romer_kernels.kernels.triton.program import with_read  # noqa: PLC0415

        if self._plan is None:
            raise RuntimeError("drift needs a programmed chip: call program first")
        if not t_inference >= 0 or t_inference == float("inf"):
            raise ValueError(f"t_inference must be a finite time in seconds >= 0, got {t_inference}")
        index = self.drift_calls if drift_index is None else drift_index
        self.drift_calls = index + 1
        self._keep(with_read(self._with_weight(weight), self.config, self.seed, self.layer_id, self.grid,
                             float(t_inference), index))
        scale = self._base_scale
        if self.baseline is not None:
            scale = scale * (self.baseline / self.readout(weight, mvm_noise, index + 1))
        self.out_scale = scale

    def readout(self, weight: torch.Tensor, mvm_noise: bool, readout_index: int = 0) -> torch.Tensor:
        """LayerChip.readout through the on-the-fly kernel: per-tile outputs of the one-hot probes."""
        from romer_kernels.kernels.triton.program import programmed_linear  # noqa: PLC0415

        grid = self.grid
        plan = self._with_weight(weight)
        device = plan.weight.device
        probes = readout_probes(tuple(grid.in_sizes)).to(device)
        seeds = self.mvm_stream(readout_index, readout=True) if mvm_noise else None
        ones = torch.ones(len(grid.in_sizes), grid.out_features, device=device)
        part = programmed_linear(probes, plan, ones, None, grid, self.config.io, seeds, partial=True)
        return compensation_readout(probe_column_mean(part, grid), grid, self.config.drift_compensation.kind)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, streams,
               row_ids: torch.Tensor | None) -> torch.Tensor:
        from romer_kernels.kernels.triton.program import programmed_linear  # noqa: PLC0415

        return programmed_linear(x, self._with_weight(weight), self.out_scale, bias, self.grid, self.config.io,
                                 streams, row_ids)

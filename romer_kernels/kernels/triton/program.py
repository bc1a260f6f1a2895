"""On-the-fly chip programming: the analog MVM kernel reads the DIGITAL weights and generates the
programmed tile weights in registers from the chip's PROGRAM streams; no programmed copy is stored.

It computes what ``AnalogMatrix.program(weight)`` followed by ``AnalogMatrix.matmul`` computes, i.e. the
chip right after programming (t = 0, before any ``drift`` call: no drift, no read noise, and no
drift-compensation factor, which ``LayerChip`` applies only to readouts after a drift). Supported device
models (``config.noise``):

* ``None``: the tile weights are the (weight-scaled) digital weights;
* ``GaussianNoiseConfig`` (noise/gaussian.py): ``t + sigma * w_max * xi1 + multiplicative_sigma * |t| * xi2``
  with ``t = w / s`` (weight scaling), ``w_max`` the crossbar column's abs-max of ``t``, xi1 / xi2 element
  ``r * in + c`` of the (PROGRAM, 0) / (MULTIPLICATIVE, 0) streams;
* ``PCMNoiseConfig`` (noise/pcm.py, exactly that class): the single-pair conductance model with the
  tile's conductance scale, each device's own (PROGRAM, slot 0 / 1) normals, sigma polynomial of at
  most 4 coefficients, clamp at 0, back to weights.

Other models (HERMES, ReRAM) raise NotImplementedError. The per-column / per-tile scales (weight
scaling, w_max, conductance scale) are small [n_in_tiles, out] tensors computed on the host.
"""
from __future__ import annotations

import torch

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.device_noise import GaussianNoiseConfig, PCMNoiseConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels.reference import StreamSeed
from romer_kernels.kernels.triton._kernel import Blocks, Program, run
from romer_kernels.kernels.triton.mvm import round_seed_fn
from romer_kernels.config.tiling import mapped_target, per_input_tile
from romer_kernels.noise.pcm import PCMNoiseModel, at_zero, conductance_scale
from romer_kernels.rng import Purpose
from romer_kernels.rng.streams import stream_seed as chip_stream_seed


def program_plan(weight: torch.Tensor, config: AnalogConfig, chip_seed: int, layer_id: int | str,
                 grid: TileGrid) -> tuple[Program, torch.Tensor]:
    """(kernel programming parameters, digital out_scale [T, out]) of ``weight`` on the chip
    ``(config, chip_seed, layer_id)``, as ``LayerChip.program`` would produce them."""
    w = weight.detach().to(torch.float32).contiguous()
    target, scales = mapped_target(w, grid, config.mapping)
    map_scale = scales.contiguous() if config.mapping.weight_scaling_omega > 0 else None
    out_scale = (scales * config.io.out_scale).contiguous()

    def seed(purpose: Purpose, slot: int) -> int:
        return chip_stream_seed(chip_seed, layer_id, purpose, slot)

    noise = config.noise
    if noise is None:
        plan = Program(mode=1, weight=w, pa=torch.ones_like(out_scale), map_scale=map_scale)
    elif type(noise) is GaussianNoiseConfig:
        w_max = per_input_tile(grid.column_absmax(target), grid).contiguous() if noise.sigma > 0 \
            else torch.ones_like(out_scale)
        plan = Program(mode=1, weight=w, pa=w_max, map_scale=map_scale, seed0=seed(Purpose.PROGRAM, 0),
                       seed1=seed(Purpose.MULTIPLICATIVE, 0), g_sigma=float(noise.sigma),
                       g_msig=float(noise.multiplicative_sigma))
    elif type(noise) is PCMNoiseConfig:
        model = PCMNoiseModel(noise)
        if len(model.prog_coeff) > 4:
            raise NotImplementedError("on-the-fly PCM programming supports sigma polynomials of at most 4 coefficients")
        s = per_input_tile(conductance_scale(target, grid, model.g_max), grid).contiguous()
        plan = Program(mode=2, weight=w, pa=s, map_scale=map_scale, seed0=seed(Purpose.PROGRAM, 0),
                       seed1=seed(Purpose.PROGRAM, 1), g_max=model.g_max, coeffs=model.prog_coeff,
                       p_ratio=model.g_max / model.prog_coeff_g_max_reference, p_scale=model.prog_noise_scale,
                       sigma_off=at_zero(model.programming_sigma))
    else:
        raise NotImplementedError(f"on-the-fly programming supports no device noise, 'gaussian' and 'pcm'; "
                                  f"got {noise.kind!r}")
    return plan, out_scale


def analog_linear_programmed_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: AnalogConfig,
    chip_seed: int,
    layer_id: int | str,
    stream_seed: StreamSeed | None,
    row_ids: torch.Tensor | None = None,
    *,
    blocks: Blocks | None = None,
) -> torch.Tensor:
    """``x`` [B, in] through the chip ``(config, chip_seed, layer_id)`` programmed with the digital
    ``weight`` [out, in], with the programmed weights generated inside the kernel.

    Equals ``analog_linear(x, m.chip.state, m.chip.out_scale, bias, m.chip.grid, config.io, stream_seed,
    row_ids)`` for ``m = AnalogMatrix(config, out, in, layer_id, chip_seed)`` after
    ``m.program(weight)``, up to float rounding; ``stream_seed`` is the per-MVM key function (e.g.
    ``m.chip.mvm_stream(call_index)``) or None (no per-MVM noise).
    """
    device = x.device
    out_features, in_features = weight.shape
    grid = TileGrid(out_features, in_features, config.tile.max_input_size, config.tile.max_output_size)
    x = x.detach().to(torch.float32).contiguous()
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [B, {in_features}], got shape {tuple(x.shape)}")
    plan, out_scale = program_plan(weight.to(device), config, chip_seed, layer_id, grid)
    batch = x.shape[0]
    rows = torch.arange(batch, device=device) if row_ids is None else row_ids.to(device=device, dtype=torch.int64)
    if rows.shape != (batch,):
        raise ValueError(f"row_ids must have one id per input vector ({batch}), got shape {tuple(rows.shape)}")
    b = None if bias is None else bias.detach().to(device=device, dtype=torch.float32).contiguous()
    seeds = round_seed_fn(stream_seed, device)
    placeholder = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=device)
    return run(x, placeholder, out_scale[None], grid, config.io, seeds, rows.contiguous(), bias=b,
               program=plan, blocks=blocks or Blocks())

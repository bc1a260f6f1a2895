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

``with_read`` adds the read step of a drift call (what ``LayerChip.drift`` writes into its state): for PCM
the re-conversion with the programmed tile's scale (one pre-pass kernel takes the abs-max of the
programmed weights, ``programmed_rowmax``), the drift exponents drawn again from the target and the
DRIFT_NU streams, ``(t / t_0)^-nu`` and the 1/f read noise; for Gaussian ``read_sigma * w_max(W_P) * xi``.
``romer_kernels.nn.chip.OnTheFlyChip`` drives the whole chip life cycle this way (the compensation
readout runs the same kernel on one-hot probes, ``programmed_linear(..., partial=True)``), so a chip on
the GPU is its seed plus [n_in_tiles, out] vectors.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.device_noise import GaussianNoiseConfig, PCMNoiseConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels.reference import StreamSeed
from romer_kernels.kernels.triton._kernel import Blocks, Program, programmed_rowmax, run
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


# -- the read step: drift and read noise at time t, on the fly ------------------------------------------
READ_SLOTS = 16  # READ stream counter = slot + READ_SLOTS * drift call index (as romer_kernels.nn.chip)
# Order of the float32 constants of the PCM read (rp_ptr in _kernel._pcm_read).
READ_PARAMS = ("mu_a", "mu_b", "mu_lo", "mu_hi", "sigma_a", "sigma_b", "sigma_lo", "sigma_hi", "mu_off",
               "sigma_nu_off", "drift_scale", "ln_t_ratio", "q_exponent", "q_floor", "q_numerator", "q_cap",
               "read_noise_scale", "time_factor")


def _per_row_of_out_tile(per_row: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """[T, out] row values -> the max over each output tile's rows, broadcast back to [T, out]."""
    result = torch.empty_like(per_row)
    for rows in grid.out_slices():
        result[:, rows] = per_row[:, rows].amax(dim=1, keepdim=True)
    return result


def with_read(plan: Program, config: AnalogConfig, chip_seed: int, layer_id: int | str, grid: TileGrid,
              t_inference: float, drift_index: int) -> Program:
    """``plan`` (a programming plan of :func:`program_plan`) with the read step of drift call
    ``drift_index`` at ``t_inference`` seconds: what ``LayerChip.drift`` leaves in its state, generated
    inside the kernel. The scales of the programmed tiles (re-conversion for PCM, w_max for Gaussian read
    noise) come from one pre-pass over the programmed weights (:func:`programmed_rowmax`, no weight-sized
    output)."""
    noise = config.noise
    device = plan.weight.device

    def seed(purpose: Purpose, slot: int) -> int:
        return chip_stream_seed(chip_seed, layer_id, purpose, slot)

    read_slot = READ_SLOTS * drift_index
    if noise is None:
        return plan
    if type(noise) is GaussianNoiseConfig:
        if noise.read_sigma == 0.0:
            return plan
        w_max = programmed_rowmax(plan, grid)
        seeds = torch.tensor([0, 0, seed(Purpose.READ, read_slot), 0], dtype=torch.int64, device=device)
        return dataclasses.replace(plan, read=1, read_scale=(w_max * float(noise.read_sigma)).contiguous(),
                                   read_params=torch.zeros(1, device=device), read_seeds=seeds)
    model = PCMNoiseModel(noise)
    t = float(t_inference) + model.t_0
    time_factor = math.sqrt(math.log((t + model.t_read) / (2.0 * model.t_read)))
    tile_max = _per_row_of_out_tile(programmed_rowmax(plan, grid), grid)
    s_read = tile_max.clamp_min(1e-7).reciprocal().mul(model.g_max)        # noise/pcm.conductance_scale
    mu_off, sigma_nu_off = model.zero_target_drift_statistics()
    exponent, floor, numerator, cap = model.READ_Q[1]
    t_ratio = float(torch.tensor(t / model.t_0, dtype=torch.float32))
    values = dict(mu_a=model.NU_MU[1], mu_b=model.NU_MU[2], mu_lo=model.NU_MU[3], mu_hi=model.NU_MU[4],
                  sigma_a=model.NU_SIGMA[1], sigma_b=model.NU_SIGMA[2], sigma_lo=model.NU_SIGMA[3],
                  sigma_hi=model.NU_SIGMA[4], mu_off=mu_off, sigma_nu_off=sigma_nu_off,
                  drift_scale=model.drift_scale, ln_t_ratio=math.log(t_ratio), q_exponent=exponent, q_floor=floor,
                  q_numerator=numerator, q_cap=cap, read_noise_scale=model.read_noise_scale, time_factor=time_factor)
    params = torch.tensor([values[name] for name in READ_PARAMS], dtype=torch.float32, device=device)
    seeds = torch.tensor([seed(Purpose.DRIFT_NU, 0), seed(Purpose.DRIFT_NU, 1), seed(Purpose.READ, read_slot),
                          seed(Purpose.READ, 1 + read_slot)], dtype=torch.int64, device=device)
    return dataclasses.replace(plan, read=2, read_scale=s_read.contiguous(), read_params=params, read_seeds=seeds,
                               drifts=t > model.t_0 and model.drift_scale != 0.0,
                               read_noise=model.read_noise_scale != 0.0)


def programmed_linear(x: torch.Tensor, plan: Program, out_scale: torch.Tensor, bias: torch.Tensor | None,
                      grid: TileGrid, io, stream_seed: StreamSeed | None, row_ids: torch.Tensor | None = None, *,
                      partial: bool = False, blocks: Blocks | None = None) -> torch.Tensor:
    """``x`` [B, in] through a chip generated on the fly from ``plan`` with the digital scales
    ``out_scale`` [T, out] (``partial``: per-tile outputs [T, B, out], the compensation readout)."""
    device = x.device
    x = x.detach().to(torch.float32).contiguous()
    batch = x.shape[0]
    rows = torch.arange(batch, device=device) if row_ids is None else row_ids.to(device=device, dtype=torch.int64)
    if rows.shape != (batch,):
        raise ValueError(f"row_ids must have one id per input vector ({batch}), got shape {tuple(rows.shape)}")
    b = None if bias is None else bias.detach().to(device=device, dtype=torch.float32).contiguous()
    placeholder = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=device)
    return run(x, placeholder, out_scale.to(device=device, dtype=torch.float32).contiguous()[None], grid, io,
               round_seed_fn(stream_seed, device), rows.contiguous(), bias=b, program=plan,
               blocks=blocks or Blocks(), partial=partial)

"""Scale every random noise source of a configuration by one factor (the "noise scale" of sweeps).

``scale_noise(config, s)`` multiplies the standard deviation of every stochastic term: device
programming and read noise (``prog_noise_scale``, ``read_noise_scale``; ReRAM ``noise_scale``; Gaussian
``sigma``, ``multiplicative_sigma``, ``read_sigma``) and per-MVM noise (``out_noise``, ``w_noise``,
``inp_noise``). Deterministic effects stay as they are: DAC/ADC resolution and clipping, the mean drift
(its exponents' spread follows ``drift_scale``, which is not scaled), IR drop and weight scaling.
``s = 0`` keeps only the deterministic non-idealities; ``s = 1`` returns an equal config.
"""
from __future__ import annotations

import dataclasses

from romer_kernels.config._fields import check_number
from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.device_noise import (
    DeviceNoiseConfig,
    GaussianNoiseConfig,
    HermesNoiseConfig,
    PCMNoiseConfig,
    ReRamWan2022NoiseConfig,
)


def _scaled_device(noise: DeviceNoiseConfig | None, factor: float) -> DeviceNoiseConfig | None:
    if noise is None:
        return None
    if isinstance(noise, (PCMNoiseConfig, HermesNoiseConfig)):
        return dataclasses.replace(noise, prog_noise_scale=noise.prog_noise_scale * factor,
                                   read_noise_scale=noise.read_noise_scale * factor)
    if isinstance(noise, ReRamWan2022NoiseConfig):
        return dataclasses.replace(noise, noise_scale=noise.noise_scale * factor)
    if isinstance(noise, GaussianNoiseConfig):
        return dataclasses.replace(noise, sigma=noise.sigma * factor,
                                   multiplicative_sigma=noise.multiplicative_sigma * factor,
                                   read_sigma=noise.read_sigma * factor)
    raise ValueError(f"scale_noise does not know the device noise config {type(noise).__name__}")


def scale_noise(config: AnalogConfig, factor: float) -> AnalogConfig:
    """A copy of ``config`` with every noise standard deviation multiplied by ``factor`` (>= 0)."""
    check_number("scale_noise", "factor", factor, low=0)
    io = config.io
    io = dataclasses.replace(io, out_noise=io.out_noise * factor, w_noise=io.w_noise * factor,
                             inp_noise=io.inp_noise * factor)
    return config.replace(io=io, noise=_scaled_device(config.noise, factor))

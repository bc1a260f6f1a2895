"""Device noise models: programming noise, drift and read noise of the analog weights.

``build_noise_model(config)`` returns the model for a config from :mod:`romer_kernels.config.device_noise`:
PCM (aihwkit ``PCMLikeNoiseModel``), HERMES (aihwkit ``HermesNoiseModel``), ReRAM (aihwkit
``ReRamWan2022NoiseModel``) or this package's own Gaussian model. See docs/device-noise.md.
"""
from __future__ import annotations

from romer_kernels.config.device_noise import (
    DeviceNoiseConfig,
    GaussianNoiseConfig,
    HermesNoiseConfig,
    PCMNoiseConfig,
    ReRamWan2022NoiseConfig,
)
from romer_kernels.noise.base import DeviceNoiseModel, Draw, ProgrammedWeights
from romer_kernels.noise.gaussian import GaussianNoiseModel
from romer_kernels.noise.hermes import HermesNoiseModel
from romer_kernels.noise.pcm import PCMNoiseModel
from romer_kernels.noise.reram import ReRamWan2022NoiseModel

NOISE_MODELS: dict[type[DeviceNoiseConfig], type[DeviceNoiseModel]] = {
    PCMNoiseConfig: PCMNoiseModel,
    HermesNoiseConfig: HermesNoiseModel,
    ReRamWan2022NoiseConfig: ReRamWan2022NoiseModel,
    GaussianNoiseConfig: GaussianNoiseModel,
}


def build_noise_model(config: DeviceNoiseConfig) -> DeviceNoiseModel:
    """The device noise model described by ``config``."""
    model = NOISE_MODELS.get(type(config))
    if model is None:
        raise ValueError(f"no device noise model for {type(config).__name__}; "
                         f"known configs: {', '.join(cls.__name__ for cls in NOISE_MODELS)}")
    return model(config)


__all__ = [
    "DeviceNoiseModel", "Draw", "GaussianNoiseModel", "HermesNoiseModel", "NOISE_MODELS", "PCMNoiseModel",
    "ProgrammedWeights", "ReRamWan2022NoiseModel", "build_noise_model",
]

"""Configuration of the simulated analog hardware: dataclasses, presets, tile geometry."""
from romer_kernels.config.analog import (
    AnalogConfig,
    DriftCompensationConfig,
    IOConfig,
    MappingConfig,
    TileConfig,
    resolution_step,
)
from romer_kernels.config.device_noise import (
    GaussianNoiseConfig,
    HermesNoiseConfig,
    PCMNoiseConfig,
    ReRamWan2022NoiseConfig,
)
from romer_kernels.config.presets import PRESETS, preset, resolve_config
from romer_kernels.config.scaling import scale_noise
from romer_kernels.config.tiling import TileGrid, get_split_sizes

__all__ = [
    "AnalogConfig", "DriftCompensationConfig", "GaussianNoiseConfig", "HermesNoiseConfig", "IOConfig",
    "MappingConfig", "PCMNoiseConfig", "PRESETS", "ReRamWan2022NoiseConfig", "TileConfig", "TileGrid",
    "get_split_sizes", "preset", "resolution_step", "resolve_config", "scale_noise",
]

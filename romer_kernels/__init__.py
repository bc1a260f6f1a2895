"""romer_kernels: fast analog in-memory-computing simulation for Mixture-of-Experts language models."""
from romer_kernels.config import AnalogConfig, IOConfig, MappingConfig, TileConfig, preset, PRESETS
from romer_kernels.nn import (
    AnalogLinear,
    analog_layers,
    drift_analog_,
    program_analog_,
    reset_noise_counters,
    set_mvm_noise,
)

__version__ = "0.1.0"

__all__ = [
    "AnalogConfig", "AnalogLinear", "IOConfig", "MappingConfig", "PRESETS", "TileConfig", "analog_layers",
    "drift_analog_", "preset", "program_analog_", "reset_noise_counters", "set_mvm_noise",
]

"""Drop-in analog layers and model-level helpers."""
from romer_kernels.nn.analog_linear import AnalogLinear
from romer_kernels.nn.analog_matrix import AnalogMatrix
from romer_kernels.nn.base import AnalogModule
from romer_kernels.nn.model_helpers import (
    analog_layers,
    analog_matrices,
    chip_state_bytes,
    drift_analog_,
    program_analog_,
    reset_noise_counters,
    set_mvm_noise,
)

__all__ = ["AnalogLinear", "AnalogMatrix", "AnalogModule", "analog_layers", "analog_matrices", "chip_state_bytes", "drift_analog_", "program_analog_", "reset_noise_counters", "set_mvm_noise"]

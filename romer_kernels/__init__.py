"""romer_kernels: fast analog in-memory-computing simulation for Mixture-of-Experts language models.

The public names below are imported lazily, so that ``import romer_kernels.rng`` (used by kernels and
tests) does not pull in the whole package.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AnalogConfig": "romer_kernels.config",
    "IOConfig": "romer_kernels.config",
    "MappingConfig": "romer_kernels.config",
    "TileConfig": "romer_kernels.config",
    "PRESETS": "romer_kernels.config",
    "preset": "romer_kernels.config",
    "AnalogLinear": "romer_kernels.nn",
    "analog_layers": "romer_kernels.nn",
    "chip_state_bytes": "romer_kernels.nn",
    "estimate_memory": "romer_kernels.evaluation.memory",
    "drift_analog_": "romer_kernels.nn",
    "program_analog_": "romer_kernels.nn",
    "reset_noise_counters": "romer_kernels.nn",
    "set_mvm_noise": "romer_kernels.nn",
    "AnalogExperts": "romer_kernels.nn.analog_experts",
    "Placement": "romer_kernels.moe",
    "analogize_": "romer_kernels.moe",
    "trace_routing": "romer_kernels.moe",
    "save_analog": "romer_kernels.moe",
    "load_analog": "romer_kernels.moe",
    "scale_noise": "romer_kernels.config",
    "restore_digital_": "romer_kernels.moe",
    "placement_report": "romer_kernels.moe",
    "check_conversion": "romer_kernels.moe",
    "UnsupportedWeights": "romer_kernels.moe",
    "undo_methods_": "romer_kernels.methods",
    "SweepSettings": "romer_kernels.evaluation.runner",
    "Workload": "romer_kernels.evaluation.runner",
    "TrialRunner": "romer_kernels.evaluation.runner",
    "noise_sweep": "romer_kernels.evaluation.sweep",
    "compare_methods": "romer_kernels.evaluation.compare",
    "LocalExecutor": "romer_kernels.evaluation.executors",
    "RayExecutor": "romer_kernels.evaluation.executors",
    "load_model": "romer_kernels.models.loading",
    "load_corpus": "romer_kernels.data",
    "load_tokens": "romer_kernels.data",
    "evaluate": "romer_kernels.evaluation.lm_metrics",
    "task_accuracy": "romer_kernels.evaluation.tasks",
    "sensitivity_sweep": "romer_kernels.evaluation.sensitivity",
    "read_run": "romer_kernels.evaluation.results",
    "HWAConfig": "romer_kernels.config.hwa",
    "HWATrainSettings": "romer_kernels.methods.hwa",
    "hwa_train": "romer_kernels.evaluation.hwa",
    "hwa_training": "romer_kernels.nn.hwa",
    "nonideality_sweep": "romer_kernels.evaluation.nonideality",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'romer_kernels' has no attribute {name!r}")

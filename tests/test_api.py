"""The script path of the public API: top-level names, and AnalogConfig.replace with nested dicts."""
import dataclasses

import pytest

import romer_kernels
from romer_kernels import preset
from romer_kernels.config.device_noise import HermesNoiseConfig


def test_the_script_path_is_exported_at_the_top_level():
    for name in ("load_model", "load_corpus", "load_tokens", "evaluate", "analogize_", "noise_sweep",
                 "task_accuracy", "sensitivity_sweep", "read_run"):
        assert callable(getattr(romer_kernels, name)), name
    assert set(romer_kernels.__all__) >= {"load_model", "evaluate"}


def test_replace_takes_nested_dicts_and_validates_them():
    config = preset("rasch2023")
    assert config.replace(io={"out_noise": 0.02}).io == dataclasses.replace(config.io, out_noise=0.02)
    assert config.replace(noise={"prog_noise_scale": 1.5}).noise == dataclasses.replace(config.noise,
                                                                                         prog_noise_scale=1.5)
    assert config.replace(noise={"kind": "hermes"}).noise == HermesNoiseConfig()
    assert config.replace(drift_compensation={"kind": "none"}).drift_compensation.kind == "none"
    with pytest.raises(ValueError, match="IOConfig has no field"):
        config.replace(io={"bogus": 1})
    with pytest.raises(ValueError, match=r"IOConfig.out_noise must be in \[0, inf\]"):
        config.replace(io={"out_noise": -1})
    with pytest.raises(ValueError, match="does not take a dict"):
        config.replace(state_dtype={"x": 1})

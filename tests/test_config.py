"""Config validation, presets and JSON round trips."""
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from romer_kernels.config import (
    PRESETS,
    AnalogConfig,
    DriftCompensationConfig,
    IOConfig,
    MappingConfig,
    TileConfig,
    preset,
    resolve_config,
)

INVALID_FIELDS = [
    (TileConfig, "max_input_size", [-1, 1.5, "512", True]),
    (TileConfig, "max_output_size", [-3, None]),
    (IOConfig, "is_perfect", [1, "yes"]),
    (IOConfig, "inp_bound", [0.0, -1.0, math.inf, math.nan]),
    (IOConfig, "inp_res", [math.nan, "8bit"]),
    (IOConfig, "inp_noise", [-0.1, math.inf]),
    (IOConfig, "out_bound", [math.nan, None]),
    (IOConfig, "out_res", [math.inf]),
    (IOConfig, "out_noise", [-1e-3, "0.06"]),
    (IOConfig, "w_noise", [-0.5]),
    (IOConfig, "w_noise_type", ["gaussian", None]),
    (IOConfig, "noise_management", ["absmax", "ABS_MAX"]),
    (IOConfig, "nm_thres", [-1.0]),
    (IOConfig, "bound_management", ["shift", ""]),
    (IOConfig, "max_bm_factor", [0, 2.5, 2**60]),
    (IOConfig, "max_bm_res", [0.0, -0.25]),
    (IOConfig, "bm_test_negative_bound", [0]),
    (IOConfig, "ir_drop", [-1.0]),
    (IOConfig, "ir_drop_g_ratio", [0.0]),
    (IOConfig, "out_scale", [0.0, -2.0]),
    (MappingConfig, "weight_scaling_omega", [-1.0, math.nan]),
    (MappingConfig, "weight_scaling_columnwise", ["true"]),
    (DriftCompensationConfig, "kind", ["exact", None]),
]


@pytest.mark.parametrize("cls, name, bad_values", INVALID_FIELDS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_invalid_field_raises_a_clear_error(cls, name, bad_values):
    for bad in bad_values:
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}"):
            cls(**{name: bad})


def test_every_field_of_the_io_config_is_covered_by_the_invalid_list():
    import dataclasses

    covered = {(cls, name) for cls, name, _ in INVALID_FIELDS}
    for cls in (TileConfig, IOConfig, MappingConfig, DriftCompensationConfig):
        for field in dataclasses.fields(cls):
            assert (cls, field.name) in covered, f"{cls.__name__}.{field.name} has no invalid-value test"


def test_inconsistent_combinations_are_rejected():
    with pytest.raises(ValueError, match="w_noise_type"):
        IOConfig(w_noise=0.01)
    with pytest.raises(ValueError, match="weight_scaling_columnwise"):
        MappingConfig(weight_scaling_columnwise=True)
    with pytest.raises(ValueError, match="AnalogConfig.io"):
        AnalogConfig(io={"out_noise": 0.1})


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    config = preset(name)
    text = config.to_json()
    assert AnalogConfig.from_json(text) == config
    assert json.loads(text) == config.to_dict()


def test_preset_semantics():
    assert preset("ideal").is_ideal
    default = preset("aihwkit-default")
    assert default.io.inp_step == pytest.approx(2 / 126)
    assert default.io.out_step == pytest.approx(24 / 510)
    assert (default.tile.max_input_size, default.tile.max_output_size) == (512, 512)
    assert default.mapping.weight_scaling_omega == 0.0
    assert default.noise.kind == "pcm" and default.drift_compensation.kind == "global"
    rasch = preset("rasch2023")
    assert (rasch.io.inp_res, rasch.io.out_res, rasch.io.out_noise, rasch.io.w_noise) == (254, 254, 0.04, 0.0175)
    assert rasch.io.w_noise_type == "pcm_read" and rasch.mapping.weight_scaling_columnwise
    assert rasch.tile.max_output_size == 0
    light = preset("lightning-8bit")
    assert light.noise.drift_scale == 0 and light.noise.read_noise_scale == 0
    assert preset("gaussian-chip").noise.kind == "gaussian"


def test_unknown_names_and_keys_are_errors():
    with pytest.raises(ValueError, match="unknown preset 'aihwkit'"):
        preset("aihwkit")
    with pytest.raises(ValueError, match="IOConfig has no field"):
        AnalogConfig.from_dict({"io": {"out_nosie": 0.1}})
    with pytest.raises(ValueError, match="AnalogConfig has no part"):
        AnalogConfig.from_dict({"adc": {}})
    with pytest.raises(ValueError, match="config must be"):
        resolve_config(3)


@settings(max_examples=40, deadline=None)
@given(
    inp_res=st.one_of(st.just(0.0), st.floats(1e-3, 0.5), st.integers(2, 4096).map(float)),
    out_bound=st.floats(0.5, 100),
    out_noise=st.floats(0, 1),
    nm=st.sampled_from(["abs_max", "constant", "none"]),
    omega=st.floats(0, 4),
    max_in=st.integers(0, 2048),
)
def test_valid_configs_round_trip(inp_res, out_bound, out_noise, nm, omega, max_in):
    config = AnalogConfig(tile=TileConfig(max_input_size=max_in), io=IOConfig(inp_res=inp_res, out_bound=out_bound,
                          out_noise=out_noise, noise_management=nm), mapping=MappingConfig(weight_scaling_omega=omega))
    assert AnalogConfig.from_json(config.to_json()) == config

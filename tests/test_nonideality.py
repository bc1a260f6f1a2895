"""The per-nonideality split of a preset: each configuration has exactly its one nonideality."""
from __future__ import annotations

import dataclasses

import pytest

from romer_kernels.config import preset
from romer_kernels.evaluation.nonideality import nonideality_configs, nonideality_sweep
from romer_kernels.evaluation.runner import Workload

IO_FIELDS = ("inp_res", "inp_noise", "out_noise", "out_res", "out_bound", "w_noise", "ir_drop")


def _active(config) -> set[str]:
    """What a config switches on, by name."""
    on = {name for name in IO_FIELDS if getattr(config.io, name) > 0}
    if config.noise is not None:
        on |= {name for name in ("prog_noise_scale", "drift_scale", "read_noise_scale") if getattr(config.noise, name) > 0}
    return on


def test_rasch2023_is_taken_apart_one_nonideality_at_a_time():
    base = preset("rasch2023")
    configs = nonideality_configs(base)
    assert list(configs) == ["off", "dac", "input_noise", "output_noise", "adc", "programming", "drift", "read_noise",
                             "short_term_read", "ir_drop", "all"]
    expected = {"off": set(), "dac": {"inp_res"}, "input_noise": {"inp_noise"}, "output_noise": {"out_noise"},
                "adc": {"out_res", "out_bound"}, "programming": {"prog_noise_scale"}, "drift": {"drift_scale"},
                "read_noise": {"read_noise_scale"}, "short_term_read": {"w_noise"}, "ir_drop": {"ir_drop"}}
    for name, on in expected.items():
        label, config = configs[name]
        assert _active(config) == on, name
        assert config.tile == base.tile and config.mapping == base.mapping
    assert configs["all"][1] == base
    assert configs["input_noise"][1].io.inp_noise == base.io.out_noise  # compared at the output noise's level
    assert configs["drift"][1].drift_compensation == base.drift_compensation
    assert configs["programming"][1].drift_compensation.kind == "none"
    # every level is the preset's own
    assert configs["output_noise"][1].io.out_noise == base.io.out_noise
    assert configs["ir_drop"][1].io.ir_drop == base.io.ir_drop


def test_what_a_preset_lacks_is_left_out_and_other_devices_are_refused():
    configs = nonideality_configs(preset("aihwkit-default"))
    assert "ir_drop" not in configs and "short_term_read" not in configs and "adc" in configs
    with pytest.raises(ValueError, match="PCM-like device noise"):
        nonideality_configs(preset("rasch2023-hermes"))
    with pytest.raises(ValueError, match="perfect periphery"):
        nonideality_configs(preset("gaussian-chip"))


def test_the_sweep_reports_each_change_against_the_digital_tiles(tmp_path):
    base = preset("rasch2023")
    small = dataclasses.replace(base, io=dataclasses.replace(base.io, out_noise=0.4))
    rows = nonideality_sweep(Workload("tiny-olmoe"), small, tmp_path, seeds=(0, 1), max_windows=1)
    by_name = {row["name"]: row for row in rows}
    off = by_name["off"]
    assert off["ppl"] == pytest.approx(off["clean_ppl"], rel=1e-3)  # the tiled digital model is the digital model
    assert "change" not in off
    assert by_name["output_noise"]["change"] > by_name["dac"]["change"]  # 10x the preset's output noise hurts
    assert all(row["n"] == 2 for row in rows)

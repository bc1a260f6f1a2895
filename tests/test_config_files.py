"""Analog configs from JSON files and --set overrides: round trip, overrides, errors that name the field."""
from __future__ import annotations

import json

import pytest

from romer_kernels.cli.main import main
from romer_kernels.config.presets import PRESETS, config_label, load_config, preset


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_written_preset_loads_back_equal(name, tmp_path, capsys):
    path = tmp_path / f"{name}.json"
    assert main(["presets", name, "--out", str(path)]) == 0
    assert load_config(str(path)) == preset(name)
    assert config_label(str(path)) == name and config_label(name) == name


def test_overrides_change_exactly_the_named_fields(tmp_path):
    base = preset("rasch2023")
    config = load_config("rasch2023", ["io.out_noise=0.05", "noise.prog_noise_scale=1.5", "io.inp_res=0.01"])
    assert config.io.out_noise == 0.05 and config.io.inp_res == 0.01 and config.noise.prog_noise_scale == 1.5
    assert config.replace(io=base.io, noise=base.noise) == base
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    assert load_config(str(path)) == config


@pytest.mark.parametrize("override, message", [
    ("io.bogus=1", "io has no field 'bogus'; known: is_perfect"),
    ("nope.x=1", "no config part 'nope'"),
    ("io.out_noise", "must look like part.field=value"),
    ("io.out_noise=-1", r"IOConfig.out_noise must be in \[0, inf\], got -1"),
    ("io.out_noise=loud", "IOConfig.out_noise must be a finite number, got 'loud'"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("rasch2023", [override])


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'rasch'"):
        load_config("rasch")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"io": {"out_noise": 0.1}, "tiles": {}}))
    with pytest.raises(ValueError, match="bad.json: AnalogConfig has no part"):
        load_config(str(bad))


def test_the_cli_refuses_a_bad_config_before_loading_anything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["eval", "--model", "tiny-olmoe", "--set", "io.out_noise=-1", "--run-dir", str(run_dir)]) == 2
    assert "IOConfig.out_noise must be in" in capsys.readouterr().out
    assert not run_dir.exists()
    assert main(["presets", "--out", str(tmp_path / "x.json")]) != 0


def test_a_json_config_with_overrides_gives_the_sweep_of_the_same_python_config(tmp_path, capsys):
    import dataclasses

    from romer_kernels.evaluation.results import read_run
    from romer_kernels.evaluation.runner import SweepSettings, Workload
    from romer_kernels.evaluation.sweep import noise_sweep

    config_file = tmp_path / "chip.json"
    assert main(["presets", "rasch2023", "--out", str(config_file)]) == 0
    data = json.loads(config_file.read_text())
    data["io"]["out_res"] = 126                                      # an edit in the file ...
    config_file.write_text(json.dumps(data))
    assert main(["eval", "--model", "tiny-olmoe", "--preset", str(config_file), "--set", "io.out_noise=0.06",
                 "noise.prog_noise_scale=1.5", "--seeds", "2", "--scales", "1", "--windows", "2", "--tasks", "none",
                 "--run-dir", str(tmp_path / "cli")]) == 0          # ... and two on the command line
    base = preset("rasch2023")
    config = base.replace(io=dataclasses.replace(base.io, out_res=126, out_noise=0.06),
                          noise=dataclasses.replace(base.noise, prog_noise_scale=1.5))
    settings = SweepSettings(config, seeds=(0, 1), noise_scales=(1.0,), max_windows=2)
    noise_sweep(Workload("tiny-olmoe"), None, settings, tmp_path / "python", progress=False)
    cli, python = read_run(tmp_path / "cli"), read_run(tmp_path / "python")
    assert cli.fingerprint["config"] == python.fingerprint["config"] == config.to_dict()
    assert [row.metrics for row in cli.trials] == [row.metrics for row in python.trials]
    assert cli.trials[0].metrics["ppl"] != read_run(tmp_path / "python").clean["ppl"]


def test_reram_times_outside_its_fit_are_refused_before_anything_runs(tmp_path, capsys):
    from romer_kernels.evaluation.runner import SweepSettings

    run_dir = tmp_path / "run"
    assert main(["demo", "--preset", "rasch2023-reram", "--run-dir", str(run_dir)]) == 2    # default t = 1 h
    assert "fitted only at t = 1, 86400, 172800 s" in capsys.readouterr().out
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="use --times 1 86400 172800"):
        SweepSettings(preset("rasch2023-reram"), times=(1.0, 60.0))
    SweepSettings(preset("rasch2023-reram"), times=(1.0, 86400.0, 172800.0))  # the fitted ones are fine

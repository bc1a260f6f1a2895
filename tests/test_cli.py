"""The `romer` command line end to end, on the bundled tiny model with tiny settings."""
import json
import sqlite3

import pytest

from romer_kernels.cli.main import main
from romer_kernels.models.loading import bundled_models

FAST = ["--seeds", "2", "--scales", "1", "3", "--times", "3600", "--windows", "2", "--seq-len", "64",
        "--batch-size", "2", "--tasks", "none"]


def test_presets_and_errors(capsys):
    assert main(["presets"]) == 0
    assert "rasch2023" in capsys.readouterr().out
    assert main(["presets", "gaussian-chip"]) == 0
    assert json.loads(capsys.readouterr().out)["noise"]["kind"] == "gaussian"
    assert main(["eval", "--model", "no-such-model"]) == 2
    assert "no model 'no-such-model'" in capsys.readouterr().out
    assert main(["eval", "--model", "/nonexistent/folder"]) == 2


def test_backend_option_selects_or_explains(capsys, monkeypatch):
    from romer_kernels.kernels import backends  # noqa: PLC0415

    monkeypatch.setattr(backends, "_default", "auto")
    assert main(["--backend", "reference", "presets"]) == 0
    assert backends.get_backend() == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["--backend", "triton", "presets"]) == 2
    assert "triton" in capsys.readouterr().out


@pytest.mark.skipif(not bundled_models(), reason="no bundled model in this checkout")
def test_demo_writes_table_plot_and_resumable_results(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(run_dir), *FAST]) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "flip rate" in out
    assert (run_dir / "sweep.png").stat().st_size > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["noise_scale"] for row in summary["rows"]] == [1.0, 3.0]
    rows = sqlite3.connect(run_dir / "results.sqlite").execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    assert rows == 4
    assert main(["demo", "--run-dir", str(run_dir), *FAST]) == 0  # resumes: nothing left to run
    assert "0 trials run now" in capsys.readouterr().out


@pytest.mark.skipif(not bundled_models(), reason="no bundled model in this checkout")
def test_info_and_eval_on_a_local_text_file(tmp_path, capsys):
    model = bundled_models()[0]
    assert main(["info", "--model", model, "--preset", "rasch2023"]) == 0
    assert "lm_head" in capsys.readouterr().out
    text = tmp_path / "text.txt"
    text.write_text("The crossbar stores the weights of every expert as conductances. " * 60)
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps({"attention": False}))
    args = ["eval", "--model", model, "--data", str(text), "--placement", str(placement), "--preset", "gaussian-chip",
            "--run-dir", str(tmp_path / "eval"), *FAST]
    assert main(args) == 0
    assert (tmp_path / "eval" / "results.sqlite").exists()
    assert main(["eval", "--model", model, "--data", str(tmp_path / "missing.txt"), *FAST]) == 2


def test_compare_rejects_a_placement_file(tmp_path, capsys):
    assert main(["compare", "--placement", str(tmp_path / "p.json")]) == 2
    assert "sets the placement per variant" in capsys.readouterr().out


def test_train_tiny_hands_all_arguments_to_its_own_parser(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train-tiny", "--help"])
    assert done.value.code == 0
    assert "--arch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as failed:
        main(["train-tiny", "--arch", "tiny-mixtral"])
    assert failed.value.code == 2


@pytest.mark.parametrize("option, message", [
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--scales", "1", "-1"], "--scales must be finite and >= 0, got -1"),
    (["--windows", "-1"], "--windows must be at least 0"),
    (["--times", "-5"], "--times must be finite and >= 0"),
    (["--variants", "noisy", "romer-replace-rx"], "unknown variant 'romer-replace-rx'"),
])
def test_bad_sweep_options_are_refused_before_any_loading(option, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    command = "compare" if option[0] == "--variants" else "demo"
    assert main([command, *option, "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().out
    assert not run_dir.exists()


def test_times_take_units(capsys):
    from romer_kernels.cli.main import build_parser, seconds

    assert [seconds(t) for t in ("3600", "60s", "5min", "1h", "1d", "1y", "1e3")] == [
        3600.0, 60.0, 300.0, 3600.0, 86400.0, 365 * 86400.0, 1000.0]
    assert build_parser().parse_args(["demo", "--times", "1s", "1h", "1d", "1y"]).times == [
        1.0, 3600.0, 86400.0, 31536000.0]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--times", "1hour"])
    assert "is not a time" in capsys.readouterr().err


def test_a_model_that_is_nowhere_here_fails_at_once(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["eval", "--model", "nobody/no-such-model", "--run-dir", str(run_dir)]) == 2
    out = " ".join(capsys.readouterr().out.split())     # the console wraps long lines
    assert "not in the local Hugging Face cache (nothing is downloaded at run time" in out
    assert "romer eval:" not in out and not run_dir.exists()


def test_compare_shows_the_digital_share_and_says_when_a_method_did_nothing(tmp_path, capsys):
    assert main(["compare", "--variants", "noisy", "dense-digital", "romer-replace", "--seeds", "2", "--scales", "1",
                 "--windows", "1", "--calib-windows", "1", "--tasks", "none", "--run-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "digital" in out and "17.7 %" in out                     # lm_head of the all-analog placement
    assert "romer-replace: stage 1 replaced no expert" in out
    assert "PPL vs noisy" in out and "2 chip seed(s)" in out


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: tiny-olmoe)", "(default: 3)", "(default: 0.5 1.0 2.0 4.0)", "(default: test)",
                  "(default: 256)", "default 1h"):
        assert shown in text, shown
    for command in ("eval", "compare", "sensitivity", "info", "layers", "presets", "results"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: romer" in capsys.readouterr().out, command
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "romer-recal: ROMER stage 2" in " ".join(capsys.readouterr().out.split())


def test_default_run_folders_name_the_choices_the_fingerprint_keeps(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.json").write_text('{"digital": ["model.layers.0.self_attn", "model.layers.0.self_attn.*"]}')
    assert main(["demo", "--seeds", "1", "--scales", "1", "--windows", "1", "--tasks", "none"]) == 0
    assert main(["eval", "--model", "tiny-olmoe", "--seeds", "1", "--scales", "1", "--windows", "1",
                 "--placement", "keep.json"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "demo-w1-tasks-none", "eval-tiny-olmoe-rasch2023-placement-keep-w1"]


def test_compare_takes_placements_as_variants(tmp_path, capsys):
    assert main(["compare", "--variants", "noisy", "--analog", "experts", "attention,router", "--seeds", "1",
                 "--scales", "1", "--windows", "1", "--tasks", "none", "--run-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "only:experts" in out and "only:attention+router" in out
    from romer_kernels.evaluation.results import read_run

    shares = {row.trial.variant: row.metrics["digital_share"] for row in read_run(tmp_path / "c").trials}
    assert shares["noisy"] < shares["only:experts"] < 1 and shares["only:attention+router"] > shares["only:experts"]
    assert main(["compare", "--analog", "experts,attn", "--run-dir", str(tmp_path / "d")]) == 2
    assert "unknown module category 'attn'" in capsys.readouterr().out

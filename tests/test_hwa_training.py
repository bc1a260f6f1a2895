"""HWA fine-tuning end to end: save points, resume, the checkpoint in romer eval and in romer compare."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

import romer_kernels.methods.hwa as hwa_methods
from romer_kernels.cli.main import main
from romer_kernels.config import preset
from romer_kernels.config.hwa import HWAConfig
from romer_kernels.data.corpus import load_tokens
from romer_kernels.evaluation.results import read_run
from romer_kernels.methods.hwa import HWATrainSettings, batch_at, hwa_finetune_, lr_at, read_record
from romer_kernels.models.loading import load_model
from romer_kernels.nn import analog_layers

SETTINGS = HWATrainSettings(steps=4, batch_size=2, seq_len=32, warmup=1, save_every=2, lr=1e-3)


def _train(out_dir, settings=SETTINGS, hwa=HWAConfig()):
    model, tokenizer = load_model("tiny-olmoe")
    train_ids = load_tokens(tokenizer, "bundled", "train")
    run = hwa_finetune_(model, tokenizer, train_ids, preset("rasch2023"), out_dir, settings, hwa, source="tiny-olmoe",
                        progress=False)
    return model, run


def crashed_run(out_dir, monkeypatch, hwa=HWAConfig(), crash_step=3):
    """A run killed at step ``crash_step`` (after the save point before it), to be resumed."""
    original = hwa_methods.batch_at

    def crash(train_ids, step, settings):
        if step == crash_step:
            raise KeyboardInterrupt("killed")
        return original(train_ids, step, settings)

    with monkeypatch.context() as patch:
        patch.setattr(hwa_methods, "batch_at", crash)
        with pytest.raises(KeyboardInterrupt):
            _train(out_dir, hwa=hwa)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    straight, run = _train(tmp_path / "straight")
    assert run.steps == 4 and len(run.losses) == 4 and run.resumed_from == 0
    assert not list(analog_layers(straight))  # handed back digital
    base, _ = load_model("tiny-olmoe")
    assert any(not torch.equal(a, b) for a, b in zip(straight.parameters(), base.parameters()))

    crashed_run(tmp_path / "resumed", monkeypatch)
    state = torch.load(tmp_path / "resumed" / "model" / "hwa-state.pt", weights_only=True)
    assert state["step"] == 2  # the save point before the crash
    resumed, run = _train(tmp_path / "resumed")
    assert run.resumed_from == 2 and len(run.losses) == 4
    assert run.losses == torch.load(tmp_path / "straight" / "model" / "hwa-state.pt", weights_only=True)["losses"]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # a finished run called again trains nothing and hands back the trained weights
    again, run = _train(tmp_path / "resumed")
    assert run.resumed_from == 4 and all(torch.equal(a, b) for a, b in zip(again.parameters(), resumed.parameters()))
    record = read_record(tmp_path / "resumed" / "model")
    assert record["steps"] == 4 and record["seconds"] > 0


def test_another_setting_is_refused_in_the_same_folder(tmp_path):
    _train(tmp_path / "run", HWATrainSettings(steps=1, batch_size=1, seq_len=16, warmup=0))
    with pytest.raises(ValueError, match="other settings"):
        _train(tmp_path / "run", HWATrainSettings(steps=2, batch_size=1, seq_len=16, warmup=0))
    with pytest.raises(ValueError, match="other hwa"):
        _train(tmp_path / "run", HWATrainSettings(steps=1, batch_size=1, seq_len=16, warmup=0), HWAConfig(seed=1))


def test_batches_and_learning_rate_are_functions_of_the_step():
    ids = torch.arange(1000)
    assert torch.equal(batch_at(ids, 5, SETTINGS), batch_at(ids, 5, SETTINGS))
    assert not torch.equal(batch_at(ids, 5, SETTINGS), batch_at(ids, 6, SETTINGS))
    settings = HWATrainSettings(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, settings) == pytest.approx(0.1) and lr_at(9, settings) == pytest.approx(1.0)
    assert lr_at(99, settings) == pytest.approx(0.1, abs=1e-3)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        batch_at(torch.arange(10), 0, SETTINGS)
    with pytest.raises(ValueError, match="HWATrainSettings.lr"):
        HWATrainSettings(lr=-1e-3)


def test_hwa_train_cli_checkpoint_eval_and_compare(tmp_path, capsys):
    run_dir = tmp_path / "hwa"
    fast_eval = ["--seeds", "2", "--windows", "2"]
    assert main(["hwa-train", "--steps", "2", "--train-batch-size", "2", "--train-seq-len", "32", "--warmup", "1",
                 "--run-dir", str(run_dir), *fast_eval]) == 0
    out = capsys.readouterr().out
    assert "before (base)" in out and "after HWA" in out
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 2 and report["before"]["noisy"][0]["n"] == 2
    assert report["before"]["clean_ppl"] != report["after"]["clean_ppl"]
    # the paired change: exp of the mean per-chip log-PPL difference, from the stored trials
    nll = {side: {row.trial.seed: row.metrics["nll"] for row in read_run(run_dir / side).trials}
           for side in ("before", "after")}
    (change,) = report["change"]
    assert change["n"] == 2 and change["noise_scale"] == 1.0
    assert change["change"] == pytest.approx(math.expm1(statistics.fmean(
        nll["after"][seed] - nll["before"][seed] for seed in (0, 1))), rel=1e-12)
    assert change["low"] < change["change"] < change["high"]
    assert "change (paired)" in out
    assert (run_dir / "loss.png").stat().st_size > 5_000
    # the checkpoint is a model folder romer eval loads; its numbers are the "after" sweep's
    assert main(["eval", "--model", str(run_dir / "model"), "--scales", "1", "--run-dir", str(tmp_path / "eval"),
                 "--seq-len", "256", "--batch-size", "8", "--tasks", "none", *fast_eval]) == 0
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["clean"]["ppl"] == pytest.approx(report["after"]["clean_ppl"], rel=1e-12)
    assert evaluated["rows"][0]["ppl"]["mean"] == pytest.approx(report["after"]["noisy"][0]["ppl"], rel=1e-12)
    # the compare variants hwa and hwa+romer-recal, with the training cost
    assert main(["compare", "--variants", "noisy", "hwa", "--run-dir", str(tmp_path / "cmp"), "--scales", "1",
                 "--tasks", "none", *fast_eval]) == 2
    assert "need --hwa-checkpoint" in capsys.readouterr().out
    assert main(["compare", "--hwa-checkpoint", str(run_dir), "--variants", "noisy", "hwa", "hwa+romer-recal",
                 "--run-dir", str(tmp_path / "cmp"), "--scales", "1", "--tasks", "none", *fast_eval]) == 0
    out = capsys.readouterr().out
    assert "training" in out and "2 steps" in out and "hwa+romer-recal" in out
    csv = (tmp_path / "cmp" / "results.csv").read_text()
    assert "train_steps" in csv and ",hwa," in csv

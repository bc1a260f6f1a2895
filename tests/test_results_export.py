"""Run folders out of SQLite: results.csv (one row per trial), summary.json (the printed table), and
`romer results` in every format, reading back exactly what the sweep stored."""
from __future__ import annotations

import csv
import io
import json
import math
import random
import sqlite3
import statistics

import pytest

from romer_kernels.cli.main import main
from romer_kernels.evaluation.montecarlo import ResultsStore, Trial
from romer_kernels.evaluation.results import (format_summary, format_trials, paired_against, read_run,
                                               write_run_files)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    # the demo's default task (wiki_cloze) on 12 documents: its columns go through every format too
    assert main(["demo", "--seeds", "2", "--scales", "1", "3", "--windows", "2", "--plot-format", "svg",
                 "--task-limit", "12", "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_a_run_folder_has_its_csv_summary_and_svg_plot(demo_run):
    assert {"results.sqlite", "clean.json", "results.csv", "summary.json", "sweep.svg"} <= {
        p.name for p in demo_run.iterdir()}
    assert (demo_run / "sweep.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    with open(demo_run / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    connection = sqlite3.connect(demo_run / "results.sqlite")
    stored = connection.execute("SELECT seed, noise_scale, metrics FROM trials ORDER BY rowid").fetchall()
    connection.close()
    assert len(rows) == len(stored) == 4
    for row, (seed, scale, metrics) in zip(rows, stored):
        assert int(row["seed"]) == seed and float(row["noise_scale"]) == scale and row["error"] == ""
        for name, value in json.loads(metrics).items():
            assert float(row[name]) == value      # repr of a float round-trips exactly


def test_romer_results_round_trips_the_summary(demo_run, capsys):
    capsys.readouterr()
    assert main(["results", str(demo_run), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((demo_run / "summary.json").read_text())
    assert printed["rows"] == summary["rows"] and printed["clean"] == summary["clean"]
    assert [row["noise_scale"] for row in printed["rows"]] == [1.0, 3.0] and all(r["n"] == 2 for r in printed["rows"])
    ppl = printed["rows"][0]["ppl"]
    assert ppl["ci95_low"] < ppl["mean"] < ppl["ci95_high"] and ppl["std"] > 0
    assert printed["fingerprint"]["model"] == "tiny-olmoe"

    assert main(["results", str(demo_run), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["variant"] for row in rows] == ["clean", "", ""]
    assert float(rows[1]["ppl_mean"]) == ppl["mean"] and float(rows[0]["ppl_mean"]) == summary["clean"]["ppl"]

    assert main(["results", str(demo_run), "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0].startswith("| noise scale | t (s) | variant | n | ppl | lis |") and len(markdown) == 5
    assert markdown[0].endswith("| acc:wiki_cloze |")
    assert main(["results", str(demo_run)]) == 0
    assert "clean" in capsys.readouterr().out
    assert main(["results", str(demo_run), "--trials", "--format", "csv"]) == 0
    assert capsys.readouterr().out == (demo_run / "results.csv").read_text()


def test_failed_trials_are_rows_with_their_reason_and_no_metric(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite", {"model": "m"})
    store.add(Trial(0, 1.0, 0.0), {"ppl": 10.0, "lis": 1.2}, 1.0)
    store.add(Trial(1, 1.0, 0.0), {"ppl": 12.0, "lis": 1.4}, 1.0)
    store.add(Trial(2, 1.0, 0.0), {}, 0.5, error="the model's output is not finite")
    record = read_run(tmp_path)
    write_run_files(tmp_path, {"ppl": 9.0}, record.summaries)
    store.close()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [row["error"] for row in rows] == ["", "", "the model's output is not finite"]
    assert rows[2]["ppl"] == "" and rows[0]["ppl"] == "10.0"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"][0]["n"] == 2 and summary["rows"][0]["ppl"]["mean"] == 11.0
    assert "1 failed trial(s)" in format_summary(record, "table")
    assert json.loads(format_trials(record.trials, "json"))[2]["error"] == "the model's output is not finite"


def test_folders_that_hold_no_run_are_refused_by_name(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        read_run(tmp_path)
    (tmp_path / "results.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(ValueError, match="not a readable results store"):
        read_run(tmp_path)
    assert main(["results", str(tmp_path / "nowhere")]) == 2
    assert "holds no run" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        format_trials([], "xml")


def _store(folder, fingerprint, nll_by_trial, clean_ppl=None):
    folder.mkdir()
    store = ResultsStore(folder / "results.sqlite", fingerprint)
    for (seed, scale, variant), nll in nll_by_trial.items():
        store.add(Trial(seed, scale, 0.0, variant), {"nll": nll, "ppl": math.exp(nll)}, 1.0)
    store.close()
    if clean_ppl is not None:
        (folder / "clean.json").write_text(json.dumps({"ppl": clean_ppl}))
    return read_run(folder)


def test_a_run_is_paired_against_another_on_the_same_chips(tmp_path, capsys):
    same = {"data": "bundled:test", "tokens": "abc", "max_windows": 16, "seq_len": 256, "batch_size": 8}
    rng = random.Random(5)
    base_nll = {(seed, scale, variant): 4.0 + rng.random() for seed in range(5) for scale in (1.0, 2.0)
                for variant in ("", "romer")}
    shift = {(seed, scale, variant): -0.02 * scale + 0.01 * rng.random() for seed, scale, variant in base_nll}
    run_nll = {key: value + shift[key] for key, value in base_nll.items() if key[0] != 4}   # seed 4 unpaired
    base_nll[(7, 1.0, "")] = 9.0                                                        # only in base: skipped
    base = _store(tmp_path / "base", {**same, "model": "a", "weights": "1"}, base_nll, clean_ppl=70.0)
    run = _store(tmp_path / "run", {**same, "model": "b", "weights": "2"}, run_nll, clean_ppl=69.0)

    rows = paired_against(run, base)
    assert [(r["noise_scale"], r["variant"], r["n"]) for r in rows] == [
        (1.0, "", 4), (2.0, "", 4), (1.0, "romer", 4), (2.0, "romer", 4)]
    for row in rows:
        diffs = [shift[(seed, row["noise_scale"], row["variant"])] for seed in range(4)]
        mean, sem = statistics.fmean(diffs), statistics.stdev(diffs) / 2
        t_975 = 3.182446305284263   # Student t, 3 degrees of freedom
        assert row["change"] == pytest.approx(math.expm1(mean), rel=1e-12)
        assert row["ci95_low"] == pytest.approx(math.expm1(mean - t_975 * sem), rel=1e-9)
        assert row["ci95_high"] == pytest.approx(math.expm1(mean + t_975 * sem), rel=1e-9)
        assert row["differs"] == ["model", "weights"]

    capsys.readouterr()
    assert main(["results", str(run.folder), "--against", str(base.folder), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| noise scale | t (s) | variant | n | PPL change (95 % interval) |"
    assert "differ in: model, weights" in out and "clean PPL: 69.000 vs 70.000" in out
    assert main(["results", str(run.folder), "--against", str(base.folder), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == json.loads(json.dumps(rows))
    assert printed["clean"] == {"run": {"ppl": 69.0}, "base": {"ppl": 70.0}}
    assert main(["results", str(run.folder), "--against", str(base.folder), "--trials"]) == 2
    assert "exclude each other" in capsys.readouterr().out

    other_text = _store(tmp_path / "other", {**same, "max_windows": 8, "model": "c"}, base_nll)
    with pytest.raises(ValueError, match=r"did not evaluate the same text \(max_windows: 16 vs 8\)"):
        paired_against(run, other_text)
    disjoint = _store(tmp_path / "disjoint", {**same, "model": "d"}, {(9, 1.0, ""): 4.0})
    with pytest.raises(ValueError, match="nothing to pair"):
        paired_against(run, disjoint)

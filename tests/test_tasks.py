"""Downstream task accuracy with lm-evaluation-harness: the bundled wiki_cloze task, offline, clean and on
chips, into the store, the CSV and the printed table; missing data and unknown tasks refused by name."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from romer_kernels.cli.main import main
from romer_kernels.config.presets import preset
from romer_kernels.data import cloze
from romer_kernels.evaluation.results import read_run
from romer_kernels.evaluation.runner import SweepSettings, Workload
from romer_kernels.evaluation.sweep import noise_sweep
from romer_kernels.evaluation.tasks import BUNDLED_TASKS, TaskDataMissing, check_tasks, load_task_dict, task_accuracy

pytest.importorskip("lm_eval")

LIMIT = 24


def test_the_shipped_task_documents_are_what_the_builder_makes():
    shipped = cloze.CLOZE_FILE.read_text(encoding="utf-8")
    assert shipped == cloze.docs_jsonl(cloze.bundled_cloze_docs())
    docs = [json.loads(line) for line in shipped.splitlines()]
    assert len(docs) == cloze.NUM_DOCS and "wiki_cloze" in BUNDLED_TASKS
    for doc in docs:
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
        assert len(doc["context"].split()) >= cloze.MIN_CONTEXT_WORDS
    # the true word is not always in one position (the choices are shuffled)
    assert {doc["label"] for doc in docs} == {0, 1, 2, 3}


def test_the_builder_is_deterministic_and_checks_its_input():
    text = cloze.load_corpus("valid")
    assert cloze.build_cloze_docs(text, text, 20, seed=3) == cloze.build_cloze_docs(text, text, 20, seed=3)
    assert cloze.build_cloze_docs(text, text, 20, seed=3) != cloze.build_cloze_docs(text, text, 20, seed=4)
    with pytest.raises(ValueError, match="possible blanks"):
        cloze.build_cloze_docs("too short", "too short", 5)


@pytest.fixture(scope="module")
def tiny():
    loaded = Workload("tiny-olmoe").load()
    return loaded.model, loaded.tokenizer


def test_the_trained_model_beats_chance_and_a_limit_scores_fewer_documents(tiny):
    model, tokenizer = tiny
    scores = task_accuracy(model, tokenizer, ["wiki_cloze"], limit=100)
    assert set(scores) == {"acc:wiki_cloze", "acc_norm:wiki_cloze"}
    # chance is 0.25; 100 documents: a model at chance exceeds 0.45 with probability < 1e-5
    assert scores["acc:wiki_cloze"] > 0.45
    assert task_accuracy(model, tokenizer, ["wiki_cloze"], limit=100) == scores  # digital: deterministic
    with pytest.raises(ValueError, match="limit must be a positive"):
        task_accuracy(model, tokenizer, ["wiki_cloze"], limit=0)


def test_a_sweep_stores_task_accuracy_clean_and_per_chip_reproducibly(tmp_path, tiny):
    settings = SweepSettings(preset("rasch2023"), seeds=(0, 1), noise_scales=(4.0,), max_windows=2,
                             tasks=("wiki_cloze",), task_limit=LIMIT)
    first = noise_sweep(Workload("tiny-olmoe"), None, settings, tmp_path / "a", progress=False)
    model, tokenizer = tiny
    assert first.clean.tasks == task_accuracy(model, tokenizer, ["wiki_cloze"], limit=LIMIT)
    record = read_run(tmp_path / "a")
    assert record.fingerprint["tasks"] == ["wiki_cloze"] and record.fingerprint["task_limit"] == LIMIT
    assert record.clean["acc:wiki_cloze"] == first.clean.tasks["acc:wiki_cloze"]
    accuracies = [row.metrics["acc:wiki_cloze"] for row in record.trials]
    assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
    with open(tmp_path / "a" / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [float(row["acc:wiki_cloze"]) for row in rows] == accuracies
    # the same chips in another folder score the same documents identically
    second = noise_sweep(Workload("tiny-olmoe"), None, settings, tmp_path / "b", progress=False)
    assert [row.metrics for row in read_run(tmp_path / "b").trials] == [row.metrics for row in record.trials]
    assert second.trials_run == 2
    # a store made without tasks is refused for a sweep with tasks (the fingerprint differs in tasks)
    plain = SweepSettings(preset("rasch2023"), seeds=(0,), noise_scales=(4.0,), max_windows=2)
    noise_sweep(Workload("tiny-olmoe"), None, plain, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="differs in: lm_eval, task_limit, tasks"):
        noise_sweep(Workload("tiny-olmoe"), None, settings, tmp_path / "c", progress=False)


def test_the_cli_prints_the_task_column_and_writes_it_to_the_csv(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["demo", "--seeds", "1", "--scales", "1", "--windows", "2", "--tasks", "wiki_cloze",
                 "--task-limit", "12", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "acc wiki_cloze" in out
    header = (run_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert "acc:wiki_cloze" in header and "acc_norm:wiki_cloze" in header


def test_unknown_tasks_and_bad_limits_are_refused_before_any_loading(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["demo", "--tasks", "wiki_clozee", "--run-dir", str(run_dir)]) == 2
    assert "unknown lm-eval task(s) wiki_clozee" in capsys.readouterr().out
    assert main(["demo", "--tasks", "wiki_cloze", "--task-limit", "0", "--run-dir", str(run_dir)]) == 2
    assert "--task-limit must be at least 1 (documents per task), got 0" in capsys.readouterr().out
    assert not run_dir.exists()
    with pytest.raises(ValueError, match="named twice"):
        check_tasks(["wiki_cloze", "wiki_cloze"])


def test_a_task_without_local_data_says_so():
    with pytest.raises(TaskDataMissing, match="'hellaswag': its dataset is not in the local datasets cache"):
        load_task_dict(("hellaswag",))


def test_without_lm_eval_the_error_names_the_extra(monkeypatch):
    from romer_kernels.evaluation import tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)   # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"romer_kernels\[lm_eval\]"):
        tasks._lm_eval()


def test_the_cli_refuses_a_task_without_local_data_before_loading_the_model(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["eval", "--model", "tiny-olmoe", "--tasks", "wiki_cloze,hellaswag", "--run-dir", str(run_dir)]) == 2
    assert "'hellaswag': its dataset is not in the local datasets cache" in capsys.readouterr().out
    assert not run_dir.exists()

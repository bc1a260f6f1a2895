"""The results store never mixes, loses or doubles trials: everything that decides the numbers is in its
fingerprint and a mismatch is refused before anything is written; one sweep per folder; damaged files
are refused by name; Ctrl-C says what is stored."""
import json
import sqlite3

import pytest

from romer_kernels.cli.main import main
from romer_kernels.evaluation.executors import FunctionSession, SweepInterrupted, run_trials
from romer_kernels.evaluation.montecarlo import ResultsStore, StoreError, grid

FAST = ["--seeds", "1", "--scales", "2", "--windows", "1", "--seq-len", "64", "--batch-size", "1", "--tasks", "none"]


def demo(tmp_path, *extra, capsys=None):
    code = main(["demo", "--run-dir", str(tmp_path / "run"), *FAST, *extra])
    out = capsys.readouterr().out if capsys is not None else ""
    return code, out


def folder_state(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.suffix != ".lock" and "-wal" not in p.name
            and "-shm" not in p.name}


@pytest.mark.parametrize("change,differs", [
    (["--dtype", "bfloat16"], "dtype"),
    (["--backend", "reference"], "backend"),
    (["--preset", "aihwkit-default"], "config"),
])
def test_a_rerun_with_other_settings_is_refused_before_anything_is_written(tmp_path, capsys, change, differs):
    assert demo(tmp_path, capsys=capsys)[0] == 0
    before = folder_state(tmp_path / "run")
    global_flags, demo_flags = (change, []) if change[0] == "--backend" else ([], change)  # --backend precedes demo
    argv = [*global_flags, "demo", "--run-dir", str(tmp_path / "run"), *FAST, *demo_flags]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "holds a sweep with other settings" in out and differs in out
    assert folder_state(tmp_path / "run") == before   # clean.json, results, plot: untouched


def test_a_changed_corpus_file_under_the_same_name_is_refused(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    from romer_kernels.data.corpus import load_corpus  # noqa: PLC0415

    corpus = load_corpus("test")
    text.write_text(corpus[: len(corpus) // 2])
    assert demo(tmp_path, "--data", str(text), capsys=capsys)[0] == 0
    text.write_text(corpus[len(corpus) // 2:])
    code, out = demo(tmp_path, "--data", str(text), capsys=capsys)
    assert code == 2 and "tokens" in out


def test_the_table_shows_only_the_trials_asked_for(tmp_path, capsys):
    assert main(["demo", "--run-dir", str(tmp_path / "run"), *FAST[2:], "--seeds", "3"]) == 0
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(tmp_path / "run"), *FAST]) == 0  # --seeds 1: a subset, nothing to run
    out = capsys.readouterr().out
    assert "0 trials run now" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [row["n"] for row in summary["rows"]] == [1]


def test_one_sweep_per_folder(tmp_path):
    first = ResultsStore(tmp_path / "results.sqlite", {"model": "m"})
    try:
        with pytest.raises(StoreError, match=r"in use by another sweep \(pid \d+\)"):
            ResultsStore(tmp_path / "results.sqlite", {"model": "m"})
    finally:
        first.close()
    ResultsStore(tmp_path / "results.sqlite", {"model": "m"}).close()  # free again once the first closed


@pytest.mark.parametrize("content,problem", [
    (b"", "is empty"),
    (b"this is not a database, just a file a user overwrote" * 100, "not a readable results store"),
    ("foreign", "not a romer_kernels results store"),
])
def test_a_damaged_or_foreign_store_is_refused_by_name_and_left_alone(tmp_path, content, problem):
    path = tmp_path / "results.sqlite"
    if content == "foreign":
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE photos (name TEXT)")
        connection.close()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=problem) as error:
        ResultsStore(path, {"model": "m"})
    assert str(path) in str(error.value) and "nothing in it was changed" in str(error.value)
    assert path.read_bytes() == before


def test_a_truncated_store_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    store = ResultsStore(path, {"model": "m"})
    run_trials(store, grid([0, 1, 2], [1.0], [0.0]), FunctionSession(lambda t: {"ppl": 1.0 + t.seed}), progress=False)
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="results.sqlite"):
        ResultsStore(path, {"model": "m"}).rows()


def test_ctrl_c_says_how_many_trials_are_stored(tmp_path):
    trials = grid([0, 1, 2], [0.5, 1.0], [0.0])

    def run_trial(trial):
        if trial.key == trials[3].key:
            raise KeyboardInterrupt
        return {"ppl": 1.0}

    store = ResultsStore(tmp_path / "results.sqlite", {"model": "m"})
    with pytest.raises(SweepInterrupted, match=r"interrupted after 3 of 6 trials \(3 of 6 now stored in .*"
                                                r"results.sqlite\); run the same command again to resume"):
        run_trials(store, trials, FunctionSession(run_trial), progress=False)
    store.close()


def test_a_failed_trial_is_stored_with_its_reason_and_in_no_summary(tmp_path, monkeypatch):
    from moe_models import build  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from romer_kernels.config import preset  # noqa: PLC0415
    from romer_kernels.evaluation.lm_metrics import NonFiniteOutput  # noqa: PLC0415
    from romer_kernels.evaluation.montecarlo import summarize_trials  # noqa: PLC0415
    from romer_kernels.evaluation.runner import SweepSettings, TrialRunner  # noqa: PLC0415

    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0))
    runner = TrialRunner(build("olmoe"), ids, SweepSettings(config=preset("gaussian-chip"), seq_len=32, max_windows=1))
    trials = grid([0, 1, 2], [1.0], [0.0])
    original = runner.run

    def run(trial):  # trial seed=1's chip gives a non-finite output
        if trial.seed == 1:
            raise NonFiniteOutput("the model's output is not finite: 3 of 31 scored tokens ...")
        return original(trial)

    monkeypatch.setattr(runner, "run", run)
    results = runner.run_group(trials)
    assert [r.error is None for r in results] == [True, False, True] and results[1].metrics == {}
    store = ResultsStore(tmp_path / "results.sqlite", {"model": "m"})

    class Session:
        identity, clean = {}, None

        def run(self, groups):
            for group in groups:
                yield from runner.run_group(group)

    assert run_trials(store, trials, Session(), progress=False) == 3
    assert run_trials(store, trials, Session(), progress=False) == 0   # a failed trial is not run again
    assert [t.seed for t, _ in store.rows()] == [0, 2]
    (failed, reason), = store.failures()
    assert failed.seed == 1 and "not finite" in reason
    assert {s.n for s in summarize_trials(store.rows())} == {2}
    store.close()
    runner.close()

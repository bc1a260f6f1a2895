"""The Ray executor on a local cluster this module starts (2 CPUs, no dashboard): the same results as the
local executor trial by trial, a killed worker loses nothing, a killed driver resumes, clear errors."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from romer_kernels.config import preset
from romer_kernels.evaluation.compare import compare_methods
from romer_kernels.evaluation.executors import LocalExecutor, RayExecutor, check_reachable, require_ray
from romer_kernels.evaluation.montecarlo import grid
from romer_kernels.evaluation.runner import SweepSettings, Workload, group_trials
from romer_kernels.evaluation.sweep import noise_sweep

ray = pytest.importorskip("ray")
WORKLOAD = Workload("tiny-olmoe", calib_split="valid")
SETTINGS = SweepSettings(config=preset("rasch2023"), seeds=(0, 1, 2), noise_scales=(1.0, 4.0), times=(60.0, 3600.0),
                         seq_len=128, batch_size=4, max_windows=2)
REPO = Path(__file__).resolve().parent.parent
TRIALS = 12  # 6 groups of 2 times sharing a programming: 3 rounds of the 2 workers


def stored(run_dir) -> dict[str, dict]:
    """The stored trials, read-only ({} while there is no store: a plain connect would create one)."""
    path = Path(run_dir) / "results.sqlite"
    if not path.is_file():
        return {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {key: json.loads(metrics) for key, metrics in connection.execute("SELECT key, metrics FROM trials")}
    finally:
        connection.close()


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    noise_sweep(WORKLOAD, None, SETTINGS, run_dir, progress=False, executor=LocalExecutor())
    return stored(run_dir)


def test_ray_sweep_equals_the_local_sweep_trial_by_trial(cluster, local_results, tmp_path):
    result = noise_sweep(WORKLOAD, None, SETTINGS, tmp_path, progress=False, executor=RayExecutor(workers=2))
    assert result.trials_run == len(local_results) == TRIALS
    assert stored(tmp_path) == local_results
    settings = SweepSettings(config=preset("rasch2023"), seeds=(0,), noise_scales=(4.0,), times=(3600.0,),
                             seq_len=128, batch_size=4, max_windows=2)
    runs = {}
    for name, executor in (("local", LocalExecutor()), ("ray", RayExecutor(workers=2))):
        compare_methods(WORKLOAD, None, None, settings, ("noisy", "romer", "rq"), tmp_path / name, calib_windows=2,
                        progress=False, executor=executor)
        runs[name] = stored(tmp_path / name)
    assert len(runs["ray"]) == 3 and runs["ray"] == runs["local"]


@pytest.mark.parametrize("retries", [2, 0])
def test_a_killed_worker_loses_no_trial(cluster, local_results, retries):
    session = RayExecutor(workers=2, max_retries=retries).open(WORKLOAD, SETTINGS)
    try:
        victim = session.pids()[1]
        trials = grid(SETTINGS.seeds, SETTINGS.noise_scales, SETTINGS.times)
        results = {}
        runs = session.run(group_trials(trials))
        if retries == 0:
            with pytest.raises(RuntimeError, match=r"trial\(s\) seed=\d.*failed on 1 workers"):
                for i, (trial, metrics, _, _) in enumerate(runs):
                    if i == 0:
                        os.kill(victim, signal.SIGKILL)
            return
        for i, (trial, metrics, _, _) in enumerate(runs):
            results[trial.key] = metrics
            if i == 0:
                os.kill(victim, signal.SIGKILL)  # the other worker is busy with (or about to get) a group
        assert session.replacements == 1
        assert results == local_results
    finally:
        session.close()


def test_a_killed_driver_resumes_without_losing_or_repeating_trials(cluster, local_results, tmp_path):
    """The driver (the CLI, on this cluster) is stopped with SIGINT after its first stored trials, then
    SIGKILLed after some more, then run to the end. Each stop comes at least one round of the two workers
    before the end (a round commits its groups within milliseconds of each other)."""
    command = [sys.executable, "-m", "romer_kernels", "demo", "--executor", "ray", "--address", cluster,
               "--workers", "2", "--seeds", "3", "--scales", "1", "4", "--times", "60", "3600", "--seq-len", "128",
               "--batch-size", "4", "--windows", "2", "--tasks", "none", "--run-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def stop_after_more_trials(sig: int) -> int:
        before = len(stored(tmp_path))
        log = open(tmp_path / f"driver-{sig}.log", "w")
        # SIGINT handled as in a terminal: a CI job started in the background (`job &` in a non-interactive
        # shell) runs with SIGINT ignored, every child inherits that, and Python then never raises
        # KeyboardInterrupt (as it should not: the CLI keeps the disposition it was given)
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 600  # a loaded machine can take minutes to start a driver and its workers
        try:
            while time.monotonic() < deadline and driver.poll() is None:
                if before < len(stored(tmp_path)) < TRIALS:
                    break
                time.sleep(0.02)
            assert driver.poll() is None, "the driver should be stopped mid-sweep"
            driver.send_signal(sig)
            driver.wait(60)
        finally:
            if driver.poll() is None:
                driver.kill()
        log.close()
        count = len(stored(tmp_path))
        assert before < count < TRIALS, (driver.returncode, (tmp_path / f"driver-{sig}.log").read_text()[-3000:])
        if sig == signal.SIGINT:
            assert driver.returncode == 130 and "interrupted after" in (tmp_path / f"driver-{sig}.log").read_text()
        return count

    stop_after_more_trials(signal.SIGINT)
    partial = stop_after_more_trials(signal.SIGKILL)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{TRIALS - partial} trials run now" in done.stdout
    assert stored(tmp_path) == local_results  # nothing lost, nothing run twice, same values


def test_a_model_that_does_not_load_is_an_error_not_a_retry(cluster):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="could not start.*no-such-model"):
        RayExecutor(workers=1).open(Workload("no-such-model"), SETTINGS)
    assert time.monotonic() - start < 60


def test_unreachable_address_fails_fast_with_the_address(tmp_path):
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="127.0.0.1:9"):
        check_reachable("127.0.0.1:9", timeout=5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_reachable("nonsense")
    cli = subprocess.run([sys.executable, "-m", "romer_kernels", "demo", "--executor", "ray", "--address",
                          "127.0.0.1:9", "--run-dir", str(tmp_path)], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "cannot reach a Ray cluster at 127.0.0.1:9" in cli.stdout
    assert time.monotonic() - start < 45


def test_ray_options_need_the_ray_executor_and_a_workload(tmp_path):
    from romer_kernels.cli.main import main  # noqa: PLC0415

    assert main(["demo", "--workers", "2", "--run-dir", str(tmp_path)]) == 2
    with pytest.raises(TypeError, match="Workload"):
        RayExecutor().open(object(), SETTINGS)


def test_missing_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'romer_kernels\[ray\]'"):
        require_ray()
    with pytest.raises(ImportError, match="romer_kernels\\[ray\\]"):
        RayExecutor().open(WORKLOAD, SETTINGS)

"""Where a sweep's trials run: in this process (``LocalExecutor``, the default) or on a Ray cluster
(``RayExecutor``), with the same results trial by trial.

An executor opens a *session* on a workload: one ``TrialRunner`` per worker (the model and tokens loaded
once by that worker), the clean evaluation, and ``session.run(groups)``, which yields a ``TrialResult``
(trial, metrics, seconds, error) as trials finish. The driver (``run_trials``) is the only writer of the results
store and commits each result as it arrives, so an interrupted sweep resumes with no trial lost or run
twice. A trial is a pure function of its key (the chip is its seed), so where it runs does not change
its result; every Ray worker compares routing with the same clean trace (computed once, shipped to all).

Ray: each worker is an actor that loads the model from the workload (model id or path, data spec), not
from the driver. A worker that dies has its trials run again on another worker (a replacement is
started), up to ``max_retries`` times per trial group, then a clear error names the trials. Errors of
the trial code itself (bad settings, a model that does not load) are raised as they are, not retried.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from romer_kernels.evaluation.lm_metrics import LMEval
from romer_kernels.evaluation.montecarlo import ResultsStore, Trial
from romer_kernels.evaluation.runner import Loaded, SweepSettings, TrialResult, TrialRunner, Workload, group_trials

EXECUTORS = ("local", "ray")
Result = TrialResult


@dataclass
class LoadedWorkload:
    """A model and tokens already in this process (what the Python API's ``noise_sweep(model, ids)``
    runs on); only the local executor can use it."""

    model: nn.Module
    eval_ids: torch.Tensor
    calib_ids: torch.Tensor | None = None
    tokenizer: Any = None      # needed only by downstream tasks (SweepSettings.tasks)

    def load(self) -> Loaded:
        return Loaded(self.model, self.eval_ids, self.calib_ids, self.tokenizer)


class Session(Protocol):
    clean: LMEval
    identity: dict[str, Any]   # digests of weights and tokens, dtype, backend, version (TrialRunner.identity)

    def run(self, groups: list[list[Trial]]) -> Iterator[Result]: ...

    def evaluate(self, trial: Trial) -> LMEval: ...

    def close(self) -> None: ...


# -- local -------------------------------------------------------------------------------------------
class LocalSession:
    def __init__(self, runner: TrialRunner) -> None:
        self.runner = runner
        self.clean = runner.clean
        self.identity = runner.identity

    def run(self, groups: list[list[Trial]]) -> Iterator[Result]:
        for group in groups:
            for trial in group:
                yield self.runner.run_group([trial])[0]

    def evaluate(self, trial: Trial) -> LMEval:
        return self.runner.evaluate(trial)

    def close(self) -> None:
        self.runner.close()


class FunctionSession:
    """A session over any ``run_trial(trial) -> metrics`` function in this process: ``run_trials`` then
    stores and resumes a custom Monte Carlo like the built-in ones. ``clean`` is None."""

    clean = None
    identity: dict[str, Any] = {}

    def __init__(self, run_trial) -> None:
        self.run_trial = run_trial

    def run(self, groups: list[list[Trial]]) -> Iterator[Result]:
        for group in groups:
            for trial in group:
                start = time.perf_counter()
                metrics = self.run_trial(trial)
                yield TrialResult(trial, metrics, time.perf_counter() - start)

    def evaluate(self, trial: Trial) -> LMEval:
        raise NotImplementedError("a FunctionSession only returns metrics")

    def close(self) -> None:
        pass


class LocalExecutor:
    """Every trial in this process, one after the other, on one model re-programmed in place."""

    name = "local"

    def open(self, workload: Workload | LoadedWorkload, settings: SweepSettings, calib_windows: int = 8) -> LocalSession:
        loaded = workload.load()
        return LocalSession(TrialRunner(loaded.model, loaded.eval_ids, settings, loaded.calib_ids, calib_windows,
                                        tokenizer=loaded.tokenizer))

    def describe(self) -> str:
        return "local (this process)"


# -- Ray ---------------------------------------------------------------------------------------------
def require_ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise ImportError("the ray executor needs Ray: pip install 'romer_kernels[ray]' (or pip install ray)") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, naming ``address``, when nothing listens at HOST:PORT (ray.init
    itself can wait for a long time on an unreachable head node)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--address must be auto or HOST:PORT (the Ray head node's GCS port, e.g. 10.0.0.1:6379), "
                         f"got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise ConnectionError(f"cannot reach a Ray cluster at {address} ({error}); start one with "
                              f"`ray start --head --port {port}` on {host}, or check the address") from None


class TrialActor:
    """What runs inside one Ray worker: the workload loaded once, a ``TrialRunner`` on it."""

    def __init__(self, workload: Workload, settings: SweepSettings, calib_windows: int, threads: int,
                 clean_box: list | None = None) -> None:
        torch.set_num_threads(max(1, threads))
        loaded = workload.load()
        clean = None
        if clean_box:  # a list, so that Ray does not wait for the clean result before the model loads
            import ray  # noqa: PLC0415

            clean = ray.get(clean_box[0])
        self.runner = TrialRunner(loaded.model, loaded.eval_ids, settings, loaded.calib_ids, calib_windows, clean=clean,
                                  tokenizer=loaded.tokenizer)

    def ready(self) -> int:
        return os.getpid()

    def peak_rss(self) -> int:
        """This worker's peak resident memory, bytes."""
        return peak_rss()

    def clean(self) -> LMEval:
        return self.runner.clean

    def identity(self) -> dict[str, Any]:
        return self.runner.identity

    def run_group(self, trials: list[Trial]) -> list[Result]:
        return self.runner.run_group(trials)

    def evaluate(self, trial: Trial) -> LMEval:
        return self.runner.evaluate(trial)


class RayExecutor:
    """Trials on Ray actors, one model per actor.

    ``address``: None starts a local Ray (this machine's CPUs, no dashboard) unless one is already
    initialised in this process; ``"auto"`` joins the cluster this machine belongs to; ``"HOST:PORT"``
    a head node. ``workers``: actors (default: as many as the cluster's CPUs allow at
    ``cpus_per_worker`` each). ``gpus_per_worker`` > 0 puts each actor on a GPU (the workload's device
    should then be ``cuda``). ``max_retries``: how often a trial group is run again after its worker died.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float = 0, max_retries: int = 2) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.address, self.workers = address, workers
        self.cpus_per_worker, self.gpus_per_worker, self.max_retries = cpus_per_worker, gpus_per_worker, max_retries

    def describe(self) -> str:
        where = "a local Ray" if self.address is None else f"the Ray cluster at {self.address}"
        count = "one per CPU" if self.workers is None else str(self.workers)
        return (f"ray ({count} workers x {self.cpus_per_worker:g} CPU"
                + (f" + {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else "") + f" on {where})")

    def open(self, workload: Workload | LoadedWorkload, settings: SweepSettings, calib_windows: int = 8) -> "RaySession":
        if not isinstance(workload, Workload):
            raise TypeError("the ray executor loads the model in every worker: give it a Workload (model id or "
                            "path, data, split), not a model object")
        ray = require_ray()
        started = False
        if self.address is not None:
            check_reachable(self.address)
        if ray.is_initialized() and self.address is not None:
            raise ValueError(f"Ray is already initialised in this process, so address={self.address!r} cannot be "
                             "joined: give address=None to use that cluster, or call ray.shutdown() first")
        if not ray.is_initialized():
            try:
                if self.address is None:
                    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except ConnectionError as error:
                raise ConnectionError(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
            started = True
        try:
            return RaySession(ray, self, workload, settings, calib_windows, started)
        except BaseException:
            if started:
                ray.shutdown()
            raise


class RaySession:
    def __init__(self, ray, executor: RayExecutor, workload: Workload, settings: SweepSettings, calib_windows: int,
                 started: bool) -> None:
        self.ray, self.executor, self.started = ray, executor, started
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        count = executor.workers or max(1, int(cpus // executor.cpus_per_worker))
        if count * executor.cpus_per_worker > cpus or count * executor.gpus_per_worker > gpus:
            raise ValueError(f"{count} workers x {executor.cpus_per_worker:g} CPU / {executor.gpus_per_worker:g} GPU do "
                             f"not fit the Ray cluster ({cpus:g} CPUs, {gpus:g} GPUs)")
        self._actor_class = ray.remote(num_cpus=executor.cpus_per_worker, num_gpus=executor.gpus_per_worker,
                                       max_restarts=0, max_task_retries=0)(TrialActor)
        self._args = (workload, settings, calib_windows, max(1, int(executor.cpus_per_worker)))
        self.actors: list = []
        self.replacements = 0
        try:
            first = self._start()
            clean_ref = first.clean.remote()
            self._clean_box = [clean_ref]
            for _ in range(count - 1):
                self._start(self._clean_box)
            self._check_started(self.actors)
            self.clean = ray.get(clean_ref)
            self.identity = self._same_identity(self.actors)
        except BaseException:
            self.close()
            raise

    def _start(self, clean_box: list | None = None):
        actor = self._actor_class.remote(*self._args, clean_box)
        self.actors.append(actor)
        return actor

    def _check_started(self, actors) -> None:
        """Wait for the actors' models to load; a load error is raised as it is (not retried)."""
        try:
            self.ray.get([actor.ready.remote() for actor in actors])
        except self.ray.exceptions.RayActorError as error:
            raise RuntimeError(f"a Ray worker could not start: {_cause(error)}") from None

    def _same_identity(self, actors, reference: dict[str, Any] | None = None) -> dict[str, Any]:
        """The workers' identity; every worker must have loaded the same weights and tokens, with the same
        dtype and backend as ``reference`` (default: the first of ``actors``), or a node with other files
        would mix other numbers into the sweep."""
        identities = self.ray.get([actor.identity.remote() for actor in actors])
        reference = identities[0] if reference is None else reference
        for i, other in enumerate(identities):
            if other != reference:
                differ = sorted(k for k in set(other) | set(reference) if other.get(k) != reference.get(k))
                raise RuntimeError(f"a Ray worker loaded another model or data than the first one (differs in: "
                                   f"{', '.join(differ)}): every node needs the same files")
        return reference

    def pids(self) -> list[int]:
        """Process ids of the workers (tests kill one)."""
        return self.ray.get([actor.ready.remote() for actor in self.actors])

    def worker_peak_rss(self) -> list[int]:
        """Peak resident memory of each worker, bytes."""
        return self.ray.get([actor.peak_rss.remote() for actor in self.actors])

    def run(self, groups: list[list[Trial]]) -> Iterator[Result]:
        ray = self.ray
        pending: deque[tuple[list[Trial], int]] = deque((group, 0) for group in groups)
        idle = list(self.actors)
        in_flight: dict[Any, tuple[Any, list[Trial], int]] = {}
        while pending or in_flight:
            while idle and pending:
                actor = idle.pop(0)
                group, attempts = pending.popleft()
                in_flight[actor.run_group.remote(group)] = (actor, group, attempts)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, group, attempts = in_flight.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except ray.exceptions.RayActorError as error:   # the worker died (killed, out of memory, node lost)
                if attempts >= self.executor.max_retries:
                    keys = ", ".join(trial.key for trial in group)
                    raise RuntimeError(f"trial(s) {keys} failed on {attempts + 1} workers, the last one died: "
                                       f"{_cause(error)}") from None
                pending.appendleft((group, attempts + 1))
                self.actors.remove(actor)
                ray.kill(actor)
                self.replacements += 1
                replacement = self._start(self._clean_box)
                try:
                    self._same_identity([replacement], self.identity)
                except ray.exceptions.RayActorError as start_error:
                    raise RuntimeError(f"a replacement Ray worker could not start: {_cause(start_error)}") from None
                idle.append(replacement)
                continue
            except ray.exceptions.RayTaskError as error:  # the trial code raised: the same error everywhere
                raise error.as_instanceof_cause() from None
            idle.append(actor)
            yield from results

    def evaluate(self, trial: Trial) -> LMEval:
        return self.ray.get(self.actors[0].evaluate.remote(trial))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()


def peak_rss() -> int:
    """Peak resident memory of this process, bytes: VmHWM where /proc has it (getrusage's ru_maxrss would
    carry over the peak of the process this one was exec'd from), else ru_maxrss."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _cause(error: BaseException) -> str:
    """The line of a Ray error that says what happened: for a worker whose start failed, the exception
    that ended its traceback (e.g. the model that could not be found); else the first lines."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if getattr(error, "actor_init_failed", False):
        return lines[-1]
    return " ".join(lines[:3])


def make_executor(name: str = "local", **options: Any) -> LocalExecutor | RayExecutor:
    """``local`` or ``ray`` (options: address, workers, cpus_per_worker, gpus_per_worker, max_retries)."""
    if name == "local":
        given = {k: v for k, v in options.items() if v is not None}
        if given:
            raise ValueError(f"{', '.join(sorted(given))} only apply to the ray executor")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}")


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: what was stored stays; ``ran`` of the ``todo`` missing trials ran now."""

    def __init__(self, ran: int, todo: int, total: int, store: Path) -> None:
        super().__init__(f"interrupted after {ran} of {todo} trials ({total - todo + ran} of {total} now stored in "
                         f"{store}); run the same command again to resume")
        self.ran, self.todo, self.total = ran, todo, total


def run_trials(store: ResultsStore, trials: list[Trial], session: Session, progress: bool = True) -> int:
    """Run the trials not yet in ``store`` on ``session``; the driver commits each result as it arrives.

    Returns the number of trials run now. Ctrl-C raises ``SweepInterrupted`` (a KeyboardInterrupt) that
    says how many trials are stored."""
    keys = [trial.key for trial in trials]
    if len(set(keys)) != len(keys):
        raise ValueError("the sweep lists the same trial twice")
    done = store.done()
    todo = [trial for trial in trials if trial.key not in done]
    if not todo:
        return 0
    ran = 0
    stop = _StopOnInterrupt()
    try:
        with stop, tqdm(total=len(todo), desc="trials", disable=not progress, leave=False) as bar:
            for trial, metrics, seconds, error in session.run(group_trials(todo)):
                bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float))}
                if bad:
                    raise TypeError(f"trial metrics must be numbers, got {bad}")
                store.add(trial, {k: float(v) for k, v in metrics.items()}, seconds, error)
                ran += 1
                bar.update()
                if stop.requested:  # the KeyboardInterrupt was swallowed below us (Ray's wait can)
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise SweepInterrupted(ran, len(todo), len(trials), store.path) from None
    return ran


class _StopOnInterrupt:
    """While a sweep runs: SIGINT raises KeyboardInterrupt as usual and also records that it came, so the
    driver stops at the next stored result even if a library caught the exception (Ray's blocking wait
    may). Only in the main thread (where Python runs signal handlers); the previous handler is restored."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        self.requested = True
        raise KeyboardInterrupt

    def __enter__(self):
        import signal  # noqa: PLC0415
        import threading  # noqa: PLC0415

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            import signal  # noqa: PLC0415

            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

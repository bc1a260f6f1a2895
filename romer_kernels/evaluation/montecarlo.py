"""Monte Carlo sweeps over chip instances, noise scales and drift times, with a resumable results store.

A sweep is a list of trials ``(seed, noise_scale, t_inference)``. Every finished trial is written at once,
in its own transaction, to an SQLite file in the run folder; the trial's key is its primary key. An
interrupted sweep run again with the same settings skips the trials already stored, so no trial is lost
or counted twice. The store also keeps a fingerprint of everything else that defines the sweep (model and
a digest of its weights, data and a digest of the tokens evaluated, config, placement, dtype, backend,
evaluation settings, package version): resuming with other settings is refused, naming what differs,
before anything is written. One sweep at a time owns a store (a lock file); damaged or foreign files are
refused. The driver loop that fills the store is ``executors.run_trials``.
"""
from __future__ import annotations

import itertools
import json
import math
import sqlite3
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats


@dataclass(frozen=True)
class Trial:
    seed: int
    noise_scale: float
    t_inference: float
    variant: str = ""      # what else differs between trials (e.g. the robustness method); "" = none

    @property
    def key(self) -> str:
        key = f"seed={self.seed}|scale={self.noise_scale!r}|t={self.t_inference!r}"
        return f"{key}|variant={self.variant}" if self.variant else key


def grid(seeds: Iterable[int], noise_scales: Iterable[float], times: Iterable[float],
         variants: Iterable[str] = ("",)) -> list[Trial]:
    """Every combination, ordered by noise scale, time, variant, then seed (partial runs cover scales evenly)."""
    seeds, noise_scales, times, variants = list(seeds), list(noise_scales), list(times), list(variants)
    for name, values in (("seeds", seeds), ("noise_scales", noise_scales), ("times", times), ("variants", variants)):
        if not values:
            raise ValueError(f"a sweep needs at least one value in {name}")
    if any(s < 0 for s in seeds) or any(n < 0 for n in noise_scales) or any(t < 0 for t in times):
        raise ValueError("seeds, noise scales and times must be non-negative")
    return [Trial(seed, float(scale), float(t), variant)
            for scale, t, variant, seed in itertools.product(noise_scales, times, variants, seeds)]


class StoreError(ValueError):
    """A run folder's store cannot be used as asked (other settings, in use, damaged); nothing was changed."""


class ResultsStore:
    """SQLite table of finished trials (``results.sqlite`` in the run folder), owned by one sweep at a time.

    Opening it takes an exclusive lock on ``results.sqlite.lock`` (released when the process ends, however
    it ends): a second sweep on the same folder is refused, naming the process that holds it. A file that
    is not a readable store of this package (empty, truncated, another database, not SQLite) and a store
    made with another fingerprint are refused before anything is written. Rows are committed one
    transaction per trial, in WAL mode (a crash leaves the store as it was after the last commit).
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_folder(self.path)
        try:
            self.connection = self._open(fingerprint)
        except BaseException:
            self._lock.close()
            raise

    def _refuse(self, problem: str) -> StoreError:
        return StoreError(f"{self.path} {problem}; nothing in it was changed: move it away or use another run folder")

    def _open(self, fingerprint: dict[str, Any]) -> sqlite3.Connection:
        text = json.dumps(fingerprint, sort_keys=True)
        existed = self.path.exists()
        if existed and self.path.stat().st_size == 0:
            raise self._refuse("is empty (a truncated store?)")
        if existed:  # read-only until it is known to be this sweep's store
            try:
                reader = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
                try:
                    tables = {row[0] for row in reader.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                    row = (reader.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
                           if "meta" in tables else None)
                    columns = {info[1] for info in reader.execute("PRAGMA table_info(trials)")}
                finally:
                    reader.close()
            except sqlite3.DatabaseError as error:
                raise self._refuse(f"is not a readable results store ({error})") from None
            if not {"meta", "trials"} <= tables or row is None:
                raise self._refuse("is an SQLite file but not a romer_kernels results store")
            if "error" not in columns:
                raise self._refuse("was written by an older version of romer_kernels (no failure column)")
            if row[0] != text:
                stored = json.loads(row[0])
                changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
                raise StoreError(f"{self.path} holds a sweep with other settings (differs in: {', '.join(changed)}); "
                                 "use another run folder or delete the file")
        if not existed:
            self._create(text)
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA journal_mode=WAL")
        return connection

    def _create(self, fingerprint: str) -> None:
        """A new store, built in a temporary file and renamed into place: the store file is either absent
        or complete (a crash while creating it never leaves a file without its tables)."""
        import os  # noqa: PLC0415

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        tmp.unlink(missing_ok=True)
        connection = sqlite3.connect(tmp)
        try:
            with connection:
                connection.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                connection.execute(
                    "CREATE TABLE trials (key TEXT PRIMARY KEY, seed INTEGER NOT NULL, "
                    "noise_scale REAL NOT NULL, t_inference REAL NOT NULL, variant TEXT NOT NULL, "
                    "metrics TEXT NOT NULL, seconds REAL NOT NULL, finished REAL NOT NULL, error TEXT)")
                connection.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (fingerprint,))
        finally:
            connection.close()
        os.replace(tmp, self.path)

    def done(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT key FROM trials")}

    def add(self, trial: Trial, metrics: dict[str, float], seconds: float, error: str | None = None) -> None:
        """Store a finished trial; ``error``: why it failed (then no metric of it is reported)."""
        if error is not None and metrics:
            raise ValueError("a failed trial reports no metrics")
        with self.connection:  # one transaction per trial: a crash never leaves half a trial
            self.connection.execute("INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                    (trial.key, trial.seed, trial.noise_scale, trial.t_inference, trial.variant,
                                     json.dumps(metrics), seconds, time.time(), error))

    def _select(self, keys: Iterable[str] | None, failed: bool):
        wanted = None if keys is None else set(keys)
        cursor = self.connection.execute(
            "SELECT key, seed, noise_scale, t_inference, variant, metrics, error FROM trials WHERE error IS "
            + ("NOT NULL" if failed else "NULL") + " ORDER BY rowid")
        return [(Trial(seed, scale, t, variant), metrics, error)
                for key, seed, scale, t, variant, metrics, error in cursor if wanted is None or key in wanted]

    def rows(self, keys: Iterable[str] | None = None) -> list[tuple[Trial, dict[str, float]]]:
        """Stored successful trials in the order they finished; only those with a key in ``keys`` when
        given (the trials of the current request, not everything an earlier, larger run stored)."""
        return [(trial, json.loads(metrics)) for trial, metrics, _ in self._select(keys, failed=False)]

    def failures(self, keys: Iterable[str] | None = None) -> list[tuple[Trial, str]]:
        """Stored failed trials and why they failed (a failed trial is stored so that a resume does not run
        it again; it is in no summary)."""
        return [(trial, error) for trial, _, error in self._select(keys, failed=True)]

    def close(self) -> None:
        self.connection.close()
        self._lock.close()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers (and a crash) see the old
    file or the new one, never half of one."""
    import os  # noqa: PLC0415

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _lock_folder(path: Path):
    """Exclusive, non-blocking lock on ``<store>.lock``; the open file is the lock (closing it releases)."""
    import fcntl  # noqa: PLC0415  (POSIX; the package targets Linux)
    import os  # noqa: PLC0415

    lock = open(path.with_name(path.name + ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise StoreError(f"{path} is in use by another sweep ({holder}); wait for it to finish or use another "
                         "run folder") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    return lock


@dataclass
class Summary:
    noise_scale: float
    t_inference: float
    variant: str
    metric: str
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


# Where each metric can lie: its interval is clipped to this range (a t-interval over a few chips can
# otherwise reach impossible values, e.g. a negative flip rate). Accuracies ("acc:TASK") lie in [0, 1].
METRIC_RANGES = {"lis": (1.0, math.inf), "crossbar_lis": (0.0, math.inf), "max_over_mean": (1.0, math.inf),
                 "flip_rate": (0.0, 1.0), "overlap": (0.0, 1.0), "kl_to_clean": (0.0, math.inf),
                 "entropy": (0.0, 1.0), "cv": (0.0, math.inf), "nll": (0.0, math.inf)}
LOG_SCALE_METRICS = ("ppl",)   # intervals on the log (= NLL) scale, mapped back: always > 0, asymmetric


def metric_range(metric: str) -> tuple[float, float]:
    if metric.startswith(("acc:", "acc_norm:")):
        return 0.0, 1.0
    return METRIC_RANGES.get(metric, (-math.inf, math.inf))


def t_half_width(values: list[float], confidence: float = 0.95) -> float:
    """Half width of the Student-t confidence interval of the mean of ``values`` (NaN below 2 values)."""
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def summarize_trials(rows: list[tuple[Trial, dict[str, float]]], confidence: float = 0.95) -> list[Summary]:
    """Mean, sample std and a Student-t confidence interval of each metric per (noise scale, time,
    variant). PPL's interval is computed on log PPL and mapped back (``LOG_SCALE_METRICS``); bounded
    metrics have their interval clipped to their range (``METRIC_RANGES``). n = 1 has no interval (NaN)."""
    groups: dict[tuple[float, float, str], list[dict[str, float]]] = {}
    for trial, metrics in rows:
        groups.setdefault((trial.noise_scale, trial.t_inference, trial.variant), []).append(metrics)
    out = []
    for (scale, t, variant), results in sorted(groups.items()):
        for metric in sorted({name for result in results for name in result}):
            values = [result[metric] for result in results if metric in result and math.isfinite(result[metric])]
            if not values:
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            if metric in LOG_SCALE_METRICS and len(values) > 1 and min(values) > 0:
                logs = [math.log(v) for v in values]
                centre, half = statistics.fmean(logs), t_half_width(logs, confidence)
                low, high = math.exp(centre - half), math.exp(centre + half)
            else:
                half = t_half_width(values, confidence)
                low, high = mean - half, mean + half
                if len(values) > 1:
                    lowest, highest = metric_range(metric)
                    low, high = max(low, lowest), min(high, highest)
            out.append(Summary(scale, t, variant, metric, len(values), mean, std, low, high))
    return out

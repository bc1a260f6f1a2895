"""Monte Carlo sweeps over chip instances, noise scales and drift times, with a resumable results store.

A sweep is a list of trials ``(seed, noise_scale, t_inference)``. Every finished trial is written at once,
in its own transaction, to an SQLite file in the run folder; the trial's key is its primary key. An
interrupted sweep run again with the same settings skips the trials already stored, so no trial is lost
or counted twice. The store also keeps a fingerprint of everything else that defines the sweep (model,
config, data, evaluation settings): resuming with other settings is refused with a clear error instead
of mixing results. The driver loop that fills the store is ``executors.run_trials``.
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


class ResultsStore:
    """SQLite table of finished trials (``results.sqlite`` in the run folder)."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(self.path)
        with self.connection:
            self.connection.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.connection.execute(
                "CREATE TABLE IF NOT EXISTS trials (key TEXT PRIMARY KEY, seed INTEGER NOT NULL, "
                "noise_scale REAL NOT NULL, t_inference REAL NOT NULL, variant TEXT NOT NULL, "
                "metrics TEXT NOT NULL, seconds REAL NOT NULL, finished REAL NOT NULL)")
        text = json.dumps(fingerprint, sort_keys=True)
        row = self.connection.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        if row is None:
            with self.connection:
                self.connection.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (text,))
        elif row[0] != text:
            stored = json.loads(row[0])
            changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            raise ValueError(f"{self.path} holds a sweep with other settings (differs in: {', '.join(changed)}); "
                             "use another run folder or delete the file")

    def done(self) -> set[str]:
        return {row[0] for row in self.connection.execute("SELECT key FROM trials")}

    def add(self, trial: Trial, metrics: dict[str, float], seconds: float) -> None:
        with self.connection:  # one transaction per trial: a crash never leaves half a trial
            self.connection.execute("INSERT INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (trial.key, trial.seed, trial.noise_scale, trial.t_inference, trial.variant,
                                     json.dumps(metrics), seconds, time.time()))

    def rows(self) -> list[tuple[Trial, dict[str, float]]]:
        cursor = self.connection.execute(
            "SELECT seed, noise_scale, t_inference, variant, metrics FROM trials ORDER BY rowid")
        return [(Trial(seed, scale, t, variant), json.loads(metrics)) for seed, scale, t, variant, metrics in cursor]

    def close(self) -> None:
        self.connection.close()


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


def summarize_trials(rows: list[tuple[Trial, dict[str, float]]], confidence: float = 0.95) -> list[Summary]:
    """Mean, sample std and a Student-t confidence interval of each metric per (noise scale, time, variant)."""
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
            half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * std / math.sqrt(len(values)) \
                if len(values) > 1 else math.nan
            out.append(Summary(scale, t, variant, metric, len(values), mean, std, mean - half, mean + half))
    return out

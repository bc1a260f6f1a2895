"""A run folder's numbers out of SQLite: ``results.csv``, ``summary.json`` and tables in four formats.

Every sweep (``noise_sweep``, ``compare_methods``, ``sensitivity_sweep``) leaves in its run folder

- ``results.sqlite``: the resumable store (``montecarlo.ResultsStore``), the source of truth;
- ``clean.json``: the clean model's metrics;
- ``results.csv``: one row per stored trial (seed, noise scale, time, variant, seconds, every metric;
  failed trials with their reason and no metric);
- ``summary.json``: the clean metrics and one row per (noise scale, time, variant) of the request just
  run, each metric as mean, std, n and its 95 % Student-t interval (what the command printed).

``read_run(folder)`` reads any run folder back (read-only, while another sweep may be writing it) and
``format_summary`` / ``format_trials`` print it as a table, CSV, JSON or Markdown (``romer results``);
``paired_against`` / ``format_paired`` set one run against another on the same chips (``romer results RUN
--against BASE``: e.g. an HWA checkpoint against a fine-tuning without noise, or one preset against another).
"""
from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from romer_kernels.evaluation.montecarlo import Summary, Trial, summarize_trials, write_text_atomic

FORMATS = ("table", "csv", "json", "markdown")
# the metrics shown first, in this order; any other stored metric (task scores, ...) follows by name
LEAD_METRICS = ("ppl", "lis", "crossbar_lis", "flip_rate", "overlap", "kl_to_clean")


@dataclass
class TrialRow:
    trial: Trial
    metrics: dict[str, float]
    seconds: float
    error: str | None


@dataclass
class RunRecord:
    """A run folder read back: its fingerprint (what defines the sweep), the clean metrics, every trial."""

    folder: Path
    fingerprint: dict[str, Any]
    clean: dict[str, float]
    trials: list[TrialRow]

    @property
    def summaries(self) -> list[Summary]:
        return summarize_trials([(row.trial, row.metrics) for row in self.trials if row.error is None])


def read_run(folder: str | Path) -> RunRecord:
    """The run in ``folder`` (its ``results.sqlite`` and ``clean.json``), opened read-only."""
    folder = Path(folder)
    store = folder / "results.sqlite"
    if not store.is_file():
        raise FileNotFoundError(f"{folder} holds no run: {store.name} not found (is it a run folder of romer demo, "
                                "eval, compare or sensitivity?)")
    try:
        connection = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            fingerprint = json.loads(connection.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()[0])
            rows = connection.execute("SELECT seed, noise_scale, t_inference, variant, metrics, seconds, error "
                                      "FROM trials ORDER BY rowid").fetchall()
        finally:
            connection.close()
    except (sqlite3.DatabaseError, TypeError) as error:
        raise ValueError(f"{store} is not a readable results store of romer_kernels ({error})") from None
    clean_file = folder / "clean.json"
    clean = json.loads(clean_file.read_text()) if clean_file.is_file() else {}
    trials = [TrialRow(Trial(seed, scale, t, variant), json.loads(metrics), seconds, error)
              for seed, scale, t, variant, metrics, seconds, error in rows]
    return RunRecord(folder, fingerprint, clean, trials)


def metric_order(names) -> list[str]:
    names = set(names)
    return [m for m in LEAD_METRICS if m in names] + sorted(names - set(LEAD_METRICS))


def summary_rows(summaries: list[Summary]) -> list[dict[str, Any]]:
    """One dict per (noise scale, time, variant): ``n`` and per metric ``{mean, std, ci95_low, ci95_high}``
    (the interval is None for n = 1)."""
    rows: dict[tuple[float, float, str], dict[str, Any]] = {}
    for s in summaries:
        row = rows.setdefault((s.noise_scale, s.t_inference, s.variant),
                              {"noise_scale": s.noise_scale, "t": s.t_inference, "variant": s.variant, "n": s.n})
        row["n"] = max(row["n"], s.n)
        finite = s.n > 1
        row[s.metric] = {"mean": s.mean, "std": s.std, "ci95_low": s.ci_low if finite else None,
                         "ci95_high": s.ci_high if finite else None}
    return list(rows.values())


def trial_rows(trials: list[TrialRow]) -> list[dict[str, Any]]:
    return [{"seed": row.trial.seed, "noise_scale": row.trial.noise_scale, "t": row.trial.t_inference,
             "variant": row.trial.variant, "seconds": round(row.seconds, 3), "error": row.error or "", **row.metrics}
            for row in trials]


def write_run_files(folder: str | Path, clean: dict[str, float], summaries: list[Summary]) -> None:
    """``results.csv`` (every trial in the folder's store) and ``summary.json`` (``clean`` and ``summaries``,
    the request just run) in ``folder``; each written whole, then renamed (never half a file)."""
    folder = Path(folder)
    record = read_run(folder)
    write_text_atomic(folder / "results.csv", format_trials(record.trials, "csv"))
    write_text_atomic(folder / "summary.json", json.dumps({"clean": clean, "rows": summary_rows(summaries)}, indent=1)
                      + "\n")


def _flat(row: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    out = {k: row[k] for k in ("noise_scale", "t", "variant", "n")}
    for metric in metrics:
        cell = row.get(metric) or {}
        for part in ("mean", "std", "ci95_low", "ci95_high"):
            out[f"{metric}_{part}"] = cell.get(part)
    return out


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def _cell(cell: dict[str, Any] | None, digits: int = 3) -> str:
    if not cell:
        return "-"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def _text_table(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines) + "\n"
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table()
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if name == "variant" else "right")
    for cells in body:
        table.add_row(*cells)
    console = Console(file=io.StringIO(), width=200, force_terminal=False, color_system=None)
    console.print(table)
    return console.file.getvalue()


def format_summary(record: RunRecord, fmt: str = "table") -> str:
    """The run's summary (clean, then mean ± std of every metric per setting) in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = summary_rows(record.summaries)
    metrics = metric_order({k for row in rows for k in row} - {"noise_scale", "t", "variant", "n"})
    if fmt == "json":
        return json.dumps({"run": str(record.folder), "fingerprint": record.fingerprint, "clean": record.clean,
                           "rows": rows}, indent=1) + "\n"
    if fmt == "csv":
        clean = {"noise_scale": "", "t": "", "variant": "clean", "n": 1,
                 **{f"{m}_mean": record.clean.get(m) for m in metrics}}
        flat = [clean] + [_flat(row, metrics) for row in rows]
        columns = ["noise_scale", "t", "variant", "n"] + [f"{m}_{p}" for m in metrics
                                                          for p in ("mean", "std", "ci95_low", "ci95_high")]
        return _csv(flat, columns)
    # the printed table keeps to the headline metrics (every metric is in the CSV and JSON)
    metrics = [m for m in metrics if m in LEAD_METRICS or m.startswith("acc:")]
    header = ["noise scale", "t (s)", "variant", "n", *metrics]
    body = [["-", "-", "clean", "1", *[f"{record.clean[m]:.3f}" if m in record.clean else "-" for m in metrics]]]
    body += [[f"{row['noise_scale']:g}", f"{row['t']:g}", row["variant"] or "-", str(row["n"]),
              *[_cell(row.get(m), 4 if m == "kl_to_clean" else 3) for m in metrics]] for row in rows]
    failed = sum(row.error is not None for row in record.trials)
    note = f"{failed} failed trial(s) are in no row (romer results --trials lists them)\n" if failed else ""
    return _text_table(header, body, fmt == "markdown") + note


# what must agree for two runs' PPLs to be comparable: the same evaluation text in the same windows
SAME_EVALUATION = ("data", "tokens", "max_windows", "seq_len", "batch_size")


def paired_against(record: RunRecord, base: RunRecord, metric: str = "nll") -> list[dict[str, Any]]:
    """Per (noise scale, time, variant) of ``record``: the PPL change against ``base``'s trial of the same
    chip seed, noise scale, time and variant (``compare.paired_runs``: relative change with its 95 %
    Student-t interval over the paired seeds). Both runs must have evaluated the same text in the same
    windows (``SAME_EVALUATION`` of their fingerprints); what else differs (model, weights, config, ...)
    is what is compared and is returned under ``"differs"`` of each row."""
    from romer_kernels.evaluation.compare import paired_runs  # noqa: PLC0415

    mismatched = [k for k in SAME_EVALUATION if record.fingerprint.get(k) != base.fingerprint.get(k)]
    if mismatched:
        detail = ", ".join(f"{k}: {record.fingerprint.get(k)!r} vs {base.fingerprint.get(k)!r}" for k in mismatched)
        raise ValueError(f"{record.folder} and {base.folder} did not evaluate the same text ({detail}): their PPLs "
                         "cannot be paired")
    differs = sorted(k for k in set(record.fingerprint) | set(base.fingerprint)
                     if record.fingerprint.get(k) != base.fingerprint.get(k))
    def finished(rec: RunRecord, variant: str) -> list[tuple[Trial, dict[str, float]]]:
        return [(row.trial, row.metrics) for row in rec.trials if row.error is None and row.trial.variant == variant]

    out = []
    for variant in sorted({row.trial.variant for row in record.trials if row.error is None}):
        # a variant's baseline is the same variant in the base run
        change = paired_runs(finished(record, variant), finished(base, variant), metric)
        for (scale, t), (value, low, high, n) in sorted(change.items()):
            out.append({"noise_scale": scale, "t": t, "variant": variant, "n": n, "change": value,
                        "ci95_low": low, "ci95_high": high, "differs": differs})
    if not out:
        raise ValueError(f"{record.folder} and {base.folder} share no (chip seed, noise scale, time, variant): "
                         "nothing to pair")
    return out


def format_paired(record: RunRecord, base: RunRecord, fmt: str = "table") -> str:
    """``paired_against(record, base)`` in ``fmt``; * marks an interval that excludes 0."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = paired_against(record, base)
    if fmt == "json":
        return json.dumps({"run": str(record.folder), "base": str(base.folder),
                           "clean": {"run": record.clean, "base": base.clean}, "rows": rows}, indent=1) + "\n"
    columns = ["noise_scale", "t", "variant", "n", "change", "ci95_low", "ci95_high"]
    if fmt == "csv":
        return _csv(rows, columns)
    header = ["noise scale", "t (s)", "variant", "n", "PPL change (95 % interval)"]
    body = [[f"{row['noise_scale']:g}", f"{row['t']:g}", row["variant"] or "-", str(row["n"]),
             f"{100 * row['change']:+.2f} % [{100 * row['ci95_low']:+.2f}, {100 * row['ci95_high']:+.2f}]"
             + (" *" if row["ci95_low"] > 0 or row["ci95_high"] < 0 else "")] for row in rows]
    note = (f"{record.folder} against {base.folder} on the same chip seeds; they differ in: "
            f"{', '.join(rows[0]['differs']) or 'nothing'}\n")
    if "ppl" in record.clean and "ppl" in base.clean:
        note += f"clean PPL: {record.clean['ppl']:.3f} vs {base.clean['ppl']:.3f}\n"
    return _text_table(header, body, fmt == "markdown") + note


def format_trials(trials: list[TrialRow], fmt: str = "csv") -> str:
    """One row per trial (failed ones with their reason) in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = trial_rows(trials)
    metrics = metric_order({k for row in rows for k in row} - {"seed", "noise_scale", "t", "variant", "seconds",
                                                               "error"})
    columns = ["seed", "noise_scale", "t", "variant", "seconds", *metrics, "error"]
    if fmt == "json":
        return json.dumps(rows, indent=1) + "\n"
    if fmt == "csv":
        return _csv(rows, columns)
    body = [[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
            for row in rows]
    return _text_table(columns, body, fmt == "markdown")

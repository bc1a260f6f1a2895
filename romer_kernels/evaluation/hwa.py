"""``hwa_train``: HWA fine-tuning of a model with its before/after evaluation (what ``romer hwa-train`` runs).

The run folder holds ``model/`` (the fine-tuned checkpoint and its save point, ``methods.hwa``),
``before/`` and ``after/`` (noise sweeps of the base and the fine-tuned model at the preset's noise level
on the same chip seeds, resumable stores), ``report.json`` and ``loss.png``. Every part resumes: a run
interrupted anywhere and started again finishes with the numbers an uninterrupted run gives.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.hwa import HWAConfig
from romer_kernels.config.presets import load_config
from romer_kernels.evaluation.montecarlo import write_text_atomic
from romer_kernels.evaluation.runner import SweepSettings
from romer_kernels.evaluation.sweep import SweepResult, noise_sweep
from romer_kernels.methods.hwa import HWARun, HWATrainSettings, hwa_finetune_, plot_losses
from romer_kernels.moe.convert import Placement


@dataclass
class HWAResult:
    run: HWARun
    before: SweepResult
    after: SweepResult
    report: dict[str, Any]


def _side(result: SweepResult) -> dict[str, Any]:
    """Clean PPL and, per (noise scale, time), the noisy PPL mean / std / 95 % interval and n."""
    rows = [{"noise_scale": row["noise_scale"], "t": row["t"], "n": row["n"],
             "ppl": row["ppl"][0], "ppl_std": row["ppl"][1], "ppl_low": row["ppl"][2], "ppl_high": row["ppl"][3]}
            for row in result.table() if "ppl" in row]
    return {"clean_ppl": result.clean.perplexity, "noisy": rows}


def paired_noisy_change(before: SweepResult, after: SweepResult) -> list[dict[str, Any]]:
    """Per (noise scale, time): the noisy PPL's relative change after HWA on the same chip seeds, with its
    95 % Student-t interval (on log PPL, mapped back; ``compare.paired_runs``)."""
    from romer_kernels.evaluation.compare import paired_runs  # noqa: PLC0415

    return [{"noise_scale": scale, "t": t, "change": change, "low": low, "high": high, "n": n}
            for (scale, t), (change, low, high, n) in sorted(paired_runs(after.rows, before.rows).items())]


def hwa_train(model: str = "tiny-olmoe", config: str | AnalogConfig = "rasch2023", out_dir: str | Path | None = None,
              settings: HWATrainSettings = HWATrainSettings(), hwa: HWAConfig = HWAConfig(),
              placement: Placement | None = None, eval_settings: SweepSettings | None = None,
              data: str = "bundled", train_split: str = "train", eval_split: str = "test",
              progress: bool = True) -> HWAResult:
    """HWA fine-tuning of ``model`` (a bundled name, local folder or cached hub id) on ``data``'s
    ``train_split``, evaluated before and after on ``eval_split`` with ``eval_settings`` (default: the
    chip seeds 0, 1, 2 at noise scale 1, t = 1 h, 16 windows of 256 tokens), in ``out_dir`` (default
    ``runs/hwa-<model>``). Returns the run, both sweeps and the report (also in ``out_dir/report.json``)."""
    from romer_kernels.data.corpus import load_tokens  # noqa: PLC0415
    from romer_kernels.models.loading import load_model_and_tokenizer  # noqa: PLC0415

    config_label = config if isinstance(config, str) else "config"
    analog = load_config(config) if isinstance(config, str) else config
    placement = placement or Placement()
    eval_settings = eval_settings or SweepSettings(analog, placement, seeds=(0, 1, 2), noise_scales=(1.0,),
                                                   times=(3600.0,), max_windows=16)
    if eval_settings.config != analog or eval_settings.placement != placement:
        raise ValueError("eval_settings must evaluate the configuration and placement that are trained for")
    out_dir = Path(out_dir or f"runs/hwa-{Path(model).name}")
    net, tokenizer = load_model_and_tokenizer(model)
    eval_ids = load_tokens(tokenizer, data, eval_split)
    data_id = f"{data}:{eval_split}"
    before = noise_sweep(net, eval_ids, eval_settings, out_dir / "before", model_id=model, data_id=data_id,
                         progress=progress)
    run = hwa_finetune_(net, tokenizer, load_tokens(tokenizer, data, train_split), analog, out_dir, settings, hwa,
                        placement, source=model, progress=progress)
    after = noise_sweep(net, eval_ids, eval_settings, out_dir / "after", model_id=str(run.checkpoint),
                        data_id=data_id, progress=progress)
    report = {"model": model, "config": config_label, "checkpoint": str(run.checkpoint), "steps": run.steps,
              "train_seconds": round(run.seconds, 1), "final_loss": run.losses[-1] if run.losses else None,
              "before": _side(before), "after": _side(after), "change": paired_noisy_change(before, after)}
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=1))
    if run.losses:
        plot_losses(run.losses, out_dir / "loss.png", f"HWA training of {model} on {config_label}: "
                    f"{run.steps} steps of {settings.batch_size} x {settings.seq_len} tokens, lr {settings.lr:g}")
    return HWAResult(run, before, after, report)

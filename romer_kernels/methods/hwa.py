"""Hardware-aware (HWA) fine-tuning: the retraining baseline the retraining-free methods are measured against.

``hwa_finetune_(model, tokenizer, train_ids, config, out_dir)`` converts the model (``analogize_`` with the
placement), switches it to HWA training mode (``nn.hwa``: every mini-batch sees a fresh training chip,
gradients straight through the periphery), and fine-tunes every parameter with AdamW on random windows of
``train_ids`` (the LM loss), in place. Every ``save_every`` steps and at the end it writes the digital
model to ``out_dir/model`` (a Hugging Face folder, loadable by ``romer eval --model``) together with
``hwa-state.pt`` (step, optimizer state, losses) and ``hwa.json`` (what was trained, how, at what cost);
the folder is replaced as a whole, so a crash leaves the previous save point intact. Called again with
the same arguments it resumes from that save point and draws what an uninterrupted run draws (the
batches and the training chips are functions of the step).

Memory: the digital weights, their gradients and AdamW's two moments; no chip is held (the training
forward draws each matrix's noisy tile weights when it needs them, and again in the backward).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from romer_kernels.config._fields import check_int, check_number
from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.hwa import HWAConfig
from romer_kernels.models.loading import INPUT_RANGES_FILE
from romer_kernels.moe.convert import Placement, analogize_, restore_digital_
from romer_kernels.nn.hwa import clip_analog_weights_, end_hwa_training_, hwa_training_
from romer_kernels.nn.model_helpers import analog_layers

STATE_FILE = "hwa-state.pt"
RECORD_FILE = "hwa.json"


@dataclass(frozen=True)
class HWATrainSettings:
    """The optimisation: ``steps`` AdamW steps on ``batch_size`` windows of ``seq_len`` tokens, learning rate
    ``lr`` with ``warmup`` linear warm-up steps then cosine decay to 10 %, gradient-norm clipping at
    ``grad_clip`` (0: none), a save point every ``save_every`` steps; ``data_seed`` picks the windows."""

    steps: int = 300
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 128
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50
    data_seed: int = 0

    def __post_init__(self) -> None:
        owner = "HWATrainSettings"
        for name in ("steps", "batch_size", "seq_len", "save_every"):
            check_int(owner, name, getattr(self, name), low=1)
        check_int(owner, "warmup", self.warmup, low=0)
        check_int(owner, "data_seed", self.data_seed, low=0)
        check_number(owner, "lr", self.lr, low=0)  # 0: nothing learns; with learn_input_range the ranges calibrate
        check_number(owner, "weight_decay", self.weight_decay, low=0)
        check_number(owner, "grad_clip", self.grad_clip, low=0)


@dataclass
class HWARun:
    """A finished (or resumed-and-finished) fine-tuning: where the checkpoint is and what it cost."""

    checkpoint: Path
    steps: int
    seconds: float                   # training time over all sessions (saves and evaluations excluded)
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0            # the step this call started at (0: from scratch)


def lr_at(step: int, settings: HWATrainSettings) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to 0.1 x ``lr`` at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    span = max(settings.steps - settings.warmup, 1)
    progress = min((step - settings.warmup) / span, 1.0)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(train_ids: torch.Tensor, step: int, settings: HWATrainSettings) -> torch.Tensor:
    """The [batch_size, seq_len] windows of step ``step``: random starts drawn from (data_seed, step) only."""
    count = train_ids.numel() - settings.seq_len
    if count < 1:
        raise ValueError(f"the training split has {train_ids.numel()} tokens, fewer than seq_len + 1 = "
                         f"{settings.seq_len + 1}")
    generator = torch.Generator().manual_seed(settings.data_seed * 1_000_003 + step)
    starts = torch.randint(0, count, (settings.batch_size,), generator=generator)
    return torch.stack([train_ids[s:s + settings.seq_len] for s in starts.tolist()])


def run_fingerprint(source: str, config: AnalogConfig, placement: Placement, settings: HWATrainSettings,
                    hwa: HWAConfig) -> dict[str, Any]:
    """What decides a fine-tuning's result: a save point is resumed only under the same fingerprint."""
    return {"source": source, "config": config.to_dict(), "placement": placement.to_dict(),
            "settings": dataclasses.asdict(settings), "hwa": dataclasses.asdict(hwa)}


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """``hwa.json`` of an HWA checkpoint folder (what was trained, steps, seconds), or None."""
    path = Path(checkpoint) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def saved_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The save point in ``out_dir`` (``model/hwa-state.pt``), or None."""
    path = Path(out_dir) / "model" / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _save(model: nn.Module, tokenizer, out_dir: Path, state: dict[str, Any], record: dict[str, Any],
          input_ranges: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the digital model, tokenizer, input ranges, state and record to ``out_dir/model``, replacing
    it as a whole."""
    final, staging, old = out_dir / "model", out_dir / "model.saving", out_dir / "model.old"
    shutil.rmtree(staging, ignore_errors=True)
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a save point prints nothing
    try:
        model.save_pretrained(staging)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    if input_ranges:
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file({name: t.contiguous() for name, t in input_ranges.items()}, str(staging / INPUT_RANGES_FILE))
    torch.save(state, staging / STATE_FILE)
    (staging / RECORD_FILE).write_text(json.dumps(record, indent=1))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def plot_losses(losses: list[float], path: str | Path, title: str = "") -> Path:
    """The training loss per step and its running mean over 20 steps."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.5, label="loss per step (one training chip each)")
    window = 20
    if len(losses) >= window:
        smooth = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
        ax.plot(range(window, len(losses) + 1), smooth, lw=1.8, label=f"running mean over {window} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hwa_finetune_(model: nn.Module, tokenizer, train_ids: torch.Tensor, config: AnalogConfig, out_dir: str | Path,
                  settings: HWATrainSettings = HWATrainSettings(), hwa: HWAConfig = HWAConfig(),
                  placement: Placement | None = None, source: str = "model", progress: bool = True) -> HWARun:
    """Fine-tune ``model`` (digital, as loaded) in place with HWA training (module docstring); the model is
    handed back digital with the trained weights. ``source`` names the model in the record and the
    fingerprint. Resumes a save point of the same fingerprint in ``out_dir``; refuses one of another."""
    placement = placement or Placement()
    out_dir = Path(out_dir)
    train_ids = torch.as_tensor(train_ids).reshape(-1)
    fingerprint = run_fingerprint(source, config, placement, settings, hwa)
    state = saved_state(out_dir)
    if state is not None and state["fingerprint"] != fingerprint:
        differ = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise ValueError(f"{out_dir} holds an HWA run with other {', '.join(differ)}; use another folder or "
                         "delete it")
    start_step, losses, seconds = 0, [], 0.0
    if state is not None:
        from romer_kernels.models.loading import load_model_and_tokenizer  # noqa: PLC0415

        # through transformers, which maps the saved layout (e.g. per-expert tensors) back to the model's own
        saved = load_model_and_tokenizer(str(out_dir / "model"))[0]
        with torch.no_grad():
            model.load_state_dict(saved.state_dict())
        del saved
        start_step, losses, seconds = state["step"], list(state["losses"]), float(state["seconds"])
        if state.get("input_ranges"):
            model.romer_input_ranges = dict(state["input_ranges"])
    params = [p for p in model.parameters() if p.requires_grad]
    # learned input ranges (hwa.learn_input_range): by layer id; the Parameters live in the training loop
    # across save points (every conversion after a save point takes the same ones: the optimizer steps them)
    ranges: dict[str, Any] = dict((state or {}).get("input_ranges") or {})
    range_updates: dict[str, torch.Tensor] = dict((state or {}).get("range_updates") or {})

    def save(step: int) -> None:
        restore_digital_(model)
        learned = {name: p.detach().clone() for name, p in ranges.items()}
        if learned:  # the model handed back (and its checkpoint) computes with them when converted again
            model.romer_input_ranges = learned
        record = {"source": source, "steps": step, "seconds": seconds, "final_loss": losses[-1] if losses else None,
                  "fingerprint": fingerprint}
        _save(model, tokenizer, out_dir, {"fingerprint": fingerprint, "step": step, "losses": losses,
                                          "seconds": seconds, "optimizer": optimizer.state_dict(),
                                          "input_ranges": learned,
                                          "range_updates": {n: t.clone() for n, t in range_updates.items()}},
              record, learned or getattr(model, "romer_input_ranges", None))

    def convert():
        analogize_(model, config, placement)
        training = hwa_training_(model, hwa, ranges, range_updates)
        ranges.update(training.input_ranges)
        range_updates.update(training.range_updates)
        return training

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "model"
    if start_step >= settings.steps:
        return HWARun(checkpoint, start_step, seconds, losses, start_step)
    training = convert()
    groups = [{"params": params}]
    if ranges:  # no weight decay: the range's own decay is in its gradient (InputRangeClamp)
        groups.append({"params": [ranges[name] for name in sorted(ranges)], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=settings.steps, initial=start_step, desc="HWA training", unit="step")
    try:
        for step in range(start_step, settings.steps):
            began = time.perf_counter()
            training.step = step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, settings)
            batch = batch_at(train_ids, step, settings).to(next(model.parameters()).device)
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"HWA training step {step}: the loss is {float(loss)} (lower --lr, or "
                                         f"resume from the save point in {checkpoint})")
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hwa.clip_sigma > 0:
                clip_analog_weights_(model, hwa.clip_sigma)
            losses.append(float(loss.detach()))
            seconds += time.perf_counter() - began
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = step + 1
            if done % settings.save_every == 0 or done == settings.steps:
                end_hwa_training_(model)
                save(done)
                if done < settings.steps:
                    training = convert()
    finally:
        if bar is not None:
            bar.close()
        model.eval()
        if next(analog_layers(model), None) is not None:   # interrupted between two save points
            end_hwa_training_(model)
            restore_digital_(model)
    return HWARun(checkpoint, settings.steps, seconds, losses, start_step)

"""One model per process, converted once per placement and re-programmed in place for every trial.

A trial is a chip: ``(seed, noise scale, drift time, variant)``. ``TrialRunner`` holds one model and its
evaluation (and calibration) tokens, evaluates the clean model once, then runs trials on that same
model: it converts it when the trial's placement differs from the current one (``restore_digital_`` +
``analogize_``, no weight copied), re-programs every chip in place with the trial's seed and scaled
noise (``program_analog_``; skipped when only the time differs), drifts it to the trial's time with the
read noise of the first drift call (so each time reads as a fresh chip drifted once would), restarts
the per-MVM noise counters and applies the variant's method, which it undoes before the next trial
(``undo_methods_``). Every trial's result is therefore the one a fresh copy of the clean model,
converted, programmed and drifted for that trial alone, gives (tests/test_sweep_executors.py), at the
memory of one converted model and the cost of programming + drift + evaluation per trial.

``Workload`` says where a runner finds its model and tokens, so that a process that runs trials (a Ray
worker) loads them itself instead of receiving them pickled from the driver.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.scaling import scale_noise
from romer_kernels.evaluation.lm_metrics import LMEval, NonFiniteOutput, evaluate_lm
from romer_kernels.evaluation.montecarlo import Trial
from romer_kernels.evaluation.variants import calibration_windows, variant_of
from romer_kernels.methods import undo_methods_
from romer_kernels.moe.convert import Placement, analogize_, check_placement, restore_digital_
from romer_kernels.nn.model_helpers import drift_analog_, program_analog_, reset_noise_counters

METRICS = ("ppl", "lis", "flip_rate", "overlap", "kl_to_clean", "cv", "entropy")


@dataclass
class SweepSettings:
    config: AnalogConfig
    placement: Placement = field(default_factory=Placement)
    seeds: tuple[int, ...] = (0, 1, 2)
    noise_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    times: tuple[float, ...] = (3600.0,)
    seq_len: int = 256
    batch_size: int = 8
    max_windows: int | None = 16
    tasks: tuple[str, ...] = ()         # lm-eval tasks scored on the clean model and on every chip
    task_limit: int | None = None       # documents per task (None: all)
    hwa_checkpoint: str | None = None   # HWA fine-tuned model folder the "hwa" variants evaluate

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if self.hwa_checkpoint is not None:
            self.hwa_checkpoint = str(self.hwa_checkpoint)
            if not (Path(self.hwa_checkpoint) / "model.safetensors").is_file():
                raise ValueError(f"hwa_checkpoint {self.hwa_checkpoint} is no HWA checkpoint folder (no "
                                 "model.safetensors): give the model/ folder that romer hwa-train wrote")
        if self.task_limit is not None and self.task_limit < 1:
            raise ValueError(f"task_limit must be a positive number of documents, got {self.task_limit}")
        fitted = getattr(self.config.noise, "FITTED_TIMES", None)
        if fitted is not None:  # a device model characterised at a few times only (ReRAM, Wan 2022)
            other = [t for t in self.times if float(t) not in fitted]
            if other:
                raise ValueError(f"the {self.config.noise.kind} device model is fitted only at t = "
                                 f"{', '.join(f'{t:g}' for t in fitted)} s (1 s, 1 day, 2 days); the sweep asks for "
                                 f"t = {', '.join(f'{float(t):g}' for t in other)} s: use --times "
                                 f"{' '.join(f'{t:g}' for t in fitted)}")

    def fingerprint(self, model_id: str, data_id: str) -> dict[str, Any]:
        out = {"model": model_id, "data": data_id, "config": self.config.to_dict(),
               "placement": self.placement.to_dict(), "seq_len": self.seq_len, "batch_size": self.batch_size,
               "max_windows": self.max_windows}
        if self.tasks:  # absent without tasks, so that stores made before tasks existed still resume
            out |= {"tasks": list(self.tasks), "task_limit": self.task_limit}
        return out

    @property
    def eval_args(self) -> dict[str, Any]:
        return dict(seq_len=self.seq_len, batch_size=self.batch_size, max_windows=self.max_windows)


class TrialResult(NamedTuple):
    """One finished trial: its metrics, seconds, and ``error`` (the reason) when it failed (then
    ``metrics`` is empty: nothing is reported from a failed trial)."""

    trial: Trial
    metrics: dict[str, float]
    seconds: float
    error: str | None = None


class Loaded(NamedTuple):
    """What a workload loads: the model, its evaluation and calibration tokens, its tokenizer (the
    downstream tasks tokenize their own documents; None where no task runs)."""

    model: nn.Module
    eval_ids: torch.Tensor
    calib_ids: torch.Tensor | None
    tokenizer: Any = None


def trial_metrics(result: LMEval) -> dict[str, float]:
    routing = result.routing
    metrics = {"ppl": result.perplexity, "nll": result.nll, **result.tasks}
    if result.crossbar_lis is not None:
        metrics["crossbar_lis"] = result.crossbar_lis
    if routing is not None:
        metrics.update(lis=routing.lis, cv=routing.cv, entropy=routing.entropy, max_over_mean=routing.max_over_mean)
        for name in ("flip_rate", "overlap", "kl_to_clean"):
            if getattr(routing, name) is not None:
                metrics[name] = getattr(routing, name)
    return metrics


@dataclass(frozen=True)
class Workload:
    """Where a sweep's model and tokens come from, loaded by the process that runs the trials.

    ``model``: a bundled name, a local folder or a hub id; ``data``: ``bundled``, a text file or
    ``hf:NAME:CONFIG[:SPLIT]``, its ``split`` evaluated and ``calib_split`` (if any) used for the methods'
    calibration; ``dtype`` of the digital weights; ``device`` the model runs on (``cuda`` on a GPU worker);
    ``backend`` the MVM backend the loading process uses (every Ray worker sets it for itself).
    """

    model: str
    data: str = "bundled"
    split: str = "test"
    calib_split: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    backend: str | None = None   # the MVM backend of the process that loads it (None: its default)

    @property
    def model_id(self) -> str:
        return self.model

    @property
    def data_id(self) -> str:
        return f"{self.data}:{self.split}"

    def load(self) -> Loaded:
        """The model in eval mode on ``device``, evaluation token ids, calibration token ids or None, and
        the tokenizer."""
        from romer_kernels.data.corpus import load_tokens  # noqa: PLC0415
        from romer_kernels.models.loading import load_model_and_tokenizer  # noqa: PLC0415

        if self.backend is not None:
            from romer_kernels.kernels.backends import resolve_backend, set_backend  # noqa: PLC0415

            resolve_backend(self.backend)  # says why when it cannot run in this process
            set_backend(self.backend)
        model, tokenizer = load_model_and_tokenizer(self.model, self.dtype)
        model = model.to(self.device)
        calib = None if self.calib_split is None else load_tokens(tokenizer, self.data, self.calib_split)
        return Loaded(model, load_tokens(tokenizer, self.data, self.split), calib, tokenizer)


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """BLAKE2b of the tensors' shapes, dtypes and bytes, in order (what a run folder's fingerprint keeps of
    the weights and tokens a sweep used: any changed value, dtype or shape changes it)."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        tensor = tensor.detach()
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        flat = tensor.reshape(-1).cpu().contiguous()
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


def group_trials(trials: Iterable[Trial]) -> list[list[Trial]]:
    """Trials that share one programming (same variant, noise scale and seed), each group's times in the
    order given. Groups of one variant come together (a runner converts the model once per placement and
    programs each group's chips once), variants and, within one, groups in order of first appearance."""
    groups: dict[tuple[str, float, int], list[Trial]] = {}
    for trial in trials:
        groups.setdefault((trial.variant, trial.noise_scale, trial.seed), []).append(trial)
    order = {variant: i for i, variant in enumerate(dict.fromkeys(variant for variant, _, _ in groups))}
    return sorted(groups.values(), key=lambda group: order[group[0].variant])  # stable: appearance order kept


class TrialRunner:
    """Runs trials on one model, converted and re-programmed in place (see the module docstring).

    The runner owns the model's analog state while it runs: the caller's model is converted by the first
    trial and made digital again (same Parameters, nothing written) by ``close``. ``calib_ids``: token ids
    the variants' placements and methods calibrate on (``calib_windows`` windows of ``seq_len``).
    ``clean``: the clean evaluation to compare routing with (computed here when not given; a sweep
    spread over processes gives every runner the same one).
    """

    def __init__(self, model: nn.Module, eval_ids: torch.Tensor, settings: SweepSettings,
                 calib_ids: torch.Tensor | None = None, calib_windows: int = 8, clean: LMEval | None = None,
                 tokenizer: Any = None) -> None:
        self.model = model.eval()
        self.eval_ids = eval_ids
        self.settings = settings
        self.tokenizer = tokenizer
        check_placement(model, settings.placement)  # before any result is stored
        if settings.tasks:
            if tokenizer is None:
                raise ValueError(f"tasks {', '.join(settings.tasks)} need the model's tokenizer (LoadedWorkload(..., "
                                 "tokenizer=...) or a Workload)")
            from romer_kernels.evaluation.tasks import check_tasks  # noqa: PLC0415

            check_tasks(settings.tasks)
        self.calib = None if calib_ids is None else calibration_windows(calib_ids, settings.seq_len, calib_windows)
        self._hwa: dict[str, torch.Tensor] | None = None  # the HWA checkpoint's weights, loaded when first needed
        self._hwa_cost: dict[str, float] = {}              # its training steps and seconds (hwa.json)
        # learned input ranges (HWA training) of the model's own weights and of the HWA checkpoint's, if any
        self._base_ranges = getattr(model, "romer_input_ranges", None)
        self._hwa_ranges: dict[str, torch.Tensor] | None = None
        self.identity = self._identity()  # of the clean model, before any conversion
        self.clean = clean if clean is not None else self._score()
        self._placements: dict[str, Placement] = {}
        self._placement: Placement | None = None       # of the current conversion (None: digital)
        self._programmed: tuple[float, int] | None = None
        self._time: float | None = None
        self._method_applied = False
        self._method_metrics: dict[str, float] = {}   # what the current trial's method did
        self._digital_share = 0.0                       # of the current placement's weight-matrix parameters
        self._weights = "base"                          # whose weights the model holds: "base" or "hwa"
        self._base_tensors: dict[str, torch.Tensor] = {}  # the model's own tensors while it holds the HWA ones

    def _identity(self) -> dict[str, Any]:
        """What, besides the settings, decides this runner's numbers: the digests of the weights and of
        the tokens, the weights' dtypes, the MVM backend and the package version (a run folder keeps them
        in its fingerprint, so results of another model file, corpus, dtype or backend never mix)."""
        from romer_kernels import __version__  # noqa: PLC0415
        from romer_kernels.kernels.backends import resolve_backend  # noqa: PLC0415

        state = self.model.state_dict()
        device = next(self.model.parameters()).device
        out = {"weights": tensor_digest(state[name] for name in sorted(state)),
               "dtype": sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()}),
               "tokens": tensor_digest([torch.as_tensor(self.eval_ids)]),
               "calib_tokens": None if self.calib is None else tensor_digest([self.calib]),
               "backend": resolve_backend(None, device), "version": __version__}
        ranges = getattr(self.model, "romer_input_ranges", None)
        if ranges:  # the model computes with learned input ranges
            out["input_ranges"] = tensor_digest(ranges[name] for name in sorted(ranges))
        if self.settings.hwa_checkpoint is not None:  # the fine-tuned weights, not the folder's name
            out["hwa_weights"] = tensor_digest(self._hwa_weights()[name] for name in sorted(self._hwa_weights()))
            if self._hwa_ranges:
                out["hwa_input_ranges"] = tensor_digest(self._hwa_ranges[name] for name in sorted(self._hwa_ranges))
        if self.settings.tasks:  # task scores also depend on the harness' version (prompts, metrics)
            from importlib.metadata import version  # noqa: PLC0415

            out["lm_eval"] = version("lm_eval")
        return out

    def _hwa_weights(self) -> dict[str, torch.Tensor]:
        """The HWA checkpoint's tensors by parameter name, in the model's dtypes and on its device."""
        if self._hwa is None:
            from romer_kernels.models.loading import load_model_and_tokenizer  # noqa: PLC0415

            folder = Path(self.settings.hwa_checkpoint)
            # through transformers, which maps the saved layout (e.g. per-expert tensors) to the model's own
            saved_model = load_model_and_tokenizer(str(folder))[0]
            saved = dict(saved_model.named_parameters())
            params = dict(self.model.named_parameters())
            unknown = sorted(set(saved) - set(params))
            missing = sorted(set(params) - set(saved))
            if unknown or missing:
                raise ValueError(f"HWA checkpoint {folder} does not fit the model: "
                                 f"{'unknown ' + ', '.join(unknown[:3]) if unknown else ''}"
                                 f"{' missing ' + ', '.join(missing[:3]) if missing else ''}")
            self._hwa = {name: saved[name].detach().to(dtype=params[name].dtype, device=params[name].device)
                         for name in params}
            self._hwa_ranges = getattr(saved_model, "romer_input_ranges", None)
            record = folder / "hwa.json"
            if record.is_file():
                import json  # noqa: PLC0415

                data = json.loads(record.read_text())
                self._hwa_cost = {"train_steps": float(data["steps"]), "train_seconds": float(data["seconds"])}
        return self._hwa

    def _set_input_ranges(self, ranges: dict[str, torch.Tensor] | None) -> None:
        if ranges:
            self.model.romer_input_ranges = ranges
        elif hasattr(self.model, "romer_input_ranges"):
            del self.model.romer_input_ranges

    def _use_weights(self, kind: str) -> None:
        """Let the model hold the base or the HWA weights: every Parameter's tensor swapped (no copy of
        either set; the chips see a new tensor and are programmed again)."""
        if kind == self._weights:
            return
        if kind == "hwa" and self.settings.hwa_checkpoint is None:
            raise ValueError("the hwa variants need SweepSettings.hwa_checkpoint (romer compare --hwa-checkpoint)")
        self._make_digital()
        params = dict(self.model.named_parameters())
        if kind == "hwa":
            for name, tensor in self._hwa_weights().items():
                self._base_tensors[name] = params[name].data
                params[name].data = tensor
            # and its learned input ranges, if it has any (the next conversion applies them)
            self._set_input_ranges(self._hwa_ranges)
        else:
            for name, tensor in self._base_tensors.items():
                params[name].data = tensor
            self._base_tensors = {}
            self._set_input_ranges(self._base_ranges)
        self._weights = kind
        self._programmed = self._time = None

    def placement(self, variant: str) -> Placement:
        """The placement of ``variant`` (the sweep's own for ``""``), computed once on the clean model."""
        if variant not in self._placements:
            spec = variant_of(variant)
            if spec is None:
                self._placements[variant] = self.settings.placement
            else:
                if spec.needs_calib:
                    self._require_calib(variant)
                self._make_digital()  # placement scores read the clean model
                self._placements[variant] = spec.placement(self.model, self.calib)
        return self._placements[variant]

    def _require_calib(self, variant: str) -> None:
        if self.calib is None:
            raise ValueError(f"variant {variant!r} needs calibration tokens (calib_ids)")

    def _make_digital(self) -> None:
        if self._method_applied:
            undo_methods_(self.model)
            self._method_applied = False
        if self._placement is not None:
            restore_digital_(self.model)
            self._placement = None
            self._programmed = self._time = None

    @torch.no_grad()
    def prepare(self, trial: Trial) -> nn.Module:
        """The model as trial ``trial``'s chip, ready to evaluate (method applied)."""
        variant = variant_of(trial.variant)
        self._use_weights("base" if variant is None else variant.weights)
        placement = self.placement(trial.variant)
        if self._method_applied:
            undo_methods_(self.model)
            self._method_applied = False
        config = scale_noise(self.settings.config, trial.noise_scale)
        if self._placement != placement:
            self._make_digital()
            analogize_(self.model, config, placement, seed=trial.seed)
            self._placement = placement
            self._programmed = None
            from romer_kernels.methods.placement import digital_fraction  # noqa: PLC0415

            self._digital_share = digital_fraction(self.model)
        if self._programmed != (trial.noise_scale, trial.seed):
            program_analog_(self.model, trial.seed, config=config)
            self._programmed, self._time = (trial.noise_scale, trial.seed), None
        if config.noise is not None and self._time != trial.t_inference:
            drift_analog_(self.model, trial.t_inference, drift_index=0)
            self._time = trial.t_inference
        reset_noise_counters(self.model)
        self._method_metrics = {}
        if variant is not None and variant.method is not None:
            self._require_calib(trial.variant)
            self._method_applied = True
            self._method_metrics = dict(variant.method(self.model, self.calib) or {})
        return self.model

    def _score(self, clean: LMEval | None = None) -> LMEval:
        """Perplexity and routing of the model as it is now, then the accuracy of each task (the tasks run
        after the perplexity windows, so a chip's task scores are as reproducible as its PPL)."""
        result = evaluate_lm(self.model, self.eval_ids, clean=None if clean is None else clean.trace,
                             **self.settings.eval_args)
        if self.settings.tasks:
            from romer_kernels.evaluation.tasks import task_accuracy  # noqa: PLC0415

            result.tasks = task_accuracy(self.model, self.tokenizer, self.settings.tasks, self.settings.task_limit)
        return result

    def evaluate(self, trial: Trial) -> LMEval:
        """Trial ``trial``'s evaluation, with its routing trace (and task scores). A non-finite output fails
        the trial with an error naming it (nothing is stored for it)."""
        self.prepare(trial)
        try:
            return self._score(self.clean)
        except NonFiniteOutput as error:
            raise NonFiniteOutput(f"trial {trial.key}: {error}") from None

    def run(self, trial: Trial) -> dict[str, float]:
        """The trial's metrics, plus what only the runner knows: the share of weight-matrix parameters its
        placement keeps digital, and what its method did (``replaced_experts``, ``replicas``)."""
        metrics = trial_metrics(self.evaluate(trial))
        cost = self._hwa_cost if self._weights == "hwa" else {}   # what the fine-tuning cost, from its hwa.json
        return metrics | {"digital_share": self._digital_share} | self._method_metrics | cost

    def run_group(self, trials: list[Trial]) -> list[TrialResult]:
        """The result of each trial, in order; a trial whose model output is not finite is a failed
        result with the reason (the other errors are raised: they would fail every trial)."""
        out = []
        for trial in trials:
            start = time.perf_counter()
            try:
                out.append(TrialResult(trial, self.run(trial), time.perf_counter() - start))
            except NonFiniteOutput as error:
                out.append(TrialResult(trial, {}, time.perf_counter() - start, str(error)))
        return out

    def close(self) -> None:
        """Give the model back digital (its own Parameters and tensors, unchanged); the chips are freed."""
        self._make_digital()
        self._use_weights("base")

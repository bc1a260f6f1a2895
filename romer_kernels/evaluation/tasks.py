"""Downstream task accuracy of a (possibly analog) causal LM, with lm-evaluation-harness.

``task_accuracy(model, tokenizer, tasks)`` runs lm-evaluation-harness (the ``lm_eval`` package, the
optional extra ``romer_kernels[lm_eval]``) on the model object as it is, so an analog model is scored
on its programmed chip, and returns ``{"acc:TASK": ..., "acc_norm:TASK": ...}`` for every task (the
metrics a sweep stores next to PPL and LIS). Runs are offline: nothing is downloaded at run time; a task
whose data is not in the local Hugging Face datasets cache fails with ``TaskDataMissing`` naming it.
The bundled task ``wiki_cloze`` (``romer_kernels.data.cloze``) ships its data, so it always runs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from torch import nn

from romer_kernels.data.cloze import TASKS_DIR

BUNDLED_TASKS = tuple(sorted(path.stem for path in TASKS_DIR.glob("*/*.yaml")))
TASK_METRICS = ("acc", "acc_norm")
TASK_BATCH_SIZE = 32   # requests per forward (the documents' contexts are short: larger batches are faster)
_EXTRA = "pip install 'romer_kernels[lm_eval]' (or pip install lm_eval)"


class TaskDataMissing(FileNotFoundError):
    """A task's dataset is neither bundled nor in the local datasets cache (runs are offline)."""


def _lm_eval():
    # offline before the Hugging Face libraries read their settings: no hub request, only the local cache
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(f"downstream tasks need lm-evaluation-harness: {_EXTRA} ({error})") from None
    return lm_eval


_MANAGERS: dict[bool, object] = {}


def _task_manager(tasks: tuple[str, ...]):
    """lm-eval's task index: the bundled tasks only when nothing else is asked for (indexing the ~15 000
    tasks lm-eval ships takes seconds), else everything. One per process."""
    _lm_eval()
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    full = not set(tasks) <= set(BUNDLED_TASKS)
    if full not in _MANAGERS:
        with _quiet():
            _MANAGERS[full] = TaskManager(include_path=str(TASKS_DIR), include_defaults=full)
    return _MANAGERS[full]


def check_tasks(tasks) -> tuple[str, ...]:
    """The task names, checked: lm-eval installed, no duplicates, every name a task lm-eval knows."""
    tasks = tuple(tasks)
    if not tasks:
        return tasks
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"tasks named twice: {', '.join(duplicates)}")
    known = set(_task_manager(tasks).all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; bundled: {', '.join(BUNDLED_TASKS)}; "
                         "`python -m lm_eval ls tasks` lists the others")
    return tasks


@contextlib.contextmanager
def _quiet(verbose: bool | None = None):
    """lm-eval and datasets log every step at INFO/WARNING; a sweep shows only its own progress
    (``verbose``, default ``$ROMER_VERBOSE`` = 1, which ``romer -v`` sets: their logs and bars)."""
    _lm_eval()
    if verbose is None:
        verbose = os.environ.get("ROMER_VERBOSE") == "1"
    import functools  # noqa: PLC0415
    from unittest import mock  # noqa: PLC0415

    import lm_eval.api.task  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    # lm-eval draws a bar while building each task's requests, with no option to turn it off
    bar = tqdm if verbose else functools.partial(tqdm, disable=True)
    try:
        with mock.patch.object(lm_eval.api.task, "tqdm", bar):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _missing_data(task: str, error: BaseException) -> TaskDataMissing:
    import datasets  # noqa: PLC0415

    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return TaskDataMissing(
        f"task {task!r}: its dataset is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}) and "
        f"runs are offline ({reason}); download it once where there is network (run lm-eval on the task with "
        "HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0) or copy a datasets cache here; the bundled "
        f"{', '.join(BUNDLED_TASKS)} always runs")


def load_task_dict(tasks: tuple[str, ...]) -> dict:
    """lm-eval's task objects with their documents loaded (``TaskManager.load``'s dict of tasks, groups and
    group map); a task without local data -> ``TaskDataMissing`` naming it."""
    manager = _task_manager(tasks)
    out = {"tasks": {}, "groups": {}, "group_map": {}}
    with _quiet():
        for task in tasks:  # one at a time, so that a failure names its task
            try:
                loaded = manager.load([task])
                for key in out:
                    out[key].update(loaded.get(key) or {})
            except (ConnectionError, OSError, FileNotFoundError) as error:
                raise _missing_data(task, error) from None
            except Exception as error:  # datasets raises its own (not OSError) when offline without a cache
                if "offline" in str(error).lower() or "couldn't" in str(error).lower() or "connect" in str(error).lower():
                    raise _missing_data(task, error) from None
                raise
    return out


def _harness_model(model: nn.Module, tokenizer, batch_size: int):
    """lm-eval's Hugging Face wrapper around this very model object (no copy, no reload)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    class QuietHFLM(HFLM):
        # per-request progress bars would print for every chip of a sweep
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    with _quiet():
        return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def task_accuracy(model: nn.Module, tokenizer, tasks, limit: int | None = None, batch_size: int = TASK_BATCH_SIZE,
                  verbose: bool | None = None) -> dict[str, float]:
    """``{"acc:TASK": ..., "acc_norm:TASK": ...}`` of ``model`` on each lm-eval task (zero-shot, the first
    ``limit`` documents of each when given). The model is used as it is (analog chips included) and left
    in eval mode."""
    tasks = check_tasks(tasks)
    if not tasks:
        return {}
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents per task, got {limit}")
    from lm_eval.evaluator import evaluate  # noqa: PLC0415

    model.eval()
    task_dict = load_task_dict(tasks)
    harness = _harness_model(model, tokenizer, batch_size)
    with _quiet(verbose):
        results = evaluate(harness, task_dict, limit=limit, bootstrap_iters=0, log_samples=False,
                           verbosity="INFO" if verbose or os.environ.get("ROMER_VERBOSE") == "1" else "ERROR")
    out = {}
    for task in tasks:
        scores = results["results"].get(task, {})
        for metric in TASK_METRICS:
            value = scores.get(f"{metric},none")
            if isinstance(value, (int, float)):
                out[f"{metric}:{task}"] = float(value)
        if not any(key.endswith(f":{task}") for key in out):
            raise ValueError(f"task {task!r} reports none of {TASK_METRICS} (it reports {sorted(scores)}); only "
                             "multiple-choice / log-likelihood tasks with accuracy metrics are supported")
    return out

"""Find a model and its tokenizer: a bundled name, a local folder, or a Hugging Face hub id."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"


def bundled_models() -> list[str]:
    """Names of the models shipped in the package (``romer_kernels/assets/models``)."""
    if not ASSETS.is_dir():
        return []
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


def resolve_model_path(name_or_path: str) -> str:
    """A bundled model's folder, an existing local folder, or the string itself (a hub id)."""
    if (ASSETS / name_or_path / "config.json").is_file():
        return str(ASSETS / name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers model folder")
        return str(path)
    known = ", ".join(bundled_models()) or "none"
    if name_or_path.count("/") != 1 or name_or_path.startswith(("/", ".")):
        raise FileNotFoundError(f"no model {name_or_path!r}: not a bundled model ({known}), a local folder, or a "
                                "hub id of the form owner/name")
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        # nothing is downloaded at run time: say so now instead of letting the hub client retry
        raise FileNotFoundError(f"no model {name_or_path!r}: no such local folder, not a bundled model ({known}), "
                                "and not in the local Hugging Face cache (nothing is downloaded at run time: "
                                "download it once, e.g. `huggingface-cli download OWNER/NAME`, or pass its folder)")
    return name_or_path


PROGRESS_BYTES = 1 << 30   # checkpoints from this size on show transformers' loading bar by default
# static input ranges learned by HWA training (romer hwa-train --learn-input-range), by analog layer id
INPUT_RANGES_FILE = "input_ranges.safetensors"


def load_model_and_tokenizer(name_or_path: str, dtype: str = "auto",
                             progress: bool | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` in eval mode; errors name the model and say what went wrong.

    ``dtype``: "auto" loads the checkpoint in its own dtype, straight from the file (a bfloat16 checkpoint
    never passes through float32); "float32" / "bfloat16" / "float16" load directly into that dtype.
    ``progress``: transformers' loading bar (with ETA); by default only for a local checkpoint of at least
    1 GiB (the bundled models load in well under a second and print nothing)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    path = resolve_model_path(name_or_path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype != "auto" and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    if progress is None and os.environ.get("ROMER_VERBOSE") == "1":
        progress = True
    if progress is None:
        folder = Path(path)
        progress = folder.is_dir() and sum(f.stat().st_size for f in folder.glob("*.safetensors")) >= PROGRESS_BYTES
    if not progress:  # transformers' per-file "Loading weights" bar: a second or less for the bundled models
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except ValueError as error:  # transformers: unrecognized configuration class / model type
        raise ValueError(f"{name_or_path}: unsupported architecture ({error})") from error
    except OSError as error:
        raise FileNotFoundError(f"{name_or_path}: could not load the model ({error}). Without network access "
                                "only bundled models and local folders work.") from error
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ranges_file = Path(path) / INPUT_RANGES_FILE
    if ranges_file.is_file():  # learned by HWA training: analogize_ gives every analog matrix its range
        from safetensors.torch import load_file  # noqa: PLC0415

        model.romer_input_ranges = load_file(str(ranges_file))
    return model.eval(), tokenizer


def load_model(name_or_path: str, dtype: str = "auto", progress: bool | None = None) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of a bundled model name (``tiny-olmoe``, from any working directory), a local
    checkpoint folder or a hub id in the local cache; the same as ``load_model_and_tokenizer``."""
    return load_model_and_tokenizer(name_or_path, dtype, progress)


def lm_forward(model: nn.Module, input_ids, **kwargs):
    """``model(input_ids, **kwargs)`` without a KV cache where the model has one (transformers models):
    scoring and calibration never reuse it, and hybrid models whose layers are all linear attention
    cannot build one."""
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)
    return model(input_ids, **kwargs)

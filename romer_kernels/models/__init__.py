"""Bundled tiny MoE language models (``tiny-olmoe``, ``tiny-deepseek``) and their training code.

Names are imported lazily, so ``import romer_kernels.models`` does not import transformers.
"""
from __future__ import annotations

import importlib

_TINY_NAMES = ("ARCHS", "MODELS_DIR", "build_model", "encode", "load_tiny", "main", "model_dir", "tiny_config",
               "train_tiny", "train_tokenizer")

__all__ = list(_TINY_NAMES)


def __getattr__(name: str):
    if name in _TINY_NAMES:
        return getattr(importlib.import_module("romer_kernels.models.tiny"), name)
    raise AttributeError(f"module 'romer_kernels.models' has no attribute {name!r}")

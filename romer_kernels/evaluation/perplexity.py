"""Perplexity helpers: of a causal LM on a token stream or a text, and of a unigram baseline.

Windows of ``seq_len`` tokens start every ``stride`` tokens (default ``stride = seq_len``: non-overlapping
windows). Every token after the first is predicted once, from the context inside its window; the loss is
the mean negative log-likelihood over all predicted tokens, and the perplexity is its exponential.
Tokens after the last full window are not scored. The windowing and batching are those of
``romer_kernels.evaluation.lm_metrics.evaluate_lm``, which also reports routing metrics.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from romer_kernels.evaluation.lm_metrics import evaluate_lm, windows


def _as_ids(token_ids) -> torch.Tensor:
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    if ids.numel() == 0:
        raise ValueError("token_ids is empty: there is no text to score")
    return ids


def _check_length(num_tokens: int, seq_len: int) -> None:
    if num_tokens < seq_len:
        raise ValueError(f"the text is too short: {num_tokens} tokens, but one window needs seq_len={seq_len} "
                         "tokens; pass a longer text or a smaller seq_len")


def perplexity(model: nn.Module, token_ids, seq_len: int = 256, stride: int | None = None, batch_size: int = 8,
               max_windows: int | None = None) -> float:
    """Perplexity of ``model`` on the 1-D ``token_ids`` (windows of ``seq_len``, ``stride`` = seq_len by default)."""
    ids = _as_ids(token_ids)
    _check_length(ids.numel(), seq_len)
    was_training = model.training
    model.eval()
    try:
        result = evaluate_lm(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                             max_windows=max_windows, trace=False)
    finally:
        model.train(was_training)
    return result.perplexity


def text_perplexity(model: nn.Module, tokenizer, text: str, seq_len: int = 256, stride: int | None = None,
                    batch_size: int = 8, max_windows: int | None = None) -> float:
    """Perplexity of ``model`` on ``text`` tokenised by ``tokenizer`` (no special tokens added)."""
    if not text:
        raise ValueError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # windowed before any forward
    return perplexity(model, ids, seq_len=seq_len, stride=stride, batch_size=batch_size, max_windows=max_windows)


def unigram_perplexity(train_ids, eval_ids, vocab_size: int, seq_len: int | None = None, stride: int | None = None,
                       smoothing: float = 1.0) -> float:
    """Perplexity of a unigram model (token frequencies of ``train_ids``, add-``smoothing``) on ``eval_ids``.

    With ``seq_len`` the same tokens as ``perplexity(..., seq_len, stride)`` are scored (the first token of
    every window has no prediction), so the two numbers are directly comparable; without it, every token.
    """
    train, target = _as_ids(train_ids), _as_ids(eval_ids)
    if int(train.max()) >= vocab_size or int(target.max()) >= vocab_size or int(min(train.min(), target.min())) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    counts = torch.bincount(train, minlength=vocab_size).double() + smoothing
    log_probs = counts.log() - counts.sum().log()
    if seq_len is None:
        scored = target
    else:
        _check_length(target.numel(), seq_len)
        scored = torch.cat([target[first:end] for _start, end, first in windows(target.numel(), seq_len, stride)])
    return math.exp(-float(log_probs[scored].mean()))

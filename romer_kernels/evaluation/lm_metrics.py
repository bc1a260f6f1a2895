"""Perplexity and routing of a (possibly analog) causal LM on a token stream, in one pass.

Windows of ``seq_len`` tokens start every ``stride`` tokens (``stride = seq_len``: non-overlapping, the
default). In each window only the tokens not scored by an earlier window count, so every token after
the first is predicted exactly once; with overlapping windows later tokens get more context (the usual
sliding-window perplexity). Windows are batched ``batch_size`` at a time; each batch is one forward, so
routing metrics are per batch as the Load-Imbalance Score requires.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from romer_kernels.moe.structure import moe_blocks
from romer_kernels.moe.routing import RoutingSummary, RoutingTrace, summarize, trace_routing
from romer_kernels.models.loading import lm_forward


class NonFiniteOutput(ValueError):
    """The model produced NaN or inf log-likelihoods: no metric of that evaluation means anything."""


@dataclass
class LMEval:
    perplexity: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    tokens: int             # scored tokens
    routing: RoutingSummary | None
    trace: RoutingTrace | None
    tasks: dict[str, float] = field(default_factory=dict)   # downstream task scores ("acc:TASK"), when run
    crossbar_lis: float | None = None   # LIS of the tokens each crossbar slot computes (after dispatch hooks)
    stream_tokens: int = 0              # tokens in the evaluated stream (``tokens`` of them are scored)


def windows(num_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, first scored position) of every window; at least one full window is required."""
    stride = seq_len if stride is None else stride
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if num_tokens < seq_len:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of seq_len={seq_len}")
    out, scored_until = [], 0
    for start in range(0, num_tokens - seq_len + 1, stride):
        end = start + seq_len
        out.append((start, end, max(scored_until, start + 1)))
        scored_until = end
    return out


@torch.no_grad()
def evaluate_lm(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 256, stride: int | None = None,
                batch_size: int = 8, max_windows: int | None = None, clean: RoutingTrace | None = None,
                trace: bool = True) -> LMEval:
    """Perplexity of ``model`` on the 1-D ``token_ids``; routing metrics if the model has MoE routers
    (against ``clean``, the trace of the clean model on the same windows, when given)."""
    token_ids = torch.as_tensor(token_ids).reshape(-1).long()
    spans = windows(token_ids.numel(), seq_len, stride)
    if max_windows is not None:
        spans = spans[:max_windows]
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0

    def run(record: RoutingTrace | None) -> None:
        nonlocal total_nll, total_tokens
        for first in range(0, len(spans), batch_size):
            batch = spans[first:first + batch_size]
            ids = torch.stack([token_ids[start:end] for start, end, _ in batch]).to(device)
            logits = lm_forward(model, ids).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:]
            nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)      # [B, L-1], target j+1
            positions = torch.arange(1, seq_len, device=device)
            scored = torch.stack([positions >= (score_from - start) for start, _, score_from in batch])
            scored_nll = nll[scored]
            finite = torch.isfinite(scored_nll)
            if not bool(finite.all()):
                raise NonFiniteOutput(f"the model's output is not finite: {int((~finite).sum())} of "
                                      f"{scored_nll.numel()} scored tokens of windows {first}..{first + len(batch) - 1} "
                                      "have a NaN or inf log-likelihood (NaN or inf weights or activations?); no "
                                      "metric is reported from it")
            total_nll += float(scored_nll.double().sum())
            total_tokens += int(scored.sum())

    summary, recorded = None, None
    if trace and _has_router(model):
        with trace_routing(model) as recorded:
            run(recorded)
        summary = summarize(recorded, clean)
    else:
        run(None)
    mean_nll = total_nll / total_tokens
    return LMEval(math.exp(mean_nll), mean_nll, total_tokens, summary, recorded,
                  crossbar_lis=_crossbar_lis(model, recorded), stream_tokens=token_ids.numel())


def _crossbar_lis(model: nn.Module, trace: RoutingTrace | None) -> float | None:
    """The load of the crossbars (what Replicate-and-Quantize and ROMER's copies balance): the router LIS
    when no dispatch hook shares an expert's tokens over several slots; None without routed experts."""
    if trace is None or not trace.layers:
        return None
    from romer_kernels.methods.replicate_quantize import slot_lis  # noqa: PLC0415

    try:
        return slot_lis(model, {name: (layer.num_experts, layer.indices) for name, layer in trace.layers.items()})
    except ValueError:  # routers traced, but none next to an experts module
        return None


def evaluate(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 256, stride: int | None = None,
             batch_size: int = 8, max_windows: int | None = None) -> LMEval:
    """Perplexity and routing metrics of ``model`` on ``token_ids`` (``evaluate_lm``; the package's
    top-level ``romer_kernels.evaluate``): ``.perplexity``, ``.nll``, ``.tokens``, ``.routing`` (LIS, CV,
    entropy, ...), ``.crossbar_lis``."""
    return evaluate_lm(model, token_ids, seq_len=seq_len, stride=stride, batch_size=batch_size,
                       max_windows=max_windows)


def _has_router(model: nn.Module) -> bool:
    return any(block.router for block in moe_blocks(model))

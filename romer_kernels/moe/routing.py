"""Routing analysis: trace what every MoE router decided, and the load-balance metrics of the field.

``trace_routing(model)`` records, per MoE layer, the router logits, the top-k expert indices and weights
of every token of every forward inside the ``with`` block, by forward hooks on the router modules: the
model's outputs are not changed and no module is swapped. transformers 5 routers return
``(logits, top_k_weights, top_k_index)``, which is recorded as is; a plain ``nn.Linear`` router (the
transformers 4 layout, or an ``AnalogLinear`` that replaced one) returns logits only, and its top-k is
taken as softmax top-k with the model's ``num_experts_per_tok``.

Metrics (``n_j``: tokens routed to expert j in one batch, ``n`` tokens, ``k`` experts per token,
``E`` experts; frequencies ``p_j = n_j / (n k)``):

- Load-Imbalance Score ``LIS = E * max_j n_j / (n k)`` (Replicate-and-Quantize's definition; 1 = perfectly
  balanced, E/k when every token goes to the same k experts), per layer and batch, reported as the
  mean over batches and layers;
- coefficient of variation ``std(n) / mean(n)`` and ``max(n) / mean(n)``;
- routing entropy ``-sum_j p_j ln p_j / ln E`` (1 = uniform load);
- ``KL(noisy || clean) = sum_j p_j ln(p_j / q_j)`` of expert frequencies (with 1e-9 smoothing);
- top-k overlap ``|S_noisy ∩ S_clean| / k`` averaged over tokens, and flip rate = fraction of tokens
  whose top-k set differs from the clean one.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from romer_kernels.moe.structure import moe_blocks


@dataclass
class LayerRouting:
    """What one MoE layer's router decided for every traced token."""

    num_experts: int
    logits: list[torch.Tensor] = field(default_factory=list)    # per forward: [tokens, E] float32
    indices: list[torch.Tensor] = field(default_factory=list)   # per forward: [tokens, k] int64
    weights: list[torch.Tensor] = field(default_factory=list)   # per forward: [tokens, k] float32

    @property
    def top_k_index(self) -> torch.Tensor:
        return torch.cat(self.indices) if self.indices else torch.empty(0, 0, dtype=torch.int64)

    @property
    def router_logits(self) -> torch.Tensor:
        return torch.cat(self.logits) if self.logits else torch.empty(0, self.num_experts)

    def counts(self) -> torch.Tensor:
        """Tokens routed to each expert, over everything traced."""
        return expert_counts(self.top_k_index, self.num_experts)

    def batch_counts(self) -> list[torch.Tensor]:
        """Tokens routed to each expert, per traced forward (batch)."""
        return [expert_counts(indices, self.num_experts) for indices in self.indices]


class RoutingTrace:
    """Per-layer routing records, in model order (``layers`` maps router module name -> LayerRouting)."""

    def __init__(self) -> None:
        self.layers: OrderedDict[str, LayerRouting] = OrderedDict()

    def counts(self) -> dict[str, torch.Tensor]:
        return {name: layer.counts() for name, layer in self.layers.items()}

    def lis(self) -> float:
        """Load-Imbalance Score per batch (traced forward), averaged over batches and layers."""
        return mean_over_layers(self, load_imbalance_score)

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.logits.clear()
            layer.indices.clear()
            layer.weights.clear()


def top_k_of(model: nn.Module) -> int | None:
    """Experts per token from the model's config (the field's name differs between architectures)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    config = getattr(config, "ffn_config", None) if hasattr(getattr(config, "ffn_config", None), "moe_top_k") else config
    for key in ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token", "moe_top_k"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def router_decision(output, num_experts: int, top_k: int | None, name: str = "router"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, E], weights [T, k], indices [T, k]) from a router's output, by what the tensors are,
    not where they sit: the integer tensor holds the indices, the float tensor of the indices' shape the
    weights, the first float tensor with one column per expert slot the logits (or scores). A router that
    returns scores only (a tensor, or ``(scores, logits)`` as Llama 4) has its top-k taken: softmax
    top-k of plain logits, the values themselves when it also returns other floats."""
    tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise TypeError(f"router {name} returned {type(output).__name__}; expected tensors")
    # [T, k] indices; flat sorted lists of (token, expert) pairs (JetMoE) are not a per-token decision
    integer = [t for t in tensors if not t.is_floating_point() and t.dim() >= 2]
    floats = [t for t in tensors if t.is_floating_point()]
    wide = [t for t in floats if t.dim() >= 1 and t.shape[-1] == num_experts]
    logits = wide[0] if wide else None
    if integer:
        indices = integer[0]
        weights = next((t for t in floats if t.shape == indices.shape), None)
        if weights is None:
            if logits is None:
                raise TypeError(f"router {name} returned indices but no weights of their shape")
            weights = logits.reshape(-1, num_experts).gather(-1, indices.reshape(-1, indices.shape[-1]).long())
        if logits is None:
            logits = torch.full((indices.reshape(-1, indices.shape[-1]).shape[0], num_experts), float("nan"))
        return logits, weights, indices
    if logits is None:
        raise TypeError(f"router {name} returned no tensor with {num_experts} expert columns")
    if top_k is None:
        raise ValueError(f"router {name} returns scores only and the model config has no top-k field")
    flat = logits.reshape(-1, num_experts).float()
    if len(floats) == 1:
        weights, indices = torch.softmax(flat, dim=-1).topk(top_k, dim=-1)
    else:
        weights, indices = flat.topk(top_k, dim=-1)
    return logits, weights, indices


@contextmanager
def trace_routing(model: nn.Module):
    """Record the routing of every forward inside the block; yields a ``RoutingTrace``. The routers are
    found by structure (``moe.structure.moe_blocks``): the module next to each experts module that scores
    every expert slot."""
    trace = RoutingTrace()
    k = top_k_of(model)
    handles = []
    modules = dict(model.named_modules())
    for block in moe_blocks(model):
        if block.router is None:
            continue
        name, slots = block.router, block.router_rows
        layer = trace.layers.setdefault(name, LayerRouting(slots))

        def hook(_module, _inputs, output, layer=layer, name=name):
            logits, weights, indices = router_decision(output, layer.num_experts, k, name)
            layer.logits.append(logits.detach().reshape(-1, layer.num_experts).float().cpu())
            layer.indices.append(indices.detach().reshape(-1, indices.shape[-1]).long().cpu())
            layer.weights.append(weights.detach().reshape(-1, weights.shape[-1]).float().cpu())

        handles.append(modules[name].register_forward_hook(hook))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no MoE router to trace")
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


# -- metrics ---------------------------------------------------------------------------------------
def expert_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert from a [tokens, k] index tensor."""
    flat = top_k_index.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts})")
    return torch.bincount(flat, minlength=num_experts).double()


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"expert counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError("expert counts must be non-negative")
    if float(counts.sum()) == 0:
        raise ValueError("expert counts are all zero: nothing was routed")
    return counts


def load_imbalance_score(counts: torch.Tensor, top_k: int | None = None) -> float:
    """``E * max_j n_j / (n k)``; with ``n k = sum_j n_j`` this is max load over mean load."""
    counts = _check_counts(counts)
    assignments = float(counts.sum())
    if top_k is not None and assignments % top_k:
        raise ValueError(f"counts sum to {assignments:g}, not a multiple of top_k={top_k}")
    return counts.numel() * float(counts.max()) / assignments


def coefficient_of_variation(counts: torch.Tensor) -> float:
    counts = _check_counts(counts)
    return float(counts.std(unbiased=False) / counts.mean())


def max_over_mean(counts: torch.Tensor) -> float:
    counts = _check_counts(counts)
    return float(counts.max() / counts.mean())


def routing_entropy(counts: torch.Tensor) -> float:
    """Entropy of the expert frequencies divided by ln E (1 = uniform, 0 = one expert takes all)."""
    counts = _check_counts(counts)
    if counts.numel() == 1:
        return 1.0
    p = counts / counts.sum()
    nonzero = p[p > 0]
    return float(-(nonzero * nonzero.log()).sum() / math.log(counts.numel()))


def frequency_kl(noisy_counts: torch.Tensor, clean_counts: torch.Tensor, eps: float = 1e-9) -> float:
    """KL(noisy || clean) of expert frequencies, in nats."""
    p, q = _check_counts(noisy_counts), _check_counts(clean_counts)
    if p.shape != q.shape:
        raise ValueError(f"count vectors differ in length: {p.numel()} vs {q.numel()}")
    p = (p / p.sum()).clamp_min(eps)
    q = (q / q.sum()).clamp_min(eps)
    return float((p * (p / q).log()).sum())


def top_k_overlap(noisy_index: torch.Tensor, clean_index: torch.Tensor) -> float:
    """Mean over tokens of |top-k set (noisy) ∩ top-k set (clean)| / k."""
    _check_pair(noisy_index, clean_index)
    same = (noisy_index[:, :, None] == clean_index[:, None, :]).any(dim=-1)
    return float(same.double().mean())


def flip_rate(noisy_index: torch.Tensor, clean_index: torch.Tensor) -> float:
    """Fraction of tokens whose top-k expert set differs from the clean one."""
    _check_pair(noisy_index, clean_index)
    noisy_sorted, _ = noisy_index.sort(dim=-1)
    clean_sorted, _ = clean_index.sort(dim=-1)
    return float((noisy_sorted != clean_sorted).any(dim=-1).double().mean())


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"routing index tensors must both be [tokens, k] of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("no tokens to compare")


def mean_over_layers(trace: RoutingTrace, metric) -> float:
    """A count metric (LIS, CV, ...) per layer and batch (traced forward), averaged over batches, then layers."""
    per_layer = []
    for layer in trace.layers.values():
        batches = [metric(counts) for counts in layer.batch_counts()]
        if batches:
            per_layer.append(sum(batches) / len(batches))
    if not per_layer:
        raise ValueError("the routing trace is empty: run a forward inside trace_routing()")
    return sum(per_layer) / len(per_layer)


@dataclass
class RoutingSummary:
    """Routing metrics of a trace, and against a clean trace of the same tokens when given."""

    lis: float
    cv: float
    max_over_mean: float
    entropy: float
    kl_to_clean: float | None = None
    overlap: float | None = None
    flip_rate: float | None = None


def summarize(trace: RoutingTrace, clean: RoutingTrace | None = None) -> RoutingSummary:
    summary = RoutingSummary(
        lis=mean_over_layers(trace, load_imbalance_score),
        cv=mean_over_layers(trace, coefficient_of_variation),
        max_over_mean=mean_over_layers(trace, max_over_mean),
        entropy=mean_over_layers(trace, routing_entropy),
    )
    if clean is not None:
        if list(clean.layers) != list(trace.layers):
            raise ValueError("the clean trace comes from a model with other MoE layers")
        layers = [(trace.layers[n], clean.layers[n]) for n in trace.layers if trace.layers[n].indices]
        summary.kl_to_clean = sum(frequency_kl(a.counts(), b.counts()) for a, b in layers) / len(layers)
        summary.overlap = sum(top_k_overlap(a.top_k_index, b.top_k_index) for a, b in layers) / len(layers)
        summary.flip_rate = sum(flip_rate(a.top_k_index, b.top_k_index) for a, b in layers) / len(layers)
    return summary

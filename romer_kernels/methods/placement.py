"""Heterogeneous analog/digital placement of routed experts (Chowdhury et al., arXiv 2603.02633).

``max_nn_scores(model)`` gives every routed expert its MaxNNScore: the product over its gate, up and down
matrices of the largest neuron l2 norm. ``digital_placement(model_or_scores, fraction, score)`` turns a
score into a ``Placement``: per MoE layer the top ``fraction`` of experts stay digital, and the densely
activated modules (attention, shared experts, dense MLPs, lm_head) stay digital. Baseline scores with the
same budget: activation frequency and mean routing weight on a calibration set, router-row norm, random.

Scores are ``{experts module name: tensor [E]}`` (higher = more deserving of a digital slot), keyed like
``Placement.digital_experts``. They read the digital weights, so they work on a digital model and on a
converted one alike.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from romer_kernels.moe.convert import Placement, is_fused_experts
from romer_kernels.moe.routing import trace_routing
from romer_kernels.models.loading import lm_forward

SCORES = ("maxnn", "frequency", "weight", "router_norm", "random")
NEURON_CONVENTIONS = ("hidden", "rows")
DENSE_CATEGORIES = ("attention", "shared_experts", "dense_mlp", "lm_head")


def _is_expert_list(module: nn.Module) -> bool:
    return (isinstance(module, nn.ModuleList) and len(module) > 0
            and all(all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")) for m in module))


def routed_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every routed-experts module of the model, by name: fused (transformers 5, digital or
    ``AnalogExperts``) or a ``ModuleList`` of per-expert MLPs with ``gate_proj/up_proj/down_proj``."""
    found = {}
    for name, module in model.named_modules():
        if "shared_expert" in name or not name:
            continue
        if is_fused_experts(module) or _is_expert_list(module):
            found[name] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no routed experts")
    return found


def expert_matrices(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digital (gate [E, I, H], up [E, I, H], down [E, H, I]) of a routed-experts module, detached, float32."""
    if is_fused_experts(experts):
        gate_up = experts.gate_up_proj.detach().float()
        inter = gate_up.shape[1] // 2
        return gate_up[:, :inter], gate_up[:, inter:], experts.down_proj.detach().float()
    stack = lambda attr: torch.stack([getattr(m, attr).weight.detach().float() for m in experts])  # noqa: E731
    return stack("gate_proj"), stack("up_proj"), stack("down_proj")


def max_nn_scores(model: nn.Module, convention: str = "hidden") -> dict[str, torch.Tensor]:
    """MaxNNScore of every routed expert: prod over gate, up, down of max_j ||neuron_j||_2.

    ``convention="hidden"`` (default): a neuron is a hidden unit j of the expert MLP, i.e. row j of gate and
    up ``[I, H]`` and column j of down ``[H, I]``. ``"rows"``: rows of every matrix as stored (for down,
    the output units).
    """
    if convention not in NEURON_CONVENTIONS:
        raise ValueError(f"unknown neuron convention {convention!r}; known: {', '.join(NEURON_CONVENTIONS)}")
    scores = {}
    for name, experts in routed_experts(model).items():
        gate, up, down = expert_matrices(experts)
        down_dim = 1 if convention == "hidden" else 2  # norm over H (columns) or over I (rows)
        scores[name] = (gate.norm(dim=2).amax(dim=1) * up.norm(dim=2).amax(dim=1)
                        * down.norm(dim=down_dim).amax(dim=1))
    return scores


def _router_weight(model: nn.Module, experts_name: str) -> torch.Tensor:
    """The scoring weight [E, H] of the router next to ``experts_name`` (found by structure)."""
    from romer_kernels.moe.structure import moe_blocks  # noqa: PLC0415

    for block in moe_blocks(model):
        if block.experts == experts_name and block.router:
            router = model.get_submodule(block.router)
            adapter = getattr(router, "analog", None)
            if adapter is not None and hasattr(adapter, "weight"):
                return adapter.weight
            return model.get_submodule(block.router_weights[0]).weight
    raise ValueError(f"no router next to {experts_name}")


def router_norm_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """l2 norm of each expert's router row."""
    return {name: _router_weight(model, name).detach().float().norm(dim=1)
            for name in routed_experts(model)}


@torch.no_grad()
def calibration_trace(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8):
    """Run ``calib_ids [N, T]`` through the model (batches of ``batch_size`` sequences) inside
    ``trace_routing``; returns the trace."""
    calib_ids = torch.as_tensor(calib_ids)
    if calib_ids.dim() == 1:
        calib_ids = calib_ids[None]
    with trace_routing(model) as trace:
        for start in range(0, calib_ids.shape[0], batch_size):
            lm_forward(model, calib_ids[start:start + batch_size])
    return trace


def _trace_scores(model: nn.Module, calib_ids, kind: str) -> dict[str, torch.Tensor]:
    if calib_ids is None:
        raise ValueError(f"score {kind!r} needs calibration data (calib_ids)")
    from romer_kernels.moe.structure import moe_blocks  # noqa: PLC0415

    trace = calibration_trace(model, calib_ids)
    router_of = {block.experts: block.router for block in moe_blocks(model)}
    scores = {}
    for name in routed_experts(model):
        layer = trace.layers[router_of[name]]
        counts = layer.counts().float()
        if kind == "frequency":
            scores[name] = counts / counts.sum()
        else:  # mean routing weight over the tokens that selected the expert (0 if never selected)
            weights = torch.cat(layer.weights).reshape(-1)
            mass = torch.zeros(layer.num_experts).index_add_(0, layer.top_k_index.reshape(-1), weights)
            scores[name] = mass / counts.clamp_min(1)
    return scores


def expert_scores(model: nn.Module, score: str = "maxnn", *, calib_ids: torch.Tensor | None = None, seed: int = 0,
                  convention: str = "hidden") -> dict[str, torch.Tensor]:
    """Scores of one kind (``SCORES``); ``frequency`` and ``weight`` need ``calib_ids``, ``random`` uses
    ``seed``."""
    if score == "maxnn":
        return max_nn_scores(model, convention)
    if score == "router_norm":
        return router_norm_scores(model)
    if score in ("frequency", "weight"):
        return _trace_scores(model, calib_ids, score)
    if score == "random":
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(len(_num(e)), generator=generator) for name, e in routed_experts(model).items()}
    raise ValueError(f"unknown score {score!r}; known: {', '.join(SCORES)}")


def _num(experts: nn.Module) -> range:
    return range(experts.gate_up_proj.shape[0] if is_fused_experts(experts) else len(experts))


def top_experts(scores: torch.Tensor, fraction: float) -> tuple[int, ...]:
    """Ids of the ``round(fraction * E)`` highest-scoring experts (half rounds up; ties: lower id first)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    scores = torch.as_tensor(scores, dtype=torch.float64)
    count = math.floor(fraction * scores.numel() + 0.5)
    order = sorted(range(scores.numel()), key=lambda e: (-float(scores[e]), e))
    return tuple(sorted(order[:count]))


def digital_placement(model_or_scores: nn.Module | dict[str, torch.Tensor], fraction: float = 0.125,
                      score: str = "maxnn", *, calib_ids: torch.Tensor | None = None, seed: int = 0,
                      convention: str = "hidden", base: Placement | None = None,
                      dense_digital: Iterable[str] = DENSE_CATEGORIES) -> Placement:
    """A ``Placement`` with the top ``fraction`` of routed experts per layer digital (by ``score``) and the
    ``dense_digital`` categories digital; everything else as in ``base`` (default ``Placement()``, so
    routers stay analog). ``model_or_scores``: a (digital) model, or precomputed scores."""
    if isinstance(model_or_scores, nn.Module):
        scores = expert_scores(model_or_scores, score, calib_ids=calib_ids, seed=seed, convention=convention)
    else:
        scores = dict(model_or_scores)
    base = base or Placement()
    data = base.to_dict()
    for category in dense_digital:
        if category not in data or not isinstance(data[category], bool):
            raise ValueError(f"unknown module category {category!r}")
        data[category] = False
    digital_experts = dict(data["digital_experts"])
    for name, values in scores.items():
        chosen = set(top_experts(values, fraction)) | set(digital_experts.get(name, ()))
        digital_experts[name] = tuple(sorted(chosen))
    data["digital_experts"] = digital_experts
    return Placement.from_dict(data)


def digital_fraction(model: nn.Module) -> float:
    """Fraction of all linear-layer / expert parameters that are digital in a converted model."""
    from romer_kernels.moe.convert import placement_report

    total = digital = 0
    for row in placement_report(model):
        total += row.parameters
        if row.kind == "digital":
            digital += row.parameters
        elif "experts digital" in row.kind:
            n = int(row.kind.split("(")[1].split()[0])
            module = model.get_submodule(row.module)
            digital += row.parameters * n // module.num_experts
    return digital / total if total else 0.0

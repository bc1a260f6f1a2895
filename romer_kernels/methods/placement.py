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

import dataclasses
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

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


# -- one part of the model at a time (sensitivity maps) ----------------------------------------------
PART_PREFIX = "only:"


@dataclass(frozen=True)
class Part:
    """One part of a model: a module category (or several, joined by ``+``: ``experts+router``), optionally
    in one decoder layer only, optionally one routed expert of that layer only. Its ``name``
    (``only:experts@3#5``) is a sweep variant: the model with this part analog and everything else digital
    (``part_placement``)."""

    category: str
    layer: int | None = None
    expert: int | None = None

    def __post_init__(self) -> None:
        from romer_kernels.moe.convert import CATEGORIES  # noqa: PLC0415

        names = self.category.split("+")
        for name in names:
            if name not in CATEGORIES:
                raise ValueError(f"unknown module category {name!r}; known: {', '.join(CATEGORIES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a category named twice in {self.category!r}")
        if self.expert is not None and (self.category != "experts" or self.layer is None):
            raise ValueError("a single expert is a part of category 'experts' in one layer (only:experts@L#E)")
        for what, value in (("layer", self.layer), ("expert", self.expert)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"Part.{what} must be a non-negative int, got {value!r}")

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.category.split("+"))

    @property
    def name(self) -> str:
        layer = "" if self.layer is None else f"@{self.layer}"
        expert = "" if self.expert is None else f"#{self.expert}"
        return f"{PART_PREFIX}{self.category}{layer}{expert}"

    @classmethod
    def parse(cls, name: str) -> "Part":
        match = re.fullmatch(rf"{PART_PREFIX}([a-z_+]+)(?:@(\d+))?(?:#(\d+))?", name)
        if match is None:
            raise ValueError(f"{name!r} is not a part name (only:CATEGORY, only:CATEGORY@LAYER or "
                             "only:experts@LAYER#EXPERT)")
        category, layer, expert = match.groups()
        return cls(category, None if layer is None else int(layer), None if expert is None else int(expert))


def decoder_layers(model: nn.Module) -> tuple[str, int]:
    """(name, length) of the model's list of decoder layers: the ``ModuleList`` of
    ``config.num_hidden_layers`` blocks (the first, outermost, such list)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, len(module)
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} decoder layers found")


def part_placement(model: nn.Module, part: Part) -> Placement:
    """The placement with only ``part`` analog: its category, in its layer when given (the other layers'
    modules digital), its expert when given (the layer's other experts digital)."""
    digital: tuple[str, ...] = ()
    digital_experts: dict[str, tuple[int, ...]] = {}
    if part.layer is not None:
        prefix, count = decoder_layers(model)
        if part.layer >= count:
            raise ValueError(f"{part.name}: the model has {count} decoder layers (0..{count - 1})")
        digital = tuple(pattern for j in range(count) if j != part.layer
                        for pattern in (f"{prefix}.{j}", f"{prefix}.{j}.*"))
    if part.expert is not None:
        prefix, _ = decoder_layers(model)
        layer_experts = {name: module for name, module in routed_experts(model).items()
                         if name.startswith(f"{prefix}.{part.layer}.")}
        if not layer_experts:
            raise ValueError(f"{part.name}: layer {part.layer} has no routed experts")
        for name, module in layer_experts.items():
            count = len(_num(module))
            if part.expert >= count:
                raise ValueError(f"{part.name}: {name} has {count} experts (0..{count - 1})")
            digital_experts[name] = tuple(e for e in range(count) if e != part.expert)
    return dataclasses.replace(Placement.all_digital_except(*part.categories), digital=digital,
                               digital_experts=digital_experts)


def model_parts(model: nn.Module, per_layer: bool = True, per_expert: bool = False,
                categories: Iterable[str] | None = None) -> list[Part]:
    """The parts of ``model`` a sensitivity sweep visits: every category that has a module to convert
    (whole, and per decoder layer when ``per_layer``; ``lm_head`` is one part), and every routed expert
    of every layer when ``per_expert``. Works on a meta-device model (no weights needed)."""
    from romer_kernels.moe.convert import CATEGORIES, conversion_plan  # noqa: PLC0415

    wanted = list(CATEGORIES if categories is None else categories)
    parts = []
    for category in wanted:
        whole = Part(category)
        if not conversion_plan(model, part_placement(model, whole))[0]:
            continue                                  # nothing of this category in the model
        parts.append(whole)
        if per_layer and category != "lm_head":
            _, count = decoder_layers(model)
            parts += [p for p in (Part(category, layer) for layer in range(count))
                      if conversion_plan(model, part_placement(model, p))[0]]
    if per_expert:
        prefix, count = decoder_layers(model)
        experts = routed_experts(model)
        for layer in range(count):
            members = [m for name, m in experts.items() if name.startswith(f"{prefix}.{layer}.")]
            if members:
                parts += [Part("experts", layer, e) for e in range(len(_num(members[0])))]
    return parts

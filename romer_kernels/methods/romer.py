"""ROMER (Zhou, Feng et al., arXiv 2605.11800): expert replacement and router recalibration under noise.

Retraining-free, on a converted (analog) model with transformers-5 routers (``router.analog``) and
``AnalogExperts``. The paper's abstract fixes the two stages; every detail below that it does not give is
our definition (see ``docs/methods.md``), with each threshold a parameter of ``RomerConfig``.

Stage 1, ``replace_experts_``: the noisy model runs the calibration set; an expert whose activation
frequency ``f_e`` (share of the layer's top-k assignments) is under ``tau_under / E`` is *cold*. The
coldest, at most ``floor(max_replaced_fraction * E)`` per layer, are replaced: the cold slot's crossbar is
reprogrammed with the weights of a donor (the most frequent experts, paired round-robin), with the cold
slot's own layer id, i.e. an independent noise draw; the cold expert's logit is shifted to -inf after the
ADC so the router cannot select it, and the experts layer drops any assignment that still reaches it
(sigmoid routers with a correction bias can still pick a -inf logit, with weight 0). Tokens the router
sends to a donor go to the donor and its copies: ``average`` (each computes the token, outputs averaged)
or ``split`` (the donor's tokens dealt round-robin over donor and copies, in token order).

Stage 2, ``recalibrate_router_``: per layer and expert, percentiles (default P5/P50/P95) of the raw noisy
logits after the ADC are matched by a least-squares affine map onto reference percentiles: the clean
router's logits on the same (noisy) hidden states (``clean``), the mean over the layer's experts of the
noisy percentiles (``self``), or the standardised logits ``(z - P50) / (P95 - P5)`` (``standardize``).
The map is set with ``router.analog.set_logit_affine``; the model's softmax/sigmoid, top-k and
normalisation rules run unchanged on the mapped logits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from romer_kernels.moe.convert import require_digital_weights
from romer_kernels.moe.routing import load_imbalance_score, router_decision, summarize, top_k_of, trace_routing
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.analog_matrix import AnalogMatrix
from romer_kernels.nn.analog_router import AnalogRouter
from romer_kernels.nn.analog_weight import AnalogWeight
from romer_kernels.nn.base import AnalogModule
from romer_kernels.models.loading import lm_forward

STAGES = ("replace", "recalibrate")
MODES = ("average", "split")
REFERENCES = ("clean", "self", "standardize")
MASK = float("-inf")


@dataclass(frozen=True)
class RomerConfig:
    """Settings of ``romer_`` (defaults: the proposals in ``docs/methods.md``)."""

    stages: tuple[str, ...] = STAGES
    # stage 1
    tau_under: float = 0.25                 # cold: f_e < tau_under / E
    max_replaced_fraction: float = 0.125    # at most floor(fraction * E) replaced per layer
    replace_budget: int | None = None       # instead: the r coldest experts per layer, whatever their frequency
    mode: str = "average"
    num_donors: int | None = None           # donors per layer; None = one donor per replaced expert
    # stage 2
    percentiles: tuple[float, ...] = (5.0, 50.0, 95.0)
    reference: str = "clean"
    min_scale: float = 1e-3                 # the fitted scale is clamped to [min_scale, max_scale]
    max_scale: float = 1e3
    # calibration passes
    batch_size: int = 8
    max_tokens: int = 65536                 # logits kept per layer for the percentiles (strided sample)

    def __post_init__(self) -> None:
        stages = (self.stages,) if isinstance(self.stages, str) else tuple(self.stages)
        if not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {self.stages!r}")
        object.__setattr__(self, "stages", tuple(s for s in STAGES if s in stages))
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown reference {self.reference!r}; known: {', '.join(REFERENCES)}")
        if self.tau_under < 0 or not 0 <= self.max_replaced_fraction < 1:
            raise ValueError("tau_under must be >= 0 and max_replaced_fraction in [0, 1)")
        if self.num_donors is not None and self.num_donors < 1:
            raise ValueError("num_donors must be positive")
        if self.replace_budget is not None and (isinstance(self.replace_budget, bool)
                                                or not isinstance(self.replace_budget, int) or self.replace_budget < 0):
            raise ValueError(f"replace_budget must be a non-negative int (experts per layer), got {self.replace_budget!r}")
        ps = tuple(float(p) for p in self.percentiles)
        if len(ps) < 2 or any(not 0 <= p <= 100 for p in ps) or len(set(ps)) != len(ps):
            raise ValueError(f"percentiles must be >= 2 distinct values in [0, 100], got {self.percentiles!r}")
        object.__setattr__(self, "percentiles", ps)
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError("need 0 < min_scale <= max_scale")
        if self.batch_size < 1 or self.max_tokens < 2:
            raise ValueError("batch_size must be >= 1 and max_tokens >= 2")


# -- the MoE layers of a converted model --------------------------------------------------------------
@dataclass
class MoELayer:
    router_name: str
    router: nn.Module
    experts_name: str
    experts: nn.Module

    @property
    def analog_router(self) -> AnalogRouter:
        adapter = getattr(self.router, "analog", None)
        if not isinstance(adapter, AnalogRouter):
            raise ValueError(f"router {self.router_name} is not analog: ROMER needs the logit hook of an analog "
                             "transformers-5 router (Placement(router=True))")
        return adapter

    @property
    def num_experts(self) -> int:
        adapter = getattr(self.router, "analog", None)
        weight = adapter.weight if adapter is not None else getattr(self.router, "weight", None)
        return weight.shape[0]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """(router, routed experts) of every MoE layer, found by structure (``moe.structure.moe_blocks``)."""
    from romer_kernels.moe.structure import moe_blocks  # noqa: PLC0415

    layers = [MoELayer(block.router, model.get_submodule(block.router), block.experts,
                       model.get_submodule(block.experts)) for block in moe_blocks(model) if block.router]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer (router next to experts)")
    return layers


def _masked(adapter: AnalogRouter) -> torch.Tensor:
    """Experts whose logit is masked (shift -inf after the ADC)."""
    if not adapter.affine:
        return torch.zeros(adapter.logit_shift.shape, dtype=torch.bool)
    return torch.isneginf(adapter.logit_shift)


# -- calibration pass ---------------------------------------------------------------------------------
@dataclass
class LayerStats:
    num_experts: int
    batch_counts: list[torch.Tensor] = field(default_factory=list)   # logical top-k counts per batch
    batch_indices: list[torch.Tensor] = field(default_factory=list)  # top-k index per batch
    noisy: list[torch.Tensor] = field(default_factory=list)          # sampled raw logits
    clean: list[torch.Tensor] = field(default_factory=list)          # clean router on the same hidden states

    @property
    def counts(self) -> torch.Tensor:
        return torch.stack(self.batch_counts).sum(0)

    @property
    def frequency(self) -> torch.Tensor:
        counts = self.counts
        return counts / counts.sum()


def _noise_counters(model: nn.Module) -> list[tuple[object, int]]:
    state = []
    for module in model.modules():
        if not isinstance(module, AnalogModule):
            continue
        if isinstance(vars(module).get("forward_calls"), int):
            state.append((module, module.forward_calls))
        for value in vars(module).values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, AnalogMatrix):
                    state.append((item, item.forward_calls))
    return state


@torch.no_grad()
def calibration_pass(model: nn.Module, calib_ids: torch.Tensor, *, batch_size: int = 8, logits: bool = False,
                     raw: bool = True, max_tokens: int = 65536) -> dict[str, LayerStats]:
    """Run ``calib_ids [N, T]`` through the model; per MoE layer (router name): top-k counts and indices
    per batch and, with ``logits=True``, a strided sample of at most ``max_tokens`` rows of the noisy
    logits and of the clean router's logits on the same hidden states. ``raw=True`` records the noisy
    logits before any recalibration map (masks stay). The per-MVM noise counters are left as found."""
    calib_ids = torch.as_tensor(calib_ids)
    if calib_ids.dim() == 1:
        calib_ids = calib_ids[None]
    stride = max(1, math.ceil(calib_ids.numel() / max_tokens))
    layers = moe_layers(model)
    stats: dict[str, LayerStats] = {}
    saved_affine, handles, recording = [], [], []
    counters = _noise_counters(model)
    top_k = top_k_of(model)
    for layer in layers:
        num_experts = layer.num_experts
        entry = stats.setdefault(layer.router_name, LayerStats(num_experts))
        adapter = getattr(layer.router, "analog", None)
        if raw and isinstance(adapter, AnalogRouter) and adapter.affine:
            saved_affine.append((adapter, adapter.logit_scale.clone(), adapter.logit_shift.clone()))
            mask = _masked(adapter)
            adapter.set_logit_affine(torch.ones(num_experts), torch.where(mask, MASK, 0.0))

        weight = adapter.weight if isinstance(adapter, AnalogWeight) else getattr(layer.router, "weight", None)
        # a router whose scoring weight is a child's (gate.wg, router.proj after a norm): its logits are what
        # its chip computes inside its forward, recorded there with the chip's own input
        inner = isinstance(adapter, AnalogWeight) and weight is not getattr(layer.router, "weight", None)
        if logits and not inner and not isinstance(getattr(layer.router, "weight", None), torch.Tensor):
            raise ValueError(f"router {layer.router_name} is digital and its scoring weight belongs to a child "
                             "module: ROMER's logit reference needs it analog (Placement(router=True))")
        if logits and inner:
            adapter.recording = []
            recording.append(adapter)

        def hook(module, inputs, output, entry=entry, num_experts=num_experts, name=layer.router_name, weight=weight,
                 adapter=adapter if inner else None):
            router_logits, _, index = router_decision(output, num_experts, top_k, name)
            index = index.detach().reshape(-1, index.shape[-1]).long().cpu()
            entry.batch_indices.append(index)
            entry.batch_counts.append(torch.bincount(index.reshape(-1), minlength=num_experts).double())
            if logits and adapter is not None:
                chip_in = torch.cat([x for x, _ in adapter.recording])
                chip_out = torch.cat([y for _, y in adapter.recording])
                adapter.recording = []
                entry.noisy.append(chip_out[::stride].float().cpu())
                entry.clean.append(F.linear(chip_in[::stride].float(), weight.detach().float()).cpu())
            elif logits:
                hidden = inputs[0].detach().reshape(-1, weight.shape[1])
                entry.noisy.append(router_logits.detach().reshape(-1, num_experts)[::stride].float().cpu())
                entry.clean.append(F.linear(hidden[::stride].float(), weight.detach().float()).cpu())

        handles.append(layer.router.register_forward_hook(hook))
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            lm_forward(model, calib_ids[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        for adapter in recording:
            adapter.recording = None
        for adapter, scale, shift in saved_affine:
            adapter.set_logit_affine(scale, shift)
        for owner, value in counters:
            owner.forward_calls = value
    return stats


# -- stage 2: percentile recalibration ----------------------------------------------------------------
def percentiles(x: torch.Tensor, ps: tuple[float, ...]) -> torch.Tensor:
    """Per column of ``x [N, E]``, the percentiles ``ps`` (linear interpolation, as numpy) -> [P, E]."""
    x = x.double().sort(dim=0).values
    n = x.shape[0]
    out = []
    for p in ps:
        pos = p / 100.0 * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(x[lo] + (pos - lo) * (x[hi] - x[lo]))
    return torch.stack(out)


def fit_affine(source: torch.Tensor, target: torch.Tensor, min_scale: float = 1e-3, max_scale: float = 1e3,
               eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, least-squares ``scale, shift`` with ``scale * source + shift ~ target`` (``[P, E]`` each);
    the scale is clamped to ``[min_scale, max_scale]`` and the shift refitted; a column with no spread
    gets scale 1 and a shift of the mean difference."""
    source, target = source.double(), target.double()
    xm, ym = source.mean(0), target.mean(0)
    var = ((source - xm) ** 2).sum(0)
    cov = ((source - xm) * (target - ym)).sum(0)
    scale = torch.where(var > eps, cov / var.clamp_min(eps), torch.ones_like(var)).clamp(min_scale, max_scale)
    return scale.float(), (ym - scale * xm).float()


def percentile_targets(noisy: torch.Tensor, clean: torch.Tensor | None, ps: tuple[float, ...],
                       reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(source, target) percentiles ``[P, E]`` of a layer for the chosen reference."""
    source = percentiles(noisy, ps)
    if reference == "clean":
        if clean is None:
            raise ValueError("reference 'clean' needs the clean router logits")
        return source, percentiles(clean, ps)
    if reference == "self":
        return source, source.mean(dim=1, keepdim=True).expand_as(source)
    median = percentiles(noisy, (50.0,))[0]
    lo, hi = percentiles(noisy, (min(ps),))[0], percentiles(noisy, (max(ps),))[0]
    return source, (source - median) / (hi - lo).clamp_min(1e-12)


@dataclass
class LogitMap:
    scale: list[float]
    shift: list[float]
    source_percentiles: list[list[float]]
    target_percentiles: list[list[float]]


@torch.no_grad()
def recalibrate_router_(model: nn.Module, calib_ids: torch.Tensor | None = None, config: RomerConfig | None = None,
                        stats: dict[str, LayerStats] | None = None) -> dict[str, LogitMap]:
    """Stage 2: fit and set the per-expert logit affine of every analog router; returns the maps by router
    name. Masked (replaced) experts keep their -inf shift. ``stats``: a ``calibration_pass(..., logits=True,
    raw=True)`` to reuse instead of running ``calib_ids``."""
    config = config or RomerConfig()
    if stats is None:
        if calib_ids is None:
            raise ValueError("recalibration needs calib_ids or stats")
        stats = calibration_pass(model, calib_ids, batch_size=config.batch_size, logits=True, raw=True,
                                 max_tokens=config.max_tokens)
    maps = {}
    for layer in moe_layers(model):
        adapter = layer.analog_router
        entry = stats[layer.router_name]
        if not entry.noisy:
            raise ValueError("the calibration stats hold no logits; run calibration_pass(logits=True)")
        mask = _masked(adapter)
        keep = ~mask
        noisy = torch.cat(entry.noisy)[:, keep]
        clean = torch.cat(entry.clean)[:, keep]
        source, target = percentile_targets(noisy, clean, config.percentiles, config.reference)
        scale_k, shift_k = fit_affine(source, target, config.min_scale, config.max_scale)
        scale, shift = torch.ones(layer.num_experts), torch.where(mask, MASK, 0.0)
        scale[keep], shift[keep] = scale_k, shift_k
        adapter.set_logit_affine(scale, shift)
        full_source = torch.full((len(config.percentiles), layer.num_experts), float("nan"))
        full_target = full_source.clone()
        full_source[:, keep], full_target[:, keep] = source.float(), target.float()
        maps[layer.router_name] = LogitMap(scale.tolist(), shift.tolist(), full_source.tolist(), full_target.tolist())
    return maps


# -- stage 1: expert replacement ----------------------------------------------------------------------
class ReplicaDispatch:
    """``AnalogExperts.dispatch`` hook: assignments to a dead (replaced) slot are dropped; assignments to an
    expert with copies go to it and its copies (``average``: all, weight / (1 + copies); ``split``: one,
    round-robin in token order within the call)."""

    def __init__(self, num_experts: int, copies: dict[int, list[int]], dead: set[int], mode: str = "average"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        self.num_experts, self.mode = num_experts, mode
        self.copies = {int(d): [int(c) for c in cs] for d, cs in copies.items() if cs}
        self.dead = {int(d) for d in dead}
        width = 1 + max((len(c) for c in self.copies.values()), default=0)
        table = torch.full((num_experts, width), -1, dtype=torch.long)
        table[:, 0] = torch.arange(num_experts)
        for donor, slots in self.copies.items():
            table[donor, 1:1 + len(slots)] = torch.tensor(slots)
        for slot in self.dead:
            table[slot] = -1
        self.table = table
        self.replicas = (table >= 0).sum(1)

    def __call__(self, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index_cpu = index.long().cpu()
        if self.mode == "average":
            new_index = self.table[index_cpu]                                   # [T, k, width]
            n = self.replicas[index_cpu].clamp_min(1).to(weights.dtype)
            new_weights = (weights.cpu()[..., None] / n[..., None]).expand(new_index.shape)
            new_weights = torch.where(new_index >= 0, new_weights, torch.zeros((), dtype=weights.dtype))
            tokens = index.shape[0]
            return new_index.reshape(tokens, -1).to(index.device), new_weights.reshape(tokens, -1).to(weights.device)
        new_index = index_cpu.clone()
        flat = new_index.reshape(-1)  # token-major: the j-th assignment of a donor in token order
        original = index_cpu.reshape(-1)
        for slot in self.dead:
            flat[original == slot] = -1
        for donor, slots in self.copies.items():
            where = (original == donor).nonzero().squeeze(1)
            ring = torch.tensor([donor] + slots)
            flat[where] = ring[torch.arange(where.numel()) % ring.numel()]
        return new_index.to(index.device), weights

    def physical_counts(self, index: torch.Tensor) -> torch.Tensor:
        """Assignments each crossbar slot computes for a router's ``index [T, k]``."""
        new_index, _ = self(index, torch.ones(index.shape))
        flat = new_index.reshape(-1)
        return torch.bincount(flat[flat >= 0], minlength=self.num_experts).double()


@dataclass
class Replacement:
    experts: str
    router: str
    frequency: list[float]          # noisy activation frequency before replacement
    replaced: dict[int, int]        # cold slot -> donor expert


def plan_replacement(frequency: torch.Tensor, tau_under: float = 0.25, max_replaced_fraction: float = 0.125,
                     num_donors: int | None = None, excluded: set[int] = frozenset(),
                     budget: int | None = None) -> dict[int, int]:
    """Cold slot -> donor for one layer: cold = ``f_e < tau_under / E`` (coldest first, at most
    ``floor(max_replaced_fraction * E)``), or with ``budget`` the ``budget`` coldest whatever their
    frequency; donors = the most frequent of the others, paired round-robin (coldest with most
    frequent). ``excluded``: experts that may be neither (already replaced)."""
    frequency = torch.as_tensor(frequency, dtype=torch.float64)
    num_experts = frequency.numel()
    free = [e for e in range(num_experts) if e not in excluded]
    if budget is not None:
        if budget >= len(free):
            raise ValueError(f"replace_budget={budget} leaves no donor among the {len(free)} experts of the layer "
                             "that can still be replaced")
        candidates, cap = free, budget
    else:
        cap = math.floor(max_replaced_fraction * num_experts + 1e-9)
        candidates = [e for e in free if float(frequency[e]) < tau_under / num_experts]
    cold = sorted(candidates, key=lambda e: (float(frequency[e]), e))[:cap]
    others = sorted((e for e in range(num_experts) if e not in cold and e not in excluded),
                    key=lambda e: (-float(frequency[e]), e))
    donors = others[: (num_donors or len(cold))]
    if cold and not donors:
        raise ValueError("no donor expert left")
    return {slot: donors[i % len(donors)] for i, slot in enumerate(cold)}


@torch.no_grad()
def apply_replacement_(layer: MoELayer, replaced: dict[int, int], mode: str = "average") -> ReplicaDispatch:
    """Give each cold slot its donor's weights (``AnalogExperts.set_slot_weights``, no copy; the slot's chip
    reprograms on next use with its own layer id: an independent noise draw), mask the slot's logit,
    install the dispatch hook. ``methods.undo_methods_`` undoes it."""
    experts = layer.experts
    if not isinstance(experts, AnalogExperts):
        raise ValueError(f"{layer.experts_name} is not AnalogExperts: expert replacement needs converted fused experts")
    adapter = layer.analog_router
    previous = experts.dispatch if isinstance(experts.dispatch, ReplicaDispatch) else None
    copies = {d: list(c) for d, c in (previous.copies.items() if previous else [])}
    dead = set(previous.dead) if previous else set()
    for slot, donor in sorted(replaced.items()):
        if slot == donor or donor in dead:
            raise ValueError(f"cannot replace expert {slot} by {donor}")
        # the slot computes with the donor's digital rows (views: no copy, the model's weights untouched);
        # its chips are programmed from them at the next use, with the slot's own layer ids
        experts.set_slot_weights(slot, *experts.expert_params(donor))
        copies.setdefault(donor, []).append(slot)
        dead.add(slot)
    mask = _masked(adapter) | torch.isin(torch.arange(layer.num_experts), torch.tensor(sorted(dead), dtype=torch.long))
    scale = adapter.logit_scale.clone() if adapter.affine else torch.ones(layer.num_experts)
    shift = adapter.logit_shift.clone() if adapter.affine else torch.zeros(layer.num_experts)
    adapter.set_logit_affine(torch.where(mask, 1.0, scale), torch.where(mask, MASK, shift))
    dispatch = ReplicaDispatch(layer.num_experts, copies, dead, mode)
    experts.dispatch = dispatch
    return dispatch


@torch.no_grad()
def replace_experts_(model: nn.Module, calib_ids: torch.Tensor | None = None, config: RomerConfig | None = None,
                     stats: dict[str, LayerStats] | None = None) -> list[Replacement]:
    """Stage 1 on every MoE layer; returns what was replaced (layers with no cold expert are untouched)."""
    require_digital_weights(model, "ROMER expert replacement")
    config = config or RomerConfig()
    if stats is None:
        if calib_ids is None:
            raise ValueError("expert replacement needs calib_ids or stats")
        stats = calibration_pass(model, calib_ids, batch_size=config.batch_size, raw=False)
    result = []
    for layer in moe_layers(model):
        frequency = stats[layer.router_name].frequency
        excluded = set()
        if isinstance(getattr(layer.experts, "dispatch", None), ReplicaDispatch):
            excluded = set(layer.experts.dispatch.dead)
        replaced = plan_replacement(frequency, config.tau_under, config.max_replaced_fraction, config.num_donors,
                                    excluded, config.replace_budget)
        if replaced:
            apply_replacement_(layer, replaced, config.mode)
        result.append(Replacement(layer.experts_name, layer.router_name, frequency.tolist(), replaced))
    return result


# -- both stages ---------------------------------------------------------------------------------------
def _physical_lis(model: nn.Module, stats: dict[str, LayerStats]) -> float:
    per_layer = []
    for layer in moe_layers(model):
        dispatch = getattr(layer.experts, "dispatch", None)
        batches = []
        for index in stats[layer.router_name].batch_indices:
            counts = (dispatch.physical_counts(index) if isinstance(dispatch, ReplicaDispatch)
                      else torch.bincount(index.reshape(-1), minlength=layer.num_experts).double())
            batches.append(load_imbalance_score(counts))
        per_layer.append(sum(batches) / len(batches))
    return sum(per_layer) / len(per_layer)


def _router_lis(stats: dict[str, LayerStats]) -> float:
    per_layer = [sum(load_imbalance_score(c) for c in s.batch_counts) / len(s.batch_counts) for s in stats.values()]
    return sum(per_layer) / len(per_layer)


@dataclass
class RomerReport:
    config: dict
    replacements: list[Replacement]
    maps: dict[str, LogitMap]
    lis_before: float                # crossbar load (= router load) before ROMER
    lis_after: float                 # crossbar load after: copies share or duplicate their donor's tokens
    lis_after_router: float          # the router's own top-k load after (replaced slots masked)
    frequency_after: dict[str, list[float]]
    flip_rate_before: float | None = None   # vs ``clean_model`` on the calibration set
    flip_rate_after: float | None = None

    @property
    def replaced(self) -> dict[str, dict[int, int]]:
        return {r.experts: r.replaced for r in self.replacements if r.replaced}

    def to_dict(self) -> dict:
        return asdict(self)


def _flip_rate(model: nn.Module, clean_trace, calib_ids: torch.Tensor, batch_size: int) -> float:
    counters = _noise_counters(model)
    try:
        with torch.no_grad(), trace_routing(model) as trace:
            for start in range(0, calib_ids.shape[0], batch_size):
                lm_forward(model, calib_ids[start:start + batch_size])
    finally:
        for owner, value in counters:
            owner.forward_calls = value
    return summarize(trace, clean_trace).flip_rate


@torch.no_grad()
def romer_(model: nn.Module, calib_ids: torch.Tensor, config: RomerConfig | None = None, *,
           clean_model: nn.Module | None = None) -> RomerReport:
    """ROMER in place on a converted model: stage 1 (expert replacement) then stage 2 (router
    recalibration), or the stages in ``config.stages``. ``clean_model``: the digital model, for the flip
    rates of the report. The per-MVM noise counters are left as found."""
    config = config or RomerConfig()
    calib_ids = torch.as_tensor(calib_ids)
    if calib_ids.dim() == 1:
        calib_ids = calib_ids[None]
    kwargs = dict(batch_size=config.batch_size, max_tokens=config.max_tokens)
    clean_trace = None
    flip_before = None
    if clean_model is not None:
        with trace_routing(clean_model) as clean_trace:
            for start in range(0, calib_ids.shape[0], config.batch_size):
                lm_forward(clean_model, calib_ids[start:start + config.batch_size])
        flip_before = _flip_rate(model, clean_trace, calib_ids, config.batch_size)
    only_recalibrate = "replace" not in config.stages
    stats = calibration_pass(model, calib_ids, logits=only_recalibrate, raw=only_recalibrate, **kwargs)
    lis_before = _physical_lis(model, stats)
    replacements, maps = [], {}
    if "replace" in config.stages:
        replacements = replace_experts_(model, config=config, stats=stats)
        if "recalibrate" in config.stages:  # routing changed: new statistics for stage 2
            stats = calibration_pass(model, calib_ids, logits=True, raw=True, **kwargs)
    if "recalibrate" in config.stages:
        maps = recalibrate_router_(model, config=config, stats=stats)
    after = calibration_pass(model, calib_ids, raw=False, **kwargs)
    return RomerReport(
        config=asdict(config), replacements=replacements, maps=maps, lis_before=lis_before,
        lis_after=_physical_lis(model, after), lis_after_router=_router_lis(after),
        frequency_after={name: s.frequency.tolist() for name, s in after.items()},
        flip_rate_before=flip_before,
        flip_rate_after=None if clean_trace is None else _flip_rate(model, clean_trace, calib_ids, config.batch_size),
    )

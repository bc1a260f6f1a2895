"""Replicate-and-Quantize (Liu et al., arXiv 2602.19938): load balancing at an unchanged memory budget.

Per MoE layer, on a calibration set: token counts ``n_j`` and an importance score per expert; the heavy
hitter(s) get low-precision replicas on their own crossbar tiles (ids ``E, E+1, ...`` of the layer, so each
replica has its own noise draw), and the least important experts are quantized to low precision so that
the bits of all expert weights do not grow (asserted). The router is unchanged; the tokens the router
sends to a replicated expert are dealt round-robin over the original and its replicas. Which steps follow
the paper and which are our definitions: ``docs/methods.md``.

Mechanism: the replicas are an ``AnalogExperts.extra_experts`` bank (``ReplicaBank``) and the token split
is an ``AnalogExperts.dispatch`` hook, composed with one already there (e.g. ROMER's replacement).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from romer_kernels.methods.romer import MoELayer, ReplicaDispatch, _noise_counters, calibration_pass, moe_layers
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.analog_matrix import AnalogMatrix
from romer_kernels.moe.convert import require_digital_weights
from romer_kernels.models.loading import lm_forward

IMPORTANCE = ("wanda", "ablation")


@dataclass(frozen=True)
class RQConfig:
    """Settings of ``replicate_quantize_`` (defaults reproduce the paper's single replica per layer)."""

    replicas: int = 1            # replicas per layer, chosen greedily (largest n_j / copies_j first)
    replica_bits: int = 8
    quant_bits: int = 8
    base_bits: int = 16          # precision the memory budget is counted in
    importance: str = "wanda"
    min_lis_gain: float = 0.01   # stop adding replicas when the layer's max load drops by less than this
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError("replicas must be >= 0")
        if not 2 <= self.quant_bits < self.base_bits or not 2 <= self.replica_bits <= self.base_bits:
            raise ValueError("need 2 <= quant_bits < base_bits and 2 <= replica_bits <= base_bits")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {self.importance!r}; known: {', '.join(IMPORTANCE)}")
        if self.min_lis_gain < 0 or self.batch_size < 1:
            raise ValueError("min_lis_gain must be >= 0 and batch_size >= 1")


def quantize_symmetric(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest symmetric quantization per output row (abs-max scale), returned dequantized."""
    levels = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    return (weight / scale).round().clamp(-levels, levels) * scale


class ReplicaBank:
    """Quantized replicas of experts on their own tiles: the ``extra_experts`` of an ``AnalogExperts``.
    Replica j of the layer is slot ``E + j`` with layer ids ``"<name>.<E+j>.gate_up_proj"`` etc."""

    def __init__(self, experts: AnalogExperts, donors: list[int], bits: int) -> None:
        self.experts = experts
        self.donors = [int(d) for d in donors]
        self.bits = bits
        self.gate_up_weights, self.down_weights, self.gate_up, self.down, self.digital = [], [], [], [], []
        num = experts.num_experts
        with torch.no_grad():
            for j, donor in enumerate(self.donors):
                donor_gate_up, donor_down = experts.expert_params(donor)
                gate_up = quantize_symmetric(donor_gate_up.detach().float(), bits)
                down = quantize_symmetric(donor_down.detach().float(), bits)
                self.gate_up_weights.append(gate_up)
                self.down_weights.append(down)
                self.digital.append(donor in experts.digital_experts)
                matrices = []
                for source, weight, kind in ((experts.gate_up[donor], gate_up, "gate_up_proj"),
                                             (experts.down[donor], down, "down_proj")):
                    matrix = AnalogMatrix(source.config, source.out_features, source.in_features,
                                          f"{experts.name}.{num + j}.{kind}", source.seed, source.mvm_noise)
                    matrix.set_input_range(source.input_range)  # a learned range (HWA) is the donor's inputs'
                    if source.t_inference is not None and not self.digital[j]:
                        matrix.drift(weight, source.t_inference)  # as old as the chip it joins
                    matrices.append(matrix)
                self.gate_up.append(matrices[0])
                self.down.append(matrices[1])

    @property
    def num_experts(self) -> int:
        return len(self.donors)

    def matrices(self):
        for j in range(self.num_experts):
            if not self.digital[j]:
                yield self.gate_up[j], self.gate_up_weights[j]
                yield self.down[j], self.down_weights[j]

    def forward(self, j: int, x: torch.Tensor, token_ids: torch.Tensor, call_index: int) -> torch.Tensor:
        if self.digital[j]:
            hidden = nn.functional.linear(x.float(), self.gate_up_weights[j])
        else:
            hidden = self.gate_up[j].matmul(x, self.gate_up_weights[j], row_ids=token_ids, call_index=call_index)
        hidden = self.experts.activation(hidden)
        if self.digital[j]:
            return nn.functional.linear(hidden, self.down_weights[j])
        return self.down[j].matmul(hidden, self.down_weights[j], row_ids=token_ids, call_index=call_index)


class ComposedDispatch:
    """Two dispatch hooks in a row (``first`` may drop assignments with -1; ``second`` keeps them)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second

    def __call__(self, index, weights):
        return self.second(*self.first(index, weights))


def _physical_index(experts: nn.Module, index: torch.Tensor) -> torch.Tensor:
    dispatch = getattr(experts, "dispatch", None)
    return dispatch(index, torch.ones(index.shape))[0] if dispatch is not None else index


def _slot_counts(experts: nn.Module, index: torch.Tensor, slots: int) -> torch.Tensor:
    flat = _physical_index(experts, index).reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=slots).double()


def crossbar_lis(model: nn.Module, stats) -> float:
    """LIS of the crossbar slots: ``E * max_slot n_slot / (n k)`` per layer and batch (E = the router's
    experts, so replicas lower it by sharing load), mean over batches and layers."""
    return slot_lis(model, {name: (s.num_experts, s.batch_indices) for name, s in stats.items()})


def slot_lis(model: nn.Module, routed: dict[str, tuple[int, list[torch.Tensor]]]) -> float:
    """``crossbar_lis`` from the router's top-k index of each batch (``{router name: (E, [index per
    batch])}``, e.g. from a routing trace): the tokens each crossbar slot computes after the experts'
    dispatch (ROMER copies, R&Q replicas), ``E * max_slot n_slot / (n k)``, mean over batches and layers."""
    from romer_kernels.moe.structure import moe_blocks  # noqa: PLC0415

    per_layer = []
    for block in moe_blocks(model):
        if block.router not in routed:
            continue
        num_experts, indices = routed[block.router]
        experts = model.get_submodule(block.experts)
        extra = getattr(experts, "extra_experts", None)
        slots = num_experts + (extra.num_experts if extra is not None else 0)
        batches = []
        for index in indices:
            counts = _slot_counts(experts, index, slots)
            batches.append(num_experts * float(counts.max()) / index.numel())
        if batches:
            per_layer.append(sum(batches) / len(batches))
    if not per_layer:
        raise ValueError("no routed batch of any MoE layer to count")
    return sum(per_layer) / len(per_layer)


# -- importance ------------------------------------------------------------------------------------------
@torch.no_grad()
def wanda_importance(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per experts module, ``S_j = sum |W| * ||X_c||_2`` over expert j's gate_up and down weights, with
    ``||X_c||`` the l2 norm over the calibration tokens routed to j of input feature c (hidden states for
    gate_up, the clean ``act(gate) * up`` for down). Experts that get no token score 0."""
    layers = moe_layers(model)
    sums = {}
    handles = []
    for layer in layers:
        experts = layer.experts
        sums[layer.experts_name] = [torch.zeros(experts.num_experts, experts.hidden_dim, dtype=torch.float64),
                                    torch.zeros(experts.num_experts, experts.intermediate_dim, dtype=torch.float64)]

        def pre_hook(module, args, acc=sums[layer.experts_name]):
            hidden, index = args[0].detach().float().cpu(), args[1].detach().long().cpu()
            for e in torch.unique(index).tolist():
                if e < 0 or e >= acc[0].shape[0]:
                    continue
                x = hidden[(index == e).any(dim=1)]
                inner = nn.functional.linear(x, module.expert_params(e)[0].detach().float())
                acts = module.activation(inner)
                acc[0][e] += (x.double() ** 2).sum(0)
                acc[1][e] += (acts.double() ** 2).sum(0)

        handles.append(layer.experts.register_forward_pre_hook(pre_hook))
    counters = _noise_counters(model)
    try:
        calib_ids = torch.as_tensor(calib_ids)
        for start in range(0, calib_ids.shape[0], batch_size):
            lm_forward(model, calib_ids[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
        for owner, value in counters:
            owner.forward_calls = value
    scores = {}
    for layer in layers:
        x_norm, a_norm = (t.sqrt() for t in sums[layer.experts_name])
        score = torch.zeros(layer.num_experts, dtype=torch.float64)
        for e in range(layer.num_experts):  # one expert at a time: no float64 copy of all experts
            gate_up, down = (w.detach().double().abs() for w in layer.experts.expert_params(e))
            score[e] = (gate_up * x_norm[e][None, :]).sum() + (down * a_norm[e][None, :]).sum()
        scores[layer.experts_name] = score.float()
    return scores


class _Drop:
    def __init__(self, expert: int) -> None:
        self.expert = expert

    def __call__(self, index, weights):
        return torch.where(index == self.expert, -1, index), weights


@torch.no_grad()
def ablation_importance(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per experts module, the rise of the calibration loss when expert j's outputs are dropped (its
    assignments removed in the experts layer; the router and the other experts' weights unchanged).
    Costs one calibration pass per expert."""
    calib_ids = torch.as_tensor(calib_ids)
    counters = _noise_counters(model)

    def loss() -> float:
        total = 0.0
        for start in range(0, calib_ids.shape[0], batch_size):
            batch = calib_ids[start:start + batch_size]
            total += float(lm_forward(model, batch, labels=batch).loss) * batch.shape[0]
        for owner, value in counters:
            owner.forward_calls = value
        return total / calib_ids.shape[0]

    base = loss()
    scores = {}
    for layer in moe_layers(model):
        experts = _analog_experts(layer)
        previous = experts.dispatch
        values = []
        try:
            for e in range(layer.num_experts):
                drop = _Drop(e)
                experts.dispatch = drop if previous is None else ComposedDispatch(previous, drop)
                values.append(loss() - base)
        finally:
            experts.dispatch = previous
        scores[layer.experts_name] = torch.tensor(values)
    return scores


# -- planning ---------------------------------------------------------------------------------------------
def plan_replicas(counts: torch.Tensor, replicas: int = 1, min_lis_gain: float = 0.01,
                  excluded: set[int] = frozenset()) -> list[int]:
    """Donor of each replica, greedily (as EPLB): the next replica goes to the expert with the largest
    ``n_j / copies_j``; stop early when the layer's max load per copy would drop by less than
    ``min_lis_gain`` (relative)."""
    load = torch.as_tensor(counts, dtype=torch.float64).clone()
    for e in excluded:
        load[e] = 0.0
    copies = torch.ones_like(load)
    donors = []
    for _ in range(replicas):
        per_copy = load / copies
        j = int(torch.argmax(per_copy))
        current = float(per_copy.max())
        if current <= 0:
            break
        copies[j] += 1
        after = float((load / copies).max())
        if (current - after) / current < min_lis_gain:
            copies[j] -= 1
            break
        donors.append(j)
    return donors


def quantized_needed(replicas: int, replica_bits: int, quant_bits: int, base_bits: int) -> int:
    """Experts to quantize so that ``replicas`` replicas fit: ``ceil(r * b_rep / (b0 - b_q))``."""
    return math.ceil(replicas * replica_bits / (base_bits - quant_bits))


def _analog_experts(layer: MoELayer) -> AnalogExperts:
    if not isinstance(layer.experts, AnalogExperts):
        raise ValueError(f"{layer.experts_name} is not AnalogExperts: convert the model first")
    layout = layer.experts.layout
    if layout.bias or layout.post_norm or layout.identity_experts or layout.all_tokens:
        # replicas compute gate/up, activation and down only: biases, a post-norm or identity slots would be lost
        raise NotImplementedError(f"{layer.experts_name}: Replicate-and-Quantize supports experts without biases, "
                                  f"post-norm, identity experts or all-token blocks, got {layout}")
    return layer.experts


@dataclass
class RQLayer:
    experts: str
    counts: list[float]
    importance: list[float]
    replicated: list[int]          # donor of each replica, replica j = slot E + j
    quantized: list[int]
    bits_before: int
    bits_after: int


@dataclass
class RQReport:
    config: dict
    layers: list[RQLayer]
    lis_before: float
    lis_after: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def replicate_quantize_(model: nn.Module, calib_ids: torch.Tensor, config: RQConfig | None = None) -> RQReport:
    """Replicate-and-Quantize in place on a converted model; returns the report (LIS of the crossbar
    slots before and after on the calibration set). Raises if a layer's budget cannot be kept."""
    require_digital_weights(model, "Replicate-and-Quantize")
    config = config or RQConfig()
    calib_ids = torch.as_tensor(calib_ids)
    if calib_ids.dim() == 1:
        calib_ids = calib_ids[None]
    layers = moe_layers(model)
    for layer in layers:
        _analog_experts(layer)
        if getattr(layer.experts, "extra_experts", None) is not None:
            raise ValueError(f"{layer.experts_name} already has replicas")
    stats = calibration_pass(model, calib_ids, batch_size=config.batch_size, raw=False)
    lis_before = crossbar_lis(model, stats)
    importance = (wanda_importance if config.importance == "wanda" else ablation_importance)(
        model, calib_ids, config.batch_size)
    rows = []
    for layer in layers:
        experts = layer.experts
        num = layer.num_experts
        index = torch.cat(stats[layer.router_name].batch_indices)
        counts = _slot_counts(experts, index, num)[:num]
        dead = set(getattr(experts.dispatch, "dead", ()) or ())
        donors = plan_replicas(counts, config.replicas, config.min_lis_gain, dead)
        need = quantized_needed(len(donors), config.replica_bits, config.quant_bits, config.base_bits) if donors else 0
        scores = importance[layer.experts_name]
        candidates = sorted((e for e in range(num) if e not in donors and e not in dead),
                            key=lambda e: (float(scores[e]), e))
        if need > len(candidates):
            raise ValueError(f"{layer.experts_name}: {len(donors)} replicas need {need} quantized experts, "
                             f"only {len(candidates)} can be")
        quantized = sorted(candidates[:need])
        size = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
        bits_before = num * size * config.base_bits
        bits_after = ((num - len(quantized)) * config.base_bits + len(quantized) * config.quant_bits
                      + len(donors) * config.replica_bits) * size
        assert bits_after <= bits_before, "Replicate-and-Quantize must keep the memory budget"
        for e in quantized:  # the slot's quantized weights, in the model's dtype; the model's own stay as they are
            gate_up, down = experts.expert_params(e)
            experts.set_slot_weights(e, quantize_symmetric(gate_up.float(), config.quant_bits).to(gate_up.dtype),
                                     quantize_symmetric(down.float(), config.quant_bits).to(down.dtype))
        if donors:
            experts.extra_experts = ReplicaBank(experts, donors, config.replica_bits)
            copies: dict[int, list[int]] = {}
            for j, donor in enumerate(donors):
                copies.setdefault(donor, []).append(num + j)
            split = ReplicaDispatch(num + len(donors), copies, set(), "split")
            experts.dispatch = split if experts.dispatch is None else ComposedDispatch(experts.dispatch, split)
        rows.append(RQLayer(layer.experts_name, counts.tolist(), scores.tolist(), donors, quantized,
                            bits_before, bits_after))
    after = calibration_pass(model, calib_ids, batch_size=config.batch_size, raw=False)
    return RQReport(asdict(config), rows, lis_before, crossbar_lis(model, after))

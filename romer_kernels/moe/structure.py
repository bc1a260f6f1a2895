"""Where the MoE layers of a model are: each block's routed experts and its router, found by structure.

Architectures name their routers ``gate``, ``router``, ``gate.wg``, ``router.proj``, ``router.layer``,
``router.classifier``, ... and some put router and experts straight into the decoder layer. What they
share is what the router computes: a module next to the experts whose weight has one row per expert
(``E``, or ``E`` plus zero-compute / padding slots) and whose forward decides the routing. So for every
experts module (fused experts, an expert list, parallel-expert linears) the router is the sibling
module -- preferring names and classes that say gate/router/gating -- that holds such a weight. Every
weight-carrying module inside it belongs to the router category (a router MLP is all routing), and the
sibling itself is what ``trace_routing`` hooks.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_ROUTER_WORDS = ("gate", "router", "gating")


@dataclass(frozen=True)
class MoeBlock:
    """One MoE layer: its experts module, expert count, and router (None when none was found)."""

    experts: str
    num_experts: int
    router: str | None            # the module whose forward routes (hooked by trace_routing)
    router_weights: tuple[str, ...]  # every weight-carrying module inside the router
    router_rows: int | None        # rows of the router's expert-scoring weight (E, or E + extra slots)


def _experts_count(name: str, module: nn.Module) -> tuple[int, int] | None:
    """(real experts, expert slots) of an experts module, else None."""
    for first in ("gate_up_proj", "up_proj"):
        weight, down = getattr(module, first, None), getattr(module, "down_proj", None)
        if isinstance(weight, nn.Parameter) and isinstance(down, nn.Parameter) and weight.dim() == 3 and down.dim() == 3:
            return down.shape[0], weight.shape[0]
    last = name.rsplit(".", 1)[-1]
    if last == "experts" and isinstance(module, nn.ModuleList) and len(module) > 1:
        return len(module), len(module)
    if last == "experts":  # experts stored as flat parameters of children (DBRX's w1 [E*I, H]) or counted
        count = getattr(module, "num_experts", None) or getattr(module, "moe_num_experts", None)
        if isinstance(count, int) and count > 1:
            return count, count
    weight = getattr(module, "weight", None)  # parallel-expert linears (JetMoE): weight [E, out, in]
    if isinstance(weight, nn.Parameter) and weight.dim() == 3 and isinstance(getattr(module, "num_experts", None), int):
        return module.num_experts, module.num_experts
    return None


def _zero_compute_slots(block: nn.Module) -> int:
    """Zero-compute expert slots a MoE block routes to and computes itself, outside its experts module
    (LongCat-Flash's ``zero_expert_num`` since transformers 5.25): the router scores them too."""
    count = getattr(block, "zero_expert_num", 0)
    return count if isinstance(count, int) and count > 0 else 0


def _scoring_rows(module: nn.Module, counts: tuple[int, int], zero_compute: int = 0) -> list[tuple[str, int]]:
    """Sub-modules of ``module`` (names relative to it) with a 2-D weight of one row per expert slot."""
    real, slots = counts
    rows = {real, slots, real + 1, slots + zero_compute}
    found = []
    for sub_name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] in rows:
            found.append((sub_name, weight.shape[0]))
    return found


def moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """Every MoE layer of ``model`` in module order."""
    blocks, taken = [], set()
    modules = dict(model.named_modules())
    for name, module in modules.items():
        counts = _experts_count(name, module) if name else None
        if counts is None or any(name.startswith(t + ".") for t in taken):
            continue
        taken.add(name)
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        candidates = []
        for sibling_name, sibling in parent.named_children():
            if sibling_name == child or "shared" in sibling_name or sibling_name in ("experts",):
                continue
            scoring = _scoring_rows(sibling, counts, _zero_compute_slots(parent))
            if not scoring:
                continue
            words = sibling_name.lower() + " " + type(sibling).__name__.lower()
            preferred = any(word in words for word in _ROUTER_WORDS)
            candidates.append((not preferred, sibling_name, sibling, scoring))
        router = router_rows = None
        router_weights: tuple[str, ...] = ()
        if candidates:
            _, sibling_name, sibling, scoring = min(candidates, key=lambda c: c[0])
            router = f"{parent_name}.{sibling_name}" if parent_name else sibling_name
            router_rows = scoring[0][1]
            router_weights = tuple(
                f"{router}.{n}" if n else router for n, sub in sibling.named_modules()
                if isinstance(getattr(sub, "weight", None), nn.Parameter) and sub.weight.dim() == 2)
        if router is not None and any(block.router == router for block in blocks):
            continue  # a second experts module of the same MoE layer (JetMoE's output_linear)
        blocks.append(MoeBlock(name, counts[0], router, router_weights, router_rows))
    return blocks


class ModuleRoles(set):
    """The names of every weight-carrying module inside a router (the set itself: the ``router``
    placement category), and in ``experts`` the names of the experts modules found by structure (those
    not recognisable by name, e.g. DBRX's ``ffn.experts`` or JetMoE's parallel-expert linears)."""

    def __init__(self, routers=(), experts=()) -> None:
        super().__init__(routers)
        self.experts = frozenset(experts)

    def in_experts(self, name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in self.experts)


def router_weight_modules(model: nn.Module) -> ModuleRoles:
    """The routers' weight-carrying modules and the experts modules of ``model`` (``ModuleRoles``)."""
    blocks = moe_blocks(model)
    experts = [name for name, module in model.named_modules() if name and _experts_count(name, module) is not None
               and not isinstance(module, nn.ModuleList)]
    return ModuleRoles({name for block in blocks for name in block.router_weights}, experts)


def sliced_expert_parameters(model: nn.Module) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Expert weights stored as slices of one parameter inside an experts module that is not a fused
    experts module: owner module name -> {parameter: (experts, rows, cols)} for a 3-D ``[E, rows, cols]``
    or a flat 2-D ``[E * rows, cols]`` parameter."""
    found: dict[str, dict[str, tuple[int, int, int]]] = {}
    for name, module in model.named_modules():
        counts = _experts_count(name, module) if name else None
        if counts is None or isinstance(module, nn.ModuleList) or _is_fused(module):
            continue
        experts = counts[0]
        for sub_name, sub in module.named_modules(prefix=name):
            if isinstance(sub, nn.Linear):
                continue
            for attr, p in sub.named_parameters(recurse=False):
                if p.dim() == 3 and p.shape[0] == experts:
                    found.setdefault(sub_name, {})[attr] = (experts, p.shape[1], p.shape[2])
                elif p.dim() == 2 and p.shape[0] > experts and p.shape[0] % experts == 0:
                    found.setdefault(sub_name, {})[attr] = (experts, p.shape[0] // experts, p.shape[1])
    return found


def _is_fused(module: nn.Module) -> bool:
    for first in ("gate_up_proj", "up_proj"):
        weight, down = getattr(module, first, None), getattr(module, "down_proj", None)
        if isinstance(weight, nn.Parameter) and isinstance(down, nn.Parameter) and weight.dim() == 3 and down.dim() == 3:
            return True
    return False

"""One-call conversion of a Hugging Face MoE model to analog hardware, with a placement policy.

``analogize_(model, config, placement)`` walks the model once and replaces, in place:

- fused routed experts (transformers 5: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) by
  ``AnalogExperts`` (each expert on its own tiles);
- ``nn.Linear`` modules by ``AnalogLinear`` (attention, dense MLPs, shared experts, lm_head, and the
  per-expert linears of transformers-4-style or remote-code models);
- router modules with a plain ``weight [E, H]`` by the same module with analog logits
  (``make_router_analog``), and ``nn.Linear`` routers by ``AnalogLinear``.

Which of these become analog is decided per module category by ``Placement``, then by the digital
override lists (fnmatch patterns on module names; per-expert ids per experts module). Parameters keep
their names, so the digital checkpoint keys are unchanged. Every chip's layer id is its module name,
so a model programmed with the same seed is the same chip whatever else is converted.

``restore_digital_(model)`` undoes the conversion in place: every analog module is replaced by the
digital module it was made from (the same Parameters, nothing copied), so one loaded model can be
converted with one placement after another (a Monte Carlo over placements holds one model).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.presets import resolve_config
from romer_kernels.moe.structure import moe_blocks, router_weight_modules, sliced_expert_parameters
from romer_kernels.nn.analog_experts import AnalogExperts, experts_layout
from romer_kernels.nn.analog_linear import AnalogLinear
from romer_kernels.nn.analog_router import make_router_analog
from romer_kernels.nn.analog_weight import (AnalogWeight, is_weight_analog, make_slices_analog, make_weight_analog,
                                            make_weight_digital, slice_of)
from romer_kernels.nn.base import AnalogModule
from romer_kernels.nn.model_helpers import apply_input_ranges_

CATEGORIES = ("experts", "shared_experts", "router", "attention", "dense_mlp", "lm_head", "other")
PROGRESS_PARAMETERS = 10**8   # programming a model this large takes long enough for a progress bar
_EXPERT_LINEAR = re.compile(r"(^|\.)experts\.(\d+)\.")


@dataclass(frozen=True)
class Placement:
    """Which parts of the model live on analog tiles. Defaults: everything but ``lm_head``.

    ``digital``: fnmatch patterns of module names that stay digital (e.g. ``"model.layers.0.*"``).
    ``digital_experts``: experts-module name -> expert ids that stay digital (heterogeneous placement).
    ``allow_digital``: weight matrices the package cannot put on crossbars (convolutions, unknown
    layouts) may stay digital: ``True`` (any), or fnmatch patterns of parameter names; by default
    ``analogize_`` refuses them (``UnsupportedWeights``). Those kept digital are listed in
    ``placement_report``.
    """

    experts: bool = True
    shared_experts: bool = True
    router: bool = True
    attention: bool = True
    dense_mlp: bool = True
    lm_head: bool = False
    other: bool = True
    digital: tuple[str, ...] = ()
    digital_experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    allow_digital: bool | tuple[str, ...] = False

    def __post_init__(self) -> None:
        for name in CATEGORIES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Placement.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.digital, str) or not all(isinstance(p, str) for p in self.digital):
            raise ValueError(f"Placement.digital must be a list of module-name patterns, got {self.digital!r}")
        object.__setattr__(self, "digital", tuple(self.digital))
        if not isinstance(self.digital_experts, dict):
            raise ValueError("Placement.digital_experts must map experts-module names to expert ids")
        clean = {}
        for module, ids in self.digital_experts.items():
            if not all(isinstance(e, int) and e >= 0 for e in ids):
                raise ValueError(f"Placement.digital_experts[{module!r}] must hold non-negative expert ids, got {ids!r}")
            clean[module] = tuple(sorted(set(ids)))
        object.__setattr__(self, "digital_experts", clean)
        _check_allow_digital(self.allow_digital)
        if not isinstance(self.allow_digital, bool):
            object.__setattr__(self, "allow_digital", tuple(self.allow_digital))

    def allows_digital(self, parameter: str) -> bool:
        """Whether an unsupported weight matrix (by parameter name) may stay digital."""
        if isinstance(self.allow_digital, bool):
            return self.allow_digital
        return any(fnmatch.fnmatchcase(parameter, pattern) for pattern in self.allow_digital)

    @classmethod
    def all_digital_except(cls, *categories: str) -> "Placement":
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown module categories {unknown}; known: {', '.join(CATEGORIES)}")
        return cls(**{name: name in categories for name in CATEGORIES})

    def is_digital(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.digital)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["digital"] = list(self.digital)
        data["digital_experts"] = {k: list(v) for k, v in self.digital_experts.items()}
        if not isinstance(self.allow_digital, bool):
            data["allow_digital"] = list(self.allow_digital)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Placement":
        """A placement from its JSON form; every field is checked for its type (a string where a list of
        patterns belongs is an error, not a list of single characters)."""
        if not isinstance(data, dict):
            raise ValueError(f"a placement is a JSON object of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Placement has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        data = dict(data)
        digital = data.get("digital", [])
        if not isinstance(digital, (list, tuple)) or not all(isinstance(p, str) for p in digital):
            raise ValueError(f"Placement.digital must be a list of module-name patterns (strings), got {digital!r}")
        experts = data.get("digital_experts", {})
        if not isinstance(experts, dict) or not all(
                isinstance(ids, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) for e in ids)
                for ids in experts.values()):
            raise ValueError("Placement.digital_experts must map experts-module names to lists of expert ids "
                             f"(integers), got {experts!r}")
        data["digital"] = tuple(digital)
        data["digital_experts"] = {k: tuple(v) for k, v in experts.items()}
        return cls(**data)  # __post_init__ checks allow_digital


def is_fused_experts(module: nn.Module) -> bool:
    """Routed experts fused over experts: 3-D ``gate_up_proj`` (or ``up_proj``, non-gated) and ``down_proj``."""
    first = getattr(module, "gate_up_proj", None)
    if not isinstance(first, nn.Parameter):
        first = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(first, nn.Parameter) and isinstance(down, nn.Parameter)
            and first.dim() == 3 and down.dim() == 3)


def is_router(name: str, module: nn.Module) -> bool:
    """A router: a module called ``gate``/``router`` (not a dense ``gate_proj``) with a 2-D weight."""
    last = name.rsplit(".", 1)[-1]
    weight = getattr(module, "weight", None)
    return last in ("gate", "router") and isinstance(weight, nn.Parameter) and weight.dim() == 2


def categorize(name: str, module: nn.Module, routers: set[str] | None = None) -> str:
    """The placement category of a module from its name and type; ``routers``: the names of the modules
    inside routers (``moe.structure.router_weight_modules``), else routers are recognised by name."""
    if "shared_expert" in name:
        return "shared_experts"
    if is_fused_experts(module) or _EXPERT_LINEAR.search(name + ".") or (
            routers is not None and hasattr(routers, "in_experts") and routers.in_experts(name)):
        return "experts"
    if (name in routers) if routers is not None else is_router(name, module):
        return "router"
    parts = name.split(".")
    if parts[-1] == "lm_head":
        return "lm_head"
    if any("attn" in part or "attention" in part for part in parts):
        return "attention"
    if any(part in ("mlp", "feed_forward", "ffn", "block_sparse_moe") for part in parts):
        return "dense_mlp"
    return "other"


def analogize_(model: nn.Module, config: AnalogConfig | str | None = None, placement: Placement | None = None,
               *, seed: int = 0, mvm_noise: bool = True, t_inference: float | None = None,
               keep_digital: bool = True, allow_digital: bool | tuple[str, ...] | None = None,
               progress: bool | None = None) -> nn.Module:
    """Convert ``model`` in place to analog hardware; returns the model.

    ``config``: an ``AnalogConfig`` or a preset name. ``placement``: which modules are analog
    (``Placement()`` by default). The analog layers wrap the model's own parameters (no copy, dtype
    kept). Chip state after the call: with ``t_inference=None`` nothing is programmed yet -- each chip is
    programmed with ``seed`` at its first forward (or by ``program_analog_``) and stays at t = 0 (no
    drift) until ``drift_analog_``; with ``t_inference`` every chip is programmed and drifted to that
    time during the conversion, one layer at a time.

    ``keep_digital=False`` frees the digital weights of the analog layers right after their chips are
    programmed (and drifted, with ``t_inference``), layer by layer, so the model then holds about one
    weight copy (the chips) instead of two; the chips are fixed from then on: ``program_analog_`` /
    ``drift_analog_`` and methods that read digital weights raise. Routers keep their (small) digital
    weights; fused experts with digital experts cannot drop theirs (``NotImplementedError``).

    No weight matrix stays digital unannounced: one the package cannot convert (a layout it does not
    know, a convolution, a weight tensor outside a linear layer) raises ``UnsupportedWeights`` naming
    each and why, unless ``allow_digital`` lets it stay digital (``True``: any; a list: parameter-name
    fnmatch patterns; ``None``: the placement's ``allow_digital``); those are then listed in
    ``model.romer_conversion["digital_unsupported"]`` and in ``placement_report``. Modules digital by ``placement`` and embedding tables are not counted.

    ``progress``: a progress bar (with ETA) over the modules while ``t_inference`` programs them; by
    default only from 10^8 weight parameters on (minutes on a CPU), never for the lazy conversion.

    Raises ``ValueError`` if nothing was converted, or if a digital override names a module that does
    not exist.
    """
    config = resolve_config(config)
    if t_inference is not None and not (float(t_inference) >= 0 and float(t_inference) != float("inf")):
        raise ValueError(f"t_inference must be a finite time in seconds >= 0 or None, got {t_inference!r}")
    placement = placement or Placement()
    if allow_digital is not None:  # checked by the Placement it goes into
        placement = dataclasses.replace(placement, allow_digital=allow_digital)
    if any(isinstance(m, AnalogModule) or is_weight_analog(m) for m in model.modules()):
        raise ValueError("model is already analog; convert a fresh copy")
    check_placement(model, placement)

    def finish(analog: AnalogModule) -> None:
        if t_inference is not None:
            analog.program_(seed).drift_(float(t_inference))
        if not keep_digital:
            analog.drop_digital_()

    routers = router_weight_modules(model)
    plan, reasons, slices = conversion_plan(model, placement, routers)
    whole = {n for name, kind, weight in plan if kind not in ("tensor", "tensor_t") for n in (name, weight)}
    left = unsupported_weights(model, placement, whole, reasons, routers,
                               {weight for _, kind, weight in plan if kind in ("tensor", "tensor_t")})
    # a tensor the probe forward saw in a product (reasons) is a weight matrix whatever its name
    tensors = {param: why for param, why in left.items()
               if not _is_matrix_param(model, param) and param.rpartition(".")[0] not in reasons}
    left = {param: why for param, why in left.items() if param not in tensors}
    allowed = {param: why for param, why in left.items() if placement.allows_digital(param)}
    refused = {param: why for param, why in left.items() if param not in allowed}
    if refused:  # before anything is converted: the model is left as it was
        shown = "; ".join(f"{param} ({why})" for param, why in list(refused.items())[:6])
        more = f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise UnsupportedWeights(
            f"{len(refused)} weight matrices of {type(model).__name__} cannot be put on crossbars: {shown}{more}. "
            "Pass allow_digital=True (CLI: --allow-digital all), or patterns of the parameters that may stay "
            "digital (e.g. '*.conv1d.weight'), to keep them digital and listed in the conversion report",
            refused)
    if not plan:
        raise ValueError(f"nothing in {type(model).__name__} was converted: no module matches the placement")
    steps = plan
    if t_inference is not None and (progress or (progress is None and sum(
            p.numel() for p in model.parameters() if p.dim() >= 2) >= PROGRESS_PARAMETERS)):
        from tqdm.auto import tqdm  # noqa: PLC0415

        steps = tqdm(plan, desc="programming chips", unit="module", leave=False)
    for name, kind, weight_name in steps:
        module = model.get_submodule(name)
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if kind in ("experts", "linear"):  # a new module takes the digital one's place
            if kind == "experts":
                analog = AnalogExperts.from_experts(module, config, name=name, seed=seed, mvm_noise=mvm_noise,
                                                    digital_experts=placement.digital_experts.get(name, ()))
            else:
                analog = AnalogLinear.from_linear(module, config, seed=seed, layer_id=name, mvm_noise=mvm_noise,
                                                  copy=False)
            analog.keep_digital_module(module)
            setattr(owner, child, analog)
            del module
            finish(analog)
            continue
        # the module keeps its place and forward; an adapter answers the products on its weights
        if kind == "slices":
            adapter = make_slices_analog(module, slices[name], config, name=name, seed=seed, mvm_noise=mvm_noise)
        elif kind in ("tensor", "tensor_t"):
            adapter = make_weight_analog(module, config, name=weight_name, seed=seed, mvm_noise=mvm_noise,
                                         transposed=kind == "tensor_t",
                                         weight=getattr(module, weight_name.rpartition(".")[2]))
        elif kind == "router":
            weight = model.get_submodule(weight_name).weight if weight_name != name else None
            adapter = make_router_analog(module, config, name=weight_name, seed=seed, mvm_noise=mvm_noise,
                                         weight=weight)
        else:
            adapter = make_weight_analog(module, config, name=name, seed=seed, mvm_noise=mvm_noise,
                                         transposed=kind == "conv1d", blocks=module.n_groups if kind == "grouped" else 1)
        if t_inference is not None:
            adapter.program_(seed).drift_(float(t_inference))
    # a model trained with learned input ranges (romer hwa-train --learn-input-range; models.loading attaches
    # them) computes with them: a chip of that model is what the training prepared it for
    ranges = getattr(model, "romer_input_ranges", None) or {}
    with_ranges = apply_input_ranges_(model, ranges) if ranges else 0
    if ranges and not with_ranges:
        raise ValueError(f"the model's {len(ranges)} learned input ranges fit none of its analog matrices (their layer "
                         "ids differ from the training's)")
    # remembered so that save_analog() can write how to rebuild the same analog model
    model.romer_conversion = {"config": config.to_dict(), "placement": placement.to_dict(), "seed": seed,
                              "mvm_noise": mvm_noise, "keep_digital": keep_digital,
                              "digital_unsupported": allowed, "digital_tensors": tensors,
                              "input_ranges": with_ranges}
    return model


def _is_matrix_param(model: nn.Module, param: str) -> bool:
    owner_name, _, attribute = param.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return ".experts." in f".{param}" or is_matrix_weight(owner, attribute, getattr(owner, attribute))


def conversion_plan(model: nn.Module, placement: Placement, routers: set[str] | None = None
                    ) -> tuple[list[tuple[str, str, str]], dict[str, str], dict[str, dict]]:
    """What ``analogize_`` converts, in module order: ``(module name, kind, weight module name)`` with kind
    ``experts``, ``linear``, ``router``, ``own_forward``, ``grouped`` or ``conv1d`` (``conversion_kind``);
    a router whose scoring weight is one ``nn.Linear`` child (``gate.wg``) is converted as a whole, with
    that child as its weight module; expert weights stored as slices of one parameter (``slices``, with
    the spec ``AnalogSlices`` takes) are found by one forward of 4 tokens that shows how the model
    multiplies them. Also the modules it wanted analog but cannot convert, with the reason."""
    routers = router_weight_modules(model) if routers is None else routers
    containers = {block.router: block.router_weights[0] for block in moe_blocks(model)
                  if block.router and len(block.router_weights) == 1 and block.router_weights[0] != block.router
                  and isinstance(model.get_submodule(block.router_weights[0]), nn.Linear)}
    plan, reasons, inside = [], {}, None
    candidates = {owner: attrs for owner, attrs in sliced_expert_parameters(model).items()
                  if placement.experts and not placement.is_digital(owner)}
    slices = _slice_specs(model, candidates, reasons) if candidates else {}
    for name, module in model.named_modules():
        if not name or placement.is_digital(name) or (inside is not None and name.startswith(inside)):
            continue
        if name in slices:
            plan.append((name, "slices", name))
            continue
        if name in containers:
            if placement.router and not placement.is_digital(containers[name]):
                plan.append((name, "router", containers[name]))
                inside = name + "."
            continue
        category = categorize(name, module, routers)
        if not getattr(placement, category):
            continue
        kind = conversion_kind(module)
        if kind == "experts":
            try:
                experts_layout(module)
            except (TypeError, NotImplementedError) as error:
                reasons[name] = str(error)
                continue
            inside = name + "."  # nothing inside a fused experts module is converted on its own
        elif kind == "linear":
            match = _EXPERT_LINEAR.search(name + ".")
            if match and _expert_is_digital(name, match, placement):
                continue
        elif kind in ("own_forward", "weight") and category == "router":
            kind = "router"
        elif kind not in ("own_forward", "grouped", "conv1d"):
            continue
        plan.append((name, kind, name))
    plan += _tensor_plan(model, placement, routers, plan, slices, reasons)
    return plan, reasons, slices


def _tensor_plan(model: nn.Module, placement: Placement, routers, plan, slices, reasons) -> list[tuple[str, str, str]]:
    """2-D parameters outside any linear layer that the model multiplies like a linear weight
    (``F.linear(x, p)``: kind ``tensor``; ``x @ p``: ``tensor_t``, stored [in, out]), found by one forward
    of 4 tokens; used otherwise (elementwise, einsum) they are left to ``unsupported_weights``."""
    import torch  # noqa: PLC0415

    taken = {entry[0] for entry in plan} | set(slices) | set(reasons)
    inside = [name + "." for name, kind, _ in plan if kind in ("experts", "router", "slices")]
    candidates = {}
    for name, module in model.named_modules():
        if (not name or name in taken or any(name.startswith(p) for p in inside) or placement.is_digital(name)
                or isinstance(module, (nn.Embedding, nn.Linear, nn.modules.conv._ConvNd))
                or not getattr(placement, categorize(name, module, routers))):
            continue
        own = [(attr, p) for attr, p in module.named_parameters(recurse=False) if p.dim() == 2 and min(p.shape) > 1]
        for attr, p in own:
            candidates[(name, attr)] = p
    if not candidates:
        return []
    uses = _watch_products(model, candidates)
    found, owners = [], {}
    for (name, attr), used in uses.items():
        if used:
            owners.setdefault(name, []).append((attr, used))
    for name, used in owners.items():
        cls = type(model.get_submodule(name)).__name__
        if len(used) > 1:  # one adapter per module
            reasons[name] = f"{cls}: {', '.join(a for a, _ in used)} all enter products; one analog weight per module"
            continue
        attr, how = used[0]
        if how == {"linear"}:
            found.append((name, "tensor", f"{name}.{attr}"))
        elif how == {"transposed"}:
            found.append((name, "tensor_t", f"{name}.{attr}"))
        else:
            reasons[name] = f"{cls}.{attr}: multiplied as {', '.join(sorted(how))}, which the package does not intercept"
    return found


def _watch_products(model: nn.Module, params: dict) -> dict[str, set[str]]:
    """How one forward of 4 tokens multiplies each tensor of ``params``: ``linear`` (``F.linear(x, p)``),
    ``transposed`` (``x @ p``) or ``other`` (any other product it enters)."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.overrides import TorchFunctionMode  # noqa: PLC0415

    from romer_kernels.moe.check import PRODUCTS  # noqa: PLC0415

    uses = {key: set() for key in params}
    matmuls = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)

    def same(tensor, param) -> bool:
        return (isinstance(tensor, torch.Tensor) and tensor.shape == param.shape and tensor.stride() == param.stride()
                and tensor.data_ptr() == param.data_ptr())

    def touches(value, param) -> bool:
        values = value if isinstance(value, (list, tuple)) else (value,)
        return any(isinstance(t, torch.Tensor) and t.device == param.device
                   and t.untyped_storage().data_ptr() == param.untyped_storage().data_ptr() for t in values)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in PRODUCTS:
                for name, param in params.items():
                    if func is F.linear and len(args) > 1 and same(args[1], param) and not touches(args[0], param):
                        uses[name].add("linear")
                    elif func in matmuls and len(args) == 2 and same(args[1], param) and not touches(args[0], param):
                        uses[name].add("transposed")
                    elif any(touches(v, param) for v in list(args) + list(kwargs.values())):
                        uses[name].add("other")
            return func(*args, **kwargs)

    _probe_forward(model, Watch())
    return uses


def _probe_forward(model: nn.Module, mode) -> bool:
    """One forward of 4 token ids under ``mode``; False when the model does not take token ids (no
    ``config.vocab_size``: not a language model), so nothing could be watched."""
    import torch  # noqa: PLC0415

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or any(p.device.type == "meta" for p in model.parameters()):
        return False  # not a language model, or no weights to run (a memory estimate on the meta device)
    ids = torch.arange(4).remainder(vocab)[None].to(next(model.parameters()).device)
    with torch.no_grad(), mode:
        try:
            model(ids, use_cache=False)
        except TypeError as error:  # a model without transformers' use_cache argument
            if "use_cache" not in str(error):
                raise
            model(ids)
    return True


def _slice_specs(model: nn.Module, candidates: dict[str, dict[str, tuple[int, int, int]]],
                 reasons: dict[str, str]) -> dict[str, dict[str, tuple[int, int, int, bool]]]:
    """How the model multiplies each sliced expert weight, from one forward of 4 tokens: slice ``s`` of a
    parameter as ``F.linear(x, s)`` / ``x @ s.T`` (the chip holds ``s``) or ``x @ s`` (it holds ``s.T``).
    A parameter used otherwise, both ways, or not at all goes to ``reasons``."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.overrides import TorchFunctionMode  # noqa: PLC0415

    params = {(owner, attr): (getattr(model.get_submodule(owner), attr), spec)
              for owner, attrs in candidates.items() for attr, spec in attrs.items()}
    seen: dict[tuple[str, str], set] = {key: set() for key in params}
    matmuls = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.linear or func in matmuls:
                operand = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
                for key, (param, (experts, rows, cols)) in params.items():
                    found = slice_of(operand, param, experts, rows, cols)
                    if found is not None:
                        as_transpose = found[1]
                        # F.linear(x, s) and x @ s.T: the chip holds s; x @ s: it holds s.T
                        seen[key].add(("linear" if not as_transpose else "other") if func is F.linear
                                      else ("linear" if as_transpose else "transposed"))
            return func(*args, **kwargs)

    _probe_forward(model, Watch())
    specs: dict[str, dict[str, tuple[int, int, int, bool]]] = {}
    for (owner, attr), uses in seen.items():
        experts, rows, cols = params[(owner, attr)][1]
        if len(uses) == 1 and uses <= {"linear", "transposed"}:
            specs.setdefault(owner, {})[attr] = (experts, rows, cols, uses == {"transposed"})
        else:
            how = "not multiplied in a forward" if not uses else f"multiplied as {', '.join(sorted(uses))}"
            reasons[owner] = f"{type(model.get_submodule(owner)).__name__}.{attr}: per-expert slices {how}"
    return {owner: spec for owner, spec in specs.items() if owner not in reasons}


class UnsupportedWeights(ValueError):
    """Weight matrices that cannot be put on crossbars, and no ``allow_digital`` lets them stay digital;
    ``weights`` maps each parameter name to the reason."""

    def __init__(self, message: str, weights: dict[str, str]) -> None:
        super().__init__(message)
        self.weights = weights


def _check_allow_digital(allow_digital) -> None:
    if isinstance(allow_digital, bool):
        return
    if isinstance(allow_digital, str) or not isinstance(allow_digital, (list, tuple)) or \
            not all(isinstance(p, str) for p in allow_digital):
        raise ValueError(f"Placement.allow_digital must be true/false or a list of parameter-name patterns, got "
                         f"{allow_digital!r}")


def conversion_kind(module: nn.Module) -> str | None:
    """How ``analogize_`` converts a module, from what its forward computes with its weights:
    ``experts`` (fused experts), ``linear`` (plain ``nn.Linear`` -> ``AnalogLinear``), ``own_forward``
    (an ``nn.Linear`` subclass with its own forward: wrapped, its forward kept), ``grouped`` (such a
    subclass applying ``n_groups`` row blocks with ``bmm``), ``conv1d`` (GPT-2's ``Conv1D``, weight
    ``[in, out]``), ``weight`` (another module with a 2-D ``weight``: converted when it is a router), or
    None (nothing to convert in this module itself)."""
    if is_fused_experts(module):
        return "experts"
    if isinstance(module, nn.Linear):
        if type(module).forward is nn.Linear.forward:
            return "linear"
        groups = getattr(module, "n_groups", None)
        if isinstance(groups, int) and groups > 1 and module.out_features % groups == 0:
            return "grouped"
        return "own_forward"
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter) and weight.dim() == 2 \
            and getattr(module, "nf", None) == weight.shape[1]:
        return "conv1d"
    if isinstance(weight, nn.Parameter) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
        return "weight"
    return None


def unsupported_weights(model: nn.Module, placement: Placement, converted: set[str] | None = None,
                        reasons: dict[str, str] | None = None, routers: set[str] | None = None,
                        converted_parameters: set[str] = frozenset()) -> dict[str, str]:
    """Parameters of two or more dimensions that stay digital although the placement wants them analog:
    parameter name -> why. ``converted``: the modules whose own parameters go (or went) analog (default:
    the analog modules of a converted model); ``converted_parameters``: single parameters that go analog.
    Embedding tables (a lookup, no MVM), modules digital by
    placement and experts digital by placement are not listed."""
    reasons = reasons or {}
    routers = router_weight_modules(model) if routers is None else routers
    covered = {id(p) for name, p in model.named_parameters() if name in converted_parameters}
    for name, module in model.named_modules():
        if (converted is not None and name in converted) or isinstance(module, AnalogModule):
            covered.update(id(p) for p in module.parameters(recurse=False))
            norm = getattr(module, "post_expert_norm", None)
            if isinstance(norm, nn.Module):  # digital like every norm; per-expert scales make its weight [E, H]
                covered.update(id(p) for p in norm.parameters())
        if is_weight_analog(module):
            covered.update(id(p) for p in module.analog.analog_weights())
    left = {}
    for owner_name, owner in model.named_modules():
        if isinstance(owner, nn.Embedding) or (owner_name and placement.is_digital(owner_name)):
            continue
        own = [(n, p) for n, p in owner.named_parameters(recurse=False) if p.dim() >= 2 and id(p) not in covered]
        if not own:
            continue
        category = categorize(owner_name, owner, routers) if owner_name else "other"
        if not getattr(placement, category):
            continue
        match = _EXPERT_LINEAR.search(owner_name + ".")
        if match and _expert_is_digital(owner_name, match, placement):
            continue
        for attribute, parameter in own:
            covered.add(id(parameter))
            full = f"{owner_name}.{attribute}" if owner_name else attribute
            left[full] = reasons.get(owner_name) or _why_digital(owner, attribute, parameter)
    return left


def _class_name(module: nn.Module) -> str:
    """The module's own class name (not that of the analog subclass swapped in)."""
    return type(module).__mro__[1].__name__ if is_weight_analog(module) else type(module).__name__


def _why_digital(owner: nn.Module, attribute: str, parameter: nn.Parameter) -> str:
    cls = _class_name(owner)
    if isinstance(owner, nn.modules.conv._ConvNd):
        depthwise = owner.groups == owner.in_channels and owner.groups > 1
        return f"{cls}: {'depthwise ' if depthwise else ''}convolutions are not supported"
    if parameter.dim() == 3:
        return f"{cls}.{attribute} {tuple(parameter.shape)}: a 3-D weight in a layout the package does not know"
    return f"{cls}.{attribute} {tuple(parameter.shape)}: a weight of a module the package does not know"


def is_matrix_weight(owner: nn.Module, attribute: str, parameter: nn.Parameter) -> bool:
    """Whether a parameter left digital is a weight matrix by its structure: a convolution's weight, a
    3-D per-expert weight, or a 2-D ``weight``. Other 2-D tensors (``A_log``, position biases, per-head
    scales, correction biases) are used elementwise in the architectures known; ``check_conversion``
    tells for sure by watching a forward."""
    return (isinstance(owner, nn.modules.conv._ConvNd) or parameter.dim() >= 3
            or (attribute == "weight" and min(parameter.shape) > 1))


def restore_digital_(model: nn.Module) -> nn.Module:
    """Undo ``analogize_`` in place: every analog module gives way to the digital module it was converted
    from (same Parameters, nothing copied) and every router gets its own class back. The chips and any
    method state on them (router maps, expert replicas, slot weights) go with the analog modules.
    Returns the model, digital again; raises if it was not converted by ``analogize_`` or dropped its
    digital weights."""
    conversion = getattr(model, "romer_conversion", None)
    if not isinstance(conversion, dict):
        raise ValueError(f"{type(model).__name__} was not converted by analogize_: nothing to restore")
    if not conversion.get("keep_digital", True):
        raise ValueError("the model dropped its digital weights (analogize_(..., keep_digital=False)): load it "
                         "again instead of restoring it")
    for name in [name for name, _ in model.named_modules()]:
        try:
            module = model.get_submodule(name) if name else model
        except AttributeError:  # inside a module restored earlier in the loop
            continue
        if isinstance(module, (AnalogLinear, AnalogExperts)):
            original = module.digital_module
            if original is None:
                raise ValueError(f"{name} ({type(module).__name__}) was not made by analogize_: it has no digital "
                                 "module to restore")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, original)
        elif is_weight_analog(module):
            make_weight_digital(module)
    del model.romer_conversion
    return model


def check_placement(model: nn.Module, placement: Placement) -> None:
    """Every module a placement names exists in ``model``: ``digital_experts`` keys are module names and
    every ``digital`` pattern matches at least one module (a typo would otherwise leave modules analog
    without a word). Raises ValueError naming what matches nothing."""
    names = {name for name, _ in model.named_modules()}
    missing = sorted(name for name in placement.digital_experts if name not in names)
    if missing:
        raise ValueError(f"Placement.digital_experts names unknown module(s): {', '.join(missing)}")
    idle = [pattern for pattern in placement.digital if not any(fnmatch.fnmatchcase(n, pattern) for n in names if n)]
    if idle:
        raise ValueError(f"Placement.digital pattern(s) {', '.join(map(repr, idle))} match no module of "
                         f"{type(model).__name__} (module names look like {_example_names(names)})")


def _example_names(names: set[str]) -> str:
    shown = sorted((n for n in names if n), key=lambda n: (n.count("."), n))
    return ", ".join(shown[:1] + [n for n in shown if n.count(".") >= 3][:2]) or "none"


def _expert_is_digital(name: str, match: re.Match, placement: Placement) -> bool:
    experts_module = name[: match.start(2)].rstrip(".")
    return int(match.group(2)) in placement.digital_experts.get(experts_module, ())


@dataclass
class PlacementRow:
    module: str
    category: str
    kind: str          # "analog", "digital" (by placement), "digital (lookup, no MVM)", "digital (unsupported: ...)"
    parameters: int
    tiles: int

    @property
    def unsupported(self) -> bool:
        """A weight matrix the package cannot put on a crossbar (it stays digital whatever the placement)."""
        return self.kind.startswith("digital (unsupported")


def placement_report(model: nn.Module) -> list[PlacementRow]:
    """Every weight matrix of a (converted) model: the weight-carrying modules (category, analog or
    digital by placement, size, tiles), then every other parameter of two or more dimensions, so that no
    matrix stays digital unlisted: embeddings (a lookup, no MVM) and weights the conversion cannot put
    on crossbars (``unsupported``, with the reason)."""
    rows, covered = [], set()
    routers = router_weight_modules(model)
    reasons = getattr(model, "romer_conversion", {}).get("digital_unsupported", {})
    tensors = getattr(model, "romer_conversion", {}).get("digital_tensors", {})
    never_called = set(getattr(model, "romer_conversion", {}).get("never_called", ()))

    def cover(module: nn.Module) -> None:
        covered.update(id(p) for p in module.parameters(recurse=False))

    def post_expert_norm_row(name: str, module: nn.Module, category: str) -> None:
        norm = getattr(module, "post_expert_norm", None)
        if isinstance(norm, nn.Module) and any(p.dim() >= 2 for p in norm.parameters()):
            rows.append(PlacementRow(f"{name}.post_expert_norm", category,
                                     "digital (norm after each expert, a scale per expert: elementwise)",
                                     sum(p.numel() for p in norm.parameters()), 0))
            covered.update(id(p) for p in norm.parameters())

    for name, module in model.named_modules():
        if isinstance(module, AnalogWeight):
            continue  # reported with the module it belongs to
        category = categorize(name, module, routers) if name else "other"
        if isinstance(module, AnalogExperts):
            kind = "analog" if len(module.digital_experts) < module.num_experts else "digital"
            if module.digital_experts:
                kind += f" ({len(module.digital_experts)} experts digital)"
            rows.append(PlacementRow(name, category, kind, _own_params(module), module.num_tiles))
            cover(module)
            post_expert_norm_row(name, module, category)
        elif isinstance(module, AnalogLinear):
            rows.append(PlacementRow(name, category, "analog", _own_params(module), module.num_tiles))
            cover(module)
        elif is_weight_analog(module):
            weights = module.analog.analog_weights()
            if isinstance(module.analog, AnalogWeight) and module.analog.weight is not getattr(module, "weight", None):
                category = "router"  # a router converted as a whole, its scoring weight in a child
            rows.append(PlacementRow(name, category, "analog", sum(w.numel() for w in weights), module.analog.num_tiles))
            covered.update(id(w) for w in weights)  # other parameters of the module are listed on their own
        elif conversion_kind(module) in ("experts", "linear", "own_forward", "grouped", "conv1d") or name in routers:
            if not any(reason_name.startswith(name + ".") or reason_name == name for reason_name in reasons):
                rows.append(PlacementRow(name, category, "digital", _own_params(module), 0))
                cover(module)
                if conversion_kind(module) == "experts":
                    post_expert_norm_row(name, module, category)
        if name in never_called and rows and rows[-1].module == name:
            rows[-1].kind = "digital in effect (analog, never called: the model reads its weight directly)"
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2 or id(parameter) in covered:
            continue
        covered.add(id(parameter))
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(owner, nn.Embedding):
            rows.append(PlacementRow(owner_name, "embeddings", "digital (lookup, no MVM)", parameter.numel(), 0))
        elif name in tensors and name not in reasons:
            rows.append(PlacementRow(name, categorize(owner_name, owner, routers) if owner_name else "other",
                                     f"digital (tensor outside a linear layer: {_class_name(owner)}.{attribute})",
                                     parameter.numel(), 0))
        else:
            why = reasons.get(name) or _why_digital(owner, attribute, parameter)
            rows.append(PlacementRow(name, categorize(owner_name, owner, routers) if owner_name else "other",
                                     f"digital (unsupported: {why})", parameter.numel(), 0))
    return rows


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def require_digital_weights(model: nn.Module, what: str) -> None:
    """Raise a clear error when ``what`` (a method that reads digital weights) is applied to a model that
    dropped them (``analogize_(..., keep_digital=False)``)."""
    if not getattr(model, "romer_conversion", {}).get("keep_digital", True):
        raise ValueError(f"{what} reads the digital weights, which this model dropped "
                         "(analogize_(..., keep_digital=False)); convert with keep_digital=True")

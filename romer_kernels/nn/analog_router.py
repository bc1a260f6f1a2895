"""Analog router logits: the router keeps its own forward and rules, its logits come from a chip.

transformers 5 routers are custom modules with a plain ``weight [E, H]`` Parameter (or ``nn.Linear``
subclasses with their own forward); their forward computes the logits with ``F.linear`` and then applies
the model's own rules (softmax or sigmoid, grouped top-k, correction bias, renormalisation, scaling).
``make_router_analog`` puts only that product on the crossbar (``nn.analog_weight``: the class is swapped
for a subclass whose forward answers the product on the router's weight with the analog MVM), so every
rule of the model is kept. The router keeps its parameter names; the analog state lives in a child
module ``analog`` (an ``AnalogRouter``).

An optional per-expert affine map ``logits * scale + shift`` after the ADC is the hook that router
recalibration methods set (``set_logit_affine``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.nn.analog_weight import AnalogWeight, is_weight_analog, make_weight_analog, make_weight_digital


class AnalogRouter(AnalogWeight):
    """The analog chip of one router's logits; lives as ``router.analog``."""

    def __init__(self, weight: nn.Parameter, config: AnalogConfig | str | None = None, *, name: str = "router",
                 seed: int = 0, mvm_noise: bool = True, transposed: bool = False, blocks: int = 1) -> None:
        if weight.dim() != 2:
            raise TypeError(f"router weight must be [experts, hidden], got shape {tuple(weight.shape)}")
        super().__init__(weight, config, name=name, seed=seed, mvm_noise=mvm_noise, transposed=transposed,
                         blocks=blocks)
        num_experts = self.block_rows
        self.register_buffer("logit_scale", torch.ones(num_experts), persistent=False)
        self.register_buffer("logit_shift", torch.zeros(num_experts), persistent=False)
        self.affine = False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)

    def post_adc(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.logit_scale + self.logit_shift if self.affine else y

    def set_logit_affine(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Per-expert ``logits * scale + shift`` after the ADC; ``None, None`` removes it."""
        if scale is None and shift is None:
            self.affine = False
            self.logit_scale.fill_(1.0)
            self.logit_shift.zero_()
            return
        num_experts = self.block_rows
        scale = torch.ones(num_experts) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        shift = torch.zeros(num_experts) if shift is None else torch.as_tensor(shift, dtype=torch.float32)
        if scale.shape != (num_experts,) or shift.shape != (num_experts,):
            raise ValueError(f"logit scale and shift must have shape ({num_experts},)")
        self.logit_scale.copy_(scale)
        self.logit_shift.copy_(shift)
        self.affine = True

    def get_extra_state(self) -> dict[str, Any]:
        return {"matrix": self.matrix.state(self.weight), "affine": self.affine,
                "logit_scale": self.logit_scale.tolist(), "logit_shift": self.logit_shift.tolist()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.matrix.load_state(state["matrix"])
        if state["affine"]:
            self.set_logit_affine(torch.tensor(state["logit_scale"]), torch.tensor(state["logit_shift"]))
        else:
            self.set_logit_affine(None, None)

    def extra_repr(self) -> str:
        return f"name={self.matrix.layer_id!r}, experts={self.block_rows}, tiles={self.num_tiles}, affine={self.affine}"


def make_router_analog(router: nn.Module, config: AnalogConfig | str | None = None, *, name: str = "router",
                       seed: int = 0, mvm_noise: bool = True, weight: nn.Parameter | None = None) -> AnalogRouter:
    """Put the logits of ``router`` (a module with a ``weight [E, H]`` used via ``F.linear``, an
    ``nn.Linear`` subclass with its own forward included) on a chip. ``weight``: the scoring weight when
    it belongs to a child of the router (``gate.wg``, ``router.proj``): the product is answered wherever
    in the router's forward it happens, so the router's own rules (and direct reads of the weight) stay."""
    weight = getattr(router, "weight", None) if weight is None else weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(router).__name__} has no [experts, hidden] weight to put on a crossbar")
    if type(router) is nn.Linear:
        raise TypeError("a plain nn.Linear router is converted with AnalogLinear, not make_router_analog")
    return make_weight_analog(router, config, name=name, seed=seed, mvm_noise=mvm_noise, adapter_class=AnalogRouter,
                              weight=weight)


def make_router_digital(router: nn.Module) -> nn.Module:
    """Undo ``make_router_analog``: the router's own class back, its ``analog`` child removed."""
    if not isinstance(getattr(router, "analog", None), AnalogRouter) or not is_weight_analog(router):
        raise ValueError(f"{type(router).__name__} is not a router made analog by make_router_analog")
    return make_weight_digital(router)

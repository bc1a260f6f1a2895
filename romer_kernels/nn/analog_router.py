"""Analog router logits for MoE router modules that compute ``F.linear(hidden, self.weight)``.

transformers 5 routers are custom modules with a plain ``weight [E, H]`` Parameter; their forward computes
the logits with ``F.linear`` and then applies the model's own rules (softmax or sigmoid, grouped top-k,
correction bias, renormalisation, scaling). To put only the logits on the crossbar and keep every rule
of the model, the router's class is swapped for a subclass (``isinstance`` still holds, so transformers'
output recorders keep working) whose forward runs the original one under a ``TorchFunctionMode`` that
answers exactly the ``F.linear`` call on this router's weight with the analog MVM. The router keeps its
parameter names; the analog state lives in a child module ``analog`` (an ``AnalogRouter``).

An optional per-expert affine map ``logits * scale + shift`` after the ADC is the hook that router
recalibration methods set (``set_logit_affine``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.presets import resolve_config
from romer_kernels.nn.analog_matrix import AnalogMatrix, check_seed
from romer_kernels.nn.base import AnalogModule

_ANALOG_ROUTER_CLASSES: dict[type, type] = {}


class _RouterLinearMode(TorchFunctionMode):
    def __init__(self, adapter: "AnalogRouter") -> None:
        super().__init__()
        self.adapter = adapter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is None and weight is not None and self.adapter.owns(weight):
                # inside a mode's handler the mode is off, so the analog MVM itself is not intercepted
                return self.adapter.logits(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


def _analog_router_forward(self: nn.Module, *args: Any, **kwargs: Any):
    original = type(self).__mro__[1].forward
    with _RouterLinearMode(self.analog):
        return original(self, *args, **kwargs)


class AnalogRouter(AnalogModule):
    """The analog chip of one router's logits; lives as ``router.analog``."""

    def __init__(self, weight: nn.Parameter, config: AnalogConfig | str | None = None, *, name: str = "router",
                 seed: int = 0, mvm_noise: bool = True) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise TypeError(f"router weight must be [experts, hidden], got shape {tuple(weight.shape)}")
        self.__dict__["_weight"] = weight  # not registered: the router owns the parameter
        num_experts, hidden = weight.shape
        self.matrix = AnalogMatrix(resolve_config(config), num_experts, hidden, name, check_seed(seed), mvm_noise)
        self.register_buffer("logit_scale", torch.ones(num_experts), persistent=False)
        self.register_buffer("logit_shift", torch.zeros(num_experts), persistent=False)
        self.affine = False

    @property
    def weight(self) -> nn.Parameter:
        return self.__dict__["_weight"]

    def owns(self, tensor: torch.Tensor) -> bool:
        weight = self.weight
        return tensor.shape == weight.shape and tensor.data_ptr() == weight.data_ptr()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = self.matrix.matmul(flat, self.weight)
        if self.affine:
            logits = logits * self.logit_scale + self.logit_shift
        return logits.to(device=hidden.device, dtype=hidden.dtype).reshape(*hidden.shape[:-1], -1)

    def set_logit_affine(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Per-expert ``logits * scale + shift`` after the ADC; ``None, None`` removes it."""
        if scale is None and shift is None:
            self.affine = False
            self.logit_scale.fill_(1.0)
            self.logit_shift.zero_()
            return
        num_experts = self.weight.shape[0]
        scale = torch.ones(num_experts) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        shift = torch.zeros(num_experts) if shift is None else torch.as_tensor(shift, dtype=torch.float32)
        if scale.shape != (num_experts,) or shift.shape != (num_experts,):
            raise ValueError(f"logit scale and shift must have shape ({num_experts},)")
        self.logit_scale.copy_(scale)
        self.logit_shift.copy_(shift)
        self.affine = True

    # -- AnalogModule ---------------------------------------------------------------------------
    def program_(self, seed: int | None = None) -> "AnalogRouter":
        self.matrix.program(self.weight, seed)
        return self

    def drift_(self, t_inference: float, drift_index: int | None = None) -> "AnalogRouter":
        self.matrix.drift(self.weight, t_inference, drift_index)
        return self

    def reset_noise_counter(self) -> None:
        self.matrix.forward_calls = 0

    def set_mvm_noise(self, enabled: bool) -> None:
        self.matrix.mvm_noise = bool(enabled)

    @property
    def num_tiles(self) -> int:
        return self.matrix.num_tiles

    @property
    def config(self) -> AnalogConfig:
        return self.matrix.config

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
        return f"name={self.matrix.layer_id!r}, experts={self.weight.shape[0]}, tiles={self.num_tiles}, affine={self.affine}"


def make_router_analog(router: nn.Module, config: AnalogConfig | str | None = None, *, name: str = "router",
                       seed: int = 0, mvm_noise: bool = True) -> AnalogRouter:
    """Put the logits of ``router`` (a module with a ``weight [E, H]`` used via ``F.linear``) on a chip."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(router).__name__} has no [experts, hidden] weight to put on a crossbar")
    if isinstance(router, nn.Linear):
        raise TypeError("an nn.Linear router is converted with AnalogLinear, not make_router_analog")
    if hasattr(router, "analog"):
        raise ValueError(f"{name} is already analog")
    cls = type(router)
    analog_cls = _ANALOG_ROUTER_CLASSES.get(cls)
    if analog_cls is None:
        analog_cls = type(f"Analog{cls.__name__}", (cls,), {"forward": _analog_router_forward,
                                                             "__module__": cls.__module__})
        _ANALOG_ROUTER_CLASSES[cls] = analog_cls
    adapter = AnalogRouter(weight, config, name=name, seed=seed, mvm_noise=mvm_noise)
    router.__class__ = analog_cls
    router.analog = adapter
    return adapter


def make_router_digital(router: nn.Module) -> nn.Module:
    """Undo ``make_router_analog``: the router's own class back, its ``analog`` child removed."""
    if not isinstance(getattr(router, "analog", None), AnalogRouter) or type(router) not in _ANALOG_ROUTER_CLASSES.values():
        raise ValueError(f"{type(router).__name__} is not a router made analog by make_router_analog")
    router.__class__ = type(router).__mro__[1]
    del router.analog
    return router

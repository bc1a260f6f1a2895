"""Analog MVMs for modules that compute with their own weight in their own forward.

Routers with a plain ``weight [E, H]``, ``nn.Linear`` subclasses with their own forward (Phi-MoE and
Llama 4 routers return ``(logits, weights, indices)``-style tuples), GPT-2's ``Conv1D`` (``weight
[in, out]``, ``addmm``) and grouped linears (``weight [G*O, H]`` viewed as ``G`` matrices and applied
with ``bmm``) all keep their forward: the module's class is swapped for a subclass (``isinstance`` still
holds, so transformers' output recorders keep working) whose forward runs the original one under a
``TorchFunctionMode`` that answers exactly the matrix products on this module's weight with the analog
MVM, and lets everything else (softmax, top-k, scaling, biases of other tensors) run as written. The
module keeps its parameter names; the analog state lives in a child module ``analog``
(an ``AnalogWeight``).

Which products are answered: ``F.linear(x, weight[, bias])``; ``x @ weight``, ``torch.matmul(x,
weight)`` and ``torch.addmm(bias, x, weight)`` for a weight stored ``[in, out]`` (``transposed``); and
``torch.bmm(x, view)`` where ``view`` is ``weight.view(G, O, H).transpose(1, 2)`` (``blocks=G``). A
product of another form on the weight is not intercepted; conversion checks (``moe.convert.
check_conversion``) report such a module as never called.
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

_ANALOG_CLASSES: dict[type, type] = {}
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _OwnWeightMode(TorchFunctionMode):
    def __init__(self, adapter: "AnalogWeight") -> None:
        super().__init__()
        self.adapter = adapter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # inside a mode's handler the mode is off, so the analog MVM itself is not intercepted
        kwargs = kwargs or {}
        adapter = self.adapter
        if func is F.linear and not adapter.transposed:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if weight is not None and adapter.owns(weight):
                return adapter.linear(args[0] if args else kwargs["input"], bias)
        elif func in _MATMULS and adapter.transposed and len(args) == 2 and adapter.owns(args[1]):
            return adapter.linear(args[0])
        elif func is torch.addmm and adapter.transposed and len(args) >= 3 and adapter.owns(args[2]) \
                and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
            return adapter.linear(args[1], args[0])
        elif func is torch.bmm and adapter.blocks > 1 and len(args) == 2 and adapter.owns_blocks(args[1]):
            return adapter.grouped(args[0])
        return func(*args, **kwargs)


def _analog_forward(self: nn.Module, *args: Any, **kwargs: Any):
    original = type(self).__mro__[1].forward
    with _OwnWeightMode(self.analog):
        return original(self, *args, **kwargs)


class AnalogWeight(AnalogModule):
    """The analog chip(s) of one module's own ``weight``; lives as ``module.analog``.

    ``transposed``: the weight is stored ``[in, out]`` (Conv1D). ``blocks``: the weight's rows are ``G``
    matrices of ``[out / G, in]`` applied to ``G`` inputs (a grouped linear), each on its own tiles with
    layer id ``"<name>.<g>"``."""

    def __init__(self, weight: nn.Parameter, config: AnalogConfig | str | None = None, *, name: str = "weight",
                 seed: int = 0, mvm_noise: bool = True, transposed: bool = False, blocks: int = 1) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise TypeError(f"{name}: an analog weight must be 2-D, got shape {tuple(weight.shape)}")
        self.__dict__["_weight"] = weight  # not registered: the module owns the parameter
        self.transposed = bool(transposed)
        out_features, in_features = weight.shape[::-1] if self.transposed else weight.shape
        if blocks < 1 or out_features % blocks or (blocks > 1 and self.transposed):
            raise ValueError(f"{name}: {blocks} blocks do not divide the {out_features} rows of the weight")
        self.blocks = blocks
        self.block_rows = out_features // blocks
        config = resolve_config(config)
        check_seed(seed)
        self.matrices = [AnalogMatrix(config, self.block_rows, in_features, name if blocks == 1 else f"{name}.{g}",
                                      seed, mvm_noise) for g in range(blocks)]

    @property
    def weight(self) -> nn.Parameter:
        return self.__dict__["_weight"]

    @property
    def matrix(self) -> AnalogMatrix:
        """The chip of a weight on one set of tiles (``blocks == 1``)."""
        return self.matrices[0]

    def block_weight(self, block: int = 0) -> torch.Tensor:
        """The ``[out, in]`` digital weight of one block (a view)."""
        weight = self.weight.t() if self.transposed else self.weight
        return weight if self.blocks == 1 else weight[block * self.block_rows:(block + 1) * self.block_rows]

    def owns(self, tensor: torch.Tensor) -> bool:
        weight = self.weight
        return (isinstance(tensor, torch.Tensor) and tensor.shape == weight.shape
                and tensor.data_ptr() == weight.data_ptr() and tensor.stride() == weight.stride())

    def owns_blocks(self, tensor: torch.Tensor) -> bool:
        """``tensor`` is ``weight.view(G, O, H).transpose(1, 2)``."""
        weight = self.weight
        rows, cols = self.block_rows, weight.shape[1]
        return (isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == (self.blocks, cols, rows)
                and tensor.data_ptr() == weight.data_ptr() and tensor.stride() == (rows * cols, 1, cols))

    def _mvm(self, x: torch.Tensor, block: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = self.matrices[block].matmul(flat, self.block_weight(block), bias)
        return self.post_adc(y).to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], -1)

    def post_adc(self, y: torch.Tensor) -> torch.Tensor:
        """Digital periphery after the ADC (subclasses: per-output affine maps)."""
        return y

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._mvm(x, 0, bias)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``x [G, N, in] -> [G, N, out / G]``: block g computes on ``x[g]``."""
        if x.dim() != 3 or x.shape[0] != self.blocks:
            raise ValueError(f"grouped input must be [{self.blocks}, N, in], got {tuple(x.shape)}")
        return torch.stack([self._mvm(x[g], g) for g in range(self.blocks)])

    # -- AnalogModule ---------------------------------------------------------------------------
    def program_(self, seed: int | None = None) -> "AnalogWeight":
        for g, matrix in enumerate(self.matrices):
            matrix.program(self.block_weight(g), seed)
        return self

    def drift_(self, t_inference: float, drift_index: int | None = None) -> "AnalogWeight":
        for g, matrix in enumerate(self.matrices):
            matrix.drift(self.block_weight(g), t_inference, drift_index)
        return self

    def reset_noise_counter(self) -> None:
        for matrix in self.matrices:
            matrix.forward_calls = 0

    def set_mvm_noise(self, enabled: bool) -> None:
        for matrix in self.matrices:
            matrix.mvm_noise = bool(enabled)

    @property
    def forward_calls(self) -> int:
        return sum(matrix.forward_calls for matrix in self.matrices)

    @property
    def num_tiles(self) -> int:
        return sum(matrix.num_tiles for matrix in self.matrices)

    @property
    def config(self) -> AnalogConfig:
        return self.matrix.config

    def get_extra_state(self) -> dict[str, Any]:
        return {"matrices": [m.state(self.block_weight(g)) for g, m in enumerate(self.matrices)]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        for matrix, saved in zip(self.matrices, state["matrices"]):
            matrix.load_state(saved)

    def extra_repr(self) -> str:
        shape = f"{self.block_rows}x{self.weight.shape[1] if not self.transposed else self.weight.shape[0]}"
        blocks = f", blocks={self.blocks}" if self.blocks > 1 else ""
        return f"name={self.matrix.layer_id!r}, matrix={shape}{blocks}, transposed={self.transposed}, tiles={self.num_tiles}"


def make_weight_analog(module: nn.Module, config: AnalogConfig | str | None = None, *, name: str = "weight",
                       seed: int = 0, mvm_noise: bool = True, transposed: bool = False, blocks: int = 1,
                       adapter_class: type[AnalogWeight] = AnalogWeight, weight: nn.Parameter | None = None
                       ) -> AnalogWeight:
    """Put the products of ``module`` with its own 2-D ``weight`` on a chip; its forward still runs.
    ``weight``: another parameter the module's forward multiplies with (a router module whose scoring
    ``nn.Linear`` child it calls or reads), default ``module.weight``."""
    weight = getattr(module, "weight", None) if weight is None else weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(module).__name__} has no 2-D weight to put on a crossbar")
    if hasattr(module, "analog"):
        raise ValueError(f"{name} is already analog")
    cls = type(module)
    analog_cls = _ANALOG_CLASSES.get(cls)
    if analog_cls is None:
        analog_cls = type(f"Analog{cls.__name__}", (cls,), {"forward": _analog_forward, "__module__": cls.__module__})
        _ANALOG_CLASSES[cls] = analog_cls
    adapter = adapter_class(weight, config, name=name, seed=seed, mvm_noise=mvm_noise, transposed=transposed,
                            blocks=blocks)
    module.__class__ = analog_cls
    module.analog = adapter
    return adapter


def is_weight_analog(module: nn.Module) -> bool:
    return isinstance(getattr(module, "analog", None), AnalogWeight) and type(module) in _ANALOG_CLASSES.values()


def make_weight_digital(module: nn.Module) -> nn.Module:
    """Undo ``make_weight_analog``: the module's own class back, its ``analog`` child removed."""
    if not is_weight_analog(module):
        raise ValueError(f"{type(module).__name__} was not made analog by make_weight_analog")
    module.__class__ = type(module).__mro__[1]
    del module.analog
    return module

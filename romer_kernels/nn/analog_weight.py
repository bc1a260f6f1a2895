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
        result = self.adapter.answer(func, args, kwargs)
        return func(*args, **kwargs) if result is NotImplemented else result


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
        # a list to record (chip input [N, in], output after the ADC and post_adc [N, out]) of every MVM
        # into, or None: how calibration methods see a router's logits when they sit inside its forward
        self.recording: list | None = None

    @property
    def weight(self) -> nn.Parameter:
        return self.__dict__["_weight"]

    def answer(self, func, args, kwargs):
        """The analog result of a product on this weight, or NotImplemented (the call runs as written)."""
        adapter = self
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
        return NotImplemented

    def analog_weights(self) -> list[nn.Parameter]:
        """The digital parameters whose products this adapter answers."""
        return [self.weight]


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
        if flat.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.block_rows)
        y = self.post_adc(self.matrices[block].matmul(flat, self.block_weight(block), bias))
        if self.recording is not None:
            self.recording.append((flat.detach(), y.detach()))
        return y.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], self.block_rows)

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
    def _matrices(self):
        return ((matrix, self.block_weight(g)) for g, matrix in enumerate(self.matrices))

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
    """The module computes with its own forward, its products answered by an ``analog`` adapter."""
    return isinstance(getattr(module, "analog", None), (AnalogWeight, AnalogSlices)) \
        and type(module) in _ANALOG_CLASSES.values()


def make_weight_digital(module: nn.Module) -> nn.Module:
    """Undo ``make_weight_analog``: the module's own class back, its ``analog`` child removed."""
    if not is_weight_analog(module):
        raise ValueError(f"{type(module).__name__} was not made analog by make_weight_analog")
    module.__class__ = type(module).__mro__[1]
    del module.analog
    return module


def slice_of(tensor, param: torch.Tensor, experts: int, rows: int, cols: int) -> tuple[int, bool] | None:
    """(expert, as a transposed view) when ``tensor`` is expert e's ``[rows, cols]`` block of ``param``
    (its e-th row-major block) or that block's transpose; else None."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.device != param.device:
        return None
    if tensor.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return None
    offset = tensor.storage_offset() - param.storage_offset()
    if offset % (rows * cols) or not 0 <= offset // (rows * cols) < experts:
        return None
    if tuple(tensor.shape) == (rows, cols) and tensor.stride() == (cols, 1):
        return offset // (rows * cols), False
    if tuple(tensor.shape) == (cols, rows) and tensor.stride() == (1, cols):
        return offset // (rows * cols), True
    return None


class AnalogSlices(AnalogModule):
    """Per-expert chips of expert weights stored as slices of one parameter and multiplied in the module's
    own forward (DBRX's ``w1 [E*I, H]``, JetMoE's parallel-expert ``weight [E, out, in]``); lives as
    ``module.analog``.

    ``slices`` maps a parameter name of the module to ``(experts, rows, cols, transposed)``: the parameter
    holds ``experts`` row-major matrices ``[rows, cols]``; a product with slice ``e`` (``F.linear(x, s)``,
    ``x @ s.T``, or with ``transposed`` ``x @ s``) is answered by expert ``e``'s chip, layer id
    ``"<name>.<e>.<param>"``. The chip holds ``s`` (or ``s.T`` when ``transposed``) as ``[out, in]``.
    Per-MVM noise is keyed by the row in the call and the module's forward counter, so the noise of a
    product does not depend on other experts' products in the same forward.
    """

    def __init__(self, owner: nn.Module, slices: dict[str, tuple[int, int, int, bool]],
                 config: AnalogConfig | str | None = None, *, name: str = "experts", seed: int = 0,
                 mvm_noise: bool = True) -> None:
        super().__init__()
        config = resolve_config(config)
        check_seed(seed)
        self.__dict__["_owner"] = owner  # not registered: the module owns its parameters
        self.slices = dict(slices)
        self.matrices: dict[str, list[AnalogMatrix]] = {}
        for attr, (experts, rows, cols, transposed) in self.slices.items():
            out, inp = (cols, rows) if transposed else (rows, cols)
            self.matrices[attr] = [AnalogMatrix(config, out, inp, f"{name}.{e}.{attr}", seed, mvm_noise)
                                   for e in range(experts)]
        self.forward_calls = 0  # the owner's forwards (one call index for all its products)
        self._in_call = False

    def parameter(self, attr: str) -> nn.Parameter:
        return getattr(self.__dict__["_owner"], attr)

    def slice_weight(self, attr: str, expert: int) -> torch.Tensor:
        """Expert ``expert``'s ``[out, in]`` digital weight from parameter ``attr`` (a view)."""
        experts, rows, cols, transposed = self.slices[attr]
        block = self.parameter(attr).reshape(experts, rows, cols)[expert]
        return block.t() if transposed else block

    def analog_weights(self) -> list[nn.Parameter]:
        return [self.parameter(attr) for attr in self.slices]

    def _which(self, tensor) -> tuple[str, int, bool] | None:
        """(parameter, expert, used transposed) when ``tensor`` is one slice of an owned parameter."""
        for attr, (experts, rows, cols, _) in self.slices.items():
            found = slice_of(tensor, self.parameter(attr), experts, rows, cols)
            if found is not None:
                return (attr, *found)
        return None

    def answer(self, func, args, kwargs):
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            found = self._which(weight)
            if found and not found[2] and not self.slices[found[0]][3]:
                return self._mvm(found[0], found[1], args[0] if args else kwargs["input"], bias)
        elif func in _MATMULS and len(args) == 2:
            found = self._which(args[1])
            if found and found[2] != self.slices[found[0]][3]:  # x @ s.T for a plain slice, x @ s for a transposed one
                return self._mvm(found[0], found[1], args[0])
        return NotImplemented

    def _mvm(self, attr: str, expert: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        matrix = self.matrices[attr][expert]
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:  # an expert without tokens in this call
            return x.new_zeros(*x.shape[:-1], matrix.out_features)
        y = matrix.matmul(flat, self.slice_weight(attr, expert), bias, row_ids=torch.arange(flat.shape[0]),
                          call_index=self.forward_calls)
        return y.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], matrix.out_features)

    def _matrices(self):
        for attr, matrices in self.matrices.items():
            for e, matrix in enumerate(matrices):
                yield matrix, self.slice_weight(attr, e)

    def reset_noise_counter(self) -> None:
        self.forward_calls = 0

    def set_mvm_noise(self, enabled: bool) -> None:
        for matrix, _ in self._matrices():
            matrix.mvm_noise = bool(enabled)

    @property
    def num_tiles(self) -> int:
        return sum(matrix.num_tiles for matrix, _ in self._matrices())

    @property
    def config(self) -> AnalogConfig:
        return next(iter(self.matrices.values()))[0].config

    def get_extra_state(self) -> dict[str, Any]:
        return {"forward_calls": self.forward_calls,
                "matrices": {attr: [m.state(self.slice_weight(attr, e)) for e, m in enumerate(ms)]
                             for attr, ms in self.matrices.items()}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.forward_calls = int(state["forward_calls"])
        for attr, saved in state["matrices"].items():
            for matrix, entry in zip(self.matrices[attr], saved):
                matrix.load_state(entry)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{attr}: {e}x[{r}x{c}]{' (T)' if t else ''}" for attr, (e, r, c, t) in self.slices.items())
        return f"{shapes}, tiles={self.num_tiles}"


def _analog_slices_forward(self: nn.Module, *args: Any, **kwargs: Any):
    original = type(self).__mro__[1].forward
    adapter = self.analog
    with _OwnWeightMode(adapter):
        try:
            return original(self, *args, **kwargs)
        finally:
            adapter.forward_calls += 1


def make_slices_analog(module: nn.Module, slices: dict[str, tuple[int, int, int, bool]],
                       config: AnalogConfig | str | None = None, *, name: str = "experts", seed: int = 0,
                       mvm_noise: bool = True) -> AnalogSlices:
    """Put the expert slices of ``module``'s parameters on per-expert chips; its forward still runs."""
    if hasattr(module, "analog"):
        raise ValueError(f"{name} is already analog")
    cls = type(module)
    analog_cls = _ANALOG_CLASSES.get((cls, "slices"))
    if analog_cls is None:
        analog_cls = type(f"Analog{cls.__name__}", (cls,), {"forward": _analog_slices_forward,
                                                             "__module__": cls.__module__})
        _ANALOG_CLASSES[(cls, "slices")] = analog_cls
    adapter = AnalogSlices(module, slices, config, name=name, seed=seed, mvm_noise=mvm_noise)
    module.__class__ = analog_cls
    module.analog = adapter
    return adapter

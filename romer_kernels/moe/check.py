"""Check a converted model by running it: every analog module computes, no weight matrix computes digitally.

Conversion decides from structure; a forward shows what the model really does. ``check_conversion``
runs one forward and watches every matrix product (``F.linear``, ``matmul``/``@``, ``mm``, ``bmm``,
``addmm``, ``baddbmm``, ``einsum``, convolutions):

- ``never_called``: analog modules whose chips did no MVM -- the model reads their weight directly
  instead of calling the module (Jamba's ``mamba.dt_proj``), so they are digital in effect;
- ``digital_products``: parameters that entered a matrix product digitally although the placement wants
  them analog and nothing lists them (embeddings, modules digital by placement, and weights the
  conversion already reported as unsupported excepted): weight matrices the conversion did not know.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from romer_kernels.moe.convert import Placement, categorize
from romer_kernels.moe.structure import router_weight_modules
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.analog_linear import AnalogLinear
from romer_kernels.nn.analog_weight import is_weight_analog
from romer_kernels.nn.base import AnalogModule

PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
             torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm, torch.baddbmm,
             torch.einsum, F.conv1d, F.conv2d, torch.conv1d, torch.conv2d}


@dataclass
class ConversionCheck:
    never_called: list[str] = field(default_factory=list)
    digital_products: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.never_called and not self.digital_products

    def lines(self) -> list[str]:
        out = [f"analog but never called (its weight is read directly, so it computes digitally): {name}"
               for name in self.never_called]
        out += [f"weight matrix computed digitally though the placement wants it analog: {name}"
                for name in self.digital_products]
        return out


class _ProductWatch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            for value in list(args) + list(kwargs.values()):
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                        self.storages.add(tensor.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def _calls(module: nn.Module) -> int:
    if isinstance(module, (AnalogLinear, AnalogExperts)):
        return module.forward_calls
    return module.analog.forward_calls


def check_conversion(model: nn.Module, input_ids: torch.Tensor | None = None) -> ConversionCheck:
    """Run one forward of a converted model on ``input_ids`` (default: 8 token ids) and report analog
    modules that were never called and digital weight matrices that entered a matrix product."""
    conversion = getattr(model, "romer_conversion", None)
    if not isinstance(conversion, dict):
        raise ValueError(f"{type(model).__name__} was not converted by analogize_: nothing to check")
    placement = Placement.from_dict(conversion["placement"])
    if input_ids is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 8
        input_ids = torch.arange(8).remainder(vocab)[None]
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    analog = {name: module for name, module in model.named_modules()
              if isinstance(module, (AnalogLinear, AnalogExperts)) or is_weight_analog(module)}
    before = {name: _calls(module) for name, module in analog.items()}
    watch = _ProductWatch()
    with torch.no_grad(), watch:
        try:
            model(input_ids.to(device), use_cache=False)
        except TypeError:  # not a transformers model: no use_cache argument
            model(input_ids.to(device))
    check = ConversionCheck()
    check.never_called = [name for name, module in analog.items() if _calls(module) == before[name]
                          and not (isinstance(module, AnalogExperts) and len(module.digital_experts) == module.num_experts)]
    routers = router_weight_modules(model)
    covered = set()
    for name, module in model.named_modules():
        if isinstance(module, (AnalogModule, nn.Embedding)) or is_weight_analog(module) or (name and placement.is_digital(name)):
            covered.update(id(p) for p in module.parameters())
        elif name and not getattr(placement, categorize(name, module, routers)):
            covered.update(id(p) for p in module.parameters(recurse=False))
    listed = set(conversion.get("digital_unsupported", {}))  # already refused or allowed by name
    for name, parameter in model.named_parameters():
        if name in listed or id(parameter) in covered or parameter.dim() < 2 or parameter.device.type == "meta":
            continue
        if parameter.untyped_storage().data_ptr() in watch.storages:
            check.digital_products.append(name)
    # what the forward showed goes into the conversion record, so placement_report lists it
    tensors = conversion.get("digital_tensors", {})
    unsupported = conversion.setdefault("digital_unsupported", {})
    for name in check.digital_products:
        unsupported[name] = f"computed digitally in a matrix product ({tensors.get(name, 'not a linear layer')})"
    conversion["never_called"] = list(check.never_called)
    return check

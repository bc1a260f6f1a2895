"""Save and load analog models: a standard digital checkpoint plus ``analog.json`` to rebuild the chip.

``save_analog(model, directory)`` writes the digital weights with the model's own ``save_pretrained``
(same keys and format as before conversion, so any transformers tool can still read them) and
``analog.json``: how the model was converted (config, placement, seed) and each analog module's chip
state (seed, time and index of the last drift, noise counters, router calibration). ``load_analog``
rebuilds the same chip from them: programming and drift are replayed from the seeds, so no noisy tensor
is stored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.moe.convert import Placement, analogize_
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.base import AnalogModule

ANALOG_FILE = "analog.json"
FORMAT_VERSION = 1


def save_analog(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (converted with ``analogize_``) to ``directory``; returns the directory."""
    conversion = getattr(model, "romer_conversion", None)
    if conversion is None:
        raise ValueError("save_analog needs a model converted with analogize_ (it has no romer_conversion)")
    if not conversion.get("keep_digital", True):
        raise ValueError("save_analog needs the digital weights, which this model dropped "
                         "(analogize_(..., keep_digital=False)); convert with keep_digital=True to save it")
    hooked = [name for name, module in model.named_modules() if isinstance(module, AnalogExperts)
              and (module.dispatch is not None or module.extra_experts is not None or module.slot_weights)]
    if hooked:
        raise ValueError(f"save_analog saves the chips and router maps, not the experts' method state (replicas, "
                         f"replaced or quantized slots, dispatch), which {', '.join(hooked[:3])} hold; save before "
                         "applying ROMER's replacement or Replicate-and-Quantize (re-apply them from calibration "
                         "data after loading), or remove them with methods.undo_methods_")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; save its state_dict() instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    digital = {key: value for key, value in state.items() if not key.endswith("_extra_state")}
    model.save_pretrained(directory, state_dict=digital)
    modules = {name: module.get_extra_state() for name, module in model.named_modules()
               if isinstance(module, AnalogModule)}
    payload = {"format": FORMAT_VERSION, "conversion": conversion, "modules": modules}
    (directory / ANALOG_FILE).write_text(json.dumps(payload, indent=1))
    return directory


def load_analog(directory: str | Path, model_class: Any = None, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a model written by ``save_analog``: the same chips, programmed and drifted as they were."""
    directory = Path(directory)
    path = directory / ANALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} was not written by save_analog")
    payload = json.loads(path.read_text())
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {payload.get('format')!r}; this version reads {FORMAT_VERSION}")
    if model_class is None:
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(directory, **from_pretrained_kwargs)
    conversion = payload["conversion"]
    analogize_(model, AnalogConfig.from_dict(conversion["config"]), Placement.from_dict(conversion["placement"]),
               seed=conversion["seed"], mvm_noise=conversion["mvm_noise"])
    modules = dict(model.named_modules())
    for name, state in payload["modules"].items():
        module = modules.get(name)
        if not isinstance(module, AnalogModule):
            raise ValueError(f"{path} describes analog module {name!r}, which the rebuilt model does not have")
        module.set_extra_state(state)
    return model

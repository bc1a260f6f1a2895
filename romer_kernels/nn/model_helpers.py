"""Model-level helpers: program, drift and switch noise on every analog layer of a model at once."""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from torch import nn

from romer_kernels.nn.base import AnalogModule

if TYPE_CHECKING:
    from romer_kernels.config.analog import AnalogConfig
    from romer_kernels.nn.analog_matrix import AnalogMatrix


def analog_layers(model: nn.Module) -> Iterator[tuple[str, AnalogModule]]:
    """(qualified name, module) of every analog module in ``model`` (linear layers, experts, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, AnalogModule):
            yield name, module


def _require_analog(model: nn.Module) -> list[AnalogModule]:
    layers = [layer for _, layer in analog_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no analog layers; convert it first")
    return layers


def _steps(layers: list, progress: bool, what: str):
    if not progress:
        return layers
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(layers, desc=what, unit="module", leave=False)


def program_analog_(model: nn.Module, seed: int, config: "AnalogConfig | None" = None,
                    progress: bool = False) -> nn.Module:
    """Program every analog layer with chip ``seed`` (each layer's own stream comes from its layer_id).

    ``config``: program with this configuration from now on (it must tile like the conversion's, e.g.
    ``scale_noise(config, s)``). Every chip is re-programmed in place into the state tensor it already
    holds, so a Monte Carlo re-programs one converted model per trial instead of copying it; the result
    is the chip a fresh conversion programmed with ``seed`` and ``config`` would be. ``progress``: a
    progress bar over the modules (for large models)."""
    layers = _require_analog(model)
    if config is not None:
        for matrix in analog_matrices(model):
            matrix.set_config(config)
        conversion = getattr(model, "romer_conversion", None)
        if isinstance(conversion, dict):
            conversion["config"] = config.to_dict()
    for layer in _steps(layers, progress, "programming chips"):
        layer.program_(seed)
    return model


def drift_analog_(model: nn.Module, t_inference: float, drift_index: int | None = None,
                  progress: bool = False) -> nn.Module:
    """Move every analog layer to ``t_inference`` seconds after programming, with the read noise of drift
    call ``drift_index`` (default: each chip's next; ``0`` replays the first call's, so drifting one
    programming to several times in turn gives at each time the chip a fresh programming drifted once
    would be)."""
    for layer in _steps(_require_analog(model), progress, "drifting chips"):
        layer.drift_(t_inference, drift_index)
    return model


def set_mvm_noise(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch per-MVM noise (output, input, weight read noise) on or off in every analog layer."""
    for layer in _require_analog(model):
        layer.set_mvm_noise(bool(enabled))
    return model


def reset_noise_counters(model: nn.Module) -> nn.Module:
    """Restart the per-MVM noise sequence of every analog layer."""
    for layer in _require_analog(model):
        layer.reset_noise_counter()
    return model


def analog_matrices(model: nn.Module) -> Iterator["AnalogMatrix"]:
    """Every ``AnalogMatrix`` (one chip each) of the model's analog modules, each once."""
    from romer_kernels.nn.analog_matrix import AnalogMatrix  # noqa: PLC0415  (analog_matrix imports kernels)

    seen: set[int] = set()

    def found(value):
        if isinstance(value, AnalogMatrix) and id(value) not in seen:
            seen.add(id(value))
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from found(item)

    for module in model.modules():
        for value in vars(module).values():
            yield from found(value)
        extra = getattr(module, "extra_experts", None)
        if extra is not None and hasattr(extra, "matrices"):
            for matrix, _ in extra.matrices():
                yield from found(matrix)


def apply_input_ranges_(model: nn.Module, input_ranges: "dict[str, torch.Tensor]") -> int:
    """Give every analog matrix whose layer id has an entry in ``input_ranges`` that static input range per
    input tile (learned by HWA training, ``AnalogMatrix.set_input_range``); the others keep the preset's
    noise management. Returns how many matrices got one."""
    applied = 0
    for matrix in analog_matrices(model):
        ranges = input_ranges.get(str(matrix.layer_id))
        if ranges is not None:
            matrix.set_input_range(ranges)
            applied += 1
    return applied


def chip_state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor held by the model's chips (``AnalogMatrix.held_tensors``), each storage once.

    The digital weights are not counted (the modules own them); a tensor shared by several chips (none
    is, by design) would count once."""
    storages: dict[int, int] = {}
    for matrix in analog_matrices(model):
        for tensor in matrix.held_tensors().values():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())

"""What every analog module offers, so that model-level helpers can drive them all alike."""
from __future__ import annotations

from abc import abstractmethod

from torch import nn


class AnalogModule(nn.Module):
    """A module whose weights live on simulated crossbars (``AnalogLinear``, analog experts, ...)."""

    def _matrices(self):
        """``(AnalogMatrix, digital weight [out, in])`` of every analog matrix of the module: what the default
        ``program_`` and ``drift_`` walk."""
        raise NotImplementedError(f"{type(self).__name__} must define _matrices() or override program_/drift_")

    def program_(self, seed: int | None = None) -> "AnalogModule":
        """Program every crossbar of the module with chip ``seed``."""
        for matrix, weight in self._matrices():
            matrix.program(weight, seed)
        return self

    def drift_(self, t_inference: float, drift_index: int | None = None) -> "AnalogModule":
        """Move every crossbar to ``t_inference`` seconds after programming, with the read noise of drift
        call ``drift_index`` of this programming (default: the next call; 0 = the first call's, so that a
        chip drifted to several times in turn reads each time as a freshly programmed chip would)."""
        for matrix, weight in self._matrices():
            matrix.drift(weight, t_inference, drift_index)
        return self

    @abstractmethod
    def reset_noise_counter(self) -> None:
        """Restart the per-MVM noise sequence."""

    @abstractmethod
    def set_mvm_noise(self, enabled: bool) -> None:
        """Switch per-MVM noise (output, input, weight read noise) on or off."""

    @property
    @abstractmethod
    def num_tiles(self) -> int:
        """Crossbar tiles the module occupies."""

    def keep_digital_module(self, module: nn.Module) -> None:
        """Remember the digital module this one was converted from (it shares its Parameters, so keeping it
        costs nothing): ``moe.convert.restore_digital_`` puts it back. Not a registered submodule."""
        self.__dict__["_digital_module"] = module

    @property
    def digital_module(self) -> nn.Module | None:
        """The digital module this one replaced (``keep_digital_module``), or None."""
        return self.__dict__.get("_digital_module")

    def drop_digital_(self) -> "AnalogModule":
        """Free the digital weights of the analog matrices (their chips must be programmed): the module
        keeps computing with its chips, which can no longer be programmed or drifted again."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop its digital weights")


def meta_parameter(parameter: "nn.Parameter") -> "nn.Parameter":
    """A parameter of the same shape and dtype on the meta device (no memory): what a dropped digital
    weight is replaced by, so that module attributes and parameter names stay."""
    import torch  # noqa: PLC0415

    return nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype, device="meta"), requires_grad=False)

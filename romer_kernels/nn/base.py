"""What every analog module offers, so that model-level helpers can drive them all alike."""
from __future__ import annotations

from abc import abstractmethod

from torch import nn


class AnalogModule(nn.Module):
    """A module whose weights live on simulated crossbars (``AnalogLinear``, analog experts, ...)."""

    @abstractmethod
    def program_(self, seed: int | None = None) -> "AnalogModule":
        """Program every crossbar of the module with chip ``seed``."""

    @abstractmethod
    def drift_(self, t_inference: float) -> "AnalogModule":
        """Move every crossbar to ``t_inference`` seconds after programming."""

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

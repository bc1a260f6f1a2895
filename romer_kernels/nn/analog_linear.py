"""``AnalogLinear``: a drop-in ``nn.Linear`` whose matrix-vector products run on a simulated crossbar.

The layer keeps the digital ``weight``/``bias`` (so it can be reprogrammed or turned back into
``nn.Linear``, and checkpoints keep their keys) and a programmed chip (``AnalogMatrix``) fixed by
``(seed, layer_id)``. Its life cycle:

- ``program_(seed)``: program the chip; fixes programming noise and drift exponents.
- ``drift_(t)``: weights ``t`` seconds after programming, with freshly drawn read noise, and the
  drift-compensation factors measured by the simulated readout.
- ``forward(x)``: noisy analog MVM. The first forward programs the chip with the layer's seed if
  nobody did; a changed ``weight`` (in-place edit or ``load_state_dict``) reprograms it.

Train and eval mode compute the same thing: per-MVM noise (output, input and weight read noise) is
switched only by ``mvm_noise`` (attribute or ``set_mvm_noise``), never by ``eval()``. Each forward uses a
fresh noise draw keyed by the forward call counter, so a repeated forward differs while a re-run from
the same seed reproduces the same sequence; ``reset_noise_counter()`` restarts it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.presets import resolve_config
from romer_kernels.nn.analog_matrix import AnalogMatrix, check_seed
from romer_kernels.nn.base import AnalogModule, meta_parameter


class AnalogLinear(AnalogModule):
    """Linear layer ``y = x W^T + b`` computed by a simulated analog crossbar chip."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: AnalogConfig | str | None = None,
        *,
        seed: int = 0,
        layer_id: int | str = 0,
        mvm_noise: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _weight: nn.Parameter | None = None,
        _bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"AnalogLinear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        if _weight is not None:  # wrap existing parameters (in-place conversion: no copy, no init)
            if tuple(_weight.shape) != (out_features, in_features):
                raise ValueError(f"_weight has shape {tuple(_weight.shape)}, expected ({out_features}, {in_features})")
            self.weight = _weight
            self.bias = _bias if bias else None
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
            self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(in_features)
                nn.init.uniform_(self.bias, -bound, bound)
        self.analog = AnalogMatrix(resolve_config(config), out_features, in_features, layer_id, check_seed(seed),
                                   mvm_noise)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: AnalogConfig | str | None = None, *, seed: int = 0,
                    layer_id: int | str = 0, mvm_noise: bool = True, copy: bool = True) -> "AnalogLinear":
        """An analog version of ``linear``, same device and dtype: weights copied (``copy=True``), or
        ``linear``'s own parameters shared (``copy=False``: what the in-place ``analogize_`` does, so a
        conversion never holds two copies of a weight)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if not copy:
            return cls(linear.in_features, linear.out_features, linear.bias is not None, config, seed=seed,
                       layer_id=layer_id, mvm_noise=mvm_noise, _weight=linear.weight, _bias=linear.bias)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, config, seed=seed,
                    layer_id=layer_id, mvm_noise=mvm_noise, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """The digital ``nn.Linear`` with this layer's weights."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- the chip -------------------------------------------------------------------------------
    config = property(lambda self: self.analog.config)
    seed = property(lambda self: self.analog.seed)
    layer_id = property(lambda self: self.analog.layer_id)
    t_inference = property(lambda self: self.analog.t_inference)
    forward_calls = property(lambda self: self.analog.forward_calls)

    @property
    def mvm_noise(self) -> bool:
        return self.analog.mvm_noise

    @mvm_noise.setter
    def mvm_noise(self, enabled: bool) -> None:
        self.analog.mvm_noise = bool(enabled)

    def set_mvm_noise(self, enabled: bool) -> None:
        self.mvm_noise = enabled

    @property
    def num_tiles(self) -> int:
        return self.analog.num_tiles

    def _matrices(self):
        return ((self.analog, self.weight),)

    @property
    def is_programmed(self) -> bool:
        return self.analog.is_programmed(self.weight)

    def program_(self, seed: int | None = None) -> "AnalogLinear":
        """Program the chip (programming noise, drift exponents, compensation baseline) from ``seed``."""
        self.analog.program(self.weight, seed)
        return self

    def drift_(self, t_inference: float, drift_index: int | None = None) -> "AnalogLinear":
        """Move the chip to ``t_inference`` seconds after programming (drift, read noise of drift call
        ``drift_index`` -- default the next --, compensation)."""
        self.analog.drift(self.weight, t_inference, drift_index)
        return self

    def drop_digital_(self) -> "AnalogLinear":
        """Free the digital weight (the bias stays); programs the chip first if nobody did."""
        self.analog.ensure_programmed(self.weight)
        self.analog.mark_digital_dropped()
        self.weight = meta_parameter(self.weight)
        self.__dict__.pop("_digital_module", None)  # it holds the weight being freed
        return self

    def effective_weight(self) -> torch.Tensor:
        """[out, in] weights the chip realises in digital units (see ``AnalogMatrix.effective_weight``)."""
        return self.analog.effective_weight(self.weight)

    def reset_noise_counter(self) -> None:
        """Restart the per-MVM noise sequence (the next forward draws what the first forward drew)."""
        self.analog.forward_calls = 0

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"AnalogLinear expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"AnalogLinear expects floating-point inputs, got {x.dtype}")
        y = self.analog.matmul(x.reshape(-1, self.in_features), self.weight, self.bias)
        return y.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], self.out_features)

    # -- persistence ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return self.analog.state(self.weight)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.analog.load_state(state)

    def extra_repr(self) -> str:
        config, grid = self.config, self.analog.chip.grid
        noise = "none" if config.noise is None else config.noise.kind
        state = "programmed" if self.is_programmed else "not programmed"
        if self.t_inference is not None:
            state += f", t={self.t_inference:g}s"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tiles={len(grid.in_sizes)}x{len(grid.out_sizes)}, noise={noise}, "
                f"drift_compensation={config.drift_compensation.kind}, seed={self.seed}, "
                f"layer_id={self.layer_id!r}, mvm_noise={self.mvm_noise}, {state}")

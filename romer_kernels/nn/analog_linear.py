"""``AnalogLinear``: a drop-in ``nn.Linear`` whose matrix-vector products run on a simulated crossbar.

The layer keeps the digital ``weight``/``bias`` (so it can be reprogrammed or turned back into
``nn.Linear``) and a programmed chip (``LayerChip``) fixed by ``(seed, layer_id)``. Its life cycle:

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
from romer_kernels.kernels.reference import analog_linear, split_weight
from romer_kernels.nn.chip import LayerChip


class AnalogLinear(nn.Module):
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
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"AnalogLinear needs positive sizes, got in_features={in_features}, out_features={out_features}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.config = resolve_config(config)
        self.layer_id = layer_id
        self.seed = seed
        self.mvm_noise = mvm_noise
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._chip = LayerChip(self.config, out_features, in_features, layer_id)
        self._out_scale: torch.Tensor | None = None         # [n_in_tiles, out] digital factors
        self._split_weight: torch.Tensor | None = None      # tile weights split per input tile
        self._abs_split_weight: torch.Tensor | None = None
        self._programmed_version: tuple[int, int] | None = None
        self.t_inference: float | None = None
        self.forward_calls = 0

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, config: AnalogConfig | str | None = None, *, seed: int = 0,
                    layer_id: int | str = 0, mvm_noise: bool = True) -> "AnalogLinear":
        """An analog copy of ``linear`` (weights copied, same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
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

    # -- chip life cycle ------------------------------------------------------------------------
    def _weight_version(self) -> tuple[int, int]:
        return (self.weight.data_ptr(), self.weight._version)

    def program_(self, seed: int | None = None) -> "AnalogLinear":
        """Program the chip (programming noise, drift exponents, compensation baseline) from ``seed``."""
        if seed is not None:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"seed must be a non-negative int, got {seed!r}")
            self.seed = seed
        tile_weight, out_scale = self._chip.program(self.weight, self.seed, self.mvm_noise)
        self._set_chip_tensors(tile_weight, out_scale)
        self.t_inference = None
        self._programmed_version = self._weight_version()
        return self

    def drift_(self, t_inference: float) -> "AnalogLinear":
        """Move the chip to ``t_inference`` seconds after programming (drift, new read noise, compensation)."""
        if not self.is_programmed:
            self.program_()
        tile_weight, out_scale = self._chip.drift(t_inference, self.mvm_noise)
        self._set_chip_tensors(tile_weight, out_scale)
        self.t_inference = float(t_inference)
        return self

    @property
    def is_programmed(self) -> bool:
        return self._programmed_version is not None and self._programmed_version == self._weight_version()

    def _set_chip_tensors(self, tile_weight: torch.Tensor, out_scale: torch.Tensor) -> None:
        self._out_scale = out_scale
        # the kernels read the weights split per input tile; |W| is needed by PCM-read noise and IR drop
        self._split_weight = split_weight(tile_weight, self._chip.grid)
        io = self.config.io
        needs_abs = not io.is_perfect and (io.w_noise_type == "pcm_read" or io.ir_drop > 0)
        self._abs_split_weight = self._split_weight.abs() if needs_abs else None

    def _restore_chip(self, t_inference: float | None, drift_index: int) -> None:
        """Recreate the chip exactly as it was: program from the seed, then replay the last drift."""
        self.program_()
        if t_inference is not None:
            tile_weight, out_scale = self._chip.drift(t_inference, self.mvm_noise, drift_index=drift_index)
            self._set_chip_tensors(tile_weight, out_scale)
            self.t_inference = t_inference

    def effective_weight(self) -> torch.Tensor:
        """[out, in] weights the chip realises in digital units: tile weights x weight scaling x drift
        compensation x out_scale (what the layer computes with perfect periphery)."""
        if not self.is_programmed:
            self._restore_chip(self.t_inference, max(self._chip.drift_calls - 1, 0))
        parts = [self._split_weight[i, :, : cols.stop - cols.start] * self._out_scale[i][:, None]
                 for i, cols in enumerate(self._chip.grid.in_slices())]
        return torch.cat(parts, dim=1)

    def reset_noise_counter(self) -> None:
        """Restart the per-MVM noise sequence (the next forward draws what the first forward drew)."""
        self.forward_calls = 0

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"AnalogLinear expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"AnalogLinear expects floating-point inputs, got {x.dtype}")
        if not self.is_programmed:  # first forward, or the digital weights changed since programming
            self._restore_chip(self.t_inference, max(self._chip.drift_calls - 1, 0))
        call_index = self.forward_calls
        self.forward_calls += 1
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        seeds = self._chip.mvm_stream(call_index) if self.mvm_noise else None
        with torch.no_grad():
            y = analog_linear(flat.detach().cpu(), self._split_weight, self._out_scale,
                              None if bias is None else bias.detach().cpu(), self._chip.grid, self.config.io, seeds,
                              self._abs_split_weight)
        return y.to(device=x.device, dtype=x.dtype).reshape(*x.shape[:-1], self.out_features)

    # -- persistence ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "layer_id": self.layer_id,
            "mvm_noise": self.mvm_noise,
            "programmed": self.is_programmed,
            "t_inference": self.t_inference,
            "drift_index": max(self._chip.drift_calls - 1, 0),
            "forward_calls": self.forward_calls,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.config = AnalogConfig.from_dict(state["config"])
        self.seed = int(state["seed"])
        self.layer_id = state["layer_id"]
        self.mvm_noise = bool(state["mvm_noise"])
        self.forward_calls = int(state["forward_calls"])
        self._chip = LayerChip(self.config, self.out_features, self.in_features, self.layer_id)
        self._programmed_version = None
        self._pending_restore = (state["programmed"], state["t_inference"], int(state["drift_index"]))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        pending = getattr(self, "_pending_restore", None)
        if pending is not None:
            del self._pending_restore
            programmed, t_inference, drift_index = pending
            if programmed:  # the weights are loaded by now, so the same chip comes back
                self._restore_chip(t_inference, drift_index)

    def extra_repr(self) -> str:
        grid = self._chip.grid
        noise = "none" if self.config.noise is None else self.config.noise.kind
        state = "programmed" if self.is_programmed else "not programmed"
        if self.t_inference is not None:
            state += f", t={self.t_inference:g}s"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tiles={len(grid.in_sizes)}x{len(grid.out_sizes)}, noise={noise}, "
                f"drift_compensation={self.config.drift_compensation.kind}, seed={self.seed}, "
                f"layer_id={self.layer_id!r}, mvm_noise={self.mvm_noise}, {state}")

"""``AnalogMatrix``: one weight matrix on its own crossbar tiles, with its chip life cycle and its MVM.

It is the piece shared by every analog layer: ``AnalogLinear`` holds one, the analog experts layer holds
two per expert, an analog router holds one. It does not own the digital weight (the module does, under
its usual parameter name, so checkpoints keep their keys); every call receives that weight and the
matrix re-programs itself when the weight changed since programming (new storage or in-place edit).

State that defines the chip: ``(config, seed, layer_id)``, the time and index of the last drift, and the
per-MVM noise counter. ``state()`` / ``load_state()`` carry exactly that, so a restored matrix is the
identical chip without storing any noisy tensor.
"""
from __future__ import annotations

from typing import Any

import torch

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.kernels.backends import analog_linear, resolve_backend
from romer_kernels.kernels.reference import split_weight
from romer_kernels.nn.chip import LayerChip


def check_seed(seed: Any) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed


class AnalogMatrix:
    """The simulated chip behind one ``[out_features, in_features]`` weight."""

    def __init__(self, config: AnalogConfig, out_features: int, in_features: int, layer_id: int | str,
                 seed: int = 0, mvm_noise: bool = True) -> None:
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"an analog matrix needs positive sizes, got {out_features}x{in_features}")
        self.config = config
        self.out_features = out_features
        self.in_features = in_features
        self.layer_id = layer_id
        self.seed = check_seed(seed)
        self.mvm_noise = mvm_noise
        self.forward_calls = 0
        self.t_inference: float | None = None
        self.chip = LayerChip(config, out_features, in_features, layer_id)
        self._version: tuple[int, int] | None = None
        self._out_scale: torch.Tensor | None = None         # [n_in_tiles, out] digital factors
        self._tile_weight: torch.Tensor | None = None        # [out, in] tile units: the chip's state, read only
        self._split_cache: torch.Tensor | None = None        # tile weights split per input tile (lazy)
        self._abs_cache: torch.Tensor | None = None          # |split|, for PCM-read noise / IR drop (lazy)
        self._pending_restore: tuple[bool, float | None, int] | None = None
        self.backend: str | None = None  # MVM backend of this matrix; None = the process default (see kernels.backends)
        self._device_cache: tuple | None = None  # (device, tensors on that device) until the chip changes

    # -- life cycle -----------------------------------------------------------------------------
    @staticmethod
    def _weight_version(weight: torch.Tensor) -> tuple[int, int]:
        return (weight.data_ptr(), weight._version)

    def is_programmed(self, weight: torch.Tensor) -> bool:
        return self._version is not None and self._version == self._weight_version(weight)

    def program(self, weight: torch.Tensor, seed: int | None = None) -> None:
        """Program ``weight`` with chip ``seed`` (programming noise, drift exponents, baseline)."""
        if seed is not None:
            self.seed = check_seed(seed)
        self._check_shape(weight)
        self._release()
        self._set(*self.chip.program(weight, self.seed, self.mvm_noise))
        self.t_inference = None
        self._version = self._weight_version(weight)

    def drift(self, weight: torch.Tensor, t_inference: float, drift_index: int | None = None) -> None:
        """Weights ``t_inference`` seconds after programming, with new read noise (or replayed read noise of
        drift call ``drift_index``), and the drift-compensation factors of the simulated readout."""
        if not self.is_programmed(weight):
            self.program(weight)
        self._release()
        self._set(*self.chip.drift(t_inference, self.mvm_noise, drift_index=drift_index))
        self.t_inference = float(t_inference)

    def ensure_programmed(self, weight: torch.Tensor) -> None:
        """Program (or restore a loaded state) if the chip is missing or the weight changed."""
        if self.is_programmed(weight):
            return
        programmed, t_inference, drift_index = self._pending_restore or (True, self.t_inference, self.last_drift_index)
        self._pending_restore = None
        self.program(weight)
        if programmed and t_inference is not None:
            self.drift(weight, t_inference, drift_index=drift_index)

    @property
    def last_drift_index(self) -> int:
        return max(self.chip.drift_calls - 1, 0)

    def _set(self, tile_weight: torch.Tensor, out_scale: torch.Tensor) -> None:
        self._out_scale = out_scale
        self._tile_weight = tile_weight

    def _release(self) -> None:
        """Drop every tensor derived from the chip's weights before the chip changes them: the chip reuses
        its old state as output buffers only when nobody else holds it."""
        self._tile_weight = self._split_cache = self._abs_cache = None
        self._device_cache = None

    @property
    def _split(self) -> torch.Tensor | None:
        """The tile weights split per input tile [n_in_tiles, out, n_max], made at first use after each
        program/drift (the chip's own readout does not need them)."""
        if self._split_cache is None and self._tile_weight is not None:
            self._split_cache = split_weight(self._tile_weight, self.chip.grid)
        return self._split_cache

    @property
    def _abs_split(self) -> torch.Tensor | None:
        """|split| when the IO needs it (PCM-read weight noise, IR drop), else None."""
        io = self.config.io
        if io.is_perfect or not (io.w_noise_type == "pcm_read" or io.ir_drop > 0):
            return None
        if self._abs_cache is None and self._split is not None:
            self._abs_cache = self._split.abs()
        return self._abs_cache

    def _check_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit an analog matrix of "
                             f"{self.out_features}x{self.in_features}")

    # -- compute --------------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               row_ids: torch.Tensor | None = None, call_index: int | None = None,
               backend: str | None = None) -> torch.Tensor:
        """``x [B, in] -> [B, out]`` through the chip, in float32.

        The backend (``backend``, else ``self.backend``, else the process default) decides where: ``cpp``
        and ``reference`` run on the CPU (a CUDA ``x`` is brought over and the result sent back), ``triton``
        on ``x``'s device.
        One call is one forward of the layer: it uses and advances the per-MVM noise counter, unless the
        caller numbers its forwards itself (``call_index``, e.g. one counter for all experts of a layer).
        """
        self.ensure_programmed(weight)
        if call_index is None:
            call_index = self.forward_calls
            self.forward_calls += 1
        streams = self.chip.mvm_stream(call_index) if self.mvm_noise else None
        backend = resolve_backend(backend or self.backend, x.device)
        device = x.device if backend == "triton" else torch.device("cpu")
        split, out_scale, abs_split = self.device_tensors(device)
        with torch.no_grad():
            bias32 = None if bias is None else bias.detach().to(device=device, dtype=torch.float32)
            y = analog_linear(x.detach().to(device=device, dtype=torch.float32), split, out_scale, bias32,
                              self.chip.grid, self.config.io, streams, abs_split, row_ids, backend=backend)
        return y.to(x.device)

    def device_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(split tile weights, out scales, |split| or None) on ``device``; copies to an accelerator are kept
        until the chip changes."""
        if device.type == "cpu":
            return self._split, self._out_scale, self._abs_split
        if self._device_cache is None or self._device_cache[0] != device:  # _release() clears it
            self._device_cache = (device, (self._split.to(device), self._out_scale.to(device), None))
        return self._device_cache[1]

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """[out, in] weights the chip realises in digital units (tile weights x weight scaling x drift
        compensation x out_scale): what the layer computes with perfect periphery."""
        self.ensure_programmed(weight)
        return torch.cat([self._tile_weight[:, cols] * self._out_scale[i][:, None]
                          for i, cols in enumerate(self.chip.grid.in_slices())], dim=1)

    @property
    def num_tiles(self) -> int:
        return self.chip.grid.num_tiles

    # -- persistence ----------------------------------------------------------------------------
    def state(self, weight: torch.Tensor) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "seed": self.seed,
            "layer_id": self.layer_id,
            "mvm_noise": self.mvm_noise,
            "programmed": self.is_programmed(weight),
            "t_inference": self.t_inference,
            "drift_index": self.last_drift_index,
            "forward_calls": self.forward_calls,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take a ``state()``; the chip is rebuilt from it on the next use (weights may load later)."""
        self.config = AnalogConfig.from_dict(state["config"])
        self.seed = check_seed(int(state["seed"]))
        self.layer_id = state["layer_id"]
        self.mvm_noise = bool(state["mvm_noise"])
        self.forward_calls = int(state["forward_calls"])
        self.t_inference = state["t_inference"]
        self.chip = LayerChip(self.config, self.out_features, self.in_features, self.layer_id)
        self._version = None
        self._pending_restore = (bool(state["programmed"]), state["t_inference"], int(state["drift_index"]))

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

import dataclasses
from typing import Any

import torch

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.kernels.backends import analog_linear, resolve_backend, supports_on_the_fly
from romer_kernels.kernels.reference import with_input_range
from romer_kernels.nn.chip import LayerChip, OnTheFlyChip


def check_seed(seed: Any) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return seed


class AnalogMatrix:
    """The simulated chip behind one ``[out_features, in_features]`` weight.

    Memory: the chip (``self.chip``) holds one weight-sized tensor, ``chip.state``, and a few
    ``[n_in_tiles, out]`` vectors; the kernels read ``chip.state`` in place. With ``on_the_fly`` (the
    default for CUDA weights on the Triton backend) the chip is an ``OnTheFlyChip``: no weight-sized
    tensor at all, the kernel generates the chip's weights from the digital ones in every MVM.
    """

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
        self._pending_restore: tuple[bool, float | None, int] | None = None
        self.backend: str | None = None  # MVM backend of this matrix; None = the process default (see kernels.backends)
        self._device_cache: tuple | None = None  # (device, chip.version, tensors on that device)
        self.digital_dropped = False  # the module freed the digital weight: the chip is fixed as it is
        # True: OnTheFlyChip (Triton); False: LayerChip (one state tensor); None: on-the-fly for CUDA weights
        # when the backend resolves to triton. Decided at each program().
        self.on_the_fly: bool | None = None
        # HWA training mode (nn.hwa.HWATraining, shared by the model's matrices) or None: while it is active and
        # autograd records, matmul runs the differentiable training forward instead of this chip's
        self.hwa = None
        # static input range of each input tile, learned by HWA training (set_input_range), or None: the
        # preset's noise management. Owned by the matrix: float32 [n_in_tiles] on the CPU.
        self.input_range: torch.Tensor | None = None

    # -- life cycle -----------------------------------------------------------------------------
    @staticmethod
    def _weight_version(weight: torch.Tensor) -> tuple[int, int]:
        return (weight.data_ptr(), weight._version)

    def is_programmed(self, weight: torch.Tensor) -> bool:
        if self.digital_dropped:
            return True
        return self._version is not None and self._version == self._weight_version(weight)

    def _check_digital(self, what: str) -> None:
        if self.digital_dropped:
            when = "t=0" if self.t_inference is None else f"t={self.t_inference:g} s"
            raise RuntimeError(f"cannot {what} the chip of {self.layer_id!r}: its digital weights were dropped "
                               f"(analogize_(..., keep_digital=False)), so the chip stays as programmed (seed "
                               f"{self.seed}, {when}); load the model again to program or drift another chip")

    def mark_digital_dropped(self) -> None:
        """The owner freed the digital weight: from now on the chip is fixed (program/drift raise)."""
        if isinstance(self.chip, OnTheFlyChip):
            raise RuntimeError(f"{self.layer_id!r}: an on-the-fly chip computes from the digital weights, which "
                               "therefore cannot be dropped")
        if self.chip.state is None:
            raise RuntimeError(f"{self.layer_id!r}: program the chip before dropping its digital weights")
        self.digital_dropped = True

    def set_config(self, config: AnalogConfig) -> None:
        """Use ``config`` from now on (same tiling; e.g. the noise scaled for another trial). The chip is
        unprogrammed until the next ``program`` (or use), which reuses its state tensor: no allocation per
        trial."""
        self._check_digital("reconfigure")
        if not isinstance(config, AnalogConfig):
            raise TypeError(f"set_config expects an AnalogConfig, got {type(config).__name__}")
        if isinstance(self.chip, LayerChip):
            self.chip.set_config(config)  # checks the tiling
        else:
            chip = type(self.chip)(config, self.out_features, self.in_features, self.layer_id)
            if (chip.grid.in_sizes, chip.grid.out_sizes) != (self.chip.grid.in_sizes, self.chip.grid.out_sizes):
                raise ValueError(f"{self.layer_id!r}: the new configuration tiles the matrix differently; convert "
                                 "the model again to change the tile size")
            self.chip = chip
        self.config = config
        self._forget_programming()

    def _forget_programming(self) -> None:
        """The chip holds no programmed weights from now on: no weight version it was programmed from, no
        drift time, no state waiting to be restored, no accelerator copies (after a new config or chip)."""
        self.t_inference = None
        self._version = None
        self._pending_restore = None
        self._device_cache = None

    def program(self, weight: torch.Tensor, seed: int | None = None) -> None:
        """Program ``weight`` with chip ``seed`` (programming noise, compensation baseline)."""
        self._check_digital("program")
        if seed is not None:
            self.seed = check_seed(seed)
        self._check_shape(weight)
        self._check_finite(weight)
        self._device_cache = None
        self._select_chip(weight)
        self.chip.program(weight, self.seed, self.mvm_noise)
        self.t_inference = None
        self._version = self._weight_version(weight)

    def drift(self, weight: torch.Tensor, t_inference: float, drift_index: int | None = None) -> None:
        """Weights ``t_inference`` seconds after programming, with new read noise (or replayed read noise of
        drift call ``drift_index``), and the drift-compensation factors of the simulated readout."""
        self._check_digital("drift")
        if not self.is_programmed(weight):
            self.program(weight)
        self._device_cache = None
        self.chip.drift(weight, t_inference, self.mvm_noise, drift_index=drift_index)
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

    def _select_chip(self, weight: torch.Tensor) -> None:
        on_the_fly = self.on_the_fly
        if on_the_fly is None:
            on_the_fly = weight.device.type == "cuda" and resolve_backend(self.backend, weight.device) == "triton"
            on_the_fly = on_the_fly and supports_on_the_fly(self.config)  # else a stored chip (HERMES, ReRAM)
        wanted = OnTheFlyChip if on_the_fly and self.input_range is None else LayerChip
        if type(self.chip) is not wanted:
            self.chip = wanted(self.config, self.out_features, self.in_features, self.layer_id)

    def _check_finite(self, weight: torch.Tensor) -> None:
        """A NaN or inf weight would reach every output of its tiles through the shared scales and the
        compensation readout: refuse it, naming the matrix and how many there are."""
        finite = torch.isfinite(weight.detach())
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise ValueError(f"{self.layer_id!r}: {bad} of {weight.numel()} weights are NaN or inf; a chip cannot be "
                             "programmed with them (check the checkpoint or the method that wrote them)")

    def _check_shape(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit an analog matrix of "
                             f"{self.out_features}x{self.in_features}")

    def set_input_range(self, input_range: torch.Tensor | None) -> None:
        """Compute with a static input range per input tile from now on (``reference.with_input_range``),
        a copy of ``input_range`` [n_in_tiles]; None: the preset's noise management again."""
        if input_range is None:
            self.input_range = None
            return
        ranges = torch.as_tensor(input_range).detach().to(device="cpu", dtype=torch.float32).reshape(-1).clone()
        tiles = len(self.chip.grid.in_sizes)
        if ranges.numel() != tiles:
            raise ValueError(f"{self.layer_id!r}: {ranges.numel()} input ranges for {tiles} input tiles (trained with "
                             "another tile size?)")
        if not bool(torch.isfinite(ranges).all()) or not bool((ranges > 0).all()):
            raise ValueError(f"{self.layer_id!r}: input ranges must be finite and positive, got {ranges.tolist()}")
        self.input_range = ranges
        if isinstance(self.chip, OnTheFlyChip):  # its fused kernel has no input range: a stored chip from now on
            t_inference, drift_index = self.t_inference, self.last_drift_index
            self.chip = LayerChip(self.config, self.out_features, self.in_features, self.layer_id)
            self._forget_programming()
            if t_inference is not None:  # programmed again at the next use, drifted to the same time
                self._pending_restore = (True, t_inference, drift_index)

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
        if self.training_forward:
            return self.hwa.matmul(self, x, weight, bias, row_ids)
        self.ensure_programmed(weight)
        if call_index is None:
            call_index = self.forward_calls
            self.forward_calls += 1
        streams = self.chip.mvm_stream(call_index) if self.mvm_noise else None
        if isinstance(self.chip, OnTheFlyChip):
            with torch.no_grad():
                y = self.chip.matmul(x.detach().to(weight.device), weight, bias, streams, row_ids)
            return y.to(x.device)
        backend = resolve_backend(backend or self.backend, x.device)
        device = x.device if backend == "triton" else torch.device("cpu")
        tile_weight, out_scale = self.device_tensors(device)
        with torch.no_grad():
            bias32 = None if bias is None else bias.detach().to(device=device, dtype=torch.float32)
            x32, io = x.detach().to(device=device, dtype=torch.float32), self.config.io
            if self.input_range is not None:
                x32, out_scale, io = with_input_range(x32, out_scale, io, self.chip.grid, self.input_range.to(device))
            y = analog_linear(x32, tile_weight, out_scale, bias32, self.chip.grid, io, streams, row_ids, backend=backend)
        return y.to(x.device)

    @property
    def training_forward(self) -> bool:
        """Whether ``matmul`` now runs the HWA training forward (training mode on, autograd recording)."""
        return self.hwa is not None and self.hwa.active and torch.is_grad_enabled()

    def free_chip(self) -> None:
        """Drop the programmed chip (its state tensor); the next inference use programs it again. What HWA
        training does first, so that training holds no chip besides the digital weights."""
        self._check_digital("free")
        self.chip = LayerChip(self.config, self.out_features, self.in_features, self.layer_id)
        self._forget_programming()

    def device_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile weights [out, in], out scales [n_in_tiles, out]) on ``device``: the chip's own tensors on
        the CPU (read only), copies on an accelerator, kept until the chip changes."""
        chip = self.chip
        if device.type == "cpu":
            return chip.state, chip.out_scale
        cache = self._device_cache
        if cache is None or cache[0] != device or cache[1] != chip.version:
            self._device_cache = cache = (device, chip.version, (chip.state.to(device), chip.out_scale.to(device)))
        return cache[2]

    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """[out, in] weights the chip realises in digital units (tile weights x weight scaling x drift
        compensation x out_scale): what the layer computes with perfect periphery."""
        self.ensure_programmed(weight)
        if isinstance(self.chip, OnTheFlyChip):
            raise NotImplementedError(f"{self.layer_id!r}: an on-the-fly chip keeps no weights to return; program it "
                                      "with on_the_fly=False to inspect them")
        state, out_scale = self.chip.state, self.chip.out_scale
        return torch.cat([state[:, cols].float() * out_scale[i][:, None]
                          for i, cols in enumerate(self.chip.grid.in_slices())], dim=1)

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this matrix and its chip hold, by attribute name (memory accounting, tests)."""
        found: dict[str, torch.Tensor] = {}

        def visit(name: str, value) -> None:
            if isinstance(value, torch.Tensor):
                found[name] = value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    visit(f"{name}[{i}]", item)
            elif isinstance(value, dict):
                for key, item in value.items():
                    visit(f"{name}[{key!r}]", item)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. an on-the-fly plan
                for item in dataclasses.fields(value):
                    visit(f"{name}.{item.name}", getattr(value, item.name))

        for owner, prefix in ((self, ""), (self.chip, "chip.")):
            for name, value in vars(owner).items():
                if name != "chip":
                    visit(prefix + name, value)
        return found

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
            "input_range": None if self.input_range is None else self.input_range.tolist(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take a ``state()``; the chip is rebuilt from it on the next use (weights may load later)."""
        self.config = AnalogConfig.from_dict(state["config"])
        self.seed = check_seed(int(state["seed"]))
        self.layer_id = state["layer_id"]
        self.mvm_noise = bool(state["mvm_noise"])
        self.forward_calls = int(state["forward_calls"])
        self.chip = LayerChip(self.config, self.out_features, self.in_features, self.layer_id)
        self._forget_programming()
        self.t_inference = state["t_inference"]
        self.set_input_range(None if state.get("input_range") is None else torch.tensor(state["input_range"]))
        self._pending_restore = (bool(state["programmed"]), state["t_inference"], int(state["drift_index"]))

"""Typed configuration of an analog crossbar layer, with aihwkit's names and defaults.

``AnalogConfig`` has five parts: the tile size (``TileConfig``), the peripheral IO of one MVM
(``IOConfig``: DAC, ADC, output noise, noise and bound management, read noise, IR drop), the mapping of
digital weights onto conductances (``MappingConfig``: weight scaling omega), the device noise model
(``romer_kernels.config.device_noise``) and drift compensation. Every field is checked on construction;
a bad value raises ``ValueError`` naming ``Class.field`` and the allowed range. The maths behind each
field is in docs/analog-model.md.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from romer_kernels.config._fields import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    from_dict,
    to_dict,
)
from romer_kernels.config.device_noise import DeviceNoiseConfig, device_noise_from_dict

NOISE_MANAGEMENT = ("abs_max", "constant", "none")
BOUND_MANAGEMENT = ("iterative", "none")
W_NOISE_TYPES = ("none", "additive_constant", "pcm_read")
DRIFT_COMPENSATION = ("none", "global", "per_column")
STATE_DTYPES = ("float32", "bfloat16", "float16")  # what a chip's one state tensor is stored in
MAX_BM_ROUNDS = 48  # bound-management rounds are part of the random-stream counter (6 bits)


def resolution_step(res: float, bound: float) -> float:
    """Quantization step of a DAC/ADC in aihwkit's convention (0 = no quantization).

    ``res`` < 1 is the step as a fraction of the full range 2*bound (aihwkit default 1/126 for the DAC);
    ``res`` >= 1 is the number of steps over that range (254 = "8 bit"). The number of levels is
    ``steps + 1``: 1/126 gives 127 input levels, 1/510 gives 511 output levels.
    """
    if res <= 0:
        return 0.0
    fraction = 1.0 / res if res >= 1 else res
    return fraction * 2.0 * bound


def check_resolution(owner: str, name: str, res: float) -> None:
    """A DAC/ADC resolution must give at least three levels (-bound, 0, +bound): a step of at most half
    the range. Between 0.5 and 2 every value in the range rounds to 0 (one level), which is no converter."""
    if 0.5 < res < 2:
        raise ValueError(f"{owner}.{name} = {res!r} leaves one quantization level: use <= 0 (no quantization), "
                         "a step of at most 0.5 of the range (e.g. 1/126), or at least 2 steps over the range "
                         "(e.g. 254)")


@dataclass(frozen=True)
class TileConfig:
    """Crossbar size: a weight is cut into tiles of at most ``max_input_size`` x ``max_output_size``.

    0 means "no split" along that dimension (aihwkit's ``mapping.max_input_size/max_output_size``).
    """

    max_input_size: int = 512
    max_output_size: int = 512

    def __post_init__(self) -> None:
        check_int("TileConfig", "max_input_size", self.max_input_size, low=0)
        check_int("TileConfig", "max_output_size", self.max_output_size, low=0)


@dataclass(frozen=True)
class IOConfig:
    """Peripheral circuits of one analog MVM (aihwkit ``IOParameters``, forward direction).

    Units: inputs after noise management are in [-inp_bound, inp_bound] (normalized DAC range); outputs
    are in units of (normalized input) x (tile weight units), where the ADC range is [-out_bound, out_bound].
    """

    is_perfect: bool = False          # skip every IO non-ideality (weights may still be noisy)
    inp_bound: float = 1.0            # DAC range, normalized input units
    inp_res: float = 1 / 126          # DAC resolution (see resolution_step); <= 0: no quantization
    inp_noise: float = 0.0            # additive Gaussian std after the DAC, normalized input units
    out_bound: float = 12.0           # ADC range; <= 0: no clipping
    out_res: float = 1 / 510          # ADC resolution (see resolution_step); <= 0: no quantization
    out_noise: float = 0.06           # additive Gaussian std before the ADC, output units
    w_noise: float = 0.0              # output-referred weight read noise std (see w_noise_type)
    w_noise_type: str = "none"        # "none" | "additive_constant" (std w_noise*||x'||) | "pcm_read"
    noise_management: str = "abs_max"  # input scale per vector: "abs_max" | "constant" | "none"
    nm_thres: float = 0.0             # abs_max: cap on the scale if > 0; constant: the scale (1 if 0)
    bound_management: str = "iterative"  # "iterative": halve the input of a vector whose output clipped
    max_bm_factor: int = 1000         # stop bound management when the reduction exceeds this
    max_bm_res: float = 0.25          # ... or when reduction > max_bm_res / DAC step (aihwkit rule)
    bm_test_negative_bound: bool = True  # a clip at -out_bound also triggers another round
    ir_drop: float = 0.0              # IR-drop scale (aihwkit ``ir_drop``), 0 = off
    ir_drop_g_ratio: float = 1 / 0.35 / 5e-6  # wire-to-device conductance ratio (aihwkit default)
    out_scale: float = 1.0            # digital output scale

    def __post_init__(self) -> None:
        owner = "IOConfig"
        check_bool(owner, "is_perfect", self.is_perfect)
        check_number(owner, "inp_bound", self.inp_bound, low=0, low_open=True)
        check_number(owner, "inp_res", self.inp_res)
        check_resolution(owner, "inp_res", self.inp_res)
        check_number(owner, "inp_noise", self.inp_noise, low=0)
        check_number(owner, "out_bound", self.out_bound)
        check_number(owner, "out_res", self.out_res)
        check_resolution(owner, "out_res", self.out_res)
        check_number(owner, "out_noise", self.out_noise, low=0)
        check_number(owner, "w_noise", self.w_noise, low=0)
        check_choice(owner, "w_noise_type", self.w_noise_type, W_NOISE_TYPES)
        check_choice(owner, "noise_management", self.noise_management, NOISE_MANAGEMENT)
        check_number(owner, "nm_thres", self.nm_thres, low=0)
        check_choice(owner, "bound_management", self.bound_management, BOUND_MANAGEMENT)
        check_int(owner, "max_bm_factor", self.max_bm_factor, low=1)
        if self.max_bm_factor > 2 ** (MAX_BM_ROUNDS - 2):
            raise ValueError(f"IOConfig.max_bm_factor must be <= 2**{MAX_BM_ROUNDS - 2}, got {self.max_bm_factor}")
        check_number(owner, "max_bm_res", self.max_bm_res, low=0, low_open=True)
        check_bool(owner, "bm_test_negative_bound", self.bm_test_negative_bound)
        check_number(owner, "ir_drop", self.ir_drop, low=0)
        check_number(owner, "ir_drop_g_ratio", self.ir_drop_g_ratio, low=0, low_open=True)
        check_number(owner, "out_scale", self.out_scale, low=0, low_open=True)
        if self.w_noise > 0 and self.w_noise_type == "none":
            raise ValueError("IOConfig.w_noise > 0 needs IOConfig.w_noise_type 'additive_constant' or 'pcm_read'")

    @property
    def inp_step(self) -> float:
        return resolution_step(self.inp_res, self.inp_bound)

    @property
    def out_step(self) -> float:
        return resolution_step(self.out_res, self.out_bound) if self.out_bound > 0 else 0.0


@dataclass(frozen=True)
class MappingConfig:
    """How digital weights become tile weights (aihwkit ``MappingParameter`` weight scaling).

    With ``weight_scaling_omega`` > 0 each tile holds W / s with s = max|W| / omega over the tile (or over
    each crossbar column when ``weight_scaling_columnwise``), and its outputs are multiplied by s
    digitally. 0 keeps the raw weights on the tile (aihwkit's default). The bias is always digital.
    """

    weight_scaling_omega: float = 0.0
    weight_scaling_columnwise: bool = False

    def __post_init__(self) -> None:
        check_number("MappingConfig", "weight_scaling_omega", self.weight_scaling_omega, low=0)
        check_bool("MappingConfig", "weight_scaling_columnwise", self.weight_scaling_columnwise)
        if self.weight_scaling_columnwise and self.weight_scaling_omega == 0:
            raise ValueError("MappingConfig.weight_scaling_columnwise needs weight_scaling_omega > 0")


@dataclass(frozen=True)
class DriftCompensationConfig:
    """Drift compensation from the simulator's own readout (aihwkit ``GlobalDriftCompensation``).

    "global": one factor per tile, baseline/current of mean |y| of an identity-input readout through the
    tile's noisy periphery; "per_column": one factor per crossbar column; "none": no compensation.
    """

    kind: str = "global"

    def __post_init__(self) -> None:
        check_choice("DriftCompensationConfig", "kind", self.kind, DRIFT_COMPENSATION)


@dataclass(frozen=True)
class AnalogConfig:
    """Everything that defines a simulated analog chip except its random seed."""

    tile: TileConfig = field(default_factory=TileConfig)
    io: IOConfig = field(default_factory=IOConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    noise: DeviceNoiseConfig | None = None
    drift_compensation: DriftCompensationConfig = field(default_factory=lambda: DriftCompensationConfig("none"))
    # Storage of the chip's read conductances (the one weight-sized tensor a programmed chip keeps): float32
    # is exact; bfloat16 / float16 halve the memory and round each read weight once (docs/scale.md).
    state_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice("AnalogConfig", "state_dtype", self.state_dtype, STATE_DTYPES)
        for name, kind in (("tile", TileConfig), ("io", IOConfig), ("mapping", MappingConfig),
                           ("drift_compensation", DriftCompensationConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ValueError(f"AnalogConfig.{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.noise is not None and not isinstance(self.noise, DeviceNoiseConfig):
            raise ValueError(f"AnalogConfig.noise must be a device noise config or None, got {type(self.noise).__name__}")

    @property
    def is_ideal(self) -> bool:
        """True when the simulated layer computes exactly the digital layer."""
        return self.io.is_perfect and self.noise is None and self.mapping.weight_scaling_omega == 0

    def replace(self, **changes: Any) -> "AnalogConfig":
        """A copy with parts replaced: by objects (``io=IOConfig(...)``) or by dicts of the fields to change
        (``io={"out_noise": 0.02}``, ``noise={"prog_noise_scale": 1.5}``; ``noise={"kind": "hermes", ...}``
        switches the device model). Every field is validated by its part."""
        for name, value in list(changes.items()):
            if not isinstance(value, dict):
                continue
            if name == "noise":
                if "kind" in value or self.noise is None:
                    changes[name] = device_noise_from_dict(value)
                else:
                    changes[name] = device_noise_from_dict({**self.noise.to_dict(), **value})
            elif name in ("tile", "io", "mapping", "drift_compensation"):
                part = getattr(self, name)  # from_dict names an unknown field and lists the known ones
                changes[name] = from_dict(type(part), {**to_dict(part), **value})
            else:
                raise ValueError(f"AnalogConfig.{name} does not take a dict")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tile": to_dict(self.tile),
            "io": to_dict(self.io),
            "mapping": to_dict(self.mapping),
            "noise": None if self.noise is None else self.noise.to_dict(),
            "drift_compensation": to_dict(self.drift_compensation),
            "state_dtype": self.state_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AnalogConfig":
        if not isinstance(data, dict):
            raise ValueError(f"AnalogConfig must be given as a JSON object, got {type(data).__name__}")
        parts = {"tile": TileConfig, "io": IOConfig, "mapping": MappingConfig,
                 "drift_compensation": DriftCompensationConfig}
        unknown = sorted(set(data) - set(parts) - {"noise", "state_dtype"})
        if unknown:
            raise ValueError(f"AnalogConfig has no part(s) {', '.join(unknown)}; known: "
                             f"{', '.join([*parts, 'noise', 'state_dtype'])}")
        kwargs: dict[str, Any] = {name: from_dict(kind, data[name]) for name, kind in parts.items() if name in data}
        if "state_dtype" in data:
            kwargs["state_dtype"] = data["state_dtype"]
        if data.get("noise") is not None:
            kwargs["noise"] = device_noise_from_dict(data["noise"])
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "AnalogConfig":
        return cls.from_dict(json.loads(text))

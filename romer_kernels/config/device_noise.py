"""Configuration of the device noise models (programming noise, drift, read noise).

One frozen dataclass per model, each validated on construction (a bad value raises ``ValueError``
naming ``Class.field`` and the allowed range) and serialisable with ``to_dict()`` / the module function
:func:`device_noise_from_dict`, which dispatches on the ``"kind"`` key. ``build_noise_model(config)`` in
:mod:`romer_kernels.noise` turns a config into the model that does the maths.

The PCM, HERMES and ReRAM configs mirror aihwkit 1.1.0's ``PCMLikeNoiseModel``, ``HermesNoiseModel`` and
``ReRamWan2022NoiseModel`` (same parameter names and defaults, conductances in microsiemens, times in
seconds). ``GaussianNoiseConfig`` is this package's own simple model and has no aihwkit counterpart.
Formulas and units: docs/device-noise.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from romer_kernels.config._fields import check_int, check_number, from_dict, to_dict

# HERMES (Le Gallo et al., Nat. Electron. 2023): values characterised for 1 or 2 devices per weight sign.
HERMES_G_MAX = {1: 10.35, 2: 20.7}        # microsiemens; also the largest allowed g_max
HERMES_T_0 = {1: 200.0, 2: 300.0}         # seconds
HERMES_PROG_COEFF = {
    1: (0.15781817, 2.32443916, -2.16310839, 0.68841818),
    2: (0.16603222, 4.71806468, -8.48101252, 4.68961419),
}

# ReRAM (Wan et al., Nature 2022): sigma(g_rel) in microsiemens, coefficients of g_rel^0 .. g_rel^4,
# fitted only at these times after programming (seconds).
RERAM_WAN2022_COEFF: dict[float, tuple[float, ...]] = {
    1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
    86400.0: (0.701, 22.086, -50.773, 47.095, -16.458),
    172800.0: (0.782, 20.274, -43.507, 37.062, -11.934),
}


class DeviceNoiseConfig:
    """Base of the device noise configs (what ``AnalogConfig.noise`` accepts)."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a ``"kind"`` key, readable by :func:`device_noise_from_dict`."""
        return {"kind": self.kind, **to_dict(self)}


def _check_optional_number(owner: str, name: str, value: Any, **limits: Any) -> None:
    if value is not None:
        check_number(owner, name, value, **limits)


@dataclass(frozen=True)
class PCMNoiseConfig(DeviceNoiseConfig):
    """aihwkit ``PCMLikeNoiseModel`` (Nandakumar et al., ICECS 2019) on a single pair of devices.

    Fields (aihwkit name in brackets, same default):
    g_max            conductance (uS) the abs-max of each tile is mapped to [g_max]
    prog_coeff       sigma_prog polynomial c0 + c1 g_rel + c2 g_rel^2 + ..., uS [prog_coeff]
    prog_coeff_g_max_reference  g_max (uS) the coefficients were fitted at [prog_coeff_g_max_reference]
    t_0              first reading time of the drift fit, s [t_0]
    t_read           time constant of the 1/f read-noise fit, s [t_read]
    prog_noise_scale, read_noise_scale, drift_scale   dimensionless multipliers [same names]
    """

    kind: ClassVar[str] = "pcm"

    g_max: float = 25.0
    prog_coeff: tuple[float, ...] = (0.26348, 1.9650, -1.1731)
    prog_coeff_g_max_reference: float = 25.0
    t_0: float = 20.0
    t_read: float = 250e-9
    prog_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0

    def __post_init__(self) -> None:
        owner = "PCMNoiseConfig"
        check_number(owner, "g_max", self.g_max, low=0, low_open=True)
        if not isinstance(self.prog_coeff, (tuple, list)) or len(self.prog_coeff) == 0:
            raise ValueError(f"{owner}.prog_coeff must be a non-empty list of numbers, got {self.prog_coeff!r}")
        for i, coeff in enumerate(self.prog_coeff):
            check_number(owner, f"prog_coeff[{i}]", coeff)
        object.__setattr__(self, "prog_coeff", tuple(self.prog_coeff))
        check_number(owner, "prog_coeff_g_max_reference", self.prog_coeff_g_max_reference, low=0, low_open=True)
        check_number(owner, "t_0", self.t_0, low=0, low_open=True)
        check_number(owner, "t_read", self.t_read, low=0, low_open=True)
        check_number(owner, "prog_noise_scale", self.prog_noise_scale, low=0)
        check_number(owner, "read_noise_scale", self.read_noise_scale, low=0)
        check_number(owner, "drift_scale", self.drift_scale, low=0)


@dataclass(frozen=True)
class HermesNoiseConfig(DeviceNoiseConfig):
    """aihwkit ``HermesNoiseModel`` (IBM HERMES chip, Le Gallo et al., Nat. Electron. 2023).

    ``num_devices`` (1 or 2 PCM devices per weight sign) selects the fitted polynomials. ``g_max`` and
    ``t_0`` left at ``None`` take aihwkit's value for ``num_devices`` (20.7 uS / 300 s for 2 devices,
    10.35 uS / 200 s for 1); ``resolved_g_max`` and ``resolved_t_0`` give the values in use. As in
    aihwkit, ``g_max`` may not exceed the characterised maximum for ``num_devices``.
    """

    kind: ClassVar[str] = "hermes"

    num_devices: int = 2
    g_max: float | None = None
    t_0: float | None = None
    t_read: float = 512e-9
    prog_noise_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_scale: float = 1.0

    def __post_init__(self) -> None:
        owner = "HermesNoiseConfig"
        check_int(owner, "num_devices", self.num_devices, low=1)
        if self.num_devices not in HERMES_G_MAX:
            raise ValueError(f"{owner}.num_devices must be 1 or 2, got {self.num_devices!r}")
        _check_optional_number(owner, "g_max", self.g_max, low=0, low_open=True,
                               high=HERMES_G_MAX[self.num_devices])
        _check_optional_number(owner, "t_0", self.t_0, low=0, low_open=True)
        check_number(owner, "t_read", self.t_read, low=0, low_open=True)
        check_number(owner, "prog_noise_scale", self.prog_noise_scale, low=0)
        check_number(owner, "read_noise_scale", self.read_noise_scale, low=0)
        check_number(owner, "drift_scale", self.drift_scale, low=0)

    @property
    def resolved_g_max(self) -> float:
        """g_max in uS: the configured value, or 20.7 (2 devices) / 10.35 (1 device)."""
        return HERMES_G_MAX[self.num_devices] if self.g_max is None else float(self.g_max)

    @property
    def resolved_t_0(self) -> float:
        """t_0 in s: the configured value, or 300 (2 devices) / 200 (1 device)."""
        return HERMES_T_0[self.num_devices] if self.t_0 is None else float(self.t_0)

    @property
    def prog_coeff(self) -> tuple[float, ...]:
        """Programming-noise polynomial (uS) fitted for ``num_devices``."""
        return HERMES_PROG_COEFF[self.num_devices]

    @property
    def prog_coeff_g_max_reference(self) -> float:
        """The g_max (uS) ``prog_coeff`` was fitted at: 20.7 (2 devices) / 10.35 (1 device)."""
        return HERMES_G_MAX[self.num_devices]


@dataclass(frozen=True)
class ReRamWan2022NoiseConfig(DeviceNoiseConfig):
    """aihwkit ``ReRamWan2022NoiseModel`` (Wan et al., Nature 2022) on a single pair of devices.

    The conductance spread is a 4th-order polynomial of g_T/g_max fitted only at
    ``FITTED_TIMES`` = 1 s, 1 day and 2 days; reading at any other ``t_inference`` raises ``ValueError``.

    ``coeff_g_max_reference = None`` reproduces aihwkit 1.1.0, whose effective reference is ``g_max``
    itself (its code means to use 40 uS but stores that in an attribute it never reads), so the
    polynomial is in uS independent of ``g_max``. Set 40.0 to scale the spread as the paper intended.
    """

    kind: ClassVar[str] = "reram_wan2022"
    FITTED_TIMES: ClassVar[tuple[float, ...]] = tuple(RERAM_WAN2022_COEFF)

    g_max: float = 25.0
    noise_scale: float = 1.0
    coeff_g_max_reference: float | None = None

    def __post_init__(self) -> None:
        owner = "ReRamWan2022NoiseConfig"
        check_number(owner, "g_max", self.g_max, low=0, low_open=True)
        check_number(owner, "noise_scale", self.noise_scale, low=0)
        _check_optional_number(owner, "coeff_g_max_reference", self.coeff_g_max_reference, low=0, low_open=True)

    @property
    def resolved_coeff_g_max_reference(self) -> float:
        """The reference g_max in use: the configured value, or ``g_max`` (aihwkit 1.1.0 behaviour)."""
        return float(self.g_max) if self.coeff_g_max_reference is None else float(self.coeff_g_max_reference)


@dataclass(frozen=True)
class GaussianNoiseConfig(DeviceNoiseConfig):
    """This package's own simple chip model (no aihwkit counterpart): Gaussian weight noise, no drift.

    Programming: ``w_P = w + sigma * w_max * xi_1 + multiplicative_sigma * |w| * xi_2``, with ``w_max``
    the abs-max of the weight's crossbar column (one output row within one input tile). Reading:
    ``w = w_P + read_sigma * w_max(w_P) * xi_3``, drawn afresh at every read. All sigmas are
    dimensionless fractions.
    """

    kind: ClassVar[str] = "gaussian"

    sigma: float = 0.02
    multiplicative_sigma: float = 0.0
    read_sigma: float = 0.0

    def __post_init__(self) -> None:
        owner = "GaussianNoiseConfig"
        check_number(owner, "sigma", self.sigma, low=0)
        check_number(owner, "multiplicative_sigma", self.multiplicative_sigma, low=0)
        check_number(owner, "read_sigma", self.read_sigma, low=0)


NOISE_CONFIGS: dict[str, type[DeviceNoiseConfig]] = {
    cls.kind: cls for cls in (PCMNoiseConfig, HermesNoiseConfig, ReRamWan2022NoiseConfig, GaussianNoiseConfig)
}


def device_noise_from_dict(data: dict[str, Any]) -> DeviceNoiseConfig:
    """Build a device noise config from ``to_dict()`` output; ``data["kind"]`` picks the class."""
    if not isinstance(data, dict):
        raise ValueError(f"a device noise config must be given as a JSON object, got {type(data).__name__}")
    if "kind" not in data:
        raise ValueError(f"a device noise config needs a 'kind' key, one of {', '.join(map(repr, NOISE_CONFIGS))}")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in NOISE_CONFIGS:
        raise ValueError(f"unknown device noise kind {kind!r}; known kinds: {', '.join(map(repr, NOISE_CONFIGS))}")
    fields = {key: value for key, value in data.items() if key != "kind"}
    return from_dict(NOISE_CONFIGS[kind], fields)


__all__ = [
    "DeviceNoiseConfig", "GaussianNoiseConfig", "HermesNoiseConfig", "NOISE_CONFIGS", "PCMNoiseConfig",
    "ReRamWan2022NoiseConfig", "device_noise_from_dict",
]

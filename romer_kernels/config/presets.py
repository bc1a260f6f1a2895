"""Named configurations. ``preset(name)`` returns a fresh ``AnalogConfig``; see docs/analog-model.md."""
from __future__ import annotations

from typing import Callable

from romer_kernels.config.analog import AnalogConfig, DriftCompensationConfig, IOConfig, MappingConfig, TileConfig
from romer_kernels.config.device_noise import (GaussianNoiseConfig, HermesNoiseConfig, PCMNoiseConfig,
                                               ReRamWan2022NoiseConfig)


def ideal() -> AnalogConfig:
    """Exactly the digital layer: perfect periphery, no device noise, raw weights."""
    return AnalogConfig(io=IOConfig(is_perfect=True), noise=None, drift_compensation=DriftCompensationConfig("none"))


def aihwkit_default() -> AnalogConfig:
    """aihwkit ``InferenceRPUConfig()``: 512x512 tiles, 7-bit DAC, 9-bit ADC over +-12, out_noise 0.06,
    abs-max noise management, iterative bound management, raw weights (omega = 0), PCM-like noise and
    global drift compensation."""
    return AnalogConfig(
        tile=TileConfig(512, 512),
        io=IOConfig(),
        mapping=MappingConfig(),
        noise=PCMNoiseConfig(),
        drift_compensation=DriftCompensationConfig("global"),
    )


def rasch2023() -> AnalogConfig:
    """Inference settings of aihwkit's ``StandardHWATrainingPreset`` (Rasch et al., Nat. Commun. 2023).

    8-bit DAC/ADC (254 steps), ADC bound 10, out_noise 0.04, PCM-read weight noise 0.0175, IR drop 1.0,
    omega = 1 columnwise, 512-row tiles with unsplit outputs, PCM-like noise, global drift compensation.
    One deliberate difference: the preset learns a static input range during HWA training; a model that
    was never trained has none, so the input is scaled by its abs-max per vector and tile (the "dynamic"
    input range of aihwkit-lightning), without bound management. HWA training with
    ``HWAConfig(learn_input_range=True)`` learns the preset's static ranges, and the trained model computes
    with them (``reference.with_input_range``).
    """
    return AnalogConfig(
        tile=TileConfig(max_input_size=512, max_output_size=0),
        io=IOConfig(inp_res=254, out_res=254, out_bound=10.0, out_noise=0.04, w_noise=0.0175,
                    w_noise_type="pcm_read", ir_drop=1.0, noise_management="abs_max", bound_management="none"),
        mapping=MappingConfig(weight_scaling_omega=1.0, weight_scaling_columnwise=True),
        noise=PCMNoiseConfig(),
        drift_compensation=DriftCompensationConfig("global"),
    )


def rasch2023_hermes() -> AnalogConfig:
    """``rasch2023``'s periphery with HERMES PCM devices (aihwkit ``HermesNoiseModel``, 2 devices per
    weight, Le Gallo et al. 2023) instead of the PCM-like model; global drift compensation."""
    return rasch2023().replace(noise=HermesNoiseConfig())


def rasch2023_reram() -> AnalogConfig:
    """``rasch2023``'s periphery with ReRAM devices (aihwkit ``ReRamWan2022NoiseModel``, Wan et al. 2022):
    readable only at t = 1 s, 1 day and 2 days (the fitted times); global drift compensation."""
    return rasch2023().replace(noise=ReRamWan2022NoiseConfig())


def lightning_8bit(prog_noise_scale: float = 1.0) -> AnalogConfig:
    """aihwkit-lightning-style inference: 512x512 tiles, 8-bit DAC with per-vector abs-max input range,
    8-bit ADC over +-10 (in units of the column's w_max), PCM programming noise scaled by
    ``prog_noise_scale``, no drift, no read noise, no output noise, no compensation."""
    return AnalogConfig(
        tile=TileConfig(512, 512),
        io=IOConfig(inp_res=254, out_res=254, out_bound=10.0, out_noise=0.0, noise_management="abs_max",
                    bound_management="none"),
        mapping=MappingConfig(weight_scaling_omega=1.0, weight_scaling_columnwise=True),
        noise=PCMNoiseConfig(prog_noise_scale=prog_noise_scale, read_noise_scale=0.0, drift_scale=0.0),
        drift_compensation=DriftCompensationConfig("none"),
    )


def gaussian_chip(sigma: float = 0.02, multiplicative_sigma: float = 0.0) -> AnalogConfig:
    """Simple chip: ideal periphery, additive Gaussian weight noise sigma * w_max of each crossbar column
    (plus an optional multiplicative part sigma_m * |w|), 512x512 tiles, no drift."""
    return AnalogConfig(
        tile=TileConfig(512, 512),
        io=IOConfig(is_perfect=True),
        noise=GaussianNoiseConfig(sigma=sigma, multiplicative_sigma=multiplicative_sigma),
        drift_compensation=DriftCompensationConfig("none"),
    )


PRESETS: dict[str, Callable[[], AnalogConfig]] = {
    "ideal": ideal,
    "aihwkit-default": aihwkit_default,
    "rasch2023": rasch2023,
    "rasch2023-hermes": rasch2023_hermes,
    "rasch2023-reram": rasch2023_reram,
    "lightning-8bit": lightning_8bit,
    "gaussian-chip": gaussian_chip,
}


def preset(name: str) -> AnalogConfig:
    """The configuration called ``name`` (one of ``PRESETS``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def resolve_config(config: AnalogConfig | str | None) -> AnalogConfig:
    """Accept a config object, a preset name, or None (= the "aihwkit-default" preset)."""
    if config is None:
        return aihwkit_default()
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, AnalogConfig):
        return config
    raise ValueError(f"config must be an AnalogConfig or a preset name, got {type(config).__name__}")


def load_config(spec: str, overrides: "list[str] | tuple[str, ...]" = ()) -> AnalogConfig:
    """A preset name or the path of a JSON file (``AnalogConfig.to_json``, e.g. from ``romer presets NAME
    --out FILE``), with ``overrides`` of the form ``part.field=value`` (``io.out_noise=0.02``,
    ``noise.prog_noise_scale=1.5``; values are JSON: numbers, true/false, null, strings). Every field is
    checked by the config itself: unknown keys, wrong types and out-of-range values name the field."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    if spec in PRESETS:
        config = preset(spec)
    elif spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            config = AnalogConfig.from_dict(json.loads(path.read_text()))
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"config file {path}: {error}") from None
    else:
        raise ValueError(f"unknown preset {spec!r}: give one of {', '.join(PRESETS)} or a JSON config file")
    if not overrides:
        return config
    data = config.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like part.field=value (e.g. io.out_noise=0.02)")
        part, name = parts
        if part not in data or not isinstance(data[part], dict):
            known = ", ".join(k for k, v in data.items() if isinstance(v, dict))
            raise ValueError(f"override {item!r}: no config part {part!r} (parts with fields: {known})")
        if name not in data[part]:
            raise ValueError(f"override {item!r}: {part} has no field {name!r}; known: {', '.join(data[part])}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw  # a bare word: a string (e.g. w_noise_type=pcm)
        data[part][name] = value
    return AnalogConfig.from_dict(data)


def config_label(spec: str) -> str:
    """A short name for a config spec in titles and run-folder names: the preset or the file's stem."""
    from pathlib import Path  # noqa: PLC0415

    return spec if spec in PRESETS else Path(spec).stem

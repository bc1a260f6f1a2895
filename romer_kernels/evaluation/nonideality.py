"""Which nonideality matters: the preset taken apart, one nonideality at a time at the preset's own level.

``nonideality_configs(config)`` returns the configurations of the sweep, each the preset's tiling and
weight mapping with exactly one nonideality switched on (``off`` has none: the tiled digital computation;
``all`` is the preset itself):

=====================  =========================================================================
``dac``                 input quantization (``inp_res``) with the preset's input scaling
``input_noise``         additive input noise after the DAC (``inp_noise``; the preset's, or its
                        ``out_noise`` value where it has none, so inputs and outputs are compared at
                        one level)
``output_noise``        additive output noise before the ADC (``out_noise``)
``adc``                 output quantization and clipping (``out_res``, ``out_bound``, bound management)
``programming``         device programming noise (PCM: ``prog_noise_scale``; drift and 1/f off)
``drift``               conductance drift at the evaluation time with the preset's compensation
``read_noise``          device 1/f read noise at the evaluation time (drift and programming off)
``short_term_read``     output-referred short-term read noise (``w_noise``)
``ir_drop``             IR drop along the crossbar rows (``ir_drop``)
=====================  =========================================================================

Nonidealities the preset does not have (and that have no stated level) are left out. ``nonideality_sweep``
runs each as a noise sweep at scale 1 on the same chip seeds (resumable run folders), and returns the PPL
increase of each over the tiled digital model with a paired interval.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from romer_kernels.config.analog import AnalogConfig, DriftCompensationConfig
from romer_kernels.config.device_noise import PCMNoiseConfig
from romer_kernels.evaluation.runner import SweepSettings

DESCRIPTIONS = {
    "off": "none (tiled digital)",
    "dac": "DAC quantization",
    "input_noise": "input noise",
    "output_noise": "output noise",
    "adc": "ADC resolution and range",
    "programming": "weight programming noise",
    "drift": "drift (compensated)",
    "read_noise": "1/f read noise",
    "short_term_read": "short-term read noise",
    "ir_drop": "IR drop",
    "all": "all (the preset)",
}


def nonideality_configs(config: AnalogConfig) -> dict[str, tuple[str, AnalogConfig]]:
    """name -> (what is on, at which level; the config) for ``config`` taken apart (module docstring)."""
    io = config.io
    if io.is_perfect:
        raise ValueError("the preset has a perfect periphery: there is nothing to take apart but its device noise")
    if config.noise is not None and not isinstance(config.noise, PCMNoiseConfig):
        raise ValueError(f"the nonideality split is defined for PCM-like device noise (its programming, drift and "
                         f"read noise scale separately), not {config.noise.kind!r}")
    off_io = dataclasses.replace(io, inp_res=0.0, inp_noise=0.0, out_res=0.0, out_bound=0.0, out_noise=0.0,
                                 w_noise=0.0, w_noise_type="none", ir_drop=0.0, bound_management="none")
    off = config.replace(io=off_io, noise=None, drift_compensation=DriftCompensationConfig("none"))
    out: dict[str, tuple[str, AnalogConfig]] = {"off": (DESCRIPTIONS["off"], off)}

    def io_part(name: str, level: str, **fields: Any) -> None:
        out[name] = (f"{DESCRIPTIONS[name]} ({level})", off.replace(io=dataclasses.replace(off_io, **fields)))

    if io.inp_res > 0:
        io_part("dac", f"inp_res {io.inp_res:g}", inp_res=io.inp_res)
    input_noise = io.inp_noise if io.inp_noise > 0 else io.out_noise
    if input_noise > 0:
        io_part("input_noise", f"inp_noise {input_noise:g} at the DAC" + ("" if io.inp_noise > 0 else ", the out_noise level"),
                inp_noise=input_noise)
    if io.out_noise > 0:
        io_part("output_noise", f"out_noise {io.out_noise:g}", out_noise=io.out_noise)
    if io.out_res > 0 or io.out_bound > 0:
        io_part("adc", f"out_res {io.out_res:g}, out_bound {io.out_bound:g}", out_res=io.out_res,
                out_bound=io.out_bound, bound_management=io.bound_management)
    if config.noise is not None:
        pcm = config.noise
        scales = ("prog_noise_scale", "drift_scale", "read_noise_scale")
        compensated = config.drift_compensation.kind
        # (name, the one PCM scale kept, compensation, level note)
        for name, kept, compensation, note in (
                ("programming", "prog_noise_scale", "none", ""),
                ("drift", "drift_scale", compensated, f", {compensated} compensation"),
                ("read_noise", "read_noise_scale", "none", "")):
            if getattr(pcm, kept) > 0:
                only = dataclasses.replace(pcm, **{scale: 0.0 for scale in scales if scale != kept})
                out[name] = (f"{DESCRIPTIONS[name]} ({kept} {getattr(pcm, kept):g}{note})",
                             off.replace(noise=only, drift_compensation=DriftCompensationConfig(compensation)))
    if io.w_noise > 0:
        io_part("short_term_read", f"w_noise {io.w_noise:g} {io.w_noise_type}", w_noise=io.w_noise,
                w_noise_type=io.w_noise_type)
    if io.ir_drop > 0:
        io_part("ir_drop", f"ir_drop {io.ir_drop:g}", ir_drop=io.ir_drop)
    out["all"] = (DESCRIPTIONS["all"], config)
    return out


def nonideality_sweep(model, config: AnalogConfig, run_dir: str | Path, seeds: tuple[int, ...] = (0, 1, 2),
                      t_inference: float = 3600.0, max_windows: int | None = 8, progress: bool = False
                      ) -> list[dict[str, Any]]:
    """One noise sweep (scale 1, time ``t_inference``) per configuration of ``nonideality_configs(config)``
    on ``model`` (a ``Workload``), in ``run_dir/<name>``; returns one row per nonideality: PPL mean / std,
    and the PPL change against ``off`` on the same chip seeds (relative, 95 % interval, ``paired_change``)."""
    from romer_kernels.evaluation.compare import paired_change  # noqa: PLC0415
    from romer_kernels.evaluation.sweep import noise_sweep  # noqa: PLC0415

    run_dir = Path(run_dir)
    results = {}
    for name, (label, part) in nonideality_configs(config).items():
        settings = SweepSettings(part, seeds=seeds, noise_scales=(1.0,), times=(t_inference,), max_windows=max_windows)
        results[name] = (label, noise_sweep(model, None, settings, run_dir / name, progress=progress))
    rows = [(dataclasses.replace(trial, variant=name), metrics)
            for name, (_, result) in results.items() for trial, metrics in result.rows]
    change = paired_change(rows, baseline="off")
    out = []
    for name, (label, result) in results.items():
        (row,) = result.table()
        cell = change.get((1.0, float(t_inference), name))
        out.append({"name": name, "label": label, "clean_ppl": result.clean.perplexity, "ppl": row["ppl"][0],
                    "ppl_std": row["ppl"][1], "n": row["n"],
                    **({"change": cell[0], "low": cell[1], "high": cell[2]} if cell else {})})
    return out

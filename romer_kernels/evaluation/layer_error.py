"""Error and speed of one analog layer against its digital twin, per configuration."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from romer_kernels.config.presets import resolve_config
from romer_kernels.config.analog import AnalogConfig
from romer_kernels.nn.analog_linear import AnalogLinear


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref||_F / ||y_ref||_F (the metric of aihwkit-anchor.md section 5)."""
    y, y_ref = y.detach().double(), y_ref.detach().double()
    return float((y - y_ref).norm() / y_ref.norm())


@dataclass
class LayerErrorRow:
    name: str
    error_mean: float
    error_std: float
    forward_ms: float
    digital_ms: float
    program_drift_ms: float
    t_inference: float = 3600.0   # the read time used (a device fitted at a few times only is read at the nearest)

    @property
    def slowdown(self) -> float:
        return self.forward_ms / self.digital_ms


def _best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


@torch.no_grad()
def layer_error_table(
    configs: dict[str, AnalogConfig | str],
    in_features: int = 1024,
    out_features: int = 1024,
    batch: int = 64,
    seeds: int = 3,
    t_inference: float = 3600.0,
    repeats: int = 3,
) -> list[LayerErrorRow]:
    """For each config: relative output error over ``seeds`` chips at ``t_inference`` (mean, std),
    best-of-``repeats`` forward time, the digital layer's time in the same run, and program+drift time.
    A device model fitted at a few times only (ReRAM) is read at its fitted time nearest to
    ``t_inference`` (in log time), which the row records."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    x = torch.randn(batch, in_features)
    y_ref = linear(x)
    rows = []
    for name, config in configs.items():
        config = resolve_config(config)
        layer = AnalogLinear.from_linear(linear, config, layer_id=name)
        errors, setup = [], []
        t = t_inference
        fitted = getattr(config.noise, "FITTED_TIMES", None)
        if fitted and t not in fitted:
            t = min(fitted, key=lambda f: abs(math.log(f) - math.log(max(t_inference, 1e-9))))
        for seed in range(seeds):
            start = time.perf_counter()
            layer.program_(seed)
            if config.noise is not None:
                layer.drift_(t)
            setup.append(time.perf_counter() - start)
            errors.append(relative_error(layer(x), y_ref))
        forward_ms = _best_ms(lambda: layer(x), repeats)
        digital_ms = _best_ms(lambda: linear(x), repeats)
        rows.append(LayerErrorRow(name, statistics.fmean(errors), statistics.pstdev(errors), forward_ms,
                                  digital_ms, 1e3 * min(setup), t))
    return rows

"""Regenerate the device statistics tables of docs/device-noise.md (PCM, HERMES, ReRAM side by side).

    .venv/bin/python docs/device_stats_table.py          # rewrites the part of device-noise.md between the markers
    .venv/bin/python docs/device_stats_table.py --print  # prints it instead

For each device model: 50 000 weights per target w in {1, 0.5, 0.1, 0, -0.5} on one whole-matrix tile
(so the conductance scale is g_max / max|w| = g_max, as in aihwkit's own statistics), programmed with
chip seed 2024, then read at the times the model defines; mean and std of the weights per target.
Beside them: aihwkit's published PCM table (``aihwkit-anchor.md`` section 5, aihwkit 1.1.0) and, for
ReRAM, the exact moments of the clipped Gaussians from Wan 2022's polynomials (the model has no drift:
each read is a fresh sample around the targets). ``tests/test_noise_models.py`` asserts all of them.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from doc_sections import regenerate  # this folder's section writer

import torch
from scipy.stats import norm

from romer_kernels.config import TileGrid
from romer_kernels.config.device_noise import (RERAM_WAN2022_COEFF, HermesNoiseConfig, PCMNoiseConfig,
                                               ReRamWan2022NoiseConfig)
from romer_kernels.noise import build_noise_model
from romer_kernels.rng import Purpose, normal_like, stream_seed

DOC = Path(__file__).resolve().parent / "device-noise.md"
START, END = "<!-- device-stats:start -->", "<!-- device-stats:end -->"
TARGETS = (1.0, 0.5, 0.1, 0.0, -0.5)
SAMPLES = 50_000
SEED = 2024
HOUR, DAY = 3600.0, 86400.0
# aihwkit 1.1.0 PCMLikeNoiseModel, 50 000 samples per target (aihwkit-anchor.md section 5): (mean, std)
AIHWKIT_PCM = {
    1.0: {"prog": (0.9955, 0.0427), 1.0: (0.9935, 0.0589), HOUR: (0.7725, 0.0586), DAY: (0.6622, 0.0623)},
    0.5: {"prog": (0.4957, 0.0385), 1.0: (0.4944, 0.0499), HOUR: (0.3845, 0.0441), DAY: (0.3296, 0.0426)},
    0.1: {"prog": (0.0957, 0.0190), 1.0: (0.0954, 0.0262), HOUR: (0.0705, 0.0222), DAY: (0.0589, 0.0213)},
    0.0: {"prog": (0.0000, 0.0086), 1.0: (0.0000, 0.0103), HOUR: (0.0000, 0.0067), DAY: (0.0000, 0.0054)},
}
MODELS = (  # label, config, read times
    ("PCM (PCMLikeNoiseModel)", PCMNoiseConfig(), (1.0, HOUR, DAY)),
    ("HERMES, 2 devices", HermesNoiseConfig(), (1.0, HOUR, DAY)),
    ("ReRAM (Wan 2022)", ReRamWan2022NoiseConfig(), (1.0, DAY, 2 * DAY)),
)


def _draw(shape, read_index: int = 0):
    def draw(purpose: Purpose, slot: int) -> torch.Tensor:
        counter = slot + (16 * read_index if purpose == Purpose.READ else 0)
        return normal_like(stream_seed(SEED, "device-stats", purpose, counter), shape)
    return draw


def _clipped(mu: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of max(0, mu + sigma * xi)."""
    if sigma == 0:
        return max(mu, 0.0), 0.0
    a = mu / sigma
    mean = mu * norm.cdf(a) + sigma * norm.pdf(a)
    second = (mu * mu + sigma * sigma) * norm.cdf(a) + mu * sigma * norm.pdf(a)
    return mean, max(second - mean * mean, 0.0)


def reram_expected(w: float, t: float, g_max: float, scale_out: float) -> tuple[float, float]:
    """Exact (mean, std) of a ReRAM weight with target ``w`` (|w| <= 1 = the tile's abs-max)."""
    def sigma(g):
        x = g / g_max
        return sum(c * x ** i for i, c in enumerate(RERAM_WAN2022_COEFF[t]))
    on = _clipped(abs(w) * g_max, sigma(abs(w) * g_max))
    off = _clipped(0.0, sigma(0.0))
    return math.copysign(1.0, w) * (on[0] - off[0]) / scale_out if w else 0.0, math.sqrt(on[1] + off[1]) / scale_out


def _stats(weights: torch.Tensor) -> list[tuple[float, float]]:
    w = weights.double()
    return [(float(row.mean()), float(row.std())) for row in w]


def _cell(pair) -> str:
    return f"{pair[0]:+.4f} / {pair[1]:.4f}"


def _time(t: float) -> str:
    return {1.0: "1 s", HOUR: "1 h", DAY: "1 day", 2 * DAY: "2 days"}[t]


def tables() -> str:
    w = torch.tensor(TARGETS, dtype=torch.float32)[:, None].expand(len(TARGETS), SAMPLES).contiguous()
    grid = TileGrid(len(TARGETS), SAMPLES, 0, 0)            # one whole-matrix tile
    out = [f"Mean / std of {SAMPLES:,} weights per target, one whole-matrix tile, chip seed {SEED} "
           "(`python docs/device_stats_table.py`). PCM and HERMES are read without drift compensation.", ""]
    for label, config, times in MODELS:
        model = build_noise_model(config)
        programmed = model.program(w, grid, _draw(w.shape))
        columns = {"programmed": _stats(programmed.weights)}
        for i, t in enumerate(times):
            columns[_time(t)] = _stats(model.read(programmed, t, grid, _draw(w.shape, read_index=i)))
        reference = {}
        if isinstance(config, PCMNoiseConfig):
            for key, name in (("prog", "programmed"), *((t, _time(t)) for t in times)):
                reference[name] = [(math.copysign(AIHWKIT_PCM[abs(v)][key][0], v) if v else 0.0,
                                    AIHWKIT_PCM[abs(v)][key][1]) for v in TARGETS]
            source = "aihwkit 1.1.0 (its published table)"
        elif isinstance(config, ReRamWan2022NoiseConfig):
            scale_out = config.g_max / float(programmed.weights.abs().max())
            reference["programmed"] = [reram_expected(v, 1.0, config.g_max, config.g_max) for v in TARGETS]
            for t in times:
                reference[_time(t)] = [reram_expected(v, t, config.g_max, scale_out) for v in TARGETS]
            source = "exact, from the polynomials"
        out += [f"**{label}**" + (f" (second line of a cell: {source})" if reference else ""), ""]
        out.append("| w | " + " | ".join(columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for i, v in enumerate(TARGETS):
            cells = []
            for name, values in columns.items():
                cell = _cell(values[i])
                if name in reference:
                    cell += f"<br>{_cell(reference[name][i])}"
                cells.append(cell)
            out.append(f"| {v:g} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    return regenerate(DOC, START, END, tables, "the device statistics tables", __doc__.splitlines()[0], argv)

if __name__ == "__main__":
    sys.exit(main())

"""AnalogLinear per preset and backend against nn.Linear, and chip programming + drift, as ratios of one run.

    python -m benchmarks.bench_linear [--quick]

Prints a markdown table (also used in the README). Times are best-of-N wall-clock milliseconds with
torch.set_num_threads(2); ratios are against nn.Linear measured interleaved in the same run.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from benchmarks._timing import best_of
from romer_kernels import AnalogLinear, preset
from romer_kernels.kernels.backends import available_backends, use_backend
from romer_kernels.rng import rng_backend

PRESETS = ["ideal", "aihwkit-default", "rasch2023", "lightning-8bit", "gaussian-chip"]


@torch.no_grad()
def forward_table(shapes, batches, repeats, backends):
    rows = []
    for in_features, out_features in shapes:
        torch.manual_seed(0)
        linear = nn.Linear(in_features, out_features)
        layers = {name: AnalogLinear.from_linear(linear, name).program_() for name in PRESETS}
        for batch in batches:
            x = torch.randn(batch, in_features)
            fns = {"nn.Linear": lambda: linear(x)}
            for name, layer in layers.items():
                for backend in backends:
                    def forward(layer=layer, backend=backend):
                        with use_backend(backend):
                            return layer(x)
                    fns[f"{name} [{backend}]"] = forward
            times = best_of(fns, repeats=repeats)
            rows.append((f"{in_features}x{out_features}", batch, times))
    return rows


def program_drift_ms(size, names, repeats):
    torch.manual_seed(0)
    linear = nn.Linear(size, size)
    out = {}
    for name in names:
        layer = AnalogLinear.from_linear(linear, name)
        program, drift = [], []
        for seed in range(repeats):
            start = time.perf_counter()
            layer.program_(seed)
            program.append(time.perf_counter() - start)
            start = time.perf_counter()
            layer.drift_(3600.0)
            drift.append(time.perf_counter() - start)
        out[name] = (1e3 * min(program), 1e3 * min(drift))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    repeats = 2 if args.quick else 7
    print(f"# AnalogLinear vs nn.Linear ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, rng backend {rng_backend()})\n")
    backends = [b for b in ("cpp", "reference") if b in available_backends("cpu")]
    columns = [f"{name} [{backend}]" for name in PRESETS for backend in backends]
    print("| layer | batch | nn.Linear ms | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for shape, batch, times in forward_table([(1024, 1024), (2048, 1408)], [1, 16, 256], repeats, backends):
        base = times["nn.Linear"]
        cells = " | ".join(f"{times[column] / base:.2f}x" for column in columns)
        print(f"| {shape} | {batch} | {base:.3f} | {cells} |")
    print("\n| 2048x2048 chip | program ms | drift(1 h) ms |")
    print("|---|---|---|")
    noisy = [name for name in PRESETS if preset(name).noise is not None]
    for name, (program, drift) in program_drift_ms(2048, noisy, 2 if args.quick else 3).items():
        print(f"| {name} | {program:.0f} | {drift:.0f} |")


if __name__ == "__main__":
    main()

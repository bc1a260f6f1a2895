"""Chip programming and drift of a 2048x2048 layer: device noise maths on the torch path vs the fused C++
kernels, and the whole ``AnalogMatrix.program`` / ``.drift`` (which add the weight scaling and the
drift-compensation readout).

    python -m benchmarks.bench_program [--quick] [--size N]

Prints markdown tables. Times are best-of-N wall-clock milliseconds with torch.set_num_threads(2); the
torch and C++ variants run interleaved in the same run (benchmarks/_timing.py), so their ratio is
meaningful even on a loaded machine. ``drift`` is ``drift(3600 s)``: re-conversion, drift (exponents drawn
again from the target), read noise. A chip keeps one weight-sized tensor, so drifting an already drifted
chip first programs W_P again ("re-drift"); "program+drift" is the life cycle of one Monte Carlo trial.
"""
from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from benchmarks._timing import best_of
from romer_kernels import preset
from romer_kernels.nn.analog_matrix import AnalogMatrix
from romer_kernels.config.tiling import mapped_target
from romer_kernels.nn.chip import LayerChip
from romer_kernels.noise.base import ProgrammedWeights
from romer_kernels.noise.fused import using_noise_backend
from romer_kernels.rng import rng_backend

PRESETS = ["aihwkit-default", "rasch2023", "gaussian-chip"]
T_INFERENCE = 3600.0


def with_backend(name, fn):
    def run():
        with using_noise_backend(name):
            return fn()
    return run


def noise_model_ms(name: str, weight: torch.Tensor, repeats: int) -> dict[str, float]:
    """The noise model's program / read alone, on the target the chip would give it."""
    config = preset(name)
    out_features, in_features = weight.shape
    chip = LayerChip(config, out_features, in_features, layer_id=0)
    chip.seed = 0
    target, _ = mapped_target(weight, chip.grid, config.mapping)
    model, grid = chip.noise_model, chip.grid
    draw = chip._draw()
    read_draw = chip._draw(drift_index=0)
    with using_noise_backend("torch"):
        programmed = ProgrammedWeights(model.program(target, grid, draw, with_drift_exponents=False).weights)
    fns = {}
    for backend in ("torch", "cpp"):
        fns[f"program {backend}"] = with_backend(
            backend, lambda: model.program(target, grid, draw, with_drift_exponents=False))
        fns[f"read {backend}"] = with_backend(
            backend, lambda: model.read(programmed, T_INFERENCE, grid, read_draw, w_target=target))
    return best_of(fns, repeats=repeats, min_seconds=0.0)


def matrix_ms(name: str, weight: torch.Tensor, repeats: int) -> dict[str, float]:
    """Whole AnalogMatrix.program(seed) and .drift(3600 s), with each noise backend."""
    fns = {}
    for backend in ("torch", "auto"):
        matrix = AnalogMatrix(preset(name), *weight.shape, layer_id=0)
        with using_noise_backend(backend):
            matrix.program(weight, seed=0)
        seeds = iter(range(1, 1 << 30))
        fns[f"program {backend}"] = with_backend(backend, lambda m=matrix: m.program(weight, seed=next(seeds)))
        fns[f"re-drift {backend}"] = with_backend(backend, lambda m=matrix: m.drift(weight, T_INFERENCE))

        def program_and_drift(m=matrix):
            m.program(weight, seed=next(seeds))
            m.drift(weight, T_INFERENCE)

        fns[f"program+drift {backend}"] = with_backend(backend, program_and_drift)
    return best_of(fns, repeats=repeats, min_seconds=0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI smoke run)")
    parser.add_argument("--size", type=int, default=2048, help="layer size N (N x N), default 2048")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    repeats = 2 if args.quick else 5
    torch.manual_seed(0)
    weight = nn.Linear(args.size, args.size).weight.detach().clone()
    print(f"# Chip programming and drift, {args.size}x{args.size} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, rng backend {rng_backend()})\n")
    print("Noise model alone (ms):\n")
    print("| preset | program torch | program C++ | speed-up | read(1 h) torch | read(1 h) C++ | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        t = noise_model_ms(name, weight, repeats)
        print(f"| {name} | {t['program torch']:.1f} | {t['program cpp']:.1f} | "
              f"{t['program torch'] / t['program cpp']:.1f}x | {t['read torch']:.1f} | {t['read cpp']:.1f} | "
              f"{t['read torch'] / t['read cpp']:.1f}x |")
    print("\nWhole AnalogMatrix (ms; noise backend torch vs auto = fused C++):\n")
    print("| preset | program torch | program auto | re-drift(1 h) torch | re-drift(1 h) auto | "
          "program+drift torch | program+drift auto |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        t = matrix_ms(name, weight, repeats)
        print(f"| {name} | {t['program torch']:.1f} | {t['program auto']:.1f} | {t['re-drift torch']:.1f} | "
              f"{t['re-drift auto']:.1f} | {t['program+drift torch']:.1f} | {t['program+drift auto']:.1f} |")


if __name__ == "__main__":
    main()

"""Where each kernel stands against its floor: FLOP, byte and random-number counts per kernel, the time
their unavoidable parts take on this CPU (measured in the same run), and the floor they imply on an H100.

    python -m benchmarks.bench_floor [--quick]

For each analog kernel the floor on this machine is measured, not assumed: the GEMMs the kernel must do
(``torch.bmm`` on the same operand shapes, MKL) plus the normals it must draw (the C++ Philox fill of the
same count). "kernel / floor" is then the overhead of everything else (DAC, ADC, epilogue passes, Python).
The H100 floor is computed: max(FLOP / 67 TFLOP/s fp32, bytes / 3.35 TB/s) + normals * 25 int-ops / 33.5
Tops/s (int32 CUDA-core rate), for the fp32 IEEE math the kernels use to match the reference.
"""
from __future__ import annotations

import argparse
import platform
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks._timing import best_of
from romer_kernels import AnalogLinear, preset
from romer_kernels.rng import normal

H100_FP32 = 67e12        # dense fp32 FLOP/s (CUDA cores, SXM)
H100_INT32 = 33.5e12     # int32 ops/s (half the fp32 rate)
H100_BW = 3.35e12        # HBM3 bytes/s
OPS_PER_NORMAL = 25      # Philox4x32-10 ~100 int ops per 4 normals, plus Box-Muller on the FP pipes


@dataclass
class Counts:
    flops: float
    bytes: float
    normals: float

    def h100_us(self) -> float:
        return 1e6 * (max(self.flops / H100_FP32, self.bytes / H100_BW) + self.normals * OPS_PER_NORMAL / H100_INT32)


def linear_counts(config, in_features: int, out_features: int, batch: int) -> tuple[Counts, list[tuple]]:
    """Counts of one AnalogLinear forward and the GEMM operand shapes the C++ kernel runs."""
    io = config.io
    tiles = -(-in_features // config.tile.max_input_size) if config.tile.max_input_size else 1
    n_max = -(-in_features // tiles)
    ir = not io.is_perfect and io.ir_drop > 0
    pcm = not io.is_perfect and io.w_noise > 0 and io.w_noise_type == "pcm_read"
    with_w = 1 + ir                  # x' and x' (1 - p^2) against W
    with_abs = ir + pcm              # |x'| and x'^2 against |W|
    flops = 2.0 * batch * in_features * out_features * (with_w + with_abs)
    weight_bytes = 4.0 * in_features * out_features * (1 + (with_abs > 0))
    act_bytes = 4.0 * batch * (in_features + out_features) * (1 if io.is_perfect else tiles)
    kinds = 0 if io.is_perfect else (io.out_noise > 0) + (io.w_noise > 0)
    normals = tiles * batch * out_features * kinds + (0 if io.is_perfect else batch * in_features * (io.inp_noise > 0))
    gemms = [((tiles, with_w * batch, n_max), (tiles, n_max, out_features))]
    if with_abs:
        gemms.append(((tiles, with_abs * batch, n_max), (tiles, n_max, out_features)))
    return Counts(flops, weight_bytes + act_bytes, normals), gemms


@torch.no_grad()
def linear_rows(in_features, out_features, batches, presets, repeats):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_features)
        fns = {"nn.Linear": lambda: linear(x)}
        floors = {}
        for name in presets:
            config = preset(name)
            layer = AnalogLinear.from_linear(linear, config).program_()
            counts, gemms = linear_counts(config, in_features, out_features, batch)
            operands = [(torch.randn(*a), torch.randn(*b)) for a, b in gemms]
            fns[name] = lambda layer=layer: layer(x)
            fns[f"{name}: GEMMs"] = lambda operands=operands: [torch.bmm(a, b) for a, b in operands]
            if counts.normals:
                fns[f"{name}: RNG"] = lambda n=int(counts.normals): normal(1, 0, n)
            floors[name] = counts
        times = best_of(fns, repeats=repeats)
        for name, counts in floors.items():
            floor = times[f"{name}: GEMMs"] + times.get(f"{name}: RNG", 0.0)
            rows.append((f"{in_features}x{out_features}", batch, name, counts, times["nn.Linear"], times[name], floor))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layer, few repeats (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    shape = (256, 128) if args.quick else (2048, 1408)
    presets = ["aihwkit-default", "rasch2023", "gaussian-chip"]
    print(f"# AnalogLinear against its floor ({platform.machine()}, {torch.get_num_threads()} threads)\n")
    print("| layer | batch | preset | GFLOP | MB | normals (M) | nn.Linear ms | analog ms | floor ms "
          "| analog / floor | floor / nn.Linear | H100 floor us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layer, batch, name, counts, clean, analog, floor in linear_rows(*shape, [1, 256], presets,
                                                                        2 if args.quick else 5):
        print(f"| {layer} | {batch} | {name} | {counts.flops / 1e9:.3f} | {counts.bytes / 1e6:.1f} | "
              f"{counts.normals / 1e6:.3f} | {clean:.3f} | {analog:.3f} | {floor:.3f} | {analog / floor:.2f}x | "
              f"{floor / clean:.2f}x | {counts.h100_us():.1f} |")


if __name__ == "__main__":
    main()

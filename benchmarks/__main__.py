"""Run every benchmark: ``python -m benchmarks [--quick]`` (each prints its markdown table)."""
import sys

from benchmarks import bench_floor, bench_linear, bench_moe, bench_program, bench_rng

for bench in (bench_linear, bench_floor, bench_program, bench_moe, bench_rng):
    print(f"\n## {bench.__name__}\n", flush=True)
    bench.main(sys.argv[1:])

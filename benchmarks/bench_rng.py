"""Normals per second: torch Philox reference, C++ extension (1 and 2 threads), torch.randn, in one run.

    python -m benchmarks.bench_rng [--n 4194304] [--repeats 7] [--quick]

Prints a markdown table. Times are best-of-N wall-clock (benchmarks._timing.best_of, callables run
interleaved so machine load affects all rows alike). torch.randn / Tensor.normal_ are MT19937 streams
(not the Philox stream, not reproducible per element) and are listed only as the speed to beat.
"""
from __future__ import annotations

import argparse
import platform

import torch

from benchmarks._timing import best_of
from romer_kernels.rng import philox

SEED = 0x5EED_1234_ABCD


def _with_threads(threads, fn):
    def run():
        torch.set_num_threads(threads)
        return fn()

    return run


def measure(n: int, n_reference: int, repeats: int) -> list[tuple[str, int, float]]:
    """(name, elements per call, best ms) for every generator."""
    try:
        from romer_kernels import _C
    except ImportError:
        _C = None
    buf = torch.empty(n)
    start = 4 * 2**32 + 3  # unaligned, counter high word non-zero: the general path
    fns = {
        "torch.randn (MT19937)": (n, _with_threads(2, lambda: torch.randn(n))),
        "Tensor.normal_ in place (MT19937)": (n, _with_threads(2, lambda: buf.normal_())),
        "Philox torch reference (2 threads)": (n_reference, _with_threads(2, lambda: philox.normal(SEED, start, n_reference))),
    }
    if _C is not None:
        fns["Philox C++ _C.philox_normal, 1 thread"] = (n, _with_threads(1, lambda: _C.philox_normal(SEED, start, n)))
        fns["Philox C++ _C.philox_normal, 2 threads"] = (n, _with_threads(2, lambda: _C.philox_normal(SEED, start, n)))
        fns["Philox C++ _C.philox_uniform, 2 threads"] = (n, _with_threads(2, lambda: _C.philox_uniform(SEED, start, n)))
        fns["Philox C++ _C.philox_randint (int64), 2 threads"] = (n, _with_threads(2, lambda: _C.philox_randint(SEED, start, n)))
    before = torch.get_num_threads()
    try:
        best = best_of({name: fn for name, (_, fn) in fns.items()}, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    return [(name, count, best[name]) for name, (count, _) in fns.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1 << 22, help="elements per call (default 4194304)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (CI smoke run)")
    args = parser.parse_args(argv)
    n, repeats = (1 << 16, 2) if args.quick else (args.n, args.repeats)
    n_reference = min(n, 1 << 18)  # the reference is ~100x slower; rate is per element anyway

    try:
        from romer_kernels import _C

        kernel = getattr(_C, "PHILOX_KERNEL", "?")
    except ImportError:
        kernel = "not built"
    print(f"# RNG throughput ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads available, C++ kernel: {kernel})\n")
    rows = measure(n, n_reference, repeats)
    randn_rate = next(count / ms for name, count, ms in rows if name.startswith("torch.randn"))
    print("| generator | elements/call | best ms | elements/s | vs torch.randn |")
    print("|---|---:|---:|---:|---:|")
    for name, count, ms in rows:
        rate = count / ms
        print(f"| {name} | {count} | {ms:.3f} | {1e3 * rate:.3g} | {rate / randn_rate:.2f}x |")


if __name__ == "__main__":
    main()

"""The ``romer`` command line."""
from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from romer_kernels.config.presets import PRESETS, preset
from romer_kernels.evaluation.layer_error import layer_error_table


def _demo(args: argparse.Namespace) -> int:
    console = Console()
    names = args.presets or list(PRESETS)
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        console.print(f"[red]unknown preset(s): {', '.join(unknown)}; known: {', '.join(PRESETS)}")
        return 2
    console.print(f"Analog layer {args.in_features}->{args.out_features}, batch {args.batch}, "
                  f"{args.seeds} chip seeds, t = {args.t:g} s after programming")
    with console.status("simulating"):
        rows = layer_error_table({name: name for name in names}, args.in_features, args.out_features,
                                 args.batch, args.seeds, args.t)
    table = Table(title="Output error and cost of an AnalogLinear per preset")
    for column in ("preset", "rel. error (mean ± std)", "forward ms", "nn.Linear ms", "slowdown", "program+drift ms"):
        table.add_column(column, justify="right" if column != "preset" else "left")
    for row in rows:
        table.add_row(row.name, f"{row.error_mean:.4f} ± {row.error_std:.4f}", f"{row.forward_ms:.2f}",
                      f"{row.digital_ms:.2f}", f"{row.slowdown:.1f}x", f"{row.program_drift_ms:.1f}")
    console.print(table)
    return 0


def _presets(args: argparse.Namespace) -> int:
    if args.name:
        try:
            print(preset(args.name).to_json(indent=2))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    for name, factory in PRESETS.items():
        print(f"{name:16s} {(factory.__doc__ or '').strip().splitlines()[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="romer", description="Analog in-memory-computing simulation for MoE LLMs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="error and speed of an analog layer under each preset")
    demo.add_argument("--in-features", type=int, default=1024)
    demo.add_argument("--out-features", type=int, default=1024)
    demo.add_argument("--batch", type=int, default=64)
    demo.add_argument("--seeds", type=int, default=3)
    demo.add_argument("--t", type=float, default=3600.0, help="seconds after programming")
    demo.add_argument("--presets", nargs="*", help="subset of presets (default: all)")
    demo.set_defaults(func=_demo)
    presets = commands.add_parser("presets", help="list presets, or print one as JSON")
    presets.add_argument("name", nargs="?")
    presets.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

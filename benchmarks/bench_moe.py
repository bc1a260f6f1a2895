"""An OLMoE-shaped MoE experts block: analog (per preset and backend) against the clean transformers block.

    python -m benchmarks.bench_moe [--quick] [--experts 64 --top-k 8 --hidden 2048 --intermediate 1024 --tokens 512]

The clean baselines are transformers' own ``OlmoeExperts`` with ``experts_implementation`` ``grouped_mm``
(the fastest on CPU) and ``eager``; the analog block is ``AnalogExperts`` wrapping the same parameters.
Times are best-of-N wall-clock ms with torch.set_num_threads(2), measured interleaved in one run; ratios
are against grouped_mm. Routing is a random top-k with softmax weights (fixed seed), as a router would
give for an untrained model.
"""
from __future__ import annotations

import argparse
import platform

import torch

from benchmarks._timing import best_of
from romer_kernels.kernels.backends import use_backend
from romer_kernels.nn.analog_experts import AnalogExperts


def olmoe_experts(experts: int, hidden: int, intermediate: int, implementation: str):
    from transformers import OlmoeConfig  # noqa: PLC0415
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts  # noqa: PLC0415

    config = OlmoeConfig(hidden_size=hidden, intermediate_size=intermediate, num_experts=experts,
                         num_experts_per_tok=8, experts_implementation=implementation)
    return OlmoeExperts(config)


def routing(tokens: int, experts: int, top_k: int, generator: torch.Generator):
    logits = torch.randn(tokens, experts, generator=generator)
    weights, index = torch.topk(logits.softmax(dim=-1), top_k, dim=-1)
    return index, weights / weights.sum(dim=-1, keepdim=True)


@torch.no_grad()
def run(args) -> dict[str, tuple[float, float]]:
    generator = torch.Generator().manual_seed(0)
    grouped = olmoe_experts(args.experts, args.hidden, args.intermediate, "grouped_mm")
    eager = olmoe_experts(args.experts, args.hidden, args.intermediate, "eager")
    grouped.gate_up_proj.normal_(0.0, 0.02, generator=generator)
    grouped.down_proj.normal_(0.0, 0.02, generator=generator)
    eager.gate_up_proj, eager.down_proj = grouped.gate_up_proj, grouped.down_proj
    x = torch.randn(args.tokens, args.hidden, generator=generator)
    index, weights = routing(args.tokens, args.experts, args.top_k, generator)
    clean = {"clean grouped_mm": lambda: grouped(x, index, weights), "clean eager": lambda: eager(x, index, weights)}
    rows = {}
    # One preset at a time (a programmed OLMoE-sized PCM block holds ~8 GB of chip state), each timed
    # interleaved with the clean blocks; the ratio is against grouped_mm of the same round.
    for name in args.presets:
        analog = AnalogExperts.from_experts(grouped, name, name="bench.experts", seed=1).program_()
        fns = dict(clean)
        for backend in args.backends:
            def forward(analog=analog, backend=backend):
                with use_backend(backend):
                    return analog(x, index, weights)
            fns[f"{name} [{backend}]"] = forward
        times = best_of(fns, repeats=args.repeats, min_seconds=0.0)
        for key, ms in times.items():
            if key.startswith("clean"):
                rows.setdefault(key, []).append(ms)
            else:
                rows[key] = (ms, ms / times["clean grouped_mm"])
        del analog
    base = min(rows["clean grouped_mm"])
    for key in clean:
        rows[key] = (min(rows[key]), min(rows[key]) / base)
    return dict(sorted(rows.items(), key=lambda item: not item[0].startswith("clean")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--presets", nargs="+", default=["aihwkit-default", "rasch2023", "gaussian-chip"])
    parser.add_argument("--backends", nargs="+", default=["cpp"])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts, args.hidden, args.intermediate, args.tokens = 8, 256, 128, 64
    args.repeats = 2 if args.quick else 5
    torch.set_num_threads(2)
    print(f"# MoE experts block: {args.experts} experts, top-{args.top_k}, hidden {args.hidden}, intermediate "
          f"{args.intermediate}, {args.tokens} tokens ({platform.machine()}, {torch.get_num_threads()} threads)\n")
    rows = run(args)
    print("| block | ms | vs grouped_mm |")
    print("|---|---|---|")
    for name, (ms, ratio) in rows.items():
        print(f"| {name} | {ms:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

"""Regenerate the estimated-memory tables of docs/scale.md from romer_kernels.evaluation.memory.

    .venv/bin/python docs/scale_table.py          # rewrites the part of docs/scale.md between the markers
    .venv/bin/python docs/scale_table.py --print  # prints it instead

Meta device only (no weights): runs in a few seconds on any machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

from doc_sections import regenerate  # this folder's section writer

from romer_kernels.evaluation.memory import estimate_memory, format_bytes

DOC = Path(__file__).resolve().parent / "scale.md"
START, END = "<!-- scale-table:start -->", "<!-- scale-table:end -->"
MODELS = {
    "olmoe-1b-7b": "OLMoE-1B-7B",
    "qwen1.5-moe-a2.7b": "Qwen1.5-MoE-A2.7B",
    "deepseek-v2-lite": "DeepSeek-V2-Lite (for DeepSeek-MoE-16B)",
    "mixtral-8x7b": "Mixtral-8x7B",
}
PRESETS = ("rasch2023", "aihwkit-default")
CPU_MEMORY = "24 GiB"                 # this development machine
GPU_MEMORIES = ("80 GB", "141 GB")      # H100 80 GB, H200 141 GB (taken as 1e9-byte GB: a conservative bound)
# (device, weight dtype, state dtype, keep_digital)
SETTINGS = [
    ("cpu", "float32", "float32", True),
    ("cpu", "float32", "bfloat16", True),
    ("cpu", "bfloat16", "float32", True),
    ("cpu", "bfloat16", "bfloat16", True),
    ("cpu", "bfloat16", "bfloat16", False),
    ("cuda", "float32", "float32", True),
    ("cuda", "bfloat16", "float32", True),
]
TOKENS = 2048


def _fits(estimate, memories) -> str:
    return ", ".join(f"{size}: {'yes' if estimate.fits(size) else 'no'}" for size in memories)


def summary() -> list[str]:
    """One line per model: the smallest CPU setting that keeps the digital weights, and the GPU (Triton) path."""
    lines = ["| model | parameters | analog | CPU, bf16 weights + bf16 state | fits 24 GiB | GPU (on-the-fly chips), bf16 weights "
             "| fits 80 GB | fits 141 GB |", "|---|---|---|---|---|---|---|---|"]
    for key, title in MODELS.items():
        cpu = estimate_memory(key, PRESETS[0], weight_dtype="bfloat16", state_dtype="bfloat16", device="cpu",
                              tokens=TOKENS)
        gpu = estimate_memory(key, PRESETS[0], weight_dtype="bfloat16", device="cuda", tokens=TOKENS)
        yes = {True: "yes", False: "no"}
        lines.append(f"| {title} | {cpu.parameters / 1e9:.2f} B | {cpu.analog_parameters / 1e9:.2f} B "
                     f"| {format_bytes(cpu.total_bytes)} | {yes[cpu.fits(CPU_MEMORY)]} | {format_bytes(gpu.total_bytes)} "
                     f"| {yes[gpu.fits(GPU_MEMORIES[0])]} | {yes[gpu.fits(GPU_MEMORIES[1])]} |")
    return lines + [""]


def tables() -> str:
    lines = ["### Summary (preset rasch2023, 2048 tokens)", "", *summary()]
    header = ("| device | weights | state dtype | digital weights | chip state | activations | total (rasch2023) "
              "| total (aihwkit-default) | fits (rasch2023) |")
    for key, title in MODELS.items():
        first = estimate_memory(key, PRESETS[0], weight_dtype="float32")
        lines += [f"### {title}", "",
                  f"{first.parameters / 1e9:.2f} B parameters, {first.analog_parameters / 1e9:.2f} B analog "
                  f"(everything but lm_head and the embeddings/norms).", "",
                  header, "|" + "---|" * (header.count("|") - 1)]
        for device, weights, state, keep_digital in SETTINGS:
            estimates = {p: estimate_memory(key, p, weight_dtype=weights, state_dtype=state, device=device,
                                            keep_digital=keep_digital, tokens=TOKENS) for p in PRESETS}
            main = estimates[PRESETS[0]]
            memories = (CPU_MEMORY,) if device == "cpu" else GPU_MEMORIES
            weights_label = weights if keep_digital else f"{weights}, analog ones dropped"
            state_label = state if device == "cpu" else "none (on the fly)"
            lines.append(f"| {device} | {weights_label} | {state_label} | {format_bytes(main.digital_bytes)} "
                         f"| {format_bytes(main.chip_bytes)} | {format_bytes(main.activation_bytes)} "
                         f"| {format_bytes(main.total_bytes)} | {format_bytes(estimates[PRESETS[1]].total_bytes)} "
                         f"| {_fits(main, memories)} |")
        lines.append("")
    example = estimate_memory("olmoe-1b-7b", "rasch2023", weight_dtype="bfloat16", state_dtype="bfloat16",
                              device="cpu", tokens=TOKENS)
    lines += ["### Per component: OLMoE-1B-7B, bfloat16 weights and state, CPU", "",
              "`romer info --memory --model olmoe-1b-7b --dtype bfloat16 --state-dtype bfloat16 --fit '24 GiB'`:", "",
              "```", example.table(), example.fit_line(CPU_MEMORY), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return regenerate(DOC, START, END, lambda: tables() + "\n", "the tables", __doc__.splitlines()[0], argv)

if __name__ == "__main__":
    sys.exit(main())

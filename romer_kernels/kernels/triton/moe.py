"""Grouped top-k MoE expert dispatch on the analog Triton kernel (vLLM ``fused_moe`` layout).

The (token, k) pairs are flattened (pair ``p = token * top_k + j``), sorted by expert, and each
expert's list is padded to a multiple of ``BLOCK_M`` with the sentinel ``P = tokens * top_k``
(``sorted_ids``); ``expert_ids[b]`` is the expert of M-block ``b``. GEMM1 (gate_up) gathers the input
rows ``p // top_k`` inside the kernel and writes one row per pair; ``act(gate) * up`` runs in torch;
GEMM2 (down) reads the pair rows and multiplies the routing weight in its epilogue; the k rows of each
token are then summed. Each expert has its own tiles, digital scales and per-MVM Philox keys; the
noise row id is the TOKEN index in the call, as in ``AnalogExperts``. Pairs routed to an expert id < 0
are dropped.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from romer_kernels.config.analog import IOConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels.reference import stacked_expert_tiles
from romer_kernels.kernels.triton._kernel import Blocks, Program, run
from romer_kernels.kernels.triton.mvm import check_grid, stream_seed_table


def align_block_size(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [S], expert_ids int32 [S // block_m]) of vLLM's ``moe_align_block_size``.

    ``sorted_ids`` lists the pairs of expert 0, then of expert 1, ... (in pair order), each list padded
    to a multiple of ``block_m`` with ``P = top_k_index.numel()``; experts without pairs get no block.
    """
    flat = top_k_index.reshape(-1).to(torch.int64)
    n_pairs = flat.numel()
    device = flat.device
    if n_pairs and int(flat.max()) >= num_experts:
        raise ValueError(f"top_k_index holds expert ids >= {num_experts}")
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    n_valid = int(counts.sum())
    pad_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    pairs = order[:n_valid]
    experts = key[pairs]
    slots = pad_start[experts] + (torch.arange(n_valid, device=device) - start[experts])
    sorted_ids = torch.full((int(padded.sum()),), n_pairs, dtype=torch.int32, device=device)
    sorted_ids[slots] = pairs.to(torch.int32)
    expert_ids = torch.repeat_interleave(torch.arange(num_experts, device=device, dtype=torch.int32),
                                         padded // block_m)
    return sorted_ids, expert_ids


def _seed_fn(table: torch.Tensor | None, device) -> Callable[[int], torch.Tensor] | None:
    if table is None:
        return None
    table = table.to(device=device, dtype=torch.int64)

    def seeds(bm_round: int) -> torch.Tensor:
        if bm_round >= table.shape[2]:
            raise ValueError(f"the seed table has {table.shape[2]} bound-management rounds, round {bm_round} "
                             "needs more (build it with stream_seed_table(..., io))")
        return table[:, :, bm_round].contiguous()
    return seeds


def moe_experts_triton(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down: torch.Tensor,
    down_scale: torch.Tensor,
    grid_gate_up: TileGrid,
    grid_down: TileGrid,
    io: IOConfig,
    seeds_gate_up: torch.Tensor | None,
    seeds_down: torch.Tensor | None,
    act: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu,
    *,
    blocks: Blocks | None = None,
    program_gate_up: Program | None = None,
    program_down: Program | None = None,
) -> torch.Tensor:
    """Routed analog experts: ``hidden`` [M, H], ``top_k_index``/``top_k_weights`` [M, k] -> [M, H] float32.

    ``gate_up`` [E, T1, 2I, n1max] / ``gate_up_scale`` [E, T1, 2I]: each expert's gate_up tile weights
    (``reference.split_weight`` of ``chip.state``, gate rows first) and digital scales (``chip.out_scale``) on ``grid_gate_up``
    (2I x H); ``down`` [E, T2, H, n2max] / ``down_scale`` [E, T2, H] on ``grid_down`` (H x I).
    ``seeds_gate_up`` / ``seeds_down``: int64 [E, 3, R] Philox keys of (INP_NOISE, W_NOISE, OUT_NOISE)
    per bound-management round r < R of each expert's chip for this call (:func:`stream_seed_table`
    of ``[chip.mvm_stream(call_index) for each expert]``), or None (no per-MVM noise). ``act`` is applied
    to the gate half. Expert ids < 0 drop the assignment. Per expert and pair this equals
    ``AnalogExperts.expert_forward`` (reference ``analog_linear`` with row ids = token index); the
    k contributions of a token are summed in k order (the reference adds them in expert order).

    ``program_gate_up`` / ``program_down``: on-the-fly chips (stacked plans, :func:`stacked_plan`); the
    kernel then generates every expert's tile weights from the digital weights and ``gate_up`` / ``down``
    are not read (pass None).
    """
    blocks = blocks or Blocks()
    device = hidden.device
    x = hidden.detach().to(torch.float32).contiguous()
    if x.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape \
            or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"expected hidden [M, H] and top_k_index/top_k_weights [M, k], got {tuple(x.shape)}, "
                         f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    n_tokens, top_k = top_k_index.shape
    inter = grid_gate_up.out_features // 2
    placeholder = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=device)
    if program_gate_up is not None:
        gate_up = placeholder.expand(gate_up_scale.shape[0], *placeholder.shape[1:])
    else:
        check_grid(gate_up, gate_up_scale, grid_gate_up, x.shape[1])
    if program_down is not None:
        down = placeholder.expand(down_scale.shape[0], *placeholder.shape[1:])
    else:
        check_grid(down, down_scale, grid_down, inter)
    n_experts = gate_up_scale.shape[0]
    if grid_down.out_features != x.shape[1] or down_scale.shape[0] != n_experts:
        raise ValueError("down weights do not fit the hidden size or the number of experts")
    n_pairs = n_tokens * top_k
    if n_pairs == 0:
        return torch.zeros(n_tokens, x.shape[1], dtype=torch.float32, device=device)
    sorted_ids, expert_ids = align_block_size(top_k_index.to(device), n_experts, blocks.m)
    tokens = torch.arange(n_tokens, device=device, dtype=torch.int64)
    f32 = torch.float32
    common = dict(n_out_rows=n_pairs, sorted_ids=sorted_ids, expert_ids=expert_ids, rid_div=top_k, blocks=blocks)
    h = run(x, gate_up.detach().to(device=device, dtype=f32).contiguous(),
            gate_up_scale.detach().to(device=device, dtype=f32).contiguous(), grid_gate_up, io,
            _seed_fn(seeds_gate_up, device), tokens, x_div=top_k, program=program_gate_up, **common)  # [P, 2I]
    h = (act(h[:, :inter]) * h[:, inter:]).contiguous()                                # [P, I]
    weights = top_k_weights.detach().to(device=device, dtype=f32).reshape(-1).contiguous()
    y = run(h, down.detach().to(device=device, dtype=f32).contiguous(),
            down_scale.detach().to(device=device, dtype=f32).contiguous(), grid_down, io,
            _seed_fn(seeds_down, device), tokens, x_div=1, routing_weights=weights, program=program_down,
            **common)  # [P, H]
    return y.view(n_tokens, top_k, -1).sum(dim=1)


def analog_experts_arguments(experts, call_index: int) -> dict:
    """The keyword arguments of :func:`moe_experts_triton` for an ``AnalogExperts`` module at forward
    ``call_index`` (programs the chips if needed). Raises NotImplementedError for digital experts or
    extra expert slots, which the fused kernel does not handle."""
    if experts.digital_experts or experts.extra_experts is not None:
        raise NotImplementedError("moe_experts_triton needs every expert on analog tiles (no digital_experts, "
                                  "no extra_experts)")
    for e in range(experts.num_experts):
        experts.gate_up[e].ensure_programmed(experts.gate_up_proj[e])
        experts.down[e].ensure_programmed(experts.down_proj[e])
    io = experts.config.io
    gate_up, down = experts.gate_up, experts.down
    noisy = gate_up[0].mvm_noise
    return dict(
        **stacked_expert_tiles([m.chip for m in gate_up], [m.chip for m in down], torch.device("cpu")),
        grid_gate_up=gate_up[0].chip.grid, grid_down=down[0].chip.grid, io=io,
        seeds_gate_up=stream_seed_table([m.chip.mvm_stream(call_index) for m in gate_up], io) if noisy else None,
        seeds_down=stream_seed_table([m.chip.mvm_stream(call_index) for m in down], io) if noisy else None,
        act=experts.act_fn,
    )


def stacked_plan(plans: list[Program], weights: torch.Tensor) -> Program:
    """One grouped-experts plan from the per-expert plans of on-the-fly chips in the same life-cycle state
    (same config, time and drift call) and their digital weights ``weights`` [E, out, in] (read in place,
    in their own dtype, when contiguous)."""
    base = plans[0]
    if any(p.mode != base.mode or p.read != base.read or p.drifts != base.drifts for p in plans):
        raise ValueError("the experts' chips are not in the same state (program / drift them together)")
    device = weights.device

    def stack(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in plans]
        return None if values[0] is None else torch.stack([v.to(device) for v in values]).contiguous()

    return dataclasses.replace(
        base, weight=weights.detach().contiguous(), pa=stack("pa"), map_scale=stack("map_scale"),
        read_scale=stack("read_scale") if base.read else None, read_seeds=stack("read_seeds") if base.read else None,
        seed_table=torch.tensor([[p.seed0, p.seed1] for p in plans], dtype=torch.int64, device=device))

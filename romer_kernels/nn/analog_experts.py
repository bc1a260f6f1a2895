"""``AnalogExperts``: the fused routed experts of an MoE layer, each expert on its own crossbar tiles.

Drop-in for the transformers 5 experts modules (``gate_up_proj [E, 2I, H]`` with gate rows first, then up
rows; ``down_proj [E, H, I]``; ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``).
The digital parameters keep their names, so checkpoints keep their keys. Each expert e has two analog
matrices, ``gate_up[e]`` and ``down[e]``, with layer ids ``"<name>.<e>.gate_up_proj"`` and
``"<name>.<e>.down_proj"``: independent programming noise per expert, and per-MVM noise keyed by the
token's position in the call (``row_ids``) and one forward counter for the whole layer, so a token's
noise in an expert does not depend on which other tokens were routed there.

Experts listed in ``digital_experts`` are computed digitally (heterogeneous placement).

``dispatch`` (default ``None``) is an optional hook for methods that re-route tokens inside the layer
(expert replicas, replaced experts): a callable ``(top_k_index [T, k], top_k_weights [T, k]) ->
(index [T, k'], weights [T, k'])`` applied at the start of ``forward``; in its result an index of -1 means
"no expert" (the assignment is dropped). It is not saved by ``get_extra_state``.

``extra_experts`` (default ``None``) is an optional hook for additional expert slots (replicas on their
own tiles): an object with ``num_experts``, ``forward(j, x, token_ids, call_index)`` (slot ``E + j``) and
``matrices()`` (``(AnalogMatrix, weight)`` pairs, which then take part in programming, drift and tile
counts). Ids ``E .. E + num_experts - 1`` are valid in a dispatched index. Not saved either.

``slot_weights`` (default empty) maps an expert slot to the digital ``(gate_up [2I, H], down [H, I])`` it
computes with instead of its own rows of the fused parameters: how methods change an expert without
writing the model's weights (ROMER's replacement points a cold slot at its donor's rows, no copy;
Replicate-and-Quantize gives a slot its quantized weights). The slot's chip is programmed from them (its
own layer id: its own noise), and ``clear_slot_weights`` undoes every change without a copy of the
model's weights having been made. Not saved either.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from romer_kernels.config.analog import AnalogConfig
from romer_kernels.config.presets import resolve_config
from romer_kernels.kernels.backends import resolve_backend
from romer_kernels.kernels.reference import stacked_expert_tiles
from romer_kernels.nn.analog_matrix import AnalogMatrix, check_seed
from romer_kernels.nn.chip import OnTheFlyChip
from romer_kernels.nn.base import AnalogModule, meta_parameter


# The C++ expert loop runs experts side by side (one thread each) when they average fewer (token, k)
# assignments than this; with more, the threads work inside each expert's GEMMs instead.
PARALLEL_EXPERTS_BELOW = 96


def _is_silu(act_fn: nn.Module) -> bool:
    """The activations the C++ expert loop computes itself (ATen's silu): nn.SiLU and transformers' SiLU."""
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _check_fused_experts(experts: nn.Module) -> None:
    name = type(experts).__name__
    for attr in ("gate_up_proj", "down_proj", "act_fn"):
        if not hasattr(experts, attr):
            raise TypeError(f"{name} is not a fused experts module: it has no {attr!r}")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise NotImplementedError(f"{name}: experts with biases are not supported yet")
    if getattr(experts, "is_transposed", False):
        raise NotImplementedError(f"{name}: transposed expert weights are not supported yet")
    if getattr(experts, "has_gate", True) is False or getattr(experts, "is_concatenated", True) is False:
        raise NotImplementedError(f"{name}: only concatenated gate/up experts are supported")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != down.shape[0]:
        raise TypeError(f"{name}: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
                        f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
    if gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]:
        raise TypeError(f"{name}: gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} disagree")


class AnalogExperts(AnalogModule):
    """Routed experts whose matrices are programmed on simulated crossbars, one set of tiles per expert."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn: nn.Module,
                 config: AnalogConfig | str | None = None, *, name: str = "experts", seed: int = 0,
                 mvm_noise: bool = True, digital_experts: Iterable[int] = ()) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self.num_experts, two_inter, self.hidden_dim = gate_up_proj.shape
        self.intermediate_dim = two_inter // 2
        self.name = name
        config = resolve_config(config)
        check_seed(seed)
        self.digital_experts = frozenset(int(e) for e in digital_experts)
        bad = sorted(e for e in self.digital_experts if not 0 <= e < self.num_experts)
        if bad:
            raise ValueError(f"digital_experts {bad} out of range for {self.num_experts} experts")
        self.gate_up = [AnalogMatrix(config, two_inter, self.hidden_dim, f"{name}.{e}.gate_up_proj", seed, mvm_noise)
                        for e in range(self.num_experts)]
        self.down = [AnalogMatrix(config, self.hidden_dim, self.intermediate_dim, f"{name}.{e}.down_proj", seed,
                                  mvm_noise) for e in range(self.num_experts)]
        self.forward_calls = 0
        self.dispatch = None
        self.extra_experts = None
        self.slot_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.backend: str | None = None  # MVM backend; None = the process default (see kernels.backends)
        self._stacked: tuple | None = None  # (chip versions, device, split tiles on the device) for Triton

    @classmethod
    def from_experts(cls, experts: nn.Module, config: AnalogConfig | str | None = None, *, name: str = "experts",
                     seed: int = 0, mvm_noise: bool = True, digital_experts: Iterable[int] = ()) -> "AnalogExperts":
        """Wrap a transformers fused experts module; its parameters are shared, not copied."""
        _check_fused_experts(experts)
        return cls(experts.gate_up_proj, experts.down_proj, experts.act_fn, config, name=name, seed=seed,
                   mvm_noise=mvm_noise, digital_experts=digital_experts)

    # -- digital weights of each slot ----------------------------------------------------------------
    def expert_params(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The digital (gate_up [2I, H], down [H, I]) slot ``expert`` computes with: its ``slot_weights``
        entry, else its rows of the fused parameters (views, not copies)."""
        override = self.slot_weights.get(expert)
        if override is not None:
            return override
        return self.gate_up_proj[expert], self.down_proj[expert]

    def set_slot_weights(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Let slot ``expert`` compute with ``gate_up`` / ``down`` (kept by reference); its chip is
        programmed from them at its next use."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.name}: expert slot {expert} out of range for {self.num_experts} experts")
        shapes = (tuple(self.gate_up_proj.shape[1:]), tuple(self.down_proj.shape[1:]))
        if (tuple(gate_up.shape), tuple(down.shape)) != shapes:
            raise ValueError(f"{self.name}: slot weights must have shapes {shapes[0]} and {shapes[1]}, got "
                             f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
        self.slot_weights[int(expert)] = (gate_up, down)

    def clear_slot_weights(self) -> None:
        """Every slot computes with its own rows of the fused parameters again."""
        self.slot_weights = {}

    # -- chips ----------------------------------------------------------------------------------
    def _matrices(self):
        for e in range(self.num_experts):
            if e not in self.digital_experts:
                gate_up, down = self.expert_params(e)
                yield self.gate_up[e], gate_up
                yield self.down[e], down
        if self.extra_experts is not None:
            yield from self.extra_experts.matrices()

    @property
    def config(self) -> AnalogConfig:
        return self.gate_up[0].config

    def _ensure_programmed(self) -> None:
        """Program (or restore) every analog chip whose weight changed, before a fused all-experts pass."""
        for matrix, weight in self._matrices():
            matrix.ensure_programmed(weight)

    def program_(self, seed: int | None = None) -> "AnalogExperts":
        for matrix, weight in self._matrices():
            matrix.program(weight, seed)
        return self

    def drift_(self, t_inference: float, drift_index: int | None = None) -> "AnalogExperts":
        for matrix, weight in self._matrices():
            matrix.drift(weight, t_inference, drift_index)
        return self

    def reset_noise_counter(self) -> None:
        self.forward_calls = 0

    def drop_digital_(self) -> "AnalogExperts":
        """Free the fused digital weights (every expert's chip is programmed first if nobody did)."""
        if self.digital_experts or self.extra_experts is not None or self.slot_weights:
            raise NotImplementedError(f"{self.name}: digital experts (or expert replicas, or slot weights) compute "
                                      "from the fused digital weights, which therefore cannot be dropped")
        for matrix, weight in self._matrices():
            matrix.ensure_programmed(weight)
        for matrix, _ in self._matrices():
            matrix.mark_digital_dropped()
        self.gate_up_proj = meta_parameter(self.gate_up_proj)
        self.down_proj = meta_parameter(self.down_proj)
        self.__dict__.pop("_digital_module", None)  # it holds the weights being freed
        return self

    def set_mvm_noise(self, enabled: bool) -> None:
        extra = [m for m, _ in self.extra_experts.matrices()] if self.extra_experts is not None else []
        for matrix in self.gate_up + self.down + extra:
            matrix.mvm_noise = bool(enabled)

    @property
    def num_tiles(self) -> int:
        return sum(matrix.num_tiles for matrix, _ in self._matrices())

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) as realised by the chip (digital units), or the digital weights."""
        gate_up, down = self.expert_params(expert)
        if expert in self.digital_experts:
            return gate_up.detach(), down.detach()
        return self.gate_up[expert].effective_weight(gate_up), self.down[expert].effective_weight(down)

    # -- forward --------------------------------------------------------------------------------
    def expert_forward(self, expert: int, x: torch.Tensor, token_ids: torch.Tensor, call_index: int,
                       backend: str | None = None) -> torch.Tensor:
        """One expert's MLP on its tokens ``x [n, H]`` (``token_ids``: their rows in this call), float32."""
        gate_up_weight, down_weight = self.expert_params(expert)
        if expert in self.digital_experts:
            hidden = nn.functional.linear(x.float(), gate_up_weight.float())
        else:
            hidden = self.gate_up[expert].matmul(x, gate_up_weight, row_ids=token_ids, call_index=call_index,
                                                 backend=backend or self.backend)
        gate, up = hidden.chunk(2, dim=-1)
        hidden = self.act_fn(gate) * up
        if expert in self.digital_experts:
            return nn.functional.linear(hidden, down_weight.float())
        return self.down[expert].matmul(hidden, down_weight, row_ids=token_ids, call_index=call_index,
                                        backend=backend or self.backend)

    def _forward_cpp(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     call_index: int) -> torch.Tensor:
        """The whole expert loop in C++ (csrc/kernels/analog_experts.cpp): same results as the Python loop."""
        from romer_kernels.kernels import cpp  # noqa: PLC0415


        def entries(matrices):
            return [(m.chip.state, None, m.chip.out_scale, m.chip.mvm_stream(call_index).key if m.mvm_noise else None)
                    for m in matrices]

        gate_up, down = entries(self.gate_up), entries(self.down)
        grid_gate_up, grid_down = self.gate_up[0].chip.grid, self.down[0].chip.grid
        out = cpp.extension().analog_experts(
            hidden_states.detach().to(device="cpu", dtype=torch.float32).contiguous(), top_k_index.cpu(),
            top_k_weights.detach().to(device="cpu", dtype=torch.float32), gate_up, down, grid_gate_up.in_sizes,
            grid_gate_up.out_sizes, grid_down.in_sizes, grid_down.out_sizes, cpp.mvm_io(self.config.io), call_index,
            PARALLEL_EXPERTS_BELOW)
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    def _forward_triton(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        call_index: int) -> torch.Tensor:
        """All experts in two grouped Triton launches (vLLM-style dispatch, analog epilogues)."""
        from romer_kernels.kernels.triton import moe_experts_triton, stream_seed_table  # noqa: PLC0415

        device = hidden_states.device
        versions = [id(m.chip) for m in self.gate_up + self.down] + [m.chip.version for m in self.gate_up + self.down]
        cached = self._stacked
        if cached is None or cached[1] != device or cached[0] != versions:
            self._stacked = None
            if isinstance(self.gate_up[0].chip, OnTheFlyChip):
                # on-the-fly chips: the kernel reads the fused digital weights in place and generates every
                # expert's tiles; only the per-column vectors are stacked
                from romer_kernels.kernels.triton.moe import stacked_plan  # noqa: PLC0415

                stacked = dict(
                    gate_up=None, down=None,
                    gate_up_scale=torch.stack([m.chip.out_scale for m in self.gate_up]).to(device),
                    down_scale=torch.stack([m.chip.out_scale for m in self.down]).to(device),
                    program_gate_up=stacked_plan([m.chip.plan for m in self.gate_up], self.gate_up_proj.to(device)),
                    program_down=stacked_plan([m.chip.plan for m in self.down], self.down_proj.to(device)))
            else:
                # stored chips: every expert's tiles in the kernel's split layout, a copy on the accelerator
                # kept until a chip changes
                stacked = stacked_expert_tiles([m.chip for m in self.gate_up], [m.chip for m in self.down], device)
            self._stacked = cached = (versions, device, stacked)
        io = self.config.io
        noisy = self.gate_up[0].mvm_noise
        seeds = {
            "seeds_gate_up": stream_seed_table([m.chip.mvm_stream(call_index) for m in self.gate_up], io).to(device)
            if noisy else None,
            "seeds_down": stream_seed_table([m.chip.mvm_stream(call_index) for m in self.down], io).to(device)
            if noisy else None,
        }
        with torch.no_grad():
            out = moe_experts_triton(hidden_states.detach().float(), top_k_index, top_k_weights.detach().float(),
                                     **cached[2], grid_gate_up=self.gate_up[0].chip.grid,
                                     grid_down=self.down[0].chip.grid, io=io, act=self.act_fn, **seeds)
        return out.to(dtype=hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"AnalogExperts expects hidden_states [tokens, {self.hidden_dim}], got {tuple(hidden_states.shape)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
                             f"must both be [tokens, k] for {hidden_states.shape[0]} tokens")
        if self.dispatch is not None:
            top_k_index, top_k_weights = self.dispatch(top_k_index, top_k_weights)
        call_index = self.forward_calls
        self.forward_calls += 1
        backend = resolve_backend(self.backend, hidden_states.device)
        all_analog = not self.digital_experts and self.extra_experts is None
        self._ensure_programmed()  # before choosing a path: programming decides each chip's kind
        on_the_fly = [isinstance(matrix.chip, OnTheFlyChip) for matrix, _ in self._matrices()]
        # the fused on-the-fly kernel reads the fused parameters, so slots with their own weights take the loop
        fused = all_analog and len(set(on_the_fly)) == 1 and not (on_the_fly[0] and self.slot_weights)
        if (backend == "triton" or all(on_the_fly)) and fused:
            return self._forward_triton(hidden_states, top_k_index, top_k_weights, call_index)
        if backend == "cpp" and all_analog and self.dispatch is None and _is_silu(self.act_fn):
            return self._forward_cpp(hidden_states, top_k_index, top_k_weights, call_index)
        out = torch.zeros(hidden_states.shape, dtype=torch.float32)
        flat_experts = top_k_index.reshape(-1).cpu()
        slots = self.num_experts + (self.extra_experts.num_experts if self.extra_experts is not None else 0)
        if self.dispatch is not None:  # -1 = dropped assignment: sorted last, into a bin that is skipped
            if flat_experts.numel() and int(flat_experts.max()) >= slots:
                raise ValueError(f"dispatch returned expert ids >= {slots}")
            flat_experts = torch.where(flat_experts < 0, slots, flat_experts)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=slots)
        if self.dispatch is not None:
            counts = counts[:slots]
        if counts.numel() > slots:
            raise ValueError(f"top_k_index holds expert ids >= {slots}")
        k = top_k_index.shape[1]
        x_cpu = hidden_states.detach().cpu()
        weights = top_k_weights.detach().reshape(-1).cpu().float()
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows = order[start:start + count]
            start += count
            tokens = rows // k
            if expert < self.num_experts:
                y = self.expert_forward(expert, x_cpu[tokens], tokens, call_index, backend)
            else:
                y = self.extra_experts.forward(expert - self.num_experts, x_cpu[tokens], tokens, call_index)
            out.index_add_(0, tokens, y * weights[rows, None])
        return out.to(device=hidden_states.device, dtype=hidden_states.dtype)

    # -- persistence ----------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "forward_calls": self.forward_calls,
            "digital_experts": sorted(self.digital_experts),
            "gate_up": [m.state(self.expert_params(e)[0]) for e, m in enumerate(self.gate_up)],
            "down": [m.state(self.expert_params(e)[1]) for e, m in enumerate(self.down)],
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.forward_calls = int(state["forward_calls"])
        self.digital_experts = frozenset(state["digital_experts"])
        for matrix, saved in zip(self.gate_up, state["gate_up"]):
            matrix.load_state(saved)
        for matrix, saved in zip(self.down, state["down"]):
            matrix.load_state(saved)

    def extra_repr(self) -> str:
        config = self.config
        noise = "none" if config.noise is None else config.noise.kind
        return (f"name={self.name!r}, num_experts={self.num_experts}, hidden={self.hidden_dim}, "
                f"intermediate={self.intermediate_dim}, digital_experts={sorted(self.digital_experts)}, "
                f"tiles={self.num_tiles}, noise={noise}")

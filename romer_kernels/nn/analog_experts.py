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

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
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
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation" or act_fn is nn.functional.silu


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its weights and what each expert computes between its two MVMs
    (the flags of transformers' experts interface, ``integrations.moe.use_experts_implementation``).

    ``gated``: the first matrix is ``gate_up_proj`` (gate and up rows, split by the gate function),
    else ``up_proj`` followed by ``act_fn``. ``transposed``: weights stored ``[E, in, out]`` (the chip
    holds the ``[out, in]`` transpose, the crossbar is the same). ``bias``: per-expert biases
    ``<first>_bias [E, out]`` and ``down_proj_bias [E, H]``, added digitally after the ADC.
    ``custom_gate``: the module's own ``_apply_gate`` (clamped or soft-capped SwiGLU, interleaved gate
    and up rows) is called on the first MVM's output. ``post_norm``: the module's ``post_expert_norm``
    after the second MVM, called with the expert ids of the rows when ``post_norm_by_expert``.
    ``identity_experts``: zero-compute experts with ids ``E .. E+Z-1`` whose output is their input
    (LongCat-Flash before transformers 5.25), computed digitally (there is no weight)."""

    gated: bool = True
    transposed: bool = False
    bias: bool = False
    custom_gate: bool = False
    post_norm: bool = False
    post_norm_by_expert: bool = False  # post_expert_norm(out, expert_ids): a norm scale per expert (Ergo)
    identity_experts: int = 0
    all_tokens: bool = False  # forward(hidden [E*T, H]): expert e computes block e of T rows (Llama 4)

    @property
    def standard(self) -> bool:
        """The layout the fused C++ and Triton expert kernels compute (gate|up rows, SiLU-type gate)."""
        return self == ExpertsLayout()

    @property
    def first(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"


def experts_layout(experts: nn.Module) -> ExpertsLayout:
    """The layout of a fused experts module (3-D ``gate_up_proj``/``up_proj`` and ``down_proj``), read from
    its interface flags and checked against its parameter shapes; raises TypeError naming the class and
    what does not fit."""
    name = type(experts).__name__
    gated = getattr(experts, "has_gate", None)
    if gated is None:
        gated = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
    first = "gate_up_proj" if gated else "up_proj"
    w_in, w_out = getattr(experts, first, None), getattr(experts, "down_proj", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w_out, torch.Tensor) or w_in.dim() != 3 or w_out.dim() != 3:
        raise TypeError(f"{name} is not a fused experts module: it needs 3-D {first} and down_proj parameters")
    custom_gate = gated and "_apply_gate" in vars(type(experts)) and type(experts)._apply_gate is not _default_gate()
    if isinstance(getattr(experts, "gate_proj", None), torch.Tensor):
        raise TypeError(f"{name}: separate per-expert gate_proj and up_proj weights are not supported (only a fused "
                        "gate_up_proj)")
    if gated and not custom_gate and not callable(getattr(experts, "act_fn", None)):
        raise TypeError(f"{name} is not a fused experts module: it has no 'act_fn' and no own '_apply_gate'")
    if not gated and not callable(getattr(experts, "act_fn", None)):
        raise TypeError(f"{name}: non-gated experts need an 'act_fn'")
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:  # a module without the interface flags: the shapes must say it unambiguously
        transposed = _infer_transposed(name, w_in, w_out, gated)
    experts_real = w_out.shape[0]
    identity = w_in.shape[0] - experts_real if isinstance(getattr(experts, "identity_expert", None), nn.Identity) else 0
    if identity < 0 or (identity == 0 and w_in.shape[0] != experts_real):
        raise TypeError(f"{name}: {first} has {w_in.shape[0]} experts and down_proj {experts_real}")
    in_shape = w_in.shape[1:][::-1] if transposed else w_in.shape[1:]     # [out, in]
    out_shape = w_out.shape[1:][::-1] if transposed else w_out.shape[1:]  # [H, I]
    inter = in_shape[0] // 2 if gated else in_shape[0]
    if (gated and in_shape[0] % 2) or in_shape[1] != out_shape[0] or out_shape[1] != inter:
        raise TypeError(f"{name}: {first} {tuple(w_in.shape)} and down_proj {tuple(w_out.shape)} disagree "
                        f"({'transposed [E, in, out]' if transposed else '[E, out, in]'} layout)")
    bias = bool(getattr(experts, "has_bias", False)) or getattr(experts, f"{first}_bias", None) is not None
    if bias:
        for attr, rows in ((f"{first}_bias", in_shape[0]), ("down_proj_bias", out_shape[0])):
            b = getattr(experts, attr, None)
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != (experts_real + (identity if attr != "down_proj_bias" else 0), rows):
                raise TypeError(f"{name}: expected a bias {attr} of shape [E, {rows}]")
    all_tokens = _takes_hidden_only(type(experts).forward)
    # the interface flag, or a module that applies its own post_expert_norm in its forward (Ergo: one
    # RMSNorm scale per expert, called with the expert ids of the rows)
    norm = getattr(experts, "post_expert_norm", None)
    post_norm = bool(getattr(experts, "has_post_expert_norm", False)) or isinstance(norm, nn.Module)
    if post_norm and not isinstance(norm, nn.Module):
        raise TypeError(f"{name}: has_post_expert_norm is set but there is no post_expert_norm module")
    _refuse_unknown_members(experts, name, first, bias)
    return ExpertsLayout(gated=gated, transposed=bool(transposed), bias=bias, custom_gate=custom_gate,
                         post_norm=post_norm, post_norm_by_expert=post_norm and _takes_expert_ids(norm.forward),
                         identity_experts=identity, all_tokens=all_tokens)


_KNOWN_CHILDREN = ("act_fn", "post_expert_norm", "identity_expert")


def _refuse_unknown_members(experts: nn.Module, name: str, first: str, bias: bool) -> None:
    """An experts module holding a parameter or a sub-module the analog experts do not compute with
    would be converted silently wrong (the member dropped from the maths): refuse it by name."""
    known = {first, "down_proj"} | ({f"{first}_bias", "down_proj_bias"} if bias else set())
    unknown = [n for n, _ in experts.named_parameters(recurse=False) if n not in known]
    unknown += [n for n, child in experts.named_children()
                if n not in _KNOWN_CHILDREN and any(True for _ in child.parameters())]
    if unknown:
        raise TypeError(f"{name}: the experts module holds {', '.join(sorted(unknown))}, which the analog experts "
                        "do not know how to compute with")


def _takes_expert_ids(forward) -> bool:
    """A post-expert norm ``forward(hidden, expert_ids)`` (one scale per expert) rather than ``forward(hidden)``."""
    try:
        parameters = list(inspect.signature(inspect.unwrap(forward)).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


def _takes_hidden_only(forward) -> bool:
    """A forward(hidden_states) without routing arguments (every expert on its own block of rows)."""
    forward = inspect.unwrap(forward)
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _default_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate  # noqa: PLC0415
    except ImportError:  # an older transformers without the experts interface
        return None
    return _default_apply_gate


def _infer_transposed(name: str, w_in: torch.Tensor, w_out: torch.Tensor, gated: bool) -> bool:
    """[E, out, in] or [E, in, out] from the shapes alone; an ambiguous case is refused, not guessed."""
    def fits(transposed: bool) -> bool:
        a = w_in.shape[1:][::-1] if transposed else w_in.shape[1:]
        b = w_out.shape[1:][::-1] if transposed else w_out.shape[1:]
        inter = a[0] // 2 if gated else a[0]
        return a[1] == b[0] and b[1] == inter and not (gated and a[0] % 2)
    normal, transposed = fits(False), fits(True)
    if normal and transposed:
        raise TypeError(f"{name}: weights {tuple(w_in.shape)} and {tuple(w_out.shape)} fit both the [E, out, in] and "
                        "the transposed layout and the module has no is_transposed flag")
    return transposed and not normal


class AnalogExperts(AnalogModule):
    """Routed experts whose matrices are programmed on simulated crossbars, one set of tiles per expert."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn: nn.Module | None,
                 config: AnalogConfig | str | None = None, *, name: str = "experts", seed: int = 0,
                 mvm_noise: bool = True, digital_experts: Iterable[int] = (), layout: ExpertsLayout | None = None,
                 first_bias: nn.Parameter | None = None, down_bias: nn.Parameter | None = None,
                 apply_gate=None, post_norm: nn.Module | None = None) -> None:
        super().__init__()
        layout = layout or ExpertsLayout()
        self.layout = layout
        # the parameters keep the names they have in the digital module, so checkpoints keep their keys
        self.first_name = layout.first
        setattr(self, self.first_name, gate_up_proj)
        self.down_proj = down_proj
        if layout.bias:
            setattr(self, f"{self.first_name}_bias", first_bias)
            self.down_proj_bias = down_bias
        self.act_fn = act_fn
        self.apply_gate = apply_gate  # the digital module's own _apply_gate (layout.custom_gate), bound
        self.post_expert_norm = post_norm
        self.num_experts = down_proj.shape[0]
        first_out, self.hidden_dim = gate_up_proj.shape[1:][::-1] if layout.transposed else gate_up_proj.shape[1:]
        self.intermediate_dim = first_out // 2 if layout.gated else first_out
        self.identity_experts = layout.identity_experts
        self.name = name
        config = resolve_config(config)
        check_seed(seed)
        self.digital_experts = frozenset(int(e) for e in digital_experts)
        bad = sorted(e for e in self.digital_experts if not 0 <= e < self.num_experts)
        if bad:
            raise ValueError(f"digital_experts {bad} out of range for {self.num_experts} experts")
        self.gate_up = [AnalogMatrix(config, first_out, self.hidden_dim, f"{name}.{e}.{self.first_name}", seed, mvm_noise)
                        for e in range(self.num_experts)]
        self.down = [AnalogMatrix(config, self.hidden_dim, self.intermediate_dim, f"{name}.{e}.down_proj", seed,
                                  mvm_noise) for e in range(self.num_experts)]
        self.forward_calls = 0
        self.dispatch = None
        self.extra_experts = None
        self.slot_weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.backend: str | None = None  # MVM backend; None = the process default (see kernels.backends)
        self._stacked: tuple | None = None  # (chip versions, device, split tiles on the device) for Triton

    @property
    def first_proj(self) -> nn.Parameter:
        """The first matrix of every expert, fused over experts: ``gate_up_proj`` or ``up_proj``."""
        return getattr(self, self.first_name)

    @classmethod
    def from_experts(cls, experts: nn.Module, config: AnalogConfig | str | None = None, *, name: str = "experts",
                     seed: int = 0, mvm_noise: bool = True, digital_experts: Iterable[int] = ()) -> "AnalogExperts":
        """Wrap a transformers fused experts module of any layout ``experts_layout`` reads; its parameters
        are shared, not copied."""
        layout = experts_layout(experts)
        first = layout.first
        return cls(getattr(experts, first), experts.down_proj, getattr(experts, "act_fn", None), config, name=name,
                   seed=seed, mvm_noise=mvm_noise, digital_experts=digital_experts, layout=layout,
                   first_bias=getattr(experts, f"{first}_bias", None) if layout.bias else None,
                   down_bias=getattr(experts, "down_proj_bias", None) if layout.bias else None,
                   apply_gate=experts._apply_gate if layout.custom_gate else None,
                   post_norm=getattr(experts, "post_expert_norm", None) if layout.post_norm else None)

    def activation(self, hidden: torch.Tensor) -> torch.Tensor:
        """What an expert computes between its two MVMs: the gate (the module's own, or act(gate) * up),
        or the activation of a non-gated expert."""
        if self.apply_gate is not None:
            return self.apply_gate(hidden)
        if not self.layout.gated:
            return self.act_fn(hidden)
        gate, up = hidden.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _biases(self, expert: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.layout.bias:
            return None, None
        return getattr(self, f"{self.first_name}_bias")[expert], self.down_proj_bias[expert]

    # -- digital weights of each slot ----------------------------------------------------------------
    def expert_params(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The digital (gate_up [2I, H], down [H, I]) slot ``expert`` computes with: its ``slot_weights``
        entry, else its rows of the fused parameters (views, not copies)."""
        override = self.slot_weights.get(expert)
        if override is not None:
            return override
        if self.layout.transposed:
            return self.first_proj[expert].t(), self.down_proj[expert].t()
        return self.first_proj[expert], self.down_proj[expert]

    def set_slot_weights(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Let slot ``expert`` compute with ``gate_up`` / ``down`` (kept by reference); its chip is
        programmed from them at its next use."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{self.name}: expert slot {expert} out of range for {self.num_experts} experts")
        shapes = ((self.gate_up[0].out_features, self.hidden_dim), (self.hidden_dim, self.intermediate_dim))
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
        setattr(self, self.first_name, meta_parameter(self.first_proj))
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
        first_bias, down_bias = self._biases(expert)
        if expert in self.digital_experts:
            hidden = nn.functional.linear(x.float(), gate_up_weight.float(), None if first_bias is None else first_bias.float())
        else:
            hidden = self.gate_up[expert].matmul(x, gate_up_weight, first_bias, row_ids=token_ids, call_index=call_index,
                                                 backend=backend or self.backend)
        hidden = self.activation(hidden)
        if expert in self.digital_experts:
            out = nn.functional.linear(hidden, down_weight.float(), None if down_bias is None else down_bias.float())
        else:
            out = self.down[expert].matmul(hidden, down_weight, down_bias, row_ids=token_ids, call_index=call_index,
                                           backend=backend or self.backend)
        if self.post_expert_norm is not None and self.layout.post_norm_by_expert:
            out = self.post_expert_norm(out, torch.full((out.shape[0],), expert, dtype=torch.long, device=out.device))
        elif self.post_expert_norm is not None:
            out = self.post_expert_norm(out)
        return out

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

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if top_k_index is None and top_k_weights is None and self.layout.all_tokens:
            rows = hidden_states.shape[0]
            if rows % self.num_experts:
                raise ValueError(f"{self.name}: {rows} rows are not {self.num_experts} equal expert blocks")
            top_k_index = torch.arange(self.num_experts, device=hidden_states.device).repeat_interleave(
                rows // self.num_experts)[:, None]
            top_k_weights = torch.ones(rows, 1, dtype=hidden_states.dtype, device=hidden_states.device)
        if top_k_index is None or top_k_weights is None:
            raise ValueError(f"{self.name}: forward needs top_k_index and top_k_weights")
        if hidden_states.dim() != 2 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(f"AnalogExperts expects hidden_states [tokens, {self.hidden_dim}], got {tuple(hidden_states.shape)}")
        if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
                             f"must both be [tokens, k] for {hidden_states.shape[0]} tokens")
        identity_out = None
        if self.identity_experts:  # zero-compute experts: their output is their input, digitally
            is_identity = (top_k_index >= self.num_experts) & (top_k_index < self.num_experts + self.identity_experts)
            identity_out = hidden_states.float() * (top_k_weights.float() * is_identity).sum(-1, keepdim=True)
            top_k_index = torch.where(is_identity, -1, top_k_index)
        if self.dispatch is not None:
            top_k_index, top_k_weights = self.dispatch(top_k_index, top_k_weights)
        call_index = self.forward_calls
        self.forward_calls += 1
        backend = resolve_backend(self.backend, hidden_states.device)
        # HWA training: the differentiable per-expert loop below, with gradients to the inputs and the router
        # weights; the chips are not programmed (each matrix draws its training chip itself)
        training = any(matrix.training_forward for matrix in self.gate_up + self.down)
        if not training:
            # static input ranges (HWA-learned) are applied per matrix: the per-expert loop
            all_analog = (not self.digital_experts and self.extra_experts is None and self.layout.standard
                          and all(matrix.input_range is None for matrix in self.gate_up + self.down))
            self._ensure_programmed()  # before choosing a path: programming decides each chip's kind
            on_the_fly = [isinstance(matrix.chip, OnTheFlyChip) for matrix, _ in self._matrices()]
            # the fused on-the-fly kernel reads the fused parameters, so slots with their own weights take the loop
            fused = all_analog and len(set(on_the_fly)) == 1 and not (on_the_fly[0] and self.slot_weights)
            if (backend == "triton" or all(on_the_fly)) and fused:
                return self._forward_triton(hidden_states, top_k_index, top_k_weights, call_index)
            if backend == "cpp" and all_analog and self.dispatch is None and _is_silu(self.act_fn):
                return self._forward_cpp(hidden_states, top_k_index, top_k_weights, call_index)
        out = torch.zeros(hidden_states.shape, dtype=torch.float32) if identity_out is None else identity_out.cpu()
        flat_experts = top_k_index.reshape(-1).cpu()
        slots = self.num_experts + (self.extra_experts.num_experts if self.extra_experts is not None else 0)
        dropping = self.dispatch is not None or self.identity_experts
        if dropping:  # -1 = dropped assignment: sorted last, into a bin that is skipped
            if flat_experts.numel() and int(flat_experts.max()) >= slots:
                raise ValueError(f"dispatch returned expert ids >= {slots}")
            flat_experts = torch.where(flat_experts < 0, slots, flat_experts)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=slots)
        if dropping:
            counts = counts[:slots]
        if counts.numel() > slots:
            raise ValueError(f"top_k_index holds expert ids >= {slots}")
        k = top_k_index.shape[1]
        x_cpu = hidden_states.cpu() if training else hidden_states.detach().cpu()
        weights = (top_k_weights if training else top_k_weights.detach()).reshape(-1).cpu().float()
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

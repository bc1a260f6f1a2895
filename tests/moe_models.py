"""Tiny random-weight MoE models of every supported architecture, built from config (no downloads)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 128
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **TOKENS)


def _deepseek_common():
    return dict(moe_intermediate_size=32, intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8)


BUILDERS = {
    "olmoe": lambda: OlmoeForCausalLM(OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **COMMON)),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_experts=8, num_experts_per_tok=2, **COMMON)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        num_key_value_heads=2, head_dim=16, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, **COMMON)),
    "deepseek_v2": lambda: DeepseekV2ForCausalLM(DeepseekV2Config(topk_method="greedy", **_deepseek_common(), **COMMON)),
    "deepseek_v3": lambda: DeepseekV3ForCausalLM(DeepseekV3Config(n_group=2, topk_group=1, **_deepseek_common(), **COMMON)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(
        num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **COMMON)),
}


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    with torch.no_grad():  # DeepSeek V3 initialises its router to zeros; give every router a real choice
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") or "e_score_correction_bias" in name:
                param.normal_(0, 0.5)
    return model.eval()


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _LegacyMoE(nn.Module):
    """transformers-4 / remote-code layout: nn.Linear router and a ModuleList of per-expert MLPs."""

    def __init__(self, hidden: int = 32, inter: int = 16, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, inter) for _ in range(experts))

    def forward(self, x):
        logits = self.gate(x)
        weights, index = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                rows = index[:, slot] == e
                if rows.any():
                    out[rows] += weights[rows, slot, None] * expert(x[rows])
        return out


class LegacyMoEModel(nn.Module):
    class Config:
        num_experts_per_tok = 2

    def __init__(self):
        super().__init__()
        self.config = self.Config()
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList(nn.ModuleDict({"mlp": _LegacyMoE()}) for _ in range(2))
        self.lm_head = nn.Linear(32, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed(ids).reshape(-1, 32)
        for layer in self.layers:
            h = h + layer["mlp"](h)
        return self.lm_head(h).reshape(*ids.shape, VOCAB)

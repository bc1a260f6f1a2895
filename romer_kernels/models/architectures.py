"""Every MoE causal-LM architecture of the installed transformers, and a tiny random-weight model of each.

``moe_architectures()`` discovers them from transformers' own registry (``MODEL_FOR_CAUSAL_LM_MAPPING``):
an architecture is MoE when its default config sets an expert count (``num_experts``, ``n_routed_experts``,
...) or can switch an MoE block on. Nothing is listed by hand, so a new transformers release brings its
new architectures along. ``tiny_model(arch)`` builds one at tiny size (hidden 64, 2 layers, 8 experts,
top-2, vocabulary 128) from the config class's defaults with the size fields shrunk; the few
architectures that need more than that to build (or to have an MoE layer among 2 layers) get it in
``CONFIG_TWEAKS``, one table.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Default-config fields whose presence (with a positive value) marks an MoE architecture.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "ffn_config")
# Switches that turn an MoE block on in architectures whose default is dense.
MOE_SWITCHES = ("enable_moe_block",)

VOCAB = 128
# Size fields shrunk wherever the config class has them (the class's own defaults stay otherwise).
TINY_SIZES: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "shared_intermediate_size": 64, "moe_shared_expert_intermediate_size": 64,
    "shared_experts_intermediate_size": 64, "dense_intermediate_size": 64, "expert_ffn_hidden_size": 32,
    "ffn_hidden_size": 64, "moe_hidden_size": 32, "intermediate_size_mlp": 64, "share_expert_dim": 64,
    "max_position_embeddings": 256, "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8,
    "moe_num_experts": 8, "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k_experts": 2,
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "v_head_dim": 8, "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "sliding_window": 32, "sliding_window_size": 32, "attention_chunk_size": 32, "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2, "swa_head_dim": 16, "num_sliding_attention_heads": 4,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_value_heads": 4,
    "linear_num_key_heads": 2, "linear_head_dim": 16, "linear_num_heads": 4,
    "ssm_state_size": 8, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_d_state": 8, "mamba_n_heads": 4,
    "mamba_d_head": 16, "mamba_dt_rank": 8, "chunk_size": 16, "mamba_chunk_size": 16,
    "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "kv_channels": 16, "rotary_dim": 16,
    "router_hidden_size": 32, "d_rel": 16, "query_pre_attn_scalar": 16,
}

# What an architecture needs beyond TINY_SIZES to build at tiny size with an MoE layer among 2 layers.
CONFIG_TWEAKS: dict[str, dict[str, Any]] = {
    "gemma4_text": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 32,
                    "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": VOCAB},
    "bailing_hybrid": {"num_expert_group": 2, "num_experts_per_token": 2},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["full_attention", "conv"]},
    "nemotron_h": {"n_groups": 1, "layers_block_type": ["linear_attention", "moe"]},
    "granitemoehybrid": {"mamba_d_head": 32, "layer_types": ["linear_attention", "attention"]},
    "zaya": {"num_experts_per_tok": 1},
    "inkling2_text": {"unpadded_vocab_size": VOCAB},
    "inkling2_loop_text": {"unpadded_vocab_size": VOCAB},
    "beam": {"mlp_layer_types": ["dense", "sparse"]},
    "flint": {"mlp_only_layers": [0]},
    "doge": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 2},
    "longcat_flash": {"zero_expert_num": 2, "num_layers": 2},
    "kolibri1_1": {"mlp_only_layers": [0], "layer_types": ["sliding_attention", "indexed_attention"],
                   "index_num_heads": 2, "index_topk": 8, "index_pool_size": 32, "index_compression": 4},
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}},
}


@dataclass(frozen=True)
class Architecture:
    """One MoE causal-LM architecture: its transformers model type and classes."""

    model_type: str
    model_class: type
    config_class: type

    @property
    def name(self) -> str:
        return self.model_class.__name__


def _config_fields(config) -> dict[str, Any]:
    fields = config.to_dict()
    text = fields.get("text_config")
    return {**fields, **text} if isinstance(text, dict) else fields


def _is_moe(fields: dict[str, Any]) -> bool:
    return any(fields.get(key) not in (None, 0, False, {}) for key in EXPERT_COUNT_FIELDS) or any(
        key in fields for key in MOE_SWITCHES)


@functools.cache
def moe_architectures() -> tuple[Architecture, ...]:
    """Every MoE causal-LM architecture of the installed transformers, one per model class."""
    import transformers  # noqa: PLC0415
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415

    found, seen = [], set()
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
                model_class = getattr(transformers, class_name, None)
                if model_class is None or class_name in seen:
                    continue
                config_class = model_class.config_class
                if any(word in key for key in getattr(config_class, "sub_configs", {}) for word in ("vision", "audio", "image")):
                    continue  # multimodal: its text model is an architecture of its own in the mapping
                try:
                    fields = _config_fields(config_class())
                except Exception:  # noqa: BLE001 -- a default config that does not validate: tried with tweaks
                    fields = dict(CONFIG_TWEAKS.get(config_class.model_type, {}))
                if _is_moe(fields) or config_class.model_type in CONFIG_TWEAKS:
                    seen.add(class_name)
                    found.append(Architecture(config_class.model_type, model_class, config_class))
    finally:
        transformers.logging.set_verbosity(verbosity)
    return tuple(sorted(found, key=lambda a: a.model_type))


def architecture(model_type: str) -> Architecture:
    for arch in moe_architectures():
        if arch.model_type == model_type:
            return arch
    known = ", ".join(a.model_type for a in moe_architectures())
    raise ValueError(f"no MoE architecture {model_type!r} in this transformers; known: {known}")


def tiny_config(arch: Architecture | str):
    """The architecture's default config with every size field shrunk (and its ``CONFIG_TWEAKS``)."""
    import transformers  # noqa: PLC0415

    arch = architecture(arch) if isinstance(arch, str) else arch
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                defaults = _config_fields(arch.config_class())
            except Exception:  # noqa: BLE001
                defaults = {}
            tweaks = CONFIG_TWEAKS.get(arch.model_type, {})
            sizes = {key: value for key, value in TINY_SIZES.items() if key in defaults}
            if "qk_rope_head_dim" in defaults and "head_dim" in defaults:
                sizes["head_dim"] = sizes["qk_rope_head_dim"]  # multi-head latent attention: rope part
            if "kv_lora_rank" in defaults and "num_key_value_heads" in defaults:
                sizes["num_key_value_heads"] = sizes["num_attention_heads"]  # no grouped-query attention in MLA
            config = arch.config_class(**{**sizes, **tweaks})
    finally:
        transformers.logging.set_verbosity(verbosity)
    return config


def tiny_model(arch: Architecture | str, seed: int = 0) -> nn.Module:
    """A float32 random-weight model of the architecture at tiny size, in eval mode. Router weights are
    redrawn at N(0, 0.5) so that every router makes real choices (some initialise theirs to zeros)."""
    import transformers  # noqa: PLC0415

    arch = architecture(arch) if isinstance(arch, str) else arch
    config = tiny_config(arch)
    torch.manual_seed(seed)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = arch.model_class(config).float().eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and name.endswith(("gate.weight", "router.weight")):
                parameter.normal_(0, 0.5)
    return model

"""Tiny Mixture-of-Experts language models trained on the bundled Wikipedia corpus, for offline use.

Two architectures, both built from transformers configs (nothing is downloaded):

- ``tiny-olmoe``: ``OlmoeForCausalLM``, 4 layers, hidden 160, 16 experts of width 64, top-4 softmax routing,
  trained with OLMoE's own load-balancing loss (``router_aux_loss_coef`` = 0.01), applied to each layer
  separately (transformers pools all layers into one loss, which let single layers collapse).
- ``tiny-deepseek``: ``DeepseekV3ForCausalLM`` (multi-head latent attention), 4 layers of which the first
  is dense, then 16 routed experts (width 64, top-4 sigmoid routing) plus 1 shared expert per layer.
  transformers computes no balancing loss for DeepSeek-V3, so training uses DeepSeek-V3's auxiliary-loss-
  free balancing: after every step each router's ``e_score_correction_bias`` moves by ``bias_update_rate``
  towards its under-loaded experts (``b_i += rate * sign(mean_j n_j - n_i)``), plus V3's small
  sequence-wise balance loss ``alpha * sum_i f_i P_i`` (``alpha`` = ``seq_aux_coef`` = 1e-4).

Both use a byte-level BPE tokenizer (4096 tokens) trained on the train split with the ``tokenizers``
library and saved as a ``PreTrainedTokenizerFast``. The bundled checkpoints live in
``romer_kernels/assets/models/<name>/`` and load offline::

    from romer_kernels.models import load_tiny
    model, tokenizer = load_tiny("tiny-olmoe")

Retrain (reproducible for the same seed and thread count)::

    python -m romer_kernels.models.tiny --arch tiny-olmoe --out DIR --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ARCHS = ("tiny-olmoe", "tiny-deepseek")
MODELS_DIR = Path(__file__).resolve().parent.parent / "assets" / "models"
MAX_CHECKPOINT_BYTES = 15_000_000

EOS_TOKEN, UNK_TOKEN, PAD_TOKEN = "<|endoftext|>", "<unk>", "<pad>"
SPECIAL_TOKENS = (EOS_TOKEN, UNK_TOKEN, PAD_TOKEN)            # ids 0, 1, 2

# Architecture hyper-parameters. All widths are multiples of 8: grouped_mm on CPU needs 16-byte strides.
ARCH_CONFIGS: dict[str, dict] = {
    "tiny-olmoe": dict(
        hidden_size=160, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, router_aux_loss_coef=0.01,
        max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "tiny-deepseek": dict(
        hidden_size=160, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_shared_experts=1,
        n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6, num_mtp_layers=0, tie_word_embeddings=False,
    ),
}

# Training hyper-parameters of the bundled checkpoints (``main`` uses them as defaults).
TRAIN_DEFAULTS: dict[str, object] = dict(
    steps=4000, seq_len=256, batch_size=8, lr=2e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1,
    betas=(0.9, 0.95), grad_clip=1.0, seed=0, vocab_size=4096, bias_update_rate=1e-3, seq_aux_coef=1e-4,
    eval_seq_len=256, eval_batch_size=8, eval_every=250, eval_windows=16,
)


# -- tokenizer ---------------------------------------------------------------------------------------
def train_tokenizer(text: str, vocab_size: int = 4096, out_dir: str | Path | None = None,
                    model_max_length: int = 1024):
    """Byte-level BPE tokenizer trained on ``text``; a transformers ``PreTrainedTokenizerFast``
    (saved to ``out_dir`` when given). ``<|endoftext|>`` is bos and eos, plus ``<unk>`` and ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the byte alphabet and specials)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN,
                                        unk_token=UNK_TOKEN, pad_token=PAD_TOKEN, model_max_length=model_max_length,
                                        clean_up_tokenization_spaces=False)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a (long) text as a 1-D int64 tensor, without special tokens or length checks."""
    return torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)


# -- configs and bundled models -----------------------------------------------------------------------
def tiny_config(arch: str, vocab_size: int = 4096, **overrides):
    """The transformers config of ``arch`` (``overrides`` replace any field, e.g. for micro test models)."""
    from transformers import DeepseekV3Config, OlmoeConfig  # noqa: PLC0415

    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    kwargs = dict(ARCH_CONFIGS[arch], vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=2)
    kwargs.update(overrides)
    cls = OlmoeConfig if arch == "tiny-olmoe" else DeepseekV3Config
    return cls(**kwargs)


def build_model(config, seed: int = 0) -> nn.Module:
    """A freshly initialised causal LM for ``config`` (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def model_dir(name: str) -> Path:
    """Folder of a bundled checkpoint (``tiny-olmoe`` or ``tiny-deepseek``)."""
    if name not in ARCHS:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {ARCHS}")
    return MODELS_DIR / name


def load_tiny(name: str, **from_pretrained_kwargs):
    """(model, tokenizer) of a bundled tiny model, loaded offline with ``from_pretrained``; extra keyword
    arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``experts_implementation="eager"``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    folder = model_dir(name)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"bundled model {name!r} is missing in {folder}; retrain it with "
                                f"`python -m romer_kernels.models.tiny --arch {name} --out {folder}`")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


# -- routing helpers -----------------------------------------------------------------------------------
def _routers(model: nn.Module) -> list[nn.Module]:
    """The top-k router modules of a transformers 5 MoE model, in layer order."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "weight")
            and hasattr(m, "top_k")]


class _RouterTap:
    """Forward hooks that keep each router's (logits, top-k indices) of the last forward, with gradients."""

    def __init__(self, model: nn.Module):
        self.routers = _routers(model)
        self.outputs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.routers)
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(_module, _inputs, output):
            self.outputs[i] = (output[0], output[2])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def olmoe_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """transformers' OLMoE load-balancing loss ``E * sum_i f_i P_i`` of the given layers' router logits."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func  # noqa: PLC0415

    return load_balancing_loss_func(router_logits, num_experts, top_k)


def sequence_balance_loss(logits: torch.Tensor, indices: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``sum_i f_i P_i`` for sigmoid routers, mean over sequences:
    ``f_i = E/(k T) * #{t: i in topk_t}``, ``P_i = mean_t s_{t,i} / sum_j s_{t,j}``."""
    num_experts = logits.shape[-1]
    scores = torch.sigmoid(logits.float())
    scores = (scores / scores.sum(-1, keepdim=True)).reshape(batch, -1, num_experts)
    tokens = scores.shape[1]
    counts = torch.zeros(batch, num_experts, device=logits.device)
    counts.scatter_add_(1, indices.reshape(batch, -1), torch.ones(batch, tokens * top_k, device=logits.device))
    f = counts * num_experts / (top_k * tokens)
    return (f * scores.mean(1)).sum(-1).mean()


def routing_specialization(trace, sigmoid: bool) -> dict:
    """How peaked the routers are: mean normalised entropy of each token's router distribution (1 = uniform)
    and the mean probability mass of the chosen top-k experts (k/E for a uniform router), over layers."""
    entropies, masses = [], []
    for layer in trace.layers.values():
        logits = layer.router_logits
        if sigmoid:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(probs.shape[-1])
        entropies.append(float(ent.mean()))
        masses.append(float(probs.gather(-1, layer.top_k_index).sum(-1).mean()))
    return {"router_entropy": sum(entropies) / len(entropies), "top_k_mass": sum(masses) / len(masses)}


def expert_top_tokens(trace, token_ids: torch.Tensor, tokenizer, layer_index: int = 0, top: int = 6) -> dict:
    """The input tokens most over-represented among each expert's tokens in one MoE layer (a readable view
    of what the router learned): ratio of the token's share in the expert's tokens to its overall share."""
    layer = list(trace.layers.values())[layer_index]
    idx = layer.top_k_index                                       # [tokens, k]
    toks = token_ids[: idx.shape[0]]
    vocab = int(max(int(toks.max()) + 1, 1))
    overall = torch.bincount(toks, minlength=vocab).double()
    out = {}
    for e in range(layer.num_experts):
        mine = toks[(idx == e).any(-1)]
        if mine.numel() == 0:
            out[str(e)] = []
            continue
        counts = torch.bincount(mine, minlength=vocab).double()
        lift = (counts / mine.numel()) / (overall / toks.numel()).clamp_min(1e-12)
        lift[counts < 5] = 0                                      # ignore rare tokens
        best = torch.argsort(lift, descending=True)[:top]
        out[str(e)] = [tokenizer.decode([int(t)]) for t in best if lift[t] > 0]
    return out


# -- training -------------------------------------------------------------------------------------------
def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * lr``; the decay follows the larger of the step
    progress and ``time_progress`` (elapsed / time budget), so a time-limited run still anneals."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = max((step - warmup) / max(1, steps - warmup), time_progress)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # no decay for norms, biases, embeddings and routers (DeepSeek-V3 keeps its router in fp32 too)
        if p.dim() < 2 or "embed" in name or name.endswith("mlp.gate.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate_tiny(model: nn.Module, token_ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8,
                  max_windows: int | None = None, trace: bool = True) -> dict:
    """Perplexity (non-overlapping windows) and, when traced, routing metrics of batches of
    ``batch_size`` x ``seq_len`` tokens: LIS, CV, entropy of the load, router entropy, top-k mass."""
    from romer_kernels.evaluation.lm_metrics import evaluate_lm  # noqa: PLC0415

    was_training = model.training
    model.eval()
    try:
        result = evaluate_lm(model, token_ids, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                             trace=trace)
    finally:
        model.train(was_training)
    out = {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens}
    if result.routing is not None:
        out.update(lis=result.routing.lis, load_cv=result.routing.cv, load_entropy=result.routing.entropy)
        sigmoid = getattr(model.config, "model_type", "") == "deepseek_v3"
        out.update(routing_specialization(result.trace, sigmoid))
    out["_trace"] = result.trace
    return out


def train_tiny(arch: str, out_dir: str | Path | None, steps: int = 4000, seq_len: int = 256, batch_size: int = 8,
               lr: float = 2e-3, seed: int = 0, *, warmup_steps: int = 100, min_lr_ratio: float = 0.1,
               weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95), grad_clip: float = 1.0,
               vocab_size: int = 4096, tokenizer=None, config_overrides: dict | None = None,
               bias_update_rate: float = 1e-3, seq_aux_coef: float = 1e-4, router_aux_loss_coef: float | None = None,
               train_text: str | None = None, valid_text: str | None = None, test_text: str | None = None,
               eval_seq_len: int = 256, eval_batch_size: int = 8, eval_every: int = 250, eval_windows: int = 16,
               max_eval_windows: int | None = None, progress: bool = True, log_every: int = 10,
               time_budget_s: float | None = None, aux_loss_scope: str = "per_layer") -> dict:
    """Train a tiny MoE LM on CPU in fp32 (AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr``,
    gradient clipping, random windows of ``seq_len`` tokens, ``batch_size`` per step), evaluate it, and save
    model, tokenizer, ``training.json`` and ``README.md`` to ``out_dir`` (skipped when ``out_dir`` is None).

    ``tokenizer``: a tokenizer or a folder with one; by default a new byte-level BPE of ``vocab_size`` is trained
    on the train text. Texts default to the bundled corpus splits. Returns the summary written to training.json,
    plus ``loss_history`` (the language-model loss of every step).

    ``aux_loss_scope`` (OLMoE): ``"per_layer"`` applies the model's load-balancing loss to every MoE layer
    separately and averages it (as in the OLMoE paper); ``"model"`` uses ``out.aux_loss`` as transformers computes
    it, with the counts and probabilities of all layers pooled before the product, which balances each
    expert index summed over layers but lets single layers collapse (dead experts in a 4-layer test run).

    ``time_budget_s`` bounds the training wall time: the cosine decay then follows the larger of step progress
    and time progress (measured after warm-up), and training stops when either reaches 1. A run that ends on
    the time budget depends on the machine's speed, so it is not reproducible step for step; ``training.json``
    records the steps done and what ended the run. Without it (the default) the run is seeded and reproducible
    for the same thread count.
    """
    from transformers import AutoTokenizer  # noqa: PLC0415

    from romer_kernels.data.corpus import load_corpus  # noqa: PLC0415
    from romer_kernels.evaluation.perplexity import unigram_perplexity  # noqa: PLC0415

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHS}")
    if aux_loss_scope not in ("per_layer", "model"):
        raise ValueError(f"aux_loss_scope must be 'per_layer' or 'model', got {aux_loss_scope!r}")
    if steps < 1 or seq_len < 2 or batch_size < 1 or lr <= 0:
        raise ValueError("steps, batch_size must be positive, seq_len at least 2 and lr > 0")
    started = time.perf_counter()
    train_text = load_corpus("train") if train_text is None else train_text
    valid_text = load_corpus("valid") if valid_text is None else valid_text
    test_text = load_corpus("test") if test_text is None else test_text

    if tokenizer is None:
        tokenizer = train_tokenizer(train_text, vocab_size)
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    train_ids, valid_ids, test_ids = (encode(tokenizer, t) for t in (train_text, valid_text, test_text))
    if train_ids.numel() <= seq_len + 1:
        raise ValueError(f"the train text has {train_ids.numel()} tokens, too few for seq_len={seq_len}")

    overrides = dict(config_overrides or {})
    if router_aux_loss_coef is not None and arch == "tiny-olmoe":
        overrides["router_aux_loss_coef"] = router_aux_loss_coef
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    model = build_model(config, seed)
    model.train()
    is_olmoe = arch == "tiny-olmoe"
    tap = None if is_olmoe else _RouterTap(model)
    top_k = config.num_experts_per_tok

    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8)
    generator = torch.Generator().manual_seed(seed)
    num_params = sum(p.numel() for p in model.parameters())
    history, evals = [], []
    aux_history = []
    iterator = range(steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(iterator, desc=f"train {arch}", unit="step", dynamic_ncols=True)
        iterator = bar
    train_started = time.perf_counter()
    decay_started, time_progress, stopped_by, steps_done = None, 0.0, "steps", 0
    for step in iterator:
        if time_budget_s is not None and step >= warmup_steps:
            if decay_started is None:
                decay_started = time.perf_counter()
            remaining = time_budget_s - (decay_started - train_started)
            time_progress = (time.perf_counter() - decay_started) / max(remaining, 1e-9)
            if time_progress >= 1.0:
                stopped_by = "time budget"
                break
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup_steps, min_lr_ratio, time_progress)
        starts = torch.randint(0, train_ids.numel() - seq_len, (batch_size,), generator=generator)
        batch = torch.stack([train_ids[s:s + seq_len] for s in starts.tolist()])
        if is_olmoe:
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
            lm_loss = out.loss - config.router_aux_loss_coef * out.aux_loss
            if aux_loss_scope == "per_layer":
                aux = sum(olmoe_balancing_loss((logits,), config.num_experts, top_k) for logits in out.router_logits)
                aux = aux / len(out.router_logits)
            else:
                aux = out.aux_loss
            loss = lm_loss + config.router_aux_loss_coef * aux
        else:
            out = model(input_ids=batch, labels=batch)
            lm_loss = out.loss
            aux = sum(sequence_balance_loss(logits, idx, batch_size, top_k) for logits, idx in tap.outputs)
            aux = aux / len(tap.outputs)
            loss = lm_loss + seq_aux_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if not is_olmoe and bias_update_rate:
            with torch.no_grad():                                    # auxiliary-loss-free balancing (DeepSeek-V3)
                for router, (_logits, idx) in zip(tap.routers, tap.outputs):
                    load = torch.bincount(idx.reshape(-1), minlength=router.e_score_correction_bias.numel()).float()
                    router.e_score_correction_bias += bias_update_rate * torch.sign(load.mean() - load)
        steps_done = step + 1
        history.append(float(lm_loss.detach()))
        aux_history.append(float(aux.detach()))
        if bar is not None and (step % log_every == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{sum(history[-log_every:]) / len(history[-log_every:]):.3f}",
                            aux=f"{aux_history[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            quick = evaluate_tiny(model, valid_ids, eval_seq_len, eval_batch_size, max_windows=eval_windows)
            window = history[-eval_every:]
            evals.append({"step": step + 1, "train_loss": sum(window) / len(window),
                          "valid_perplexity_subset": quick["perplexity"], "valid_lis_subset": quick["lis"],
                          "elapsed_s": round(time.perf_counter() - train_started, 1)})
            if bar is not None:
                bar.write(f"step {step + 1}: train loss {evals[-1]['train_loss']:.3f}, valid (first {eval_windows} "
                          f"windows) ppl {quick['perplexity']:.1f} LIS {quick['lis']:.3f}")
    train_seconds = time.perf_counter() - train_started
    if bar is not None:
        bar.close()
    if tap is not None:
        tap.remove()
    model.eval()

    # -- final evaluation ------------------------------------------------------------------------------
    eval_started = time.perf_counter()
    valid = evaluate_tiny(model, valid_ids, eval_seq_len, eval_batch_size, max_eval_windows, trace=False)
    test = evaluate_tiny(model, test_ids, eval_seq_len, eval_batch_size, max_eval_windows, trace=True)
    untrained = evaluate_tiny(build_model(config, seed), test_ids, eval_seq_len, eval_batch_size,
                              max_eval_windows, trace=True)
    unigram = unigram_perplexity(train_ids, test_ids, len(tokenizer), seq_len=eval_seq_len)
    top_tokens = expert_top_tokens(test.pop("_trace"), test_ids, tokenizer, layer_index=0)
    untrained.pop("_trace")
    valid.pop("_trace")
    eval_seconds = time.perf_counter() - eval_started
    tail = history[-min(len(history), 100):]
    summary = {
        "arch": arch,
        "model_class": type(model).__name__,
        "parameters": num_params,
        "hyperparameters": {
            "steps": steps_done, "planned_steps": steps, "stopped_by": stopped_by,
            "time_budget_s": time_budget_s, "seq_len": seq_len, "batch_size": batch_size, "tokens_per_step": seq_len * batch_size,
            "lr": lr, "min_lr_ratio": min_lr_ratio, "warmup_steps": warmup_steps, "schedule": "linear warm-up, cosine",
            "optimizer": "AdamW", "betas": list(betas), "weight_decay": weight_decay, "grad_clip": grad_clip,
            "seed": seed, "dtype": "float32", "device": "cpu", "torch_threads": torch.get_num_threads(),
            "balancing": (f"OLMoE load-balancing loss ({aux_loss_scope.replace('_', ' ')}), coefficient "
                          f"{config.router_aux_loss_coef:g}" if is_olmoe else
                          f"DeepSeek-V3 bias update rate {bias_update_rate:g} + sequence-wise balance loss "
                          f"coefficient {seq_aux_coef:g}"),
            "config_overrides": overrides,
        },
        "data": {
            "corpus": "bundled Wikipedia corpus (romer_kernels/assets/corpus, CC BY-SA 4.0)",
            "train_tokens": int(train_ids.numel()), "valid_tokens": int(valid_ids.numel()),
            "test_tokens": int(test_ids.numel()), "vocab_size": len(tokenizer),
            "epochs": steps_done * batch_size * seq_len / train_ids.numel(),
        },
        "wall_time_s": {"training": round(train_seconds, 1), "evaluation": round(eval_seconds, 1),
                        "total": round(time.perf_counter() - started, 1)},
        "final_train_loss": sum(tail) / len(tail),
        "final_train_loss_steps": len(tail),
        "eval": {
            "seq_len": eval_seq_len, "batch_size": eval_batch_size, "windows": "non-overlapping",
            "valid_perplexity": valid["perplexity"],
            "test_perplexity": test["perplexity"],
            "test_tokens_scored": test["tokens"],
            "test_unigram_perplexity": unigram,
            "test_lis": test.get("lis"),
            "test_load_cv": test.get("load_cv"),
            "test_load_entropy": test.get("load_entropy"),
            "test_router_entropy": test.get("router_entropy"),
            "test_top_k_mass": test.get("top_k_mass"),
            "untrained_test_perplexity": untrained["perplexity"],
            "untrained_test_lis": untrained.get("lis"),
            "untrained_router_entropy": untrained.get("router_entropy"),
            "untrained_top_k_mass": untrained.get("top_k_mass"),
        },
        "progress": evals,
        "expert_top_tokens_first_moe_layer": top_tokens,
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": _version("transformers"), "tokenizers": _version("tokenizers")},
    }
    if out_dir is not None:
        save_checkpoint(model, tokenizer, summary, out_dir)
    summary["loss_history"] = history
    return summary


def _version(package: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    try:
        return version(package)
    except Exception:  # noqa: BLE001
        return "unknown"


def save_checkpoint(model: nn.Module, tokenizer, summary: dict, out_dir: str | Path) -> None:
    """model.safetensors + config + generation config + tokenizer + training.json + README.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(summary, model.config), encoding="utf-8")
    size = (out / "model.safetensors").stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        print(f"warning: {out / 'model.safetensors'} is {size} bytes, over the {MAX_CHECKPOINT_BYTES} budget",
              file=sys.stderr)


def _readme(s: dict, config) -> str:
    h, e = s["hyperparameters"], s["eval"]
    if s["arch"] == "tiny-olmoe":
        shape = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
                 f"every layer MoE: {config.num_experts} experts of width {config.intermediate_size}, "
                 f"top-{config.num_experts_per_tok} softmax routing (no renormalisation), no shared expert")
    else:
        shape = (f"{config.num_hidden_layers} layers (first {config.first_k_dense_replace} dense, width "
                 f"{config.intermediate_size}), hidden {config.hidden_size}, {config.num_attention_heads} heads of "
                 f"multi-head latent attention (kv rank {config.kv_lora_rank}); MoE layers: "
                 f"{config.n_routed_experts} routed experts of width {config.moe_intermediate_size}, "
                 f"top-{config.num_experts_per_tok} sigmoid routing with renormalisation, "
                 f"{config.n_shared_experts} shared expert")
    return f"""# {s['arch']}: a tiny {s['model_class']} trained on the bundled Wikipedia corpus

A small Mixture-of-Experts language model for offline tests and demonstrations of `romer_kernels`
(analog in-memory-computing simulation of MoE LLMs). It is **not** a useful language model: it has
{s['parameters'] / 1e6:.2f} M parameters and saw {s['data']['epochs']:.1f} epochs of a
{s['data']['train_tokens'] / 1e6:.2f} M-token corpus. Its routers
are trained, balanced and specialised, so routing statistics (load imbalance, flips under noise) behave
like those of a real MoE model.

- Architecture: {shape}. Vocabulary {s['data']['vocab_size']} (byte-level BPE trained on the train split).
- Load: `AutoModelForCausalLM.from_pretrained(this_folder)` and `AutoTokenizer.from_pretrained(this_folder)`, or
  `romer_kernels.models.load_tiny("{s['arch']}")`. Weights in fp32 safetensors.

## Training
`python -m romer_kernels.models.tiny --arch {s['arch']} --out DIR --steps {h['planned_steps']} --batch-size {h['batch_size']}
--seq-len {h['seq_len']} --lr {h['lr']:g} --warmup-steps {h['warmup_steps']} --seed {h['seed']} --threads {h['torch_threads']}{_budget_flag(h)}` (function `train_tiny`), CPU, fp32,
torch threads {h['torch_threads']}: {h['steps']} steps of {h['batch_size']} x {h['seq_len']} tokens, AdamW (betas {h['betas']},
weight decay {h['weight_decay']}), peak learning rate {h['lr']:g} with {h['warmup_steps']} warm-up steps and cosine
decay to {h['min_lr_ratio']:g} x, gradient clipping {h['grad_clip']}, seed {h['seed']}. Load balancing: {h['balancing']}.
{_budget_note(h)}
Training took {s['wall_time_s']['training'] / 60:.1f} min; final train loss {s['final_train_loss']:.3f}
(mean of the last {s['final_train_loss_steps']} steps).

## Results (clean, fp32; non-overlapping windows of {e['seq_len']} tokens, batches of {e['batch_size']})
| | perplexity |
|---|---|
| valid | {e['valid_perplexity']:.2f} |
| test | {e['test_perplexity']:.2f} |
| test, unigram baseline (add-one, train counts) | {e['test_unigram_perplexity']:.2f} |
| test, same model untrained | {e['untrained_test_perplexity']:.2f} |

Routing on the test split (per batch of {e['batch_size']} x {e['seq_len']} tokens, mean over batches and layers):
Load-Imbalance Score {e['test_lis']:.3f} (untrained {e['untrained_test_lis']:.3f}; 1 = perfectly balanced),
normalised router entropy per token {e['test_router_entropy']:.3f} (untrained {e['untrained_router_entropy']:.3f}),
probability mass of the chosen experts {e['test_top_k_mass']:.3f} (untrained {e['untrained_top_k_mass']:.3f}).
Details in `training.json`.

## Licence of the data
The training text is from English Wikipedia articles by Wikipedia contributors, licensed CC BY-SA 4.0
(see `romer_kernels/assets/corpus/LICENSE.md` for the source, the article list and the conversion).
"""


def _budget_flag(h: dict) -> str:
    return "" if h.get("time_budget_s") is None else f" --time-budget-min {h['time_budget_s'] / 60:g}"


def _budget_note(h: dict) -> str:
    if h.get("stopped_by") != "time budget":
        return ""
    return (f"The run was limited to {h['time_budget_s'] / 60:.0f} min of training (`--time-budget-min`): the cosine decay "
            f"followed the elapsed time and training ended after {h['steps']} of {h['planned_steps']} planned steps, "
            "so a rerun on another machine gives a different step count.")


def main(argv: list[str] | None = None) -> int:
    d = TRAIN_DEFAULTS
    parser = argparse.ArgumentParser(prog="python -m romer_kernels.models.tiny",
                                     description="Train a tiny MoE language model on the bundled Wikipedia corpus.")
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", type=Path, help="output folder (default: the bundled assets folder of --arch)")
    parser.add_argument("--steps", type=int, default=d["steps"])
    parser.add_argument("--seq-len", type=int, default=d["seq_len"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"])
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    parser.add_argument("--vocab-size", type=int, default=d["vocab_size"])
    parser.add_argument("--tokenizer", type=Path, help="folder of an existing tokenizer (default: train a new one)")
    parser.add_argument("--eval-every", type=int, default=d["eval_every"], help="0 disables the periodic valid eval")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is much faster "
                        "than 2 on a machine whose other core is busy)")
    parser.add_argument("--time-budget-min", type=float,
                        help="stop and anneal within this many minutes of training (not reproducible if it binds)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else model_dir(args.arch)
    summary = train_tiny(args.arch, out, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                         vocab_size=args.vocab_size, tokenizer=args.tokenizer, eval_every=args.eval_every,
                         progress=not args.no_progress,
                         time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min)
    e = summary["eval"]
    print(f"{args.arch}: {summary['parameters']} parameters, {summary['wall_time_s']['training']:.0f} s training, "
          f"final train loss {summary['final_train_loss']:.3f}; valid ppl {e['valid_perplexity']:.2f}, "
          f"test ppl {e['test_perplexity']:.2f} (unigram {e['test_unigram_perplexity']:.2f}), "
          f"test LIS {e['test_lis']:.3f}; saved to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

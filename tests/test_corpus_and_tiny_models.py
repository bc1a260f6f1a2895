"""The bundled Wikipedia corpus, tokenizer and tiny MoE models load offline and behave (fast: a few seconds)."""
from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import pytest
import torch

from romer_kernels.data.corpus import CORPUS_DIR, SPLITS, load_corpus, load_hf_dataset_text
from romer_kernels.evaluation.perplexity import perplexity, unigram_perplexity
from romer_kernels.models.tiny import (
    ARCHS,
    MAX_CHECKPOINT_BYTES,
    encode,
    load_tiny,
    model_dir,
    train_tiny,
)

# Measured on the bundled checkpoints: perplexity on the first 8 windows of 256 test tokens is 76.0
# (tiny-olmoe) and 88.4 (tiny-deepseek); the thresholds leave a wide margin for other BLAS paths.
PPL_SLICE_WINDOWS = 8
PPL_THRESHOLDS = {"tiny-olmoe": 120.0, "tiny-deepseek": 130.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_text() -> str:
    return load_corpus("test")


@pytest.fixture(scope="module", params=ARCHS)
def bundled(request):
    model, tokenizer = load_tiny(request.param)
    return request.param, model, tokenizer


# -- corpus --------------------------------------------------------------------------------------------
def test_corpus_splits_are_real_english_of_the_stated_size():
    sizes = {split: len(load_corpus(split)) for split in SPLITS}
    total = sum(sizes.values())
    assert 2_500_000 < total < 3_200_000
    for split, share in (("train", 0.9), ("valid", 0.05), ("test", 0.05)):
        assert abs(sizes[split] / total - share) < 0.03, (split, sizes)
    text = load_corpus("test")
    words = text.split()
    assert len(words) > 20_000
    lower = [w.lower().strip(".,;:()\"'") for w in words]
    assert lower.count("the") / len(lower) > 0.04          # English function words dominate
    assert lower.count("of") / len(lower) > 0.02
    assert any(c.isupper() for c in text) and any(c in text for c in ",.;()")
    for markup in ("[[", "]]", "{{", "}}", "<ref", "'''", "thumb|", "[http"):
        assert markup not in text, markup
    assert text.startswith("Anthropology\n")               # article blocks start with their title line
    articles = text.strip().split("\n\n")
    assert len(articles) == 6


def test_corpus_assets_are_small_and_licensed():
    files = [CORPUS_DIR / f"wiki.{s}.txt.xz" for s in SPLITS] + [CORPUS_DIR / "LICENSE.md"]
    assert sum(f.stat().st_size for f in files) <= 3_000_000
    licence = (CORPUS_DIR / "LICENSE.md").read_text(encoding="utf-8")
    for needle in ("CC BY-SA 4.0", "Wikipedia contributors", "enwiki-latest-pages-articles1.xml-p000000010p000030302",
                   "Anarchism", "wikitext"):
        assert needle in licence, needle


def test_load_corpus_from_a_path_and_errors(tmp_path: Path):
    plain = tmp_path / "text.txt"
    plain.write_text("Hello world.\n", encoding="utf-8")
    assert load_corpus(path=plain) == "Hello world.\n"
    packed = tmp_path / "text.txt.xz"
    packed.write_bytes(lzma.compress("Grüße\n".encode()))
    assert load_corpus(path=str(packed)) == "Grüße\n"
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(path=missing)
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus("dev")


def test_hf_dataset_loader_names_the_missing_package():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_hf_dataset_text("wikitext", "wikitext-2-raw-v1", "test")
    else:
        pytest.skip("datasets is installed; loading would need the network")


# -- tokenizer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_text(arch, test_text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir(arch), local_files_only=True)
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.unk_token == "<unk>" and tokenizer.pad_token == "<pad>"
    sample = test_text[:3000] + "\nÉtienne — naïve 10 °C, αὐτός; tabs\tand  double  spaces\n"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    assert 2.5 < len(sample) / len(ids) < 5.0                # a real subword vocabulary, not bytes
    assert encode(tokenizer, sample).tolist() == ids


# -- bundled models -------------------------------------------------------------------------------------------
def test_bundled_model_loads_offline_and_runs(bundled, test_text):
    from transformers import AutoModelForCausalLM

    arch, model, tokenizer = bundled
    folder = model_dir(arch)
    assert (folder / "model.safetensors").stat().st_size <= MAX_CHECKPOINT_BYTES
    again = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    expected = {"tiny-olmoe": "OlmoeForCausalLM", "tiny-deepseek": "DeepseekV3ForCausalLM"}[arch]
    assert type(again).__name__ == expected
    ids = tokenizer(test_text[:400], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :64]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        out = model.generate(ids[:, :16], max_new_tokens=8, do_sample=False)
    assert out.shape[1] == 24
    assert isinstance(tokenizer.decode(out[0, 16:]), str)


def test_bundled_model_perplexity_is_good(bundled, test_text):
    arch, model, tokenizer = bundled
    ids = encode(tokenizer, test_text)[: PPL_SLICE_WINDOWS * 256]
    ppl = perplexity(model, ids, seq_len=256, batch_size=PPL_SLICE_WINDOWS)
    assert ppl < PPL_THRESHOLDS[arch]
    train_ids = encode(tokenizer, load_corpus("train")[:500_000])
    assert ppl < 0.5 * unigram_perplexity(train_ids, ids, len(tokenizer), seq_len=256)


def test_training_record_is_complete(bundled):
    arch, _model, _tokenizer = bundled
    record = json.loads((model_dir(arch) / "training.json").read_text())
    e = record["eval"]
    assert e["test_perplexity"] < e["test_unigram_perplexity"]
    assert 1.0 <= e["test_lis"] < 4.0
    assert record["hyperparameters"]["steps"] > 0 and record["wall_time_s"]["training"] > 0
    assert (model_dir(arch) / "README.md").read_text().startswith(f"# {arch}")


def test_perplexity_rejects_too_short_text(bundled):
    _arch, model, _tokenizer = bundled
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, torch.arange(10), seq_len=256)


def test_unigram_perplexity_of_uniform_tokens():
    ids = torch.arange(8).repeat(100)
    assert math.isclose(unigram_perplexity(ids, ids, 8, smoothing=0.0), 8.0, rel_tol=1e-9)
    assert math.isclose(unigram_perplexity(ids, ids, 8, seq_len=16), 8.0, rel_tol=1e-9)


# -- training ------------------------------------------------------------------------------------------------
MICRO = {
    "tiny-olmoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "tiny-deepseek": dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                          kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_train_tiny_micro_decreases_loss(arch, tmp_path: Path, test_text):
    train = load_corpus("train")[:60_000]
    summary = train_tiny(arch, tmp_path, steps=40, seq_len=32, batch_size=4, lr=1e-2, seed=0, warmup_steps=4,
                         tokenizer=model_dir(arch), config_overrides=MICRO[arch], train_text=train,
                         valid_text=test_text[:8000], test_text=test_text[8000:16000], eval_seq_len=32,
                         eval_batch_size=4, eval_every=0, max_eval_windows=4, progress=False)
    losses = summary["loss_history"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert summary["eval"]["test_perplexity"] < summary["eval"]["untrained_test_perplexity"]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "training.json",
                 "README.md"):
        assert (tmp_path / name).is_file(), name

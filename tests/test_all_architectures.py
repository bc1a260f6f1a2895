"""Every MoE architecture of the installed transformers, discovered (not listed by hand), at tiny size.

For each: the ``ideal`` preset reproduces the digital logits; every weight matrix is analog, digital by
placement, an embedding lookup, or listed with its reason (nothing silently digital); a forward calls
every analog module and no unlisted weight enters a matrix product digitally (``check_conversion``;
modules whose weight the model reads directly are found, and keeping them digital by placement makes
the check pass); noisy output is finite, reproducible from the seed and differs between seeds; the
routing trace and its LIS work and do not change the output.

The default run checks every architecture (about 12 s for 61 on 2 cores); ``ROMER_ARCH_SAMPLE=N`` checks a
sample of N that rotates with the ISO week (``ROMER_ARCH_SEED`` fixes it). ``pytest -m all_archs``
checks every architecture and writes the support table docs/moe-support.md from the results.
"""
from __future__ import annotations

import datetime
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from romer_kernels.models.architectures import moe_architectures, tiny_model
from romer_kernels.moe.check import check_conversion
from romer_kernels.moe.convert import Placement, analogize_, placement_report, restore_digital_
from romer_kernels.moe.routing import trace_routing
from romer_kernels.moe.structure import moe_blocks
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.analog_weight import AnalogSlices, is_weight_analog
from romer_kernels.nn.model_helpers import program_analog_, reset_noise_counters

ARCHS = [arch.model_type for arch in moe_architectures()]
SAMPLE_SIZE = int(os.environ.get("ROMER_ARCH_SAMPLE", len(ARCHS)))
SEED = int(os.environ.get("ROMER_ARCH_SEED", datetime.date.today().isocalendar()[1]))
SAMPLE = sorted(random.Random(SEED).sample(ARCHS, min(SAMPLE_SIZE, len(ARCHS))))
TABLE = Path(__file__).resolve().parent.parent / "docs" / "moe-support.md"
REPORTS: dict[str, "Report"] = {}


@dataclass
class Report:
    arch: str
    model_class: str
    experts: str = ""
    router: str = ""
    status: str = ""
    notes: list[str] = field(default_factory=list)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _experts_layout(model) -> str:
    kinds = set()
    for module in model.modules():
        if isinstance(module, AnalogExperts):
            layout = module.layout
            parts = [type(module.digital_module).__name__ if module.digital_module is not None else "experts"]
            parts.append("gate_up" if layout.gated else "up (non-gated)")
            for flag, text in ((layout.transposed, "transposed"), (layout.bias, "biases"),
                               (layout.custom_gate, "own gate fn"), (layout.post_norm, "post-norm"),
                               (layout.all_tokens, "all-token blocks")):
                if flag:
                    parts.append(text)
            if layout.identity_experts:
                parts.append(f"{layout.identity_experts} identity experts")
            kinds.add(", ".join(parts))
        elif isinstance(getattr(module, "analog", None), AnalogSlices):
            slices = module.analog.slices
            kinds.add(f"{type(module).__name__.removeprefix('Analog')}, per-expert slices of "
                      + ", ".join(f"{a}{' (used transposed)' if t else ''}" for a, (_, _, _, t) in slices.items()))
    return "; ".join(sorted(kinds))


def _router_kind(model) -> str:
    modules = dict(model.named_modules())
    kinds = {f"{type(modules[b.router]).__name__.removeprefix('Analog')}" + ("" if b.router_rows == b.num_experts
                                                                           else f" ({b.router_rows} slots)")
             for b in moe_blocks(model) if b.router}
    return "; ".join(sorted(kinds)) or "none found"


def check_architecture(arch: str) -> Report:
    model = tiny_model(arch)
    report = Report(arch, type(model).__name__)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    digital = _logits(model, ids)
    lookups = sorted({name.split(".")[-1] for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Embedding) and ".layers." in name})
    # an MoE whose experts are embedding rows (product-key retrieval, Doge) has no experts module: it is
    # converted as what it computes (its linears), and its routing cannot be traced
    assert moe_blocks(model) or lookups, f"{arch}: no MoE layer at tiny size (give it a CONFIG_TWEAKS entry)"

    # ideal chip == digital model; nothing digital unlisted
    analogize_(model, "ideal", allow_digital=True)
    report.experts, report.router = _experts_layout(model), _router_kind(model)
    ideal = _logits(model, ids)
    scale = digital.abs().max().item()
    assert (ideal - digital).abs().max().item() <= 1e-5 * max(scale, 1.0), f"{arch}: ideal != digital"
    check = check_conversion(model, ids[:1])
    placement = Placement()
    if check.never_called:
        # the model reads these weights directly: found by the check; kept digital they are honest
        report.notes.append("weight read directly, kept digital: " + ", ".join(
            sorted({n.split(".")[-1] for n in check.never_called})))
        restore_digital_(model)
        placement = Placement(digital=tuple(check.never_called))
        analogize_(model, "ideal", placement, allow_digital=True)
        check = check_conversion(model, ids[:1])
    assert not check.never_called, f"{arch}: {check.never_called}"
    rows = placement_report(model)
    prefix = "digital (unsupported: "
    unsupported = sorted({row.kind[len(prefix):-1] for row in rows if row.unsupported})
    in_products = set(check.digital_products)
    tensors = set(model.romer_conversion["digital_tensors"])
    assert in_products <= tensors, f"{arch}: weights computed digitally, listed nowhere: {sorted(in_products - tensors)}"
    listed = set()  # every parameter a report row stands for (a tied weight is listed once)
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters(remove_duplicate=False))
    for row in rows:
        if row.module in modules:
            listed.update(id(p) for p in modules[row.module].parameters(recurse=False))
        else:
            listed.add(id(parameters[row.module]))
    for name, parameter in model.named_parameters():
        assert parameter.dim() < 2 or id(parameter) in listed, f"{arch}: {name} is in no report row"
    # every analog module computes; a noisy chip is finite, reproducible and seed-dependent
    restore_digital_(model)
    analogize_(model, "rasch2023", placement, allow_digital=True)
    program_analog_(model, seed=3)
    noisy = _logits(model, ids)
    assert torch.isfinite(noisy).all(), f"{arch}: noisy output not finite"
    reset_noise_counters(model)
    assert torch.equal(_logits(model, ids), noisy), f"{arch}: same seed, other output"
    program_analog_(model, seed=4)
    reset_noise_counters(model)
    assert not torch.equal(_logits(model, ids), noisy), f"{arch}: seed does not change the chip"
    # routing trace: works, does not change the output
    lis = None
    if moe_blocks(model):
        reset_noise_counters(model)
        with trace_routing(model) as trace:
            traced = _logits(model, ids)
        reset_noise_counters(model)
        assert torch.equal(traced, _logits(model, ids)), f"{arch}: tracing changed the output"
        lis = trace.lis()
        assert lis >= 1.0 - 1e-9, f"{arch}: LIS {lis} < 1"
    else:
        with pytest.raises(ValueError, match="no MoE router to trace"):
            with trace_routing(model):
                pass
        unsupported.append(f"experts are embedding lookups ({', '.join(lookups)}), no MVM; routing not traced")
    analog = sum(isinstance(m, AnalogExperts) or is_weight_analog(m) or type(m).__name__ == "AnalogLinear"
                 for m in model.modules())
    report.status = "analog" if not unsupported else "analog; digital: " + "; ".join(unsupported)
    report.notes.insert(0, f"{analog} analog modules" + (f", LIS {lis:.2f}" if lis is not None else ""))
    return report


def _run(arch: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        REPORTS[arch] = check_architecture(arch)


def test_discovery_finds_the_known_architectures():
    assert len(ARCHS) >= 40
    for known in ("olmoe", "qwen2_moe", "deepseek_v3", "mixtral", "gpt_oss", "llama4_text", "jamba"):
        assert known in ARCHS


@pytest.mark.parametrize("arch", SAMPLE)
def test_architecture_sample(arch):
    _run(arch)


@pytest.mark.all_archs
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch):
    _run(arch)


@pytest.mark.all_archs
def test_write_support_table():
    """Runs after every test_architecture (file order): writes the table when every architecture passed."""
    missing = sorted(set(ARCHS) - set(REPORTS))
    assert not missing, f"architectures without a passing check: {missing}"
    import transformers  # noqa: PLC0415

    lines = ["# MoE architectures supported", "",
             f"Generated by `pytest -m all_archs tests/test_all_architectures.py` with transformers "
             f"{transformers.__version__}: every MoE causal-LM architecture it registers, at tiny size (hidden 64, "
             "2 layers, 8 experts, top-2). Each row passed: ideal chip == digital logits, every weight matrix "
             "analog or listed, every analog module called, noisy output finite and reproducible, routing trace "
             "and LIS. `digital:` lists what stays digital (opt-in `allow_digital`) and why.", "",
             "| architecture | model class | experts layout | router | status | notes |",
             "|---|---|---|---|---|---|"]
    for arch in ARCHS:
        r = REPORTS[arch]
        lines.append(f"| {r.arch} | {r.model_class} | {r.experts} | {r.router} | {r.status} | {'; '.join(r.notes)} |")
    TABLE.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dense_models_convert_fully(arch):
    """GPT-2 (Conv1D layers: weight [in, out], addmm) and Llama convert with nothing left digital."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    model.eval()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    digital = _logits(model, ids)
    analogize_(model, "ideal")  # no allow_digital: nothing may be left
    assert (_logits(model, ids) - digital).abs().max().item() < 1e-5
    assert not any(row.unsupported for row in placement_report(model))
    assert check_conversion(model, ids[:1]).ok
    analog = [row for row in placement_report(model) if row.kind == "analog"]
    assert len(analog) == (4 * 2 if arch == "gpt2" else 7 * 2)  # GPT-2: c_attn, c_proj, c_fc, mlp.c_proj per layer
    restore_digital_(model)
    analogize_(model, "rasch2023")
    program_analog_(model, seed=1)
    noisy = _logits(model, ids)
    assert torch.isfinite(noisy).all() and not torch.equal(noisy, digital)


@pytest.mark.parametrize("arch,placement", [("gpt_oss", Placement()), ("dbrx", Placement()),
                                            ("hunyuan_v1_moe", Placement()),
                                            ("qwen3_next", Placement(allow_digital=("*.conv1d.weight",)))])
def test_noise_sweep_runs_on_other_layouts(arch, placement, tmp_path):
    """A Monte Carlo sweep (one model re-programmed in place per trial) on layouts beyond the standard:
    no noise reproduces the clean routing, noise moves it, and a resumed sweep stores nothing new."""
    from romer_kernels.config.presets import preset  # noqa: PLC0415
    from romer_kernels.evaluation.sweep import SweepSettings, noise_sweep  # noqa: PLC0415

    model = tiny_model(arch)
    ids = torch.randint(3, 128, (400,), generator=torch.Generator().manual_seed(1))
    settings = SweepSettings(config=preset("gaussian-chip"), placement=placement, seeds=(0, 1),
                             noise_scales=(0.0, 4.0), times=(0.0,), seq_len=32, batch_size=4, max_windows=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = noise_sweep(model, ids, settings, tmp_path, arch, "random", progress=False)
        table = {row["noise_scale"]: row for row in result.table()}
        assert table[0.0]["flip_rate"][0] == 0.0
        assert table[0.0]["ppl"][0] == pytest.approx(result.clean.perplexity, rel=1e-4)
        assert table[4.0]["flip_rate"][0] > 0.0
        assert noise_sweep(model, ids, settings, tmp_path, arch, "random", progress=False).trials_run == 0


def test_romer_on_a_router_with_a_scoring_child():
    """ROMER's logit recalibration on HunYuan (gate.wg) and Gemma-4 (router.proj after a norm): the chip's
    own input and output are the noisy/clean logit pair; the map changes the noisy model's logits."""
    from romer_kernels.methods.romer import RomerConfig, romer_  # noqa: PLC0415

    for arch in ("hunyuan_v1_moe", "gemma4_text"):
        model = tiny_model(arch)
        ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(2))
        analogize_(model, "rasch2023")
        program_analog_(model, seed=1)
        reset_noise_counters(model)
        before = _logits(model, ids[:2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            romer_(model, ids, RomerConfig(stages=("recalibrate",)))
        reset_noise_counters(model)
        after = _logits(model, ids[:2])
        assert torch.isfinite(after).all() and not torch.equal(after, before), arch
        modules = dict(model.named_modules())
        assert any(modules[b.router].analog.affine for b in moe_blocks(model)), arch

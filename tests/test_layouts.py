"""Layouts beyond the standard fused experts: each gives the same chip, bit for bit, as the standard
layout of the same weights (same layer ids, same seed), so the noise maths is the one the reference
tests check; and what the conversion refuses or cannot see is reported."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch import nn

from romer_kernels.models.architectures import moe_architectures, tiny_model
from romer_kernels.models.loading import ASSETS
from romer_kernels.moe.check import check_conversion
from romer_kernels.moe.convert import Placement, UnsupportedWeights, analogize_, placement_report, restore_digital_
from romer_kernels.moe.structure import moe_blocks
from romer_kernels.nn.analog_experts import AnalogExperts, ExpertsLayout, experts_layout
from romer_kernels.nn.analog_linear import AnalogLinear
from romer_kernels.nn.analog_weight import AnalogSlices, make_weight_analog
from romer_kernels.nn.model_helpers import program_analog_, reset_noise_counters

warnings.filterwarnings("ignore")
PRESET = "rasch2023"


def _routing(tokens: int, experts: int, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    return index, weights


def test_transposed_experts_are_the_standard_chip():
    """[E, in, out] weights (GPT-OSS, Aria, Llama 4) program the same chips as their [E, out, in] copy."""
    torch.manual_seed(0)
    E, H, I = 4, 24, 16
    gate_up, down = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    act = nn.SiLU()
    standard = AnalogExperts(nn.Parameter(gate_up), nn.Parameter(down), act, PRESET, name="x", seed=3)
    transposed = AnalogExperts(nn.Parameter(gate_up.transpose(1, 2).contiguous()),
                               nn.Parameter(down.transpose(1, 2).contiguous()), act, PRESET, name="x", seed=3,
                               layout=ExpertsLayout(transposed=True))
    standard.backend = transposed.backend = "reference"  # the fused C++ loop is the standard layout's only
    x = torch.randn(10, H)
    index, weights = _routing(10, E)
    assert torch.equal(standard(x, index, weights), transposed(x, index, weights))
    assert transposed.num_tiles == standard.num_tiles


def test_layouts_read_from_the_modules_and_ideal_equals_digital():
    """The layout of each experts module comes from its flags and shapes; with the ideal preset the analog
    experts compute what the module computes, for routing that includes zero-compute experts."""
    cases = {"gpt_oss": ExpertsLayout(transposed=True, bias=True, custom_gate=True),
             "nemotron_h": ExpertsLayout(gated=False),
             # its own forward: one route per row, then an RMSNorm with one scale per expert (transformers 5.25)
             "ergo": ExpertsLayout(gated=False, transposed=True, post_norm=True, post_norm_by_expert=True),
             "llama4_text": ExpertsLayout(transposed=True, all_tokens=True)}
    installed = {arch.model_type for arch in moe_architectures()}
    assert {"gpt_oss", "nemotron_h", "llama4_text"} <= installed
    for arch, expected in cases.items():
        if arch not in installed:  # an architecture newer than the installed transformers
            continue
        model = tiny_model(arch)
        block = moe_blocks(model)[0]
        experts = model.get_submodule(block.experts)
        assert experts_layout(experts) == expected, arch
        analog = AnalogExperts.from_experts(experts, "ideal", name=block.experts)
        torch.manual_seed(1)
        x = torch.randn(12, analog.hidden_dim)
        if expected.all_tokens:
            x = torch.randn(analog.num_experts * 3, analog.hidden_dim)
            with torch.no_grad():
                torch.testing.assert_close(analog(x), experts(x), rtol=1e-5, atol=1e-6)
            continue
        index, weights = _routing(12, analog.num_experts + expected.identity_experts)
        with torch.no_grad():
            torch.testing.assert_close(analog(x, index, weights), experts(x, index, weights), rtol=1e-5, atol=1e-6)


class _ZeroComputeExperts(nn.Module):
    """Experts with zero-compute slots E..E+Z-1 whose output is their input, as LongCat-Flash's experts
    module computed them before transformers 5.25 moved them into the MoE block."""

    def __init__(self, experts: int = 3, zero: int = 2, hidden: int = 16, inter: int = 8) -> None:
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = nn.Parameter(torch.randn(experts + zero, 2 * inter, hidden) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)
        self.act_fn = nn.SiLU()
        self.identity_expert = nn.Identity()

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for token in range(x.shape[0]):
            for expert, weight in zip(top_k_index[token].tolist(), top_k_weights[token]):
                if expert >= self.num_experts:
                    y = self.identity_expert(x[token])
                else:
                    gate, up = nn.functional.linear(x[token], self.gate_up_proj[expert]).chunk(2)
                    y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
                out[token] += weight * y
        return out


def test_zero_compute_experts_are_their_input():
    experts = _ZeroComputeExperts()
    assert experts_layout(experts) == ExpertsLayout(identity_experts=2)
    analog = AnalogExperts.from_experts(experts, "ideal", name="z")
    torch.manual_seed(1)
    x = torch.randn(12, 16)
    index, weights = _routing(12, 5)
    assert bool((index >= 3).any()) and bool((index < 3).any())
    with torch.no_grad():
        torch.testing.assert_close(analog(x, index, weights), experts(x, index, weights), rtol=1e-5, atol=1e-6)


def test_per_expert_post_norm_gets_the_expert_ids():
    """A post-expert norm with a scale per expert is called with each row's expert id: on the ideal chip
    the analog experts compute what a loop over experts computes."""
    class ScalePerExpert(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(3, 16) + 0.5)

        def forward(self, hidden, expert_ids):
            return hidden * self.weight[expert_ids]

    experts = _ZeroComputeExperts(zero=0)
    del experts.identity_expert
    experts.post_expert_norm = ScalePerExpert()
    layout = experts_layout(experts)
    assert layout.post_norm and layout.post_norm_by_expert
    analog = AnalogExperts.from_experts(experts, "ideal", name="n")
    x = torch.randn(10, 16)
    index, weights = _routing(10, 3)
    expected = torch.zeros(10, 16)
    for token in range(10):
        for expert, weight in zip(index[token].tolist(), weights[token]):
            gate, up = nn.functional.linear(x[token], experts.gate_up_proj[expert]).chunk(2)
            y = nn.functional.linear(nn.functional.silu(gate) * up, experts.down_proj[expert])
            expected[token] += weight * y * experts.post_expert_norm.weight[expert]
    with torch.no_grad():
        torch.testing.assert_close(analog(x, index, weights), expected, rtol=1e-5, atol=1e-6)


def test_experts_with_unknown_members_are_refused_by_name():
    """A parameter or weighted sub-module the analog experts would not compute with is refused, not dropped."""
    experts = _ZeroComputeExperts(zero=0)
    experts.expert_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="holds expert_scale"):
        experts_layout(experts)
    del experts.expert_scale
    experts.extra_norm = nn.LayerNorm(16)
    with pytest.raises(TypeError, match="holds extra_norm"):
        experts_layout(experts)


def test_separate_gate_and_up_weights_are_refused_by_name():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Parameter(torch.randn(1, 8, 4))
            self.up_proj = nn.Parameter(torch.randn(1, 8, 4))
            self.down_proj = nn.Parameter(torch.randn(1, 4, 8))
            self.act_fn = nn.SiLU()

    with pytest.raises(TypeError, match="Split: separate per-expert gate_proj and up_proj"):
        experts_layout(Split())


def test_conv1d_and_grouped_linear_are_the_linear_chip():
    """GPT-2's Conv1D (weight [in, out], addmm) and a grouped linear (row blocks applied with bmm) give the
    chips of AnalogLinear on the same [out, in] weights and layer ids."""
    from transformers.pytorch_utils import Conv1D  # noqa: PLC0415

    torch.manual_seed(0)
    conv = Conv1D(12, 20)  # nf=12 outputs, nx=20 inputs
    nn.init.normal_(conv.weight, std=0.2)
    nn.init.normal_(conv.bias, std=0.1)
    linear = nn.Linear(20, 12)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    reference = AnalogLinear.from_linear(linear, PRESET, seed=2, layer_id="c")
    reference.analog.backend = "reference"
    adapter = make_weight_analog(conv, PRESET, name="c", seed=2, transposed=True)
    adapter.matrix.backend = "reference"
    x = torch.randn(3, 5, 20)
    assert torch.equal(conv(x), reference(x))

    class Grouped(nn.Linear):  # DeepSeek-V4's grouped output projection
        n_groups = 2

        def forward(self, x):
            w = self.weight.view(self.n_groups, -1, x.shape[-1]).transpose(1, 2)
            return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)

    grouped = Grouped(16, 8, bias=False)
    blocks = [AnalogLinear(16, 4, bias=False, config=PRESET, seed=2, layer_id=f"g.{g}",
                           _weight=nn.Parameter(grouped.weight.detach()[4 * g:4 * (g + 1)].clone())) for g in range(2)]
    adapter = make_weight_analog(grouped, PRESET, name="g", seed=2, blocks=2)
    for matrix in adapter.matrices + [b.analog for b in blocks]:
        matrix.backend = "reference"
    x = torch.randn(6, 2, 16)
    expected = torch.stack([blocks[g](x[:, g]) for g in range(2)], dim=1)
    assert torch.equal(grouped(x), expected)


def test_sliced_expert_weights_found_by_a_forward():
    """DBRX keeps each expert's weights as row blocks of flat parameters, multiplied in its own forward:
    one forward shows how (w2 is used as x @ w2[e]), every expert gets its chips."""
    model = tiny_model("dbrx")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    analogize_(model, PRESET)
    adapters = [m.analog for m in model.modules() if isinstance(getattr(m, "analog", None), AnalogSlices)]
    assert len(adapters) == 2
    assert {a: s[3] for a, s in adapters[0].slices.items()} == {"w1": False, "v1": False, "w2": True}
    assert all(len(ms) == 8 for ms in adapters[0].matrices.values())
    program_analog_(model, seed=1)
    with torch.no_grad():
        first = model(ids, use_cache=False).logits
        reset_noise_counters(model)
        assert torch.equal(model(ids, use_cache=False).logits, first)
    assert check_conversion(model, ids).ok
    restore_digital_(model)
    assert not any(isinstance(getattr(m, "analog", None), AnalogSlices) for m in model.modules())


def test_router_with_a_scoring_child_is_converted_whole():
    """HunYuan's gate.wg, Gemma-4's router.proj: the router module carries the chip (the ROMER hook),
    its child linear stays as it is, and the category is router."""
    model = tiny_model("hunyuan_v1_moe")
    analogize_(model, PRESET, Placement(router=True))
    gate = model.get_submodule("model.layers.0.mlp.gate")
    assert type(gate.analog).__name__ == "AnalogRouter" and type(gate.wg) is nn.Linear
    rows = {row.module: row for row in placement_report(model)}
    assert rows["model.layers.0.mlp.gate"].category == "router" and rows["model.layers.0.mlp.gate"].kind == "analog"
    restore_digital_(model)
    analogize_(model, PRESET, Placement(router=False))
    assert not hasattr(model.get_submodule("model.layers.0.mlp.gate"), "analog")


def test_weights_read_directly_are_found(tmp_path):
    """Jamba's mamba mixer multiplies dt_proj.weight itself: the check finds the never-called module, the
    report says so, and keeping it digital by placement makes the check pass."""
    model = tiny_model("jamba")
    with pytest.raises(UnsupportedWeights, match="depthwise convolutions"):
        analogize_(model, PRESET)
    analogize_(model, PRESET, allow_digital=("*.conv1d.weight",))
    check = check_conversion(model)
    assert check.never_called == ["model.layers.0.mamba.dt_proj", "model.layers.1.mamba.dt_proj"]
    rows = {row.module: row for row in placement_report(model)}
    assert rows["model.layers.0.mamba.dt_proj"].kind.startswith("digital in effect")
    restore_digital_(model)
    analogize_(model, PRESET, Placement(digital=("*.dt_proj",), allow_digital=("*.conv1d.weight",)))
    assert check_conversion(model).ok


def test_cli_refuses_unsupported_weights_and_allows_them_on_request(tmp_path, capsys):
    from romer_kernels.cli.main import main  # noqa: PLC0415

    model = tiny_model("qwen3_next")
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ASSETS / "tiny-olmoe" / name).is_file():
            shutil.copy(ASSETS / "tiny-olmoe" / name, tmp_path / name)
    assert main(["info", "--model", str(tmp_path)]) != 0
    err = capsys.readouterr()
    assert "cannot be put on crossbars" in err.out + err.err and "--allow-digital" in err.out + err.err
    assert main(["info", "--model", str(tmp_path), "--allow-digital", "*.conv1d.weight"]) == 0
    out = capsys.readouterr().out
    assert "digital (unsupported: Conv1d: depthwise convolutions are not supported)" in out
    assert "checked by one forward" in out

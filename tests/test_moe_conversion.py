"""analogize_ on tiny random models of every supported architecture: equivalence, noise, generate, tracing,
save/load, placement overrides."""
from types import SimpleNamespace

import pytest
import torch
from moe_models import BUILDERS, LegacyMoEModel, build
from torch import nn
import torch.nn.functional as F

from romer_kernels import AnalogLinear, preset, program_analog_, reset_noise_counters
from romer_kernels.evaluation import relative_error
from romer_kernels.moe import Placement, analogize_, load_analog, placement_report, save_analog, trace_routing
from romer_kernels.moe.check import check_conversion
from romer_kernels.moe.convert import UnsupportedWeights
from romer_kernels.nn.analog_experts import AnalogExperts
from romer_kernels.nn.base import AnalogModule

ARCHS = list(BUILDERS)


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_ideal_conversion_keeps_logits_and_generate_works(arch):
    model = build(arch)
    ids = _ids(1)
    reference = model(ids).logits
    analogize_(model, "ideal")
    assert any(isinstance(m, AnalogExperts) for m in model.modules())
    assert relative_error(model(ids).logits, reference) <= 1e-5
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_noisy_conversion_changes_logits_reproducibly(arch):
    ids = _ids(2)
    outputs = []
    for _ in range(2):
        model = build(arch)
        reference = model(ids).logits
        analogize_(model, preset("rasch2023"), seed=3)
        outputs.append(model(ids).logits)
        assert torch.isfinite(outputs[-1]).all()
        assert relative_error(outputs[-1], reference) > 1e-4
    assert torch.equal(outputs[0], outputs[1])  # same seed, same chip, same per-MVM noise


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_tracing_does_not_change_outputs(arch):
    model = analogize_(build(arch), "aihwkit-default", seed=1)
    ids = _ids(3)
    plain = model(ids).logits
    reset_noise_counters(model)
    with trace_routing(model) as trace:
        traced = model(ids).logits
    assert torch.equal(plain, traced)
    assert trace.layers and all(layer.top_k_index.shape == (ids.numel(), 2) for layer in trace.layers.values())
    assert trace.lis() >= 1.0


@torch.no_grad()
@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3", "qwen2_moe"])
def test_save_and_load_restore_the_same_chip(arch, tmp_path):
    model = analogize_(build(arch), "aihwkit-default", seed=7)
    program_analog_(model, 7)
    for module in model.modules():
        if isinstance(module, AnalogModule):
            module.drift_(3600.0)
    ids = _ids(4)
    reset_noise_counters(model)
    expected = model(ids).logits
    save_analog(model, tmp_path / "chip")
    loaded = load_analog(tmp_path / "chip")
    reset_noise_counters(loaded)
    assert torch.equal(loaded(ids).logits, expected)
    # the digital checkpoint is a plain transformers checkpoint
    plain = type(model).from_pretrained(tmp_path / "chip")
    assert not any(isinstance(m, AnalogModule) for m in plain.modules())


@torch.no_grad()
def test_transformers4_layout_with_linear_experts_and_linear_router():
    model = LegacyMoEModel()
    ids = _ids(5)
    reference = model(ids)
    placement = Placement(digital_experts={"layers.0.mlp.experts": (1,)})
    analogize_(model, "ideal", placement)
    assert relative_error(model(ids), reference) <= 1e-5
    assert isinstance(model.layers[0]["mlp"].experts[0].gate_proj, AnalogLinear)
    assert isinstance(model.layers[0]["mlp"].experts[1].gate_proj, nn.Linear)
    assert isinstance(model.layers[0]["mlp"].gate, AnalogLinear)
    with trace_routing(model) as trace:
        model(ids)
    assert list(trace.layers) == ["layers.0.mlp.gate", "layers.1.mlp.gate"]


def test_placement_categories_and_overrides():
    model = build("qwen2_moe")
    placement = Placement(attention=False, digital=("model.layers.1.*",),
                          digital_experts={"model.layers.0.mlp.experts": (0, 3)})
    analogize_(model, "rasch2023", placement)
    rows = {row.module: row for row in placement_report(model)}
    assert rows["model.layers.0.self_attn.q_proj"].kind == "digital"
    assert rows["model.layers.0.mlp.gate"].kind == "analog"
    assert rows["model.layers.0.mlp.experts"].kind.startswith("analog (2 experts digital)")
    assert rows["model.layers.0.mlp.shared_expert.up_proj"].kind == "analog"
    assert rows["model.layers.1.mlp.experts"].kind == "digital"
    assert rows["lm_head"].kind == "digital"
    assert rows["model.layers.0.mlp.experts"].tiles == 2 * 6  # six analog experts, two matrices, one tile each


def test_conversion_errors_are_clear():
    with pytest.raises(ValueError, match="unknown module"):
        analogize_(build("olmoe"), "ideal", Placement(digital_experts={"model.nope": (1,)}))
    with pytest.raises(ValueError, match="nothing in"):
        analogize_(build("olmoe"), "ideal", Placement.all_digital_except())
    model = analogize_(build("olmoe"), "ideal")
    with pytest.raises(ValueError, match="already analog"):
        analogize_(model, "ideal")
    with pytest.raises(ValueError, match="unknown module categories"):
        Placement.all_digital_except("experts", "mlp")
    with pytest.raises(ValueError, match="Placement.attention"):
        Placement(attention="yes")
    with pytest.raises(ValueError, match="romer_conversion"):
        save_analog(nn.Linear(2, 2), "/tmp/unused")
    with pytest.raises(FileNotFoundError, match="save_analog"):
        load_analog("/nonexistent/dir")


@torch.no_grad()
def test_expert_noise_does_not_depend_on_other_tokens_routing():
    model = build("olmoe")
    experts = AnalogExperts.from_experts(model.model.layers[0].mlp.experts, "aihwkit-default", name="e")
    hidden = torch.randn(6, 64)
    index = torch.tensor([[0, 1], [2, 3], [0, 4], [5, 6], [7, 1], [2, 0]])
    weights = torch.rand(6, 2)
    full = experts(hidden, index, weights)
    experts.reset_noise_counter()
    changed = index.clone()
    changed[1] = torch.tensor([4, 5])  # token 1 now visits other experts; token 0 must not notice
    again = experts(hidden, changed, weights)
    torch.testing.assert_close(again[0], full[0], rtol=1e-5, atol=1e-5)


def test_top_level_api_names():
    import romer_kernels

    for name in romer_kernels.__all__:
        assert getattr(romer_kernels, name) is not None
    assert romer_kernels.analogize_ is analogize_
    with pytest.raises(AttributeError, match="no attribute"):
        romer_kernels.not_a_name  # noqa: B018


def test_the_report_lists_every_weight_matrix_none_silently_digital():
    class RawProjection(nn.Module):  # a weight used through einsum: the conversion cannot intercept its MVM
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.einsum("bti,io->bto", x, self.kernel)

    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), RawProjection())
    model.config = SimpleNamespace(vocab_size=10)  # a language model: the conversion's probe forward runs
    with pytest.raises(UnsupportedWeights, match="RawProjection.kernel: multiplied as other"):
        analogize_(model, "ideal")  # the probe forward saw the einsum
    analogize_(model, "ideal", allow_digital=True)
    rows = {row.module: row for row in placement_report(model)}
    assert rows["0"].kind == "digital (lookup, no MVM)" and rows["0"].category == "embeddings"
    assert rows["1"].kind == "analog"
    assert rows["2.kernel"].unsupported and "multiplied as other, which the package does not intercept" in rows["2.kernel"].kind
    reported = sum(row.parameters for row in rows.values())
    assert reported == sum(p.numel() for p in model.parameters() if p.dim() >= 2) + model[1].bias.numel()


def test_unknown_weight_matrices_raise_unless_allowed_and_then_are_listed():
    class Mystery(nn.Module):  # a 2-D weight used in a way the conversion does not know
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.einsum("bi,oi->bo", x, self.weight)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), Mystery(), nn.Conv1d(8, 8, 1))

    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedWeights, match=r"2 weight matrices of Sequential.*1\.weight \(Mystery\.weight.*"
                       r"2\.weight \(Conv1d: convolutions are not supported\).*allow_digital") as error:
        analogize_(model, "ideal")
    assert set(error.value.weights) == {"1.weight", "2.weight"}
    assert not any(isinstance(m, AnalogLinear) for m in model.modules())  # refused before anything changed
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedWeights, match="1 weight matrices"):
        analogize_(build(), "ideal", allow_digital=("2.*",))
    model = analogize_(build(), "ideal", allow_digital=("1.weight", "2.*"))
    rows = {row.module: row for row in placement_report(model)}
    assert rows["0"].kind == "analog" and rows["1.weight"].unsupported and rows["2.weight"].unsupported
    with pytest.raises(ValueError, match="allow_digital must be"):
        analogize_(build(), "ideal", allow_digital="2.*")


def test_tensors_multiplied_like_linear_weights_go_analog_and_the_check_sees_the_rest():
    class Mix(nn.Module):  # F.linear with a 2-D parameter that is not called weight (hyper-connections)
        def __init__(self):
            super().__init__()
            self.fn = nn.Parameter(torch.randn(8, 8) * 0.3)

        def forward(self, x):
            return F.linear(x, self.fn)

    class Proj(nn.Module):  # x @ p, p stored [in, out]
        def __init__(self):
            super().__init__()
            self.proj = nn.Parameter(torch.randn(8, 8) * 0.3)
            self.scale = nn.Parameter(torch.ones(2, 8))  # elementwise: no product, stays digital, listed

        def forward(self, x):
            return (x @ self.proj) * self.scale[0]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), Mix(), Proj())
    model.config = SimpleNamespace(vocab_size=10)
    ids = torch.tensor([[1, 2, 3]])
    reference = model(ids)
    analogize_(model, "ideal")
    assert torch.allclose(model(ids), reference, atol=1e-6)
    rows = {row.module: row for row in placement_report(model)}
    assert rows["1"].kind == "analog" and rows["2"].kind == "analog" and rows["2"].tiles == 1
    assert rows["2.scale"].kind == "digital (tensor outside a linear layer: Proj.scale)"
    assert check_conversion(model, ids).ok

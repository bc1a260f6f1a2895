"""Retraining-free methods on tiny random models, with planted known answers."""
import pytest
import torch
from moe_models import build

from romer_kernels.methods import digital_fraction, digital_placement, expert_scores, max_nn_scores, top_experts
from romer_kernels.moe import Placement, analogize_, placement_report
from romer_kernels.nn.analog_experts import AnalogExperts

E = 8


def _ids(seed=0, shape=(4, 16)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


# -- heterogeneous placement -------------------------------------------------------------------------
def test_max_nn_score_by_hand():
    model = build("olmoe")
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    inter = down.shape[2]
    scores = max_nn_scores(model)["model.layers.0.mlp.experts"]
    rows = max_nn_scores(model, convention="rows")["model.layers.0.mlp.experts"]
    for e in (0, 5):
        g = max(gate_up[e, j].norm() for j in range(inter))
        u = max(gate_up[e, inter + j].norm() for j in range(inter))
        d_col = max(down[e, :, j].norm() for j in range(inter))
        d_row = max(down[e, i, :].norm() for i in range(down.shape[1]))
        assert float(scores[e]) == pytest.approx(float(g * u * d_col), rel=1e-5)
        assert float(rows[e]) == pytest.approx(float(g * u * d_row), rel=1e-5)
    with pytest.raises(ValueError, match="convention"):
        max_nn_scores(model, convention="cols")


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_max_nn_ranks_planted_large_norm_experts_first(arch):
    model = build(arch)
    planted = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            ids = (1 + i, 6 - i)
            for e in ids:  # one large neuron in each matrix
                experts.gate_up_proj[e, 3] *= 4
                experts.gate_up_proj[e, experts.down_proj.shape[2] + 5] *= 4
                experts.down_proj[e, :, 7] *= 4
            planted[f"model.layers.{i}.mlp.experts"] = ids
    scores = max_nn_scores(model)
    assert set(scores) == set(planted)
    for name, ids in planted.items():
        ranked = torch.argsort(scores[name], descending=True)[:2].tolist()
        assert sorted(ranked) == sorted(ids)
        assert top_experts(scores[name], 0.25) == tuple(sorted(ids))
    placement = digital_placement(model, fraction=0.25)
    assert placement.digital_experts == {k: tuple(sorted(v)) for k, v in planted.items()}
    assert not (placement.attention or placement.shared_experts or placement.lm_head or placement.dense_mlp)
    assert placement.router and placement.experts
    analogize_(model, "gaussian-chip", placement)
    for name, ids in planted.items():
        module = model.get_submodule(name)
        assert isinstance(module, AnalogExperts) and module.digital_experts == frozenset(ids)
    kinds = {row.category: row.kind for row in placement_report(model)}
    assert kinds["attention"] == "digital"
    assert 0.25 < digital_fraction(model) < 1.0
    model(_ids())  # runs


def test_baseline_scores_same_budget():
    model = build("qwen2_moe")
    calib = _ids(3)
    names = {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    for score in ("maxnn", "frequency", "weight", "router_norm", "random"):
        placement = digital_placement(model, 0.125, score, calib_ids=calib, seed=1)
        assert set(placement.digital_experts) == names
        assert all(len(ids) == 1 for ids in placement.digital_experts.values())
    freq = expert_scores(model, "frequency", calib_ids=calib)
    for values in freq.values():
        assert float(values.sum()) == pytest.approx(1.0)
    router = model.model.layers[0].mlp.gate.weight.detach()
    assert torch.allclose(expert_scores(model, "router_norm")["model.layers.0.mlp.experts"], router.norm(dim=1))
    assert torch.equal(expert_scores(model, "random", seed=4)["model.layers.1.mlp.experts"],
                       expert_scores(model, "random", seed=4)["model.layers.1.mlp.experts"])
    with pytest.raises(ValueError, match="calibration"):
        expert_scores(model, "frequency")
    with pytest.raises(ValueError, match="unknown score"):
        expert_scores(model, "norm")
    # scores given directly; base placement kept
    scores = {"model.layers.0.mlp.experts": torch.arange(8.0)}
    placement = digital_placement(scores, 0.25, base=Placement(digital=("model.layers.1.*",)))
    assert placement.digital_experts == {"model.layers.0.mlp.experts": (6, 7)}
    assert placement.digital == ("model.layers.1.*",)
    assert top_experts(torch.ones(60), 0.125) == tuple(range(8))  # 7.5 rounds up, ties by id

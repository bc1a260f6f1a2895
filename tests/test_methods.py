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


# -- ROMER ---------------------------------------------------------------------------------------------
from romer_kernels.methods.romer import (  # noqa: E402
    ReplicaDispatch,
    RomerConfig,
    apply_replacement_,
    calibration_pass,
    fit_affine,
    moe_layers,
    percentiles,
    plan_replacement,
    recalibrate_router_,
    replace_experts_,
    romer_,
)
from romer_kernels.moe import flip_rate, trace_routing  # noqa: E402


def _plant_logit_distortion(model, scale=None, shift=None):
    """Distort every analog router's raw logits per expert (as if the ADC output were off)."""
    for layer in moe_layers(model):
        matrix = layer.router.analog.matrix
        original = matrix.matmul
        a = scale(layer.num_experts) if scale else torch.ones(layer.num_experts)
        b = shift(layer.num_experts) if shift else torch.zeros(layer.num_experts)
        matrix.matmul = lambda x, w, *args, _f=original, _a=a, _b=b, **kw: _f(x, w, *args, **kw) * _a + _b


def _routing(model, ids):
    with torch.no_grad(), trace_routing(model) as trace:
        model(ids)
    return {name: layer.top_k_index for name, layer in trace.layers.items()}


def _flips(model, clean, ids):
    noisy, reference = _routing(model, ids), _routing(clean, ids)
    return max(flip_rate(noisy[n], reference[n]) for n in noisy)


def test_percentiles_and_affine_fit_by_hand():
    x = torch.arange(11.0)[:, None].repeat(1, 2)
    x[:, 1] *= 2
    q = percentiles(x, (5.0, 50.0, 95.0))
    assert torch.allclose(q[:, 0].float(), torch.tensor([0.5, 5.0, 9.5]))
    assert torch.allclose(q[:, 1].float(), torch.tensor([1.0, 10.0, 19.0]))
    scale, shift = fit_affine(q, 3 * q - 1)
    assert torch.allclose(scale, torch.tensor([3.0, 3.0])) and torch.allclose(shift, torch.tensor([-1.0, -1.0]))
    scale, shift = fit_affine(torch.ones(3, 1), torch.full((3, 1), 4.0))  # no spread: pure shift
    assert float(scale) == 1.0 and float(shift) == pytest.approx(3.0)
    assert float(fit_affine(q, -q)[0][0]) == pytest.approx(1e-3)  # clamped to min_scale


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v3"])
def test_recalibration_undoes_planted_affine_distortion(arch):
    clean, model = build(arch), build(arch)
    analogize_(model, "ideal")
    gen = torch.Generator().manual_seed(5)
    _plant_logit_distortion(model, scale=lambda n: 0.4 + 1.6 * torch.rand(n, generator=gen),
                            shift=lambda n: torch.randn(n, generator=gen))
    ids, held_out = _ids(1, (8, 16)), _ids(2, (4, 16))
    assert _flips(model, clean, held_out) > 0.2
    maps = recalibrate_router_(model, ids)
    assert set(maps) == {layer.router_name for layer in moe_layers(model)}
    assert _flips(model, clean, held_out) <= 0.02
    assert _flips(model, clean, ids) <= 0.02
    assert all(layer.router.analog.affine for layer in moe_layers(model))


def test_self_recalibration_equalises_expert_percentiles():
    model = build("olmoe")
    analogize_(model, "ideal")
    gen = torch.Generator().manual_seed(6)
    _plant_logit_distortion(model, shift=lambda n: 2 * torch.randn(n, generator=gen))
    ids = _ids(1, (8, 16))
    config = RomerConfig(reference="self", stages=("recalibrate",))
    before = calibration_pass(model, ids, logits=True, raw=False)
    recalibrate_router_(model, ids, config)
    after = calibration_pass(model, ids, logits=True, raw=False)
    q = lambda s: percentiles(torch.cat(s.noisy), (5.0, 50.0, 95.0))  # noqa: E731  [P, E]
    first, *later = before
    # least squares over the three percentiles: each expert's mean percentile lands exactly on the target
    assert q(after[first]).mean(0).std() < 1e-4 * q(before[first]).mean(0).std()
    for name in [first] + later:  # later layers see hidden states changed by the earlier maps (one-pass fit)
        assert q(after[name]).std(dim=1).max() < 0.5 * q(before[name]).std(dim=1).max()
    recalibrate_router_(model, ids, RomerConfig(reference="standardize"))
    medians = percentiles(torch.cat(calibration_pass(model, ids, logits=True, raw=False)[name].noisy), (50.0,))
    assert medians.abs().max() < 0.05  # standardised logits are centred on their median


def test_plan_replacement_by_hand():
    f = torch.tensor([0.30, 0.001, 0.20, 0.0, 0.15, 0.15, 0.10, 0.099])
    assert plan_replacement(f) == {3: 0}                                  # cap floor(0.125 * 8) = 1
    assert plan_replacement(f, max_replaced_fraction=0.25) == {3: 0, 1: 2}
    assert plan_replacement(f, max_replaced_fraction=0.25, num_donors=1) == {3: 0, 1: 0}
    assert plan_replacement(f, tau_under=0.0) == {}
    assert plan_replacement(f, max_replaced_fraction=0.25, excluded={3}) == {1: 0}


def test_replica_dispatch_by_hand():
    index = torch.tensor([[0, 1], [1, 2], [1, 3], [3, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.8, 0.2]])
    dispatch = ReplicaDispatch(4, copies={1: [3]}, dead={3}, mode="average")
    new_index, new_weights = dispatch(index, weights)
    assert new_index.tolist() == [[0, -1, 1, 3], [1, 3, 2, -1], [1, 3, -1, -1], [-1, -1, 1, 3]]
    assert torch.allclose(new_weights[0], torch.tensor([0.6, 0.0, 0.2, 0.2]))
    assert torch.allclose(new_weights[3], torch.tensor([0.0, 0.0, 0.1, 0.1]))
    assert dispatch.physical_counts(index).tolist() == [1, 4, 1, 4]
    split = ReplicaDispatch(4, copies={1: [3]}, dead={3}, mode="split")
    new_index, new_weights = split(index, weights)
    assert new_index.tolist() == [[0, 1], [3, 2], [1, -1], [-1, 3]]
    assert torch.equal(new_weights, weights)
    assert split.physical_counts(index).tolist() == [1, 2, 1, 2]


def test_replacement_replaces_planted_cold_experts():
    model = build("qwen2_moe")
    analogize_(model, "gaussian-chip", seed=3)
    cold = {"model.layers.0.mlp": (2, 5), "model.layers.1.mlp": (0, 6)}
    for layer in moe_layers(model):
        mask = torch.zeros(layer.num_experts)
        mask[list(cold[layer.router_name.rpartition(".")[0]])] = -10.0
        matrix = layer.router.analog.matrix
        matrix.matmul = lambda x, w, *a, _f=matrix.matmul, _m=mask, **k: _f(x, w, *a, **k) + _m
    ids = _ids(1, (8, 16))
    before = calibration_pass(model, ids, raw=False)
    chips_before = {}
    for layer in moe_layers(model):
        chips_before[layer.experts_name] = [layer.experts.expert_weights(e)[0].clone() for e in range(E)]
    config = RomerConfig(stages=("replace",), max_replaced_fraction=0.25, mode="split")
    replacements = replace_experts_(model, ids, config)
    for rep, layer in zip(replacements, moe_layers(model)):
        planted = cold[layer.router_name.rpartition(".")[0]]
        assert sorted(rep.replaced) == sorted(planted)
        freq = before[layer.router_name].frequency
        hottest = sorted(range(E), key=lambda e: -float(freq[e]))[:2]
        assert sorted(rep.replaced.values()) == sorted(hottest)
        experts = layer.experts
        for slot, donor in rep.replaced.items():
            # the slot computes with the donor's rows (views, no copy); the model's own weights are untouched
            gate_up, down = experts.expert_params(slot)
            assert gate_up.data_ptr() == experts.gate_up_proj[donor].data_ptr()
            assert down.data_ptr() == experts.down_proj[donor].data_ptr()
            assert not torch.equal(experts.gate_up_proj[slot], experts.gate_up_proj[donor])
            chip_slot, chip_donor = experts.expert_weights(slot)[0], experts.expert_weights(donor)[0]
            assert not torch.allclose(chip_slot, chip_donor)      # own, independent noise draw
            assert not torch.allclose(chip_slot, chips_before[layer.experts_name][slot])  # reprogrammed
        others = [e for e in range(E) if e not in rep.replaced]
        for e in others:  # untouched experts are the same chip
            assert torch.equal(experts.expert_weights(e)[0], chips_before[layer.experts_name][e])
    after = calibration_pass(model, ids, raw=False)
    for layer in moe_layers(model):
        for slot in cold[layer.router_name.rpartition(".")[0]]:
            assert after[layer.router_name].counts[slot] == 0  # no longer selectable
            assert layer.router.analog.logit_shift[slot] == float("-inf")


@pytest.mark.parametrize("mode", ["average", "split"])
def test_replacement_is_exact_on_an_ideal_chip(mode):
    # on an ideal chip a copy computes exactly what its donor does: the model equals one whose replaced
    # experts are merely masked
    ids = _ids(4)
    masked, replaced = build("olmoe"), build("olmoe")
    analogize_(masked, "ideal")
    analogize_(replaced, "ideal")
    plan = {0: 3, 5: 1}
    for layer_m, layer_r in zip(moe_layers(masked), moe_layers(replaced)):
        shift = torch.zeros(E)
        shift[list(plan)] = float("-inf")
        layer_m.router.analog.set_logit_affine(None, shift)
        apply_replacement_(layer_r, plan, mode)
    with torch.no_grad():
        assert torch.allclose(replaced(ids).logits, masked(ids).logits, atol=1e-5)


def test_replaced_expert_is_dropped_under_a_sigmoid_router_that_still_picks_it():
    ids = _ids(4)
    masked, replaced = build("deepseek_v3"), build("deepseek_v3")
    for model in (masked, replaced):
        model.model.layers[1].mlp.gate.e_score_correction_bias.data[3] = 100.0  # always chosen
        analogize_(model, "ideal")
    layer_m, layer_r = moe_layers(masked)[0], moe_layers(replaced)[0]
    shift = torch.zeros(E)
    shift[3] = float("-inf")
    layer_m.router.analog.set_logit_affine(None, shift)
    dispatch = apply_replacement_(layer_r, {3: 6}, "average")
    index = _routing(replaced, ids)[layer_r.router_name]
    assert bool((index == 3).any(dim=1).all())  # the router still selects the masked expert ...
    counts = torch.bincount(index.reshape(-1), minlength=E)
    assert dispatch.physical_counts(index)[3] == counts[6]  # ... but the slot only computes donor 6's tokens
    with torch.no_grad():
        assert torch.allclose(replaced(ids).logits, masked(ids).logits, atol=1e-5)


@pytest.mark.parametrize("arch", ["olmoe", "deepseek_v2"])
def test_romer_runs_both_stages_and_reports(arch):
    clean, model = build(arch), build(arch)
    analogize_(model, "gaussian-chip", seed=2)
    ids = _ids(1, (2, 16))
    expert_calls = [m.forward_calls for m in model.modules() if isinstance(m, AnalogExperts)]
    report = romer_(model, ids, RomerConfig(tau_under=1.0), clean_model=clean)
    assert [m.forward_calls for m in model.modules() if isinstance(m, AnalogExperts)] == expert_calls
    assert all(len(r.replaced) == 1 for r in report.replacements)  # tau 1: the coldest expert, cap 1 of 8
    assert set(report.maps) == {layer.router_name for layer in moe_layers(model)}
    for rep in report.replacements:
        (slot,) = rep.replaced
        assert report.maps[rep.router].shift[slot] == float("-inf")
        assert report.frequency_after[rep.router][slot] == 0.0
    assert report.lis_before >= 1.0 and report.lis_after >= 1.0 and report.lis_after_router >= 1.0
    assert 0.0 <= report.flip_rate_before <= 1.0 and 0.0 <= report.flip_rate_after <= 1.0
    assert report.to_dict()["config"]["mode"] == "average"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_romer_config_and_requirements():
    with pytest.raises(ValueError, match="mode"):
        RomerConfig(mode="copy")
    with pytest.raises(ValueError, match="stages"):
        RomerConfig(stages=("prune",))
    with pytest.raises(ValueError, match="reference"):
        RomerConfig(reference="median")
    assert RomerConfig(stages="recalibrate").stages == ("recalibrate",)
    model = build("olmoe")
    analogize_(model, "ideal", Placement(router=False))
    with pytest.raises(ValueError, match="not analog"):
        recalibrate_router_(model, _ids())


def test_experts_dispatch_hook():
    model = build("olmoe")
    analogize_(model, "ideal")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(3, 64)
    index, weights = torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.full((3, 2), 0.5)
    reference = experts(hidden, index, weights)
    experts.dispatch = lambda i, w: (torch.cat([i, torch.full((3, 1), -1)], 1), torch.cat([w, torch.ones(3, 1)], 1))
    assert torch.equal(experts(hidden, index, weights), reference)  # -1: dropped
    experts.dispatch = lambda i, w: (i + 8, w)
    with pytest.raises(ValueError, match="dispatch returned"):
        experts(hidden, index, weights)


# -- Replicate-and-Quantize ----------------------------------------------------------------------------
from romer_kernels.methods.replicate_quantize import (  # noqa: E402
    RQConfig,
    plan_replicas,
    quantize_symmetric,
    quantized_needed,
    replicate_quantize_,
)
from romer_kernels.nn import drift_analog_  # noqa: E402


def _plant_skew(model, hot, cold):
    for layer in moe_layers(model):
        bias = torch.zeros(layer.num_experts)
        bias[hot], bias[cold] = 3.0, -10.0
        matrix = layer.router.analog.matrix
        matrix.matmul = lambda x, w, *a, _f=matrix.matmul, _b=bias, **k: _f(x, w, *a, **k) + _b


def test_rq_planning_by_hand():
    assert plan_replicas(torch.tensor([10.0, 2, 2, 2]), 1) == [0]
    assert plan_replicas(torch.tensor([10.0, 6, 2, 2]), 3) == [0, 1, 0]    # 10/1, 6/1, 5/2 -> 0, 1, 0
    assert plan_replicas(torch.tensor([10.0, 4, 2, 2]), 1, excluded={0}) == [1]
    assert plan_replicas(torch.tensor([5.0, 5, 5, 5]), 2) == []             # no gain in the max load
    assert quantized_needed(1, 8, 8, 16) == 1 and quantized_needed(2, 8, 4, 16) == 2
    assert quantized_needed(1, 16, 8, 16) == 2
    w = torch.randn(4, 9)
    q = quantize_symmetric(w, 8)
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(q / scale, (q / scale).round(), atol=1e-4) and (q - w).abs().max() <= scale.max() / 2 + 1e-6


def test_replicate_quantize_keeps_budget_and_lowers_lis_on_planted_skew():
    model = build("olmoe")
    analogize_(model, "gaussian-chip", seed=4)
    drift_analog_(model, 60.0)
    _plant_skew(model, hot=2, cold=5)
    ids = _ids(1, (4, 16))
    experts0 = model.model.layers[0].mlp.experts
    tiles = experts0.num_tiles
    weight5 = experts0.down_proj[5].detach().clone()
    report = replicate_quantize_(model, ids)
    for row in report.layers:
        assert row.replicated == [2] and row.quantized == [5]   # heavy hitter, least important (never routed)
        assert row.bits_after <= row.bits_before
        assert row.importance[5] == 0.0
    assert report.lis_after < 0.8 * report.lis_before
    bank = experts0.extra_experts
    assert experts0.num_tiles == tiles + 2 and bank.gate_up[0].layer_id == "model.layers.0.mlp.experts.8.gate_up_proj"
    assert bank.gate_up[0].t_inference == 60.0
    replica = bank.gate_up[0].effective_weight(bank.gate_up_weights[0])
    donor = experts0.gate_up[2].effective_weight(experts0.gate_up_proj[2])
    assert not torch.allclose(replica, donor)  # own tiles, own noise
    scale = weight5.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(experts0.expert_params(5)[1].detach(), (weight5 / scale).round() * scale, atol=1e-6)
    assert torch.equal(experts0.down_proj[5].detach(), weight5)  # the model's own weights are untouched
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match="already has replicas"):
        replicate_quantize_(model, ids)


def test_replicate_quantize_greedy_budget_and_ablation():
    model = build("mixtral")
    analogize_(model, "ideal")
    _plant_skew(model, hot=1, cold=6)
    ids = _ids(2, (1, 8))
    report = replicate_quantize_(model, ids, RQConfig(replicas=2, replica_bits=8, quant_bits=4, importance="ablation",
                                                      min_lis_gain=0.0))
    for row in report.layers:
        assert len(row.replicated) == 2 and 1 in row.replicated
        assert row.importance[6] == 0.0  # never routed: dropping it changes nothing
        others = sorted((e for e in range(E) if e not in row.replicated), key=lambda e: (row.importance[e], e))
        assert row.quantized == sorted(others[:2])   # ceil(2 * 8 / (16 - 4)) = 2 least important
        assert row.bits_after <= row.bits_before
    assert report.lis_after < report.lis_before
    with pytest.raises(ValueError, match="quantized experts"):
        replicate_quantize_(build_converted("olmoe"), ids, RQConfig(replicas=4, replica_bits=16, quant_bits=14,
                                                                    min_lis_gain=0.0))


def build_converted(arch):
    model = build(arch)
    analogize_(model, "ideal")
    return model


def test_romer_then_replicate_quantize_compose():
    model = build("olmoe")
    analogize_(model, "gaussian-chip", seed=5)
    _plant_skew(model, hot=2, cold=5)
    ids = _ids(1, (2, 16))
    romer = romer_(model, ids, RomerConfig(mode="split"))
    replaced = [next(iter(r.replaced)) for r in romer.replacements]
    assert all(list(r.replaced.values()) == [2] for r in romer.replacements)  # a cold slot copies the hot expert
    report = replicate_quantize_(model, ids)
    for row, slot in zip(report.layers, replaced):
        assert slot not in row.quantized and slot not in row.replicated  # the replaced slot is neither
        assert row.bits_after <= row.bits_before
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

"""ROMER stage 1 where its mechanism exists: a chip that starves known experts (their router rows read
low, pushing them out of every top-k) on the trained tiny OLMoE; the threshold fires, the budget
replaces exactly the r coldest, and the crossbar load moves back toward the clean model's."""
from __future__ import annotations

import pytest
import torch

from romer_kernels.config.presets import preset
from romer_kernels.data import load_corpus
from romer_kernels.evaluation.variants import calibration_windows, variant_of
from romer_kernels.methods import undo_methods_
from romer_kernels.methods.romer import RomerConfig, calibration_pass, moe_layers, plan_replacement, romer_
from romer_kernels.models.loading import load_model_and_tokenizer
from romer_kernels.moe import analogize_
from romer_kernels.moe.routing import load_imbalance_score

STARVED = {"model.layers.1.mlp.gate": (3, 11), "model.layers.2.mlp.gate": (0, 9)}


def _starve(model, offset=-12.0):
    """Rows of the starved experts read ``offset`` lower on this chip (e.g. a stuck-low wordline): the
    router never picks them (their logit stays far below every top-k)."""
    for layer in moe_layers(model):
        experts = STARVED.get(layer.router_name)
        if experts:
            shift = torch.zeros(layer.num_experts)
            shift[list(experts)] = offset
            layer.analog_router.set_logit_affine(None, shift)


@pytest.fixture(scope="module")
def setup():
    """The trained tiny OLMoE on a rasch2023 chip, and 8 calibration windows of the valid split."""
    model, tokenizer = load_model_and_tokenizer("tiny-olmoe")
    ids = torch.tensor(tokenizer(load_corpus("valid"), verbose=False)["input_ids"])
    analogize_(model, preset("rasch2023"), seed=0)
    return model, calibration_windows(ids, 128, 8)


def _lis(stats) -> dict[str, float]:
    """Mean over batches of each layer's router LIS (as the sweep metrics count it)."""
    return {name: sum(load_imbalance_score(c) for c in s.batch_counts) / len(s.batch_counts)
            for name, s in stats.items()}


def test_the_threshold_fires_on_starved_experts_and_the_load_moves_toward_clean(setup):
    model, calib = setup
    digital = load_model_and_tokenizer("tiny-olmoe")[0]
    try:
        # clean routing: the digital model's own statistics (an ideal chip routes exactly like it)
        ideal = load_model_and_tokenizer("tiny-olmoe")[0]
        analogize_(ideal, "ideal")
        clean_lis = _lis(calibration_pass(ideal, calib, raw=False))
        _starve(model)
        starved = calibration_pass(model, calib, raw=False)
        for router, experts in STARVED.items():
            assert starved[router].counts[list(experts)].sum() == 0          # out of every top-k
        starved_lis = _lis(starved)
        report = romer_(model, calib, RomerConfig(stages=("replace",), mode="split"), clean_model=digital)
        replaced = {r.router: sorted(r.replaced) for r in report.replacements if r.replaced}
        # exactly the starved experts (they are the coldest: frequency 0), at most floor(E / 8) = 2 per layer
        assert replaced == {router: sorted(experts) for router, experts in STARVED.items()}
        # the starved layers' router LIS is well above clean (measured +0.18 and +0.09 on this chip)
        for router in STARVED:
            assert starved_lis[router] > clean_lis[router] + 0.05
        # split: the donors' tokens are dealt over donor and copy, so the starved slots' crossbars work
        # again and carry half of the hottest experts' load; the crossbar LIS falls below the starved
        # chip's and, since the donors are the hottest experts, below the clean routing's too (measured
        # 1.454 -> 1.355, clean 1.410)
        clean_mean = sum(clean_lis.values()) / len(clean_lis)
        assert report.lis_before > clean_mean
        assert report.lis_after < min(report.lis_before - 0.05, clean_mean)
    finally:
        undo_methods_(model)


def test_a_budget_replaces_exactly_the_r_coldest_per_layer(setup):
    model, calib = setup
    stats = calibration_pass(model, calib, raw=False)
    report = romer_(model, calib, RomerConfig(stages=("replace",), replace_budget=3))
    try:
        for replacement in report.replacements:
            frequency = stats[replacement.router].frequency
            coldest = sorted(range(frequency.numel()), key=lambda e: (float(frequency[e]), e))[:3]
            assert sorted(replacement.replaced) == sorted(coldest)      # whatever the threshold says
    finally:
        undo_methods_(model)
    with pytest.raises(ValueError, match="leaves no donor"):
        plan_replacement(torch.ones(4) / 4, budget=4)
    with pytest.raises(ValueError, match="replace_budget must be a non-negative int"):
        RomerConfig(replace_budget=-1)


def test_the_swept_variants_name_their_settings():
    assert variant_of("romer-replace-r2").description == "ROMER stage 1: the 2 coldest experts per layer replaced"
    assert "under 1/E" in variant_of("romer-tau1").description
    with pytest.raises(ValueError, match="ROMER stage 1 swept"):
        variant_of("romer-replace-rtwo")

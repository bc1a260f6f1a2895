"""MaxNN placement where its mechanism exists: experts with one outlier neuron (a large max neuron norm,
as trained large MoEs have). The outlier is planted function-preservingly in the trained tiny OLMoE
(hidden unit 0's up row x 256, its down column / 256: the digital model is bit-identical), so only the
analog chip sees it: the down projection's inputs are scaled by their absolute maximum (noise
management), so the outlier unit squeezes every other input into a few DAC levels. Measured sensitivity
then follows MaxNNScore, and keeping the top-MaxNN experts digital beats random choices clearly."""
from __future__ import annotations

import pytest
import torch

from romer_kernels.config.presets import preset
from romer_kernels.data import load_tokens
from romer_kernels.evaluation.runner import SweepSettings
from romer_kernels.evaluation.sensitivity import score_correlations, sensitivity_sweep
from romer_kernels.evaluation.sweep import noise_sweep
from romer_kernels.evaluation.variants import calibration_windows
from romer_kernels.methods.placement import Part, digital_placement, max_nn_scores, top_experts
from romer_kernels.models.loading import load_model_and_tokenizer

PLANTED = {0: (2, 9), 1: (5, 12), 2: (0, 7), 3: (3, 14)}
OUTLIER = 256.0        # a power of two: the planted model computes exactly what the trained one does


@pytest.fixture(scope="module")
def planted():
    model, tokenizer = load_model_and_tokenizer("tiny-olmoe")
    ids = load_tokens(tokenizer, "bundled", "test")
    probe = ids[:64][None]
    with torch.no_grad():
        before = model(probe).logits
        for layer, experts in PLANTED.items():
            module = model.model.layers[layer].mlp.experts
            intermediate = module.down_proj.shape[2]
            for e in experts:
                module.gate_up_proj[e, intermediate] *= OUTLIER      # up row of hidden unit 0
                module.down_proj[e, :, 0] /= OUTLIER                 # its down column
        assert torch.equal(model(probe).logits, before)
    calib = calibration_windows(load_tokens(tokenizer, "bundled", "valid"), 256, 8)
    return model, ids, calib


def test_maxnn_ranks_the_outlier_experts_first(planted):
    model, _, _ = planted
    for name, scores in max_nn_scores(model).items():
        layer = int(name.split(".")[2])
        assert top_experts(scores, 2 / 16) == PLANTED[layer]


def test_measured_sensitivity_follows_maxnn(planted, tmp_path):
    model, ids, calib = planted
    settings = SweepSettings(preset("rasch2023"), seeds=(0, 1), noise_scales=(2.0,), max_windows=4)
    parts = [Part("experts", 1, e) for e in range(16)]
    result = sensitivity_sweep(model, ids, settings, tmp_path / "sens", parts=parts, model_id="planted",
                               data_id="bundled:test", progress=False)
    increases = {row["expert"]: row["ppl_increase"][0] for row in result.rows()}
    ranked = sorted(increases, key=increases.get, reverse=True)
    # measured: +2.1 and +1.7 PPL for the two outlier experts, at most +0.5 for any other
    assert sorted(ranked[:2]) == list(PLANTED[1])
    assert min(increases[e] for e in PLANTED[1]) > 2 * max(increases[e] for e in ranked[2:])
    (row,) = score_correlations(result, model, calib)
    assert row["layer"] == 1 and row["maxnn"][0] > 0.4          # measured +0.51


def test_maxnn_placement_beats_random_at_the_same_budget(planted, tmp_path):
    model, ids, calib = planted
    ppl = {}
    for label, score, seed in (("maxnn", "maxnn", 0), ("random0", "random", 0), ("random1", "random", 1),
                               ("random2", "random", 2)):
        placement = digital_placement(model, 0.125, score, calib_ids=calib, seed=seed, dense_digital=())
        settings = SweepSettings(preset("rasch2023"), placement=placement, seeds=(0, 1, 2), noise_scales=(2.0,),
                                 max_windows=4)
        result = noise_sweep(model, ids, settings, tmp_path / label, model_id="planted", data_id="bundled:test",
                             progress=False)
        ppl[label] = result.table()[0]["ppl"]                  # (mean, std, low, high) over the 3 chips
    # measured: 83.5 +- 1.1 (MaxNN) vs 122.7 +- 5.1, 139.7 +- 2.0, 137.3 +- 2.4 (random); clean 73.7
    mean, std = ppl["maxnn"][:2]
    for label in ("random0", "random1", "random2"):
        assert mean + 3 * std + 3 * ppl[label][1] < ppl[label][0]

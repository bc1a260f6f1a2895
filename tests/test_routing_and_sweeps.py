"""Routing metrics on hand-made counts, perplexity windows, and resumable Monte Carlo sweeps."""
import math
import sqlite3

import pytest
import torch
from moe_models import build

from romer_kernels.config import preset
from romer_kernels.evaluation.lm_metrics import evaluate_lm, windows
from romer_kernels.evaluation.executors import FunctionSession, run_trials
from romer_kernels.evaluation.montecarlo import ResultsStore, Trial, grid, summarize_trials
from romer_kernels.evaluation.sweep import SweepSettings, noise_sweep
from romer_kernels.moe.routing import (
    coefficient_of_variation,
    expert_counts,
    flip_rate,
    frequency_kl,
    load_imbalance_score,
    max_over_mean,
    routing_entropy,
    top_k_overlap,
)


def test_load_imbalance_score_by_hand():
    # 4 experts, 6 tokens, top-2: 12 assignments; max load 6 -> LIS = 4 * 6 / 12 = 2
    assert load_imbalance_score(torch.tensor([6.0, 2, 2, 2]), top_k=2) == pytest.approx(2.0)
    assert load_imbalance_score(torch.tensor([3.0, 3, 3, 3])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="multiple of top_k"):
        load_imbalance_score(torch.tensor([3.0, 2, 2]), top_k=2)
    with pytest.raises(ValueError, match="all zero"):
        load_imbalance_score(torch.zeros(4))


def test_count_metrics_by_hand():
    counts = torch.tensor([4.0, 0, 2, 2])
    assert coefficient_of_variation(counts) == pytest.approx(math.sqrt(2.0) / 2.0)  # std sqrt(2), mean 2
    assert max_over_mean(counts) == pytest.approx(2.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert routing_entropy(counts) == pytest.approx(float(-(p * p.log()).sum()) / math.log(4))
    assert routing_entropy(torch.tensor([1.0, 1, 1, 1])) == pytest.approx(1.0)
    assert frequency_kl(torch.tensor([1.0, 1]), torch.tensor([1.0, 1])) == pytest.approx(0.0)
    assert frequency_kl(torch.tensor([3.0, 1]), torch.tensor([1.0, 1])) == pytest.approx(
        0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert torch.equal(expert_counts(torch.tensor([[0, 2], [2, 1]]), 4), torch.tensor([1.0, 1, 2, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        expert_counts(torch.tensor([[0, 4]]), 4)


def test_overlap_and_flip_rate_by_hand():
    clean = torch.tensor([[0, 1], [2, 3], [4, 5]])
    noisy = torch.tensor([[1, 0], [2, 4], [6, 7]])  # same set, one of two, none
    assert top_k_overlap(noisy, clean) == pytest.approx((1 + 0.5 + 0) / 3)
    assert flip_rate(noisy, clean) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same shape"):
        flip_rate(noisy[:2], clean)


def test_perplexity_windows():
    assert windows(10, 4) == [(0, 4, 1), (4, 8, 5)]
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(3, 4)
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


@torch.no_grad()
def test_perplexity_matches_the_model_loss_on_non_overlapping_windows():
    model = build("olmoe")
    ids = torch.randint(3, 128, (600,), generator=torch.Generator().manual_seed(0))
    result = evaluate_lm(model, ids, seq_len=64, batch_size=3)
    windows_ = ids[: 9 * 64].view(9, 64)
    assert result.tokens == 9 * 63
    assert result.perplexity == pytest.approx(math.exp(float(model(windows_, labels=windows_).loss)), rel=1e-4)
    assert result.routing is not None and result.routing.lis >= 1.0


def test_interrupted_sweep_resumes_without_losing_or_duplicating_trials(tmp_path):
    trials = grid([0, 1, 2], [0.5, 1.0], [60.0])
    calls = []

    def run_trial(trial):
        calls.append(trial.key)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user stops the sweep during the fourth trial
        return {"ppl": 10.0 + trial.seed + trial.noise_scale}

    store = ResultsStore(tmp_path / "results.sqlite", {"model": "m"})
    with pytest.raises(KeyboardInterrupt):
        run_trials(store, trials, FunctionSession(run_trial), progress=False)
    store.close()
    store = ResultsStore(tmp_path / "results.sqlite", {"model": "m"})
    assert len(store.done()) == 3
    ran = run_trials(store, trials, FunctionSession(lambda t: {"ppl": 10.0 + t.seed + t.noise_scale}), progress=False)
    assert ran == 3
    rows = store.rows()
    assert sorted(t.key for t, _ in rows) == sorted(t.key for t in trials)
    uninterrupted = summarize_trials([(t, {"ppl": 10.0 + t.seed + t.noise_scale}) for t in trials])
    assert [(s.noise_scale, s.mean, s.std) for s in summarize_trials(rows)] == \
        [(s.noise_scale, s.mean, s.std) for s in uninterrupted]
    store.close()
    with pytest.raises(ValueError, match="differs in: model"):
        ResultsStore(tmp_path / "results.sqlite", {"model": "other"})
    count = sqlite3.connect(tmp_path / "results.sqlite").execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    assert count == 6


def test_summaries_have_student_t_intervals():
    rows = [(Trial(s, 1.0, 0.0), {"x": v}) for s, v in enumerate([1.0, 2.0, 3.0])]
    (summary,) = summarize_trials(rows)
    assert summary.mean == 2.0 and summary.std == pytest.approx(1.0)
    assert summary.ci_high - summary.mean == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-6)


def test_grid_rejects_empty_or_negative_axes():
    with pytest.raises(ValueError, match="noise_scales"):
        grid([0], [], [0.0])
    with pytest.raises(ValueError, match="non-negative"):
        grid([0], [-1.0], [0.0])


@torch.no_grad()
def test_noise_sweep_on_a_tiny_model_and_its_resume(tmp_path):
    model = build("deepseek_v3")
    ids = torch.randint(3, 128, (800,), generator=torch.Generator().manual_seed(1))
    settings = SweepSettings(config=preset("gaussian-chip"), seeds=(0, 1), noise_scales=(0.0, 3.0), times=(0.0,),
                             seq_len=32, batch_size=4, max_windows=4)
    first = noise_sweep(model, ids, settings, tmp_path, "tiny", "random", progress=False)
    assert first.trials_run == 4
    table = {row["noise_scale"]: row for row in first.table()}
    assert table[0.0]["flip_rate"][0] == 0.0           # no noise: the routing of the clean model
    assert table[0.0]["ppl"][0] == pytest.approx(first.clean.perplexity, rel=1e-5)
    assert table[3.0]["flip_rate"][0] > 0.0
    again = noise_sweep(model, ids, settings, tmp_path, "tiny", "random", progress=False)
    assert again.trials_run == 0 and again.table() == first.table()


def test_ppl_intervals_are_on_the_log_scale_and_bounded_metrics_stay_in_range():
    values = [80.0, 400.0]          # two chips far apart: a linear t-interval would reach about -2000
    rows = [(Trial(s, 1.0, 0.0), {"ppl": v, "flip_rate": f, "lis": l, "acc:t": a})
            for s, (v, f, l, a) in enumerate(zip(values, [0.05, 0.9], [1.05, 1.9], [0.1, 0.99]))]
    by_metric = {s.metric: s for s in summarize_trials(rows)}
    ppl = by_metric["ppl"]
    t_value = 12.706204736174707
    logs = [math.log(v) for v in values]
    centre, half = sum(logs) / 2, t_value * abs(logs[0] - logs[1]) / math.sqrt(2) / math.sqrt(2)
    assert ppl.ci_low == pytest.approx(math.exp(centre - half)) and ppl.ci_high == pytest.approx(math.exp(centre + half))
    assert 0 < ppl.ci_low < ppl.mean < ppl.ci_high
    assert by_metric["flip_rate"].ci_low == 0.0 and by_metric["flip_rate"].ci_high == 1.0
    assert by_metric["lis"].ci_low == 1.0 and by_metric["acc:t"].ci_high == 1.0

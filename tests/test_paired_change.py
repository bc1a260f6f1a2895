"""Paired changes against the noisy baseline on the same chips: log-scale interval, seeds paired."""
import math

import pytest
from scipy import stats

from romer_kernels.evaluation.compare import paired_change
from romer_kernels.evaluation.montecarlo import Trial


def test_paired_change_by_hand():
    noisy = [4.00, 4.10, 3.95, 4.05]
    method = [3.98, 4.07, 3.95, 4.01]          # per-seed NLL differences -0.02, -0.03, 0, -0.04
    rows = [(Trial(s, 2.0, 3600.0, "noisy"), {"nll": v}) for s, v in enumerate(noisy)]
    rows += [(Trial(s, 2.0, 3600.0, "m"), {"nll": v}) for s, v in enumerate(method)]
    rows += [(Trial(9, 2.0, 3600.0, "m"), {"nll": 1.0})]          # no noisy chip 9: not paired
    change, low, high, n = paired_change(rows)[(2.0, 3600.0, "m")]
    diffs = [m - b for m, b in zip(method, noisy)]
    mean = sum(diffs) / 4
    half = stats.t.ppf(0.975, 3) * stats.tstd(diffs) / 2
    assert n == 4
    assert change == pytest.approx(math.expm1(mean)) and low == pytest.approx(math.expm1(mean - half))
    assert high == pytest.approx(math.expm1(mean + half)) and low < change < high < 0.01
    # the paired interval is much narrower than the spread of the chips themselves
    assert high - low < 0.5 * (max(noisy) - min(noisy))


def test_no_baseline_no_change():
    rows = [(Trial(0, 1.0, 0.0, "m"), {"nll": 4.0})]
    assert paired_change(rows) == {}

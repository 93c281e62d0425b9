"""tinyfusion.study.stats on constructed inputs: hand-computed values and scipy as a second path."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tinyfusion.study.stats import (average_ranks, bootstrap_interval, holm, mean_and_std, paired_difference, rank_among,
                              sign_flip_test, spearman, spearman_by_budget, spearman_permutation_test)


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # hand-computed without ties: d = [0, -1, 1, 0, 0] -> 1 - 6 * 2 / (5 * 24) = 0.9
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    generator = np.random.default_rng(3)
    x, y = generator.normal(size=40), generator.integers(0, 6, 40)  # many ties in y
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    generator = np.random.default_rng(0)
    x = generator.normal(size=200)
    y = x + generator.normal(size=200)  # population Spearman ~ 0.68
    low, high = bootstrap_interval(x, y, resamples=500)
    assert low < spearman(x, y) < high and 0.5 < low and high < 0.85
    small_low, small_high = bootstrap_interval(x[:20], y[:20], resamples=500)
    assert small_high - small_low > high - low


def test_paired_difference_hand_computed():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302652729749464 -> half width 4.3027 / sqrt(3)
    result = paired_difference([11, 12, 13], [10, 10, 10])
    half = 4.302652729749464 / math.sqrt(3)
    assert result["mean"] == 2.0 and result["n"] == 3
    assert result["low"] == pytest.approx(2 - half) and result["high"] == pytest.approx(2 + half)
    assert math.isnan(paired_difference([1.0], [0.5])["low"])


def test_mean_std_and_rank():
    assert mean_and_std([1, 2, 3]) == (2.0, 1.0)
    assert mean_and_std([4]) == (4.0, 0.0)
    assert rank_among(3.0, [1.0, 2.0, 3.0, 4.0]) == 3
    assert rank_among(3.0, [1.0, 2.0, 3.0, 4.0], lower_is_better=False) == 2


def test_holm_hand_computed():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> raised to 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, then non-decreasing
    assert holm([0.2]) == [0.2]


def test_sign_flip_test_enumerates_every_sign_pattern():
    # sums of +-1 +-2 +-3: 6, 4, 2, 0, 0, -2, -4, -6
    assert sign_flip_test([1, 2, 3]) == 2 / 8
    assert sign_flip_test([1, 2, 3], alternative="greater") == 1 / 8
    assert sign_flip_test([1, 2, 3], alternative="less") == 1.0
    # observed sum 2: |sum| >= 2 for 6, 2, -4, 4, -2, -6; sum >= 2 for 6, 2, 4
    assert sign_flip_test([1, -2, 3]) == 6 / 8
    assert sign_flip_test([1, -2, 3], alternative="greater") == 3 / 8
    assert sign_flip_test([-0.5] * 8, alternative="less") == 1 / 256  # the smallest p with 8 pairs
    with pytest.raises(ValueError):
        sign_flip_test([1.0] * 17)


def test_spearman_by_budget_hand_computed():
    table = spearman_by_budget([1, 2, 3, 4, 5], {0: [1, 3, 2, 4, 5], 800: [5, 4, 3, 2, 1]}, resamples=300)
    assert table[0]["rho"] == pytest.approx(0.9) and table[0]["n"] == 5  # d = 0, -1, 1, 0, 0
    assert table[0]["low"] <= 0.9 <= table[0]["high"]
    assert table[800]["rho"] == pytest.approx(-1.0)
    assert table[800]["low"] == pytest.approx(-1.0) and table[800]["high"] == pytest.approx(-1.0)  # every resample
    with pytest.raises(ValueError):
        spearman_by_budget([1, 2, 3], {0: [1, 2]})


def test_spearman_permutation_test_matches_the_exact_null():
    # rho = 1 only for the identity among the 6! = 720 orders: p ~ 1/720 (+ the Monte Carlo error)
    assert 0.0007 < spearman_permutation_test(range(6), range(6), resamples=20000) < 0.0025
    assert spearman_permutation_test(range(6), range(6)[::-1], resamples=2000) == 1.0

"""tinyfusion.stats on constructed inputs: hand-computed values and scipy as a second path."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tinyfusion.stats import average_ranks, bootstrap_interval, mean_and_std, paired_difference, rank_among, spearman


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

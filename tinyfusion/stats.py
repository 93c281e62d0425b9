"""Small statistics for comparing pruning methods over seeds: rank correlation with a bootstrap
interval, paired differences with a t interval, mean +/- sample standard deviation.

Every function takes plain sequences of floats and returns plain floats, so results go straight
into JSON and Markdown tables."""
import math

import numpy as np
from scipy import stats as scipy_stats


def average_ranks(values):
    """Ranks 1..n of `values`, ties sharing the mean of the ranks they span (as Spearman's
    coefficient needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the average ranks."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(x)} and {len(y)}")
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    rank_x -= rank_x.mean()
    rank_y -= rank_y.mean()
    denominator = math.sqrt(float((rank_x ** 2).sum() * (rank_y ** 2).sum()))
    return float((rank_x * rank_y).sum() / denominator) if denominator > 0 else float("nan")


def bootstrap_interval(x, y, statistic=spearman, resamples=2000, confidence=0.95, seed=0):
    """Percentile bootstrap interval of statistic(x, y) over pairs resampled with replacement
    (resamples whose statistic is undefined, e.g. all ties, are dropped). Returns (low, high)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    generator = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        picks = generator.integers(0, len(x), len(x))
        value = statistic(x[picks], y[picks])
        if not math.isnan(value):
            values.append(value)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def paired_difference(a, b, confidence=0.95):
    """Mean of a_i - b_i over paired runs (same seed) with its two-sided t interval.
    Returns {"mean", "low", "high", "n"}; with one pair the interval is undefined (nan)."""
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(differences)
    if n == 0:
        raise ValueError("paired_difference needs at least one pair")
    mean = float(differences.mean())
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n}
    half_width = scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1) * differences.std(ddof=1) / math.sqrt(n)
    return {"mean": mean, "low": mean - float(half_width), "high": mean + float(half_width), "n": n}


def mean_and_std(values):
    """(mean, sample standard deviation; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def rank_among(value, population, lower_is_better=True):
    """1-based rank of `value` within `population` (1 = best), ties counted in its favour."""
    population = np.asarray(population, dtype=np.float64)
    better = (population < value).sum() if lower_is_better else (population > value).sum()
    return int(better) + 1

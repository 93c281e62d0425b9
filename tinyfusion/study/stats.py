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


# ---------------------------------------------------------------------- declared tests
EXACT_SIGN_FLIP_MAX_N = 16  # 2^16 sign patterns: enumerated in well under a second


def holm(p_values):
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest p is multiplied
    by (m - i + 1), made non-decreasing along the sorted order and capped at 1. Rejecting where
    the adjusted p < alpha controls the family-wise error rate at alpha."""
    p_values = np.asarray(p_values, dtype=np.float64)
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(m, dtype=np.float64)
    running = 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (m - position) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def sign_flip_test(differences, alternative="two-sided"):
    """Exact permutation test of paired differences (a_i - b_i over seeds) against a null of
    exchangeable signs: the p-value is the share of all 2^n sign patterns whose mean is at least
    as extreme as the observed one (ties counted in). With n pairs the smallest possible p is
    2 / 2^n two-sided and 1 / 2^n one-sided. alternative: "two-sided", "less" (a < b) or
    "greater" (a > b)."""
    differences = np.asarray(differences, dtype=np.float64)
    n = len(differences)
    if not 1 <= n <= EXACT_SIGN_FLIP_MAX_N:
        raise ValueError(f"the exact sign-flip test needs 1..{EXACT_SIGN_FLIP_MAX_N} pairs, got {n}")
    patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0  # every +-1 pattern
    means = patterns @ differences / n
    observed = differences.mean()
    slack = 1e-12 * max(1.0, float(np.abs(differences).max()))  # equal means up to float rounding tie
    if alternative == "two-sided":
        extreme = np.abs(means) >= abs(observed) - slack
    elif alternative == "less":
        extreme = means <= observed + slack
    elif alternative == "greater":
        extreme = means >= observed - slack
    else:
        raise ValueError(f"alternative must be two-sided, less or greater, got {alternative!r}")
    return float(extreme.mean())


def spearman_by_budget(reference, losses_by_budget, resamples=2000, seed=0):
    """{budget: {"rho", "low", "high", "n"}}: Spearman's correlation of `reference` (one value per
    candidate, e.g. its calibration loss) with the candidates' losses at each budget
    ({budget: [one value per candidate]}), with a percentile bootstrap interval over candidates."""
    table = {}
    for budget, losses in losses_by_budget.items():
        if len(losses) != len(reference):
            raise ValueError(f"budget {budget}: {len(losses)} losses for {len(reference)} candidates")
        low, high = bootstrap_interval(reference, losses, resamples=resamples, seed=seed)
        table[budget] = {"rho": spearman(reference, losses), "low": low, "high": high, "n": len(losses)}
    return table


def spearman_permutation_test(x, y, resamples=20000, seed=0):
    """One-sided permutation p-value of Spearman's rho(x, y) > 0: (1 + #{permutations with rho >=
    observed}) / (1 + resamples) over random permutations of y (a valid test at any number of
    resamples; its Monte Carlo error is about sqrt(p (1 - p) / resamples))."""
    observed = spearman(x, y)
    generator = np.random.default_rng(seed)
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    rank_x = rank_x - rank_x.mean()
    rank_y = rank_y - rank_y.mean()
    scale = math.sqrt(float((rank_x ** 2).sum() * (rank_y ** 2).sum()))
    shuffled = np.stack([generator.permutation(rank_y) for _ in range(resamples)])
    values = shuffled @ rank_x / scale
    return float((1 + (values >= observed - 1e-12).sum()) / (1 + resamples))

"""Speed of the evaluator's metric maths (metrics.py) against a straightforward NumPy
float64 implementation of the same ADM metrics (np.cov, scipy sqrtm with the eps retry,
softmax Inception Score, k-NN precision / recall with NumPy distances in 10,000 blocks and
np.partition), on the same synthetic Inception-like features, in one run. Prints both
times per metric, the ratios and the largest differences of the results.

    python bench/bench_eval.py                      # 10k reference + 10k samples, 2048-d
    python bench/bench_eval.py --num 2000 --dim 512 # quick look
"""
import argparse
import os
import sys
import time

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyfusion.evaluation import metrics  # noqa: E402
from bench.harness import alternate, summary  # noqa: E402


# ---------------------------------------------------------------- straightforward baseline

def baseline_statistics(acts):
    acts = acts.astype(np.float64)
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def baseline_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("imaginary component")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def baseline_inception_score(logits, split_size=5000):
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def baseline_distances(u, v):
    return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0.0)


def baseline_radii(feats, k=3, block=10000):
    radii = np.empty(len(feats))
    for start in range(0, len(feats), block):
        rows = feats[start:start + block]
        dists = np.concatenate([baseline_distances(rows, feats[c:c + block]) for c in range(0, len(feats), block)], axis=1)
        radii[start:start + block] = np.partition(dists, k, axis=1)[:, k]
    return radii


def baseline_precision_recall(ref, sample, k=3, block=10000):
    ref, sample = ref.astype(np.float64), sample.astype(np.float64)
    ref_radii, sample_radii = baseline_radii(ref, k, block), baseline_radii(sample, k, block)
    ref_inside = np.zeros(len(ref), bool)
    sample_inside = np.zeros(len(sample), bool)
    for r in range(0, len(ref), block):
        for s in range(0, len(sample), block):
            dists = baseline_distances(ref[r:r + block], sample[s:s + block])
            ref_inside[r:r + block] |= (dists <= sample_radii[None, s:s + block]).any(axis=1)
            sample_inside[s:s + block] |= (dists <= ref_radii[r:r + block, None]).any(axis=0)
    return float(sample_inside.mean()), float(ref_inside.mean())


# ---------------------------------------------------------------- benchmark

def synthetic_features(rng, mixing, num, shift, noise_scale):
    """ReLU of a correlated Gaussian (Inception pool features are non-negative and correlated)."""
    z = rng.standard_normal((num, mixing.shape[0])).astype(np.float32)
    noise = noise_scale * rng.standard_normal((num, mixing.shape[1])).astype(np.float32)
    return np.maximum(z @ mixing + noise + shift, 0.0).astype(np.float32)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(args):
    rng = np.random.default_rng(args.seed)
    latent_dim = 256
    mixing = (rng.standard_normal((latent_dim, args.dim)) / np.sqrt(latent_dim)).astype(np.float32)
    ref = synthetic_features(rng, mixing, args.num, 0.5, 0.3)
    sample = synthetic_features(rng, mixing, args.num, 0.55, 0.4)  # a slightly different distribution
    softmax_weights = (rng.standard_normal((args.dim, 1008)) / np.sqrt(args.dim) * 8).astype(np.float32)
    logits = sample @ softmax_weights
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # NumPy / SciPy BLAS: both sides get the same threads
    print(f"features: {args.num} reference + {args.num} samples, {args.dim}-d float32; "
          f"torch threads {torch.get_num_threads()}, BLAS threads "
          f"{max(info['num_threads'] for info in threadpool_info())}")

    rows = []

    def compare(name, ours_fn, base_fn, diff_fn):
        # the two sides alternate ABBA (bench/harness.py); medians and every pair are printed
        results = {}
        calls = {"ours": lambda: results.__setitem__("ours", ours_fn()),
                 "numpy f64": lambda: results.__setitem__("base", base_fn())}
        record = summary(alternate(calls, rounds=args.repeats, warmup=0), "numpy f64", "ours")
        ours, base = results["ours"], results["base"]
        ours_time, base_time = record["baseline_median_s"], record["variant_median_s"]
        rows.append((name, base_time, ours_time, diff_fn(ours, base), record))
        print(f"{name:<28} numpy f64 {base_time:8.2f}s  ours {ours_time:8.2f}s  "
              f"speed-up {record['ratio_median']:6.2f}x (median of pairs)  max diff {diff_fn(ours, base):.3g}",
              flush=True)
        print("    pairs numpy/ours (s): " + ", ".join(f"{b:.2f}/{o:.2f}" for b, o in
                                                       zip(record["variant_s"], record["baseline_s"])))
        return ours, base

    stats, base_stats = compare(
        "statistics (mu, sigma) x2",
        lambda: (metrics.compute_statistics(ref), metrics.compute_statistics(sample)),
        lambda: (baseline_statistics(ref), baseline_statistics(sample)),
        lambda o, b: max(np.abs(o[i][j] - b[i][j]).max() for i in range(2) for j in range(2)))
    compare("FID (fast vs sqrtm)",
            lambda: metrics.frechet_distance(*stats[1], *stats[0]),
            lambda: baseline_frechet_distance(*base_stats[1], *base_stats[0]),
            lambda o, b: abs(o - b))
    compare("Inception Score",
            lambda: metrics.inception_score_from_logits(logits),
            lambda: baseline_inception_score(logits),
            lambda o, b: abs(o - b))
    pr, base_pr = compare("precision/recall float32",
            lambda: metrics.precision_recall(ref, sample),
            lambda: baseline_precision_recall(ref, sample),
            lambda o, b: max(abs(o[0] - b[0]), abs(o[1] - b[1])))
    print(f"{'':<28} (precision, recall): ours {pr}, numpy f64 {base_pr}")
    if args.exact:
        exact, exact_time = timed(metrics.precision_recall, ref, sample, dtype=torch.float64)
        print(f"{'precision/recall float64':<28} ours {exact_time:8.2f}s  result {exact}, "
              f"float32 {rows[-1][3]:.3g} away from the float64 baseline")

    base_total = sum(r[1] for r in rows)
    ours_total = sum(r[2] for r in rows)
    print(f"{'total':<28} numpy f64 {base_total:8.2f}s  ours {ours_total:8.2f}s  "
          f"speed-up {base_total / ours_total:6.2f}x")
    return {name: dict(numpy_s=base_s, ours_s=ours_s, max_diff=float(diff), speedup=record["ratio_median"],
                       pairs=record["ratios"]) for name, base_s, ours_s, diff, record in rows}


def build_parser():
    parser = argparse.ArgumentParser(description="tinyfusion.evaluation.metrics vs a straightforward NumPy float64 ADM implementation.")
    parser.add_argument("--num", type=int, default=10000, help="feature vectors per batch (reference and samples)")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool_3: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="limit torch and BLAS threads (e.g. 1 on a busy shared machine)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated (ABBA) rounds per side")
    parser.add_argument("--exact", action="store_true", help="also time the float64 precision/recall option")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

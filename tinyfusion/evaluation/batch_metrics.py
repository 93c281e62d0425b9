"""The ADM evaluator's procedure on two batches: the feature network's activations of every image,
the reference's statistics (computed, stored in the .npz, or cached in a sidecar file), and all
metrics of the samples against the reference (metrics.py holds the maths).

--cache-ref-stats stores the reference activations' statistics and pool features in a sidecar
`{ref}.{network}_ref_stats.npz` and reuses them while the reference file and network are unchanged.
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from tinyfusion.evaluation import metrics
from tinyfusion.evaluation.feature_networks import InceptionFeatures, TorchScriptFeatures
from tinyfusion.evaluation.npz_batches import (STATISTICS_KEYS, check_batch_file, check_batches_match,
                                               iterate_image_batches, read_npz_labels, read_npz_statistics)
from tinyfusion.io.atomic_files import atomic_path

REF_CACHE_VERSION = 1


def compute_activations(network, npz_path, batch_size=64, desc="activations"):
    """(pool, spatial, logits) float32 arrays of every image in npz_path, in batches."""
    batches = iterate_image_batches(npz_path, batch_size)
    num_images = next(batches)
    pools, spatials, logits = [], [], []
    for batch in tqdm(batches, total=-(-num_images // batch_size), desc=desc):
        pool, spatial, logit = network(batch)
        if not (np.isfinite(pool).all() and np.isfinite(spatial).all() and np.isfinite(logit).all()):
            raise ValueError(f"{npz_path}: the feature network {network.path} gave NaN or inf features; "
                             f"check the network file")
        pools.append(pool)
        spatials.append(spatial)
        logits.append(logit)
    return np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits)


def ref_cache_path(ref_path, network):
    base = ref_path[:-4] if ref_path.endswith(".npz") else ref_path
    return f"{base}.{network.name}_ref_stats.npz"


def _ref_cache_key(ref_path, network):
    stat = os.stat(ref_path)
    return {"cache_version": np.int64(REF_CACHE_VERSION), "source_size": np.int64(stat.st_size),
            "source_mtime_ns": np.int64(stat.st_mtime_ns), "network": np.str_(network.fingerprint())}


def load_ref_cache(cache_path, key):
    """The cached arrays when cache_path exists and matches key, else None (stale or absent)."""
    if not os.path.exists(cache_path):
        return None
    with np.load(cache_path) as data:
        if "cache_version" not in data.files:
            raise ValueError(f"{cache_path} exists but is not a reference statistics cache; move it away")
        if any(k not in data.files or data[k] != v for k, v in key.items()):
            return None
        return {k: data[k] for k in ("pool_features", *STATISTICS_KEYS)}


def reference_activations(ref_path, network, batch_size=64, cache=False, log=print):
    """Reference pool features and statistics computed from its images (or its cache)."""
    if cache:
        cache_path = ref_cache_path(ref_path, network)
        key = _ref_cache_key(ref_path, network)
        cached = load_ref_cache(cache_path, key)
        if cached is not None:
            log(f"using cached reference activations {cache_path}")
            return cached
        if os.path.exists(cache_path):
            log(f"reference cache {cache_path} is stale (reference or network changed); recomputing")
    log("computing reference batch activations...")
    pool, spatial, _ = compute_activations(network, ref_path, batch_size, desc="reference")
    mu, sigma = metrics.compute_statistics(pool)
    mu_s, sigma_s = metrics.compute_statistics(spatial)
    result = {"pool_features": pool, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if cache:
        try:
            # Replacing only our own stale cache (checked above); the reference file is never touched.
            with atomic_path(cache_path, overwrite=True) as tmp_path:
                np.savez(tmp_path, **result, **key)
            log(f"saved reference activations cache {cache_path}")
        except OSError as exc:
            log(f"warning: could not write reference cache {cache_path}: {exc}")
    return result


def evaluate(ref_batch, sample_batch, network, batch_size=64, cache_ref_stats=False,
             distance_dtype=torch.float32, fid_method="fast", device=None, log=print,
             allow_resolution_mismatch=False):
    """All metrics of sample_batch against ref_batch as a dict (floats). Both files are
    validated (each, and against each other) before any activation is computed."""
    check_batches_match(ref_batch, check_batch_file(ref_batch), sample_batch, check_batch_file(sample_batch),
                        allow_resolution_mismatch)
    ref = reference_activations(ref_batch, network, batch_size, cache_ref_stats, log)
    ref_stored = read_npz_statistics(ref_batch) if network.uses_npz_statistics else None
    check_statistics_fit(ref_batch, ref_stored, ref["pool_features"].shape[1], len(ref["mu_s"]))
    if ref_stored is not None:
        log(f"using mu/sigma stored in {ref_batch} for FID/sFID")
        ref.update(ref_stored)

    log("computing sample batch activations...")
    sample_pool, sample_spatial, sample_logits = compute_activations(network, sample_batch, batch_size, desc="samples")
    sample_stored = read_npz_statistics(sample_batch) if network.uses_npz_statistics else None
    check_statistics_fit(sample_batch, sample_stored, sample_pool.shape[1], sample_spatial.shape[1])
    if (sample_pool.shape[1], sample_spatial.shape[1]) != (len(ref["mu"]), len(ref["mu_s"])):
        raise ValueError(f"{sample_batch} gives {sample_pool.shape[1]} + {sample_spatial.shape[1]} features, "
                         f"{ref_batch} {len(ref['mu'])} + {len(ref['mu_s'])}: this feature network's output depends on "
                         f"the image size, so these batches cannot be compared")
    if sample_stored is not None:
        log(f"using mu/sigma stored in {sample_batch} for FID/sFID")
        mu, sigma, mu_s, sigma_s = (sample_stored[key] for key in STATISTICS_KEYS)
    else:
        mu, sigma = metrics.compute_statistics(sample_pool)
        mu_s, sigma_s = metrics.compute_statistics(sample_spatial)

    log("computing evaluations...")
    results = {
        "inception_score": metrics.inception_score_from_logits(sample_logits),
        "fid": metrics.frechet_distance(mu, sigma, ref["mu"], ref["sigma"], method=fid_method),
        "sfid": metrics.frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"], method=fid_method),
    }
    results["precision"], results["recall"] = metrics.precision_recall(
        ref["pool_features"], sample_pool, dtype=distance_dtype, device=device)
    labels = read_npz_labels(sample_batch)
    if labels is not None and not isinstance(network, InceptionFeatures):
        # Inception's 1008 outputs are not ImageNet class ids, so accuracy only for feature nets.
        results["classifier_accuracy"] = metrics.classifier_accuracy(sample_logits, labels)
    results.update(num_reference=int(len(ref["pool_features"])), num_samples=int(len(sample_pool)))
    return results


def check_statistics_fit(path, stored, pool_dim, spatial_dim):
    """Stored mu / mu_s must have the feature sizes of the network in use (a 2048-d Inception
    statistic against a 64-d feature net would otherwise fail deep in the maths)."""
    if stored is None:
        return
    for key, dim in (("mu", pool_dim), ("mu_s", spatial_dim)):
        if len(stored[key]) != dim:
            raise ValueError(f"{path}: stored '{key}' has {len(stored[key])} features, the feature network gives "
                             f"{dim}; stored statistics must come from the same network")


def samples_classifier_accuracy(sample_batch, feature_net, batch_size=64, device=None):
    """Share of images in sample_batch whose feature-net argmax equals their stored `labels`."""
    labels = read_npz_labels(sample_batch)
    if labels is None:
        raise ValueError(f"{sample_batch} has no 'labels' array; sample_ddp.py stores the class labels there")
    network = TorchScriptFeatures(feature_net, device)
    _, _, logits = compute_activations(network, sample_batch, batch_size, desc="classify")
    return metrics.classifier_accuracy(logits, labels)

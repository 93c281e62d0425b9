"""
Metric maths of the ADM evaluator, separate from any feature network: FID / sFID
statistics, the Frechet distance, the Inception Score, k-NN manifold precision / recall
and classifier accuracy. Inputs are plain arrays of activations, so the same functions
serve the Inception graph (evaluator.py) and small TorchScript feature networks.

Semantics follow guided-diffusion's evaluations/evaluator.py; the
implementation is faster where the maths allows it:
- covariance accumulated in float64 chunks (np.cov's numbers without its full float64 copy);
- tr(sqrtm(s1 s2)) from a Cholesky factor and symmetric eigenvalues instead of a general
  sqrtm (method="sqrtm" keeps ADM's exact algorithm, eps retry and imaginary-part check);
- pairwise distances as torch matmuls in 10,000 x 10,000 blocks, float32 by default
  (ADM uses float16) with an exact float64 option; k-NN radii keep a running k-smallest
  merge (no N-wide distance rows) and compute each symmetric block once.
"""

import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch


# ----------------------------------------------------------------------------------------
# FID statistics and Frechet distance
# ----------------------------------------------------------------------------------------

def compute_statistics(activations, chunk_size=4096):
    """(mu, sigma) of an (N, D) activation array: mean and covariance with ddof 1, float64.

    Matches np.mean / np.cov(rowvar=False) at the same speed; the covariance is accumulated
    chunk by chunk, so a 50k x 2048 float32 array never gets a whole float64 copy (800 MB).
    """
    acts = np.asarray(activations)
    if acts.ndim != 2:
        raise ValueError(f"activations must be a 2-D (N, D) array, got shape {acts.shape}")
    num, dim = acts.shape
    if num < 2:
        raise ValueError(f"need at least 2 activations for a covariance, got {num}")
    mu = acts.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((dim, dim), dtype=np.float64)
    for start in range(0, num, chunk_size):
        centered = acts[start:start + chunk_size].astype(np.float64) - mu
        sigma += centered.T @ centered
    sigma /= num - 1
    return mu, sigma


def _trace_sqrt_product_fast(sigma1, sigma2):
    """tr(sqrtm(s1 s2)) for PSD s1, s2 from symmetric eigenvalues only.

    With s1 = L L^T (Cholesky), s1 s2 is similar to L^T s2 L, which is symmetric PSD, so
    tr(sqrtm(s1 s2)) is the sum of the square roots of its eigenvalues: one Cholesky and
    one eigenvalues-only solve instead of a Schur-based sqrtm of a non-symmetric matrix.
    A singular s1 (Cholesky fails) uses s1^1/2 from an eigendecomposition instead.
    """
    try:
        factor = scipy.linalg.cholesky(sigma1, lower=True)
    except np.linalg.LinAlgError:
        evals, evecs = scipy.linalg.eigh(sigma1, driver="evd")
        scale = max(np.abs(evals).max(), np.finfo(np.float64).tiny)
        if evals.min() < -1e-6 * scale:
            raise ValueError(f"covariance is not positive semi-definite (eigenvalue {evals.min():.3g}); "
                             f"pass covariances from compute_statistics")
        factor = (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T
    middle = factor.T @ sigma2 @ factor
    middle = 0.5 * (middle + middle.T)
    middle_evals = scipy.linalg.eigvalsh(middle, driver="evd")
    # Tiny negative eigenvalues are rounding noise; sqrtm would turn them into the small
    # imaginary part that ADM drops.
    return float(np.sqrt(np.clip(middle_evals, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    # ADM's algorithm: general sqrtm, retry with eps on the diagonal when it is not finite.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm "
                             f"of the covariance product; the covariances are not valid")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="fast"):
    """|mu1-mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)).

    method="fast" (default; Cholesky + symmetric eigenvalues, exact for PSD covariances) or
    "sqrtm" (ADM's algorithm:
    scipy sqrtm, eps * I retry when not finite, error on a large imaginary part).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (different feature networks?)")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values; check the activations")
    diff = mu1 - mu2
    if method == "fast":
        tr_covmean = _trace_sqrt_product_fast(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"unknown Frechet distance method {method!r}; use 'fast' or 'sqrtm'")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ----------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------

def inception_score(probs, split_size=5000):
    """Mean over consecutive splits of exp(mean_x KL(p(y|x) || p(y))); p(y) is the split mean.

    A last partial split counts like the others (as in ADM). Zero probabilities contribute 0.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probabilities must be a non-empty (N, K) array, got shape {probs.shape}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = scipy.special.rel_entr(part, marginal).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def inception_score_from_logits(logits, split_size=5000):
    """inception_score(softmax(logits)) computed with log-softmax in float64 (no log(0))."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits must be a non-empty (N, K) array, got shape {logits.shape}")
    scores = []
    for start in range(0, len(logits), split_size):
        shifted = logits[start:start + split_size].astype(np.float64)
        shifted -= shifted.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        p = exp / total
        log_p = shifted - np.log(total)
        log_marginal = np.log(p.mean(axis=0, keepdims=True))
        kl = (p * (log_p - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------
# k-NN manifold precision / recall
# ----------------------------------------------------------------------------------------

def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_feature_tensor(features, dtype, device):
    if isinstance(features, torch.Tensor):
        features = features.to(device=device, dtype=dtype)
    else:
        features = torch.as_tensor(np.asarray(features), device=device).to(dtype)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) array, got shape {tuple(features.shape)}")
    return features


def _squared_distances(rows, row_norms, cols, col_norms):
    # ||u||^2 - 2 u.v + ||v||^2 clamped at 0, the same expansion as ADM's distance block.
    dists = torch.addmm(row_norms[:, None], rows, cols.T, beta=1.0, alpha=-2.0)
    dists += col_norms[None, :]
    return dists.clamp_min_(0.0)


@torch.no_grad()
def manifold_radii(features, k=3, batch_size=10000, dtype=torch.float32, device=None):
    """Squared distance of each point to its k-th nearest neighbour in the same set.

    The point itself is among the candidates (distance ~0) and is skipped by taking the
    (k+1)-th smallest, as ADM does; exact duplicates therefore count as neighbours.
    Returns a float64 NumPy array of shape (N,).
    """
    device = torch.device(device) if device is not None else _default_device()
    feats = _as_feature_tensor(features, dtype, device)
    num = len(feats)
    if num <= k:
        raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {num}")
    norms = (feats * feats).sum(dim=1)
    starts = list(range(0, num, batch_size))
    nearest = [None] * len(starts)  # per row block: (rows, <= k+1) smallest distances so far

    def merge(current, candidates):
        if current is not None:
            candidates = torch.cat([current, candidates], dim=1)
        keep = min(k + 1, candidates.shape[1])
        return torch.topk(candidates, keep, dim=1, largest=False, sorted=True).values

    # The distance matrix is symmetric: each off-diagonal block serves its rows and, transposed,
    # its columns, so only the upper block triangle is computed.
    for i, row_start in enumerate(starts):
        rows = slice(row_start, row_start + batch_size)
        for j in range(i, len(starts)):
            cols = slice(starts[j], starts[j] + batch_size)
            dists = _squared_distances(feats[rows], norms[rows], feats[cols], norms[cols])
            nearest[i] = merge(nearest[i], dists)
            if j != i:
                nearest[j] = merge(nearest[j], dists.T)
    radii = torch.cat([block[:, k] for block in nearest])
    return radii.cpu().double().numpy()


@torch.no_grad()
def precision_recall(ref_features, sample_features, k=3, batch_size=10000, dtype=torch.float32,
                     device=None, ref_radii=None, sample_radii=None):
    """Improved precision / recall (Kynkaanniemi et al.) with k-NN balls, ADM semantics.

    precision = share of samples inside some reference ball (distance <= radius),
    recall = share of reference points inside some sample ball. dtype=torch.float64 gives
    exact distances; the default float32 matches ADM's float16/float32 to ~1e-3 or better.
    """
    device = torch.device(device) if device is not None else _default_device()
    ref = _as_feature_tensor(ref_features, dtype, device)
    sample = _as_feature_tensor(sample_features, dtype, device)
    if ref.shape[1] != sample.shape[1]:
        raise ValueError(f"reference features have {ref.shape[1]} dims but samples have "
                         f"{sample.shape[1]}; both batches must use the same feature network")
    if ref_radii is None:
        ref_radii = manifold_radii(ref, k, batch_size, dtype, device)
    if sample_radii is None:
        sample_radii = manifold_radii(sample, k, batch_size, dtype, device)
    # Radii are compared in the distance dtype, as ADM compares float32 with float32.
    ref_radii = torch.as_tensor(ref_radii, device=device).to(dtype)
    sample_radii = torch.as_tensor(sample_radii, device=device).to(dtype)
    ref_norms = (ref * ref).sum(dim=1)
    sample_norms = (sample * sample).sum(dim=1)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=device)
    for ref_start in range(0, len(ref), batch_size):
        ref_stop = ref_start + batch_size
        for sample_start in range(0, len(sample), batch_size):
            sample_stop = sample_start + batch_size
            dists = _squared_distances(ref[ref_start:ref_stop], ref_norms[ref_start:ref_stop],
                                       sample[sample_start:sample_stop],
                                       sample_norms[sample_start:sample_stop])
            ref_inside[ref_start:ref_stop] |= (dists <= sample_radii[None, sample_start:sample_stop]).any(dim=1)
            sample_inside[sample_start:sample_stop] |= (dists <= ref_radii[ref_start:ref_stop, None]).any(dim=0)
    precision = sample_inside.double().mean().item()
    recall = ref_inside.double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------
# Classifier accuracy
# ----------------------------------------------------------------------------------------

def classifier_accuracy(logits, labels):
    """Share of rows whose argmax logit equals the given label."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"need (N, K) logits and N labels, got {logits.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for a {logits.shape[1]}-class "
                         f"classifier, got range [{labels.min()}, {labels.max()}]")
    return float((logits.argmax(axis=1) == labels).mean())

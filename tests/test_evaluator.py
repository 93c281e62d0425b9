"""Tests for metrics.py (closed forms, hand-computed scores, brute-force oracles) and
evaluator.py (a tiny frozen TF graph with the real tensor names, TorchScript feature nets,
stored / cached reference statistics, the CLI)."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluator
from tinyfusion.io import downloads
from tinyfusion.evaluation import batch_metrics, feature_networks, metrics
from tinyfusion.errors import TinyFusionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["fast", "sqrtm"]


def random_spd(rng, dim, scale=1.0):
    a = rng.standard_normal((dim, dim))
    return scale * (a @ a.T / dim + 0.1 * np.eye(dim))


# ----------------------------------------------------------------------------------------
# Statistics and Frechet distance
# ----------------------------------------------------------------------------------------

def test_statistics_match_numpy_mean_and_cov_across_chunks():
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((257, 12)) * 3 + 5).astype(np.float32)
    mu, sigma = metrics.compute_statistics(acts, chunk_size=50)  # 6 chunks, last partial
    np.testing.assert_allclose(mu, acts.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(acts.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_one_dimensional_closed_form(method):
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    fd = metrics.frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]),
                                      method=method)
    assert fd == pytest.approx((1.5 + 0.5) ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_diagonal_closed_form(method):
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 5, 20), rng.uniform(0.1, 5, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert fd == pytest.approx(expected, rel=1e-10)
    # a zero variance makes the first covariance singular (no Cholesky factor)
    a[3] = 0.0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fd = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert fd == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_general_spd(method):
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 30), random_spd(rng, 30, 2.0)
    mu1, mu2 = rng.standard_normal(30), rng.standard_normal(30)
    # Independent path: the eigenvalues of s1 s2 are real and positive; tr sqrtm = sum of roots.
    eigenvalues = np.linalg.eigvals(s1 @ s2)
    assert np.abs(eigenvalues.imag).max() < 1e-9 and eigenvalues.real.min() > 0
    tr_sqrt = np.sqrt(eigenvalues.real).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)
    # Scaled covariance: FD(N(0, S), N(0, c^2 S)) = (1 - c)^2 tr(S)
    assert metrics.frechet_distance(mu1, s1, mu1, 9.0 * s1, method=method) == pytest.approx(4 * np.trace(s1), rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_self_zero_and_symmetric(method):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    y = rng.standard_normal((400, 16)) * 2 + 1
    mx, sx = metrics.compute_statistics(x)
    my, sy = metrics.compute_statistics(y)
    assert abs(metrics.frechet_distance(mx, sx, mx, sx, method=method)) < 1e-8
    forward = metrics.frechet_distance(mx, sx, my, sy, method=method)
    assert forward > 1.0
    assert metrics.frechet_distance(my, sy, mx, sx, method=method) == pytest.approx(forward, rel=1e-9)


def test_frechet_methods_agree_on_rank_deficient_covariances():
    # Fewer samples than dims: both covariances are singular; the fast path needs no eps.
    rng = np.random.default_rng(4)
    mx, sx = metrics.compute_statistics(rng.standard_normal((20, 40)))
    my, sy = metrics.compute_statistics(rng.standard_normal((25, 40)) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = metrics.frechet_distance(mx, sx, my, sy, method="sqrtm")
    assert metrics.frechet_distance(mx, sx, my, sy, method="fast") == pytest.approx(exact, rel=1e-4)


def test_sqrtm_method_retries_with_eps_when_not_finite(monkeypatch):
    rng = np.random.default_rng(5)
    s1, s2 = random_spd(rng, 6), random_spd(rng, 6)
    mu = np.zeros(6)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky_sqrtm(matrix, *args, **kwargs):
        calls.append(matrix.copy())
        if len(calls) == 1:
            return np.full_like(matrix, np.nan)
        return real_sqrtm(matrix, *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        fd = metrics.frechet_distance(mu, s1, mu, s2, method="sqrtm")
    eye = np.eye(6) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eye) @ (s2 + eye))
    expected = metrics.frechet_distance(mu, s1, mu, s2, method="fast")
    # the retried product carries eps on the diagonal: tr(sqrtm) moves by O(eps), not more
    assert fd == pytest.approx(expected, abs=1e-4)
    assert fd != expected


def test_sqrtm_method_imaginary_part(monkeypatch):
    rng = np.random.default_rng(6)
    s1, s2 = random_spd(rng, 4), random_spd(rng, 4)
    mu = np.zeros(4)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: root + 1e-5j)
    small = metrics.frechet_distance(mu, s1, mu, s2, method="sqrtm")  # small imaginary: dropped
    assert small == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * np.trace(root), rel=1e-12)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m, *a, **k: root + 0.5j)
    with pytest.raises(ValueError, match="imaginary component"):
        metrics.frechet_distance(mu, s1, mu, s2, method="sqrtm")


def test_frechet_distance_rejects_non_psd_covariance():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.eye(2))


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------

def test_inception_score_one_hot_and_uniform():
    num_classes = 10
    one_hot = np.eye(num_classes)[np.arange(1000) % num_classes]
    assert metrics.inception_score(one_hot) == pytest.approx(num_classes, rel=1e-12)
    assert metrics.inception_score(np.full((1000, 7), 1 / 7)) == pytest.approx(1.0, rel=1e-12)
    # logits whose softmax is one-hot up to e^-60
    assert metrics.inception_score_from_logits(60.0 * one_hot) == pytest.approx(num_classes, rel=1e-12)
    assert metrics.inception_score_from_logits(np.zeros((1000, 7))) == pytest.approx(1.0, rel=1e-12)


def test_inception_score_uses_consecutive_splits_of_5000():
    # First 5000: one-hot over 4 classes (split score 4). Next 5000: rows [.5,.5,0,0] and
    # [0,0,.5,.5], marginal uniform, KL = log 2 per row (split score 2). Mean = 3.
    first = np.eye(4)[np.arange(5000) % 4]
    pairs = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    second = pairs[np.arange(5000) % 2]
    probs = np.concatenate([first, second])
    assert metrics.inception_score(probs) == pytest.approx(3.0, rel=1e-12)
    # One split over all 10000 would give a different number: the marginal is (3/8 ... ).
    whole = metrics.inception_score(probs, split_size=10000)
    assert abs(whole - 3.0) > 0.1
    # A last partial split counts as a split of its own: 5000 + 5000 + 2000 (uniform, score 1).
    with_tail = np.concatenate([probs, np.full((2000, 4), 0.25)])
    assert metrics.inception_score(with_tail) == pytest.approx((4 + 2 + 1) / 3, rel=1e-12)


def test_inception_score_from_logits_matches_probabilities():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6000, 50)).astype(np.float32) * 3
    probs = np.exp(logits.astype(np.float64))
    probs /= probs.sum(1, keepdims=True)
    assert metrics.inception_score_from_logits(logits) == pytest.approx(metrics.inception_score(probs), rel=1e-10)


# ----------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------

def brute_force_precision_recall(ref, sample, k=3):
    ref, sample = ref.astype(np.float64), sample.astype(np.float64)

    def sq_dists(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(sq_dists(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    sample_radii = np.sort(sq_dists(sample, sample), axis=1)[:, k]
    cross = sq_dists(ref, sample)
    precision = np.mean([any(cross[i, j] <= ref_radii[i] for i in range(len(ref))) for j in range(len(sample))])
    recall = np.mean([any(cross[i, j] <= sample_radii[j] for j in range(len(sample))) for i in range(len(ref))])
    return precision, recall, ref_radii


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_recall_matches_brute_force(dtype):
    rng = np.random.default_rng(8)
    ref = rng.standard_normal((60, 8)).astype(np.float32)
    sample = (rng.standard_normal((45, 8)) + 0.8).astype(np.float32)
    precision, recall, ref_radii = brute_force_precision_recall(ref, sample)
    assert 0.1 < precision < 0.95 and 0.1 < recall < 0.95  # a non-trivial case
    radii = metrics.manifold_radii(ref, batch_size=7, dtype=dtype, device="cpu")
    tiny_blocks = metrics.manifold_radii(ref, batch_size=2, dtype=dtype, device="cpu")  # < k + 1 columns
    np.testing.assert_allclose(tiny_blocks, ref_radii, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    np.testing.assert_allclose(radii, ref_radii, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    # blocks of 7 rows / columns exercise the running k-smallest merge and partial blocks
    got = metrics.precision_recall(ref, sample, batch_size=7, dtype=dtype, device="cpu")
    assert got == pytest.approx((precision, recall), abs=1e-12)


def test_precision_recall_identical_and_far_apart():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 16))
    assert metrics.precision_recall(x, x.copy(), device="cpu") == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0, device="cpu") == (0.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_on_the_ball_boundary_count_as_inside(dtype):
    # Integer coordinates make every squared distance exact even in float32.
    ref = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], dtype=np.float32)
    # reference radii (squared, 3rd neighbour): 9, 4, 4, 9. Sample (-3, 0) is at squared
    # distance 9 from (0, 0): exactly on the boundary. (-3.5, 0) and the far points are outside.
    sample = np.array([[-3, 0], [-3.5, 0], [50, 0], [51, 0], [52, 0]], dtype=np.float32)
    np.testing.assert_array_equal(metrics.manifold_radii(ref, dtype=dtype, device="cpu"), [9, 4, 4, 9])
    precision, recall = metrics.precision_recall(ref, sample, dtype=dtype, device="cpu")
    assert precision == pytest.approx(1 / 5)
    assert (precision, recall) == pytest.approx(brute_force_precision_recall(ref, sample)[:2])
    # roles swapped: the boundary sample is now a reference point inside a sample ball
    assert metrics.precision_recall(sample, ref, dtype=dtype, device="cpu")[1] == pytest.approx(1 / 5)


def test_classifier_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert metrics.classifier_accuracy(logits, [0, 1, 2, 1]) == 0.75
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.classifier_accuracy(logits, [0, 1, 2, 3])


# ----------------------------------------------------------------------------------------
# TorchScript feature networks
# ----------------------------------------------------------------------------------------

class ChannelMeanNet(torch.nn.Module):
    """Feature net with hand-checkable outputs: pool = per-channel means, spatial = every 4th
    pixel, logits = -(red mean - class centre)^2 for 10 centres 0, 25, ..., 225."""

    def forward(self, images: torch.Tensor):
        assert images.shape[-1] == 3  # NHWC
        means = images.mean(dim=(1, 2))
        spatial = images[:, ::4, ::4, :].flatten(1)
        centres = torch.arange(10, dtype=images.dtype, device=images.device) * 25.0
        logits = -(means[:, :1] - centres[None, :]) ** 2
        return means, spatial, logits


def noisy_images(rng, count, size=12, classes=None):
    """Images whose red mean sits near class centre 25 * label (noise on the other channels)."""
    labels = rng.integers(0, 10, count) if classes is None else classes
    images = rng.integers(0, 256, (count, size, size, 3)).astype(np.float64)
    images[..., 0] = 25.0 * labels[:, None, None] + rng.integers(-3, 4, (count, size, size))
    return np.clip(images, 0, 255).astype(np.uint8), labels


@pytest.fixture
def channel_mean_net(tmp_path):
    path = str(tmp_path / "channel_mean.pt")
    torch.jit.script(ChannelMeanNet()).save(path)
    return path


def test_feature_net_evaluation_matches_direct_computation(tmp_path, channel_mean_net):
    rng = np.random.default_rng(10)
    ref_images, _ = noisy_images(rng, 40)
    sample_images, labels = noisy_images(rng, 30)
    ref_path, sample_path = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    np.savez(ref_path, arr_0=ref_images)
    np.savez_compressed(sample_path, arr_0=sample_images, labels=labels)  # deflated member
    network = feature_networks.TorchScriptFeatures(channel_mean_net, device="cpu")
    results = batch_metrics.evaluate(ref_path, sample_path, network, batch_size=7, device="cpu", log=lambda *a: None)

    def features(images):
        x = images.astype(np.float64)
        return x.mean(axis=(1, 2)), x[:, ::4, ::4, :].reshape(len(x), -1)

    ref_pool, ref_spatial = features(ref_images)
    sample_pool, sample_spatial = features(sample_images)
    expected_fid = metrics.frechet_distance(*metrics.compute_statistics(sample_pool),
                                                *metrics.compute_statistics(ref_pool))
    expected_sfid = metrics.frechet_distance(*metrics.compute_statistics(sample_spatial),
                                                 *metrics.compute_statistics(ref_spatial))
    assert results["fid"] == pytest.approx(expected_fid, rel=1e-4)
    assert results["sfid"] == pytest.approx(expected_sfid, rel=1e-4)
    assert (results["precision"], results["recall"]) == pytest.approx(
        brute_force_precision_recall(ref_pool, sample_pool)[:2])
    logits = -(sample_pool[:, :1] - 25.0 * np.arange(10)[None]) ** 2
    assert results["inception_score"] == pytest.approx(metrics.inception_score_from_logits(logits), rel=1e-4)
    assert results["classifier_accuracy"] == 1.0  # red means sit within 3 of the labels' centres
    assert (results["num_reference"], results["num_samples"]) == (40, 30)

    # quick-start helper: accuracy against stored labels, 1/3 of them wrong
    wrong = labels.copy()
    wrong[::3] = (wrong[::3] + 1) % 10
    np.savez(str(tmp_path / "wrong.npz"), arr_0=sample_images, labels=wrong)
    accuracy = batch_metrics.samples_classifier_accuracy(str(tmp_path / "wrong.npz"), channel_mean_net, device="cpu")
    assert accuracy == pytest.approx(1 - 10 / 30)


def test_ref_stats_cache_sidecar(tmp_path, channel_mean_net):
    rng = np.random.default_rng(11)
    ref_path, sample_path = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    np.savez(ref_path, arr_0=noisy_images(rng, 40)[0])
    np.savez(sample_path, arr_0=noisy_images(rng, 30)[0])
    ref_bytes = open(ref_path, "rb").read()
    network = feature_networks.TorchScriptFeatures(channel_mean_net, device="cpu")
    messages = []
    first = batch_metrics.evaluate(ref_path, sample_path, network, cache_ref_stats=True, device="cpu", log=messages.append)
    cache_path = str(tmp_path / "ref.channel_mean_ref_stats.npz")
    assert batch_metrics.ref_cache_path(ref_path, network) == cache_path and os.path.exists(cache_path)
    with np.load(cache_path) as cache:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool_features"} <= set(cache.files)
        assert cache["pool_features"].shape == (40, 3)
    messages.clear()
    second = batch_metrics.evaluate(ref_path, sample_path, network, cache_ref_stats=True, device="cpu", log=messages.append)
    assert any("using cached" in m for m in messages)
    assert not any("computing reference" in m for m in messages)
    assert second == first
    assert open(ref_path, "rb").read() == ref_bytes  # the reference file is never rewritten

    # a changed reference makes the cache stale: recomputed, and the new numbers differ
    np.savez(ref_path, arr_0=noisy_images(rng, 40)[0])
    os.utime(ref_path, ns=(1, 1))
    messages.clear()
    third = batch_metrics.evaluate(ref_path, sample_path, network, cache_ref_stats=True, device="cpu", log=messages.append)
    assert any("stale" in m for m in messages) and third["fid"] != first["fid"]

    # a foreign file at the sidecar path is never overwritten
    os.replace(cache_path, cache_path + ".bak")
    np.savez(cache_path, something=np.zeros(3))
    with pytest.raises(ValueError, match="not a reference statistics cache"):
        batch_metrics.evaluate(ref_path, sample_path, network, cache_ref_stats=True, device="cpu", log=lambda *a: None)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluator.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)


def test_cli_prints_adm_lines_and_json(tmp_path, channel_mean_net):
    rng = np.random.default_rng(12)
    images, labels = noisy_images(rng, 30)
    ref_path, sample_path, json_path = (str(tmp_path / n) for n in ("ref.npz", "sample.npz", "out.json"))
    np.savez(ref_path, arr_0=images)
    np.savez(sample_path, arr_0=images, labels=labels)  # identical batches
    done = run_cli(ref_path, sample_path, "--feature-net", channel_mean_net, "--json", json_path, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert abs(float(lines["FID"])) < 1e-6 and abs(float(lines["sFID"])) < 1e-6
    assert float(lines["Precision"]) == 1.0 and float(lines["Recall"]) == 1.0
    assert float(lines["Classifier accuracy"]) == 1.0
    assert float(lines["Inception Score"]) > 1.0
    latex = [line for line in done.stdout.splitlines() if line.startswith("LaTeX")][0]
    row = latex.split("): ", 1)[1]
    assert row.rstrip().endswith("\\\\") and row.count("&") == 4
    assert float(row.split("&")[0]) == pytest.approx(float(lines["Inception Score"]), abs=0.005)
    record = json.load(open(json_path))
    assert record["fid"] == pytest.approx(float(lines["FID"])) and record["recall"] == 1.0
    # the JSON result is never overwritten silently
    again = run_cli(ref_path, sample_path, "--feature-net", channel_mean_net, "--json", json_path)
    assert again.returncode != 0 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_cli_missing_inception_graph_is_one_clear_error(tmp_path):
    np.savez(str(tmp_path / "x.npz"), arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    env = dict(os.environ)
    env.pop(feature_networks.INCEPTION_ENV, None)
    missing = str(tmp_path / "nowhere" / "classify_image_graph_def.pb")
    done = run_cli(str(tmp_path / "x.npz"), str(tmp_path / "x.npz"), "--inception-path", missing, env=env)
    assert done.returncode != 0
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error:")
    assert feature_networks.INCEPTION_URL in message and missing in message and feature_networks.INCEPTION_ENV in message
    # the environment variable is the fallback when --inception-path is not given
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(feature_networks.INCEPTION_ENV, missing + ".env")
        with pytest.raises(ValueError, match=r"nowhere/classify_image_graph_def\.pb\.env"):
            feature_networks.resolve_inception_path(None)
        graph = tmp_path / "graph.pb"
        graph.write_bytes(b"")
        mp.setenv(feature_networks.INCEPTION_ENV, str(graph))
        assert feature_networks.resolve_inception_path(None) == str(graph)
        with pytest.raises(ValueError, match="not found"):  # an explicit path wins over the variable
            feature_networks.resolve_inception_path(missing)


def test_bad_npz_inputs_are_clear_errors(tmp_path, channel_mean_net):
    network = feature_networks.TorchScriptFeatures(channel_mean_net, device="cpu")
    np.savez(str(tmp_path / "gray.npz"), arr_0=np.zeros((4, 8, 8), np.uint8))
    np.savez(str(tmp_path / "nokey.npz"), images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\)"):
        batch_metrics.compute_activations(network, str(tmp_path / "gray.npz"))
    with pytest.raises(ValueError, match="no 'arr_0' array"):
        batch_metrics.compute_activations(network, str(tmp_path / "nokey.npz"))
    with pytest.raises(ValueError, match="does not exist"):
        batch_metrics.compute_activations(network, str(tmp_path / "absent.npz"))


def test_batches_of_another_resolution_are_refused_unless_allowed(tmp_path, channel_mean_net):
    rng = np.random.default_rng(21)
    ref_path, sample_path = str(tmp_path / "ref256.npz"), str(tmp_path / "sample512.npz")
    np.savez(ref_path, arr_0=noisy_images(rng, 20, size=12)[0])
    np.savez(sample_path, arr_0=noisy_images(rng, 20, size=10)[0])
    flags = [ref_path, sample_path, "--feature-net", channel_mean_net, "--device", "cpu"]
    with pytest.raises(TinyFusionError) as error:
        evaluator.main(evaluator.parse_args(flags))
    message = str(error.value)
    assert "\n" not in message and f"{ref_path} holds 12x12 images but {sample_path} holds 10x10" in message
    assert "--allow-resolution-mismatch" in message
    with pytest.raises(ValueError, match="holds 12x12 images"):  # the library refuses too
        batch_metrics.evaluate(ref_path, sample_path, feature_networks.TorchScriptFeatures(channel_mean_net, "cpu"), log=print)
    evaluator.main(evaluator.parse_args([*flags, "--allow-resolution-mismatch"]))  # an explicit choice runs


def test_every_array_error_names_its_file(tmp_path, channel_mean_net):
    rng = np.random.default_rng(22)
    images, labels = noisy_images(rng, 12)
    good, short_labels, float_labels, stats = (str(tmp_path / n) for n in ("good.npz", "short_labels.npz",
                                                                         "float_labels.npz", "stats.npz"))
    np.savez(good, arr_0=images)
    np.savez(short_labels, arr_0=images, labels=labels[:5])
    np.savez(float_labels, arr_0=images, labels=labels.astype(np.float32))
    np.savez(stats, arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(27), sigma_s=np.eye(27))
    network = feature_networks.TorchScriptFeatures(channel_mean_net, "cpu")
    network.uses_npz_statistics = True  # as Inception: stored statistics are used, and must fit the network
    for path, fragment in ((short_labels, "'labels' is int64 (5,)"), (float_labels, "'labels' is float32"),
                           (stats, "stored 'mu' has 2048 features, the feature network gives 3")):
        with pytest.raises(ValueError) as error:
            batch_metrics.evaluate(good, path, network, log=lambda *a: None)
        assert str(error.value).startswith(path) and fragment in str(error.value)


def test_inception_graph_is_downloaded_when_absent_and_checked(tmp_path, monkeypatch, capsys):
    from test_downloads import closed_port, serve  # the local HTTP server
    tf = pytest.importorskip("tensorflow")  # noqa: F841
    rng = np.random.default_rng(23)
    graph_path = str(tmp_path / "standin.pb")
    build_tiny_inception_graph(graph_path, rng)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(feature_networks.INCEPTION_ENV, raising=False)
    # offline: one line saying what to do
    monkeypatch.setenv(downloads.URL_ENVIRONMENT_VARIABLE, f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(TinyFusionError) as error:
        feature_networks.resolve_inception_path(None)
    message = str(error.value)
    assert "\n" not in message and "offline?" in message and "--inception-path" in message
    assert not os.path.exists("pretrained")
    with serve({"classify_image_graph_def.pb": open(graph_path, "rb").read()}, monkeypatch) as state:
        requests = state.requests
        network = feature_networks.load_feature_network(None, None)
        assert network.path == os.path.join("pretrained", "classify_image_graph_def.pb") and len(requests) == 1
        assert network.softmax_weights.shape == (2048, 1008)
        pinned = downloads.read_manifest("pretrained")["classify_image_graph_def.pb"]
        assert pinned["sha256"] == downloads.file_sha256(graph_path)
        assert "pinned" in capsys.readouterr().out
        assert feature_networks.resolve_inception_path(None) == network.path and len(requests) == 1  # found, not fetched


# ----------------------------------------------------------------------------------------
# TensorFlow Inception path on a tiny frozen graph with the real tensor names
# ----------------------------------------------------------------------------------------

TINY_RESIZE = 17  # the real graph resizes to 299; the code must not depend on it


def build_tiny_inception_graph(path, rng):
    """Mimic classify_image_graph_def.pb: DecodeJpeg -> Cast -> ExpandDims -> ResizeBilinear ->
    Sub/Mul to [-1, 1] -> mixed_6/conv (1,17,17,8) -> ... -> pool_3 (1,1,1,2048) ->
    pool_3/_reshape [1, 2048] -> softmax/logits/MatMul (+ biases) -> softmax."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    weights = {"w_spatial": rng.standard_normal((1, 1, 3, 8)).astype(np.float32),
               "w_pool": (rng.standard_normal((1, 1, 8, 2048)) * 0.5).astype(np.float32),
               "w_softmax": (rng.standard_normal((2048, 1008)) * 0.05).astype(np.float32),
               "b_softmax": rng.standard_normal(1008).astype(np.float32)}
    graph = tf1.Graph()
    with graph.as_default():
        jpeg = tf1.placeholder(tf.uint8, [None, None, 3], name="DecodeJpeg")
        image = tf.cast(jpeg, tf.float32, name="Cast")
        batch = tf.expand_dims(image, 0, name="ExpandDims")
        resized = tf1.image.resize_bilinear(batch, tf.constant([TINY_RESIZE, TINY_RESIZE]),
                                            align_corners=False, name="ResizeBilinear")
        scaled = tf.multiply(tf.subtract(resized, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        spatial = tf.nn.conv2d(scaled, tf.constant(weights["w_spatial"]), [1, 1, 1, 1], "VALID", name="mixed_6/conv")
        mixed = tf.nn.relu(tf.nn.conv2d(spatial, tf.constant(weights["w_pool"]), [1, 1, 1, 1], "VALID"), name="mixed_10/join")
        pool = tf.nn.avg_pool2d(mixed, [1, TINY_RESIZE, TINY_RESIZE, 1], [1, 1, 1, 1], "VALID", name="pool_3")
        flat = tf.reshape(pool, [1, 2048], name="pool_3/_reshape")  # batch-1 only, like the real graph
        matmul = tf.matmul(flat, tf.constant(weights["w_softmax"], name="softmax/weights"), name="softmax/logits/MatMul")
        logits = tf.add(matmul, tf.constant(weights["b_softmax"], name="softmax/biases"), name="softmax/logits")
        tf.nn.softmax(logits, name="softmax")
    with open(path, "wb") as f:
        f.write(graph.as_graph_def(add_shapes=True).SerializeToString())  # with _output_shapes, as frozen graphs
    return weights


def numpy_tiny_inception(images, weights):
    """NumPy re-computation of the tiny graph: legacy TF1 bilinear resize (align_corners=False,
    no half-pixel centres), affine rescale, 1x1 convs, average pool, pool @ W."""
    x = images.astype(np.float64)
    size_in = x.shape[1]
    src = np.arange(TINY_RESIZE) * (size_in / TINY_RESIZE)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = src - low
    rows = x[:, low] * (1 - frac)[None, :, None, None] + x[:, high] * frac[None, :, None, None]
    resized = rows[:, :, low] * (1 - frac)[None, None, :, None] + rows[:, :, high] * frac[None, None, :, None]
    scaled = (resized - 128.0) / 128.0
    spatial = np.einsum("bhwc,cd->bhwd", scaled, weights["w_spatial"][0, 0].astype(np.float64))
    mixed = np.maximum(np.einsum("bhwc,cd->bhwd", spatial, weights["w_pool"][0, 0].astype(np.float64)), 0)
    pool = mixed.mean(axis=(1, 2))
    logits = pool @ weights["w_softmax"].astype(np.float64)  # no bias, as ADM
    return pool, spatial[..., :7].reshape(len(x), -1), logits


def test_tensorflow_inception_path_on_tiny_graph(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(13)
    graph_path = str(tmp_path / "classify_image_graph_def.pb")
    weights = build_tiny_inception_graph(graph_path, rng)
    ref_images = rng.integers(0, 256, (70, 23, 23, 3)).astype(np.uint8)  # 70: a batch of 64 + a partial one
    sample_images = np.clip(ref_images[:50].astype(int) + rng.integers(-40, 41, (50, 23, 23, 3)), 0, 255).astype(np.uint8)

    network = feature_networks.InceptionFeatures(graph_path)
    assert network.softmax_weights.shape == (2048, 1008)
    np.testing.assert_array_equal(network.softmax_weights, weights["w_softmax"])
    pool, spatial, logits = network(ref_images[:5].astype(np.float32))
    want_pool, want_spatial, want_logits = numpy_tiny_inception(ref_images[:5], weights)
    assert spatial.shape == (5, 2023) and pool.shape == (5, 2048) and logits.shape == (5, 1008)
    np.testing.assert_allclose(pool, want_pool, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(spatial, want_spatial, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-3)

    ref_path, sample_path = str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz")
    np.savez(ref_path, arr_0=ref_images)
    np.savez(sample_path, arr_0=sample_images)
    # The Frechet maths is tested above; here record which statistics reach it (2048-d
    # eigendecompositions would dominate this test's time).
    fd_calls = []

    def recording_frechet_distance(mu1, sigma1, mu2, sigma2, **kwargs):
        fd_calls.append((mu1, sigma1, mu2, sigma2))
        return float(len(fd_calls))

    monkeypatch.setattr(metrics, "frechet_distance", recording_frechet_distance)
    results = batch_metrics.evaluate(ref_path, sample_path, network, device="cpu", log=lambda *a: None)
    ref_pool, ref_spatial, _ = numpy_tiny_inception(ref_images, weights)
    sample_pool, sample_spatial, sample_logits = numpy_tiny_inception(sample_images, weights)

    def assert_stats(got, want):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())

    sample_stats = np.mean(sample_pool, 0), np.cov(sample_pool, rowvar=False)
    sample_stats_s = np.mean(sample_spatial, 0), np.cov(sample_spatial, rowvar=False)
    assert (results["fid"], results["sfid"]) == (1.0, 2.0) and len(fd_calls) == 2
    assert fd_calls[1][0].shape == (2023,)  # sFID: first 7 channels of 17x17, NHWC order
    assert_stats(fd_calls[0], (*sample_stats, np.mean(ref_pool, 0), np.cov(ref_pool, rowvar=False)))
    assert_stats(fd_calls[1], (*sample_stats_s, np.mean(ref_spatial, 0), np.cov(ref_spatial, rowvar=False)))
    assert results["inception_score"] == pytest.approx(metrics.inception_score_from_logits(sample_logits), rel=1e-4)
    assert (results["precision"], results["recall"]) == pytest.approx(
        brute_force_precision_recall(ref_pool, sample_pool)[:2], abs=1 / 50)

    # A reference .npz that stores mu / sigma / mu_s / sigma_s: those win for FID / sFID,
    # its images still feed precision / recall.
    stored = {"mu": rng.standard_normal(2048) * 0.1, "sigma": np.eye(2048) * 0.01,
              "mu_s": rng.standard_normal(2023), "sigma_s": np.eye(2023) * 0.5}
    stats_ref_path = str(tmp_path / "ref_with_stats.npz")
    np.savez(stats_ref_path, arr_0=ref_images, **stored)
    fd_calls.clear()
    with_stats = batch_metrics.evaluate(stats_ref_path, sample_path, network, device="cpu", log=lambda *a: None)
    assert_stats(fd_calls[0], (*sample_stats, stored["mu"], stored["sigma"]))
    assert_stats(fd_calls[1], (*sample_stats_s, stored["mu_s"], stored["sigma_s"]))
    assert (with_stats["precision"], with_stats["recall"]) == (results["precision"], results["recall"])


# ----------------------------------------------------------------------------------------
# The digits classifier (tools/train_digits_classifier.py), trained for real: slow
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mnist5k_classifier_reads_held_out_digits_at_16px(tmp_path):
    out, ref_out = str(tmp_path / "mnist.pt"), str(tmp_path / "mnist_ref16.npz")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_digits_classifier.py"), "--out", out,
                           "--dataset", "mnist5k", "--image-size", "16", "--ref-out", ref_out, "--threads", "1"],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    with np.load(ref_out) as ref:  # the reference is the held-out split: 100 of each class
        assert ref["arr_0"].shape == (1000, 16, 16, 3) and np.bincount(ref["labels"]).tolist() == [100] * 10
    # never trained on these: a generalisation figure
    assert batch_metrics.samples_classifier_accuracy(ref_out, out, device="cpu") >= 0.95
    mirrored = str(tmp_path / "mirrored.npz")
    with np.load(ref_out) as ref:
        np.savez(mirrored, arr_0=ref["arr_0"][:, :, ::-1], labels=ref["labels"])
    assert batch_metrics.samples_classifier_accuracy(mirrored, out, device="cpu") < 0.6  # a mirror changes a digit


@pytest.mark.slow
def test_digits_classifier_trains_and_scores_rendered_digits(tmp_path):
    from PIL import Image

    from tinyfusion.study.digits import digits_as_uint8

    out, ref_out = str(tmp_path / "digits_classifier.pt"), str(tmp_path / "digits_ref32.npz")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_digits_classifier.py"), "--out", out,
                           "--image-size", "32", "--ref-out", ref_out], capture_output=True, text=True, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    accuracy_line = [line for line in done.stdout.splitlines() if line.startswith("held-out accuracy")][0]
    held_out = [float(part.split()[0]) for part in accuracy_line.split(": ", 1)[1].split(", ")]
    assert min(held_out) >= 0.9, accuracy_line

    # Digits rendered the way tools/make_digits.py writes them (PIL bicubic, grey -> RGB),
    # at 32 px and at 16 px (resized inside the network).
    digits, labels = digits_as_uint8()
    batches = {}
    for size in (32, 16):
        images = np.stack([np.asarray(Image.fromarray(d).resize((size, size), Image.BICUBIC).convert("RGB"))
                           for d in digits])
        batches[size] = images
        if size == 32:
            with np.load(ref_out) as ref:
                np.testing.assert_array_equal(ref["arr_0"], images)
                np.testing.assert_array_equal(ref["labels"], labels)
        path = str(tmp_path / f"digits{size}.npz")
        np.savez(path, arr_0=images, labels=labels)
        # includes the training digits, so this is a rendering check, not a generalisation claim
        assert batch_metrics.samples_classifier_accuracy(path, out, device="cpu") >= 0.95
    shuffled = str(tmp_path / "shuffled.npz")
    np.savez(shuffled, arr_0=batches[32], labels=np.random.default_rng(0).permutation(labels))
    assert batch_metrics.samples_classifier_accuracy(shuffled, out, device="cpu") < 0.3

    # FID under this feature net: two halves of the digits are close, noise images are far.
    network = feature_networks.TorchScriptFeatures(out, device="cpu")
    halves = [str(tmp_path / n) for n in ("first.npz", "second.npz", "noise.npz")]
    np.savez(halves[0], arr_0=batches[32][0::2])
    np.savez(halves[1], arr_0=batches[32][1::2])
    np.savez(halves[2], arr_0=np.random.default_rng(1).integers(0, 256, (800, 32, 32, 3), dtype=np.uint8))
    close = batch_metrics.evaluate(halves[0], halves[1], network, device="cpu", log=lambda *a: None)
    far = batch_metrics.evaluate(halves[0], halves[2], network, device="cpu", log=lambda *a: None)
    assert far["fid"] > 20 * close["fid"] and close["precision"] > 0.8 and far["precision"] < 0.05
    assert close["inception_score"] > 7.0  # ten well-separated classes

"""Masked knowledge distillation: the loss against an independent float64 evaluation of the
original's formula, the outlier masks, the student/teacher layer maps, and train_masked_kd.py's
command line (bad inputs, a short run). The long "distillation beats fine-tuning" comparison is
marked slow."""
import json
import math

import numpy as np
import pytest
import torch

from tinyfusion.errors import TinyFusionError
from diffusion import create_diffusion
from diffusion.distillation import (feature_beta, masked_feature_loss, masked_kd_losses, outlier_mask, parse_layer_map,
                                    rule_layer_map, span_end_layer_map, validate_layer_map)
from training_helpers import COMMON_FLAGS, IMAGE_SIZE, MODEL, make_digits_store, make_teacher_and_student, torchrun


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kd")
    features = make_digits_store(str(folder))
    teacher, student = make_teacher_and_student(str(folder))
    return {"folder": folder, "features": features, "teacher": teacher, "student": student}


# ------------------------------------------------------------------ the formula, by hand
class Scripted:
    """A stand-in network returning prescribed outputs / hidden states and recording its inputs."""

    def __init__(self, output, hiddens):
        self.output, self.hiddens, self.calls = output, hiddens, []

    def __call__(self, x, t, y=None, force_drop_ids=None, hidden_indices=None):
        self.calls.append(dict(x=x.clone(), t=t.clone(), y=y, drops=force_drop_ids, hidden_indices=hidden_indices))
        if hidden_indices is None:
            return self.output
        return self.output, [self.hiddens[i] for i in hidden_indices]


def reference_tables():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return dict(betas=betas, abar=abar, post_log_var=np.log(np.append(post_var[1], post_var[1:])),
                coef1=betas * np.sqrt(abar_prev) / (1 - abar), coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar))


def reference_gaussian(output, x_t, t, tab):
    """(mean, log variance) of p(x_{t-1}|x_t) for a learned-range [eps, v] output, float64 numpy."""
    channels = x_t.shape[1]
    eps, v = output[:, :channels], output[:, channels:]
    pick = lambda table: table[t].reshape(-1, 1, 1, 1)  # noqa: E731
    x0 = np.sqrt(1 / pick(tab["abar"])) * x_t - np.sqrt(1 / pick(tab["abar"]) - 1) * eps
    mean = pick(tab["coef1"]) * x0 + pick(tab["coef2"]) * x_t
    frac = (v + 1) / 2
    return mean, frac * np.log(pick(tab["betas"])) + (1 - frac) * pick(tab["post_log_var"])


def kl_bits(mean1, log_var1, mean2, log_var2):
    kl = 0.5 * (-1 + log_var2 - log_var1 + np.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * np.exp(-log_var2))
    return kl.reshape(len(kl), -1).mean(axis=1) / math.log(2)


def reference_mask(h, k):
    mu = h.mean(axis=(1, 2), keepdims=True)
    std = np.sqrt(((h - mu) ** 2).mean(axis=(1, 2), keepdims=True))
    return (np.abs(h - mu) < k * std).astype(np.float64)


def test_masked_kd_loss_equals_the_original_formula():
    gen = torch.Generator().manual_seed(0)
    batch, channels, side, tokens, hidden = 3, 2, 2, 4, 6
    x0 = torch.randn(batch, channels, side, side, generator=gen)
    noise = torch.randn(batch, channels, side, side, generator=gen)
    t = torch.tensor([5, 400, 999])  # t > 0: the vb term is the posterior KL (no decoder term)
    student_out = torch.randn(batch, 2 * channels, side, side, generator=gen).clamp(-0.9, 0.9)
    teacher_out = torch.randn(batch, 2 * channels, side, side, generator=gen).clamp(-0.9, 0.9)
    student_h = [torch.randn(batch, tokens, hidden, generator=gen) for _ in range(2)]
    teacher_h = [torch.randn(batch, tokens, hidden, generator=gen) for _ in range(4)]
    student_h[0][0, 1, 2] = 40.0  # planted massive activations, masked out by k = 2
    teacher_h[3][2, 3, 0] = -55.0
    student, teacher = Scripted(student_out, student_h), Scripted(teacher_out, teacher_h)
    pairs, alpha, beta, k = [(0, 1), (1, 3)], 0.9, 0.01, 2.0
    drops = torch.tensor([0, 1, 0])
    losses = masked_kd_losses(student, teacher, create_diffusion(""), x0, torch.tensor([1, 2, 3]), alpha=alpha,
                              beta=beta, mask_sigma=k, layer_pairs=pairs, class_dropout_prob=0.1, t=t, noise=noise,
                              force_drop_ids=drops)

    tab = reference_tables()
    x0_, noise_, t_ = x0.double().numpy(), noise.double().numpy(), t.numpy()
    x_t = np.sqrt(tab["abar"][t_]).reshape(-1, 1, 1, 1) * x0_ + np.sqrt(1 - tab["abar"][t_]).reshape(-1, 1, 1, 1) * noise_
    s_out, t_out = student_out.double().numpy(), teacher_out.double().numpy()
    s_mean, s_logvar = reference_gaussian(s_out, x_t, t_, tab)
    t_mean, t_logvar = reference_gaussian(t_out, x_t, t_, tab)
    kd = ((s_out[:, :channels] - t_out[:, :channels]) ** 2).mean() + kl_bits(t_mean, t_logvar, s_mean, s_logvar).mean()
    true_mean = tab["coef1"][t_].reshape(-1, 1, 1, 1) * x0_ + tab["coef2"][t_].reshape(-1, 1, 1, 1) * x_t
    true_logvar = tab["post_log_var"][t_].reshape(-1, 1, 1, 1) * np.ones_like(x_t)
    gt = ((noise_ - s_out[:, :channels]) ** 2).mean() + kl_bits(true_mean, true_logvar, s_mean, s_logvar).mean()
    feat = np.mean([((reference_mask(hs, k) * hs - reference_mask(ht, k) * ht) ** 2).mean()
                    for hs, ht in ((student_h[s].double().numpy(), teacher_h[j].double().numpy()) for s, j in pairs)])
    assert losses["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert losses["gt"].item() == pytest.approx(gt, rel=1e-5)
    assert losses["feat"].item() == pytest.approx(feat, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * gt + beta * feat, rel=1e-5)
    # both networks saw the same x_t, t, labels and label drops; each got its side of the pairs
    (s_call,), (t_call,) = student.calls, teacher.calls
    assert torch.equal(s_call["x"], t_call["x"]) and np.allclose(s_call["x"].double().numpy(), x_t, atol=1e-6)
    assert torch.equal(s_call["t"], t) and torch.equal(t_call["t"], t)
    assert s_call["drops"] is drops and t_call["drops"] is drops
    assert s_call["hidden_indices"] == [0, 1] and t_call["hidden_indices"] == [1, 3]


def reference_decoder_nll_bits(x0, mean, log_var):
    """-log p(x0 | x1) / ln 2 per sample, by hand: 256 bins of width 2/255 on [-1, 1] (the edge
    bins open to -inf / +inf) under N(mean, exp(log_var)), with ADM's tanh approximation of the
    standard normal CDF, 0.5 (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))."""
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    inv_std = np.exp(-0.5 * log_var)
    upper, lower = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
    log_p = np.where(x0 < -0.999, np.log(np.maximum(upper, 1e-12)),
                     np.where(x0 > 0.999, np.log(np.maximum(1 - lower, 1e-12)),
                              np.log(np.maximum(upper - lower, 1e-12))))
    return -log_p.reshape(len(log_p), -1).mean(axis=1) / math.log(2)


def test_kd_variance_term_at_t0_is_the_students_decoder_nll():
    gen = torch.Generator().manual_seed(2)
    batch, channels, side = 4, 2, 3
    x0 = torch.rand(batch, channels, side, side, generator=gen) * 2 - 1
    x0[0, 0, 0, 0], x0[1, 1, 2, 2] = -1.0, 1.0  # the two open edge bins
    noise = torch.randn(batch, channels, side, side, generator=gen)
    t = torch.tensor([0, 0, 3, 0])
    student_out = torch.randn(batch, 2 * channels, side, side, generator=gen).clamp(-0.9, 0.9)
    teacher_out = torch.randn(batch, 2 * channels, side, side, generator=gen).clamp(-0.9, 0.9)
    student, teacher = Scripted(student_out, []), Scripted(teacher_out, [])
    common = dict(alpha=0.9, beta=0.0, mask_sigma=2.0, layer_pairs=[], class_dropout_prob=0.0, t=t, noise=noise)
    losses = masked_kd_losses(student, teacher, create_diffusion(""), x0, torch.zeros(batch, dtype=torch.long), **common)
    ours = masked_kd_losses(student, teacher, create_diffusion(""), x0, torch.zeros(batch, dtype=torch.long),
                            kd_t0_term="kl", **common)

    tab = reference_tables()
    x0_, noise_, t_ = x0.double().numpy(), noise.double().numpy(), t.numpy()
    x_t = np.sqrt(tab["abar"][t_]).reshape(-1, 1, 1, 1) * x0_ + np.sqrt(1 - tab["abar"][t_]).reshape(-1, 1, 1, 1) * noise_
    s_out, t_out = student_out.double().numpy(), teacher_out.double().numpy()
    s_mean, s_logvar = reference_gaussian(s_out, x_t, t_, tab)
    t_mean, t_logvar = reference_gaussian(t_out, x_t, t_, tab)
    mse = ((s_out[:, :channels] - t_out[:, :channels]) ** 2).mean()
    kl = kl_bits(t_mean, t_logvar, s_mean, s_logvar)
    nll = reference_decoder_nll_bits(x0_, s_mean, s_logvar)
    original = mse + np.where(t_ == 0, nll, kl).mean()
    assert losses["kd"].item() == pytest.approx(original, rel=1e-5)
    assert ours["kd"].item() == pytest.approx(mse + kl.mean(), rel=1e-5)
    assert abs(original - (mse + kl.mean())) > 1e-2 * abs(original)  # the two terms really differ here
    # the plain loss uses the same decoder NLL at t == 0
    true_mean = tab["coef1"][t_].reshape(-1, 1, 1, 1) * x0_ + tab["coef2"][t_].reshape(-1, 1, 1, 1) * x_t
    true_logvar = tab["post_log_var"][t_].reshape(-1, 1, 1, 1) * np.ones_like(x_t)
    gt_vb = np.where(t_ == 0, nll, kl_bits(true_mean, true_logvar, s_mean, s_logvar))
    assert losses["gt"].item() == pytest.approx(((noise_ - s_out[:, :channels]) ** 2).mean() + gt_vb.mean(), rel=1e-5)


def test_mask_sigma_zero_is_plain_repkd_and_masks_remove_planted_outliers():
    gen = torch.Generator().manual_seed(1)
    h_s = torch.rand(2, 16, 32, generator=gen) * 2 - 1
    h_t = torch.rand(2, 16, 32, generator=gen) * 2 - 1
    planted = torch.zeros_like(h_s, dtype=torch.bool)
    planted[0, 3, 7] = planted[0, 9, 1] = planted[1, 0, 0] = planted[1, 15, 31] = True
    h_s = torch.where(planted, torch.tensor(400.0), h_s)
    mask = outlier_mask(h_s, 2.0)
    assert torch.equal(mask == 0, planted)  # exactly the planted entries are excluded
    assert torch.equal(outlier_mask(h_t, 2.0) == 0, (h_t - h_t.mean((1, 2), keepdim=True)).abs()
                       >= 2 * h_t.var((1, 2), unbiased=False, keepdim=True).sqrt())
    plain = ((h_s - h_t) ** 2).mean()
    assert masked_feature_loss([h_s], [h_t], 0.0).item() == pytest.approx(plain.item(), rel=1e-6)
    masked = ((torch.where(planted, 0.0, h_s) - h_t) ** 2).mean()
    assert masked_feature_loss([h_s], [h_t], 2.0).item() == pytest.approx(masked.item(), rel=1e-6)
    assert masked.item() < plain.item() / 100  # the outliers dominate the unmasked loss


def test_teacher_gets_no_gradient_and_an_identical_student_has_zero_distillation_loss(tmp_path):
    from tinyfusion.families.build import build_model
    teacher_path, _ = make_teacher_and_student(str(tmp_path))
    teacher, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=teacher_path)
    student, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=teacher_path)
    teacher.eval().requires_grad_(False)
    student.train()
    diffusion = create_diffusion("")
    x = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.arange(6)
    t = torch.randint(1, 1000, (6,))
    noise = torch.randn_like(x)
    drops = torch.tensor([1, 0, 0, 1, 0, 0])
    pairs = span_end_layer_map(list(range(12)), 12)
    losses = masked_kd_losses(student, teacher, diffusion, x, y, alpha=0.9, beta=0.01, mask_sigma=2.0,
                              layer_pairs=pairs, class_dropout_prob=0.1, t=t, noise=noise, force_drop_ids=drops)
    assert pairs == [(i, i) for i in range(12)]
    # same drops, same x_t: the same network. The posterior KL of equal outputs is 0 up to float
    # rounding (SIMD kernels round by memory alignment), the feature difference exactly 0
    assert abs(losses["kd"].item()) < 1e-6 and losses["feat"].item() == 0.0
    reference = diffusion.training_losses(student, x, t, dict(y=y, force_drop_ids=drops), noise=noise)["loss"].mean()
    assert losses["gt"].item() == pytest.approx(reference.item(), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ------------------------------------------------------------------ layer maps
def test_span_end_layer_map():
    assert span_end_layer_map(list(range(0, 28, 2)), 28) == [(i, 2 * i + 1) for i in range(14)]
    # student block i replaces teacher blocks [k_i, k_{i+1}) and aligns with its last block
    assert span_end_layer_map([0, 1, 5, 9, 10, 20], 24) == [(0, 0), (1, 4), (2, 8), (3, 9), (4, 19), (5, 23)]
    assert span_end_layer_map([3, 27], 28) == [(0, 26), (1, 27)]
    with pytest.raises(ValueError, match="do not fit a teacher with 28 blocks"):
        span_end_layer_map([0, 28], 28)


def never_called():
    raise AssertionError("the original's fixed maps must not read the kept indices")


def test_original_layer_map_is_2i_plus_1_whatever_blocks_were_kept():
    import random
    rng = random.Random(0)
    kept_sets = [list(range(0, 28, 2)), list(range(14)), [1, 3, 4, 7, 9, 10, 13, 15, 17, 18, 21, 22, 25, 27]]
    kept_sets += [sorted(rng.sample(range(28), 14)) for _ in range(20)]
    for kept in kept_sets:
        pairs, how = rule_layer_map("original", 14, 28, never_called)
        assert pairs == [(i, 2 * i + 1) for i in range(14)] and "original's fixed map" in how
        span_end, _ = rule_layer_map("span-end", 14, 28, lambda: (kept, "test frame"))
        assert span_end == span_end_layer_map(kept, 28)
    assert rule_layer_map("original", 7, 14, never_called)[0] == [(i, 2 * i + 1) for i in range(7)]
    assert rule_layer_map("original", 19, 28, never_called)[0] == list(zip([2, 5, 7, 10, 12, 15, 18],
                                                                           [3, 7, 11, 15, 19, 23, 27]))
    # the two rules differ for a learned kept set (they agree on even blocks only)
    learned = kept_sets[2]
    assert rule_layer_map("span-end", 14, 28, lambda: (learned, "f"))[0] != rule_layer_map("original", 14, 28, never_called)[0]
    assert rule_layer_map("span-end", 14, 28, lambda: (kept_sets[0], "f"))[0] == [(i, 2 * i + 1) for i in range(14)]


def test_original_rule_falls_back_to_span_ends_for_other_depths_and_says_so():
    pairs, how = rule_layer_map("original", 3, 28, lambda: ([0, 10, 20], "relative to the 28-block root"))
    assert pairs == [(0, 9), (1, 19), (2, 27)]
    assert "span ends of kept indices [0, 10, 20] (relative to the 28-block root)" in how
    assert "the original has no map for a 3-block student and a 28-block teacher" in how
    with pytest.raises(ValueError, match="keeps 2"):
        rule_layer_map("span-end", 3, 28, lambda: ([0, 10], "f"))
    with pytest.raises(ValueError, match="unknown layer map rule"):
        rule_layer_map("spanend", 3, 28, never_called)


def test_kept_indices_are_read_in_the_frame_of_the_loaded_teacher(tmp_path):
    """XL -> D14 -> D7 (here 28 -> 14 -> 7 blocks of DiT-XS/4, pruned by the real script): the D7
    records its blocks relative to the D14 and to the 28-block root; distilled from the root it
    uses the root's numbering, from the D14 the D14's, from anything else it refuses."""
    import prune_by_index
    from tinyfusion.io.checkpoints import load_checkpoint_file, read_metadata, save_checkpoint
    from tinyfusion.errors import TinyFusionError
    from tinyfusion.pruning.pruned_models import kept_indices_in_frame
    from models import DiT_models
    root = str(tmp_path / "root28.pt")
    save_checkpoint(DiT_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10, depth=28).state_dict(), root)
    d14_kept, d7_kept = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27], [1, 3, 5, 7, 9, 11, 13]
    paths = {}
    for name, source, kept in (("d14", root, d14_kept), ("d7", str(tmp_path / "d14.pt"), d7_kept)):
        paths[name] = str(tmp_path / f"{name}.pt")
        prune_by_index.main(prune_by_index.parse_args(["--model", MODEL, "--ckpt", source, "--kept-indices", str(kept),
                                                       "--save-model", paths[name], *COMMON_FLAGS[:6]]))
    d14, d7 = (read_metadata(load_checkpoint_file(paths[name])) for name in ("d14", "d7"))
    assert (d14["kept_indices"], d14["source_depth"]) == (d14_kept, 28)
    assert (d14["root_kept_indices"], d14["root_depth"]) == (d14_kept, 28)
    root_frame = [d14_kept[i] for i in d7_kept]
    assert root_frame == [2, 6, 10, 15, 19, 23, 27]
    assert (d7["kept_indices"], d7["source_depth"]) == (d7_kept, 14)
    assert (d7["root_kept_indices"], d7["root_depth"]) == (root_frame, 28)
    assert kept_indices_in_frame(d7, 28) == (root_frame, "relative to the 28-block root")
    assert kept_indices_in_frame(d7, 14) == (d7_kept, "relative to the 14-block model it was pruned from")
    for teacher_depth in (12, 21):  # parent-frame indices would pass the range check of a 21-block teacher
        with pytest.raises(TinyFusionError, match=f"not for the {teacher_depth}-block teacher") as error:
            kept_indices_in_frame(d7, teacher_depth)
        assert "\n" not in str(error.value)
    # a file written before root_depth was recorded: the root frame is unknown, so only the parent works
    legacy = {"kept_indices": d7_kept, "source_depth": 14, "original_kept_indices": root_frame}
    assert kept_indices_in_frame(legacy, 14)[0] == d7_kept
    with pytest.raises(TinyFusionError, match="recorded for 14 blocks, not for the 28-block teacher"):
        kept_indices_in_frame(legacy, 28)
    with pytest.raises(TinyFusionError, match="records no kept indices"):
        kept_indices_in_frame({"method": "x"}, 28)
    # D7 from the 28-block root: no original map for (7, 28), so span ends in the root's frame
    assert rule_layer_map("original", 7, 28, lambda: kept_indices_in_frame(d7, 28))[0] == \
        span_end_layer_map(root_frame, 28) == [(0, 5), (1, 9), (2, 14), (3, 18), (4, 22), (5, 26), (6, 27)]
    # from the D14: the original's 2i+1, and span ends in the D14's frame
    assert rule_layer_map("original", 7, 14, never_called)[0] == [(i, 2 * i + 1) for i in range(7)]
    assert rule_layer_map("span-end", 7, 14, lambda: kept_indices_in_frame(d7, 14))[0] == \
        span_end_layer_map(d7_kept, 14) == [(0, 2), (1, 4), (2, 6), (3, 8), (4, 10), (5, 12), (6, 13)]
    # the task's resolution: the same maps, and a one-line refusal for a teacher of another depth
    from types import SimpleNamespace

    from tinyfusion.distillation.masked_kd import resolve_layer_map
    resolve = lambda rule, teacher_depth: resolve_layer_map(  # noqa: E731
        SimpleNamespace(kd_layer_map=rule), SimpleNamespace(depth=7), d7,
        SimpleNamespace(depth=teacher_depth, block_list_sizes=lambda: [teacher_depth]))
    assert resolve("span-end", 28)[0] == span_end_layer_map(root_frame, 28)
    assert "relative to the 28-block root" in resolve("original", 28)[1]
    assert resolve("original", 14)[0] == [(i, 2 * i + 1) for i in range(7)]
    with pytest.raises(TinyFusionError, match="not for the 21-block teacher"):
        resolve("original", 21)


def test_layer_map_parsing_and_missing_blocks():
    assert parse_layer_map("0:1, 1:3,2:5") == [(0, 1), (1, 3), (2, 5)]
    assert parse_layer_map("[(0, 1), (1, 3)]") == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="student:teacher pairs"):
        parse_layer_map("0-1")
    with pytest.raises(ValueError) as error:
        validate_layer_map([(0, 1), (14, 29)], 14, 28)
    assert "student block 14" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="teacher block 28, but the teacher has 28 blocks"):
        validate_layer_map([(0, 28)], 14, 28)


def test_feature_beta_decays_linearly_to_zero_at_the_last_epoch():
    assert [feature_beta(e, 5, 1e-2) for e in range(5)] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
    assert feature_beta(0, 1, 1e-2) == 1e-2


# ------------------------------------------------------------------ the command line
def run_kd(workspace, tmp_path, *extra):
    import train_masked_kd
    args = train_masked_kd.build_parser().parse_args(
        ["--model", MODEL, "--teacher", MODEL, "--data-path", workspace["features"], "--results-dir",
         str(tmp_path / "results"), "--global-batch-size", "8", *COMMON_FLAGS, *extra])
    train_masked_kd.main(args)
    return tmp_path / "results"


@pytest.mark.parametrize("case", ["teacher-mismatch", "student-deeper", "bad-map", "no-teacher"])
def test_kd_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, case):
    flags = {
        "teacher-mismatch": ["--load-weight", workspace["student"], "--teacher", "DiT-XS/2",
                             "--load-teacher", workspace["teacher"]],
        "student-deeper": ["--load-weight", workspace["teacher"], "--load-teacher", workspace["student"]],
        "bad-map": ["--load-weight", workspace["student"], "--load-teacher", workspace["teacher"],
                    "--kd-layer-map", "0:2,7:11"],
        "no-teacher": ["--load-weight", workspace["student"]],
    }[case]
    expected = {"teacher-mismatch": "does not fit --teacher DiT-XS/2", "student-deeper": "student has 12 blocks",
                "bad-map": "refers to student block 7, but the student has 4 blocks",
                "no-teacher": "--load-teacher is required"}[case]
    with pytest.raises(TinyFusionError) as error:
        run_kd(workspace, tmp_path, *flags)
    message = str(error.value).removeprefix("error: ")
    assert expected in message and "\n" not in message
    assert not (tmp_path / "results").exists()


def test_kd_run_logs_terms_follows_the_cosine_schedule_and_saves_a_loadable_student(workspace, tmp_path):
    from tinyfusion.io.checkpoints import load_checkpoint_file
    from tinyfusion.families.build import build_model
    results = run_kd(workspace, tmp_path, "--load-weight", workspace["student"], "--load-teacher",
                     workspace["teacher"], "--max-steps", "6", "--log-every", "2", "--ckpt-every", "3",
                     "--epochs", "2", "--prefix", "kd")
    run = results / "kd-DiT-XS-4"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert record["loss"] == pytest.approx(0.9 * record["kd"] + 0.1 * record["gt"] + 1e-2 * record["feat"],
                                               rel=1e-4)  # epoch 0 of 2: beta = 1e-2
        assert record["feat"] > 0 and record["kd"] > 0 and record["skipped_steps"] == 0
    # lr after step s of a 6-step cosine from 2e-4 to 1e-4
    for record in records:
        expected = 1e-4 + 1e-4 * 0.5 * (1 + math.cos(math.pi * record["step"] / 6))
        assert record["lr"] == pytest.approx(expected, rel=1e-9)
    checkpoint = load_checkpoint_file(str(run / "checkpoints" / "0000006.pt"))
    assert {"model", "ema", "opt", "sched", "train_steps", "args", "rng", "epoch"} <= set(checkpoint)
    assert checkpoint["args"]["teacher"] == MODEL and checkpoint["train_steps"] == 6
    model, metadata = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=str(run / "checkpoints" / "0000006.pt"))
    assert model.depth == 4 and metadata["kept_indices"] == [0, 3, 6, 9]
    assert "span ends of kept indices [0, 3, 6, 9]" in open(run / "log.txt").read()


# ------------------------------------------------------------------ slow: does distillation help?
@pytest.mark.slow
def test_distillation_beats_fine_tuning_against_the_teacher(tmp_path):
    """2 ranks (gloo): train a 12-block teacher from scratch on digits, prune it to 4 blocks, then
    recover the student for the same number of steps with train.py and with train_masked_kd.py;
    the distilled student is closer to the teacher (held-out eps distance)."""
    from tinyfusion.io.checkpoints import save_checkpoint, save_pruned_model
    from tinyfusion.families.build import build_model
    from models import prune_to_kept_blocks
    features = make_digits_store(str(tmp_path), limit=512)
    common = ["--data-path", features, "--results-dir", str(tmp_path / "results"), "--global-batch-size", "32",
              "--log-every", "50", *COMMON_FLAGS]
    done = torchrun("train.py", ["--model", MODEL, "--prefix", "teacher", "--max-steps", "300", "--lr", "5e-4",
                                 "--ckpt-every", "300", *common])
    assert done.returncode == 0, done.stderr[-2000:]
    teacher_ckpt = str(tmp_path / "results" / "teacher-DiT-XS-4" / "checkpoints" / "0000300.pt")
    teacher, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=teacher_ckpt, use_ema=False)
    # the teacher as users get it (a plain state dict): the EMA of a 300-step run is still ~ the init
    teacher_path = str(tmp_path / "teacher.pt")
    save_checkpoint(teacher.state_dict(), teacher_path)
    kept = [0, 3, 6, 9]
    student_path = str(tmp_path / "student.pt")
    save_pruned_model(prune_to_kept_blocks(teacher, kept), student_path, {"kept_indices": kept, "source_depth": 12})
    # one process, both ranks: start both recoveries at once
    steps = "120"
    fine_tune = torchrun("train.py", ["--model", MODEL, "--prefix", "ft", "--load-weight", student_path,
                                      "--max-steps", steps, "--ckpt-every", steps, *common])
    assert fine_tune.returncode == 0, fine_tune.stderr[-2000:]
    distil = torchrun("train_masked_kd.py", ["--model", MODEL, "--prefix", "kd", "--load-weight", student_path,
                                             "--teacher", MODEL, "--load-teacher", teacher_path, "--max-steps", steps,
                                             "--ckpt-every", steps, *common])
    assert distil.returncode == 0, distil.stderr[-2000:]

    def distance_to_teacher(run):
        student, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", use_ema=False,
                                 ckpt=str(tmp_path / "results" / run / "checkpoints" / f"{int(steps):07d}.pt"))
        student.eval(), teacher.eval()
        gen = torch.Generator().manual_seed(123)
        x = torch.randn(256, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        t = torch.randint(0, 1000, (256,), generator=gen)
        y = torch.randint(0, 10, (256,), generator=gen)
        with torch.no_grad():
            return ((student(x, t, y)[:, :3] - teacher(x, t, y)[:, :3]) ** 2).mean().item()

    def initial_distance():
        student, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=student_path)
        gen = torch.Generator().manual_seed(123)
        x = torch.randn(256, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        t = torch.randint(0, 1000, (256,), generator=gen)
        y = torch.randint(0, 10, (256,), generator=gen)
        with torch.no_grad():
            return ((student.eval()(x, t, y)[:, :3] - teacher(x, t, y)[:, :3]) ** 2).mean().item()

    start, tuned, distilled = initial_distance(), distance_to_teacher("ft-DiT-XS-4"), distance_to_teacher("kd-DiT-XS-4")
    print(f"distance to the teacher: pruned {start:.5f}, fine-tuned {tuned:.5f}, distilled {distilled:.5f}")
    assert distilled < tuned and distilled < start

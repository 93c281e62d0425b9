"""Tests for diffusion/: every expected value is derived here by hand from the
formulas (float64 numpy / python loops), never by calling the code under test."""

import math
import os
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion import create_diffusion, per_sample_noise_fn, space_timesteps  # noqa: E402
from diffusion.schedules import get_named_beta_schedule  # noqa: E402

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- hand formulas


def hand_linear_betas(T):
    """beta_k = start + k (end - start) / (T - 1), start = 0.1/T, end = 20/T, as a python loop."""
    start, end = (1000.0 / T) * 1e-4, (1000.0 / T) * 0.02
    return np.array([start + k * (end - start) / (T - 1) for k in range(T)])


def hand_alphas_cumprod(betas):
    out, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


BETAS = hand_linear_betas(1000)
ABAR = hand_alphas_cumprod(BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
POST_VAR = BETAS * (1 - ABAR_PREV) / (1 - ABAR)
POST_LOGVAR_CLIPPED = np.log(np.concatenate([[POST_VAR[1]], POST_VAR[1:]]))
COEF1 = BETAS * np.sqrt(ABAR_PREV) / (1 - ABAR)
COEF2 = (1 - ABAR_PREV) * np.sqrt(1 - BETAS) / (1 - ABAR)


def col(values):
    """(B,) -> (B, 1, 1, 1) for broadcasting against image-shaped arrays."""
    return np.asarray(values)[:, None, None, None]


def hand_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def tanh_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def hand_decoder_loglik(x, mean, logvar, cdf):
    """Log mass of the 2/255-wide bin around x (edge bins open) under N(mean, exp(logvar))."""
    std = np.exp(0.5 * logvar)
    upper = cdf((x - mean + 1 / 255) / std)
    lower = cdf((x - mean - 1 / 255) / std)
    out = np.log(np.maximum(upper - lower, 1e-12))
    out = np.where(x > 0.999, np.log(np.maximum(1 - lower, 1e-12)), out)
    out = np.where(x < -0.999, np.log(np.maximum(upper, 1e-12)), out)
    return out


def hand_space(T, counts):
    """ADM respacing re-derived: count_i points k * (size-1)/(count-1), k = 0..count-1,
    rounded half-up (no exact .5 positions occur for the cases tested)."""
    size = T // len(counts)
    kept, start = [], 0
    for count in counts:
        for k in range(count):
            kept.append(start + int(math.floor(k * (size - 1) / (count - 1) + 0.5)))
        start += size
    return kept


class FixedOutput(torch.nn.Module):
    """A 'network' whose output is a fixed trainable tensor, whatever x and t are."""

    def __init__(self, output):
        super().__init__()
        self.output = torch.nn.Parameter(output.clone())

    def forward(self, x, t, **kwargs):
        return self.output * 1.0


class RecordingModel(torch.nn.Module):
    """Records the timesteps and kwargs it was called with; predicts zero noise."""

    def __init__(self, out_channels_factor=1):
        super().__init__()
        self.factor = out_channels_factor
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((t.clone(), dict(kwargs)))
        return torch.zeros(x.shape[0], x.shape[1] * self.factor, *x.shape[2:], dtype=x.dtype)


# ----------------------------------------------------------------------------- schedules


def test_linear_betas_1000():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(betas, BETAS, rtol=1e-12)
    # The full-length process (respacing "") keeps the same betas and closed-form abar.
    diffusion = create_diffusion("")
    np.testing.assert_allclose(diffusion.betas, BETAS, rtol=1e-10)
    np.testing.assert_allclose(diffusion.alphas_cumprod, ABAR, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod_prev[0], 1.0)
    np.testing.assert_allclose(diffusion.alphas_cumprod[-1], np.prod(1 - BETAS), rtol=1e-12)


def test_linear_betas_scale_with_T():
    # T=4: scale 250 -> linspace(0.025, 5.0, 4); betas >= 1 are not a valid diffusion.
    np.testing.assert_allclose(get_named_beta_schedule("linear", 4), [0.025, 0.025 + 4.975 / 3, 0.025 + 2 * 4.975 / 3, 5.0])
    with pytest.raises(ValueError, match="betas must lie in"):
        create_diffusion("", diffusion_steps=4)
    # T=100: scale 10 -> linspace(1e-3, 0.2, 100).
    diffusion = create_diffusion("", diffusion_steps=100)
    assert diffusion.num_timesteps == 100
    np.testing.assert_allclose(diffusion.betas[[0, 1, 99]], [1e-3, 1e-3 + 0.199 / 99, 0.2], rtol=1e-10)
    np.testing.assert_allclose(diffusion.alphas_cumprod, hand_alphas_cumprod(hand_linear_betas(100)), rtol=1e-12)


def test_cosine_betas():
    T = 10
    alpha_bar = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    betas = get_named_beta_schedule("cosine", T)
    np.testing.assert_allclose(betas, expected, rtol=1e-12)
    assert betas[-1] == 0.999  # alpha_bar(1) is ~0, so the last beta is clipped
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("quadratic", 10)


# ----------------------------------------------------------------------------- forward / posterior


def test_q_sample_closed_form():
    diffusion = create_diffusion("")
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 3, 2, 2))
    t = np.array([0, 10, 500, 999])
    expected = col(np.sqrt(ABAR[t])) * x0 + col(np.sqrt(1 - ABAR[t])) * noise
    got = diffusion.q_sample(torch.from_numpy(x0), torch.from_numpy(t), noise=torch.from_numpy(noise))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    # float32 input -> float32 output (tables cast on gather)
    got32 = diffusion.q_sample(torch.from_numpy(x0).float(), torch.from_numpy(t), noise=torch.from_numpy(noise).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_posterior_closed_form_and_clipping():
    diffusion = create_diffusion("")
    np.testing.assert_allclose(diffusion.posterior_variance, POST_VAR, rtol=1e-10, atol=1e-300)
    assert diffusion.posterior_variance[0] == 0.0
    # log-variance: entry 0 replaced by entry 1, the rest are plain logs
    assert diffusion.posterior_log_variance_clipped[0] == pytest.approx(math.log(POST_VAR[1]), rel=1e-10)
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped[1:], np.log(POST_VAR[1:]), rtol=1e-10)

    rng = np.random.default_rng(1)
    x0, xt = rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    t = np.array([0, 1, 700])
    mean, var, logvar = diffusion.q_posterior_mean_variance(torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t))
    np.testing.assert_allclose(mean.numpy(), col(COEF1[t]) * x0 + col(COEF2[t]) * xt, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mean.numpy()[0], x0[0], rtol=1e-10)  # at t=0 the posterior mean is x0
    np.testing.assert_allclose(var.numpy().ravel(), POST_VAR[t], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(logvar.numpy().ravel(), POST_LOGVAR_CLIPPED[t], rtol=1e-10)


# ----------------------------------------------------------------------------- training losses


def _loss_case():
    """Batch of 4 at t = 0, 1, 500, 999 with a fixed [eps_pred, v] output (float64)."""
    rng = np.random.default_rng(2)
    B, C, H, W = 4, 2, 4, 4
    x0 = rng.uniform(-1, 1, (B, C, H, W))
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0  # exercise both open edge bins of the decoder
    noise = rng.standard_normal((B, C, H, W))
    eps_pred = noise + 0.3 * rng.standard_normal((B, C, H, W))
    v = np.tanh(rng.standard_normal((B, C, H, W)))
    t = np.array([0, 1, 500, 999])
    return x0, noise, eps_pred, v, t


def _hand_losses(x0, noise, eps_pred, v, t, cdf=tanh_cdf):
    a = col(ABAR[t])
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    pred_x0 = (xt - np.sqrt(1 - a) * eps_pred) / np.sqrt(a)
    model_mean = col(COEF1[t]) * pred_x0 + col(COEF2[t]) * xt
    true_mean = col(COEF1[t]) * x0 + col(COEF2[t]) * xt
    frac = (v + 1) / 2
    model_logvar = frac * col(np.log(BETAS[t])) + (1 - frac) * col(POST_LOGVAR_CLIPPED[t])
    kl = hand_kl(true_mean, col(POST_LOGVAR_CLIPPED[t]), model_mean, model_logvar).mean(axis=(1, 2, 3)) / LN2
    nll = -hand_decoder_loglik(x0, model_mean, model_logvar, cdf).mean(axis=(1, 2, 3)) / LN2
    vb = np.where(t == 0, nll, kl)
    mse = ((noise - eps_pred) ** 2).mean(axis=(1, 2, 3))
    return mse, vb


def test_training_losses_values():
    x0, noise, eps_pred, v, t = _loss_case()
    model = FixedOutput(torch.from_numpy(np.concatenate([eps_pred, v], axis=1)))
    diffusion = create_diffusion("")
    terms = diffusion.training_losses(model, torch.from_numpy(x0), torch.from_numpy(t), noise=torch.from_numpy(noise))
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(value.shape == (4,) for value in terms.values())
    mse, vb = _hand_losses(x0, noise, eps_pred, v, t)
    np.testing.assert_allclose(terms["mse"].detach().numpy(), mse, rtol=1e-10)
    np.testing.assert_allclose(terms["vb"].detach().numpy(), vb, rtol=1e-8)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), mse + vb, rtol=1e-8)
    assert (vb > 0).all()
    # The decoder term agrees with one computed from the exact normal CDF up to the
    # ~1e-4 error of the tanh approximation.
    _, vb_exact_cdf = _hand_losses(x0, noise, eps_pred, v, t, cdf=norm.cdf)
    assert terms["vb"][0].item() == pytest.approx(vb_exact_cdf[0], rel=2e-3)

    # Same numbers in float32 (tables are cast to the input dtype).
    terms32 = diffusion.training_losses(
        FixedOutput(model.output.detach().float()),
        torch.from_numpy(x0).float(),
        torch.from_numpy(t),
        noise=torch.from_numpy(noise).float(),
    )
    assert terms32["loss"].dtype == torch.float32
    np.testing.assert_allclose(terms32["loss"].detach().numpy(), mse + vb, rtol=2e-3)


def test_vb_does_not_train_the_mean():
    x0, noise, eps_pred, v, t = _loss_case()
    model = FixedOutput(torch.from_numpy(np.concatenate([eps_pred, v], axis=1)))
    diffusion = create_diffusion("")
    terms = diffusion.training_losses(model, torch.from_numpy(x0), torch.from_numpy(t), noise=torch.from_numpy(noise))
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), model.output, retain_graph=True)
    assert (grad_vb[:, :2] == 0).all() and (grad_vb[:, 2:].abs() > 0).any()
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), model.output)
    assert (grad_mse[:, 2:] == 0).all() and (grad_mse[:, :2].abs() > 0).any()
    # mse gradient by hand: d/d eps_pred mean((noise - eps_pred)^2) = -2 (noise - eps_pred) / n
    np.testing.assert_allclose(grad_mse[:, :2].numpy(), -2 * (noise - eps_pred) / (2 * 4 * 4), rtol=1e-10)


def test_kl_and_rescaled_losses():
    x0, noise, eps_pred, v, t = _loss_case()
    output = torch.from_numpy(np.concatenate([eps_pred, v], axis=1))
    args = (torch.from_numpy(x0), torch.from_numpy(t))
    _, vb = _hand_losses(x0, noise, eps_pred, v, t)

    model = FixedOutput(output)
    kl_terms = create_diffusion("", use_kl=True).training_losses(model, *args, noise=torch.from_numpy(noise))
    np.testing.assert_allclose(kl_terms["loss"].detach().numpy(), vb * 1000, rtol=1e-8)
    (grad,) = torch.autograd.grad(kl_terms["loss"].sum(), model.output)
    assert (grad[:, :2].abs() > 0).any()  # the full bound also trains the mean

    # RESCALED_MSE: vb scaled by num_timesteps / 1000 (a 50-step process -> 0.05).
    x_t = torch.from_numpy(np.sqrt(col(ABAR[t])) * x0 + np.sqrt(1 - col(ABAR[t])) * noise)
    plain = create_diffusion("ddim50")
    rescaled = create_diffusion("ddim50", rescale_learned_sigmas=True)
    t50 = torch.tensor([0, 1, 25, 49])
    vb_plain = plain.losses_from_output(output, args[0], x_t, t50, torch.from_numpy(noise))["vb"]
    vb_rescaled = rescaled.losses_from_output(output, args[0], x_t, t50, torch.from_numpy(noise))["vb"]
    np.testing.assert_allclose(vb_rescaled.numpy(), vb_plain.numpy() * 0.05, rtol=1e-12)


def test_losses_from_output_matches_training_losses_and_fixed_variance():
    x0, noise, eps_pred, v, t = _loss_case()
    output = torch.from_numpy(np.concatenate([eps_pred, v], axis=1))
    diffusion = create_diffusion("")
    x_t = diffusion.q_sample(torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(noise))
    from_output = diffusion.losses_from_output(output, torch.from_numpy(x0), x_t, torch.from_numpy(t), torch.from_numpy(noise))
    mse, vb = _hand_losses(x0, noise, eps_pred, v, t)
    np.testing.assert_allclose(from_output["loss"].numpy(), mse + vb, rtol=1e-8)

    # Fixed variance: loss = mse only, vb reported as 0; wrong channel count is a clear error.
    fixed = create_diffusion("", learn_sigma=False)
    terms = fixed.training_losses(FixedOutput(torch.from_numpy(eps_pred)), torch.from_numpy(x0), torch.from_numpy(t), noise=torch.from_numpy(noise))
    np.testing.assert_allclose(terms["loss"].detach().numpy(), mse, rtol=1e-10)
    assert (terms["vb"] == 0).all()
    with pytest.raises(ValueError, match="channels"):
        diffusion.training_losses(FixedOutput(torch.from_numpy(eps_pred)), torch.from_numpy(x0), torch.from_numpy(t))


def test_output_kl_bpd():
    x0, noise, eps_pred, v, t = _loss_case()
    diffusion = create_diffusion("")
    teacher = torch.from_numpy(np.concatenate([noise, np.zeros_like(v)], axis=1))
    student = torch.nn.Parameter(torch.from_numpy(np.concatenate([eps_pred, v], axis=1)))
    a = col(ABAR[t])
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    x_t = torch.from_numpy(xt)
    assert diffusion.output_kl_bpd(teacher, teacher, x_t, torch.from_numpy(t)).abs().max() < 1e-12

    kl = diffusion.output_kl_bpd(teacher, student, x_t, torch.from_numpy(t))

    def reverse(eps, v_):
        pred_x0 = (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)
        frac = (v_ + 1) / 2
        return col(COEF1[t]) * pred_x0 + col(COEF2[t]) * xt, frac * col(np.log(BETAS[t])) + (1 - frac) * col(POST_LOGVAR_CLIPPED[t])

    expected = hand_kl(*reverse(noise, 0 * v), *reverse(eps_pred, v)).mean(axis=(1, 2, 3)) / LN2
    np.testing.assert_allclose(kl.detach().numpy(), expected, rtol=1e-8)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    assert (grad[:, :2] == 0).all() and (grad[:, 2:].abs() > 0).any()


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_sets():
    steps_250 = space_timesteps(1000, "250")
    assert len(steps_250) == 250 and min(steps_250) == 0 and 999 in steps_250
    assert steps_250 == set(hand_space(1000, [250]))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    steps_10_20 = space_timesteps(1000, "10,20")
    assert steps_10_20 == set(hand_space(1000, [10, 20]))
    assert len(steps_10_20) == 30
    assert sorted(steps_10_20)[:10][-1] == 499 and all(s < 500 for s in sorted(steps_10_20)[:10])
    assert sorted(steps_10_20)[10] == 500 and max(steps_10_20) == 999
    # 10 points on [0, 499]: stride 499/9 = 55.44 -> 0, 55, 111, 166, 222, 277, 333, 388, 444, 499
    assert sorted(steps_10_20)[:10] == [0, 55, 111, 166, 222, 277, 333, 388, 444, 499]
    assert space_timesteps(1000, "1000") == set(range(1000))
    with pytest.raises(ValueError, match="no integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot take 300 steps"):
        space_timesteps(1000, "300,300,300,300")


def test_leading_spacing_is_diffusers_ddim_timesteps():
    # "leadingN" keeps diffusers' "leading" timesteps (DiTPipeline's DDIMScheduler): 0, s, ..., (N-1)s, s = T // N
    from diffusers import DDIMScheduler
    assert space_timesteps(1000, "leading30") == set(range(0, 990, 33))
    for steps in (10, 25, 30, 250):
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading")
        scheduler.set_timesteps(steps)
        assert space_timesteps(1000, f"leading{steps}") == set(scheduler.timesteps.tolist())
    with pytest.raises(ValueError, match="cannot take 0 of 1000"):
        space_timesteps(1000, "leading0")


def test_respaced_betas():
    diffusion = create_diffusion("10,20")
    kept = hand_space(1000, [10, 20])
    abar_kept = ABAR[kept]
    expected = [1 - abar_kept[0]] + [1 - abar_kept[j] / abar_kept[j - 1] for j in range(1, len(kept))]
    assert diffusion.num_timesteps == 30 and diffusion.timestep_map == kept
    np.testing.assert_allclose(diffusion.betas, expected, rtol=1e-10)
    np.testing.assert_allclose(diffusion.alphas_cumprod, abar_kept, rtol=1e-12)


def test_model_receives_original_timesteps():
    diffusion = create_diffusion("ddim10", learn_sigma=False)
    model = RecordingModel()
    labels = torch.tensor([3, 5])
    diffusion.p_sample_loop(model, (2, 1, 2, 2), model_kwargs={"y": labels})
    assert [c[0].tolist() for c in model.calls] == [[s, s] for s in range(900, -1, -100)]
    assert all(c[1]["y"] is labels for c in model.calls)

    model.calls.clear()
    diffusion.ddim_sample_loop(model, (1, 1, 2, 2))
    assert [c[0].item() for c in model.calls] == list(range(900, -1, -100))

    model.calls.clear()
    diffusion.training_losses(model, torch.zeros(3, 1, 2, 2), torch.tensor([0, 3, 9]), model_kwargs={"y": labels})
    assert model.calls[0][0].tolist() == [0, 300, 900] and model.calls[0][1]["y"] is labels


def test_create_diffusion_step_counts():
    assert create_diffusion("").num_timesteps == 1000
    assert create_diffusion(None).num_timesteps == 1000
    assert create_diffusion("ddim25").num_timesteps == 25
    assert create_diffusion("250").num_timesteps == 250


# ----------------------------------------------------------------------------- sampling steps


def test_single_steps_by_hand():
    x0, noise, eps_pred, v, _ = _loss_case()
    diffusion = create_diffusion("")
    model = FixedOutput(torch.from_numpy(np.concatenate([eps_pred, v], axis=1)))
    t = np.array([0, 1, 500, 999])
    xt = x0  # any input; the model output is fixed
    pred_x0 = (xt - np.sqrt(1 - col(ABAR[t])) * eps_pred) / np.sqrt(col(ABAR[t]))
    clipped = np.clip(pred_x0, -1, 1)
    frac = (v + 1) / 2
    logvar = frac * col(np.log(BETAS[t])) + (1 - frac) * col(POST_LOGVAR_CLIPPED[t])
    mean = col(COEF1[t]) * clipped + col(COEF2[t]) * xt
    expected = mean + (col(t) > 0) * np.exp(0.5 * logvar) * noise
    with torch.no_grad():
        out = diffusion.p_sample(model, torch.from_numpy(xt), torch.from_numpy(t), noise=torch.from_numpy(noise))
    np.testing.assert_allclose(out["sample"].numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["pred_xstart"].numpy(), clipped, rtol=1e-10)

    # DDIM with eta = 0.5, eps re-derived from the clipped x0.
    eta, a, a_prev = 0.5, col(ABAR[t]), col(ABAR_PREV[t])
    eps = (xt / np.sqrt(a) - clipped) / np.sqrt(1 / a - 1)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    expected = clipped * np.sqrt(a_prev) + np.sqrt(1 - a_prev - sigma**2) * eps + (col(t) > 0) * sigma * noise
    with torch.no_grad():
        out = diffusion.ddim_sample(model, torch.from_numpy(xt), torch.from_numpy(t), eta=eta, noise=torch.from_numpy(noise))
    np.testing.assert_allclose(out["sample"].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_ddim_eta0_deterministic_and_seeded_noise():
    diffusion = create_diffusion("ddim20")
    torch.manual_seed(123)
    net = torch.nn.Conv2d(3, 6, 1)  # per-sample, deterministic network
    model = lambda x, t: torch.tanh(net(x))  # noqa: E731
    x_T = torch.randn(3, 3, 4, 4)
    torch.manual_seed(0)
    a = diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T)
    torch.manual_seed(999)
    torch.randn(100)
    b = diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T)
    assert torch.equal(a, b)

    # Stochastic samplers: a generator makes results independent of the global RNG.
    torch.manual_seed(1)
    c = diffusion.p_sample_loop(model, x_T.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    d = diffusion.p_sample_loop(model, x_T.shape, generator=torch.Generator().manual_seed(7))
    e = diffusion.p_sample_loop(model, x_T.shape, generator=torch.Generator().manual_seed(8))
    assert torch.equal(c, d) and not torch.allclose(c, e)

    # per_sample_noise_fn: sample i depends only on its own seed, not on the batch.
    seeds = [11, 12, 13]
    batch = diffusion.ddim_sample_loop(
        model, (3, 3, 4, 4), eta=1.0, noise_fn=per_sample_noise_fn([torch.Generator().manual_seed(s) for s in seeds])
    )
    single = diffusion.ddim_sample_loop(model, (1, 3, 4, 4), eta=1.0, noise_fn=per_sample_noise_fn([torch.Generator().manual_seed(12)]))
    torch.testing.assert_close(batch[1:2], single, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batch[0:1], single)


def test_progressive_yields_every_step():
    diffusion = create_diffusion("ddim5", learn_sigma=False)
    model = lambda x, t: 0.1 * x  # noqa: E731
    outs = list(diffusion.p_sample_loop_progressive(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(3), progress=True))
    assert len(outs) == 5 and all(set(o) == {"sample", "pred_xstart"} for o in outs)
    final = diffusion.p_sample_loop(model, (2, 1, 3, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(outs[-1]["sample"], final)
    assert len(list(diffusion.ddim_sample_loop_progressive(model, (2, 1, 3, 3)))) == 5


# ----------------------------------------------------------------------------- samplers reach the data


MU, S = 0.5, 0.5  # data distribution N(MU, S^2) in every dimension


def gaussian_eps_model(x, t):
    """Exact E[eps | x_t] for N(MU, S^2) data: sqrt(1-a)(x - sqrt(a) MU) / (a S^2 + 1 - a)."""
    a = torch.from_numpy(ABAR)[t].to(x.dtype).view(-1, 1, 1, 1)  # original indices expected
    return torch.sqrt(1 - a) * (x - torch.sqrt(a) * MU) / (a * S**2 + 1 - a)


def _exact_sampler_moments(kept, ddim):
    """Mean / variance of x_0 from the sampler, by propagating N(m, v) through the
    linear-Gaussian steps (x_T ~ N(0, 1)). Uses fixed-large variance for DDPM."""
    abar = ABAR[kept]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    large_var = np.concatenate([[post_var[1]], betas[1:]])
    m, v = 0.0, 1.0
    for j in range(len(kept) - 1, -1, -1):
        a, ap = abar[j], abar_prev[j]
        g = np.sqrt(1 - a) / (a * S**2 + 1 - a)  # eps_hat = g (x - sqrt(a) MU)
        A, B = (1 - np.sqrt(1 - a) * g) / np.sqrt(a), np.sqrt(1 - a) * g * MU  # x0_hat = A x + B
        if ddim:
            # x' = sqrt(ap) x0_hat + sqrt(1 - ap) eps_hat, eps_hat = (x - sqrt(a) x0_hat)/sqrt(1-a)
            K = np.sqrt(ap) * A + np.sqrt(1 - ap) * (1 - np.sqrt(a) * A) / np.sqrt(1 - a)
            c = np.sqrt(ap) * B - np.sqrt(1 - ap) * np.sqrt(a) * B / np.sqrt(1 - a)
            step_var = 0.0
        else:
            c1 = betas[j] * np.sqrt(ap) / (1 - a)
            c2 = (1 - ap) * np.sqrt(1 - betas[j]) / (1 - a)
            K, c = c1 * A + c2, c1 * B
            step_var = large_var[j] if j > 0 else 0.0
        m, v = K * m + c, K**2 * v + step_var
    return m, v


@pytest.mark.parametrize("ddim", [False, True])
def test_samplers_reach_gaussian_data(ddim):
    diffusion = create_diffusion("100", learn_sigma=False)
    kept = hand_space(1000, [100])
    shape = (4000, 1, 2, 2)
    generator = torch.Generator().manual_seed(0)
    loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
    samples = loop(gaussian_eps_model, shape, clip_denoised=False, generator=generator).double()
    mean, var = samples.mean().item(), samples.var().item()
    n = samples.numel()
    exact_mean, exact_var = _exact_sampler_moments(kept, ddim)
    # Against the sampler's exact output law: only sampling error (4 standard errors).
    assert abs(mean - exact_mean) < 4 * math.sqrt(exact_var / n)
    assert abs(var - exact_var) < 4 * exact_var * math.sqrt(2 / n)
    # And against the data: 100 steps leave a few percent of discretization bias.
    assert mean == pytest.approx(MU, abs=0.01)
    assert var == pytest.approx(S**2, rel=0.08)

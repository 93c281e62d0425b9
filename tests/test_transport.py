"""transport/ against closed forms: the interpolant paths of SiT, the conversions between
velocity, score and noise, the training loss, the time intervals, and the ODE / SDE samplers on
problems whose solution is known exactly (a linear ODE; a Gaussian data distribution, whose
velocity and score are affine in x and whose probability-flow map is affine too)."""
import importlib.util
import math
import sys

import pytest
import torch

from transport import (PATHS, alpha_sigma, create_transport, diffusion_coefficient, interpolate, noise_from_velocity,
                       sample_ode, sample_sde, sample_time_and_noise, score_coefficients, score_from_noise,
                       score_from_velocity, time_interval, training_losses, velocity_and_score, velocity_from_score)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def closed_form_alpha_sigma(path, t):
    """alpha, sigma of each path written out (float64 python math)."""
    if path == "Linear":
        return t, 1 - t
    if path == "GVP":
        return math.sin(math.pi * t / 2), math.cos(math.pi * t / 2)
    log_mean = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1
    return math.exp(log_mean), math.sqrt(1 - math.exp(2 * log_mean))


# --------------------------------------------------------------------------- paths
@pytest.mark.parametrize("path", PATHS)
def test_coefficients_and_their_derivatives_match_the_closed_forms(path):
    times = [0.05, 0.3, 0.5, 0.77, 0.95]
    alpha, d_alpha, sigma, d_sigma = alpha_sigma(path, torch.tensor(times, dtype=torch.float64))
    h = 1e-6
    for i, t in enumerate(times):
        a, s = closed_form_alpha_sigma(path, t)
        (a_plus, s_plus), (a_minus, s_minus) = closed_form_alpha_sigma(path, t + h), closed_form_alpha_sigma(path, t - h)
        assert alpha[i].item() == pytest.approx(a, abs=1e-14) and sigma[i].item() == pytest.approx(s, abs=1e-14)
        assert d_alpha[i].item() == pytest.approx((a_plus - a_minus) / (2 * h), abs=1e-7)
        assert d_sigma[i].item() == pytest.approx((s_plus - s_minus) / (2 * h), abs=1e-7)
    if path != "Linear":  # variance preserving
        torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha), rtol=0, atol=1e-14)


def test_linear_path_noise_at_zero_data_at_one():
    x0, x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    xt, ut = interpolate("Linear", t, x0, x1)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], x1[2])
    torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1], rtol=0, atol=1e-15)
    torch.testing.assert_close(ut, x1 - x0, rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_score_coefficients_are_the_flow_identities(path):
    t = torch.tensor([0.1, 0.4, 0.9], dtype=torch.float64)
    ratio, lam = score_coefficients(path, t)
    alpha, d_alpha, sigma, d_sigma = alpha_sigma(path, t)
    torch.testing.assert_close(ratio, d_alpha / alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(lam, ratio * sigma ** 2 - sigma * d_sigma, rtol=1e-12, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_conversions_on_a_point_mass_where_every_target_is_known(path):
    """Data = the single point c: x_t = alpha c + sigma x0 has score -x0 / sigma, noise x0 and
    velocity d_alpha c + d_sigma x0 exactly."""
    generator = torch.Generator().manual_seed(0)
    c, x0 = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64), torch.randn(5, 3, 4, generator=generator,
                                                                                           dtype=torch.float64)
    t = torch.tensor([0.02, 0.2, 0.5, 0.8, 0.98], dtype=torch.float64)
    xt, velocity = interpolate(path, t, x0, c)
    sigma = alpha_sigma(path, t)[2].view(-1, 1, 1)
    score = -x0 / sigma
    for got, want in ((velocity_from_score(path, score, xt, t), velocity), (score_from_velocity(path, velocity, xt, t), score),
                      (noise_from_velocity(path, velocity, xt, t), x0), (score_from_noise(path, x0, xt, t), score)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for prediction, output in (("velocity", velocity), ("score", score), ("noise", x0)):
        got_velocity, got_score = velocity_and_score(path, prediction, output, xt, t)
        torch.testing.assert_close(got_velocity, velocity, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got_score, score, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- settings
def test_eps_defaults_and_time_intervals_follow_sit():
    linear = create_transport()
    assert (linear.train_eps, linear.sample_eps) == (0.0, 0.0)
    assert time_interval(linear, sampling=False) == (0.0, 1.0)
    assert time_interval(linear, sampling=True) == (0.0, 1.0)
    assert time_interval(linear, sampling=True, reverse=True) == (1.0, 0.0)
    assert time_interval(linear, sampling=True, sde=True, diffusion_form="sigma", last_step_size=0.04) == (0.0, 0.96)
    noise = create_transport("Linear", "noise")
    assert (noise.train_eps, noise.sample_eps) == (1e-3, 1e-3)
    assert time_interval(noise, sampling=False) == (1e-3, 1 - 1e-3)
    vp = create_transport("VP")
    assert (vp.train_eps, vp.sample_eps) == (1e-5, 1e-3)
    assert time_interval(vp, sampling=False) == (0.0, 1 - 1e-5)
    assert time_interval(vp, sampling=True) == (0.0, 1 - 1e-3)
    assert time_interval(vp, sampling=True, sde=True, last_step_size=0.04) == (0.0, 0.96)
    sbdm = create_transport("GVP", sample_eps=0.01)
    assert time_interval(sbdm, sampling=True, sde=True, diffusion_form="SBDM", last_step_size=0.04) == (0.01, 0.96)
    with pytest.raises(ValueError, match="--path-type"):  # the family shows it in one line
        create_transport("Cosine")


def test_training_time_and_noise_are_reproducible_and_inside_the_interval():
    transport = create_transport("Linear", "score")
    x1 = torch.zeros(64, 4, 2, 2)
    t, noise = sample_time_and_noise(transport, x1, torch.Generator().manual_seed(3))
    t_again, noise_again = sample_time_and_noise(transport, x1, torch.Generator().manual_seed(3))
    assert torch.equal(t, t_again) and torch.equal(noise, noise_again)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3 and t.shape == (64,) and noise.shape == x1.shape


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_a_model_that_outputs_the_exact_target_has_zero_loss(path, prediction):
    transport = create_transport(path, prediction, loss_weight="likelihood" if prediction != "velocity" else None)
    x1 = torch.randn(6, 4, 2, 2, dtype=torch.float64)
    t, x0 = sample_time_and_noise(transport, x1, torch.Generator().manual_seed(1))

    def oracle(xt, time):
        _, d_alpha, sigma, d_sigma = [c.view(-1, 1, 1, 1) for c in alpha_sigma(path, time)]
        return {"velocity": d_alpha * x1 + d_sigma * x0, "score": -x0 / sigma, "noise": x0}[prediction]
    losses = training_losses(oracle, x1, transport, t=t, noise=x0)["loss"]
    assert losses.shape == (6,)
    torch.testing.assert_close(losses, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-20)


def test_loss_values_of_a_zero_model_by_hand():
    """Linear path, zero output: velocity loss mean((x1 - x0)^2); noise loss mean(x0^2) times
    w = 1, (lam/sigma)^2 = 1/t^2 or lam/sigma^2 = 1/(t (1 - t)) (lam = (1 - t) / t)."""
    x1, x0 = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)

    def zero(xt, time):
        return torch.zeros_like(xt)
    velocity = training_losses(zero, x1, create_transport(), t=t, noise=x0)["loss"]
    torch.testing.assert_close(velocity, ((x1 - x0) ** 2).mean(dim=(1, 2, 3)))
    base = (x0 ** 2).mean(dim=(1, 2, 3))
    for weight, factor in ((None, 1.0), ("velocity", 1 / t ** 2), ("likelihood", 1 / (t * (1 - t)))):
        got = training_losses(zero, x1, create_transport("Linear", "noise", weight), t=t, noise=x0)["loss"]
        torch.testing.assert_close(got, base * factor)
    score = training_losses(zero, x1, create_transport("Linear", "score"), t=t, noise=x0)["loss"]
    torch.testing.assert_close(score, base)  # |sigma * 0 + x0|^2


# --------------------------------------------------------------------------- ODE
def test_fixed_step_ode_updates_integrate_a_linear_ode_exactly_to_their_order():
    """dx/dt = a x: one Euler step multiplies by 1 + a dt, one Heun step by 1 + a dt + (a dt)^2 / 2;
    against exp(a) the errors fall by 2x (Euler) and 4x (Heun) when the steps double."""
    a = -1.3
    x = torch.ones(2, 3, dtype=torch.float64)
    transport = create_transport()

    def field(state, t):
        return a * state
    errors = {}
    for method in ("euler", "heun2"):
        for steps in (21, 41, 81):
            got = sample_ode(field, x, transport, method=method, num_steps=steps)
            grid = torch.linspace(0.0, 1.0, steps).double()
            dts = grid[1:] - grid[:-1]
            factors = 1 + a * dts if method == "euler" else 1 + a * dts + (a * dts) ** 2 / 2
            torch.testing.assert_close(got, x * torch.prod(factors), rtol=1e-6, atol=0)
            errors[method, steps] = abs(got[0, 0].item() - math.exp(a))
    for method, order in (("euler", 2), ("heun2", 4)):
        assert errors[method, 21] / errors[method, 41] == pytest.approx(order, rel=0.1)
        assert errors[method, 41] / errors[method, 81] == pytest.approx(order, rel=0.1)


def gaussian_fields(path, mean, std):
    """Data N(mean, std^2): p_t = N(alpha mean, alpha^2 std^2 + sigma^2); the exact velocity
    E[d_alpha x1 + d_sigma x0 | x_t], score and noise as model functions of (x, t)."""
    def coefficients(t, x):
        alpha, d_alpha, sigma, d_sigma = [c.view(-1, *([1] * (x.dim() - 1))) for c in alpha_sigma(path, t)]
        return alpha, d_alpha, sigma, d_sigma, alpha ** 2 * std ** 2 + sigma ** 2

    def velocity(x, t):
        alpha, d_alpha, sigma, d_sigma, var = coefficients(t, x)
        centred = x - alpha * mean
        return d_alpha * (mean + alpha * std ** 2 / var * centred) + d_sigma * sigma / var * centred

    def score(x, t):
        alpha, _, _, _, var = coefficients(t, x)
        return -(x - alpha * mean) / var

    def noise(x, t):
        alpha, _, sigma, _, var = coefficients(t, x)
        return sigma * (x - alpha * mean) / var
    return {"velocity": velocity, "score": score, "noise": noise}


def affine_flow(path, mean, std, x, t0, t1):
    """The exact probability-flow map of the Gaussian problem from t0 to t1 (affine per sample)."""
    def moments(t):
        alpha, _, sigma, _ = alpha_sigma(path, torch.tensor([t], dtype=torch.float64))
        return alpha.item() * mean, math.sqrt(alpha.item() ** 2 * std ** 2 + sigma.item() ** 2)
    (mean0, std0), (mean1, std1) = moments(t0), moments(t1)
    return mean1 + std1 / std0 * (x - mean0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_heun_ode_transports_noise_to_a_gaussian_along_the_exact_affine_map(path, prediction):
    mean, std = 1.5, 0.5
    transport = create_transport(path, prediction)
    z = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = sample_ode(gaussian_fields(path, mean, std)[prediction], z, transport, method="heun2", num_steps=200)
    t0, t1 = time_interval(transport, sampling=True)
    torch.testing.assert_close(got, affine_flow(path, mean, std, z, t0, t1), rtol=0, atol=2e-3)
    if path != "VP":  # reversed, VP starts at t = 1 (sigma = 0, d_sigma infinite), not where it ended
        back = sample_ode(gaussian_fields(path, mean, std)[prediction], got, transport, method="heun2",
                          num_steps=200, reverse=True)
        torch.testing.assert_close(back, z, rtol=0, atol=4e-3)


def test_adaptive_ode_runs_on_torchdiffeq_and_without_it_is_one_line_naming_the_requirements(monkeypatch):
    field = gaussian_fields("Linear", 0.0, 1.0)["velocity"]
    x = torch.randn(4, 2, dtype=torch.float64)
    assert importlib.util.find_spec("torchdiffeq") is not None  # pinned in requirements.txt: dopri5 works out of the box
    # N(0, 1) data: the exact flow map from noise to data is the identity. Tight tolerances reach it (SiT's
    # defaults atol 1e-6, rtol 1e-3 leave 0.02 on this problem: dopri5 takes few, long steps)
    exact = sample_ode(field, x, create_transport(), method="dopri5", atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(exact, x, rtol=0, atol=1e-6)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # an incomplete install: the import fails
    with pytest.raises(ValueError, match=r"torchdiffeq package, one of the requirements, .*pip install -r requirements"):
        sample_ode(field, x, create_transport(), method="dopri5")


# --------------------------------------------------------------------------- SDE
@pytest.mark.parametrize("method,path,form", [("Euler", "Linear", "sigma"), ("Heun", "Linear", "sigma"),
                                              ("Euler", "GVP", "linear"), ("Euler", "VP", "SBDM")])
def test_sde_with_the_exact_score_reaches_the_gaussian(method, path, form):
    """Any diffusion D leaves the marginals of the exact SDE unchanged: 4000 samples end with the
    data mean and std (sampling error about 0.008 and 0.006 here). No last step: the default
    "Mean" step is a noiseless drift step that shrinks the spread on purpose (denoising)."""
    mean, std = 1.5, 0.5
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(4000, 1, dtype=torch.float64, generator=generator)
    got = sample_sde(gaussian_fields(path, mean, std)["velocity"], z, create_transport(path), method=method,
                     num_steps=250, diffusion_form=form, last_step=None,
                     noise_fn=lambda like: torch.randn(like.shape, generator=generator, dtype=like.dtype))
    assert got.mean().item() == pytest.approx(mean, abs=0.04)
    assert got.std().item() == pytest.approx(std, abs=0.03)


def test_sde_last_steps_by_hand_on_one_step():
    """num_steps=2 is one Euler-Maruyama step from t0 then the last step from t1: written out."""
    transport = create_transport()
    fields = gaussian_fields("Linear", 0.7, 0.4)
    x = torch.randn(5, 2, dtype=torch.float64)
    noise = torch.randn(5, 2, dtype=torch.float64)
    t0, t1, size = 0.0, 0.9, 0.1
    dt32 = torch.tensor(t1 - t0, dtype=torch.float32)  # the time grid is float32, as in SiT
    dt, sqrt_dt = dt32.double(), torch.sqrt(dt32).double()

    def at(t):
        return torch.full((5,), t, dtype=torch.float64)
    drift0 = fields["velocity"](x, at(t0)) + (1 - t0) * fields["score"](x, at(t0))
    x1 = x + drift0 * dt + math.sqrt(2 * (1 - t0)) * noise * sqrt_dt
    t_end = at(t1)
    expected = {
        "Mean": x1 + (fields["velocity"](x1, t_end) + (1 - t_end[0]) * fields["score"](x1, t_end)) * size,
        "Euler": x1 + fields["velocity"](x1, t_end) * size,
        "Tweedie": x1 / t_end[0] + (1 - t_end[0]) ** 2 / t_end[0] * fields["score"](x1, t_end),
    }
    for last_step, want in expected.items():
        got = sample_sde(fields["velocity"], x, transport, num_steps=2, last_step=last_step, last_step_size=size,
                         noise_fn=lambda like: noise)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_diffusion_forms_and_bad_settings():
    x, t = torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0.25, 0.5], dtype=torch.float64)
    transport = create_transport()
    expected = {"constant": [2.0, 2.0], "SBDM": [2 * 0.75 / 0.25, 2 * 0.5 / 0.5], "sigma": [1.5, 1.0],
                "linear": [1.5, 1.0], "decreasing": [0.25 * (2 * math.cos(math.pi / 4) + 1) ** 2, 0.25],
                "increasing-decreasing": [2 * 0.5, 2.0]}
    for form, want in expected.items():
        got = diffusion_coefficient(transport, form, 2.0, x, t).flatten()
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="SBDM is infinite"):
        sample_sde(lambda x, t: x, x, transport, diffusion_form="SBDM")
    with pytest.raises(ValueError, match="--last-step"):
        sample_sde(lambda x, t: x, x, transport, last_step="Median")

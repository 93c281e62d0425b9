"""The stochastic interpolants of SiT (Ma et al. 2024): x_t = alpha_t * x1 + sigma_t * x0.

Conventions (as in SiT): x0 ~ N(0, I) is the noise, x1 the data, and time runs from t = 0
(pure noise) to t = 1 (data). The model is called with t itself, a float in [0, 1].

    Linear  alpha = t,                sigma = 1 - t
    GVP     alpha = sin(pi t / 2),    sigma = cos(pi t / 2)
    VP      alpha = exp(m(t)),        sigma = sqrt(1 - exp(2 m(t))),
            m(t) = -(1 - t)^2 (b_max - b_min) / 4 - (1 - t) b_min / 2, b_min = 0.1, b_max = 20

The velocity of the path is u_t = d_alpha * x1 + d_sigma * x0. Score s = grad log p_t(x) and
velocity are related by v = r x + lam s with r = d_alpha / alpha and
lam = r sigma^2 - sigma d_sigma (for VP, SiT uses the equal closed forms r = lam = beta_t / 2,
beta_t = b_min + (1 - t)(b_max - b_min)); the noise prediction is eps = -sigma s.
Every function takes t of shape (N,) and broadcasts it over x's other dimensions.
"""
import math

import torch

PATHS = ("Linear", "GVP", "VP")                   # tinyfusion/flags.py repeats them, torch-free, for --help
PREDICTIONS = ("velocity", "score", "noise")

VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def expand_like(t, x):
    """(N,) -> (N, 1, ..., 1) with x's number of dimensions."""
    return t.view(t.shape[0], *([1] * (x.dim() - 1)))


def _vp_log_mean(t):
    return -0.25 * (1 - t) ** 2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * (1 - t) * VP_BETA_MIN


def _vp_half_beta(t):
    """d m / dt = beta_t / 2."""
    return 0.5 * (1 - t) * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * VP_BETA_MIN


def alpha_sigma(path, t):
    """(alpha_t, d alpha_t / dt, sigma_t, d sigma_t / dt) of `path` at the (broadcast) times t."""
    if path == "Linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path == "GVP":
        angle = t * math.pi / 2
        return torch.sin(angle), math.pi / 2 * torch.cos(angle), torch.cos(angle), -math.pi / 2 * torch.sin(angle)
    if path == "VP":
        alpha = torch.exp(_vp_log_mean(t))
        d_alpha = alpha * _vp_half_beta(t)
        alpha_squared = torch.exp(2 * _vp_log_mean(t))
        sigma = torch.sqrt(1 - alpha_squared)
        d_sigma = alpha_squared * (2 * _vp_half_beta(t)) / (-2 * sigma)
        return alpha, d_alpha, sigma, d_sigma
    raise ValueError(f"unknown path {path!r}; use one of {', '.join(PATHS)}")


def score_coefficients(path, t):
    """(r, lam) with velocity = r * x + lam * score: r = d_alpha / alpha in a stable closed form,
    lam = r sigma^2 - sigma d_sigma (beta_t / 2 on the VP path)."""
    if path == "VP":
        half_beta = 0.5 * (VP_BETA_MIN + (1 - t) * (VP_BETA_MAX - VP_BETA_MIN))
        return half_beta, half_beta
    ratio = 1 / t if path == "Linear" else math.pi / (2 * torch.tan(t * math.pi / 2))
    _, _, sigma, d_sigma = alpha_sigma(path, t)
    return ratio, ratio * sigma ** 2 - sigma * d_sigma


def interpolate(path, t, x0, x1):
    """(x_t, u_t): the point of the path between noise x0 and data x1 and its velocity."""
    alpha, d_alpha, sigma, d_sigma = alpha_sigma(path, expand_like(t, x1))
    return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0


def velocity_from_score(path, score, x, t):
    ratio, lam = score_coefficients(path, expand_like(t, x))
    return ratio * x + lam * score


def score_from_noise(path, noise, x, t):
    _, _, sigma, _ = alpha_sigma(path, expand_like(t, x))
    return noise / -sigma


def score_from_velocity(path, velocity, x, t):
    """Inverts v = r x + lam s, written with alpha / d_alpha (as SiT) so that it is finite at t = 0
    of the Linear path."""
    alpha, d_alpha, sigma, d_sigma = alpha_sigma(path, expand_like(t, x))
    inverse_ratio = alpha / d_alpha
    return (inverse_ratio * velocity - x) / (sigma ** 2 - inverse_ratio * d_sigma * sigma)


def noise_from_velocity(path, velocity, x, t):
    alpha, d_alpha, sigma, d_sigma = alpha_sigma(path, expand_like(t, x))
    inverse_ratio = alpha / d_alpha
    return (inverse_ratio * velocity - x) / (inverse_ratio * d_sigma - sigma)


def velocity_and_score(path, prediction, output, x, t):
    """The probability-flow velocity and the score implied by a model output of kind `prediction`
    (one model evaluation serves both, where SiT evaluates the model once for each)."""
    if prediction == "velocity":
        return output, score_from_velocity(path, output, x, t)
    if prediction == "noise":
        output = score_from_noise(path, output, x, t)
    elif prediction != "score":
        raise ValueError(f"unknown prediction {prediction!r}; use one of {', '.join(PREDICTIONS)}")
    return velocity_from_score(path, output, x, t), output

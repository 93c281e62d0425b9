"""SiT's samplers: the probability-flow ODE dx = v dt and the SDE
dx = [v + D(t) s] dt + sqrt(2 D(t)) dW, both integrated forward in time from noise (t0) to data (t1).

ODE (SiT's defaults: dopri5 with atol 1e-6, rtol 1e-3 and 50 output times): a fixed grid of
num_steps times linspace(t0, t1, num_steps), i.e. num_steps - 1 steps, with torchdiffeq's update
rules "euler" (x + dt f) and "heun2" (x + dt (k1 / 2 + k2 / 2), k2 at t + dt from the Euler
point); adaptive solvers such as "dopri5" run on torchdiffeq (in the requirements).

SDE (SiT's defaults: Euler-Maruyama, 250 steps, diffusion D = sigma_t, last step "Mean" of size
0.04): the grid linspace(t0, t1 - last_step_size, num_steps) is walked in num_steps - 1 steps of
the constant dt of its first interval, then one last step to t = 1:
    "Mean"     x + dt_last (v + D s)       the drift step without noise
    "Euler"    x + dt_last v               an ODE step
    "Tweedie"  x / alpha + sigma^2 / alpha s
    None       x (no last step; then the grid runs to 1 - sample_eps)
The model's velocity v and score s come from one model evaluation per drift (SiT evaluates it
twice with the same inputs).
"""
import math

import torch
from tqdm.auto import tqdm

from transport.paths import alpha_sigma, expand_like, score_coefficients, velocity_and_score
from transport.settings import time_interval

FIXED_ODE_METHODS = ("euler", "heun2")
SDE_METHODS = ("Euler", "Heun")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")  # flags.py repeats
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)  # tinyfusion/flags.py repeats them, torch-free, for --help


def velocity_and_score_fn(model_fn, transport):
    """f(x, t) -> (velocity, score) of a model that predicts transport.prediction."""
    def evaluate(x, t):
        return velocity_and_score(transport.path, transport.prediction, model_fn(x, t), x, t)
    return evaluate


def diffusion_coefficient(transport, form, norm, x, t):
    """D(t) of the SDE, broadcast like x."""
    t = expand_like(t, x)
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * score_coefficients(transport.path, t)[1]
    if form == "sigma":
        return norm * alpha_sigma(transport.path, t)[2]
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * torch.sin(math.pi * t) ** 2
    raise ValueError(f"unknown --diffusion-form {form}; choose one of {', '.join(DIFFUSION_FORMS)}")


def _times(t, x):
    return torch.ones(x.shape[0]).to(x) * t


# ----------------------------------------------------------------------- ODE
def sample_ode(model_fn, x, transport, method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False,
               progress=False):
    """The end point of the probability-flow ODE started at x (noise; data if reverse)."""
    if num_steps < 2:
        raise ValueError(f"--num-sampling-steps must be >= 2 for the ODE (the grid has that many times), "
                              f"got {num_steps}")
    t0, t1 = time_interval(transport, sampling=True, reverse=reverse)
    grid = torch.linspace(t0, t1, num_steps).to(x.device)
    field = velocity_and_score_fn(model_fn, transport)
    if method not in FIXED_ODE_METHODS:
        return _adaptive_ode(field, x, grid, method, atol, rtol)
    for index in tqdm(range(num_steps - 1), disable=not progress, desc=f"ODE {method}"):
        start, stop = grid[index], grid[index + 1]
        dt = stop - start
        k1 = field(x, _times(start, x))[0]
        if method == "euler":
            x = x + dt * k1
        else:
            k2 = field(x + dt * k1, _times(start + dt, x))[0]
            x = x + dt * (k1 * 0.5 + k2 * 0.5)
    return x


def _adaptive_ode(field, x, grid, method, atol, rtol):
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ValueError(f"the ODE method {method} needs the torchdiffeq package, one of the requirements, which is not installed (pip install -r requirements.txt); "
                              f"without it use {' or '.join(FIXED_ODE_METHODS)}") from None
    return odeint(lambda t, state: field(state, _times(t, state))[0], x, grid, method=method,
                  atol=[atol], rtol=[rtol])[-1]


# ----------------------------------------------------------------------- SDE
def sample_sde(model_fn, x, transport, method="Euler", num_steps=250, diffusion_form="sigma", diffusion_norm=1.0,
               last_step="Mean", last_step_size=0.04, noise_fn=None, progress=False):
    """The end point of the SDE started at noise x. noise_fn(x) draws each step's standard normal
    noise like x (default torch.randn from the global generator, as SiT)."""
    if method not in SDE_METHODS:
        raise ValueError(f"unknown SDE --sampling-method {method}; choose one of {', '.join(SDE_METHODS)}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"unknown --last-step {last_step}; choose one of Mean, Tweedie, Euler, None")
    if num_steps < 2:
        raise ValueError(f"--num-sampling-steps must be >= 2 for the SDE, got {num_steps}")
    last_step_size = 0.0 if last_step is None else last_step_size
    t0, t1 = time_interval(transport, sampling=True, sde=True, diffusion_form=diffusion_form,
                           last_step_size=last_step_size)
    if diffusion_form == "SBDM" and t0 == 0 and transport.path != "VP":
        raise ValueError(f"--diffusion-form SBDM is infinite at t = 0 on the {transport.path} path; pass "
                              f"--sample-eps > 0 (e.g. 1e-3) or another --diffusion-form")
    noise_fn = noise_fn or (lambda like: torch.randn(like.shape).to(like))
    field = velocity_and_score_fn(model_fn, transport)

    def drift(state, t):
        velocity, score = field(state, t)
        return velocity + diffusion_coefficient(transport, diffusion_form, diffusion_norm, state, t) * score

    grid = torch.linspace(t0, t1, num_steps)
    dt = grid[1] - grid[0]
    for time in tqdm(grid[:-1], disable=not progress, desc=f"SDE {method}"):
        t = _times(time, x)
        dw = noise_fn(x) * torch.sqrt(dt)
        shake = torch.sqrt(2 * diffusion_coefficient(transport, diffusion_form, diffusion_norm, x, t))
        if method == "Euler":
            x = x + drift(x, t) * dt + shake * dw
        else:
            x = x + shake * dw
            k1 = drift(x, t)
            k2 = drift(x + dt * k1, t + dt)
            x = x + 0.5 * dt * (k1 + k2)
    return _last_step(field, drift, x, _times(t1, x), transport, last_step, last_step_size)


def _last_step(field, drift, x, t, transport, last_step, size):
    if last_step is None:
        return x
    if last_step == "Mean":
        return x + drift(x, t) * size
    if last_step == "Euler":
        return x + field(x, t)[0] * size
    alpha, _, sigma, _ = alpha_sigma(transport.path, t)
    return x / alpha[0] + sigma[0] ** 2 / alpha[0] * field(x, t)[1]

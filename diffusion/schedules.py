"""Noise (beta) schedules.

A schedule is a float64 numpy array of T betas, beta_t = variance of the noise
added at forward step t. Everything downstream (alphas_cumprod, posterior
coefficients) is derived from it in float64, because 1 - alphas_cumprod gets
tiny near t = 0 and float32 would lose the posterior variance there.
"""

import math

import numpy as np


def linear_beta_schedule(num_timesteps):
    """The DDPM linear schedule, rescaled so any T traces the same curve as T=1000.

    DDPM used linspace(1e-4, 0.02, 1000). Multiplying both ends by 1000 / T keeps
    the total amount of noise (sum of betas) roughly independent of T, which is why
    ADM / DiT use `scale = 1000 / T`. Note that for T <= 20 the last beta reaches 1
    or more, which is not a valid diffusion; GaussianDiffusion rejects it.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_beta_schedule(num_timesteps, s=0.008, max_beta=0.999):
    """The improved-DDPM cosine schedule (Nichol & Dhariwal 2021).

    Defines alpha_bar(u) = cos(((u + s) / (1 + s)) * pi / 2)^2 on u in [0, 1] and
    picks beta_i so that the product of (1 - beta) matches alpha_bar at the grid
    points u = i / T. The small offset s keeps beta_0 from being vanishingly small;
    betas are clipped at max_beta because alpha_bar(1) = 0 would make the last beta 1.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return np.minimum(betas, max_beta)


def get_named_beta_schedule(schedule_name, num_timesteps):
    """Betas for a schedule name ("linear" or "cosine") as float64 numpy."""
    if schedule_name == "linear":
        return linear_beta_schedule(num_timesteps)
    if schedule_name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule_name!r}; use 'linear' or 'cosine'")

"""Small probability helpers used by the diffusion losses and samplers.

They operate on torch tensors (python floats also work where broadcasting allows)
and are written from the closed forms, so each one can be checked by hand.
"""

import math

import torch


def mean_flat(tensor):
    """Mean over every dimension except the batch dimension -> shape (B,)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats.

    Parametrised by log-variances because the diffusion tables store them that way
    (the posterior variance at t=0 is 0, so its log has to be clipped, and learned
    variances are interpolated in log space).
    """
    # Accept python floats / numpy scalars for any argument by promoting them to
    # tensors shaped like the first tensor argument.
    reference = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=reference.dtype, device=reference.device)
        for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Fast tanh approximation of the standard normal CDF (max abs error ~1e-4).

    This is the approximation DDPM / ADM use for the discretized decoder, so bits/dim
    numbers stay comparable with published ones.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-probability of data x in [-1, 1] under a Gaussian discretized to 256 bins.

    Image data has 256 levels mapped to [-1, 1], so each value stands for a bin of
    width 2/255 centred on it. The probability is the Gaussian mass of that bin; the
    two edge bins extend to -inf / +inf so the probabilities sum to one.
    `log_scales` is log(std). Returns elementwise log-probabilities in nats.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must share a shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    half_bin = 1.0 / 255.0
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # Clamp before log: far-off bins have (numerically) zero mass.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_upper,  # lowest bin: (-inf, -1 + 1/255]
        torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin_mass),  # highest bin: [1 - 1/255, inf)
    )


def per_sample_noise_fn(generators):
    """A `noise_fn` for the sampling loops that draws row i from generators[i] only.

    Use it when sample i must depend on its own seed alone, whatever else is in the
    batch (e.g. sample_ddp: image index -> seed, independent of batch size and world
    size). Each row is drawn on the generator's device and then moved to the device
    of the tensor being matched.

        gens = [torch.Generator().manual_seed(seed0 + i) for i in indices]
        diffusion.p_sample_loop(model, shape, noise_fn=per_sample_noise_fn(gens))
    """
    generators = list(generators)

    def draw(like):
        if like.shape[0] != len(generators):
            raise ValueError(
                f"per_sample_noise_fn has {len(generators)} generators but the batch has "
                f"{like.shape[0]} rows; pass one generator per sample"
            )
        rows = [
            torch.randn(tuple(like.shape[1:]), generator=g, device=g.device, dtype=like.dtype)
            for g in generators
        ]
        return torch.stack(rows).to(like.device)

    return draw

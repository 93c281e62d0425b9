"""SiT's training loss: draw t ~ U[t0, t1] and noise x0 ~ N(0, I), build x_t between x0 and the
data x1, and regress the model output on the target of its prediction kind:

    velocity  |out - u_t|^2                  (never weighted)
    noise     w(t) |out - x0|^2
    score     w(t) |sigma_t out + x0|^2       (the score target is -x0 / sigma_t)

with w = 1 (default), (lam / sigma)^2 ("velocity") or lam / sigma^2 ("likelihood"), lam the
score-to-velocity coefficient of transport.paths. Losses are per-sample means over every
non-batch dimension.
"""
import torch

from transport.paths import alpha_sigma, expand_like, interpolate, score_coefficients
from transport.settings import time_interval


def sample_time_and_noise(transport, x1, generator=None):
    """(t, x0): t uniform on the training interval, shape (N,), and x0 like x1. Drawn on the CPU
    (as SiT draws t) from `generator`, then moved to x1's device and dtype."""
    t0, t1 = time_interval(transport, sampling=False)
    t = torch.rand((x1.shape[0],), generator=generator) * (t1 - t0) + t0
    noise = torch.randn(x1.shape, generator=generator)
    return t.to(x1), noise.to(x1)


def loss_weight(transport, x, t):
    """w(t) broadcast like x (1 for an unweighted loss)."""
    if transport.loss_weight is None:
        return 1
    _, lam = score_coefficients(transport.path, expand_like(t, x))
    _, _, sigma, _ = alpha_sigma(transport.path, expand_like(t, x))
    if transport.loss_weight == "velocity":
        return (lam / sigma) ** 2
    return lam / sigma ** 2


def training_losses(model, x1, transport, model_kwargs=None, t=None, noise=None, generator=None):
    """{"loss": (N,) per-sample losses, "pred": the model output} for data x1. Pass t and noise to
    fix the draw; otherwise they come from sample_time_and_noise(generator)."""
    if (t is None) != (noise is None):
        raise ValueError("pass both t and noise, or neither")
    if t is None:
        t, noise = sample_time_and_noise(transport, x1, generator)
    xt, ut = interpolate(transport.path, t, noise, x1)
    output = model(xt, t, **(model_kwargs or {}))
    return {"loss": losses_from_output(transport, output, xt=xt, ut=ut, t=t, noise=noise), "pred": output}


def losses_from_output(transport, output, *, xt, ut, t, noise):
    """(N,) per-sample losses of a model `output` at x_t = interpolate(path, t, noise, x1), whose
    velocity is ut (the module docstring's targets and weights)."""
    if output.shape != xt.shape:
        raise ValueError(f"the model returned shape {tuple(output.shape)} for inputs of shape {tuple(xt.shape)}; "
                         f"a SiT outputs exactly its input channels")
    dims = list(range(1, xt.dim()))
    if transport.prediction == "velocity":
        return torch.mean((output - ut) ** 2, dim=dims)
    weight = loss_weight(transport, xt, t)
    if transport.prediction == "noise":
        error = output - noise
    else:
        _, _, sigma, _ = alpha_sigma(transport.path, expand_like(t, xt))
        error = output * sigma + noise
    return torch.mean(weight * error ** 2, dim=dims)

"""Gaussian diffusion: forward noising, training losses, DDPM and DDIM sampling.

Notation (T = num_timesteps, t = 0..T-1):
    alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s,  abar_{-1} = 1
    forward:    q(x_t | x_0)      = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    posterior:  q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I)
                c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)
                c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
                beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    reverse:    p(x_{t-1} | x_t)  = N(posterior mean at predicted x_0, model variance)

All tables are float64 numpy arrays; `_gather` picks entries at t and casts them to
the dtype of the tensor they are combined with, so float64 inputs get float64 math
and float32 / bf16 inputs are never silently upcast.

The network is always called as `model(x_t, t, **model_kwargs)`. Subclasses that
change the timestep indexing (respacing) override `wrap_model`; every method that
calls the model goes through it.
"""

import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""

    EPSILON = "epsilon"  # the noise that was added (DiT default)
    START_X = "start_x"  # x_0 directly


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = "learned"  # the extra C channels are log-variances
    LEARNED_RANGE = "learned_range"  # the extra C channels v in [-1,1] interpolate log beta~_t .. log beta_t
    FIXED_SMALL = "fixed_small"  # beta~_t (posterior variance)
    FIXED_LARGE = "fixed_large"  # beta_t (entry 0 replaced by beta~_1, see __init__)


class LossType(enum.Enum):
    MSE = "mse"  # mse (+ vb with frozen mean when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # as MSE, vb scaled by T/1000 (improved-DDPM's hybrid loss)
    KL = "kl"  # the variational bound itself
    RESCALED_KL = "rescaled_kl"  # the variational bound times T (sum over steps instead of mean)


def _gather(table, t, like):
    """table[t] as a tensor shaped (B, 1, ..., 1) to broadcast against `like`.

    Indexing happens in float64 numpy on the CPU (MPS has no float64), then the values
    are cast to like's dtype and device.
    """
    values = torch.from_numpy(table[t.detach().cpu().numpy().astype(np.int64)])
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _nonzero_mask(t, like):
    """1 where t > 0, else 0, shaped to broadcast against `like`: no noise on the last step."""
    return (t != 0).to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _infer_device(model, noise, device):
    """Device to sample on: explicit > given noise > the model's parameters > CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    # Bound methods such as model.forward_with_cfg carry the module in __self__;
    # timestep wrappers carry it in .model.
    owner = model
    if not isinstance(owner, torch.nn.Module):
        owner = getattr(model, "__self__", None) or getattr(model, "model", None)
    if isinstance(owner, torch.nn.Module):
        param = next(owner.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _generator_noise_fn(generator, noise_fn):
    """Turn the loop's `generator=` / `noise_fn=` options into one noise_fn (or None)."""
    if generator is not None and noise_fn is not None:
        raise ValueError("pass either generator= or noise_fn= to the sampling loop, not both")
    if generator is None:
        return noise_fn

    def draw(like):
        return torch.randn(tuple(like.shape), generator=generator, device=generator.device, dtype=like.dtype).to(
            like.device
        )

    return draw


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion over the given betas.

    Args:
        betas: 1-D float64 array of T values in (0, 1].
        model_mean_type, model_var_type, loss_type: enums above (or their string values).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        self.loss_type = LossType(loss_type)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1], got min {betas.min():.4g} max {betas.max():.4g}; "
                "with the linear schedule use diffusion_steps > 20"
            )
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])

        # Forward process q(x_t | x_0) and its inversion x_0 = f(x_t, eps).
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is -inf. Replace entry 0 by entry 1: the log variance
        # only matters at t = 0 through the decoder, which is a different term anyway.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:  # a one-step process has no entry 1; fall back to the forward variance
            self.posterior_log_variance_clipped = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

        # "Fixed large" uses beta_t, except at t = 0 where beta~_1 is used: DDPM found
        # that gives a better decoder likelihood than the tiny beta_0.
        if self.num_timesteps > 1:
            self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        else:
            self.fixed_large_variance = betas.copy()
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

    # ------------------------------------------------------------------ model calls

    def wrap_model(self, model):
        """The callable the diffusion actually invokes. Identity here; SpacedDiffusion
        maps its step indices back to the original ones. Callers that run the network
        themselves (e.g. to reuse one output for several losses) should call the result
        of this, so they feed the network the same timesteps training_losses would."""
        return model

    @property
    def _learns_variance(self):
        return self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

    def _split_output(self, model_output, x):
        """(mean-part, variance-part or None) with a clear error on channel mismatch."""
        channels = x.shape[1]
        if self._learns_variance:
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"model output has {model_output.shape[1]} channels but a learned variance needs "
                    f"2 x {channels}; build the model with learn_sigma=True or the diffusion with learn_sigma=False"
                )
            mean_part, var_part = torch.split(model_output, channels, dim=1)
            return mean_part, var_part
        if model_output.shape[1] != channels:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels but a fixed variance needs {channels}; "
                "build the diffusion with learn_sigma=True or the model with learn_sigma=False"
            )
        return model_output, None

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _gather(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = _gather(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x_start + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        variance = _gather(self.posterior_variance, t, x_t)
        log_variance_clipped = _gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance_clipped

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model at (x, t) and return the reverse-step Gaussian; see p_mean_variance_from_output."""
        model_output = self.wrap_model(model)(x, t, **(model_kwargs or {}))
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None):
        """p(x_{t-1} | x_t) from an already computed network output.

        Returns a dict with "mean", "variance", "log_variance" (all shaped like x),
        "pred_xstart" (after denoised_fn and optional clipping to [-1, 1]) and
        "model_output" (the mean-prediction channels).
        """
        mean_part, var_part = self._split_output(model_output, x)

        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_part
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            # v in [-1, 1] interpolates in log space between the two DDPM extremes,
            # which the network finds far easier than predicting a raw log-variance.
            min_log = _gather(self.posterior_log_variance_clipped, t, x)
            max_log = _gather(self.log_betas, t, x)
            frac = (var_part + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            log_variance = _gather(self.fixed_large_log_variance, t, x).expand_as(x)
        else:
            log_variance = _gather(self.posterior_log_variance_clipped, t, x).expand_as(x)
        if self.model_var_type == ModelVarType.FIXED_SMALL:
            variance = _gather(self.posterior_variance, t, x).expand_as(x)
        else:
            variance = torch.exp(log_variance)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x, t, mean_part)
        else:
            pred_xstart = mean_part
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "model_output": mean_part,
        }

    # ------------------------------------------------------------------ losses

    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension, per sample.

        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / ln 2 for t > 0, and the discretized
        decoder NLL -log p(x_0|x_1) / ln 2 at t == 0. Returns {"output", "pred_xstart"}.
        """
        model_output = self.wrap_model(model)(x_t, t, **(model_kwargs or {}))
        return self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised)

    def vb_terms_bpd_from_output(self, model_output, x_start, x_t, t, clip_denoised=True):
        """vb_terms_bpd for an already computed network output (gradients flow into it)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training losses for x_t = q_sample(x_start, t, noise).

        Returns a dict of (B,) tensors "loss", "mse", "vb"; see losses_from_output.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = self.wrap_model(model)(x_t, t, **(model_kwargs or {}))
        return self.losses_from_output(model_output, x_start, x_t, t, noise)

    def losses_from_output(self, model_output, x_start, x_t, t, noise):
        """The training losses from a network output computed elsewhere.

        - "mse": mean over non-batch dims of (target - prediction)^2, target = noise
          (EPSILON) or x_start (START_X).
        - "vb": the variational-bound term in bits (vb_terms_bpd). For the MSE losses it
          is computed with the mean prediction DETACHED, so it trains only the variance
          channels and the mean keeps being trained by the mse alone (improved-DDPM's
          hybrid loss); zero when the variance is fixed. RESCALED_MSE scales it by T/1000.
        - "loss": mse + vb for the MSE losses; vb (times T for RESCALED_KL) for the KL
          losses, in which case gradients reach mean and variance through vb and "mse"
          is only reported.
        """
        mean_part, var_part = self._split_output(model_output, x_t)
        target = noise if self.model_mean_type == ModelMeanType.EPSILON else x_start
        if target.shape != mean_part.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != prediction shape {tuple(mean_part.shape)}")
        terms = {"mse": mean_flat((target - mean_part) ** 2)}

        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            vb = self.vb_terms_bpd_from_output(model_output, x_start, x_t, t, clip_denoised=False)["output"]
            terms["vb"] = vb
            terms["loss"] = vb * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else vb
            return terms

        if var_part is not None:
            frozen_output = torch.cat([mean_part.detach(), var_part], dim=1)
            vb = self.vb_terms_bpd_from_output(frozen_output, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Keeps the vb weight comparable to the original T=1000 setting.
                vb = vb * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros_like(terms["mse"])
        terms["vb"] = vb
        terms["loss"] = terms["mse"] + vb
        return terms

    def output_kl_bpd(self, target_output, model_output, x_t, t, detach_mean=True):
        """KL(p_target(x_{t-1}|x_t) || p_model(x_{t-1}|x_t)) / ln 2 per sample, in bits.

        For distillation: both outputs are raw network outputs at the same (x_t, t)
        (e.g. teacher and student); the target is detached. With detach_mean=True the
        model's mean channels are detached as in the training vb term, so the KL only
        trains the variance channels (the mean is already trained by the eps loss).
        Uses the KL at every t, including t == 0 (there is no data term to decode).
        """
        if detach_mean and not self._learns_variance:
            raise ValueError(
                "output_kl_bpd(detach_mean=True) with a fixed variance has nothing to train; "
                "pass detach_mean=False or use a learned-sigma diffusion"
            )
        target = self.p_mean_variance_from_output(target_output.detach(), x_t, t, clip_denoised=False)
        if detach_mean:
            mean_part, var_part = self._split_output(model_output, x_t)
            model_output = torch.cat([mean_part.detach(), var_part], dim=1)
        pred = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = normal_kl(target["mean"], target["log_variance"], pred["mean"], pred["log_variance"])
        return mean_flat(kl) / math.log(2.0)

    # ------------------------------------------------------------------ DDPM sampling

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise=None, noise_fn=None):
        """One ancestral step x_t -> x_{t-1} = mean + [t > 0] * exp(0.5 log_var) * noise.

        noise: the Gaussian draw to use; else noise_fn(x); else torch.randn_like(x).
        It is drawn after the model call (and also on the last step, where it is
        masked) so the global RNG stream matches ADM / DiT for the same seed.
        Returns {"sample", "pred_xstart"}.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = noise_fn(x) if noise_fn is not None else torch.randn_like(x)
        sample = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
        noise_fn=None,
    ):
        """Ancestral sampling from x_T to x_0; returns the final sample.

        noise: x_T (else drawn). For reproducibility independent of the global RNG,
        pass generator= (a torch.Generator used for x_T and every step's noise) or
        noise_fn= (callable(like_tensor) -> Gaussian tensor of like's shape; see
        diffusion_utils.per_sample_noise_fn for one seed per sample).
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator, noise_fn
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
        noise_fn=None,
    ):
        """Generator over the steps of p_sample_loop, yielding {"sample", "pred_xstart"}."""
        device = _infer_device(model, noise, device)
        noise_fn = _generator_noise_fn(generator, noise_fn)
        img = self._initial_noise(shape, noise, device, noise_fn)
        for i in self._step_indices(progress):
            t = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, noise_fn=noise_fn)
            yield out
            img = out["sample"]

    def _initial_noise(self, shape, noise, device, noise_fn):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise
        if noise_fn is not None:
            return noise_fn(torch.empty(tuple(shape), device=device))
        return torch.randn(*shape, device=device)

    def _step_indices(self, progress):
        indices = range(self.num_timesteps - 1, -1, -1)
        return tqdm(indices, desc="sampling") if progress else indices

    # ------------------------------------------------------------------ DDIM sampling

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, noise=None, noise_fn=None
    ):
        """One DDIM step (Song et al. 2021) x_t -> x_{t-1}.

        eps is re-derived from the (possibly clipped) pred_xstart so clipping stays
        consistent; sigma = eta * sqrt((1-abar_prev)/(1-abar)) * sqrt(1 - abar/abar_prev);
        x_{t-1} = pred_x0 sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) eps + [t>0] sigma noise.
        eta=0 is the deterministic sampler, eta=1 matches DDPM's posterior variance.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _gather(self.alphas_cumprod, t, x)
        alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        if noise is None:
            # Always drawn (as ADM does) so the RNG stream does not depend on eta.
            noise = noise_fn(x) if noise_fn is not None else torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
        noise_fn=None,
    ):
        """DDIM sampling from x_T to x_0; arguments as p_sample_loop plus eta."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, generator, noise_fn
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
        noise_fn=None,
    ):
        """Generator over the steps of ddim_sample_loop, yielding {"sample", "pred_xstart"}."""
        device = _infer_device(model, noise, device)
        noise_fn = _generator_noise_fn(generator, noise_fn)
        img = self._initial_noise(shape, noise, device, noise_fn)
        for i in self._step_indices(progress):
            t = torch.full((img.shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised, denoised_fn, model_kwargs, eta, noise_fn=noise_fn)
            yield out
            img = out["sample"]

"""DiT: class-conditional Gaussian diffusion (`diffusion/`), the family of the original work.

Training, the gate search and Masked KD draw t ~ U{0..999} on the 1000-step linear schedule with
learned sigma (mse + vb); sampling respaces it (ddpm, ddim) or hands it to a fast ODE solver
(dpm-solver++, unipc). A DiT checkpoint records no process settings: there is one.
"""
import torch

from diffusion import create_diffusion
from diffusion.distillation import masked_kd_losses
from tinyfusion.errors import TinyFusionError
from tinyfusion.families import entry_named
from tinyfusion.families.base import ModelFamily
from tinyfusion.io.downloads import resolve_released

TRAINING_STEPS = 1000  # the training diffusion's steps (create_diffusion's default)


def _respaced_loop(diffusion, model_fn, shape, eta, kwargs):
    return diffusion.p_sample_loop(model_fn, shape, **kwargs)


def _ddim_loop(diffusion, model_fn, shape, eta, kwargs):
    return diffusion.ddim_sample_loop(model_fn, shape, eta=eta, **kwargs)


def _solver_loop(solver, model_fn, shape, eta, kwargs):
    return solver.sample_loop(model_fn, kwargs["noise"], kwargs["model_kwargs"], progress=kwargs["progress"])


# the sampler registry: name -> fn(process, model_fn, shape, eta, loop keywords) -> final latents.
# A new sampler is one entry here and its name in the registry entry's `samplers` (the --sampler
# choices, which --help lists without torch). The fast solvers' process is a FastSolver.
SAMPLERS = {"ddpm": _respaced_loop, "ddim": _ddim_loop, "dpm-solver++": _solver_loop, "unipc": _solver_loop}


def sampling_process(sampler, num_steps, timestep_spacing):
    """What `generate` samples a DiT with: the respaced diffusion of ddpm / ddim ("dit" spacing:
    DiT's, "leading": diffusers' DiTPipeline's) or the FastSolver of dpm-solver++ / unipc."""
    if SAMPLERS[sampler] is _solver_loop:
        from tinyfusion.sampling.solvers import FastSolver
        return FastSolver(sampler, num_steps, timestep_spacing)
    return create_diffusion(("leading" if timestep_spacing == "leading" else "") + str(num_steps))


class Family(ModelFamily):
    entry = entry_named("DiT")
    exports_to_diffusers = True
    measures_quality_while_training = True
    original_grid = True

    def __init__(self):
        self.diffusion = create_diffusion(timestep_respacing="")  # 1000 steps, linear, learned sigma

    @classmethod
    def from_args(cls, args):
        return cls()

    def training_losses(self, model, x, y):
        """The standard DiT loss of a batch (mse + vb), as fp32 scalars."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        terms = self.diffusion.training_losses(model, x, t, dict(y=y))
        return {"loss": terms["loss"].mean(), "gt": terms["loss"].mean().detach(),
                "mse": terms["mse"].mean().detach(), "vb": terms["vb"].mean().detach()}

    def kd_losses(self, student, teacher, x, y, **settings):
        return masked_kd_losses(student, teacher, self.diffusion, x, y, **settings)

    def calibration_inputs(self, x, generator, *, calibration, num_timesteps):
        """clean (the original): the latents as they are with t ~ U{0..num_timesteps-1}; noised
        (ours): x_t = q_sample(x, t, noise), t ~ U{0..999}; t, then the noise, from `generator`."""
        if calibration == "clean":
            return x, torch.randint(0, num_timesteps, (len(x),), generator=generator)
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x),), generator=generator)
        return self.diffusion.q_sample(x, t, noise=torch.randn(x.shape, generator=generator)), t

    def calibration_record(self, calibration, num_timesteps):
        timesteps = num_timesteps if calibration == "clean" else self.diffusion.num_timesteps
        return dict(timesteps=timesteps), f"t in [0, {timesteps})"

    def activation_inputs(self, latents, generator, *, when=None, model=None):
        """x_t = q_sample with t uniform in [0, 1000) (or `when` for all), then seeded noise."""
        if when is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (len(latents),), generator=generator)
        else:
            t = torch.full((len(latents),), when, dtype=torch.long)
        noise = torch.randn(latents.shape, generator=generator)
        return self.diffusion.q_sample(latents, t, noise=noise), t

    def check_noising_flags(self, model_name, *, timestep, time):
        if time is not None:
            raise TinyFusionError(f"--time is a SiT time; {model_name} is a DiT: pass --timestep in [0, 1000)")

    def noising_record(self, when):
        return dict(timesteps="uniform [0, 1000)" if when is None else when)

    def sampling_process(self, sampler, num_steps, timestep_spacing, options):
        return sampling_process(sampler, num_steps, timestep_spacing)

    @staticmethod
    def run_sampler(process, sampler, model_fn, shape, loop_kwargs, eta, options, context=None):
        solver_name = getattr(process, "name", None)  # a FastSolver's; diffusions have none
        if (SAMPLERS[sampler] is _solver_loop or solver_name is not None) and solver_name != sampler:
            raise ValueError(f"sampler {sampler!r} needs its own sampling process: sampling_process({sampler!r}, ...)")
        return SAMPLERS[sampler](process, model_fn, shape, eta, loop_kwargs)

    def preview_samples(self, model, labels, *, seed, cfg_scale, num_steps, vae, device):
        """DiT's sample.py recipe with DDPM (original_grid_samples)."""
        return self.original_grid_samples(model, create_diffusion(str(num_steps)), labels, seed=seed,
                                          cfg_scale=cfg_scale, vae=vae, device=device)

    @torch.no_grad()
    def original_grid_samples(self, model, process, labels, *, seed, cfg_scale, vae, device, sampler="ddpm", eta=0.0,
                              guide_all_channels=False, amp_dtype=torch.float32, progress=False):
        """The original sample.py: one global seed, z ~ randn(n, C, L, L) on the device for the
        whole grid, [z; z] with labels [y; null], the sampling loop over model.forward_with_cfg with
        clip_denoised=False, the first half decoded (latents / 0.18215, the SD-VAE's scale; another VAE's
        own scaling factor)."""
        from tinyfusion.flags import autocast
        from tinyfusion.io.vae import decode
        torch.manual_seed(seed)
        z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, device=device)
        y = torch.tensor(labels, device=device)
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.tensor([model.num_classes] * len(labels), device=device)], 0)
        model_kwargs = dict(y=y, cfg_scale=cfg_scale)
        if guide_all_channels:  # not the original's: it guides the first 3 channels
            model_kwargs["guide_all_channels"] = True
        forward = model.forward_with_cfg
        if amp_dtype != torch.float32:
            def forward(x, t, **kwargs):
                with autocast(amp_dtype, device):
                    return model.forward_with_cfg(x, t, **kwargs).float()
        loop_kwargs = dict(noise=z, clip_denoised=False, model_kwargs=model_kwargs, progress=progress, device=device)
        samples = self.run_sampler(process, sampler, forward, z.shape, loop_kwargs, eta, None)
        return decode(vae, samples.chunk(2, dim=0)[0])

    @classmethod
    def default_checkpoint(cls, model_name, image_size):
        """The original uses the released DiT-XL-2-{size}x{size}.pt: a copy in pretrained/ (or the
        original's pretrained_models/), else it is downloaded."""
        if model_name == "DiT-XL/2" and image_size in (256, 512):
            return resolve_released(f"DiT-XL-2-{image_size}x{image_size}.pt")
        tiny = (" (the released TinyDiT: --ckpt TinyDiT-D14-MaskedKD-500K.pt)"
                if (model_name, image_size) == ("DiT-D14/2", 256) else "")
        raise TinyFusionError(f"--ckpt is required for --model {model_name} at --image-size {image_size}: only "
                              f"DiT-XL/2 at 256/512 has a default checkpoint; pass your trained or pruned checkpoint{tiny}")

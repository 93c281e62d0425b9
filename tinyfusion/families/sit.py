"""SiT: the same transformer trained on an interpolant transport (`transport/`), as SiT's code.

Its flags keep SiT's names and defaults (defined torch-free in tinyfusion/flags.py): the
interpolant (--path-type, --prediction, --train-eps, --sample-eps; training adds --loss-weight)
and the sampling flags of SiT's sample.py. SiT's mode argument (ODE / SDE) is our
`--sampler ode|sde`; --sampling-method is the solver of that mode (ODE: euler, heun2, or a
torchdiffeq method, default dopri5; SDE: Euler (Maruyama) or Heun, default Euler).

A SiT checkpoint we write records the interpolant it was trained with (`transport` in its
metadata): a later script given another --path-type / --prediction stops with one line, since
the model's output would be read as another quantity.
"""
import importlib.util

import torch

from tinyfusion.errors import TinyFusionError
from tinyfusion.families import entry_named
from tinyfusion.families.base import ModelFamily, one_line_errors
from tinyfusion.io.downloads import resolve_released
from transport.distillation import transport_kd_losses
from transport.loss import sample_time_and_noise, training_losses
from transport.paths import interpolate
from transport.samplers import FIXED_ODE_METHODS, SDE_METHODS, sample_ode, sample_sde
from transport.settings import create_transport, time_interval

# the flags that change a SiT's images (sample_ddp refuses to resume a run with others)
IDENTITY_KEYS = ("path_type", "prediction", "sample_eps", "train_eps", "sampling_method", "atol", "rtol",
                 "diffusion_form", "diffusion_norm", "last_step", "last_step_size")


class Family(ModelFamily):
    entry = entry_named("SiT")
    record_keys = ("transport",)

    def __init__(self, transport):
        self.transport = transport

    @classmethod
    def from_args(cls, args):
        with one_line_errors():
            return cls(create_transport(args.path_type, args.prediction, getattr(args, "loss_weight", None),
                                        args.train_eps, args.sample_eps))

    def describe(self):
        return f"transport {self.transport}"

    # ------------------------------------------------------------------ checkpoints
    def record(self):
        transport = self.transport
        return {"transport": dict(path_type=transport.path, prediction=transport.prediction,
                                  loss_weight=transport.loss_weight, train_eps=transport.train_eps,
                                  sample_eps=transport.sample_eps)}

    def check_record(self, metadata, source):
        recorded = (metadata or {}).get("transport")
        if not recorded:
            return
        for key, ours in (("path_type", self.transport.path), ("prediction", self.transport.prediction)):
            if recorded.get(key) is not None and recorded[key] != ours:
                flag = f"--{key.replace('_', '-')}"
                raise TinyFusionError(f"{source} is a SiT trained with {flag} {recorded[key]}, not {ours}; "
                                      f"pass {flag} {recorded[key]}")

    def resume_identity(self):
        return dict(path_type=self.transport.path, prediction=self.transport.prediction)

    # ------------------------------------------------------------------ training
    def training_losses(self, model, x, y):
        """SiT's training loss of a batch (t and noise drawn from the global generator), fp32 scalars."""
        loss = training_losses(model, x, self.transport, dict(y=y))["loss"].mean()
        return {"loss": loss, "gt": loss.detach()}

    def kd_losses(self, student, teacher, x, y, **settings):
        return transport_kd_losses(student, teacher, self.transport, x, y, **settings)

    def noised(self, x1, generator):
        """(x_t, t) of the transport for data x1: t and the noise from `generator`."""
        t, noise = sample_time_and_noise(self.transport, x1, generator)
        return interpolate(self.transport.path, t, noise, x1)[0], t

    def check_calibration(self, calibration):
        if calibration != "noised":
            raise TinyFusionError("--calibration clean gives the model DiT timesteps 0..N-1; a SiT is calibrated on "
                                  "its transport's noised inputs (--calibration noised, its default)")

    def calibration_inputs(self, x, generator, *, calibration, num_timesteps):
        """Only "noised": t uniform on the training interval, then x0, x_t = alpha_t x1 + sigma_t x0."""
        self.check_calibration(calibration)
        return self.noised(x, generator)

    def calibration_record(self, calibration, num_timesteps):
        interval = list(time_interval(self.transport, sampling=False))
        return (dict(timesteps=None, time_interval=interval, **self.record()),
                "t in [{}, {}] of the transport".format(*interval))

    def activation_inputs(self, latents, generator, *, when=None, model=None):
        """t uniform on the training interval then x0 (as training draws them), or t = `when`."""
        if when is None:
            return self.noised(latents, generator)
        t = torch.full((len(latents),), when, dtype=latents.dtype)
        noise = torch.randn(latents.shape, generator=generator)
        return interpolate(self.transport.path, t, noise, latents)[0], t

    def check_noising_flags(self, model_name, *, timestep, time):
        if timestep is not None:
            raise TinyFusionError(f"--timestep is a DiT timestep; {model_name} is a SiT: pass --time in [0, 1] (1 = data)")

    def noising_record(self, when):
        times = when if when is not None else "uniform on [{}, {}]".format(
            *time_interval(self.transport, sampling=False))
        return dict(times=times, **self.record())

    # ------------------------------------------------------------------ sampling
    def check_sampler(self, model_name, sampler):
        if sampler not in self.entry.samplers:
            raise TinyFusionError(f"{model_name} is a SiT: pass --sampler ode or --sampler sde (SiT's ODE / SDE modes)")

    def sampling_options(self, args):
        """Keyword arguments of transport.sample_ode / sample_sde for `args.sampler`."""
        if args.sampler == "ode":
            method = args.sampling_method or "dopri5"
            if method in SDE_METHODS:
                raise TinyFusionError(f"--sampling-method {method} is an SDE method; the ODE takes euler, heun2 or "
                                      f"dopri5")
            if method not in FIXED_ODE_METHODS and importlib.util.find_spec("torchdiffeq") is None:
                raise TinyFusionError(f"--sampling-method {method} needs the torchdiffeq package, one of the "
                                      f"requirements, which is not installed (pip install -r requirements.txt); "
                                      f"without it use --sampling-method euler or heun2")
            return dict(method=method, num_steps=args.num_sampling_steps, atol=args.atol, rtol=args.rtol)
        method = args.sampling_method or "Euler"
        if method not in SDE_METHODS:
            raise TinyFusionError(f"--sampling-method {method} is not an SDE method; choose one of "
                                  f"{', '.join(SDE_METHODS)}")
        return dict(method=method, num_steps=args.num_sampling_steps, diffusion_form=args.diffusion_form,
                    diffusion_norm=args.diffusion_norm, last_step=args.last_step, last_step_size=args.last_step_size)

    def sampling_process(self, sampler, num_steps, timestep_spacing, options):
        return self.transport

    @staticmethod
    def run_sampler(process, sampler, model_fn, shape, loop_kwargs, eta, options, context=None):
        """The ODE or SDE from the start noise (the SDE's per-step noise from noise_fn)."""
        y = loop_kwargs["model_kwargs"]["y"]
        with one_line_errors():
            if sampler == "ode":
                return sample_ode(lambda x, t: model_fn(x, t, y), loop_kwargs["noise"], process,
                                  progress=loop_kwargs["progress"], **(options or {}))
            return sample_sde(lambda x, t: model_fn(x, t, y), loop_kwargs["noise"], process,
                              noise_fn=loop_kwargs["noise_fn"], progress=loop_kwargs["progress"], **(options or {}))

    def sample_name_suffix(self, args, options):
        """The solver, and for the SDE its diffusion and last step (as SiT's sample_ddp folder
        names), then any non-default interpolant."""
        suffix = f"-{options['method']}"
        if args.sampler == "sde":
            suffix += f"-{args.diffusion_form}-{args.diffusion_norm}-{args.last_step}-{args.last_step_size}"
        elif options["method"] not in FIXED_ODE_METHODS:
            suffix += f"-atol-{args.atol}-rtol-{args.rtol}"
        if (args.path_type, args.prediction) != ("Linear", "velocity"):
            suffix += f"-{args.path_type}-{args.prediction}"
        if args.sample_eps is not None or args.train_eps is not None:
            suffix += f"-eps-{args.train_eps}-{args.sample_eps}"
        return suffix

    def sample_identity(self, args, options):
        return {key: getattr(args, key) for key in IDENTITY_KEYS}

    def check_preview_steps(self, num_steps):
        if num_steps < 2:
            raise TinyFusionError("--num-sampling-steps must be >= 2 for a SiT's --sample-grid (SiT's SDE)")

    def preview_samples(self, model, labels, *, seed, cfg_scale, num_steps, vae, device):
        """SiT's default SDE from per-sample noise."""
        from tinyfusion.sampling.generate import generate, sample_generator
        return generate(model, self.transport, labels, [sample_generator(seed, i) for i in range(len(labels))],
                        cfg_scale, "sde", vae=vae, flow_options=dict(num_steps=num_steps))

    @classmethod
    def default_checkpoint(cls, model_name, image_size):
        """SiT released SiT-XL-2-256x256.pt only (the name SiT's download.py saves it under)."""
        if model_name == "SiT-XL/2" and image_size == 256:
            return resolve_released("SiT-XL-2-256x256.pt")
        raise TinyFusionError(f"no --ckpt given for --model {model_name} at --image-size {image_size}; the only "
                              f"released SiT is SiT-XL/2 at 256 (--model SiT-XL/2 --image-size 256 downloads it): "
                              f"pass --ckpt with your own SiT checkpoint")

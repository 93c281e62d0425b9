"""What the sampling scripts do with SiT's sampling flags (defined, with the names and defaults
of SiT's sample.py, by tinyfusion/cli.py add_transport_args). SiT's mode argument (ODE / SDE)
is our `--sampler ode|sde`; --sampling-method is the solver of that mode (ODE: euler, heun2, or
a torchdiffeq method, default dopri5; SDE: Euler (Maruyama) or Heun, default Euler)."""
import importlib.util

from tinyfusion.cli import FLOW_SAMPLERS
from tinyfusion.errors import TinyFusionError
from transport.samplers import FIXED_ODE_METHODS, SDE_METHODS
from transport.settings import create_transport


def transport_from_args(args):
    return create_transport(args.path_type, args.prediction, None, args.train_eps, args.sample_eps)


def flow_options(args):
    """Keyword arguments of transport.sample_ode / sample_sde for `args.sampler`."""
    if args.sampler == "ode":
        method = args.sampling_method or "dopri5"
        if method in SDE_METHODS:
            raise TinyFusionError(f"--sampling-method {method} is an SDE method; the ODE takes euler, heun2 or dopri5")
        if method not in FIXED_ODE_METHODS and importlib.util.find_spec("torchdiffeq") is None:
            raise TinyFusionError(f"--sampling-method {method} needs the torchdiffeq package (pip install torchdiffeq); "
                                  f"without it use --sampling-method euler or heun2")
        return dict(method=method, num_steps=args.num_sampling_steps, atol=args.atol, rtol=args.rtol)
    method = args.sampling_method or "Euler"
    if method not in SDE_METHODS:
        raise TinyFusionError(f"--sampling-method {method} is not an SDE method; choose one of {', '.join(SDE_METHODS)}")
    return dict(method=method, num_steps=args.num_sampling_steps, diffusion_form=args.diffusion_form,
                diffusion_norm=args.diffusion_norm, last_step=args.last_step, last_step_size=args.last_step_size)


def check_sampler_family(sampler, model_name, is_sit):
    """One line when a sampler does not fit the model family."""
    if is_sit and sampler not in FLOW_SAMPLERS:
        raise TinyFusionError(f"{model_name} is a SiT: pass --sampler ode or --sampler sde (SiT's ODE / SDE modes)")
    if not is_sit and sampler in FLOW_SAMPLERS:
        raise TinyFusionError(f"--sampler {sampler} is for SiT models; {model_name} is a DiT (use ddpm or ddim)")


IDENTITY_KEYS = ("path_type", "prediction", "sample_eps", "train_eps", "sampling_method", "atol", "rtol",
                 "diffusion_form", "diffusion_norm", "last_step", "last_step_size")


def flow_identity(args):
    """The SiT flags that change the images (sample_ddp refuses to resume with others)."""
    return {key: getattr(args, key) for key in IDENTITY_KEYS}


def flow_run_suffix(args):
    """Appended to a SiT run name so that two sampler settings never share a folder: the solver,
    and for the SDE its diffusion and last step (as SiT's sample_ddp folder names), then any
    non-default interpolant."""
    options = flow_options(args)
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

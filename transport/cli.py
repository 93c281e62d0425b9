"""What the scripts do with SiT's command-line flags (defined, with the names and defaults of
SiT's scripts, by tinyfusion/flags.py add_interpolant_args / add_transport_training_args /
add_transport_args, so that --help needs no torch): the interpolant (--path-type, --prediction,
--train-eps, --sample-eps; SiT's train.py adds --loss-weight), shared by the training, pruning
and sampling scripts, and the sampling flags of SiT's sample.py. SiT's mode argument (ODE / SDE)
is our `--sampler ode|sde`; --sampling-method is the solver of that mode (ODE: euler, heun2, or
a torchdiffeq method, default dopri5; SDE: Euler (Maruyama) or Heun, default Euler).

A SiT checkpoint we write records the interpolant it was trained with (`transport` in its
metadata): a later script given other --path-type / --prediction stops with one line, since the
model's output would be read as another quantity. A DiT command given a SiT flag also stops."""
import importlib.util

from tinyfusion.flags import FLOW_SAMPLERS, is_sit_name
from tinyfusion.errors import TinyFusionError
from transport.samplers import FIXED_ODE_METHODS, SDE_METHODS
from transport.settings import create_transport


def transport_from_args(args):
    return create_transport(args.path_type, args.prediction, getattr(args, "loss_weight", None), args.train_eps,
                            args.sample_eps)


TRANSPORT_FLAG_DEFAULTS = {"path_type": "Linear", "prediction": "velocity", "loss_weight": None, "train_eps": None,
                           "sample_eps": None}


def check_transport_flags(args):
    """A DiT command given a SiT flag with another value than its default stops (one line):
    the flag would be silently ignored. Returns the Transport of a SiT --model, None for a DiT."""
    if is_sit_name(args.model):
        return transport_from_args(args)
    for key, default in TRANSPORT_FLAG_DEFAULTS.items():
        if getattr(args, key, default) != default:
            raise TinyFusionError(f"--{key.replace('_', '-')} is a SiT flag; --model {args.model} is a DiT "
                                  f"(drop the flag or use the model's SiT- twin)")
    return None


def transport_record(transport):
    """What a SiT checkpoint records of its training transport (its metadata's `transport`)."""
    return dict(path_type=transport.path, prediction=transport.prediction, loss_weight=transport.loss_weight,
                train_eps=transport.train_eps, sample_eps=transport.sample_eps)


def check_transport_record(metadata, transport, source):
    """One line when a checkpoint records another interpolant or prediction than `transport`."""
    recorded = (metadata or {}).get("transport")
    if not recorded or transport is None:
        return
    for key, ours in (("path_type", transport.path), ("prediction", transport.prediction)):
        if recorded.get(key) is not None and recorded[key] != ours:
            raise TinyFusionError(f"{source} is a SiT trained with --{key.replace('_', '-')} {recorded[key]}, not "
                                  f"{ours}; pass --{key.replace('_', '-')} {recorded[key]}")


def flow_options(args):
    """Keyword arguments of transport.sample_ode / sample_sde for `args.sampler`."""
    if args.sampler == "ode":
        method = args.sampling_method or "dopri5"
        if method in SDE_METHODS:
            raise TinyFusionError(f"--sampling-method {method} is an SDE method; the ODE takes euler, heun2 or dopri5")
        if method not in FIXED_ODE_METHODS and importlib.util.find_spec("torchdiffeq") is None:
            raise TinyFusionError(f"--sampling-method {method} needs the torchdiffeq package, one of the requirements, which is not installed (pip install -r requirements.txt); "
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
        raise TinyFusionError(f"--sampler {sampler} is for SiT models; {model_name} is a DiT (use ddpm, ddim, dpm-solver++ or unipc)")


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

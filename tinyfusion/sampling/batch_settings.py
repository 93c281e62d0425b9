"""What a sample_ddp.py command line asks for: its checks, the family and sampler it resolves to,
and the name of the sample batch it writes (`{sample-dir}/{name}.npz`, run folder `{sample-dir}/{name}/`).

The drivers (quickstart.py, reproduce.py) find a finished sampling stage by this name, computed
from the very flags they pass: `batch_file_name(flags)`.
"""
from tinyfusion.errors import TinyFusionError
from tinyfusion.families import family_from_args
from tinyfusion.flags import ArgumentParser, add_sample_batch_args, resolve_timestep_spacing
from tinyfusion.sampling.generate import run_name


def check_batch_args(args):
    """(family, its sampler keywords) once every flag is checked, before any work; resolves
    args.sampler and args.timestep_spacing in place."""
    if args.cfg_scale < 1.0:
        raise TinyFusionError(f"--cfg-scale must be >= 1.0 (1.0 = no guidance), got {args.cfg_scale}")
    family = family_from_args(args)  # --model's family (another family's flags are refused)
    args.sampler = args.sampler or family.entry.default_sampler
    family.check_sampler(args.model, args.sampler)
    if args.sampler != "ddim" and args.ddim_eta != 0.0:
        raise TinyFusionError("--ddim-eta is for --sampler ddim")
    try:
        args.timestep_spacing = resolve_timestep_spacing(args.sampler, args.timestep_spacing)
    except ValueError as error:
        raise TinyFusionError(str(error)) from None
    return family, family.sampling_options(args)


def batch_name(args, family, options, precision="fp32"):
    """The run folder / .npz name of these settings (after check_batch_args; family and options what it returned)."""
    return run_name(args.model, args.ckpt, args.image_size, args.vae, args.cfg_scale, args.global_seed,
                    args.num_sampling_steps, args.sampler, precision, args.timestep_spacing) + (
        family.sample_name_suffix(args, options)) + ("-balanced" if getattr(args, "balanced_labels", False) else "")


def batch_file_name(flags):
    """The name (without .npz) sample_ddp.py gives the samples of these command-line flags."""
    parser = ArgumentParser()
    add_sample_batch_args(parser)
    args = parser.parse_args(flags)
    return batch_name(args, *check_batch_args(args))

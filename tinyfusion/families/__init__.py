"""The model families: one object per generative process a model is trained and sampled with.

A family answers everything that differs between DiT (Gaussian diffusion, `dit.py`), SiT
(the interpolant transport, `sit.py`) and MAR (masked autoregression with a diffusion head, `mar.py`): its flags, training loss, Masked KD loss, the noising BI
calibration sees, its samplers, and what a checkpoint records of the process and is checked
against. Scripts ask the family of their `--model`; no code outside this package compares
family names.

This file is the registry, and imports no torch: the flag checks that run before torch is
imported read an entry's plain facts. Adding a family is one module defining a `ModelFamily`
subclass (`base.py`) plus one `FamilyEntry` below (and its models in `models.py`).
"""
import importlib
from dataclasses import dataclass

from tinyfusion.errors import TinyFusionError


@dataclass(frozen=True)
class FamilyEntry:
    name: str                     # what a checkpoint records as model_family (models.py's class attribute)
    model_prefix: str             # its --model names start with this ("DiT-XL/2")
    module: str                   # the module that defines its ModelFamily subclass, `Family`
    samplers: tuple               # its --sampler choices
    default_sampler: str = None   # --sampler when none is given (None: the user must choose)
    max_sampling_steps: int = None  # the most --num-sampling-steps can be (None: any count)
    calibration: str = "clean"    # prune_by_score.py's default --calibration
    flag_defaults: tuple = ()     # (flag dest, default) of the flags only this family reads
    trains_sigma: bool = False    # its loss trains the final layer's sigma half (told from weights)
    default_sampling_steps: int = 250  # --num-sampling-steps when none is given
    layout: str = "dit"           # families of one layout share architectures and weights' shapes (twins)


DIFFUSION_SAMPLERS = ("ddpm", "ddim")       # DiT's respaced diffusion (diffusion/respace.py)
SOLVER_NAMES = ("dpm-solver++", "unipc")    # DiT's fast ODE solvers (tinyfusion/sampling/solvers.py)
FLOW_SAMPLERS = ("ode", "sde")              # SiT's ODE / SDE modes (transport/samplers.py)
# MAR's own flags, with MAR's defaults: training (the README's diffusion_batch_mul 4) and sampling
MAR_FLAG_DEFAULTS = (("mask_ratio_min", 0.7), ("diffusion_batch_mul", 4), ("num_iter", 64), ("cfg_schedule", "linear"),
                     ("temperature", 1.0))
MAR_SAMPLERS = ("mar",)                    # MAR's masked-autoregressive loop (tinyfusion/families/mar.py)
SIT_FLAG_DEFAULTS = (("path_type", "Linear"), ("prediction", "velocity"), ("loss_weight", None),
                     ("train_eps", None), ("sample_eps", None))

REGISTRY = (
    FamilyEntry("DiT", "DiT-", "tinyfusion.families.dit", samplers=(*DIFFUSION_SAMPLERS, *SOLVER_NAMES),
                default_sampler="ddpm", max_sampling_steps=1000, calibration="clean", trains_sigma=True),
    FamilyEntry("SiT", "SiT-", "tinyfusion.families.sit", samplers=FLOW_SAMPLERS, calibration="noised",
                flag_defaults=SIT_FLAG_DEFAULTS),
    FamilyEntry("MAR", "MAR-", "tinyfusion.families.mar", samplers=MAR_SAMPLERS, default_sampler="mar",
                max_sampling_steps=1000, calibration="clean", flag_defaults=MAR_FLAG_DEFAULTS, trains_sigma=True,
                default_sampling_steps=100, layout="mar"),
)


def entry_for_model(model_name):
    """The registry entry whose --model names include `model_name` (torch-free)."""
    for entry in REGISTRY:
        if str(model_name).startswith(entry.model_prefix):
            return entry
    raise TinyFusionError(f"--model {model_name} belongs to no model family (names start with "
                          f"{', '.join(entry.model_prefix for entry in REGISTRY)})")


def entry_named(name):
    """The registry entry of a recorded model_family name, or None for a name no entry has."""
    return next((entry for entry in REGISTRY if entry.name == name), None)


def family_class(entry):
    """The ModelFamily subclass of a registry entry (imports its module, and so torch)."""
    return importlib.import_module(entry.module).Family


def family_for_model(model_name):
    """The ModelFamily subclass of --model `model_name`."""
    return family_class(entry_for_model(model_name))


def default_checkpoint(model_name, image_size):
    """The released checkpoint --model uses without --ckpt (found locally or downloaded), or one
    line saying --ckpt is required."""
    return family_for_model(model_name).default_checkpoint(model_name, image_size)


def family_from_args(args, model_name=None):
    """The family of --model (or `model_name`) configured by its flags; a flag of another family
    given with a value other than its default stops in one line (it would be ignored)."""
    model_name = model_name or args.model
    entry = entry_for_model(model_name)
    for other in REGISTRY:
        if other is entry:
            continue
        for dest, default in other.flag_defaults:
            if dest not in dict(entry.flag_defaults) and getattr(args, dest, default) != default:
                raise TinyFusionError(f"--{dest.replace('_', '-')} is a {other.name} flag; --model {model_name} is a "
                                      f"{entry.name} (drop the flag or use the model's {other.name}- twin)")
    return family_class(entry).from_args(args)


def twin_entry(entry):
    """The other family of the same layout (DiT <-> SiT), or None (MAR has none)."""
    return next((other for other in REGISTRY if other is not entry and other.layout == entry.layout), None)


def twin_name(model_name, entry):
    """The same architecture's name in the family of `entry` ("DiT-XS/4" -> "SiT-XS/4")."""
    return entry.model_prefix + str(model_name)[len(entry_for_model(model_name).model_prefix):]

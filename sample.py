"""
Sample a grid of images from a DiT (pretrained, trained, pruned or fine-tuned) on one GPU or the CPU.

By default this is the original DiT/TinyFusion sample.py: `torch.manual_seed(--seed)` once, the
initial noise of the whole grid drawn at once, duplicated for the null label, ancestral sampling
with classifier-free guidance (`forward_with_cfg`) in fp32, the conditional half decoded by the
VAE and saved as a 4-column grid; the same checkpoint and seed give the same PNG as the original.
`--per-sample-seeds` instead gives image i its own noise from (--seed, i), the noise sample_ddp.py
uses for its sample i, so an image does not change when other labels are added or removed.

    python sample.py --model DiT-D14/2 --ckpt pretrained/TinyDiT-D14-MaskedKD-500K.pt --seed 5464

`--sampler dpm-solver++` or `unipc` with `--num-sampling-steps 20` samples a DiT with a fast ODE
solver (20 model evaluations instead of 250; not the original's procedure, a named option):

    python sample.py --model DiT-D14/2 --ckpt pretrained/TinyDiT-D14-MaskedKD-500K.pt \
        --sampler dpm-solver++ --num-sampling-steps 20

A SiT (--model SiT-...) samples with --sampler ode or sde (SiT's ODE / SDE modes, same flags):

    python sample.py --model SiT-XL/2 --ckpt pretrained/SiT-XL-2-256x256.pt --sampler sde
"""
import time

from tinyfusion.flags import (SAMPLING_PRECISION_HELP, ArgumentParser, add_checkpoint_args, add_guidance_args,
                            add_model_args, add_precision_arg, add_sampler_arg, add_sampling_compile_arg,
                            add_sampling_steps_check, add_timestep_spacing_arg, SAMPLING_STEPS_HELP, add_family_sampling_args, nonnegative_int,
                            resolve_timestep_spacing, sampling_steps, unit_interval)
from tinyfusion.errors import TinyFusionError, run_main

DEFAULT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    add_model_args(parser)
    add_guidance_args(parser, cfg_scale=4.0)
    parser.add_argument("--num-sampling-steps", type=sampling_steps, default=None, help=SAMPLING_STEPS_HELP)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    add_checkpoint_args(parser, help="checkpoint (plain / training / pruned); default: the released file of --model's "
                        "family (DiT-XL/2: DiT-XL-2-{256x256,512x512}.pt, SiT-XL/2: SiT-XL-2-256x256.pt)")
    parser.add_argument("--class-labels", type=nonnegative_int, nargs="+", default=DEFAULT_CLASS_LABELS)
    parser.add_argument("--per-sample-seeds", action="store_true",
                        help="image i gets its own noise from (--seed, i), as sample i of sample_ddp.py, instead of "
                             "the original's one global seed for the whole grid")
    add_sampler_arg(parser)
    parser.add_argument("--ddim-eta", type=unit_interval, default=0.0)
    add_timestep_spacing_arg(parser)
    parser.add_argument("--out", type=str, default="sample.png", help="grid PNG to write (replaced if it exists)")
    parser.add_argument("--grid", choices=["plain", "labeled"], default="plain",
                        help="plain: the original 4-column grid; labeled: one row per class with its label, "
                             "gaps between tiles, small images upscaled (nearest-neighbour) to >= 64 px")
    add_precision_arg(parser, help=SAMPLING_PRECISION_HELP)
    add_sampling_compile_arg(parser)
    parser.set_defaults(precision="fp32")  # the original samples in fp32; bf16 is opt-in on every device
    add_family_sampling_args(parser)
    add_sampling_steps_check(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import torch
from torchvision.utils import save_image

from tinyfusion.io.atomic_files import atomic_path
from tinyfusion.families.build import build_model
from tinyfusion.io.finite import check_finite_output
from tinyfusion.sampling.grids import save_labeled_grid
from tinyfusion.sampling.precision import cast_weights_once, resolve_sampling_precision
from tinyfusion.sampling.generate import compile_forward, generate, sample_generator
from tinyfusion.io.vae import load_vae, to_uint8_nhwc
from tinyfusion.families import family_from_args


def main(args):
    """Sample one image per --class-labels entry and save them as a 4-column grid PNG."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family = family_from_args(args)  # --model's family (another family's flags are refused)
    args.sampler = args.sampler or family.entry.default_sampler
    family.check_sampler(args.model, args.sampler)
    options = family.sampling_options(args)
    if args.sampler != "ddim" and args.ddim_eta != 0.0:
        raise TinyFusionError("--ddim-eta is for --sampler ddim")
    try:
        spacing = resolve_timestep_spacing(args.sampler, args.timestep_spacing)
    except ValueError as error:
        raise TinyFusionError(str(error)) from None
    bad_labels = [label for label in args.class_labels if label >= args.num_classes]
    if bad_labels:
        raise TinyFusionError(f"--class-labels {bad_labels} outside [0, {args.num_classes}); pass labels of the "
                              f"model's classes (or the right --num-classes)")
    ckpt = args.ckpt or family.default_checkpoint(args.model, args.image_size)
    model, metadata = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path, ckpt=ckpt,
                                  use_ema=not args.no_ema, groups=args.groups)
    family.check_record(metadata, ckpt)
    amp_dtype, precision_note = resolve_sampling_precision(args.precision, device)
    model = cast_weights_once(model.to(device).eval().requires_grad_(False), amp_dtype)  # bf16/fp16: cast once
    if args.compile:
        model = compile_forward(model)
    if precision_note:  # what auto chose, or that the precision asked for is emulated here
        print(precision_note)
    vae = load_vae(args.vae, args.vae_path, device)
    process = family.sampling_process(args.sampler, args.num_sampling_steps, spacing, options)

    start = time.time()
    if args.per_sample_seeds or not family.original_grid:  # a SiT has no original grid procedure: per-sample noise
        generators = [sample_generator(args.seed, i) for i in range(len(args.class_labels))]
        images = generate(model, process, args.class_labels, generators, args.cfg_scale, args.sampler,
                          args.ddim_eta, vae, amp_dtype=amp_dtype, progress=True,
                          guide_all_channels=args.guide_all_channels, flow_options=options)
    else:
        images = family.original_grid_samples(model, process, args.class_labels, seed=args.seed,
                                              cfg_scale=args.cfg_scale, sampler=args.sampler, eta=args.ddim_eta,
                                              guide_all_channels=args.guide_all_channels, amp_dtype=amp_dtype,
                                              vae=vae, device=device, progress=True)
    check_finite_output(images, f"the {len(images)} samples of {args.ckpt or ckpt}")  # NaN would be saved as black
    # normalize to [-1, 1] then *255 + 0.5: the same uint8 values as sample_ddp.py's clamp(127.5 x + 128)
    if args.grid == "labeled":  # one row per class, labelled, gaps, tiny images upscaled
        save_labeled_grid(args.out, to_uint8_nhwc(images.float()).numpy(), args.class_labels)
    else:
        with atomic_path(args.out) as tmp:
            save_image(images.float().cpu(), tmp, nrow=4, normalize=True, value_range=(-1, 1))
    print(f"saved {len(images)} samples to {args.out} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    run_main(main, ARGS)

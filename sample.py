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

from tinyfusion.flags import (SAMPLING_PRECISION_HELP, SOLVER_NAMES, ArgumentParser, add_guidance_args, add_model_args,
                            add_precision_arg, add_sampler_arg, add_sampling_compile_arg, add_sampling_steps_check,
                            add_timestep_spacing_arg, add_transport_args, autocast, nonnegative_int,
                            resolve_timestep_spacing, sampling_steps, unit_interval)
from tinyfusion.errors import TinyFusionError, run_main

DEFAULT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    add_model_args(parser)
    add_guidance_args(parser, cfg_scale=4.0)
    parser.add_argument("--num-sampling-steps", type=sampling_steps, default=250)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint (plain / training / pruned); default: the released DiT-XL-2 file")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights of a training checkpoint")
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
    add_transport_args(parser)
    add_sampling_steps_check(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import torch
from torchvision.utils import save_image

from tinyfusion.io.atomic_files import atomic_path
from tinyfusion.io.checkpoints import build_model
from tinyfusion.io.finite import check_finite_output
from tinyfusion.sampling.grids import save_labeled_grid
from tinyfusion.sampling.precision import cast_weights_once, resolve_sampling_precision
from tinyfusion.sampling.generate import compile_forward, generate, resolve_checkpoint, sample_generator, sampling_process
from tinyfusion.io.vae import decode, load_vae, to_uint8_nhwc
from transport.cli import check_sampler_family, check_transport_flags, check_transport_record, flow_options


@torch.no_grad()
def original_grid(model, diffusion, labels, args, vae, amp_dtype, device):
    """The original procedure: one global seed, z ~ randn(n, C, L, L) on the device for the
    whole grid, [z; z] with labels [y; null], the sampling loop over model.forward_with_cfg with
    clip_denoised=False, the first half decoded (latents / 0.18215)."""
    torch.manual_seed(args.seed)
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, device=device)
    y = torch.tensor(labels, device=device)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([model.num_classes] * len(labels), device=device)], 0)
    model_kwargs = dict(y=y, cfg_scale=args.cfg_scale)
    if args.guide_all_channels:  # not the original's: it guides the first 3 channels
        model_kwargs["guide_all_channels"] = True
    forward = model.forward_with_cfg
    if amp_dtype != torch.float32:
        def forward(x, t, **kwargs):
            with autocast(amp_dtype, device):
                return model.forward_with_cfg(x, t, **kwargs).float()
    if args.sampler in SOLVER_NAMES:  # not the original's: a fast ODE solver from the same z
        samples = diffusion.sample_loop(forward, z, model_kwargs, progress=True)
    elif args.sampler == "ddpm":
        samples = diffusion.p_sample_loop(forward, z.shape, z, clip_denoised=False, model_kwargs=model_kwargs,
                                          progress=True, device=device)
    else:
        samples = diffusion.ddim_sample_loop(forward, z.shape, z, clip_denoised=False, model_kwargs=model_kwargs,
                                             progress=True, device=device, eta=args.ddim_eta)
    samples, _ = samples.chunk(2, dim=0)
    return decode(vae, samples)


def main(args):
    """Sample one image per --class-labels entry and save them as a 4-column grid PNG."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    is_sit = args.model.startswith("SiT-")
    args.sampler = args.sampler or ("ddpm" if not is_sit else None)
    check_sampler_family(args.sampler, args.model, is_sit)
    transport = check_transport_flags(args)  # a SiT's interpolant; a DiT refuses SiT flags
    options = flow_options(args) if is_sit else None
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
    ckpt = resolve_checkpoint(args.ckpt, args.model, args.image_size)
    model, metadata = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path, ckpt=ckpt,
                                  use_ema=not args.no_ema, groups=args.groups, families=("DiT", "SiT"))
    check_transport_record(metadata, transport, ckpt)
    amp_dtype, precision_note = resolve_sampling_precision(args.precision, device)
    model = cast_weights_once(model.to(device).eval().requires_grad_(False), amp_dtype)  # bf16/fp16: cast once
    if args.compile:
        model = compile_forward(model)
    if precision_note:  # what auto chose, or that the precision asked for is emulated here
        print(precision_note)
    vae = load_vae(args.vae, args.vae_path, device)
    diffusion = transport if is_sit else sampling_process(args.sampler, args.num_sampling_steps, spacing)

    start = time.time()
    if args.per_sample_seeds or is_sit:  # a SiT has no original grid procedure here: per-sample noise
        generators = [sample_generator(args.seed, i) for i in range(len(args.class_labels))]
        images = generate(model, diffusion, args.class_labels, generators, args.cfg_scale, args.sampler,
                          args.ddim_eta, vae, amp_dtype=amp_dtype, progress=True,
                          guide_all_channels=args.guide_all_channels, flow_options=options)
    else:
        images = original_grid(model, diffusion, args.class_labels, args, vae, amp_dtype, device)
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

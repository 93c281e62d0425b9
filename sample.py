"""
Sample a grid of images from a DiT (pretrained, trained, pruned or fine-tuned) on one GPU or the CPU.

Image i of the grid uses seeds derived from (--seed, i) for its initial and per-step noise, so it
does not change when other labels are added or removed (it is the same noise sample_ddp.py uses
for its sample i).

    python sample.py --model DiT-D14/2 --ckpt pretrained/TinyDiT-D14-MaskedKD-500K.pt --seed 5464
"""
import argparse
import time

import torch
from torchvision.utils import save_image

from tinyfusion.atomic_files import atomic_path
from tinyfusion.checkpoints import build_model
from tinyfusion.cli import add_model_args, add_precision_arg, resolve_precision
from diffusion import create_diffusion
from tinyfusion.sampling import SAMPLERS, generate, resolve_checkpoint, sample_generator
from tinyfusion.vae import load_vae, to_uint8_nhwc
from tinyfusion.grids import save_labeled_grid
from tinyfusion.errors import run_main

DEFAULT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def main(args):
    """Sample one image per --class-labels entry and save them as a 4-column grid PNG."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sampler == "ddpm" and args.ddim_eta != 0.0:
        raise SystemExit("error: --ddim-eta is for --sampler ddim")
    if args.seed < 0:
        raise SystemExit(f"error: --seed must be >= 0, got {args.seed}")
    bad_labels = [label for label in args.class_labels if not 0 <= label < args.num_classes]
    if bad_labels:
        raise SystemExit(f"error: --class-labels {bad_labels} outside [0, {args.num_classes}); pass labels of the "
                         f"model's classes (or the right --num-classes)")
    ckpt = resolve_checkpoint(args.ckpt, args.model, args.image_size)
    model, _ = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path, ckpt=ckpt,
                           use_ema=not args.no_ema, groups=args.groups)
    model = model.to(device).eval().requires_grad_(False)
    vae = load_vae(args.vae, args.vae_path, device)
    diffusion = create_diffusion(str(args.num_sampling_steps))

    start = time.time()
    generators = [sample_generator(args.seed, i) for i in range(len(args.class_labels))]
    images = generate(model, diffusion, args.class_labels, generators, args.cfg_scale, args.sampler, args.ddim_eta,
                      vae, amp_dtype=resolve_precision(args.precision, device), progress=True)
    # normalize to [-1, 1] then *255 + 0.5: the same uint8 values as sample_ddp.py's clamp(127.5 x + 128)
    if args.grid == "labeled":  # one row per class, labelled, gaps, tiny images upscaled
        save_labeled_grid(args.out, to_uint8_nhwc(images.float()).numpy(), args.class_labels)
    else:
        with atomic_path(args.out) as tmp:
            save_image(images.float().cpu(), tmp, nrow=4, normalize=True, value_range=(-1, 1))
    print(f"saved {len(images)} samples to {args.out} in {time.time() - start:.1f}s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="1.0 = no guidance (one model pass per step)")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint (plain / training / pruned); default: the released DiT-XL-2 file")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights of a training checkpoint")
    parser.add_argument("--class-labels", type=int, nargs="+", default=DEFAULT_CLASS_LABELS)
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--ddim-eta", type=float, default=0.0)
    parser.add_argument("--out", type=str, default="sample.png", help="grid PNG to write (replaced if it exists)")
    parser.add_argument("--grid", choices=["plain", "labeled"], default="plain",
                        help="plain: the original 4-column grid; labeled: one row per class with its label, "
                             "gaps between tiles, small images upscaled (nearest-neighbour) to >= 64 px")
    add_precision_arg(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())

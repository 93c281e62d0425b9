"""Prune a DiT with the BI score (ShortGPT's Block Influence, the paper's score baseline): on
calibration latents noised at random timesteps, measure how similar each block's output is to
its input, remove the `--n-pruned` most similar blocks (never the last), save the shallow model.

    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --data-path /data/imagenet/train --save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14

Calibration reads an ImageFolder through the VAE like the original (`--data-path`), or the latents
of a feature store written by extract_features.py (`--features-path`, no VAE needed).
"""
import argparse

import torch

from tinyfusion.cli import add_model_args
from diffusion import create_diffusion
from tinyfusion.pruning import (bi_scores, calibration_latents, check_output_path, load_source_model, plain_name, save_pruned,
                     select_by_bi_score, source_lineage)
from tinyfusion.errors import run_main


def save_sample_grid(model, vae, path, args, device):
    """An 8-image class-conditional grid from the pruned model (DiT's sample.py recipe), laid out
    readably: one row per class with its label, gaps, small images upscaled to >= 64 px."""
    from tinyfusion.grids import save_labeled_grid
    from tinyfusion.vae import decode, to_uint8_nhwc
    torch.manual_seed(args.seed)
    diffusion = create_diffusion(str(args.num_sampling_steps))
    labels = torch.tensor([c % model.num_classes for c in (207, 360, 387, 974, 88, 979, 417, 279)], device=device)
    z = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, device=device)
    z = torch.cat([z, z], 0)
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)], 0)
    model.eval()
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      model_kwargs=dict(y=y, cfg_scale=args.cfg_scale), device=device)
    images = decode(vae, samples.chunk(2)[0])
    save_labeled_grid(path, to_uint8_nhwc(images.float()).numpy(), labels.tolist(), overwrite=args.overwrite)


def main(args):
    if not args.ckpt:
        raise SystemExit("error: --ckpt is required: the checkpoint to prune, e.g. pretrained/DiT-XL-2-256x256.pt")
    if not args.data_path and not args.features_path:
        raise SystemExit("error: pass --data-path (an ImageFolder, encoded with --vae) or --features-path "
                         "(a feature store) for the calibration samples")
    check_output_path(args.save_model, args.overwrite)
    check_output_path(args.sample_grid, args.overwrite)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model_name = plain_name(args.model)
    model, source_metadata = load_source_model(model_name, args.ckpt, args.image_size, args.num_classes, args.vae,
                                               args.vae_path, use_ema=not args.no_ema)
    model.to(device).eval()
    vae = None
    if args.data_path and not args.features_path or args.sample_grid:
        from tinyfusion.vae import load_vae
        vae = load_vae(args.vae, args.vae_path, device)
    latents, labels = calibration_latents(args.nsamples, args.seed, args.features_path, args.data_path,
                                          args.image_size, vae, args.batch_size, device)
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(latents.shape[1:]) != expected:
        raise SystemExit(f"error: the calibration latents are {tuple(latents.shape[1:])} but the model expects {expected}; "
                         f"pass the --vae/--image-size the data was made with")
    if int(labels.max()) >= model.num_classes:
        raise SystemExit(f"error: the calibration data has labels up to {int(labels.max())} but the model has "
                         f"{model.num_classes} classes; pass --num-classes {int(labels.max()) + 1}")
    diffusion = create_diffusion("")
    similarities = bi_scores(model, latents, labels, diffusion, args.batch_size, args.seed, progress=True)
    try:
        kept = select_by_bi_score(similarities, args.n_pruned)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"input/output cosine similarity of each block over {len(latents)} calibration samples "
          f"(BI score = 1 - similarity; the most similar blocks are removed):")
    for index, similarity in enumerate(similarities):
        print(f"  block {index:2d}: similarity {similarity:.6f}  BI {1 - similarity:.6f}  "
              f"{'kept' if index in kept else 'removed'}")
    print(f"kept indices: {kept}")
    metadata = dict(method="bi-score", source_model=model_name, source_checkpoint=args.ckpt, source_depth=model.depth,
                    groups=None, confidences=None, scores=[float(s) for s in similarities],
                    score_definition="mean input/output cosine similarity per block (BI = 1 - score)",
                    nsamples=len(latents), steps=0, **source_lineage(source_metadata, kept))
    pruned = save_pruned(model, kept, args.save_model, metadata, overwrite=args.overwrite)
    print(f"saved the {pruned.depth}-block model to {args.save_model}")
    if args.sample_grid:
        save_sample_grid(pruned, vae, args.sample_grid, args, device)
        print(f"saved a sample grid to {args.sample_grid}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    parser.add_argument("--ckpt", type=str, default=None, help="checkpoint to prune (plain, training or pruned)")
    parser.add_argument("--no-ema", action="store_true", help="prune a training checkpoint's 'model', not its 'ema'")
    parser.add_argument("--data-path", type=str, default=None, help="calibration ImageFolder (encoded with --vae)")
    parser.add_argument("--features-path", type=str, default=None,
                        help="calibrate on a feature store from extract_features.py instead (no VAE needed)")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-pruned", type=int, default=14, help="number of blocks to remove")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration subset, timesteps, noise, samples")
    parser.add_argument("--save-model", type=str, default="outputs/pruned/pruned-by-score.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-model / --sample-grid")
    parser.add_argument("--sample-grid", type=str, default=None, help="also sample 8 images from the pruned model to this PNG")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the sample grid")
    parser.add_argument("--num-sampling-steps", type=int, default=250, help="sampling steps of the sample grid")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())

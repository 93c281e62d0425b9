"""Prune a DiT with the BI score (ShortGPT's Block Influence, the paper's score baseline): on
calibration latents of real images, measure how similar each block's output is to its input,
remove the `--n-pruned` most similar blocks (never the last), save the shallow model and the
per-block scores (`<save-model without .pt>.scores.json`).

    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --data-path /data/imagenet/train --save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14

Calibration (the original's): `--nsamples` images of `--data-path` (center crop, random
horizontal flip, SD-VAE latent), clean, in batches of `--batch-size`, with t ~ U{0..N-1} for
N = `--num-sampling-steps` passed directly to the model with the true labels. `--features-path`
reads the latents (and stored flips) of a feature store instead (no VAE needed);
`--calibration noised` is our variant (q_sample-noised latents, t ~ U{0..999}).

A SiT (`--model SiT-...`) is calibrated on its own transport (the only calibration that gives it
inputs it was trained on, so `noised` is its default and `clean` is refused): x_t = alpha_t x +
sigma_t noise with t uniform on SiT's training interval (--path-type, --prediction, --train-eps),
the model called with t in [0, 1]. Its --sample-grid uses SiT's default SDE sampler.
"""
import os

from tinyfusion.flags import (CALIBRATIONS, ArgumentParser, add_checkpoint_args, add_interpolant_args, add_model_args,
                            add_sampling_steps_check, default_calibration, nonnegative_float, nonnegative_int, positive_int,
                            sampling_steps)
from tinyfusion.errors import TinyFusionError, run_main


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    add_checkpoint_args(parser, help="checkpoint to prune (plain, training or pruned)")
    parser.add_argument("--data-path", type=str, default=None, help="calibration ImageFolder (encoded with --vae)")
    parser.add_argument("--features-path", type=str, default=None,
                        help="calibrate on a feature store from extract_features.py instead (no VAE needed)")
    parser.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                        help="clean (a DiT's default): the original's (clean latents, t < --num-sampling-steps); "
                             "noised: ours (q_sample-noised latents, t < 1000; a SiT: its transport's x_t, the default)")
    parser.add_argument("--nsamples", type=positive_int, default=128, help="calibration images")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--n-pruned", type=nonnegative_int, default=14, help="number of blocks to remove")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the calibration subset, flips, timesteps, samples")
    parser.add_argument("--save-model", type=str, default="outputs/pruned/pruned-by-score.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --save-model (and its .scores.json) / --sample-grid")
    parser.add_argument("--sample-grid", type=str, default=None, help="also sample 8 images from the pruned model to this PNG")
    parser.add_argument("--cfg-scale", type=nonnegative_float, default=4.0, help="guidance scale of the sample grid")
    parser.add_argument("--num-sampling-steps", type=sampling_steps, default=250,
                        help="clean calibration draws t in [0, N) (the original's respaced step count); also the "
                             "sampling steps of the sample grid")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_interpolant_args(parser.add_argument_group("SiT (--model SiT-...): the transport it was trained with"))
    add_sampling_steps_check(parser)
    args = parser.parse_args(argv)
    if args.calibration is None:
        args.calibration = default_calibration(args.model)
    return args


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import torch

from tinyfusion.families import family_from_args
from tinyfusion.io.atomic_files import atomic_write_json
from tinyfusion.sampling.grids import save_labeled_grid
from tinyfusion.pruning.pruned_models import (check_output_path, load_source_model, plain_name, save_pruned,
                                              source_lineage)
from tinyfusion.pruning.block_importance import bi_scores, calibration_latents, check_latents_fit, select_by_bi_score
from tinyfusion.io.vae import load_vae, to_uint8_nhwc


def save_sample_grid(model, vae, path, args, device, family):
    """An 8-image class-conditional grid from the pruned model (the family's preview: DiT's
    sample.py recipe, a SiT's default SDE from per-sample noise), laid out readably: one row per
    class with its label, gaps, small images upscaled to >= 64 px."""
    labels = [c % model.num_classes for c in (207, 360, 387, 974, 88, 979, 417, 279)]
    model.eval()
    images = family.preview_samples(model, labels, seed=args.seed, cfg_scale=args.cfg_scale,
                                    num_steps=args.num_sampling_steps, vae=vae, device=device)
    save_labeled_grid(path, to_uint8_nhwc(images.float()).numpy(), labels, overwrite=args.overwrite)


def scores_path(save_model):
    """Where the per-block scores go: next to the pruned model, `X.pt` -> `X.scores.json`."""
    return os.path.splitext(save_model)[0] + ".scores.json"


def check_inputs(args):
    """Every one-line refusal that needs no model or data, before any work; returns --model's family."""
    family = family_from_args(args)  # another family's flags are refused
    family.check_calibration(args.calibration)
    if args.sample_grid:
        family.check_preview_steps(args.num_sampling_steps)
    if not args.ckpt:
        raise TinyFusionError("--ckpt is required: the checkpoint to prune, e.g. pretrained/DiT-XL-2-256x256.pt")
    if not args.data_path and not args.features_path:
        raise TinyFusionError("--data-path is required: the BI score calibrates on real images (an ImageFolder such "
                              "as /data/imagenet/train, encoded with --vae), or pass --features-path (a feature store)")
    for path in (args.save_model, scores_path(args.save_model), args.sample_grid):
        check_output_path(path, args.overwrite)
    return family


def calibration_record(args, nsamples, family):
    """How the scores were calibrated (the metadata and the .scores.json record it)."""
    """(record, the range of t in words)."""
    process_record, t_range = family.calibration_record(args.calibration, args.num_sampling_steps)
    return dict(calibration=args.calibration, nsamples=nsamples, batch_size=args.batch_size, **process_record,
                seed=args.seed), t_range


def load_calibration(args, model, device):
    """(latents, labels, vae) of the calibration set, checked against the model."""
    vae = None
    if args.data_path and not args.features_path or args.sample_grid:
        vae = load_vae(args.vae, args.vae_path, device)
    latents, labels = calibration_latents(args.nsamples, args.seed, args.features_path, args.data_path,
                                          args.image_size, vae, args.batch_size, device,
                                          random_flip=args.calibration == "clean")
    check_latents_fit(latents, labels, model)
    return latents, labels, vae


def main(args):
    family = check_inputs(args)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)  # the VAE posterior samples
    model_name = plain_name(args.model)
    model, source_metadata = load_source_model(model_name, args.ckpt, args.image_size, args.num_classes, args.vae,
                                               args.vae_path, use_ema=not args.no_ema)
    family.check_record(source_metadata, args.ckpt)
    model.to(device).eval()
    latents, labels, vae = load_calibration(args, model, device)
    similarities = bi_scores(model, latents, labels, family=family, calibration=args.calibration,
                             num_timesteps=args.num_sampling_steps, batch_size=args.batch_size, seed=args.seed,
                             progress=True)
    try:
        kept = select_by_bi_score(similarities, args.n_pruned)
    except ValueError as error:
        raise TinyFusionError(str(error)) from None
    calibration, t_range = calibration_record(args, len(latents), family)
    print(f"input/output cosine similarity of each block over {len(latents)} {args.calibration} calibration samples, "
          f"{t_range} (BI score = 1 - similarity; the most similar blocks are removed):")
    for index, similarity in enumerate(similarities):
        print(f"  block {index:2d}: similarity {similarity:.6f}  BI {1 - similarity:.6f}  "
              f"{'kept' if index in kept else 'removed'}")
    print(f"kept indices: {kept}")
    metadata = dict(method="bi-score", source_model=model_name, source_checkpoint=args.ckpt, source_depth=model.depth,
                    groups=None, confidences=None, scores=[float(s) for s in similarities],
                    score_definition="mean input/output cosine similarity per block (BI = 1 - score)",
                    steps=0, **calibration, **source_lineage(source_metadata, kept))
    pruned = save_pruned(model, kept, args.save_model, metadata, overwrite=args.overwrite)
    atomic_write_json(scores_path(args.save_model), dict(
        calibration, source_checkpoint=args.ckpt, n_pruned=args.n_pruned, kept_indices=kept,
        removed_indices=[j for j in range(model.depth) if j not in kept],
        similarity=[float(s) for s in similarities], bi=[1.0 - float(s) for s in similarities],
        score_definition=metadata["score_definition"]), overwrite=args.overwrite)
    print(f"saved the {pruned.depth}-block model to {args.save_model} and the scores to {scores_path(args.save_model)}")
    if args.sample_grid:
        save_sample_grid(pruned, vae, args.sample_grid, args, device, family)
        print(f"saved a sample grid to {args.sample_grid}")


if __name__ == "__main__":
    run_main(main, ARGS)

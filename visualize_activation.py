"""Extreme activations of a DiT or SiT, block by block (the paper's "massive activations"
figure): the distribution of the hidden states each block outputs on real data, and how many
entries Masked KD's outlier mask removes.

    python visualize_activation.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --data-path /data/imagenet/train
    python visualize_activation.py --model DiT-XS/4 --ckpt teacher.pt --features-path features \
        --vae none --image-size 8 --num-classes 10
    python visualize_activation.py --model SiT-XL/2 --ckpt pretrained/SiT-XL-2-256x256.pt --data-path /data/imagenet/train

Inputs are what training and distillation see: `--nsamples` real latents (an ImageFolder
encoded with `--vae`, or a feature store from extract_features.py via `--features-path`),
noised with q_sample at timesteps drawn uniformly from [0, 1000) (or `--timestep T`), with
their true labels, all seeded by `--seed`. A SiT (`--model SiT-...`, with the interpolant it
was trained on: --path-type / --prediction / --train-eps) sees its transport's
x_t = alpha_t x1 + sigma_t x0 instead, t uniform on its training interval (or `--time T` in
[0, 1], t = 1 the data). Written to `--out`:
  blocks/block_NN.png  a symlog histogram of every hidden-state value of block NN, with its
                       min, max and mean +/- std marked;
  summary.png          per block, the top-k absolute activations and the share of entries the
                       Masked KD mask removes (|h - mu| >= k * std, mu and std per sample over
                       tokens and channels, k = --mask-sigma);
  activations.json     the per-block numbers of both figures.
"""
import argparse
import os

from tinyfusion.flags import (add_checkpoint_args, add_model_args, add_family_training_args, diffusion_timestep,
                            nonnegative_int, positive_float, positive_int, unit_interval)
from tinyfusion.errors import TinyFusionError, run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    add_checkpoint_args(parser, help="checkpoint (a path, or a released name such as DiT-XL-2-256x256.pt); "
                                     "omitted: the released DiT-XL/2 of --image-size")
    parser.add_argument("--data-path", type=str, default=None, help="ImageFolder of real images (encoded with --vae)")
    parser.add_argument("--features-path", type=str, default=None, help="or a feature store from extract_features.py")
    parser.add_argument("--nsamples", type=positive_int, default=128, help="real samples to run")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the sample subset, timesteps (a SiT: times) and noise")
    parser.add_argument("--timestep", type=diffusion_timestep, default=None,
                        help="a DiT: one timestep in [0, 1000) for all samples (default: uniform)")
    parser.add_argument("--time", type=unit_interval, default=None,
                        help="a SiT: one time in [0, 1] for all samples (1 = data; default: uniform on the "
                             "transport's training interval); a MAR: one mask ratio for all samples (default: MAR's "
                             "training draws)")
    parser.add_argument("--mask-sigma", type=positive_float, default=2.0, help="k of the Masked KD mask |h - mu| >= k std")
    parser.add_argument("--topk", type=positive_int, default=10, help="largest |activations| shown per block")
    parser.add_argument("--out", type=str, default=None, help="output folder (default: activations/<model>-<ckpt>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the figures of an earlier run in --out")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_family_training_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import matplotlib
import numpy as np
import torch

from tinyfusion.families import family_from_args
from tinyfusion.io.atomic_files import atomic_path, atomic_write_json
from tinyfusion.pruning.pruned_models import load_source_model
from tinyfusion.pruning.block_importance import calibration_latents, check_latents_fit
from tinyfusion.study.activations import block_statistics
from tinyfusion.io.vae import load_vae

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after choosing the backend

EDGE_DECADES, BINS_PER_DECADE = 7, 12  # histogram bins: linear in [-1, 1], logarithmic out to 1e7


def histogram_edges():
    """Fixed symlog bin edges (so batches can be counted one at a time); values beyond +-1e7
    land in the outermost bins."""
    outer = np.logspace(0, EDGE_DECADES, EDGE_DECADES * BINS_PER_DECADE + 1)
    return np.concatenate([-outer[::-1], np.linspace(-1, 1, 21)[1:-1], outer])


def plot_block(stats, summary, path, title):
    fig, ax = plt.subplots(figsize=(7, 3.2))
    edges = stats.edges.numpy()
    counts = stats.counts.numpy()[1:-1]  # the two open-ended bins beyond the edges are not drawn
    ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#4c72b0", alpha=0.8, baseline=0.5)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_yscale("log")
    for value, label, color in ((summary["min"], "min", "#c44e52"), (summary["max"], "max", "#c44e52")):
        ax.axvline(value, color=color, linewidth=1.2)
        ax.annotate(f"{label} {value:.3g}", (value, 0.95), xycoords=("data", "axes fraction"), color=color,
                    ha="right" if label == "max" else "left", va="top", fontsize=8)
    for sign in (-1, 1):
        ax.axvline(summary["mean"] + sign * summary["std"], color="#55a868", linestyle="--", linewidth=1)
    ax.set_xlim(min(summary["min"] * 1.5, -1.5), max(summary["max"] * 1.5, 1.5))
    ax.set_xlabel(f"hidden-state value (symlog; dashed: mean +/- std, std {summary['std']:.3g})")
    ax.set_ylabel("entries")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_summary(summaries, mask_sigma, path, title):
    blocks = [s["block"] for s in summaries]
    fig, (top_ax, mask_ax) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(blocks) + 2), 6), sharex=True)
    for s in summaries:
        top_ax.scatter([s["block"]] * len(s["topk_abs"]), s["topk_abs"], s=10, color="#c44e52", alpha=0.6)
    top_ax.plot(blocks, [s["std"] for s in summaries], color="#4c72b0", marker=".", label="std of all entries")
    top_ax.set_yscale("log")
    top_ax.set_ylabel(f"top-{len(summaries[0]['topk_abs'])} |activation|")
    top_ax.legend(loc="upper left", fontsize=8)
    top_ax.set_title(title, fontsize=10)
    mask_ax.bar(blocks, [100 * s["masked_share"] for s in summaries], color="#55a868")
    mask_ax.set_ylabel(f"masked by |h-mu| >= {mask_sigma:g} std (%)")
    mask_ax.set_xlabel("block")
    mask_ax.set_xticks(blocks)
    save_figure(fig, path)


def save_figure(fig, path):
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def check_args(args):
    """Every one-line refusal that needs no model or data; returns --model's family."""
    family = family_from_args(args)  # another family's flags are refused
    family.check_noising_flags(args.model, timestep=args.timestep, time=args.time)
    if not args.data_path and not args.features_path:
        raise TinyFusionError("pass --data-path (an ImageFolder, encoded with --vae) or --features-path (a feature store)")
    if os.path.exists(os.path.join(args.out, "activations.json")) and not args.overwrite:
        raise TinyFusionError(f"{args.out} already holds activations.json; pass --overwrite or another --out")
    return family


def main(args):
    args.out = args.out or os.path.join("activations", args.model.replace("/", "-") + (
        "-" + os.path.splitext(os.path.basename(args.ckpt))[0] if args.ckpt else ""))
    family = check_args(args)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = args.ckpt or family.default_checkpoint(args.model, args.image_size)
    # the depth comes from the checkpoint, so a pruned file without metadata loads under its family's name
    model, metadata = load_source_model(args.model, ckpt, args.image_size, args.num_classes, args.vae, args.vae_path,
                                        groups=args.groups, use_ema=not args.no_ema)
    family.check_record(metadata, ckpt)
    model = model.to(device).eval()
    vae = load_vae(args.vae, args.vae_path, device) if args.data_path and not args.features_path else None
    latents, labels = calibration_latents(args.nsamples, args.seed, args.features_path, args.data_path,
                                          args.image_size, vae, args.batch_size, device)
    check_latents_fit(latents, labels, model)
    when = args.timestep if args.time is None else args.time  # the one the family takes (check_args)
    x_t, t = family.activation_inputs(latents, torch.Generator().manual_seed(args.seed), when=when, model=model)
    stats = block_statistics(model, x_t, t, labels, batch_size=args.batch_size, mask_sigma=args.mask_sigma,
                             topk=args.topk, edges=histogram_edges(), progress=True, forward=family.activation_forward)
    summaries = [block.summary(index) for index, block in enumerate(stats)]
    name = f"{args.model} {os.path.basename(ckpt)}"
    for index, (block, summary) in enumerate(zip(stats, summaries)):
        plot_block(block, summary, os.path.join(args.out, "blocks", f"block_{index:02d}.png"),
                   f"{name}: block {index} output, {len(latents)} samples")
    plot_summary(summaries, args.mask_sigma, os.path.join(args.out, "summary.png"),
                 f"{name}: extreme activations per block ({len(latents)} samples)")
    record = dict(model=args.model, ckpt=ckpt, nsamples=len(latents), seed=args.seed, mask_sigma=args.mask_sigma,
                  **family.noising_record(when), topk=args.topk, blocks=summaries)
    atomic_write_json(os.path.join(args.out, "activations.json"), record)
    for summary in summaries:
        print(f"block {summary['block']:2d}: min {summary['min']:10.3f} max {summary['max']:10.3f} "
              f"std {summary['std']:8.3f} top |h| {summary['topk_abs'][0]:10.3f} "
              f"masked {100 * summary['masked_share']:.3f}%")
    print(f"saved {args.out}/summary.png, {args.out}/blocks/ and {args.out}/activations.json")


if __name__ == "__main__":
    run_main(main, ARGS)

"""Encode an ImageFolder once into the feature store that training and pruning read.

Every image is ADM center-cropped, scaled to [-1, 1] and encoded together with its horizontal
flip (`latent_dist.sample()` times the VAE's scaling factor: 0.18215 for the SD-VAE, 0.2325 for
MAR's KL-16 tokenizer converted by tools/convert_mar_tokenizer.py; with `--vae none` the pixels
themselves are stored).
`--no-flip` (ours) stores the image alone, for data whose meaning a mirror changes (digits,
text): training and pruning then never see a flipped image.
Images are cut into shards of contiguous indices (sorted ImageFolder order); under torchrun
each rank encodes its own shards, writes each one atomically, and rank 0 writes manifest.json
last. The posterior noise of image i is drawn from a generator seeded by (--global-seed, i), so
the store is the same for any number of ranks and nodes. `--resume` keeps every shard that
validates (checksum included) and redoes the rest. See tinyfusion/io/feature_extraction.py (the
extraction) and tinyfusion/io/feature_store.py (the format).

    torchrun --nproc_per_node=8 extract_features.py --data-path /data/imagenet/train \
        --features-path features/imagenet256 --image-size 256 --vae ema
"""
import argparse

from tinyfusion.flags import STORE_DTYPE_NAMES, add_model_args, nonnegative_int, positive_int
from tinyfusion.errors import run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)  # --model (ignored here), --image-size, --num-classes, --vae, --vae-path, --groups (ignored)
    parser.add_argument("--data-path", type=str, required=True, help="ImageFolder: one sub-folder of images per class")
    parser.add_argument("--features-path", type=str, default="features", help="folder of the feature store to write")
    parser.add_argument("--global-seed", type=nonnegative_int, default=0, help="seed of the VAE posterior noise (per image)")
    parser.add_argument("--num-workers", type=nonnegative_int, default=4, help="image-decoding DataLoader workers per rank")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE call per rank (x2 with the flips)")
    parser.add_argument("--no-flip", action="store_true",
                        help="store each image without its horizontal flip (the original stores both and training "
                             "picks one at random): for data whose meaning a mirror changes, such as digits")
    parser.add_argument("--shard-size", type=positive_int, default=4096, help="images per shard file")
    parser.add_argument("--store-dtype", choices=STORE_DTYPE_NAMES, default="fp32",
                        help="fp32 keeps the original values; fp16 halves the disk and page-cache footprint")
    parser.add_argument("--resume", action="store_true",
                        help="keep the shards of an interrupted run that validate and redo the rest")
    ignored = "accepted for compatibility with the original command line; ignored by extraction"
    parser.add_argument("--results-dir", type=str, default="results", help=ignored)
    parser.add_argument("--epochs", type=positive_int, default=1400, help=ignored)
    parser.add_argument("--global-batch-size", type=positive_int, default=256, help=ignored + " (see --batch-size)")
    parser.add_argument("--log-every", type=positive_int, default=100, help=ignored)
    parser.add_argument("--ckpt-every", type=positive_int, default=50_000, help=ignored)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

from tinyfusion.io.feature_extraction import ExtractionSettings, extract_feature_store


def main(args):
    """Extract the store of these flags (every flag is recorded in its manifest.json)."""
    extract_feature_store(ExtractionSettings.from_args(args), run_args=vars(args))


if __name__ == "__main__":
    run_main(main, ARGS)

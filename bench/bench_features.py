"""Feature extraction speed and file count: extract_features.py against the original recipe
(batch 1, one features .npy and one labels .npy per image), same VAE, same images, same torch
threads and DataLoader workers, in one process. Also times reading both results back through
tinyfusion.io.feature_store (our memory-mapped shards vs the original one-file-per-sample layout).

    python bench/bench_features.py                       # tiny random SD-VAE-shaped VAE, digits at 32px
    python bench/bench_features.py --vae-path pretrained/sd-vae-ft-ema --image-size 256 --num-images 64
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # tests/tiny_vae.py: the default tiny VAE

from tinyfusion.io import feature_store  # noqa: E402
from tinyfusion.io.feature_extraction import ExtractionSettings, extract_feature_store  # noqa: E402
from tinyfusion.io.image_folder import image_folder  # noqa: E402
from tinyfusion.study.digits import write_digits_folder  # noqa: E402
from tinyfusion.io.vae import LATENT_SCALE, load_vae  # noqa: E402
from bench.harness import alternate, summary  # noqa: E402


def baseline_extract(data_path, out, image_size, vae_path, num_workers):
    """The original recipe: one image per VAE call (with its flip), two .npy files per image."""
    vae = load_vae("ema", vae_path)
    features_dir = os.path.join(out, "imagenet256_features")
    labels_dir = os.path.join(out, "imagenet256_labels")
    os.makedirs(features_dir)
    os.makedirs(labels_dir)
    loader = DataLoader(image_folder(data_path, image_size), batch_size=1, shuffle=False, num_workers=num_workers)
    for step, (x, y) in enumerate(loader):
        with torch.no_grad():
            latents = vae.encode(torch.cat([x, x.flip(dims=[3])])).latent_dist.sample() * LATENT_SCALE
        np.save(os.path.join(features_dir, f"{step}.npy"), latents.numpy())
        np.save(os.path.join(labels_dir, f"{step}.npy"), y.numpy())
    return len(loader)


def count_files(folder):
    return sum(len(files) for _, _, files in os.walk(folder))


def read_speed(path, passes=2):
    dataset = feature_store.open_feature_dataset(path)
    start = time.perf_counter()
    for _ in range(passes):
        for index in range(len(dataset)):
            dataset[index]
    return passes * len(dataset) / (time.perf_counter() - start)


def main(args):
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_features_")
    data_path = os.path.join(work, "digits")
    write_digits_folder(data_path, args.image_size, limit=args.num_images)
    vae_path = args.vae_path
    if vae_path is None:
        from tiny_vae import make_tiny_vae
        vae_path = make_tiny_vae(os.path.join(work, "tiny-vae"))

    runs = iter(range(10 ** 6))  # every run writes a fresh folder
    outputs, counts = {}, {}

    def original():
        outputs["baseline"] = os.path.join(work, f"baseline-{next(runs)}")
        counts["images"] = baseline_extract(data_path, outputs["baseline"], args.image_size, vae_path, args.num_workers)

    def ours():
        outputs["ours"] = os.path.join(work, f"ours-{next(runs)}")
        extract_feature_store(ExtractionSettings(
            data_path=data_path, features_path=outputs["ours"], image_size=args.image_size, vae="ema", vae_path=vae_path,
            num_classes=1000, global_seed=0, num_workers=args.num_workers, batch_size=args.batch_size, no_flip=False,
            shard_size=4096, store_dtype="fp32", resume=False))
    # alternated ABBA (bench/harness.py), no untimed warm-up: the times include loading the VAE
    record = summary(alternate({"original": original, "ours": ours}, rounds=args.rounds, warmup=0), "original", "ours")
    baseline_seconds, ours_seconds, count = record["variant_median_s"], record["baseline_median_s"], counts["images"]
    ours_path = outputs["ours"]
    shards = feature_store.read_manifest(ours_path)["num_shards"]

    baseline_files, ours_files = count_files(outputs["baseline"]), count_files(ours_path)
    baseline_read, ours_read = read_speed(outputs["baseline"]), read_speed(ours_path)
    print(f"\n{count} images of {args.image_size}x{args.image_size}, VAE {vae_path}, torch threads {args.threads}, "
          f"DataLoader workers {args.num_workers}; times include loading the VAE")
    print(f"{'':28s}{'images/s':>10s}{'files written':>15s}{'read samples/s':>16s}")
    print(f"{'original (batch 1, 2 files)':28s}{count / baseline_seconds:10.1f}{baseline_files:15d}{baseline_read:16.0f}")
    print(f"{'extract_features.py':28s}{count / ours_seconds:10.1f}{ours_files:15d}{ours_read:16.0f}")
    print(f"extraction speed-up: {record['ratio_median']:.2f}x (median of per-round original/ours; goal >= 3x); "
          f"pairs (s): " + ", ".join(f"{b:.1f}/{o:.1f}" for b, o in zip(record["variant_s"], record["baseline_s"])))
    print(f"files written for {count} images: {ours_files} = 2 + {shards} shard(s) (goal <= 2 + shards) "
          f"vs {baseline_files}")
    print(f"read speed-up: {ours_read / baseline_read:.1f}x")
    if not args.keep:
        import shutil
        shutil.rmtree(work)
    return dict(extraction_speedup=record["ratio_median"], pairs=record["ratios"], files_ours=ours_files,
                files_original=baseline_files, shards=shards, read_speedup=ours_read / baseline_read)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32, help="digits are upscaled to this size")
    parser.add_argument("--vae-path", type=str, default=None, help="a diffusers AutoencoderKL folder (default: tiny random)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE call for extract_features.py")
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers, for both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for both (1 = stable on a shared CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--rounds", type=int, default=2, help="alternated (ABBA) rounds of each extractor")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

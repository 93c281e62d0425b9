"""
Pack a folder of sample images (PNG / JPEG) into the .npz batch that evaluator.py reads:
`arr_0` is an (N, H, W, 3) uint8 NHWC array of the first `--num` (default 50,000, the original's
count) images in sorted file-name order, written to `{image_dir}.npz` as DiT's
create_npz_from_sample_folder does; grayscale (L) images become RGB by repeating the channel, as
sample_ddp.py does for one-channel samples.

    python save_npz.py --image_dir samples/DiT-D14-2-0500000-size-256-vae-ema-cfg-1.5-seed-0

`{image_dir}.npz` is also where sample_ddp.py writes the batch of its run folder `{image_dir}/`,
so an existing output is never replaced silently: when it already holds exactly these images
(sample_ddp.py's batch of its `--save-png` folder) it is kept and said so; when the folder holds
no images but the .npz holds `--num` samples (sample_ddp.py without --save-png) there is nothing
to pack; any other existing file is refused in one line (choose `--out`, or `--overwrite`). The
write is atomic: a crash never leaves a truncated .npz.
"""
import argparse
import os
import zipfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from tinyfusion.io.atomic_files import atomic_path
from tinyfusion.flags import positive_int
from tinyfusion.errors import TinyFusionError, run_main

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ORIGINAL_COUNT = 50_000  # DiT's create_npz_from_sample_folder packs the first 50,000 samples
COMPARE_CHUNK = 1 << 24  # bytes of arr_0 compared at a time (an existing 50k batch is not loaded whole)


def list_image_files(image_dir):
    """Sorted paths of the PNG / JPEG files directly inside image_dir."""
    if not os.path.isdir(image_dir):
        raise ValueError(f"image folder {image_dir} does not exist or is not a folder")
    names = sorted(name for name in os.listdir(image_dir) if name.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(image_dir, name) for name in names]


def read_rgb_pixels(path):
    """(H, W, 3) uint8 pixels of one RGB (or grayscale, made RGB) image file; a ValueError naming
    the file if it is not a readable image (truncated, not an image at all) or another mode."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not as a half-black image
            if image.mode == "L":  # grayscale: three equal channels, as the ADM reference batches hold
                image = image.convert("RGB")
            if image.mode.startswith("I") or image.mode == "F":
                # 16-bit grey is scaled to 8 bits (round(v * 255 / 65535)) as extract_features.py reads it:
                # PIL's convert("RGB") would clip every value above 255, i.e. almost every pixel, to white
                from tinyfusion.io.image_folder import to_rgb8
                image = to_rgb8(image, path)
            if image.mode != "RGB":
                raise ValueError(f"{path} is a {image.mode} image, not RGB; convert the folder to 8-bit "
                                 f"RGB or grayscale (e.g. Image.open(p).convert('RGB').save(p)) first")
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's errors for broken files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} is not a readable image ({reason}); remove or regenerate it") from None


def load_image_folder(image_dir, num=None):
    """(N, H, W, 3) uint8 array of the first `num` images (all when None) in sorted order.

    Every image must be RGB or grayscale (repeated to RGB: the same pixels, as sample_ddp.py
    stores one-channel samples) and of one size: nothing else is converted or resized silently,
    because a resized image or a dropped alpha channel would quietly change FID.
    """
    paths = list_image_files(image_dir)
    if not paths:
        raise ValueError(f"no .png/.jpg/.jpeg images in {image_dir}; point --image_dir at the sample folder")
    if num is not None:
        if num <= 0:
            raise ValueError(f"--num must be positive, got {num}")
        if num > len(paths):
            raise ValueError(f"asked for {num} images but {image_dir} holds only {len(paths)}; "
                             f"lower --num or sample more images")
        paths = paths[:num]
    images = None
    for index, path in enumerate(tqdm(paths, desc="Building .npz file from samples")):
        pixels = read_rgb_pixels(path)
        if images is None:
            images = np.empty((len(paths), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != images.shape[1:]:
            raise ValueError(f"mixed image sizes: {path} is {pixels.shape[1]}x{pixels.shape[0]} but "
                             f"{paths[0]} is {images.shape[2]}x{images.shape[1]}; all samples must share one size")
        images[index] = pixels
    return images


def default_output(image_dir):
    """`{image_dir}.npz`, as the original (and sample_ddp.py for its run folder `{image_dir}/`)."""
    return f"{image_dir}.npz"


def open_arr0(archive):
    """The arr_0.npy member of an open .npz and its (shape, dtype), positioned at the data."""
    member = archive.open("arr_0.npy")
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(member)
    return member, (shape if not fortran_order else None), dtype


def npz_image_count(path):
    """The number of images in an .npz's arr_0, read from its header; None if it is no readable batch."""
    try:
        with zipfile.ZipFile(path) as archive:
            member, shape, _ = open_arr0(archive)
            member.close()
            return shape[0] if shape else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def npz_holds(path, images):
    """True when the .npz's arr_0 equals `images` (shape, dtype and every byte), compared chunk by chunk."""
    flat = np.ascontiguousarray(images).reshape(-1).view(np.uint8)
    try:
        with zipfile.ZipFile(path) as archive:
            member, shape, dtype = open_arr0(archive)
            with member:
                if shape != images.shape or dtype != images.dtype:
                    return False
                for start in range(0, flat.size, COMPARE_CHUNK):
                    if member.read(COMPARE_CHUNK) != flat[start:start + COMPARE_CHUNK].tobytes():
                        return False
                return True
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def refuse_existing(out_path, what):
    raise TinyFusionError(f"{out_path} already exists and {what}; pass --out to write the packed batch elsewhere "
                          f"(or --overwrite to replace it)")


def main(args):
    image_dir = args.image_dir.rstrip("/\\") or args.image_dir
    out_path = args.out if args.out is not None else default_output(image_dir)
    keep_existing = os.path.exists(out_path) and not args.overwrite
    has_images = os.path.isdir(image_dir) and bool(list_image_files(image_dir))
    if keep_existing and not has_images:  # e.g. sample_ddp.py's batch of a run without --save-png
        count = npz_image_count(out_path)
        if count != args.num:
            refuse_existing(out_path, f"holds {count if count is not None else 'no readable'} images, not --num "
                                      f"{args.num}, and {image_dir} holds no images to pack")
        print(f"{out_path} already holds {count} images (sample_ddp.py writes it next to its run folder); "
              f"{image_dir} holds no images to pack: nothing to do")
        return
    try:
        images = load_image_folder(image_dir, args.num)
    except ValueError as exc:
        raise TinyFusionError(f"{exc}")
    if keep_existing:
        if not npz_holds(out_path, images):
            refuse_existing(out_path, f"holds other images than the first {len(images)} of {image_dir}")
        print(f"{out_path} already holds these {len(images)} images (identical arr_0); kept it")
        return
    # Temp file in the destination folder + os.replace: a crash never leaves a truncated .npz.
    with atomic_path(out_path, overwrite=args.overwrite) as tmp_path:
        np.savez(tmp_path, arr_0=images)
    print(f"Saved .npz file to {out_path} [shape={images.shape}].")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pack a folder of PNG/JPEG samples into an .npz (arr_0, uint8 NHWC).")
    parser.add_argument("--image_dir", "--image-dir", dest="image_dir", type=str, required=True,
                        help="folder of .png/.jpg/.jpeg samples (read in sorted file-name order)")
    parser.add_argument("--num", type=positive_int, default=ORIGINAL_COUNT,
                        help="pack the first NUM images (default: 50,000, the original's count)")
    parser.add_argument("--out", type=str, default=None, help="output .npz path (default: {image_dir}.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())

"""
Pack a folder of sample images (PNG / JPEG) into the .npz batch that evaluator.py reads:
`arr_0` is an (N, H, W, 3) uint8 NHWC array in sorted file-name order, as DiT's
sample_ddp.py writes it; grayscale (L) images become RGB by repeating the channel, as sample_ddp.py
does for one-channel samples. The output defaults to `{image_dir}-packed.npz` (not
`{image_dir}.npz`, which is where sample_ddp.py writes the batch of its `--save-png` folder), is
written atomically and never replaces an existing file unless --overwrite is given.

    python save_npz.py --image_dir samples/DiT-XL-2-pretrained-size-256-cfg-1.5-seed-0 --num 50000
"""
import argparse
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from tinyfusion.atomic_files import atomic_path
from tinyfusion.cli import positive_int
from tinyfusion.errors import TinyFusionError, run_main

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
                from tinyfusion.image_folder import to_rgb8
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
    """`{image_dir}-packed.npz`: never sample_ddp.py's `{sample-dir}/{run}.npz` next to its PNG folder."""
    return f"{image_dir}-packed.npz"


def main(args):
    image_dir = args.image_dir.rstrip("/\\") or args.image_dir
    out_path = args.out if args.out is not None else default_output(image_dir)
    # Check the destination before reading 50k images, not after.
    if os.path.exists(out_path) and not args.overwrite:
        raise TinyFusionError(f"{out_path} already exists; pass --overwrite to replace it or choose another --out")
    try:
        images = load_image_folder(image_dir, args.num)
    except ValueError as exc:
        raise TinyFusionError(f"{exc}")
    # Temp file in the destination folder + os.replace: a crash never leaves a truncated .npz.
    with atomic_path(out_path, overwrite=args.overwrite) as tmp_path:
        np.savez(tmp_path, arr_0=images)
    print(f"Saved .npz file to {out_path} [shape={images.shape}].")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Pack a folder of PNG/JPEG samples into an .npz (arr_0, uint8 NHWC).")
    parser.add_argument("--image_dir", "--image-dir", dest="image_dir", type=str, required=True,
                        help="folder of .png/.jpg/.jpeg samples (read in sorted file-name order)")
    parser.add_argument("--num", type=positive_int, default=None, help="use only the first NUM images (default: all)")
    parser.add_argument("--out", type=str, default=None, help="output .npz path (default: {image_dir}-packed.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    run_main(main, parser.parse_args())

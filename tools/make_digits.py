"""Write scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download)
as an ImageFolder of PNGs: `OUT/0/0000.png ... OUT/9/1796.png`. It is the real small dataset
that the tests, the benchmarks and the quick start train, prune and sample on.

    python tools/make_digits.py --out data/digits --image-size 32
"""
import argparse
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

DIGIT_LEVELS = 16  # the digits' pixel values are counts 0..16 of an 4x4 block of a 32x32 bitmap


def digits_as_uint8(limit=None):
    """(images uint8 (n, 8, 8) in 0..255, labels (n,)) in scikit-learn's order."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / DIGIT_LEVELS)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


def write_digits_folder(out, image_size=8, limit=None, resample="bicubic"):
    """Write the ImageFolder into `out`, which must not exist yet: it is written into a temporary
    sibling folder and renamed into place, so `out` is either absent or complete. Returns
    the number of images written."""
    if os.path.exists(out):
        raise ValueError(f"error: {out} already exists; remove it or choose another --out")
    images, labels = digits_as_uint8(limit)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        method = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[resample]
        for label in range(10):
            os.makedirs(os.path.join(tmp, str(label)))
        for index, (pixels, label) in enumerate(zip(images, labels)):
            image = Image.fromarray(pixels)
            if image_size != 8:
                image = image.resize((image_size, image_size), resample=method)
            image.save(os.path.join(tmp, str(label), f"{index:04d}.png"))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return len(images)


def main(args):
    if args.image_size < 1:
        raise SystemExit("error: --image-size must be positive")
    try:
        count = write_digits_folder(args.out, args.image_size, args.limit, args.resample)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {count} digit images ({args.image_size}x{args.image_size}, 10 classes) to {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=str, required=True, help="ImageFolder to create (must not exist)")
    parser.add_argument("--image-size", type=int, default=8, help="side of the saved PNGs (the digits are 8x8)")
    parser.add_argument("--resample", choices=["bicubic", "nearest"], default="bicubic",
                        help="upscaling filter when --image-size is not 8")
    parser.add_argument("--limit", type=int, default=None, help="only the first N digits")
    main(parser.parse_args())

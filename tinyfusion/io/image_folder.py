"""Images on disk -> tensors: the ImageFolder layout (one sub-folder per class) and the ADM
center crop that DiT and TinyFusion use before the VAE.

`image_folder(path, image_size)` gives (image in [-1, 1], label) pairs for calibration and
pixel-space work; `extract_features.py` reads the same listing through `list_image_folder`.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# the extensions torchvision's ImageFolder accepts, so both list the same files
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image, image_size):
    """ADM center crop: halve with BOX while the short side is >= 2x the target (cheap and
    alias-free), then one BICUBIC resize to a short side of `image_size`, then crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(image, path="image"):
    """An 8-bit RGB copy of a PIL image. 16-bit grey (`I;16*`, and `I` from a 16-bit PNG) is
    scaled to 8 bits (round(v * 255 / 65535)); PIL's own convert("RGB") clips it at 255, which
    turns most pixels white. Other 32-bit modes (`I` of another format, `F`) have no known
    range and are refused (ValueError naming the file)."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{path}: {image.mode} pixel values span {values.min():g}..{values.max():g}, "
                             f"outside 16 bits; convert it to 8-bit RGB first")
        grey = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"{path} is a {image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'}) image "
                         f"whose range is unknown; convert it to 8-bit RGB first")
    return image.convert("RGB")


def load_image_uint8(path, image_size):
    """RGB, center-cropped image as a uint8 tensor (3, H, W); 4x smaller than floats to pass
    between DataLoader workers. High-bit-depth images are scaled to 8 bits (see to_rgb8)."""
    with Image.open(path) as image:
        image = center_crop_arr(to_rgb8(image, path), image_size)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def to_unit_range(images_uint8):
    """uint8 -> float32 in [-1, 1], computed as ToTensor + Normalize(0.5, 0.5) in the original
    (x / 255, then (x - 0.5) / 0.5) so the values match it bit for bit."""
    return (images_uint8.float().div(255.0) - 0.5) / 0.5


def list_image_folder(root):
    """The ImageFolder listing in torchvision's order: class folders sorted by name, files found
    by a sorted walk of each. Returns (samples [(path, label)], classes, ignored_files), where
    ignored_files are files without an image extension (the caller logs them).
    A missing folder, no class folders or no images is a one-line ValueError."""
    if not os.path.isdir(root):
        raise ValueError(f"error: image folder {root} does not exist; pass --data-path with one sub-folder per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"error: {root} has no class sub-folders; an ImageFolder holds one sub-folder of images per class")
    samples, ignored = [], []
    for label, name in enumerate(classes):
        for folder, _, file_names in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for file_name in sorted(file_names):
                path = os.path.join(folder, file_name)
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((path, label))
                else:
                    ignored.append(path)
    if not samples:
        raise ValueError(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) found under the class folders of {root}")
    return samples, classes, ignored


class ImageFolder(Dataset):
    """(image float32 (3, H, W) in [-1, 1], label int) pairs, ADM center-cropped."""

    def __init__(self, root, image_size):
        self.root = root
        self.image_size = image_size
        self.samples, self.classes, self.ignored_files = list_image_folder(root)
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return to_unit_range(load_image_uint8(path, self.image_size)), label


def image_folder(path, image_size):
    return ImageFolder(path, image_size)

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


def load_image_uint8(path, image_size):
    """RGB, center-cropped image as a uint8 tensor (3, H, W); 4x smaller than floats to pass
    between DataLoader workers."""
    with Image.open(path) as image:
        image = center_crop_arr(image.convert("RGB"), image_size)
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

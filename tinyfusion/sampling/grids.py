"""Readable sample grids: one row per class (ascending), the class written left of its row, a gap
between tiles, and tiny images upscaled by an integer factor with nearest-neighbour (an 8x8 digit
becomes a crisp 64x64 tile instead of a blurred or 8-pixel one).

Geometry (all in pixels; `tile` = image size x `scale`, `scale` = ceil(min_tile / image size)):
column c of row r starts at x = label_width + gap + c * (tile + gap), y = gap + r * (tile + gap);
the canvas is label_width + gap + columns * (tile + gap) wide and gap + rows * (tile + gap) high.
"""
import math

import numpy as np

from tinyfusion.errors import TinyFusionError

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)


def grid_scale(image_size, min_tile=64):
    """Integer nearest-neighbour upscaling factor that makes a tile at least `min_tile` pixels."""
    return max(1, math.ceil(min_tile / image_size))


def rows_by_class(labels, columns):
    """[(class, [indices of its first `columns` images, in input order])] for each class, ascending."""
    labels = np.asarray(labels)
    return [(int(label), list(np.flatnonzero(labels == label)[:columns])) for label in np.unique(labels)]


def labeled_grid(images, labels, *, columns=None, min_tile=64, gap=4, label_width=None, class_names=None):
    """A PIL image of uint8 NHWC `images` (RGB or one channel) laid out one row per class of
    `labels`. `columns` caps the images per row (default: the largest class count);
    `class_names` maps a label to the text beside its row (default: the label number);
    `label_width` fixes the text column's width (default: the widest text plus 2 gaps)."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
        raise TinyFusionError(f"expected uint8 NHWC images with one label each, got {images.shape} {images.dtype} "
                         f"and {len(labels)} labels")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    counts = np.unique(np.asarray(labels), return_counts=True)[1]
    columns = columns or int(counts.max())
    rows = rows_by_class(labels, columns)
    scale = grid_scale(max(images.shape[1:3]), min_tile)
    tile_h, tile_w = images.shape[1] * scale, images.shape[2] * scale
    names = {label: str(class_names[label]) if class_names is not None else str(label) for label, _ in rows}

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if label_width is None:
        label_width = max(probe.textbbox((0, 0), text)[2] for text in names.values()) + 2 * gap
    width = label_width + gap + columns * (tile_w + gap)
    height = gap + len(rows) * (tile_h + gap)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (label, indices) in enumerate(rows):
        top = gap + row * (tile_h + gap)
        text_box = probe.textbbox((0, 0), names[label])
        draw.text((gap, top + (tile_h - text_box[3]) // 2), names[label], fill=TEXT_COLOR)
        for column, index in enumerate(indices):
            tile = images[index].repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour
            canvas.paste(Image.fromarray(tile), (label_width + gap + column * (tile_w + gap), top))
    return canvas


def save_labeled_grid(path, images, labels, *, overwrite=True, **layout):
    """labeled_grid(...) written atomically as a PNG."""
    from tinyfusion.io.atomic_files import atomic_path

    grid = labeled_grid(images, labels, **layout)
    with atomic_path(path, overwrite=overwrite) as tmp:
        grid.save(tmp, format="PNG")
    return grid

"""The readable sample grid (tinyfusion/sampling/grids.py): pixel geometry checked against hand-computed
positions: tile size from the integer upscaling, gaps, one row per class in ascending order,
images of a class in input order, nearest-neighbour blocks, and the class text left of each row."""
import numpy as np
import pytest

from tinyfusion.errors import TinyFusionError
from tinyfusion.sampling.grids import grid_scale, labeled_grid

WHITE = (255, 255, 255)


def solid_images(count, size=8):
    """Image k is filled with the colour (k + 1, 2k + 1, 100 + k): distinct and never white."""
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    for k in range(count):
        images[k] = (k + 1, 2 * k + 1, 100 + k)
    return images


def test_upscaling_factor():
    assert [grid_scale(size) for size in (8, 10, 32, 63, 64, 256)] == [8, 7, 2, 2, 1, 1]
    assert grid_scale(8, min_tile=20) == 3


def test_rows_per_class_tiles_and_gaps():
    labels = [2, 0, 2, 1, 0, 2]
    images = solid_images(len(labels))
    grid = np.asarray(labeled_grid(images, labels, gap=4, label_width=20))
    # scale 8 -> 64 px tiles; 3 columns (class 2 has 3 images); 3 rows
    assert grid.shape == (4 + 3 * 68, 20 + 4 + 3 * 68, 3)
    expected = {(0, 0): 1, (0, 1): 4, (1, 0): 3, (2, 0): 0, (2, 1): 2, (2, 2): 5}  # (row, column) -> image
    for row in range(3):
        for column in range(3):
            top, left = 4 + row * 68, 24 + column * 68
            tile = grid[top:top + 64, left:left + 64]
            if (row, column) in expected:
                assert (tile == images[expected[(row, column)], 0, 0]).all(), (row, column)
            else:  # class 0 and 1 have fewer images: the rest of the row stays empty
                assert (tile == WHITE).all(), (row, column)
            assert (grid[top - 4:top, left:left + 64] == WHITE).all()  # gap above every tile
            assert (grid[top:top + 64, left - 4:left] == WHITE).all()  # gap left of every tile
    # the class is written in the label column of its row (dark pixels there), nothing between rows
    for row in range(3):
        top = 4 + row * 68
        assert (grid[top:top + 64, :20] != WHITE).any(axis=-1).any(), row
        assert (grid[top - 4:top, :] == WHITE).all()


def test_nearest_neighbour_blocks_and_grayscale():
    image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8) * 3  # one channel, every pixel distinct
    grid = np.asarray(labeled_grid(image, [7], gap=2, label_width=10))
    assert grid.shape == (2 + 64 + 2, 10 + 2 + 64 + 2, 3)
    tile = grid[2:66, 12:76]
    for i in range(8):
        for j in range(8):
            assert (tile[8 * i:8 * i + 8, 8 * j:8 * j + 8] == image[0, i, j]).all(), (i, j)


def test_columns_cap_and_large_images_not_scaled():
    labels = [1, 1, 1, 0]
    images = solid_images(4, size=70)  # >= 64 px: scale 1
    grid = np.asarray(labeled_grid(images, labels, columns=2, gap=3, label_width=0))
    assert grid.shape == (3 + 2 * 73, 3 + 2 * 73, 3)
    assert (grid[3 + 73:3 + 73 + 70, 3:73] == images[0, 0, 0]).all()  # row 1 = class 1, first image
    assert (grid[3 + 73:3 + 73 + 70, 76:146] == images[1, 0, 0]).all()  # its second; the third is cut


def test_class_names_and_bad_input():
    grid = labeled_grid(solid_images(2), [0, 1], class_names=["zero", "one"], gap=4)
    assert grid.size[0] > 4 + 68  # the text column takes room
    with pytest.raises(TinyFusionError):
        labeled_grid(solid_images(2).astype(np.float32), [0, 1])


def test_sample_py_labeled_grid(tmp_path, one_torch_thread):
    """sample.py --grid labeled: one row per class in ascending order (labels 3 1 3 -> rows 1, 3), the
    8x8 pixel-space samples upscaled x8 into 64 px tiles (constant 8x8 blocks) with 4 px gaps."""
    import sample
    from tests.prune_helpers import save_plain, xs_model
    ckpt = save_plain(xs_model(depth=12, patch=4), tmp_path / "xs.pt")  # DiT-XS/4 has 12 blocks
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--model", "DiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10",
                                   "--ckpt", ckpt, "--num-sampling-steps", "2", "--class-labels", "3", "1", "3",
                                   "--grid", "labeled", "--out", str(out)]))
    from PIL import Image
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape[0] == 4 + 2 * 68
    width = grid.shape[1]
    label_width = width - 4 - 2 * 68  # two columns (class 3 has two samples)
    assert 0 < label_width < 40
    tile = grid[4:68, label_width + 4:label_width + 68]
    blocks = tile.reshape(8, 8, 8, 8, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # every 8x8 block is one source pixel
    assert (grid[4:68, label_width + 72:label_width + 136] == WHITE).all()  # class 1 has one sample

"""Sample and reference batches of the ADM evaluator: `.npz` files with `arr_0` (N, H, W, 3) uint8
images (sample_ddp.py, save_npz.py), optionally `labels` and the Inception statistics `mu, sigma,
mu_s, sigma_s` of ADM's reference batches. Images are streamed in batches (50,000 images are not
loaded at once) and every file is validated from its headers before any activation is computed.
"""
import os
import zipfile
from contextlib import contextmanager

import numpy as np

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@contextmanager
def open_npz_array(path, key="arr_0"):
    """Yield (shape, dtype, read_batch) for one array of an .npz; read_batch(n) returns the
    next n rows (fewer at the end, None when done). Plain (uncompressed or deflated) .npy
    members are streamed from the zip; anything unusual falls back to np.load."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass an .npz written by sample_ddp.py or save_npz.py")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz archive; pack image folders with save_npz.py")
    with archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            keys = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
            raise ValueError(f"{path} has no '{key}' array (it holds {keys}); expected images in '{key}'")
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                fortran_order, dtype, shape = True, None, None
            if fortran_order or dtype is None or dtype.hasobject:
                array = np.load(path)[key]
                position = [0]

                def read_batch(count):
                    if position[0] >= len(array):
                        return None
                    batch = array[position[0]:position[0] + count]
                    position[0] += len(batch)
                    return batch

                yield array.shape, array.dtype, read_batch
                return

            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            remaining = [shape[0]]

            def read_batch(count):
                count = min(count, remaining[0])
                if count <= 0:
                    return None
                data = stream.read(count * row_bytes)
                while len(data) < count * row_bytes:  # zip streams may return short reads
                    more = stream.read(count * row_bytes - len(data))
                    if not more:
                        raise ValueError(f"{path}: '{key}' is truncated; re-create the .npz")
                    data += more
                remaining[0] -= count
                return np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])

            yield tuple(shape), dtype, read_batch


def iterate_image_batches(path, batch_size, key="arr_0"):
    """Yield float32 NHWC batches in [0, 255] of an .npz image array; first yields its length."""
    with open_npz_array(path, key) as (shape, dtype, read_batch):
        check_image_array(path, key, shape, dtype)
        yield shape[0]
        while True:
            batch = read_batch(batch_size)
            if batch is None:
                return
            yield batch.astype(np.float32)


def check_image_array(path, key, shape, dtype):
    """Only uint8 (N, H, W, 3) RGB images are a batch: a float [0, 1] or int16 array would be fed
    to the network as if in [0, 255] and give a plausible-looking but meaningless FID."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: '{key}' has shape {shape}, expected (N, H, W, 3) RGB images (NHWC)")
    if dtype != np.uint8:
        raise ValueError(f"{path}: '{key}' is {dtype}, expected uint8 images in [0, 255]; convert with "
                         f"np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for [0, 1] floats, or re-pack with save_npz.py")
    if shape[0] == 0:
        raise ValueError(f"{path}: '{key}' holds no images")


def check_batch_file(path, key="arr_0"):
    """Validate an .npz batch from its headers before any activation is computed: its images
    (check_image_array) and, if present, all four reference statistics with matching, finite
    shapes, and `labels` (one integer per image) when present. Returns the images' shape."""
    with open_npz_array(path, key) as (shape, dtype, _):
        check_image_array(path, key, shape, dtype)
    labels = read_npz_labels(path)
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (shape[0],)):
        raise ValueError(f"{path}: 'labels' is {labels.dtype} {labels.shape}, expected one integer class per image "
                         f"({shape[0]},)")
    stored = read_npz_statistics(path)
    if stored is not None:
        for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
            mean, cov = np.asarray(stored[mean_key]), np.asarray(stored[cov_key])
            if mean.ndim != 1 or cov.shape != (len(mean), len(mean)) or mean.dtype.kind != "f" or cov.dtype.kind != "f":
                raise ValueError(f"{path}: '{mean_key}' {mean.shape} {mean.dtype} / '{cov_key}' {cov.shape} {cov.dtype} "
                                 f"are not a float mean vector and its square covariance")
            if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
                raise ValueError(f"{path}: '{mean_key}' / '{cov_key}' hold NaN or inf")
    return tuple(shape)


def check_batches_match(ref_path, ref_shape, sample_path, sample_shape, allow_resolution_mismatch=False):
    """Refuse batches of different image sizes unless explicitly allowed: the feature network
    resizes both, so FID/sFID would compare resampling artefacts as much as models."""
    if tuple(ref_shape[1:3]) != tuple(sample_shape[1:3]) and not allow_resolution_mismatch:
        raise ValueError(f"{ref_path} holds {ref_shape[1]}x{ref_shape[2]} images but {sample_path} holds "
                         f"{sample_shape[1]}x{sample_shape[2]}: metrics across resolutions are not comparable; use "
                         f"the reference batch of the samples' resolution, or pass --allow-resolution-mismatch")


def _read_npz(path, read):
    """read(np.load(path)), any failure of a damaged archive named with the file."""
    try:
        with np.load(path) as data:
            return read(data)
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} cannot be read as an .npz ({type(error).__name__}: {error}); re-create it") from None


def read_npz_statistics(path):
    """mu, sigma, mu_s, sigma_s stored in an .npz (ADM reference batches), or None."""
    def read(data):
        present = [key for key in STATISTICS_KEYS if key in data.files]
        if not present:
            return None
        if len(present) != len(STATISTICS_KEYS):
            raise ValueError(f"{path} holds {present} but not all of {list(STATISTICS_KEYS)}; "
                             f"store all four statistics or none")
        return {key: data[key] for key in STATISTICS_KEYS}
    return _read_npz(path, read)


def read_npz_labels(path):
    return _read_npz(path, lambda data: data["labels"] if "labels" in data.files else None)

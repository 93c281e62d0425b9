"""The part-file store of sample_ddp.py: a large sample batch written in finished pieces, resumed
with any world size, and streamed into one .npz.

Each rank writes its finished batches as atomic part files in `{run folder}/parts/` (the images
`.npy` first, then the `.json` naming their indices: a part counts only when its json exists).
`plan_run` decides, on rank 0 and before any sampling, what is left to do and refuses anything that
would overwrite or mix results; `assemble` streams the parts in index order into
`{run folder}.npz` (ADM format: `arr_0` (N, H, W, 3) uint8, plus `labels`).
"""
import functools
import glob
import json
import os
import shutil
import zipfile

import numpy as np

from tinyfusion.errors import TinyFusionError
from tinyfusion.io.atomic_files import atomic_path, atomic_write_json
from tinyfusion.io.checkpoints import check_finite_weights, load_state_dict, state_dict_sha256
from tinyfusion.io.run_lock import lock_folder

# settings that change the images: a run may only be resumed (or reported complete) with the same
# values (--num-fid-samples, --per-proc-batch-size and the world size may change). The checkpoint
# counts by the weights it holds, not its name: two different checkpoints/0000010.pt never share samples.
IDENTITY_KEYS = ("model", "weights_sha256", "no_ema", "image_size", "num_classes", "vae", "vae_path", "groups",
                 "cfg_scale", "num_sampling_steps", "sampler", "ddim_eta", "global_seed", "precision", "tf32",
                 "compile", "guide_all_channels", "timestep_spacing")
# identity keys added after runs were first recorded: a settings.json without one was made with this value
# (timestep_spacing is recorded as None when it is the sampler's default, the only spacing of older runs)
ADDED_IDENTITY_DEFAULTS = {"compile": False, "timestep_spacing": None}


def weights_sha256(ckpt, family, use_ema=True):
    """sha256 of the weights a run samples from (names, dtypes, shapes, bytes; about 1.5 s per GB
    on one core): the file's bytes would not do, since torch.save records the file name it wrote.
    Refuses a checkpoint whose record does not fit `family` (a SiT trained on another interpolant)."""
    state_dict, metadata = load_state_dict(ckpt, use_ema=use_ema)
    check_finite_weights(state_dict, ckpt)  # before any folder is made
    family.check_record(metadata, ckpt)
    return state_dict_sha256(state_dict)


# ----------------------------------------------------------------------- part files
def part_paths(parts_dir, first_index):
    stem = os.path.join(parts_dir, f"{first_index:08d}")
    return stem + ".npy", stem + ".json"


def write_part(parts_dir, indices, labels, images):
    """images (uint8 NHWC) first, then the json naming its indices: a part counts as finished
    only when its json exists, and both are renamed into place atomically."""
    images_path, meta_path = part_paths(parts_dir, indices[0])
    with atomic_path(images_path) as tmp:
        np.save(tmp, images)
    atomic_write_json(meta_path, {"indices": [int(i) for i in indices], "labels": [int(y) for y in labels]})


def read_parts(parts_dir, image_shape):
    """{index: (images path, row, label)} of every finished part whose images file is complete."""
    finished = {}
    for meta_path in sorted(glob.glob(os.path.join(parts_dir, "*.json"))):
        images_path = meta_path[: -len(".json")] + ".npy"
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            images = np.load(images_path, mmap_mode="r")
        except (OSError, ValueError):
            continue  # a part cut off by a kill: its samples are generated again
        if images.dtype != np.uint8 or images.shape != (len(meta["indices"]), *image_shape):
            continue
        for row, (index, label) in enumerate(zip(meta["indices"], meta["labels"])):
            finished[index] = (images_path, row, label)
    return finished


def write_npz(path, finished, num_samples, image_shape, chunk=1024):
    """Stream the parts into an uncompressed .npz (what np.savez writes) in index order without
    holding all images in memory: 50,000 images of 512x512 are 39 GB."""
    load = functools.lru_cache(maxsize=8)(np.load)
    labels = np.array([finished[i][2] for i in range(num_samples)], dtype=np.int64)
    with atomic_path(path, overwrite=False) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": (num_samples, *image_shape)})
                for start in range(0, num_samples, chunk):
                    rows = [load(finished[i][0])[finished[i][1]] for i in range(start, min(start + chunk, num_samples))]
                    f.write(np.ascontiguousarray(np.stack(rows)).tobytes())
            with archive.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, labels)


def assemble(parts_dir, final_path, num_samples, image_shape, keep_parts=False):
    """The final .npz from the finished parts (rank 0, after every rank finished)."""
    finished = read_parts(parts_dir, image_shape)
    missing = [i for i in range(num_samples) if i not in finished]
    if missing:
        raise TinyFusionError(f"{len(missing)} samples are missing from {parts_dir} (first: {missing[:5]}); "
                              f"run again with --resume")
    write_npz(final_path, finished, num_samples, image_shape)
    if not keep_parts:  # the .npz holds everything; the parts would double the disk use
        shutil.rmtree(parts_dir)


def npz_num_samples(path):
    """Number of images in an .npz's arr_0, read from its header (the images stay on disk)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return read_header(f)[0][0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


# ----------------------------------------------------------------------- planning (rank 0)
def settings_mismatch(run_dir, settings):
    """None when run_dir/settings.json records the same IDENTITY_KEYS as `settings`, else a
    one-line description of what differs (or that nothing is recorded)."""
    settings_path = os.path.join(run_dir, "settings.json")
    if not os.path.isfile(settings_path):
        return f"{settings_path} is missing, so its settings are unknown"
    with open(settings_path) as f:
        previous = json.load(f)
    previous = {**ADDED_IDENTITY_DEFAULTS, **previous}
    changed = [key for key in IDENTITY_KEYS if previous.get(key) != settings[key]]
    if not changed:
        return None
    return "its samples were made with other settings (" + ", ".join(
        f"{key} {previous.get(key)!r} -> {settings[key]!r}" for key in changed) + ")"


def plan_run(run_dir, final_path, settings, image_shape, *, num_samples, resume):
    """What is left to sample: ("done", None) when the final .npz of these very settings exists
    and `resume` (--resume) was given, else ("todo", sorted missing indices). Raises TinyFusionError
    on anything that would overwrite or mix results."""
    parts_dir = os.path.join(run_dir, "parts")
    if os.path.exists(final_path) and not resume:
        raise TinyFusionError(f"{final_path} already exists; remove it (or pass another --sample-dir) to sample again")
    lock_folder(run_dir, what="sample folder")  # released by main when the run ends
    if os.path.exists(final_path):
        mismatch = settings_mismatch(run_dir, settings)
        if mismatch:
            raise TinyFusionError(f"{final_path} exists but {mismatch}; use the same flags and checkpoint, "
                                  f"or another --sample-dir")
        if npz_num_samples(final_path) != num_samples:
            raise TinyFusionError(f"{final_path} holds {npz_num_samples(final_path)} samples, not "
                                  f"--num-fid-samples {num_samples}; remove it or pass another --sample-dir")
        return "done", None
    settings_path = os.path.join(run_dir, "settings.json")
    finished = read_parts(parts_dir, image_shape) if os.path.isdir(parts_dir) else {}
    if finished:
        if not resume:
            raise TinyFusionError(f"{parts_dir} holds {len(finished)} samples of an unfinished run; pass --resume "
                                  f"to continue it or remove {run_dir}")
        mismatch = settings_mismatch(run_dir, settings)
        if mismatch:
            raise TinyFusionError(f"cannot resume {run_dir}: {mismatch}; use the same flags or remove the folder")
    os.makedirs(parts_dir, exist_ok=True)
    atomic_write_json(settings_path, settings)
    return "todo", [i for i in range(num_samples) if i not in finished]

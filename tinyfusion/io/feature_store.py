"""Pre-extracted VAE latents (or pixels) for training and pruning: the feature store that
`extract_features.py` writes, the original per-file layout, and the loader every training
script uses.

The store (a folder):
    extraction.json        what is being extracted (data, VAE, seed, shard plan); written first
    shard-00000.safetensors  `latents` (n, 2, C, H, W) = the image and its horizontal flip
                             (n, 1, C, H, W) = the image alone with extract_features.py --no-flip,
    shard-00001.safetensors  `labels` (n,) int64, `indices` (n,) int64 (position in the sorted
    ...                      ImageFolder); its metadata holds a sha256 of the three arrays
    manifest.json          written last, once every shard validated: the store is complete
Shards are read through `np.memmap` at the offsets in the safetensors header, so a sample is a
slice of a mapped file (no per-sample open, nothing loaded up front but the labels). Each
shard's sha256 is verified the first time a sample of it is read (once per training run: the
verified flags live in shared memory, so later epochs' DataLoader workers skip them); a shard
with flipped bytes stops training with an error naming it instead of training on garbage.

The original layout (`imagenet256_features/{i}.npy` of shape (2, C, H, W) and
`imagenet256_labels/{i}.npy` of shape (1,)) loads through the same dataset class.

Which copy (image or flip) a sample returns (a store without flips always returns the image) is a hash of (seed, epoch, index), not a draw from
a global or worker RNG, so a resumed run sees the same data whatever --num-workers is.
"""
import glob
import hashlib
import json
import os
import struct

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tinyfusion.io.atomic_files import atomic_path
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.vae import LATENT_SCALE

STORE_FORMAT = "tinyfusion-features"
STORE_VERSION = 1
PLAN_FILE = "extraction.json"
MANIFEST_FILE = "manifest.json"
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
STORE_DTYPES = {"fp32": np.float32, "fp16": np.float16}

_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash64(*keys):
    """A well-mixed 64-bit hash of a few integers (seed, epoch, index, ...)."""
    state = 0
    for key in keys:
        state = _splitmix64(state ^ (int(key) & _MASK64))
    return state


def hash_uniform(*keys):
    """A number in [0, 1) that depends only on the keys."""
    return (hash64(*keys) >> 11) * 2.0 ** -53


# ---------------------------------------------------------------- shard files

def shard_file_name(shard_id):
    return f"shard-{shard_id:05d}.safetensors"


def _arrays_sha256(arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def write_shard(path, latents, labels, indices, info):
    """Write one shard atomically (temp file + fsync + rename): it is either absent or whole.
    `info` (extraction id, shard id, range, ...) goes into the safetensors metadata together
    with the count and a sha256 of the arrays, so the file validates on its own."""
    from safetensors.numpy import save_file
    labels = np.asarray(labels, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    info = dict(info, count=int(len(labels)), sha256=_arrays_sha256([latents, labels, indices]))
    with atomic_path(path) as tmp:
        save_file({"latents": np.ascontiguousarray(latents), "labels": labels, "indices": indices}, tmp,
                  metadata={"tinyfusion": json.dumps(info, sort_keys=True)})
    return info


def read_shard_header(path):
    """(tensors {name: (numpy dtype, shape, absolute byte offset)}, info dict) of a shard file.
    A ValueError if the file is not a whole shard: too short, a broken header, or fewer bytes
    than the header promises (a truncated copy)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes)")
        header_size = struct.unpack("<Q", head)[0]
        if header_size > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_size))
            info = json.loads(header.pop("__metadata__")["tinyfusion"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} has a broken header") from None
    data_start, data_end, tensors = 8 + header_size, 8 + header_size, {}
    for name in ("latents", "labels", "indices"):
        if name not in header or header[name]["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path} has no {name} array of a known dtype")
        dtype = np.dtype(SAFETENSORS_DTYPES[header[name]["dtype"]])
        shape = tuple(header[name]["shape"])
        begin, end = header[name]["data_offsets"]
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"{path}: {name} has {end - begin} bytes for shape {shape}")
        tensors[name] = (dtype, shape, data_start + begin)
        data_end = max(data_end, data_start + end)
    if data_end != size:
        raise ValueError(f"{path} has {size} bytes but its header describes {data_end} (truncated or padded)")
    return tensors, info


def _map_array(path, tensor):
    dtype, shape, offset = tensor
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def check_shard(path, expected, verify_checksum=True):
    """The shard's info if the file is a complete shard of the extraction described by
    `expected` (keys such as extraction_id, shard, start, stop must match), else a ValueError
    saying why. verify_checksum re-hashes the data (catches flipped bytes, not just truncation)."""
    tensors, info = read_shard_header(path)
    for key, value in expected.items():
        if info.get(key) != value:
            raise ValueError(f"{path} belongs to {key}={info.get(key)!r}, expected {value!r}")
    count = info["count"]
    if tensors["labels"][1] != (count,) or tensors["indices"][1] != (count,) or tensors["latents"][1][0] != count:
        raise ValueError(f"{path}: array lengths do not match its count {count}")
    if verify_checksum:
        arrays = [_map_array(path, tensors[name]) for name in ("latents", "labels", "indices")]
        if _arrays_sha256(arrays) != info["sha256"]:
            raise ValueError(f"{path}: checksum mismatch (corrupted)")
    return dict(info, bytes=os.path.getsize(path))


# ---------------------------------------------------------------- sample sources

class _StoreSource:
    """Samples of a finished store, memory-mapped shard by shard."""

    def __init__(self, folder, manifest, verify_checksums=True):
        self.folder = folder
        self.files, self.latent_tensors, self.tensors, self.checksums, counts, labels = [], [], [], [], [], []
        for record in manifest["shards"]:
            path = os.path.join(folder, record["file"])
            try:
                if os.path.getsize(path) != record["bytes"]:
                    raise ValueError(f"{path} has {os.path.getsize(path)} bytes, the manifest says {record['bytes']}")
                tensors, info = read_shard_header(path)
            except (OSError, ValueError) as error:
                raise TinyFusionError(f"the feature store {folder} is damaged ({error}); rerun extract_features.py "
                                      f"with the same flags and --resume to redo the bad shard") from None
            self.files.append(path)
            self.latent_tensors.append(tensors["latents"])
            self.tensors.append(tensors)
            self.checksums.append(info.get("sha256"))
            counts.append(record["count"])
            labels.append(np.array(_map_array(path, tensors["labels"])))
        self.ends = np.cumsum(counts)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self.sample_shape = tuple(manifest["sample_shape"])
        self.num_classes = int(manifest["num_classes"])
        self._maps = {}
        # 1 = shard verified (or verification off); shared with the DataLoader workers of every epoch
        self.verified = torch.full((len(self.files),), 0 if verify_checksums else 1, dtype=torch.uint8).share_memory_()

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getstate__(self):
        # DataLoader workers re-map the files themselves: pickling a memmap would copy its data
        return dict(self.__dict__, _maps={})

    def copies(self, index):
        shard = int(np.searchsorted(self.ends, index, side="right"))
        local = index - (int(self.ends[shard - 1]) if shard else 0)
        if shard not in self._maps:
            if not self.verified[shard]:
                self.verify_shard(shard)
            self._maps[shard] = _map_array(self.files[shard], self.latent_tensors[shard])
        return self._maps[shard][local]

    def verify_shard(self, shard):
        """Re-hash a shard's arrays against the sha256 it was written with."""
        arrays = [_map_array(self.files[shard], self.tensors[shard][name]) for name in ("latents", "labels", "indices")]
        if _arrays_sha256(arrays) != self.checksums[shard]:
            raise TinyFusionError(f"the feature store {self.folder} is damaged: {self.files[shard]} does not match its "
                                  f"checksum (flipped bytes); rerun extract_features.py with the same flags and "
                                  f"--resume to redo it")
        self.verified[shard] = 1

    def label(self, index):
        return int(self.labels[index])


def _numeric_first(name):
    stem = os.path.splitext(name)[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


class _OriginalSource:
    """The original layout: one (2, C, H, W) or (C, H, W) .npy per image and a (1,) label file
    of the same name. Opens two small files per sample, as the original did."""

    def __init__(self, features_dir, labels_dir):
        self.features_dir, self.labels_dir = features_dir, labels_dir
        self.names = sorted((n for n in os.listdir(features_dir) if n.endswith(".npy")), key=_numeric_first)
        if not self.names:
            raise TinyFusionError(f"no features found in {features_dir}; run extract_features.py first")
        missing = sorted(set(self.names) - set(os.listdir(labels_dir)), key=_numeric_first)
        if missing:
            raise TinyFusionError(f"{len(missing)} feature files have no label file in {labels_dir} "
                                  f"(first: {missing[0]}); the extraction was interrupted, redo it")
        first = np.load(os.path.join(features_dir, self.names[0]))
        self.sample_shape = tuple(first.shape[-3:])
        self._num_classes = None

    def __len__(self):
        return len(self.names)

    def copies(self, index):
        features = np.load(os.path.join(self.features_dir, self.names[index]))
        return features[None] if features.ndim == 3 else features

    def label(self, index):
        return int(np.load(os.path.join(self.labels_dir, self.names[index])).reshape(-1)[0])

    @property
    def num_classes(self):
        # the layout has no class list: max label + 1 (reads every label file once, then cached)
        if self._num_classes is None:
            self._num_classes = max(self.label(i) for i in range(len(self))) + 1
        return self._num_classes


# ---------------------------------------------------------------- the dataset

class FeatureDataset(Dataset):
    """(x float32 (C, H, W), y int64 scalar) with x the image's latent or, with probability
    flip_prob, its flip's; the choice is hash(seed, epoch, index) (see set_epoch)."""

    def __init__(self, source, metadata, flip_prob=0.5, seed=0):
        self.source = source
        self.metadata = metadata
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    @property
    def sample_shape(self):
        return self.source.sample_shape

    @property
    def num_classes(self):
        return self.source.num_classes

    def __len__(self):
        return len(self.source)

    def flip_chosen(self, index):
        return hash_uniform(self.seed, self.epoch, index) < self.flip_prob

    def __getitem__(self, index):
        copies = self.source.copies(index)
        copy = 1 if len(copies) > 1 and self.flip_chosen(index) else 0
        x = torch.from_numpy(np.array(copies[copy], dtype=np.float32))
        return x, torch.tensor(self.source.label(index), dtype=torch.int64)


def _original_layout_dirs(path):
    """(features_dir, labels_dir) when `path` holds `imagenet256_features/` + `imagenet256_labels/`
    (any *_features with a *_labels twin) or is such a features folder itself, else None."""
    candidates = sorted(glob.glob(os.path.join(path, "*_features")))
    if path.rstrip("/").endswith("_features"):
        candidates.insert(0, path.rstrip("/"))
    for features_dir in candidates:
        labels_dir = features_dir[: -len("_features")] + "_labels"
        if os.path.isdir(features_dir) and os.path.isdir(labels_dir):
            return features_dir, labels_dir
    return None


def read_manifest(folder):
    with open(os.path.join(folder, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
        raise TinyFusionError(f"{folder}/{MANIFEST_FILE} is not a {STORE_FORMAT} v{STORE_VERSION} manifest")
    return manifest


def open_feature_dataset(path, flip_prob=0.5, seed=0, verify_checksums=True):
    """The features under `path`: our store (a folder with manifest.json) or the original layout
    (a folder holding imagenet256_features/ and imagenet256_labels/). One-line TinyFusionError if
    there are none or the store is unfinished or damaged."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        manifest = read_manifest(path)
        metadata = {key: manifest.get(key) for key in ("vae", "vae_source", "image_size", "scale_factor",
                                                       "class_to_idx", "num_samples", "store_dtype", "global_seed")}
        metadata["layout"] = "tinyfusion"
        return FeatureDataset(_StoreSource(path, manifest, verify_checksums), metadata, flip_prob, seed)
    if os.path.isfile(os.path.join(path, PLAN_FILE)):
        raise TinyFusionError(f"the extraction in {path} is unfinished (no {MANIFEST_FILE}); rerun extract_features.py "
                              f"--features-path {path} with the same flags and --resume")
    dirs = _original_layout_dirs(path) if os.path.isdir(path) else None
    if dirs is None:
        raise TinyFusionError(f"no features found in {path}; run extract_features.py --features-path {path} first")
    source = _OriginalSource(*dirs)
    channels, height, _ = source.sample_shape
    metadata = {"layout": "original", "vae": None, "vae_source": None, "class_to_idx": None,
                "image_size": height * 8 if channels == 4 else None, "scale_factor": LATENT_SCALE,
                "num_samples": len(source), "store_dtype": None, "global_seed": None}
    return FeatureDataset(source, metadata, flip_prob, seed)


# ---------------------------------------------------------------- loading

class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (same order as DiT's: shuffle with `seed + epoch`, padded to a multiple
    of the world size) that can start an epoch after its first `start_batch` batches, for runs
    resumed mid-epoch. set_epoch also tells the dataset the epoch, which fixes the flip choices.
    Call `sampler.set_epoch(epoch, start_batch)` before iterating the loader each epoch."""

    def __init__(self, dataset, num_replicas, rank, batch_size, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        super().set_epoch(epoch)
        self.start_batch = start_batch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size:])

    def __len__(self):
        return max(0, self.num_samples - self.start_batch * self.batch_size)


def make_loader(dataset, per_rank_batch_size, ctx, seed, num_workers, shuffle=True, drop_last=True):
    """(loader, sampler) for this rank. Per epoch: `sampler.set_epoch(epoch, start_batch=k)`,
    then iterate `loader` (it yields the epoch's batches from batch k on). Workers are not
    persistent: each epoch's workers get the dataset with its current epoch."""
    sampler = ResumableDistributedSampler(dataset, ctx.world_size, ctx.rank, per_rank_batch_size, shuffle, seed)
    if drop_last and sampler.num_samples < per_rank_batch_size:
        raise ValueError(f"error: {len(dataset)} samples over {ctx.world_size} ranks cannot fill one batch of "
                         f"{per_rank_batch_size} per rank; lower --global-batch-size or extract more data")
    loader = DataLoader(dataset, batch_size=per_rank_batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=ctx.device.type == "cuda", drop_last=drop_last, persistent_workers=False)
    return loader, sampler


def batches_per_epoch(sampler, drop_last=True):
    """Full batches one rank sees in an epoch (independent of start_batch)."""
    if drop_last:
        return sampler.num_samples // sampler.batch_size
    return -(-sampler.num_samples // sampler.batch_size)

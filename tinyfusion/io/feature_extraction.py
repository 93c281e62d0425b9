"""Encode an ImageFolder once into the feature store that training and pruning read (what
extract_features.py runs; tinyfusion/io/feature_store.py holds the format and its reader).

Every image is ADM center-cropped, scaled to [-1, 1] and encoded together with its horizontal
flip (`latent_dist.sample()` times the VAE's scaling factor: 0.18215 for the SD-VAE, 0.2325 for
MAR's KL-16; with vae "none" the pixels themselves are stored), or alone with `no_flip`. Images
are cut into shards of contiguous indices (sorted ImageFolder order); under torchrun each rank
encodes its own shards, writes each one atomically, and rank 0 writes manifest.json last. The
posterior noise of image i is drawn from a generator seeded by (global_seed, i), so the store is
the same for any number of ranks and nodes. `resume` keeps every shard that validates (checksum
included) and redoes the rest.
"""
import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tinyfusion.errors import TinyFusionError
from tinyfusion.io import feature_store as store
from tinyfusion.io.atomic_files import atomic_write_json
from tinyfusion.io.checkpoints import state_dict_sha256
from tinyfusion.distributed import all_reduce_mean, barrier, cleanup_distributed, setup_distributed
from tinyfusion.io.image_folder import list_image_folder, load_image_uint8, to_unit_range
from tinyfusion.io.run_lock import LOCK_FILE, lock_folder, release_folder
from tinyfusion.io.run_folder import create_logger
from tinyfusion.io.vae import latent_geometry, latent_geometry_from_flags, latent_scale, load_vae, vae_source


@dataclass(frozen=True)
class ExtractionSettings:
    """What an extraction is asked to do (the flags of extract_features.py, same names)."""
    data_path: str  # ImageFolder: one sub-folder of images per class
    features_path: str  # folder of the feature store to write
    image_size: int  # images are center-cropped to this size
    vae: str  # ema / mse (the SD-VAE), none (pixel space)
    vae_path: str | None  # a local AutoencoderKL folder instead of the SD-VAE's download
    num_classes: int  # the most class folders the data may have
    global_seed: int  # seed of the VAE posterior noise (per image)
    num_workers: int  # image-decoding DataLoader workers per rank
    batch_size: int  # images per VAE call per rank (x2 with the flips)
    no_flip: bool  # store each image without its horizontal flip
    shard_size: int  # images per shard file
    store_dtype: str  # a key of feature_store.STORE_DTYPES
    resume: bool  # keep the shards of an interrupted run that validate and redo the rest

    @classmethod
    def from_args(cls, args):
        """The settings of parsed extract_features.py flags (other flags are ignored)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__})


def extract_feature_store(settings, run_args=None):
    """Extract the store; rank 0 holds the lock of features_path until the end (also on error).
    A store folder this run created and failed to write any shard into (a full disk, an error
    before encoding) is removed: there is nothing in it to resume. `run_args`: what manifest.json
    records as the run's `args` (extract_features.py: every flag; default: the settings)."""
    created = not os.path.exists(settings.features_path)
    try:
        extract(settings, asdict(settings) if run_args is None else run_args)
    except BaseException:
        release_folder(settings.features_path)
        if created and int(os.environ.get("RANK", "0")) == 0:
            remove_if_no_shards(settings.features_path)
        raise
    finally:
        release_folder(settings.features_path)


# what makes two extractions the same (and a store resumable); other plan fields are informational
IDENTITY_KEYS = ("format", "version", "images_sha256", "num_images", "classes", "image_size", "vae",
                 "vae_weights_sha256", "scale_factor", "global_seed", "shard_size", "batch_size",
                 "store_dtype", "sample_shape", "copies")


class IndexedImages(Dataset):
    """Worker side: (uint8 image (3, H, W), label, index), or (None, index, reason) for a file
    that cannot be decoded, so one bad image is skipped instead of ending the run."""

    def __init__(self, samples, image_size):
        self.samples = samples
        self.image_size = image_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            return load_image_uint8(path, self.image_size), label, index
        except Exception as error:  # PIL raises many types for broken files
            return None, index, f"{type(error).__name__}: {error}"


def collate_good_images(items):
    good = [item for item in items if item[0] is not None]
    bad = [(index, reason) for image, index, reason in items if image is None]
    images = torch.stack([item[0] for item in good]) if good else None
    labels = torch.tensor([item[1] for item in good], dtype=torch.int64)
    indices = torch.tensor([item[2] for item in good], dtype=torch.int64)
    return images, labels, indices, bad


def posterior_noise(global_seed, index, shape):
    """N(0, 1) noise of image `index`: a function of (seed, index) only, never of the rank, the
    world size or the batch the image landed in."""
    generator = torch.Generator().manual_seed(store.hash64(global_seed, index) >> 1)
    return torch.randn(shape, generator=generator)


@torch.inference_mode()
def encode_with_flips(vae, images_uint8, indices, global_seed, sample_shape, device, copies=2):
    """(B, copies, C, H, W): the image and (copies = 2) its horizontal flip, as latents (or pixels
    for vae None)."""
    images = to_unit_range(images_uint8.to(device))
    pairs = torch.stack([images, images.flip(dims=[3])][:copies], dim=1)
    if vae is None:
        return pairs
    # channels-last: oneDNN/cuDNN run these convolutions markedly faster in NHWC
    posterior = vae.encode(pairs.flatten(0, 1).contiguous(memory_format=torch.channels_last)).latent_dist
    # the noise of (image, flip) is drawn as a pair either way, so the image's latent is the same
    # with and without --no-flip
    noise = torch.stack([posterior_noise(global_seed, int(i), (2, *sample_shape))[:copies] for i in indices])
    # same distribution as latent_dist.sample(), with our own per-image noise
    latents = (posterior.mean + posterior.std * noise.flatten(0, 1).to(device)) * latent_scale(vae)
    return latents.contiguous().unflatten(0, (len(indices), copies))


def sha256_of_lines(lines):
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def build_plan(settings, samples, classes, vae, sample_shape):
    data_root = os.path.abspath(settings.data_path)
    listing = (f"{os.path.relpath(path, data_root)}\t{label}" for path, label in samples)
    num_shards = -(-len(samples) // settings.shard_size)
    pixel_space = vae is None
    source = vae_source(settings.vae, settings.vae_path)
    return {
        "format": store.STORE_FORMAT, "version": store.STORE_VERSION,
        "data_path": data_root, "num_images": len(samples), "images_sha256": sha256_of_lines(listing),
        "classes": classes, "image_size": settings.image_size,
        "vae": "none" if pixel_space else settings.vae,
        "vae_source": None if pixel_space else (os.path.abspath(source) if os.path.isdir(source) else source),
        "vae_weights_sha256": None if pixel_space else state_dict_sha256(vae.state_dict(), layout=False),
        "scale_factor": None if pixel_space else latent_scale(vae),
        "global_seed": settings.global_seed, "shard_size": settings.shard_size, "batch_size": settings.batch_size,
        "store_dtype": settings.store_dtype, "sample_shape": list(sample_shape), "num_shards": num_shards,
        "copies": 1 if settings.no_flip else 2,
    }


def extraction_id(plan):
    identity = {key: plan[key] for key in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def shard_range(plan, shard_id):
    start = shard_id * plan["shard_size"]
    return start, min(start + plan["shard_size"], plan["num_images"])


def shard_identity(plan, plan_id, shard_id):
    """What a shard file's metadata must say to count as this shard of this extraction."""
    start, stop = shard_range(plan, shard_id)
    return {"extraction_id": plan_id, "shard": shard_id, "start": start, "stop": stop}


def gather(value, ctx):
    """Every rank's value, in rank order."""
    if not ctx.is_distributed:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def exit_together(error, ctx):
    """Raise the first rank's error on every rank, so no rank waits forever at a barrier for a
    rank that already stopped."""
    errors = [e for e in gather(error, ctx) if e]
    if errors:
        cleanup_distributed()
        raise TinyFusionError(errors[0])


def prepare_features_path(path, plan, resume):
    """Rank 0: decide between a fresh extraction and a resumed one, or refuse with the reason.
    Nothing that is already there gets overwritten: a different extraction, a finished one, or
    a folder holding anything else are errors."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise TinyFusionError(f"--features-path {path} is a file; pass a folder")
    plan_file = os.path.join(path, store.PLAN_FILE)
    entries = sorted(set(os.listdir(path) if os.path.isdir(path) else []) - set(stale_temp_files(path)) - {LOCK_FILE})
    if os.path.isfile(plan_file):
        with open(plan_file) as f:
            existing = json.load(f)
        for key in IDENTITY_KEYS:
            if existing.get(key) != plan[key]:
                there, here = (repr(value)[:60] for value in (existing.get(key), plan[key]))
                raise TinyFusionError(f"{path} already holds a different extraction ({key}: {there} there, "
                                      f"{here} now); choose another --features-path or delete that folder")
        if not resume:
            state = "a finished" if os.path.isfile(os.path.join(path, store.MANIFEST_FILE)) else "an unfinished"
            raise TinyFusionError(f"{path} already holds {state} run of this extraction; pass --resume to "
                                  f"check and complete it, or choose another --features-path")
        return "resume"
    if entries:
        raise TinyFusionError(f"{path} is not empty and holds no extraction of ours (found {entries[0]!r}); "
                              f"choose a new or empty --features-path")
    return "fresh"


def stale_temp_files(path):
    """Names of atomic_files temp files a killed run left (`.shard-00003.x1y2.tmp.safetensors`):
    never read, since only complete files are renamed into place; just litter to remove."""
    patterns = [f".{os.path.splitext(name)[0]}.*.tmp*" for name in ("shard-*.safetensors", store.PLAN_FILE,
                                                                       store.MANIFEST_FILE)]
    return [os.path.basename(found) for pattern in patterns for found in glob.glob(os.path.join(path, pattern))]


def unfinished_shards(path, plan, plan_id, shard_ids):
    """The shards among shard_ids that are missing or do not validate (truncated, corrupted,
    from another extraction): those get (re)done."""
    pending = []
    for shard_id in shard_ids:
        try:
            store.check_shard(os.path.join(path, store.shard_file_name(shard_id)),
                              shard_identity(plan, plan_id, shard_id), verify_checksum=True)
        except (OSError, ValueError):
            pending.append(shard_id)
    return pending


def write_manifest(path, plan, plan_id, run_args, ctx):
    """Rank 0, after every rank finished: validate every shard's header and size and record it."""
    records = []
    for shard_id in range(plan["num_shards"]):
        info = store.check_shard(os.path.join(path, store.shard_file_name(shard_id)),
                                 shard_identity(plan, plan_id, shard_id), verify_checksum=False)
        records.append(dict(info, file=store.shard_file_name(shard_id)))
    skipped = [entry for record in records for entry in record["skipped"]]
    manifest = dict(plan, extraction_id=plan_id, num_samples=sum(r["count"] for r in records),
                    num_skipped=len(skipped), skipped=skipped, num_classes=len(plan["classes"]),
                    class_to_idx={name: label for label, name in enumerate(plan["classes"])},
                    shards=records, world_size=ctx.world_size, args=run_args)
    atomic_write_json(os.path.join(path, store.MANIFEST_FILE), manifest, overwrite=False)
    return manifest


def encode_shards(shard_ids, samples, plan, plan_id, vae, settings, ctx, logger):
    """Encode and write the given shards; returns the number of images encoded. One loader over
    all of them (workers start once) whose batches never straddle two shards."""
    batches, batch_shard = [], []
    for shard_id in shard_ids:
        start, stop = shard_range(plan, shard_id)
        for first in range(start, stop, settings.batch_size):
            batches.append(list(range(first, min(first + settings.batch_size, stop))))
            batch_shard.append(shard_id)
    loader = DataLoader(IndexedImages(samples, settings.image_size), batch_sampler=batches,
                        num_workers=settings.num_workers,
                        collate_fn=collate_good_images, pin_memory=ctx.device.type == "cuda")
    store_dtype = store.STORE_DTYPES[settings.store_dtype]
    data_root = os.path.abspath(settings.data_path)
    my_images = sum(len(batch) for batch in batches)
    logger.info(f"encoding {plan['num_images']} images on {ctx.world_size} rank(s); rank 0 does "
                f"{len(shard_ids)} shards, {my_images} images")
    latents, labels, indices, skipped, encoded = [], [], [], [], 0
    no_images = np.zeros(0, dtype=np.int64)  # so that a shard whose images were all unreadable still writes
    progress = tqdm(total=my_images, unit="img", disable=not ctx.is_main, smoothing=0.05)
    for batch_number, (images, batch_labels, batch_indices, bad) in enumerate(loader):
        shard_id = batch_shard[batch_number]
        for index, reason in bad:
            print(f"[rank {ctx.rank}] skipping {samples[index][0]}: {reason}", flush=True)
            skipped.append(os.path.relpath(samples[index][0], data_root))
        if images is not None:
            batch_latents = encode_with_flips(vae, images, batch_indices, settings.global_seed, plan["sample_shape"],
                                              ctx.device, plan["copies"])
            latents.append(batch_latents.cpu().numpy().astype(store_dtype))
            labels.append(batch_labels.numpy())
            indices.append(batch_indices.numpy())
            encoded += len(batch_indices)
        progress.update(len(batch_indices) + len(bad))
        if batch_number + 1 == len(batches) or batch_shard[batch_number + 1] != shard_id:
            latents.append(np.zeros((0, plan["copies"], *plan["sample_shape"]), dtype=store_dtype))
            store.write_shard(os.path.join(settings.features_path, store.shard_file_name(shard_id)),
                              np.concatenate(latents), np.concatenate(labels + [no_images]),
                              np.concatenate(indices + [no_images]),
                              dict(shard_identity(plan, plan_id, shard_id), skipped=skipped, rank=ctx.rank,
                                   world_size=ctx.world_size))
            latents, labels, indices, skipped = [], [], [], []
    progress.close()
    return encoded


def plan_extraction(settings, ctx, logger):
    """(samples, vae, plan): every rank lists the images and loads the VAE; any rank's problem
    stops all of them."""
    error = samples = vae = plan = None
    try:
        latent_geometry_from_flags(settings.vae, settings.image_size, settings.vae_path)  # size check before loading
        try:
            samples, classes, ignored = list_image_folder(settings.data_path)
        except ValueError as listing_error:
            raise TinyFusionError(str(listing_error)) from None
        if len(classes) > settings.num_classes:
            raise TinyFusionError(f"{settings.data_path} has {len(classes)} class folders but --num-classes is "
                                  f"{settings.num_classes}; pass --num-classes {len(classes)}")
        for path in ignored:
            logger.info(f"skipping {path}: not an image file")
        vae = load_vae(settings.vae, settings.vae_path, ctx.device)
        if vae is not None:
            vae = vae.to(memory_format=torch.channels_last)
        channels, size = latent_geometry(vae, settings.image_size)
        plan = build_plan(settings, samples, classes, vae, (channels, size, size))
    except TinyFusionError as exit_error:
        error = str(exit_error)
    exit_together(error, ctx)
    return samples, vae, plan


def remove_if_no_shards(features_path):
    if os.path.isdir(features_path) and not glob.glob(os.path.join(features_path, "shard-*")):  # shard_file_name
        shutil.rmtree(features_path, ignore_errors=True)


def extract(settings, run_args):
    ctx = setup_distributed()
    logger = create_logger(None, ctx.is_main, name="extract")
    features_path = settings.features_path

    # 1. every rank lists the images and loads the VAE
    samples, vae, plan = plan_extraction(settings, ctx, logger)
    plan_id = extraction_id(plan)
    if len(set(gather(plan_id, ctx))) != 1:
        exit_together("error: the ranks see different images or VAEs (extraction ids differ); every node "
                      "needs the same --data-path contents and VAE", ctx)

    # 2. rank 0 checks the features path and writes the plan; a fresh run starts there
    error = mode = None
    if ctx.is_main:
        try:
            if os.path.exists(features_path) and not os.path.isdir(features_path):
                raise TinyFusionError(f"--features-path {features_path} is a file; pass a folder")
            lock_folder(features_path, what="feature store", log=logger.info)
            mode = prepare_features_path(features_path, plan, settings.resume)
            os.makedirs(features_path, exist_ok=True)
            for name in stale_temp_files(features_path):
                os.remove(os.path.join(features_path, name))
            if mode == "fresh":
                atomic_write_json(os.path.join(features_path, store.PLAN_FILE), dict(plan, extraction_id=plan_id),
                                  overwrite=False)
        except TinyFusionError as exit_error:
            error = str(exit_error)
    exit_together(error, ctx)
    mode = gather(mode, ctx)[0]

    # 3. which shards are left: all of them, or on --resume those that do not validate. The
    # rank that checked a shard does not matter; the pending ones are dealt out round-robin.
    all_shards = list(range(plan["num_shards"]))
    if mode == "resume":
        checked = unfinished_shards(features_path, plan, plan_id, all_shards[ctx.rank::ctx.world_size])
        pending = sorted(shard for part in gather(checked, ctx) for shard in part)
        logger.info(f"resuming: {plan['num_shards'] - len(pending)} of {plan['num_shards']} shards are complete")
    else:
        pending = all_shards
    manifest_file = os.path.join(features_path, store.MANIFEST_FILE)
    if not pending and os.path.isfile(manifest_file):  # every rank sees the same pending list
        logger.info(f"{features_path} is complete ({plan['num_images']} images); nothing to do")
        cleanup_distributed()
        return
    if ctx.is_main and os.path.isfile(manifest_file):
        os.remove(manifest_file)  # a shard is being redone: the store is not complete until it is
    barrier()

    # 4. encode this rank's shards
    start_time = time.time()
    encoded = encode_shards(pending[ctx.rank::ctx.world_size], samples, plan, plan_id, vae, settings, ctx, logger)
    barrier()  # every rank's shards are on disk
    elapsed = time.time() - start_time
    total_encoded = int(round(all_reduce_mean(encoded, ctx) * ctx.world_size))
    logger.info(f"encoded {total_encoded} images in {elapsed:.1f}s: {total_encoded / max(elapsed, 1e-9):.1f} images/s "
                f"over {ctx.world_size} rank(s)")

    # 5. rank 0 validates the shards and writes the manifest: from now on the store is complete
    if ctx.is_main:
        manifest = write_manifest(features_path, plan, plan_id, run_args, ctx)
        for path in manifest["skipped"][:20]:
            logger.info(f"skipped unreadable image {path}")
        logger.info(f"wrote {features_path}: {manifest['num_samples']} samples of shape "
                    f"{plan['copies']}x{tuple(plan['sample_shape'])} in {plan['num_shards']} shards "
                    f"({manifest['num_skipped']} images skipped)")
    barrier()
    cleanup_distributed()

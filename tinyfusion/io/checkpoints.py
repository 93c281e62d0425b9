"""Every checkpoint read and write of TinyFusion (building a model from one: tinyfusion/families/build.py).

Formats read: the official plain state dict, training checkpoints
`{"model", "ema", "opt", ..., "args": Namespace}` (ema unless --no-ema, else model), state dicts
saved from a DDP wrapper (`module.` prefix) and `.safetensors`. Loading is always
`weights_only=True`: a downloaded `.pt` cannot run code.

Pruned checkpoints are plain state dicts, so the original loading rule still reads them; our
metadata (source model, kept indices, method, groups, ...) rides in the state dict's
`_metadata` attribute, the same place where PyTorch keeps per-module versions, which
`load_state_dict(strict=True)` ignores.

Every checkpoint we write carries a CRC32 of all its tensors (and plain values) in the
`_metadata` of its top-level dict; loading recomputes it, so a file with flipped bytes is an
error naming the file instead of a model with weights of 1e37. Files without it (the official
DiT weights) are checked, as every loaded model is, for non-finite weights and for weights above
MAX_TRAINED_WEIGHT (tinyfusion/io/finite.py), which no trained model has; no checkpoint holding
either is ever written.
"""
import argparse
import glob
import hashlib
import os
import pickle
import re
import zlib
from collections import OrderedDict

import torch

from tinyfusion.io.atomic_files import atomic_path
from tinyfusion.io.downloads import missing_checkpoint_message, resolve_released
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.finite import MAX_TRAINED_WEIGHT, weights_problem  # noqa: F401 (MAX_TRAINED_WEIGHT: re-exported)
from tinyfusion.io.path_hints import did_you_mean

METADATA_KEY = "__tinyfusion__"
CHECKSUM_KEY = "__tinyfusion_checksum__"
CHECKSUM_ALGORITHM = "crc32-v1"  # zlib.crc32 chained over (key path, dtype, shape, raw bytes) in storage order
torch.serialization.add_safe_globals([argparse.Namespace])


# ----------------------------------------------------------------------- reading
def load_checkpoint_file(path):
    """The raw object stored in `path` (.pt/.pth via weights_only torch.load, or .safetensors);
    a bare released file name (DiT-XL-2-256x256.pt, ...) is found or downloaded first."""
    path = resolve_released(os.fspath(path))  # a bare released name: found in pretrained/ or downloaded
    if not os.path.isfile(path):
        raise TinyFusionError(missing_checkpoint_message(path) + did_you_mean(path))
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise TinyFusionError(f"refusing to load {path}: it holds Python objects other than tensors and "
                             f"could run code (weights_only=True); re-save it as a plain state dict") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpointError(f"could not read checkpoint {path} ({type(error).__name__}: {reason}); "
                                     f"the file is truncated or damaged") from None
    verify_checksum(obj, path)
    return obj


def _load_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own SafetensorError (no common base with OSError)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpointError(f"could not read checkpoint {path} as safetensors ({reason}); the file is "
                                     f"truncated, damaged or not a .safetensors file") from None


class CorruptCheckpointError(TinyFusionError):
    """A checkpoint file that cannot be read back intact (truncated, flipped bytes)."""


# ---------------------------------------------------------------------- checksums
def _checksum_items(obj, prefix=""):
    """(key path, value) of every tensor and plain value inside obj, in a fixed order."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _checksum_items(value, f"{prefix}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _checksum_items(value, f"{prefix}/{index}")
    elif isinstance(obj, argparse.Namespace):
        yield from _checksum_items(vars(obj), prefix)
    elif torch.is_tensor(obj) or isinstance(obj, (int, float, str, bool, type(None))):
        yield prefix, obj


def tensor_layout(name, tensor):
    """b"name:dtype:shape", what a weight hash records of a tensor besides its bytes."""
    return f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode()


def tensor_bytes(tensor):
    """A tensor's raw bytes in row-major order (a uint8 NumPy view on the CPU; b"" when it has no elements)."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""


def tensors_checksum(obj):
    """CRC32 over every tensor's raw bytes (and every plain value) of a checkpoint object, with
    each one's key path, dtype and shape; about 2 GB/s on one CPU core."""
    crc = 0
    for path, value in _checksum_items(obj):
        if torch.is_tensor(value):
            crc = zlib.crc32(tensor_bytes(value), zlib.crc32(tensor_layout(path, value), crc))
        else:
            crc = zlib.crc32(f"{path}={value!r}".encode(), crc)
    return f"{crc:08x}"


def state_dict_sha256(state_dict, *, layout=True):
    """sha256 over a state dict's tensors in sorted name order: each one's tensor_layout (with
    layout=False its bare name, the form feature stores record for their VAE), then its bytes.
    Hashing the weights, not the file: torch.save records the file name it wrote to."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(tensor_layout(name, tensor) if layout else name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def with_checksum(obj):
    """obj (a dict) as an OrderedDict whose `_metadata` records tensors_checksum(obj)."""
    tagged = OrderedDict(obj)
    tagged._metadata = OrderedDict(getattr(obj, "_metadata", None) or {})
    tagged._metadata[CHECKSUM_KEY] = {"algorithm": CHECKSUM_ALGORITHM, "digest": tensors_checksum(obj)}
    return tagged


def verify_checksum(obj, path):
    """Recompute the checksum a checkpoint of ours records (if any); CorruptCheckpointError on a mismatch."""
    recorded = (getattr(obj, "_metadata", None) or {}).get(CHECKSUM_KEY) if isinstance(obj, dict) else None
    if not recorded or recorded.get("algorithm") != CHECKSUM_ALGORITHM:
        return False
    actual = tensors_checksum(obj)
    if actual != recorded["digest"]:
        raise CorruptCheckpointError(f"checkpoint {path} is corrupted: its tensors' checksum is {actual}, the file "
                                     f"recorded {recorded['digest']} when it was written; use another copy")
    return True


def check_finite_weights(state_dict, source):
    """Refuse weights holding NaN or inf (a diverged run, a damaged file) or larger than any trained
    model has (tinyfusion/io/finite.py): they would sample black or constant images with exit code 0."""
    problem = weights_problem(state_dict)
    if problem:
        raise TinyFusionError(f"checkpoint {source} holds {problem}; it is damaged or comes from a diverged run")


def read_metadata(obj):
    """Our metadata dict carried by a state dict (or a training checkpoint's model/ema), or None."""
    for candidate in (obj, obj.get("ema") if isinstance(obj, dict) else None,
                      obj.get("model") if isinstance(obj, dict) else None):
        metadata = getattr(candidate, "_metadata", None)
        if isinstance(metadata, dict) and METADATA_KEY in metadata:
            return dict(metadata[METADATA_KEY])
    return None


def extract_state_dict(obj, use_ema=True):
    """The model state dict inside a loaded checkpoint: `ema` (MAR's: `model_ema`) unless use_ema
    is False, else `model`, else the object itself; a `module.` (DDP) prefix is removed."""
    if not isinstance(obj, dict):
        raise TinyFusionError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    if use_ema and ("ema" in obj or "model_ema" in obj):  # ours and DiT's; MAR's checkpoint-last.pth
        state_dict = obj["ema"] if "ema" in obj else obj["model_ema"]
    elif "model" in obj:
        state_dict = obj["model"]
    elif "ema" in obj:
        state_dict = obj["ema"]
    else:
        state_dict = obj
    return {(key[len("module."):] if key.startswith("module.") else key): value
            for key, value in state_dict.items() if torch.is_tensor(value)}


def load_state_dict(path, use_ema=True):
    """(state dict, metadata or None) of a checkpoint file in any supported format."""
    obj = load_checkpoint_file(path)
    return extract_state_dict(obj, use_ema=use_ema), read_metadata(obj)


# ------------------------------------------------------------------ shape inference
def infer_architecture(state_dict):
    """What a DiT state dict's shapes say about it: depth, hidden size, patch size, input size,
    in channels, classes, learned sigma, gated."""
    def shape(key):
        return tuple(state_dict[key].shape) if key in state_dict else None
    if shape("x_embedder.proj.weight") is None:
        return None
    hidden_size, in_channels, patch_size, _ = shape("x_embedder.proj.weight")
    block_ids = {int(m.group(1)) for key in state_dict for m in [re.match(r"blocks\.(\d+)\.", key)] if m}
    num_patches = shape("pos_embed")[1] if shape("pos_embed") else None
    grid = int(round(num_patches ** 0.5)) if num_patches else None
    table_rows = shape("y_embedder.embedding_table.weight")[0] if shape("y_embedder.embedding_table.weight") else None
    out_features = shape("final_layer.linear.weight")[0] if shape("final_layer.linear.weight") else None
    out_channels = out_features // (patch_size * patch_size) if out_features else None
    return dict(depth=len(block_ids), hidden_size=hidden_size, patch_size=patch_size,
                input_size=grid * patch_size if grid else None, in_channels=in_channels,
                num_classes=table_rows - 1 if table_rows else None,
                learn_sigma=out_channels == 2 * in_channels if out_channels else None,
                gated=any(key.startswith("gate_logits") for key in state_dict))


def describe_architecture(arch):
    """'DiT-D14/2 (depth 14, hidden 1152, patch 2, input 32, 1000 classes)' for error messages."""
    from models import DiT_models, FAMILIES
    name = None
    for candidate, build in DiT_models.items():
        depth, hidden, _ = FAMILIES[build.family]
        if build.default_groups is None and (depth, hidden, build.patch_size) == \
                (arch["depth"], arch["hidden_size"], arch["patch_size"]):
            name = candidate
            break
    if name is None:
        for candidate, build in DiT_models.items():
            _, hidden, _ = FAMILIES[build.family]
            if build.default_groups is None and (hidden, build.patch_size) == (arch["hidden_size"], arch["patch_size"]):
                name = f"{candidate} with depth {arch['depth']}"
                break
    name = name or "an unknown DiT"
    return (f"{name} (depth {arch['depth']}, hidden {arch['hidden_size']}, patch {arch['patch_size']}, "
            f"input {arch['input_size']}, {arch['in_channels']} channels, {arch['num_classes']} classes)")


def load_into_model(model, state_dict, model_name, source, flag="--model"):
    """load_state_dict(strict=True) whose failure is one line naming the model the checkpoint
    actually fits and the first missing / unexpected / mismatched keys."""
    own = model.state_dict()
    if getattr(model, "groups", None) is not None and not any(key.startswith("gate_logits") for key in state_dict):
        # a gated model starting from plain weights (e.g. DiT-XL-1-2 from DiT-XL-2-256x256.pt)
        # keeps its freshly initialised gate logits
        state_dict = dict(state_dict, **{key: value for key, value in own.items() if key.startswith("gate_logits")})
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [key for key in own if key in state_dict and tuple(own[key].shape) != tuple(state_dict[key].shape)]
    if missing or unexpected or mismatched:
        arch = infer_architecture(state_dict)
        fits = describe_architecture(arch) if arch else "no DiT (no x_embedder.proj.weight key)"
        details = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("shape mismatch", mismatched)) if keys)
        raise TinyFusionError(f"checkpoint {source} does not fit {flag} {model_name}: it holds {fits}; "
                         f"pass the matching {flag}/--image-size/--num-classes/--vae ({details})")
    check_finite_weights(state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_data_fits(model, sample_shape, num_classes, *, data, model_flags="the model"):
    """One-line TinyFusionError when samples of `sample_shape` labelled 0..num_classes-1 cannot
    feed `model` (another latent geometry, or labels past its classes). `data` names the samples
    in the message ("the features in X"), `model_flags` how the model was asked for."""
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(sample_shape) != expected:
        raise TinyFusionError(f"{data} are {tuple(sample_shape)} but {model_flags} expects {expected}; pass the "
                              f"--vae/--image-size they were made with")
    if num_classes > model.num_classes:
        raise TinyFusionError(f"{data} have labels up to {num_classes - 1} but --num-classes is {model.num_classes}; "
                              f"pass --num-classes {num_classes}")


# ----------------------------------------------------------------------- writing
def with_metadata(state_dict, metadata):
    """A copy of `state_dict` that carries `metadata` (JSON-like values) invisibly to
    load_state_dict; read it back with `read_metadata`."""
    tagged = OrderedDict(state_dict)
    tagged._metadata = OrderedDict(getattr(state_dict, "_metadata", None) or {})
    tagged._metadata[METADATA_KEY] = dict(metadata)
    return tagged


def model_weights_of(obj):
    """The state dicts of model weights inside a checkpoint object: a training checkpoint's
    `model` and `ema`, else the object itself (a plain state dict); not the optimizer state."""
    if "model" in obj or "ema" in obj:
        return [obj[key] for key in ("model", "ema") if isinstance(obj.get(key), dict)]
    return [obj]


def save_checkpoint(obj, path, overwrite=True):
    """torch.save through a temp file + rename: a crash never leaves a truncated checkpoint. A
    dict gets a checksum of its tensors (verified by load_checkpoint_file); model weights that are
    non-finite or above MAX_TRAINED_WEIGHT are refused (nothing is written)."""
    if isinstance(obj, dict):
        for part in model_weights_of(obj):
            problem = weights_problem(part)
            if problem:
                raise TinyFusionError(f"refusing to write {path}: it would hold {problem}")
        obj = with_checksum(obj)
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    return path


def newest_loadable_checkpoint(run_dir, *, fall_back=False, load=None, log=print,
                               fallback_flag="--resume-fallback"):
    """(path, loaded checkpoint) of the newest `checkpoints/NNNNNNN.pt` in run_dir that loads
    intact (checksum verified), or (None, None) when there is none. A corrupt newest one is a
    TinyFusionError naming it and the newest good one, unless fall_back: then that one is
    taken, with a log line. `load` (default load_checkpoint_file) may check more."""
    load = load or load_checkpoint_file
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")), reverse=True)
    if not found:
        return None, None
    problems = []
    for path in found:
        try:
            checkpoint = load(path)
        except CorruptCheckpointError as error:
            problems.append((path, str(error)))
            continue
        if problems and not fall_back:
            raise TinyFusionError(f"the newest checkpoint is corrupt ({problems[0][1]}); the newest good one is "
                                  f"{path}: pass --resume {path} (or add {fallback_flag}) to continue from it")
        for bad, reason in problems:
            log(f"skipping corrupt checkpoint {bad}: {reason}")
        if problems:
            log(f"resuming from {path}, the newest checkpoint that loads intact")
        return path, checkpoint
    raise TinyFusionError(f"no checkpoint in {os.path.join(run_dir, 'checkpoints')} loads intact "
                          f"(newest: {problems[0][1]}); start a new run or restore a copy")


def save_pruned_model(model, path, metadata, overwrite=False):
    """A pruned (plain) DiT as a plain state dict with our metadata riding along."""
    metadata = dict(metadata, depth=model.depth, config=model.config(), model_family=model.model_family)
    return save_checkpoint(with_metadata(model.state_dict(), metadata), path, overwrite=overwrite)

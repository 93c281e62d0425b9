"""Every checkpoint read and write of TinyFusion, and the one function that builds a model for a
script from its flags and (optionally) a checkpoint.

Formats read: the official plain state dict, training checkpoints
`{"model", "ema", "opt", ..., "args": Namespace}` (ema unless --no-ema, else model), state dicts
saved from a DDP wrapper (`module.` prefix) and `.safetensors`. Loading is always
`weights_only=True`: a downloaded `.pt` cannot run code.

Pruned checkpoints are plain state dicts, so the original loading rule still reads them; our
metadata (source model, kept indices, method, groups, ...) rides in the state dict's
`_metadata` attribute, the same place where PyTorch keeps per-module versions, which
`load_state_dict(strict=True)` ignores.
"""
import argparse
import os
import pickle
import re
from collections import OrderedDict

import torch

from tinyfusion.atomic_files import atomic_path
from tinyfusion.errors import TinyFusionError

METADATA_KEY = "__tinyfusion__"
torch.serialization.add_safe_globals([argparse.Namespace])


# ----------------------------------------------------------------------- reading
def load_checkpoint_file(path):
    """The raw object stored in `path` (.pt/.pth via weights_only torch.load, or .safetensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TinyFusionError(f"checkpoint {path} does not exist; check the path (released weights: "
                              f"https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise TinyFusionError(f"refusing to load {path}: it holds Python objects other than tensors and "
                                  f"could run code (weights_only=True); re-save it as a plain state dict") from None
        raise TinyFusionError(f"could not read checkpoint {path} ({type(error).__name__}: {error}); "
                              f"is the file complete?") from None


def read_metadata(obj):
    """Our metadata dict carried by a state dict (or a training checkpoint's model/ema), or None."""
    for candidate in (obj, obj.get("ema") if isinstance(obj, dict) else None,
                      obj.get("model") if isinstance(obj, dict) else None):
        metadata = getattr(candidate, "_metadata", None)
        if isinstance(metadata, dict) and METADATA_KEY in metadata:
            return dict(metadata[METADATA_KEY])
    return None


def extract_state_dict(obj, use_ema=True):
    """The model state dict inside a loaded checkpoint: `ema` unless use_ema is False, else
    `model`, else the object itself; a `module.` (DDP) prefix is removed."""
    if not isinstance(obj, dict):
        raise TinyFusionError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    if use_ema and "ema" in obj:
        state_dict = obj["ema"]
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
    model.load_state_dict(state_dict, strict=True)
    return model


# ----------------------------------------------------------------------- building
def build_model(model_name, image_size=256, num_classes=1000, vae="ema", vae_path=None, ckpt=None,
                use_ema=True, groups=None, flag="--model", **model_kwargs):
    """The DiT every script uses: architecture from --model, latent geometry from --vae and
    --image-size (4 x image/8 for the SD-VAE, 3 x image for --vae none), weights from `ckpt`.

    A checkpoint carrying our pruning metadata sets the depth, so a 6-block student pruned from
    DiT-S/2 is used with `--model DiT-S/2` by every later script. Returns (model, metadata)."""
    from models import DiT_models
    from tinyfusion.vae import latent_geometry_from_flags
    if model_name not in DiT_models:
        raise TinyFusionError(f"unknown {flag} {model_name}; choose one of {', '.join(DiT_models)}")
    channels, latent_size = latent_geometry_from_flags(vae, image_size, vae_path)
    kwargs = dict(input_size=latent_size, num_classes=num_classes, in_channels=channels, **model_kwargs)
    if groups is not None:
        kwargs["groups"] = groups
    state_dict, metadata = (None, None)
    if ckpt:
        state_dict, metadata = load_state_dict(ckpt, use_ema=use_ema)
        if metadata and metadata.get("kept_indices") is not None:
            kwargs["depth"] = len(metadata["kept_indices"])
            kwargs.pop("groups", None)
    try:
        model = DiT_models[model_name](**kwargs)
    except ValueError as error:
        raise TinyFusionError(f"{error}") from None
    if state_dict is not None:
        load_into_model(model, state_dict, model_name, ckpt, flag)
    return model, metadata


# ----------------------------------------------------------------------- writing
def with_metadata(state_dict, metadata):
    """A copy of `state_dict` that carries `metadata` (JSON-like values) invisibly to
    load_state_dict; read it back with `read_metadata`."""
    tagged = OrderedDict(state_dict)
    tagged._metadata = OrderedDict(getattr(state_dict, "_metadata", None) or {})
    tagged._metadata[METADATA_KEY] = dict(metadata)
    return tagged


def save_checkpoint(obj, path, overwrite=True):
    """torch.save through a temp file + rename: a crash never leaves a truncated checkpoint."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    return path


def save_pruned_model(model, path, metadata, overwrite=False):
    """A pruned (plain) DiT as a plain state dict with our metadata riding along."""
    metadata = dict(metadata, depth=model.depth, config=model.config())
    return save_checkpoint(with_metadata(model.state_dict(), metadata), path, overwrite=overwrite)

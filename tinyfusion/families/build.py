"""The one function that builds a model for a script from its flags and (optionally) a
checkpoint, and the checks that the checkpoint holds weights of --model's family.

DiT and SiT checkpoints have the same keys and shapes, so the family is told by our metadata
(`model_family`), else a training checkpoint's args.model, else the released file names, else
the weights themselves (`family_from_weights`); a checkpoint of the other family is refused in
one line naming the --model to pass.
"""
import os
import re

import torch

from tinyfusion.errors import TinyFusionError
from tinyfusion.families import REGISTRY, entry_for_model, entry_named, twin_entry, twin_name
from tinyfusion.io.checkpoints import extract_state_dict, infer_architecture, load_checkpoint_file, load_into_model, \
    read_metadata

RELEASED_NAME = re.compile(r"(?P<family>[A-Za-z]+)-XL-2-\d+x\d+\.pt")  # DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt


def unknown_model_message(model_name, flag="--model"):
    from models import DiT_models, MAR_models, SiT_models
    return (f"unknown {flag} {model_name}; choose one of {', '.join(DiT_models)} (or their SiT- twins, "
            f"{', '.join(list(SiT_models)[:2])}, ...) or {', '.join(MAR_models)}")


def build_model(model_name, image_size=256, num_classes=1000, vae="ema", vae_path=None, ckpt=None,
                use_ema=True, groups=None, flag="--model", **model_kwargs):
    """The model every script uses: architecture from --model, latent geometry from --vae and
    --image-size (4 x image/8 for the SD-VAE, 3 x image for --vae none), weights from `ckpt`.

    A checkpoint carrying our pruning metadata sets the depth, so a 6-block student pruned from
    DiT-S/2 is used with `--model DiT-S/2` by every later script. Returns (model, metadata)."""
    from models import ALL_MODELS
    from tinyfusion.io.vae import latent_geometry_from_flags
    if model_name not in ALL_MODELS:
        raise TinyFusionError(unknown_model_message(model_name, flag))
    channels, latent_size = latent_geometry_from_flags(vae, image_size, vae_path)
    kwargs = dict(input_size=latent_size, num_classes=num_classes, in_channels=channels, **model_kwargs)
    if groups is not None:
        kwargs["groups"] = groups
    state_dict, metadata = (None, None)
    if ckpt:
        obj = load_checkpoint_file(ckpt)
        state_dict, metadata = extract_state_dict(obj, use_ema=use_ema), read_metadata(obj)
        kwargs.update(family_checked_kwargs(obj, metadata, state_dict, ckpt, model_name, flag))
        if metadata and metadata.get("kept_indices") is not None:
            kwargs.update(pruned_depths(model_name, metadata, ckpt))
            kwargs.pop("groups", None)
    try:
        model = ALL_MODELS[model_name](**kwargs)
    except ValueError as error:
        raise TinyFusionError(f"{error}") from None
    if state_dict is not None:
        load_into_model(model, state_dict, model_name, ckpt, flag)
    return model, metadata


def pruned_depths(model_name, metadata, source):
    """The depth settings (DiT: depth; MAR: encoder and decoder depth) a pruned checkpoint's
    metadata gives --model's architecture."""
    from models import ALL_MODELS
    try:
        return ALL_MODELS[model_name].model_class.saved_depths(metadata)
    except ValueError as error:
        raise TinyFusionError(f"{source}: {error}") from None


def checkpoint_model_family(obj, metadata, path):
    """The family name a checkpoint states: our metadata, else a training checkpoint's
    args.model, else the released file names; None when nothing says."""
    if metadata and metadata.get("model_family"):
        return metadata["model_family"]
    args = obj.get("args") if isinstance(obj, dict) else None
    name = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)  # ours: dict; original: Namespace
    if isinstance(name, str):
        # ours / DiT's names ("DiT-XL/2"), or the original's lower-case ones (MAR's "mar_base")
        entry = next((entry for entry in REGISTRY
                      if name.startswith((entry.model_prefix, entry.model_prefix.lower().replace("-", "_")))), None)
        if entry is not None:
            return entry.name
    released = RELEASED_NAME.fullmatch(os.path.basename(os.fspath(path)))
    return released["family"] if released and entry_named(released["family"]) else None


def family_checked_kwargs(obj, metadata, state_dict, ckpt, model_name, flag):
    """Refuses a checkpoint of another family than --model's (told by checkpoint_model_family,
    else the weights: family_from_weights); a SiT state dict without the unused sigma half
    (p*p*C outputs) gets learn_sigma=False. Returns extra model kwargs."""
    wanted = entry_for_model(model_name)
    family, reason = checkpoint_model_family(obj, metadata, ckpt), None
    if family is None:
        family, reason = family_from_weights(state_dict)
    other = twin_entry(wanted)
    if family is not None and family != wanted.name:
        holder = entry_named(family)
        if holder is not None and holder.layout == wanted.layout:
            advice = f"pass {flag} {twin_name(model_name, holder)} (and the matching sampler)"
        else:
            advice = f"pass a {flag} of the {family} family ({holder.model_prefix if holder else family}...)"
        raise TinyFusionError(f"checkpoint {ckpt} holds {family} weights{f' ({reason})' if reason else ''} but {flag} "
                              f"{model_name} is a {wanted.name}; {advice}")
    if family is None and other is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {ckpt} does not say whether it holds {wanted.name} or {other.name} weights (a plain state dict "
              f"with an untrained final layer); loaded as a {wanted.name} ({flag} {model_name}); if it is a "
              f"{other.name}, pass {flag} {twin_name(model_name, other)}")
    arch = infer_architecture(state_dict) if not wanted.trains_sigma else None
    return {"learn_sigma": False} if arch and arch["learn_sigma"] is False else {}


def family_from_weights(state_dict):
    """(family name, why) from a state dict's final layer, or (None, None) when it cannot tell.
    Both families keep p*p*2C outputs (channel fastest), but only a family whose loss trains the
    sigma half (DiT's diffusion loss, channels C..2C-1) moves it: a SiT drops it, so its rows stay
    exactly at their zero initialisation while the mean half trains. A final layer of p*p*C
    outputs is a SiT built without the sigma half. An untrained final layer fits both."""
    if "z_proj.weight" in state_dict and "diffloss.net.input_proj.weight" in state_dict:
        return "MAR", "it has MAR's token projection and diffusion head"
    weight, bias = state_dict.get("final_layer.linear.weight"), state_dict.get("final_layer.linear.bias")
    proj = state_dict.get("x_embedder.proj.weight")
    if weight is None or bias is None or proj is None or proj.dim() != 4:
        return None, None
    trains_sigma = next(entry.name for entry in REGISTRY if entry.trains_sigma and entry.layout == "dit")
    ignores_sigma = next(entry.name for entry in REGISTRY if not entry.trains_sigma and entry.layout == "dit")
    channels, patch_area = proj.shape[1], proj.shape[2] * proj.shape[3]
    out_channels = weight.shape[0] // patch_area
    if out_channels == channels:
        return ignores_sigma, f"its final layer has no sigma half, which only a {ignores_sigma} is built without"
    if out_channels != 2 * channels:
        return None, None
    rows = torch.cat([weight.reshape(patch_area, out_channels, -1), bias.reshape(patch_area, out_channels, 1)], 2)
    if bool(rows[:, channels:].any()):
        return trains_sigma, (f"the sigma half of its final layer is trained, which only a {trains_sigma}'s "
                              f"diffusion loss does")
    if bool(rows[:, :channels].any()):
        return ignores_sigma, (f"the sigma half of its final layer is exactly zero while the rest is trained: a "
                               f"{ignores_sigma} never trains it")
    return None, None

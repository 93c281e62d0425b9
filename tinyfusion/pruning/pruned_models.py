"""What the three pruning scripts share: building the source model at its checkpoint's depth,
validating kept indices, and saving a pruned checkpoint with its metadata (the BI score and its
calibration data: block_importance.py).

A pruned checkpoint is a plain state dict of the shallow DiT (blocks renumbered 0..K-1), loadable
by the original rule, with our metadata riding along (checkpoints.save_pruned_model):
kept_indices and source_depth (relative to the model it was pruned from), root_kept_indices and
root_depth (relative to the unpruned model at the start of the chain), groups, method
("learnable" / "bi-score" / "index"), source_model, source_checkpoint, confidences, scores, steps.
"""
import os

from tinyfusion.io.checkpoints import (extract_state_dict, infer_architecture, load_checkpoint_file,
                                       load_into_model, read_metadata, save_pruned_model)
from tinyfusion.families.build import build_model, family_checked_kwargs, unknown_model_message
from models import ALL_MODELS, prune_to_kept_blocks, validate_kept_indices  # noqa: F401
from tinyfusion.errors import TinyFusionError


# ----------------------------------------------------------------------- checks
def check_output_path(path, overwrite=False):
    """Refuse (one line) to replace an existing result unless --overwrite; called before any
    long computation so a finished run is not thrown away at its end."""
    if path and os.path.exists(path) and not overwrite:
        raise TinyFusionError(f"{path} already exists; pass --overwrite to replace it or choose another --save-model")


# ----------------------------------------------------------------------- models
def plain_name(model_name):
    """The ungated name whose weights a gated config of --model starts from (DiT-XL-1-2 ->
    DiT-XL/2, SiT-XL-1-2 -> SiT-XL/2); one line if unknown."""
    if model_name not in ALL_MODELS:
        raise TinyFusionError(unknown_model_message(model_name))
    build = ALL_MODELS[model_name]
    return f"{build.model_family}-{build.family}/{build.patch_size}"


def load_source_model(model_name, checkpoint, image_size=256, num_classes=1000, vae="ema", vae_path=None,
                      groups=None, use_ema=True):
    """(model, metadata): `model_name`'s architecture at the depth of the DiT in `checkpoint`
    (so DiT-XL/2 also reads a 14-block file and a gated config takes a custom --groups), with the
    checkpoint's weights; a gated model keeps its freshly initialised gate logits. `families`:
    those the calling script supports; a checkpoint of the other family than --model is refused."""
    obj = load_checkpoint_file(checkpoint)
    state_dict, metadata = extract_state_dict(obj, use_ema=use_ema), read_metadata(obj)
    arch = infer_architecture(state_dict)
    kwargs = {"depth": arch["depth"]} if arch and arch["depth"] else {}
    kwargs.update(family_checked_kwargs(obj, metadata, state_dict, checkpoint, model_name, "--model"))
    model, _ = build_model(model_name, image_size, num_classes, vae, vae_path, groups=groups,
                           **kwargs)
    load_into_model(model, state_dict, model_name, checkpoint)
    return model, metadata


def source_lineage(source_metadata, kept_indices):
    """The root-frame lineage of a model pruned to `kept_indices` of the model `source_metadata`
    describes: root_kept_indices (the kept blocks numbered as in the root, the unpruned model the
    chain started from) and root_depth. Empty when the source is itself a root (save_pruned then
    records the source as the root). A source written before root_depth existed gives None."""
    metadata = source_metadata or {}
    if metadata.get("root_kept_indices") is not None:
        parent_root, root_depth = metadata["root_kept_indices"], metadata.get("root_depth")
    elif metadata.get("original_kept_indices") is not None:  # older files: the root's depth was not recorded
        parent_root, root_depth = metadata["original_kept_indices"], None
    elif metadata.get("kept_indices") is not None:
        parent_root, root_depth = metadata["kept_indices"], metadata.get("source_depth")
    else:
        return {}
    return {"root_kept_indices": [int(parent_root[i]) for i in kept_indices], "root_depth": root_depth}


def save_pruned(source_model, kept_indices, path, metadata, overwrite=False):
    """Prune `source_model` to `kept_indices` and save it with `metadata` (atomic; refuses to
    replace an existing file unless overwrite). Returns the pruned model. kept_indices and
    source_depth are in the frame of the parent (`source_model`), root_kept_indices and
    root_depth in the frame of the root (the parent itself unless it was pruned)."""
    kept = [int(i) for i in kept_indices]
    metadata = dict(metadata, kept_indices=kept, source_depth=source_model.depth)
    if metadata.get("root_kept_indices") is None:
        metadata.update(root_kept_indices=kept, root_depth=source_model.depth)
    pruned = prune_to_kept_blocks(source_model, kept)
    save_pruned_model(pruned, path, metadata, overwrite=overwrite)
    return pruned


def kept_indices_in_frame(metadata, teacher_depth):
    """(kept indices numbered as in a `teacher_depth`-block teacher, which frame) from a pruned
    student's metadata. A student pruned twice (28 -> 14 -> 7) records its kept blocks relative
    to its parent (14 blocks) and to the root (28): the teacher's depth says which applies.
    TinyFusionError (one line) when no recorded frame has the teacher's depth."""
    metadata = metadata or {}
    if metadata.get("kept_indices") is None:
        raise TinyFusionError("the student checkpoint records no kept indices, so its blocks cannot be aligned with "
                              "the teacher's; pass --kd-layer-map \"0:1,1:3,...\"")
    frames = []
    if metadata.get("root_kept_indices") is not None and metadata.get("root_depth") is not None:
        frames.append((f"relative to the {metadata['root_depth']}-block root", metadata["root_depth"],
                       metadata["root_kept_indices"]))
    if metadata.get("source_depth") is not None:
        frames.append((f"relative to the {metadata['source_depth']}-block model it was pruned from",
                       metadata["source_depth"], metadata["kept_indices"]))
    matches = [frame for frame in frames if frame[1] == teacher_depth]
    if not matches or any(list(frame[2]) != list(matches[0][2]) for frame in matches):
        known = " and ".join(f"{depth} blocks" for _, depth, _ in frames) or "no model depth"
        raise TinyFusionError(f"the student's kept indices are recorded for {known}, not for the {teacher_depth}-block "
                              f"teacher, so which teacher blocks it kept is unknown; distil from the model it was "
                              f"pruned from or pass --kd-layer-map \"0:1,1:3,...\"")
    frame, _, kept = matches[0]
    return [int(i) for i in kept], frame


# ----------------------------------------------------------------------- schedules
def linear_schedule(start, end, step, total_steps):
    """`start` at step 0, `end` at the last step (total_steps - 1), linear in between."""
    if total_steps <= 1:
        return float(start)
    return float(start) + (float(end) - float(start)) * min(step, total_steps - 1) / (total_steps - 1)

"""What the three pruning scripts share: building the source model at its checkpoint's depth,
validating kept indices, reading a decision out of gate logits, the BI score (ShortGPT) on
calibration latents, and saving a pruned checkpoint with its metadata.

A pruned checkpoint is a plain state dict of the shallow DiT (blocks renumbered 0..K-1), loadable
by the original rule, with our metadata riding along (checkpoints.save_pruned_model):
kept_indices and source_depth (relative to the model it was pruned from), root_kept_indices and
root_depth (relative to the unpruned model at the start of the chain), groups, method
("learnable" / "bi-score" / "index"), source_model, source_checkpoint, confidences, scores, steps.
"""
import os

import torch
import torch.nn.functional as F

from tinyfusion.io.checkpoints import (check_data_fits, extract_state_dict, infer_architecture, load_checkpoint_file,
                                       load_into_model, read_metadata, save_pruned_model)
from tinyfusion.families.build import build_model, family_checked_kwargs, unknown_model_message
from models import ALL_MODELS, prune_to_kept_blocks, validate_kept_indices  # noqa: F401
from tinyfusion.flags import CALIBRATIONS  # the --calibration choices, listed there so that --help needs no torch
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


# ----------------------------------------------------------------------- BI score
@torch.no_grad()
def block_input_output_similarity(model, x_t, t, y):
    """(depth,) sum over the batch of each block's cosine similarity between its input and output
    hidden states (over channels, averaged over tokens), read with forward hooks so it measures
    exactly what the model's own forward computes."""
    sums = torch.zeros(model.depth, dtype=torch.float64)

    def make_hook(index):
        def hook(module, inputs, output):
            similarity = F.cosine_similarity(inputs[0].float(), output.float(), dim=-1)  # (B, T)
            sums[index] += similarity.mean(dim=1).double().sum().cpu()
        return hook

    handles = [block.register_forward_hook(make_hook(index)) for index, block in enumerate(model.blocks)]
    try:
        model(x_t, t, y)
    finally:
        for handle in handles:
            handle.remove()
    return sums


@torch.no_grad()
def bi_scores(model, latents, labels, *, family, calibration="clean", num_timesteps=250, batch_size=16, seed=0,
              progress=False):
    """Per-block mean input/output cosine similarity (ShortGPT's Block Influence is 1 minus it)
    over calibration `latents` (N, C, H, W) with their true `labels`, in eval mode.

    - "clean" (the original TinyFusion procedure): the latents as they are, with per batch
      t ~ U{0..num_timesteps-1} (the original draws t below the respaced step count, 250 by
      default) passed directly to the model.
    - "noised" (our variant): x_t = q_sample(latents, t, noise) with t ~ U{0..999} on the
      1000-step process, the model seeing the noisy input it sees when sampling.

    Per batch of `batch_size`: similarity over channels, averaged over tokens and samples; the
    result is the mean over batches. t (and, noised, then the noise) of each batch are drawn
    in that order from a CPU generator seeded with `seed`.

    `family` (tinyfusion.families) draws the inputs: the above for a DiT; a SiT is calibrated only
    "noised", on its own interpolant: per batch (t, x0) = transport.sample_time_and_noise(generator)
    (t uniform on the training interval), x_t = alpha_t x1 + sigma_t x0, the model called with that
    t in [0, 1]."""
    from tqdm import tqdm
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; use one of {', '.join(CALIBRATIONS)}")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    batch_means = []
    for start in tqdm(range(0, len(latents), batch_size), disable=not progress, desc="BI score"):
        x = latents[start:start + batch_size].float()
        x, t = family.calibration_inputs(x, generator, calibration=calibration, num_timesteps=num_timesteps)
        sums = block_input_output_similarity(model, x.to(device), t.to(device),
                                             labels[start:start + batch_size].to(device))
        batch_means.append(sums / len(x))
    model.train(was_training)
    return torch.stack(batch_means).mean(dim=0).tolist()


def select_by_bi_score(similarities, n_pruned):
    """Sorted kept indices after removing the `n_pruned` blocks whose output is most similar to
    their input (they change the least); the last block is never removed."""
    depth = len(similarities)
    if not 0 <= n_pruned <= depth - 1:
        raise ValueError(f"--n-pruned {n_pruned} must be between 0 and {depth - 1} for a model with {depth} blocks "
                         f"(the last block is always kept)")
    candidates = sorted(range(depth - 1), key=lambda j: (-similarities[j], j))
    removed = set(candidates[:n_pruned])
    return [j for j in range(depth) if j not in removed]


# ----------------------------------------------------------------------- calibration data
def calibration_latents(nsamples, seed, features_path=None, data_path=None, image_size=256, vae=None,
                        batch_size=16, device="cpu", random_flip=True):
    """(latents (N, C, H, W) float32 on the CPU, labels (N,)): `nsamples` random samples of a
    feature store, or of an ImageFolder center-cropped and encoded with `vae` (None = pixel
    space; an SD-VAE latent is latent_dist.sample() * 0.18215) in batches.

    From a CPU generator seeded with `seed`: the subset (randperm of the data set, first
    `nsamples`), then one horizontal-flip draw per sample (rand < 0.5) when `random_flip` (the
    original's RandomHorizontalFlip: the image is flipped before encoding; a feature store gives
    its stored flip's latent)."""
    import tinyfusion.io.vae as vae_io
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dataset, flipped = _calibration_dataset(features_path, data_path, image_size, seed)
    count = min(nsamples, len(dataset))
    order = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    flips = (torch.rand(count, generator=generator) < 0.5).tolist() if random_flip else [False] * count
    latents, labels = [], []
    for start in range(0, count, batch_size):
        rows = range(start, min(start + batch_size, count))
        if features_path:
            items = [(flipped if flips[row] else dataset)[order[row]] for row in rows]
            x = torch.stack([torch.as_tensor(item[0]) for item in items]).float()
        else:
            items = [dataset[order[row]] for row in rows]
            x = torch.stack([torch.flip(item[0], dims=[-1]) if flips[row] else item[0]
                             for row, item in zip(rows, items)]).float()
            x = vae_io.encode(vae, x.to(device)).float().cpu()
        latents.append(x)
        labels.append(torch.tensor([int(item[1]) for item in items], dtype=torch.int64))
    return torch.cat(latents), torch.cat(labels)


def check_latents_fit(latents, labels, model):
    """One-line TinyFusionError when calibration latents/labels cannot feed `model` (geometry, classes)."""
    check_data_fits(model, latents.shape[1:], int(labels.max()) + 1, data="the calibration latents")


def _calibration_dataset(features_path, data_path, image_size, seed):
    """(data set, its flipped twin or None): a feature store read as stored and as its flips, or
    an ImageFolder; a one-line TinyFusionError when there is none."""
    if features_path:
        from tinyfusion.io.feature_store import open_feature_dataset
        dataset = open_feature_dataset(features_path, flip_prob=0.0, seed=seed)
        flipped = open_feature_dataset(features_path, flip_prob=1.0, seed=seed)
    elif data_path:
        from tinyfusion.io.image_folder import image_folder
        try:
            dataset, flipped = image_folder(data_path, image_size), None
        except ValueError as error:
            raise TinyFusionError(str(error)) from None
    else:
        raise TinyFusionError("calibration needs real images: pass --data-path (an ImageFolder) or --features-path")
    if len(dataset) == 0:
        raise TinyFusionError("the calibration data set is empty")
    return dataset, flipped

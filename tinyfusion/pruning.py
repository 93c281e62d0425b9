"""What the three pruning scripts share: building the source model at its checkpoint's depth,
validating kept indices, reading a decision out of gate logits, the BI score (ShortGPT) on
calibration latents, and saving a pruned checkpoint with its metadata.

A pruned checkpoint is a plain state dict of the shallow DiT (blocks renumbered 0..K-1), loadable
by the original rule, with our metadata riding along (checkpoints.save_pruned_model):
kept_indices, groups, method ("learnable" / "bi-score" / "index"), source_model,
source_checkpoint, confidences, scores, steps.
"""
import os

import torch
import torch.nn.functional as F

from tinyfusion.checkpoints import build_model, infer_architecture, load_into_model, load_state_dict, save_pruned_model
from models import DiT_models, candidate_masks, plain_model_name, prune_to_kept_blocks


# ----------------------------------------------------------------------- checks
def check_output_path(path, overwrite=False):
    """Refuse (one line) to replace an existing result unless --overwrite; called before any
    long computation so a finished run is not thrown away at its end."""
    if path and os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: {path} already exists; pass --overwrite to replace it or choose another --save-model")


def validate_kept_indices(kept_indices, depth):
    """ValueError (one line) unless `kept_indices` is a non-empty, sorted list of distinct block
    indices in 0..depth-1."""
    if not isinstance(kept_indices, (list, tuple)) or not all(isinstance(i, int) for i in kept_indices):
        raise ValueError(f"kept indices must be a list of integers such as [0, 2, 4], got {kept_indices!r}")
    if not kept_indices:
        raise ValueError("kept indices are empty; keep at least one block, e.g. \"[0, 2, 4]\"")
    outside = [i for i in kept_indices if not 0 <= i < depth]
    if outside:
        raise ValueError(f"kept indices {outside} are out of range for a model with {depth} blocks (valid: 0..{depth - 1})")
    duplicates = sorted({i for i in kept_indices if list(kept_indices).count(i) > 1})
    if duplicates:
        raise ValueError(f"kept indices repeat {duplicates}; list every kept block once")
    if list(kept_indices) != sorted(kept_indices):
        raise ValueError(f"kept indices {list(kept_indices)} are not sorted; write them in increasing order, "
                         f"e.g. {sorted(kept_indices)}")
    return list(kept_indices)


# ----------------------------------------------------------------------- models
def plain_name(model_name):
    """The ungated architecture name of --model (DiT-XL-1-2 -> DiT-XL/2); one line if unknown."""
    if model_name not in DiT_models:
        raise SystemExit(f"error: unknown --model {model_name}; choose one of {', '.join(DiT_models)}")
    return plain_model_name(model_name)


def load_source_model(model_name, checkpoint, image_size=256, num_classes=1000, vae="ema", vae_path=None,
                      groups=None, use_ema=True):
    """(model, metadata): `model_name`'s architecture at the depth of the DiT in `checkpoint`
    (so DiT-XL/2 also reads a 14-block file and a gated config takes a custom --groups), with the
    checkpoint's weights; a gated model keeps its freshly initialised gate logits."""
    state_dict, metadata = load_state_dict(checkpoint, use_ema=use_ema)
    arch = infer_architecture(state_dict)
    kwargs = {"depth": arch["depth"]} if arch and arch["depth"] else {}
    model, _ = build_model(model_name, image_size, num_classes, vae, vae_path, groups=groups, **kwargs)
    load_into_model(model, state_dict, model_name, checkpoint)
    return model, metadata


def source_lineage(source_metadata, kept_indices):
    """Metadata that tracks a model pruned twice back to the original blocks."""
    original = (source_metadata or {}).get("original_kept_indices") or (source_metadata or {}).get("kept_indices")
    if not original:
        return {}
    return {"original_kept_indices": [int(original[i]) for i in kept_indices]}


def save_pruned(source_model, kept_indices, path, metadata, overwrite=False):
    """Prune `source_model` to `kept_indices` and save it with `metadata` (atomic; refuses to
    replace an existing file unless overwrite). Returns the pruned model."""
    pruned = prune_to_kept_blocks(source_model, kept_indices)
    save_pruned_model(pruned, path, dict(metadata, kept_indices=[int(i) for i in kept_indices]), overwrite=overwrite)
    return pruned


# ----------------------------------------------------------------------- gate decisions
def linear_schedule(start, end, step, total_steps):
    """`start` at step 0, `end` at the last step (total_steps - 1), linear in between (SPEC 6)."""
    if total_steps <= 1:
        return float(start)
    return float(start) + (float(end) - float(start)) * min(step, total_steps - 1) / (total_steps - 1)


def gate_decision(groups, logits, scaling):
    """(kept_indices, choices, confidences) of gate logits (one 1-D tensor per group): per group
    the argmax candidate and max softmax(logits * scaling). Takes the logits explicitly so the
    decision can be read from the EMA without touching the model."""
    kept, choices, confidences, offset = [], [], [], 0
    for (keep, group_size), group_logits in zip(groups, logits):
        group_logits = group_logits.detach().float().cpu()
        choice = int(group_logits.argmax())
        mask = candidate_masks(keep, group_size)[choice]
        kept += [offset + int(j) for j in torch.nonzero(mask).flatten()]
        choices.append(choice)
        confidences.append(float(torch.softmax(group_logits * scaling, dim=0).max()))
        offset += group_size
    return kept, choices, confidences


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
def bi_scores(model, latents, labels, diffusion, batch_size=16, seed=0, progress=False):
    """Per-block mean input/output cosine similarity (ShortGPT's Block Influence is 1 minus it)
    over calibration `latents` (N, C, H, W) noised at t ~ U{0..T-1}, drawn from `seed`."""
    from tqdm import tqdm
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    totals = torch.zeros(model.depth, dtype=torch.float64)
    starts = range(0, len(latents), batch_size)
    for start in tqdm(starts, disable=not progress, desc="BI score"):
        x0 = latents[start:start + batch_size]
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = diffusion.q_sample(x0.float(), t, noise=noise)
        totals += block_input_output_similarity(model, x_t.to(device), t.to(device),
                                                labels[start:start + batch_size].to(device))
    model.train(was_training)
    return (totals / len(latents)).tolist()


def select_by_bi_score(similarities, n_pruned):
    """Sorted kept indices after removing the `n_pruned` blocks whose output is most similar to
    their input (they change the least); the last block is never removed (SPEC 7)."""
    depth = len(similarities)
    if not 0 <= n_pruned <= depth - 1:
        raise ValueError(f"--n-pruned {n_pruned} must be between 0 and {depth - 1} for a model with {depth} blocks "
                         f"(the last block is always kept)")
    candidates = sorted(range(depth - 1), key=lambda j: (-similarities[j], j))
    removed = set(candidates[:n_pruned])
    return [j for j in range(depth) if j not in removed]


# ----------------------------------------------------------------------- calibration data
def calibration_latents(nsamples, seed, features_path=None, data_path=None, image_size=256, vae=None,
                        batch_size=16, device="cpu"):
    """(latents (N, C, H, W) float32 on the CPU, labels (N,)): `nsamples` random samples
    (seeded) of a feature store, or of an ImageFolder center-cropped and encoded with `vae`
    (None = pixel space) in batches."""
    from tinyfusion import vae as vae_io
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if features_path:
        from tinyfusion.feature_store import open_feature_dataset
        dataset = open_feature_dataset(features_path, flip_prob=0.0, seed=seed)
    elif data_path:
        from tinyfusion.image_folder import image_folder
        try:
            dataset = image_folder(data_path, image_size)
        except ValueError as error:
            raise SystemExit(str(error)) from None
    else:
        raise SystemExit("error: calibration needs data: pass --data-path (an ImageFolder) or --features-path")
    if len(dataset) == 0:
        raise SystemExit("error: the calibration data set is empty")
    count = min(nsamples, len(dataset))
    order = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    latents, labels = [], []
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in order[start:start + batch_size]]
        x = torch.stack([torch.as_tensor(item[0]) for item in items]).float()
        if not features_path:
            x = vae_io.encode(vae, x.to(device)).float().cpu()
        latents.append(x)
        labels.append(torch.tensor([int(item[1]) for item in items], dtype=torch.int64))
    return torch.cat(latents), torch.cat(labels)

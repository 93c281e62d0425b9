"""Measurements of the reproduction study (reproduce.py) that are not a script of their own: the
pattern space of a gated model, a fixed held-out set of (image, label, t, noise) triples and a
model's diffusion loss on it, and per-block activation statistics.

The held-out loss evaluates every candidate model on exactly the same triples, so differences
between candidates are not buried under the noise of random timesteps (the diffusion loss of one
batch varies by far more than the gaps between good sub-networks)."""
import itertools

import torch

from diffusion import create_diffusion
from diffusion.distillation import outlier_mask


def pattern_subsets(groups):
    """Every kept-index list a gated model with `groups` ([[N, M], ...]) can choose, in the order
    of itertools.product over the groups' candidates (each in itertools.combinations order)."""
    per_group, offset = [], 0
    for keep, size in groups:
        per_group.append([[offset + index for index in combination]
                          for combination in itertools.combinations(range(size), keep)])
        offset += size
    return [sum(choice, []) for choice in itertools.product(*per_group)]


def make_heldout_triples(dataset, count, seed):
    """{"x", "y", "t", "noise"}: `count` samples of `dataset` (a FeatureDataset, flips off) with a
    timestep and a noise draw each, all from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:count]
    pairs = [dataset[int(index)] for index in indices]
    x = torch.stack([pair[0] for pair in pairs])
    y = torch.stack([pair[1] for pair in pairs])
    t = torch.randint(0, 1000, (len(indices),), generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    return {"x": x, "y": y, "t": t, "noise": noise, "indices": indices}


@torch.no_grad()
def heldout_loss(model, triples, batch_size=512):
    """Mean diffusion loss (mse + vb, DiT's training objective) and mean mse of `model` (eval
    mode: no label drops) on the fixed triples."""
    diffusion = create_diffusion("")
    model.eval()
    totals = {"loss": 0.0, "mse": 0.0}
    count = len(triples["x"])
    for start in range(0, count, batch_size):
        part = slice(start, start + batch_size)
        terms = diffusion.training_losses(model, triples["x"][part], triples["t"][part], dict(y=triples["y"][part]),
                                          noise=triples["noise"][part])
        for name in totals:
            totals[name] += float(terms[name].double().sum())
    return {name: total / count for name, total in totals.items()}


@torch.no_grad()
def activation_statistics(model, triples, mask_sigma=2.0, batch_size=256):
    """Per block of `model`, over the hidden states (B, T, D) of the noised held-out images:
    max |h|, the overall std, their ratio, and the share of entries the Masked KD outlier mask
    (|h - mu| >= k * std per sample, k = mask_sigma) removes."""
    diffusion = create_diffusion("")
    model.eval()
    depth = model.depth
    stats = [{"max_abs": 0.0, "sum": 0.0, "sum_sq": 0.0, "count": 0, "masked": 0} for _ in range(depth)]
    for start in range(0, len(triples["x"]), batch_size):
        part = slice(start, start + batch_size)
        x_t = diffusion.q_sample(triples["x"][part], triples["t"][part], noise=triples["noise"][part])
        _, hiddens = model(x_t, triples["t"][part], triples["y"][part], hidden_indices=list(range(depth)))
        for block, hidden in zip(stats, hiddens):
            hidden = hidden.double()
            block["max_abs"] = max(block["max_abs"], float(hidden.abs().max()))
            block["sum"] += float(hidden.sum())
            block["sum_sq"] += float((hidden ** 2).sum())
            block["count"] += hidden.numel()
            block["masked"] += int((outlier_mask(hidden, mask_sigma) == 0).sum())
    rows = []
    for index, block in enumerate(stats):
        mean = block["sum"] / block["count"]
        std = max(block["sum_sq"] / block["count"] - mean ** 2, 0.0) ** 0.5
        rows.append({"block": index, "max_abs": block["max_abs"], "std": std,
                     "max_over_std": block["max_abs"] / std if std > 0 else float("nan"),
                     "masked_share": block["masked"] / block["count"]})
    return rows

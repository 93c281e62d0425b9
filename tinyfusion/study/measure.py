"""Measurements of the reproduction study (reproduce.py) that are not a script of their own: the
pattern space of a gated model, a fixed held-out set of (image, label, t, noise) triples and a
model's diffusion loss on it, and per-block activation statistics.

The held-out loss evaluates every candidate model on exactly the same triples, so differences
between candidates are not buried under the noise of random timesteps (the diffusion loss of one
batch varies by far more than the gaps between good sub-networks)."""
import itertools

import torch

from diffusion import create_diffusion
from tinyfusion.study.activations import block_statistics


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
    model.eval()
    x_t = create_diffusion("").q_sample(triples["x"], triples["t"], noise=triples["noise"])
    rows = []
    for index, block in enumerate(block_statistics(model, x_t, triples["t"], triples["y"], batch_size=batch_size,
                                                   mask_sigma=mask_sigma)):
        summary = block.summary(index)
        max_abs, std = summary["topk_abs"][0], summary["std"]
        rows.append({"block": index, "max_abs": max_abs, "std": std,
                     "max_over_std": max_abs / std if std > 0 else float("nan"),
                     "masked_share": summary["masked_share"]})
    return rows


# ---------------------------------------------------------------------- the study's verdicts
def teacher_gate(teacher_loss, student_losses, sigmas):
    """Does the teacher beat every student by at least `sigmas` standard deviations (over that
    student's seeds) of the student's loss? student_losses: {name: [loss per seed]}. Returns
    {"teacher", "students": {name: {"mean", "std", "margin", "needed"}}, "passed", "summary"}."""
    import numpy as np
    students, failed = {}, []
    for name, losses in student_losses.items():
        losses = np.asarray(losses, dtype=np.float64)
        std = float(losses.std(ddof=1)) if len(losses) > 1 else float("nan")
        margin = float(losses.mean()) - teacher_loss
        needed = sigmas * std
        students[name] = {"mean": float(losses.mean()), "std": std, "margin": margin, "needed": needed,
                          "seeds": len(losses)}
        if not (margin > 0 and margin >= needed):  # a nan std (one seed) cannot pass
            failed.append(name)
    closest = min(students, key=lambda name: students[name]["margin"]) if students else None
    summary = (f"teacher {teacher_loss:.5f}; closest student {closest} at {students[closest]['mean']:.5f} "
               f"(margin {students[closest]['margin']:+.5f}, needed {students[closest]['needed']:.5f})"
               if closest else "no students")
    return {"teacher": teacher_loss, "students": students, "passed": not failed and bool(students),
            "failed": failed, "summary": summary}


def seed_mean_losses(curves, keys, budget):
    """Mean over seeds of each candidate's loss at `budget` (curves as in results.json: string keys)."""
    return [sum(seeds[s][str(budget)] for s in seeds) / len(seeds) for seeds in (curves[key] for key in keys)]


def paired_comparison(results, a, b, smallest_loss):
    """One-sided exact sign-flip test of loss(a) < loss(b) at the longest budget, paired by seed."""
    from tinyfusion.study.stats import paired_difference, sign_flip_test
    longest = str(results["budget"]["budgets"][-1])
    curves, choices = results["recovery"]["curves"], results["choices"]
    seeds = range(len(choices[a]))
    losses_a = [curves[choices[a][s]][str(s)][longest] for s in seeds]
    losses_b = [curves[choices[b][s]][str(s)][longest] for s in seeds]
    differences = [x - y for x, y in zip(losses_a, losses_b)]
    identical = all(choices[a][s] == choices[b][s] for s in seeds)
    interval = paired_difference(losses_a, losses_b)
    return {"n": len(differences), "differences": differences, "effect": interval["mean"],
            "low": interval["low"], "high": interval["high"], "identical_choices": identical,
            "p": 1.0 if identical else sign_flip_test(differences, alternative="less"),
            "smallest_p": 0.5 ** len(differences), "meets_smallest_effect": interval["mean"] <= -smallest_loss}


def rank_comparison(results, smallest_rho):
    """Permutation test of Spearman's rho(calibration, loss at the longest budget) > 0 over the candidates."""
    from tinyfusion.study.stats import bootstrap_interval, spearman, spearman_permutation_test
    recovery = results["recovery"]
    keys = recovery["candidates"]
    calibration = [recovery["calibration"][key] for key in keys]
    recovered = seed_mean_losses(recovery["curves"], keys, results["budget"]["budgets"][-1])
    rho = spearman(calibration, recovered)
    low, high = bootstrap_interval(calibration, recovered)
    return {"n": len(keys), "effect": rho, "low": low, "high": high,
            "p": spearman_permutation_test(calibration, recovered), "smallest_p": None,
            "meets_smallest_effect": rho >= smallest_rho}


def primary_comparisons(results, smallest_effect, alpha=0.05):
    """The declared comparisons (results["declared"]["primary"]) with Holm-adjusted p-values; a
    hypothesis is "supported" only when its adjusted p < alpha and its effect reaches the smallest
    effect of interest."""
    from tinyfusion.study.stats import holm
    smallest_loss = smallest_effect["loss_fraction"] * results["gate"]["teacher"]
    rows = []
    for declared in results["declared"]["primary"]:
        if declared["kind"] == "paired":
            row = paired_comparison(results, declared["a"], declared["b"], smallest_loss)
        else:
            row = rank_comparison(results, smallest_effect["rho"])
        rows.append(dict(row, name=declared["name"], kind=declared["kind"]))
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row["p_holm"] = adjusted
        row["supported"] = bool(adjusted < alpha and row["meets_smallest_effect"])
    return {"rows": rows, "alpha": alpha, "smallest_loss": smallest_loss}


def rank_by_budget(results):
    """Per budget over the candidates: Spearman of calibration loss with the seed-mean loss (with
    a bootstrap interval), and of that budget's ranking with the longest budget's (has it settled?)."""
    from tinyfusion.study.stats import spearman, spearman_by_budget
    recovery = results["recovery"]
    keys = recovery["candidates"]
    calibration = [recovery["calibration"][key] for key in keys]
    budgets = [0] + list(results["budget"]["budgets"])
    losses = {budget: seed_mean_losses(recovery["curves"], keys, budget) for budget in budgets}
    table = spearman_by_budget(calibration, losses)
    for budget in budgets:
        table[budget]["rho_with_longest"] = spearman(losses[budget], losses[budgets[-1]])
    return table

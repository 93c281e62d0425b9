"""Learning-rate schedules of the training loop, stepped once per iteration.

- "cosine" is the original's `torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_steps,
  eta_min=min_lr)` itself (T_max = the steps the run really takes: epochs x batches per epoch,
  or --max-steps when that is smaller), so the lr matches it step for step;
- "constant" keeps every group at its initial lr.

Each optimizer group carries an `lr_scale` (the gate logits of learnable pruning train at 10x
the lr): the schedule's base lr of a group is lr x lr_scale.
"""
import math

import torch

from tinyfusion.flags import LR_SCHEDULES  # the --lr-schedule choices, listed there so that --help needs no torch


def total_training_steps(epochs, batches_per_epoch, max_steps=None):
    steps = epochs * batches_per_epoch
    return min(steps, max_steps) if max_steps is not None else steps


def make_lr_scheduler(optimizer, *, schedule, total_steps, min_lr):
    """The scheduler of `schedule` on `optimizer` (whose groups hold their base lr)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1), eta_min=min_lr)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"unknown lr schedule {schedule!r}; use one of {', '.join(LR_SCHEDULES)}")


def lr_at_step(step, *, base_lr, schedule, total_steps, min_lr):
    """The closed form of the schedule: the lr used by the optimizer step after `step` steps."""
    if schedule == "constant":
        return base_lr
    return min_lr + (base_lr - min_lr) * (1 + math.cos(math.pi * step / max(total_steps, 1))) / 2


def restart_lr_schedule(optimizer, *, step, lr, schedule, total_steps, min_lr):
    """A fresh scheduler placed at `step` (after a resume whose lr settings changed): every
    group's base lr becomes lr x its lr_scale and its current lr the schedule's value at
    `step`; stepping on from there follows the new schedule exactly."""
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"] = lr * group.get("lr_scale", 1.0)
    scheduler = make_lr_scheduler(optimizer, schedule=schedule, total_steps=total_steps, min_lr=min_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr_at_step(step, base_lr=group["initial_lr"], schedule=schedule, total_steps=total_steps,
                                 min_lr=min_lr)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch = step
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler

"""The end of a training step, after backward: gradient averaging for models that are not
wrapped in DDP, clipping, the non-finite guard, and the optimizer / EMA update.

A skipped (non-finite) step still consumes its batch and advances train_steps and the lr
schedule, so the step count and the data position stay in lock-step.
"""
import math
import statistics
from collections import deque

import torch
import torch.distributed as dist

from tinyfusion.errors import TinyFusionError
from tinyfusion.io.finite import MAX_TRAINED_WEIGHT


def all_reduce_gradients(parameters, ctx, bucket_bytes=25 * 2 ** 20):
    """Average the gradients of `parameters` (those with requires_grad) over all ranks, in
    flat buckets (one collective per ~25 MB, not per tensor). A parameter without a grad (e.g. a
    block that every sample of this rank skipped) gets a zero grad first, so every rank reduces
    the same list. Use it instead of DDP when only a few parameters train (gate logits, LoRA)."""
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ctx.is_distributed:
        return
    buckets, current, size = [], [], 0
    for p in params:
        if current and (size + p.grad.numel() * p.grad.element_size() > bucket_bytes
                        or p.grad.dtype != current[0].grad.dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.grad.numel() * p.grad.element_size()
    if current:
        buckets.append(current)
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        flat.div_(ctx.world_size)
        offset = 0
        for p in bucket:
            count = p.grad.numel()
            p.grad.copy_(flat[offset:offset + count].view_as(p.grad))
            offset += count


def clip_grad_norm(parameters, max_norm):
    """Clip to `max_norm` (no clipping when it is 0/None) and return the total norm before
    clipping as a tensor (non-finite when a gradient is)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


HEALTHY_LOSS_FACTOR = 10.0  # a loss above 10x the run's median is an explosion, not batch-to-batch noise
HEALTHY_RULE = (f"the last healthy checkpoint: weights finite and within |w| <= {MAX_TRAINED_WEIGHT:.0e}, and the loss "
                f"of the step after it, the first computed with its weights, finite and at most "
                f"{HEALTHY_LOSS_FACTOR:g}x the run's median loss")


class NonFiniteGuard:
    """Counts steps skipped for a NaN/inf loss or gradient. `ok = guard.check(finite, step)`
    returns whether to take the step; after `max_in_a_row` consecutive bad steps it raises a
    one-line TinyFusionError (the run diverged; continuing would only burn compute) naming
    `last_good_checkpoint`, the newest healthy checkpoint (HEALTHY_RULE).

    A checkpoint's weights are judged by the loss of the NEXT step (the loss logged at its own
    step was computed before its update): `checkpoint_saved(path)` makes it a candidate and
    `judge_loss(loss)` of the following step promotes or drops it. The reference median covers
    only accepted losses (the last `window`), so an explosion never raises its own bar."""

    def __init__(self, max_in_a_row=20, skipped_total=0, last_good_checkpoint=None, window=1000):
        self.max_in_a_row = max_in_a_row
        self.skipped_total = skipped_total
        self.in_a_row = 0
        self.finite_steps = 0  # steps of this process with a finite loss and gradient
        self.last_good_checkpoint = last_good_checkpoint
        self.candidate = None
        self.accepted_losses = deque(maxlen=window)

    def checkpoint_saved(self, path):
        self.candidate = path

    def judge_loss(self, loss):
        """Record the loss of a step (NaN for a skipped one); True when it counts as healthy."""
        healthy = math.isfinite(loss) and (not self.accepted_losses or
                                           loss <= HEALTHY_LOSS_FACTOR * statistics.median(self.accepted_losses))
        if healthy:
            self.accepted_losses.append(loss)
        if self.candidate is not None:
            if healthy:
                self.last_good_checkpoint = self.candidate
            self.candidate = None
        return healthy

    def advice(self):
        if self.last_good_checkpoint:
            return (f"resume from {self.last_good_checkpoint} ({HEALTHY_RULE}) with a lower --lr or "
                    f"--precision bf16/fp32")
        if not self.finite_steps:
            return ("not one step of this run had a finite loss, so the learning rate is not the cause: the weights "
                    "it started from (--load-weight, --resume, a teacher's --load-teacher) or its data are broken; "
                    "check those files")
        return "no healthy checkpoint was written; start again with a lower --lr or --precision bf16/fp32"

    def check(self, finite, step):
        if finite:
            self.in_a_row = 0
            self.finite_steps += 1
            return True
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TinyFusionError(f"{self.in_a_row} non-finite losses in a row at step {step} (the run diverged); "
                                  f"{self.advice()}")
        return False


def largest_magnitude(tensors):
    """max |x| over all tensors (NaN when any entry is NaN; 0.0 for none)."""
    return max((float(t.detach().abs().amax()) for t in tensors if t.numel()), default=0.0,
               key=lambda value: float("inf") if value != value else value)


def step_unless_nonfinite(stats, trainable, optimizer, scaler, ema, guard, step, ctx, grad_clip):
    """The end of every training step, after backward (and any manual gradient sync): average the
    logged loss terms over ranks -- one small collective, which also makes the skip decision the
    same on every rank, since a NaN anywhere is a NaN in the sum -- clip, then step the optimizer
    and the EMA unless the loss or the gradient is non-finite (with fp16 the scaler itself skips
    steps with inf gradients and lowers its scale). Returns (mean stats, grad norm, stepped)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if ctx.is_distributed:
        dist.all_reduce(stats)
        stats /= ctx.world_size
    grad_norm = clip_grad_norm(trainable, grad_clip)
    finite = bool(torch.isfinite(stats).all()) and (scaler is not None or bool(torch.isfinite(grad_norm)))
    stepped = guard.check(finite, step)
    if stepped:
        if scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        ema.update()
    if scaler is not None:
        scaler.update()
    return stats, grad_norm, stepped

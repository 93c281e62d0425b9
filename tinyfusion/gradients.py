"""The end of a training step, after backward: gradient averaging for models that are not
wrapped in DDP, clipping, the non-finite guard, and the optimizer / EMA update.

A skipped (non-finite) step still consumes its batch and advances train_steps and the lr
schedule, so the step count and the data position stay in lock-step.
"""
import torch
import torch.distributed as dist

from tinyfusion.errors import TinyFusionError


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


class NonFiniteGuard:
    """Counts steps skipped for a NaN/inf loss or gradient. `ok = guard.check(finite, step)`
    returns whether to take the step; after `max_in_a_row` consecutive bad steps it raises a
    one-line TinyFusionError (the run diverged; continuing would only burn compute) naming
    `last_good_checkpoint`, the newest checkpoint written from a healthy state."""

    def __init__(self, max_in_a_row=20, skipped_total=0, last_good_checkpoint=None):
        self.max_in_a_row = max_in_a_row
        self.skipped_total = skipped_total
        self.in_a_row = 0
        self.last_good_checkpoint = last_good_checkpoint

    def advice(self):
        if self.last_good_checkpoint:
            return f"resume from {self.last_good_checkpoint} (the last checkpoint of finite weights) with a lower --lr"
        return "no checkpoint was written before; start again with a lower --lr"

    def check(self, finite, step):
        if finite:
            self.in_a_row = 0
            return True
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TinyFusionError(f"{self.in_a_row} non-finite losses in a row at step {step} (the run diverged); "
                                  f"{self.advice()} or --precision bf16/fp32")
        return False


def all_finite(tensors):
    """True when no entry of any tensor is NaN or inf."""
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


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

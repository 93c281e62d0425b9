"""Training-loop machinery shared by train.py, train_masked_kd.py and prune_by_learning.py.

What lives here (and nowhere else):
- the common command-line flags of the training and pruning scripts (`add_training_args`);
- seeding and the RNG state of every rank (python, numpy, torch CPU, CUDA), captured into and
  restored from training checkpoints, so a resumed run continues the exact same random stream;
- training checkpoints `{model, ema, opt, sched, train_steps, epoch, batches_into_epoch, args,
  rng, ...}` written atomically by rank 0 (`save_training_checkpoint`, a collective call) and
  read back with weights_only=True (`load_training_checkpoint`), `--resume PATH|auto`;
- the loop position (epoch, batches consumed in it) for mid-epoch resume, and an epoch iterator
  that does not consume the global torch RNG (a DataLoader draws its worker base seed from it
  each time it is iterated, which would shift the noise stream of a resumed run);
- `NonFiniteGuard` (a NaN/inf loss skips the step; too many in a row end the run),
  `ThroughputMeter`, `all_reduce_gradients` (bucketed all-reduce of the trainable parameters
  only, zero-filling missing grads, for scripts that cannot use DDP), `clip_grad_norm`, the
  learning-rate schedules;
- `fit(...)`: the whole DDP training loop of train.py and train_masked_kd.py (they differ only
  in how a batch's loss is computed).

Determinism: with the same world size on CPU, a run interrupted after any checkpoint and
resumed with `--resume auto` ends with bit-identical weights to an uninterrupted run. A skipped
(non-finite) step still consumes its batch and advances `train_steps` and the LR schedule, so
the step count and the data position stay in lock-step.
"""
import argparse
import math
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from tinyfusion.checkpoints import (build_model, extract_state_dict, load_checkpoint_file, load_into_model, read_metadata,
                         save_checkpoint, with_metadata)
from tinyfusion.cli import autocast, resolve_precision
from tinyfusion.distributed import broadcast_object, check_global_batch, setup_distributed
from tinyfusion.ema import ParameterEMA
from tinyfusion.runlog import MetricsLog, checkpoint_path, create_logger, latest_checkpoint, prepare_run_folder, run_folder_name

CHECKPOINT_KEYS = ("model", "ema", "opt", "train_steps")


# ------------------------------------------------------------------------------ flags
def add_training_args(parser, lr=1e-4, epochs=1400, global_batch_size=256, log_every=100, ckpt_every=50_000,
                      results_dir="results", ema_decay=0.9999):
    """The flags every training / pruning script shares (SPEC section 13 plus ours). Defaults are
    the original DiT ones; scripts pass their own lr/epochs where the paper differs."""
    parser.add_argument("--data-path", type=str, required=True,
                        help="feature store written by extract_features.py (or the original "
                             "imagenet256_features/ + imagenet256_labels/ layout)")
    parser.add_argument("--results-dir", type=str, default=results_dir)
    parser.add_argument("--prefix", type=str, default="run",
                        help="run folder is {results-dir}/{prefix}-{model with / as -}")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps (also the length of the LR schedule)")
    parser.add_argument("--global-batch-size", type=int, default=global_batch_size)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=log_every)
    parser.add_argument("--ckpt-every", type=int, default=ckpt_every)
    parser.add_argument("--resume", type=str, default=None,
                        help="a training checkpoint to continue from, or 'auto' for the latest one in the run folder")
    parser.add_argument("--load-weight", type=str, default=None,
                        help="initial weights (e.g. a pruned model); ignored when resuming")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 disables clipping)")
    parser.add_argument("--ema-decay", type=float, default=ema_decay)
    parser.add_argument("--max-skipped-in-a-row", type=int, default=20,
                        help="end the run after this many consecutive non-finite losses")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


def device_flag(args):
    """setup_distributed's `device` argument from --device."""
    return None if getattr(args, "device", "auto") == "auto" else args.device


# ------------------------------------------------------------------------------ RNG
def seed_everything(global_seed, ctx):
    """Seed python, numpy and torch with `global_seed * world_size + rank` (DiT's rule: every rank
    draws different noise). Returns the seed."""
    seed = global_seed * ctx.world_size + ctx.rank
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return seed


def capture_rng_state():
    """This process's RNG states as plain values and tensors (safe for weights_only loading)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state):
    """Inverse of capture_rng_state."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx):
    """Every rank's RNG state, as a list indexed by rank (collective: call on all ranks)."""
    state = capture_rng_state()
    if not ctx.is_distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng(checkpoint, ctx, global_seed):
    """Restore this rank's RNG from a checkpoint saved with the same world size. With another
    world size (or no stored states) the ranks are re-seeded from (global_seed, train_steps), so
    the run goes on with fresh but reproducible noise. Returns True if the exact state was restored."""
    states = checkpoint.get("rng")
    if states and len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
        return True
    step = int(checkpoint.get("train_steps", 0))
    seed = (global_seed * 1_000_003 + step) * ctx.world_size + ctx.rank
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return False


# ------------------------------------------------------------------------------ checkpoints
def _materialize(value):
    return value() if callable(value) else value


def save_training_checkpoint(path, ctx, *, model_state, ema_state, optimizer, scheduler, train_steps, epoch,
                             batches_into_epoch, args, scaler=None, extra=None):
    """Write a training checkpoint atomically. COLLECTIVE: call on every rank (the RNG states of
    all ranks are gathered); only rank 0 writes. `model_state` / `ema_state` may be callables so
    the (possibly large) state dicts are built on rank 0 only. `args` is stored as an
    argparse.Namespace (the original format); `extra` (a dict of plain values / tensors) is merged
    in (e.g. {"skipped_steps": 3} or gate logits). Returns `path`."""
    rng_states = gather_rng_states(ctx)
    if ctx.is_main:
        checkpoint = {
            "model": _materialize(model_state),
            "ema": _materialize(ema_state),
            "opt": optimizer.state_dict(),
            "sched": scheduler.state_dict() if scheduler is not None else None,
            "train_steps": int(train_steps),
            "epoch": int(epoch),
            "batches_into_epoch": int(batches_into_epoch),
            "args": args if isinstance(args, argparse.Namespace) else argparse.Namespace(**dict(args)),
            "world_size": ctx.world_size,
            "rng": rng_states,
        }
        if scaler is not None:
            checkpoint["scaler"] = scaler.state_dict()
        checkpoint.update(extra or {})
        save_checkpoint(checkpoint, path, overwrite=True)
    if ctx.is_distributed:
        dist.barrier()
    return path


def load_training_checkpoint(path):
    """A training checkpoint (weights_only) with its keys checked: a plain weights file is a
    one-line error pointing at --load-weight."""
    checkpoint = load_checkpoint_file(path)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {path} is not a training checkpoint (no {', '.join(missing)}); "
                         f"to start from its weights use --load-weight {path} instead of --resume")
    return checkpoint


def resolve_resume(resume_flag, run_dir):
    """The checkpoint to resume from: None without --resume, the newest checkpoint of `run_dir`
    for 'auto' (None when there is none yet: a fresh start), else the given path (must exist)."""
    if not resume_flag:
        return None
    if resume_flag == "auto":
        return latest_checkpoint(run_dir)
    if not os.path.isfile(resume_flag):
        raise SystemExit(f"error: --resume {resume_flag} does not exist; pass a checkpoint file or 'auto'")
    return resume_flag


# ------------------------------------------------------------------------------ loop position
def normalize_position(epoch, batches_into_epoch, batches_per_epoch):
    """(epoch, batch) to continue from: a checkpoint written after an epoch's last batch
    continues at the next epoch's first."""
    if batches_into_epoch >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, batches_into_epoch


def iterate_epoch(loader, sampler, epoch, start_batch=0):
    """An iterator over the batches of `epoch` from batch `start_batch` on (a
    feature_store.ResumableDistributedSampler). Creating a DataLoader iterator draws its worker
    base seed from the global torch RNG; that draw is undone here so the training noise stream
    does not depend on where a run was resumed (workers need no randomness: flips are hashed)."""
    sampler.set_epoch(epoch, start_batch)
    state = torch.get_rng_state()
    iterator = iter(loader)
    torch.set_rng_state(state)
    return iterator


def total_training_steps(epochs, batches_per_epoch, max_steps=None):
    steps = epochs * batches_per_epoch
    return min(steps, max_steps) if max_steps is not None else steps


# ------------------------------------------------------------------------------ schedules
def constant_schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def cosine_schedule(optimizer, total_steps, final_lr):
    """Cosine from the optimizer's lr at step 0 to `final_lr` at `total_steps` (then flat)."""
    base_lr = optimizer.param_groups[0]["lr"]
    final_ratio = final_lr / base_lr if base_lr > 0 else 1.0

    def factor(step):
        progress = min(step, total_steps) / max(total_steps, 1)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------ gradients
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
    one-line SystemExit (the run diverged; continuing would only burn compute)."""

    def __init__(self, max_in_a_row=20, skipped_total=0):
        self.max_in_a_row = max_in_a_row
        self.skipped_total = skipped_total
        self.in_a_row = 0

    def check(self, finite, step):
        if finite:
            self.in_a_row = 0
            return True
        self.skipped_total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise SystemExit(f"error: {self.in_a_row} non-finite losses in a row at step {step} (the run diverged); "
                             f"resume from the last checkpoint with a lower --lr or --precision bf16/fp32")
        return False


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


class ThroughputMeter:
    """Steps/s and images/s since the last `rates()` call (synchronizes CUDA before reading the
    clock, otherwise queued kernels would be attributed to the next window)."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self):
        self.start = time.perf_counter()
        self.steps = 0
        self.images = 0

    def step(self, images):
        self.steps += 1
        self.images += images

    def rates(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps_per_sec, images_per_sec = self.steps / elapsed, self.images / elapsed
        self.reset()
        return steps_per_sec, images_per_sec


# ------------------------------------------------------------------------------ run setup
def open_training_data(args, ctx):
    """The feature dataset of --data-path (one-line SystemExit when there is none)."""
    from tinyfusion.feature_store import open_feature_dataset
    return open_feature_dataset(args.data_path, flip_prob=0.5, seed=args.global_seed)


def check_dataset_fits(dataset, model, args):
    """One-line SystemExit when the features cannot feed the model (wrong geometry or labels)."""
    expected = (model.in_channels, model.input_size, model.input_size)
    if tuple(dataset.sample_shape) != expected:
        raise SystemExit(f"error: the features in {args.data_path} are {tuple(dataset.sample_shape)} but --model "
                         f"{args.model} with --vae {args.vae} --image-size {args.image_size} expects {expected}; "
                         f"pass the --vae/--image-size the features were extracted with")
    if dataset.num_classes > model.num_classes:
        raise SystemExit(f"error: the features in {args.data_path} have {dataset.num_classes} classes but "
                         f"--num-classes is {model.num_classes}; pass --num-classes {dataset.num_classes}")


def prepare_training(args):
    """The start shared by train.py and train_masked_kd.py: process group, seeds, data, run folder,
    `--resume`, and the model (resumed, loaded from --load-weight, or fresh), checked against the
    data. Returns (ctx, dataset, run_dir, resume_path, resume_checkpoint, model, metadata)."""
    ctx = setup_distributed(device_flag(args))
    check_global_batch(args.global_batch_size, ctx)
    seed_everything(args.global_seed, ctx)
    dataset = open_training_data(args, ctx)
    run_dir = run_folder_name(args.results_dir, args.prefix, args.model)
    resume_path = resolve_resume(args.resume, run_dir)
    resume = load_training_checkpoint(resume_path) if resume_path else None
    if resume is not None:
        check_resume_compatible(resume, args, resume_path)
    model, metadata = build_training_model(args, resume, resume_path)
    check_dataset_fits(dataset, model, args)
    return ctx, dataset, run_dir, resume_path, resume, model, metadata


def build_training_model(args, resume_checkpoint=None, resume_path=None):
    """(model, metadata) of the model to train: the "model" weights of the resume checkpoint,
    else --load-weight (a pruned checkpoint's metadata sets the depth), else a fresh init."""
    if resume_checkpoint is None:
        return build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path,
                           ckpt=args.load_weight)
    metadata = read_metadata(resume_checkpoint)
    kwargs = {}
    if metadata and metadata.get("kept_indices") is not None:
        kwargs["depth"] = len(metadata["kept_indices"])
    model, _ = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path, **kwargs)
    load_into_model(model, extract_state_dict(resume_checkpoint, use_ema=False), args.model, resume_path)
    return model, metadata


def check_resume_compatible(checkpoint, args, path):
    """A resumed run must keep the model and the global batch (the data position counts batches)."""
    saved = checkpoint.get("args")
    for flag in ("model", "global_batch_size", "image_size", "num_classes"):
        old, new = getattr(saved, flag, None), getattr(args, flag, None)
        if old is not None and old != new:
            raise SystemExit(f"error: {path} was trained with --{flag.replace('_', '-')} {old}, not {new}; "
                             f"resume with the same value or start a new run (another --prefix)")


def open_run_folder(args, ctx, run_dir, resuming):
    """Create the run folder on rank 0 (args.json; refuses to reuse a folder holding checkpoints
    unless resuming) and return (logger, metrics); an error reaches every rank as one line."""
    error = None
    if ctx.is_main:
        try:
            prepare_run_folder(run_dir, args, resuming, ctx.is_main)
        except SystemExit as exit_error:
            error = str(exit_error)
    error = broadcast_object(error, ctx)
    if error:
        raise SystemExit(error)
    logger = create_logger(run_dir, ctx.is_main)
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), ctx.is_main)
    return logger, metrics


class AutocastForward:
    """Calls the model under autocast and returns its outputs in float32, so that every loss is
    computed in fp32 whatever the precision of the forward (massive activations overflow fp16)."""

    def __init__(self, model, dtype, device):
        self.model, self.dtype, self.device = model, dtype, device

    def __call__(self, *args, **kwargs):
        with autocast(self.dtype, self.device):
            result = self.model(*args, **kwargs)
        if isinstance(result, tuple):
            output, hiddens = result
            return output.float(), [h.float() for h in hiddens]
        return result.float()


# ------------------------------------------------------------------------------ the loop
def fit(args, ctx, model, metadata, dataset, compute_losses, logger, metrics, run_dir, resume_checkpoint=None,
        schedule="constant", final_lr=None):
    """Train `model` on `dataset` with AdamW, grad clipping, EMA, checkpoints and logging; the
    loop of train.py and train_masked_kd.py. `compute_losses(model, x, y, epoch)` returns a dict
    of fp32 scalar tensors with "loss" (what is minimised) and any terms to log; `model` there is
    the (DDP-wrapped, possibly compiled) student whose calls run under autocast and return fp32.
    The caller seeded the RNGs before building the model; a resume restores them here.
    Returns {"train_steps", "skipped_steps", "final_checkpoint"}."""
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from tinyfusion.feature_store import batches_per_epoch, make_loader

    device = ctx.device
    per_rank_batch = args.global_batch_size // ctx.world_size
    precision = resolve_precision(args.precision, device)
    model.to(device).train()
    model.grad_checkpointing = bool(args.grad_checkpointing)
    named_trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    ema = ParameterEMA(named_trainable, args.ema_decay)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    try:
        loader, sampler = make_loader(dataset, per_rank_batch, ctx, seed=args.global_seed,
                                      num_workers=args.num_workers)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    steps_per_epoch = batches_per_epoch(sampler)
    total_steps = total_training_steps(args.epochs, steps_per_epoch, args.max_steps)
    if schedule == "cosine":
        scheduler = cosine_schedule(optimizer, total_steps, final_lr)
    else:
        scheduler = constant_schedule(optimizer)
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None
    guard = NonFiniteGuard(args.max_skipped_in_a_row)
    train_steps, epoch, start_batch = 0, 0, 0
    if resume_checkpoint is not None:
        ema.load_state_dict(resume_checkpoint["ema"])
        optimizer.load_state_dict(resume_checkpoint["opt"])
        if resume_checkpoint.get("sched") is not None:
            scheduler.load_state_dict(resume_checkpoint["sched"])
        if scaler is not None and resume_checkpoint.get("scaler") is not None:
            scaler.load_state_dict(resume_checkpoint["scaler"])
        train_steps = int(resume_checkpoint["train_steps"])
        epoch, start_batch = normalize_position(int(resume_checkpoint.get("epoch", 0)),
                                                int(resume_checkpoint.get("batches_into_epoch", 0)), steps_per_epoch)
        guard.skipped_total = int(resume_checkpoint.get("skipped_steps", 0))
        if not restore_rank_rng(resume_checkpoint, ctx, args.global_seed):
            logger.info(f"the checkpoint was written with {resume_checkpoint.get('world_size')} ranks, this run has "
                        f"{ctx.world_size}: RNG streams re-seeded (the run continues, but not bit-identically)")
        logger.info(f"resumed at step {train_steps} (epoch {epoch}, batch {start_batch} of {steps_per_epoch})")

    ddp_model = model
    if ctx.is_distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    forward_model = AutocastForward(ddp_model, precision, device)

    def model_state():
        state = model.state_dict()
        return with_metadata(state, metadata) if metadata else state

    def ema_state():
        state = ema.model_state_dict(model)
        return with_metadata(state, metadata) if metadata else state

    def save(step, epoch_now, batches_done):
        path = checkpoint_path(run_dir, step)
        save_training_checkpoint(path, ctx, model_state=model_state, ema_state=ema_state, optimizer=optimizer,
                                 scheduler=scheduler, train_steps=step, epoch=epoch_now,
                                 batches_into_epoch=batches_done, args=args, scaler=scaler,
                                 extra={"skipped_steps": guard.skipped_total})
        logger.info(f"saved checkpoint {path}")
        return path

    logger.info(f"{sum(p.numel() for p in trainable):,} trainable parameters, depth {model.depth}; "
                f"{len(dataset):,} samples, {steps_per_epoch} steps per epoch, {total_steps} steps in total; "
                f"precision {str(precision).replace('torch.', '')}, {ctx.world_size} rank(s) ({ctx.backend})")
    meter = ThroughputMeter(device)
    window_sums, window_steps, window_skipped = None, 0, 0
    last_saved = train_steps if resume_checkpoint is not None else None
    progress = tqdm(total=total_steps, initial=train_steps, disable=not ctx.is_main, desc="train", dynamic_ncols=True)
    while train_steps < total_steps and epoch < args.epochs:
        batches_done = start_batch
        for x, y in iterate_epoch(loader, sampler, epoch, start_batch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            losses = compute_losses(forward_model, x, y, epoch)
            names = sorted(losses)
            (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
            stats = torch.stack([losses[name].detach().float() for name in names])
            stats, grad_norm, stepped = step_unless_nonfinite(stats, trainable, optimizer, scaler, ema, guard,
                                                              train_steps + 1, ctx, args.grad_clip)
            if stepped:
                stats = stats.cpu()
                window_sums = stats if window_sums is None else window_sums + stats
                window_steps += 1
            else:
                window_skipped += 1
                logger.info(f"step {train_steps + 1}: non-finite loss or gradient, step skipped "
                            f"({guard.in_a_row} in a row, {guard.skipped_total} in total)")
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # after skipped steps torch warns that the optimizer did not step yet
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                scheduler.step()
            train_steps += 1
            batches_done += 1
            meter.step(args.global_batch_size)
            progress.update(1)

            if train_steps % args.log_every == 0 or train_steps == total_steps:
                steps_per_sec, images_per_sec = meter.rates()
                means = {name: (float(window_sums[i]) / window_steps if window_steps else float("nan"))
                         for i, name in enumerate(names)}
                lr = optimizer.param_groups[0]["lr"]
                terms = " ".join(f"{name} {value:.4f}" for name, value in means.items() if name != "loss")
                logger.info(f"(step={train_steps:07d}) loss {means['loss']:.4f} {terms} lr {lr:.3g} "
                            f"steps/s {steps_per_sec:.2f} img/s {images_per_sec:.1f} skipped {guard.skipped_total}")
                metrics.write(step=train_steps, epoch=epoch, lr=lr, steps_per_sec=steps_per_sec,
                              images_per_sec=images_per_sec, skipped_steps=guard.skipped_total,
                              skipped_in_window=window_skipped, grad_norm=float(grad_norm), **means)
                progress.set_postfix(loss=f"{means['loss']:.4f}")
                window_sums, window_steps, window_skipped = None, 0, 0
            if train_steps % args.ckpt_every == 0 or train_steps == total_steps:
                save(train_steps, epoch, batches_done)
                last_saved = train_steps
            if train_steps >= total_steps:
                break
        epoch, start_batch = epoch + 1, 0
    progress.close()
    final_path = checkpoint_path(run_dir, train_steps)
    if last_saved != train_steps:  # e.g. --epochs reached before a multiple of --ckpt-every
        save(train_steps, epoch, 0)
    model.eval()
    logger.info(f"done: {train_steps} steps, {guard.skipped_total} skipped; final checkpoint {final_path}")
    return {"train_steps": train_steps, "skipped_steps": guard.skipped_total, "final_checkpoint": final_path,
            "ema": ema}

"""The one training loop of train.py, train_masked_kd.py and prune_by_learning.py.

The three trainings are tasks (tinyfusion/training/task.py): a task says what the loss of a batch
is, what trains (the model's requires_grad flags and its parameter groups) and what a checkpoint
holds; as LoopHooks it may add per-step work (the gate search anneals tau / scaling and logs its
decisions). Everything else lives only here: the configuration (LoopConfig, from the flags),
AdamW, the lr schedule, EMA, the non-finite guard, resume (the resumable state is
tinyfusion/training/state.py's LoopState), checkpoint cadence and logging.

Determinism: with the same world size on CPU, a run interrupted after any checkpoint and
resumed with `--resume auto` ends with bit-identical weights to an uninterrupted run.
No checkpoint is written from a diverged state (non-finite weights or EMA, weights above
MAX_TRAINED_WEIGHT, or while steps are being skipped): it is postponed to the next healthy step,
and a run that ends diverged stops with an error naming the last healthy checkpoint
(gradients.HEALTHY_RULE: the next step's loss, computed with its weights, was finite and at most
10x the run's median), or saying that the inputs are broken when no step ever had a finite loss.
"""
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass

import torch

from tinyfusion.flags import autocast, resolve_precision
from tinyfusion.training.ema import ParameterEMA
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.finite import MAX_TRAINED_WEIGHT
from tinyfusion.training.gradients import all_reduce_gradients, largest_magnitude, step_unless_nonfinite
from tinyfusion.training.resume import save_training_checkpoint
from tinyfusion.training.state import LoopState
from tinyfusion.io.run_folder import checkpoint_path, latest_checkpoint, open_run_folder
from tinyfusion.training.lr_schedules import total_training_steps


@dataclass
class LoopResult:
    train_steps: int
    skipped_steps: int
    final_checkpoint: str
    ema: ParameterEMA
    logger: logging.Logger


class AutocastForward:
    """Calls the model under autocast and returns its outputs in float32, so that every loss is
    computed in fp32 whatever the precision of the forward (massive activations overflow fp16)."""

    def __init__(self, model, dtype, device):
        self.model, self.dtype, self.device = model, dtype, device

    def __call__(self, *args, **kwargs):
        with autocast(self.dtype, self.device):
            result = self.model(*args, **kwargs)
        return as_float32(result)


def as_float32(result):
    """A model's result in float32: a tensor, or a tuple of tensors and lists of hidden states."""
    if isinstance(result, (tuple, list)):
        return type(result)(as_float32(item) for item in result)
    return result.float()


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


@dataclass(frozen=True)
class LoopConfig:
    """The loop's settings from the command line: tinyfusion.training.run_setup.loop_config builds
    it from the shared flags (tinyfusion/flags.py add_training_args, which holds the defaults)."""
    epochs: int                 # passes over the data (the loop also stops at max_steps)
    max_steps: int | None       # stop after this many steps; also the length of the cosine schedule
    global_batch_size: int      # images per step over all ranks
    global_seed: int            # data order and the re-seed of a resume with another world size
    lr: float                   # base learning rate of AdamW
    lr_schedule: str            # "cosine" (CosineAnnealingLR to min_lr over all steps) or "constant"
    min_lr: float               # eta_min of the cosine schedule
    weight_decay: float         # AdamW weight decay
    grad_clip: float            # max global grad norm; 0 disables clipping
    ema_decay: float            # EMA of the trained parameters
    log_every: int              # steps between log lines / metrics records
    ckpt_every: int             # steps between checkpoints (the last step is always saved)
    precision: str              # autocast dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    grad_checkpointing: bool    # recompute block activations in backward
    compile_model: bool         # torch.compile the (wrapped) model
    num_workers: int            # DataLoader workers per rank
    max_skipped_in_a_row: int   # non-finite steps in a row that end the run
    run_args: dict              # plain dict of the command line: args.json and every checkpoint's "args"


class TrainingLoop:
    """One training run of a TrainingTask (tinyfusion/training/task.py) from a prepared run
    (run_setup.PreparedRun: the model, whose requires_grad flags say what trains and what the
    EMA covers, the dataset, the distributed context with its process group started, the run
    folder, created when the loop starts, and the training checkpoint to continue, if any, whose
    model weights are already loaded). `hooks` (LoopHooks: trackers, --eval-every) follow the
    task's own; `intro` are the lines logged first. `run()` returns a LoopResult."""

    def __init__(self, *, task, run, config, hooks=(), intro=()):
        self.task, self.config = task, config
        self.model, self.dataset, self.ctx, self.run_dir = run.model, run.dataset, run.ctx, run.run_dir
        self.resume_checkpoint = run.resume
        self.hooks, self.intro = [task, *hooks], list(intro)
        self._setup()
        self.notes = self.state.load_state_dict(run.resume, run.resume_path) if run.resume is not None else []

    @property
    def ema(self):
        return self.state.ema

    @property
    def total_steps(self):
        return self.state.total_steps

    # ------------------------------------------------------------------ setup
    def _setup(self):
        from tinyfusion.io.feature_store import batches_per_epoch, make_loader
        config = self.config
        self.device = self.ctx.device
        self.dtype = resolve_precision(config.precision, self.device)
        self.model.to(self.device).train()
        self.model.grad_checkpointing = bool(config.grad_checkpointing)
        try:
            self.loader, self.sampler = make_loader(self.dataset, config.global_batch_size // self.ctx.world_size,
                                                    self.ctx, seed=config.global_seed, num_workers=config.num_workers)
        except ValueError as error:
            raise TinyFusionError(str(error).removeprefix("error: ")) from None
        steps_per_epoch = batches_per_epoch(self.sampler)
        self.state = LoopState(self.model, config=config, param_groups=self.task.param_groups(self.model),
                               total_steps=total_training_steps(config.epochs, steps_per_epoch, config.max_steps),
                               steps_per_epoch=steps_per_epoch, ctx=self.ctx, dtype=self.dtype)

    def _open_run(self):
        # a folder this fresh run creates is removed again if the run fails before its first checkpoint
        self.created_run_dir = self.ctx.is_main and self.resume_checkpoint is None and not os.path.exists(self.run_dir)
        self.logger, self.metrics = open_run_folder(self.config.run_args, self.ctx, self.run_dir,
                                                    resuming=self.resume_checkpoint is not None)
        if self.resume_checkpoint is not None:
            self.metrics.truncate_after(self.state.train_steps)  # records past the resumed step are redone
        for line in [*self.intro, *self.notes]:
            self.logger.info(line)
        state, config = self.state, self.config
        trained = sum(p.numel() for p in state.trainable)
        self.logger.info(f"{trained:,} trained parameters; {len(self.dataset):,} samples, {state.steps_per_epoch} "
                         f"steps per epoch, {state.total_steps} steps in total; lr {config.lr:g} {config.lr_schedule}"
                         f"{f' to {config.min_lr:g}' if config.lr_schedule == 'cosine' else ''}; precision "
                         f"{str(self.dtype).replace('torch.', '')}, {self.ctx.world_size} rank(s) ({self.ctx.backend})")

    def _forward_model(self):
        wrapped = self.model
        if self.task.gradient_sync == "ddp" and self.ctx.is_distributed:
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
        if self.config.compile_model:
            from tinyfusion.sampling.cpu_compile import compile_options  # AVX2 kernels on an AVX-512 CPU
            wrapped = torch.compile(wrapped, options=compile_options(self.device, self.logger.info))
        return AutocastForward(wrapped, self.dtype, self.device)

    # ------------------------------------------------------------------ one step
    def _step(self, forward, x, y):
        state = self.state
        for hook in self.hooks:
            hook.before_step(self, state.train_steps)
        losses = self.task.losses(forward, x, y, state.epoch)
        names = sorted(losses)
        (state.scaler.scale(losses["loss"]) if state.scaler is not None else losses["loss"]).backward()
        if self.task.gradient_sync == "all_reduce":
            all_reduce_gradients(state.trainable, self.ctx)  # zero-fills grads of blocks this rank skipped
        stats = torch.stack([losses[name].detach().float() for name in names])
        stats, self.grad_norm, stepped = step_unless_nonfinite(
            stats, state.trainable, state.optimizer, state.scaler, state.ema, state.guard, state.train_steps + 1,
            self.ctx, self.config.grad_clip)
        state.guard.judge_loss(float(stats[names.index("loss")]) if stepped else float("nan"))
        if stepped:
            for name, value in zip(names, stats.cpu().tolist()):
                self.window[name] = self.window.get(name, 0.0) + value
            self.window_steps += 1
        else:
            self.window_skipped += 1
            self.logger.info(f"step {state.train_steps + 1}: non-finite loss or gradient, step skipped "
                             f"({state.guard.in_a_row} in a row, {state.guard.skipped_total} in total)")
        self.names = names
        state.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # after skipped steps torch warns that the optimizer did not step yet
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            state.scheduler.step()

    def _log(self):
        state = self.state
        steps_per_sec, images_per_sec = self.meter.rates()
        means = {name: (self.window.get(name, 0.0) / self.window_steps if self.window_steps else float("nan"))
                 for name in self.names}
        group = state.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)
        extra, text = {}, ""
        for hook in self.hooks:
            fields, hook_text = hook.log_fields(self, state.train_steps)
            extra.update(fields)
            text += f" {hook_text}" if hook_text else ""
        terms = " ".join(f"{name} {value:.4f}" for name, value in means.items() if name != "loss")
        self.logger.info(f"(step={state.train_steps:07d}) loss {means['loss']:.4f}{' ' + terms if terms else ''} "
                         f"lr {lr:.3g} steps/s {steps_per_sec:.2f} img/s {images_per_sec:.1f}{text} "
                         f"skipped {state.guard.skipped_total}")
        record = dict(step=state.train_steps, epoch=state.epoch, lr=lr, steps_per_sec=steps_per_sec,
                      images_per_sec=images_per_sec, skipped_steps=state.guard.skipped_total,
                      skipped_in_window=self.window_skipped, grad_norm=float(self.grad_norm), **means, **extra)
        self.metrics.write(**record)
        if self.ctx.is_main:
            for hook in self.hooks:
                hook.on_log(self, record)
        self.progress.set_postfix(loss=f"{means['loss']:.4f}")
        self.window, self.window_steps, self.window_skipped = {}, 0, 0

    # ------------------------------------------------------------------ checkpoints
    def _unhealthy(self):
        """Why the current state must not be checkpointed, or None."""
        guard = self.state.guard
        if guard.in_a_row:
            return f"the last {guard.in_a_row} step(s) were skipped for non-finite losses"
        for label, tensors in (("weights", self.state.trainable), ("EMA weights", self.state.ema.shadows)):
            largest = largest_magnitude(tensors)
            if not math.isfinite(largest):
                return f"the {label} are not finite"
            if largest > MAX_TRAINED_WEIGHT:  # no trained model has them; save_checkpoint would refuse them
                return f"the {label} reach |w| = {largest:.4g}, above {MAX_TRAINED_WEIGHT:.0e}"
        return None

    def _save(self, final=False):
        """Write the checkpoint of the current step (collective), or postpone it while the state is
        diverged; at the end of a run a diverged state is an error."""
        state = self.state
        reason = self._unhealthy()
        if reason is not None:
            if final:
                raise TinyFusionError(f"the run ended at step {state.train_steps} diverged ({reason}); no checkpoint "
                                      f"written; {state.guard.advice()}")
            self.save_pending = True
            self.logger.info(f"step {state.train_steps}: checkpoint postponed: {reason}")
            return
        path = checkpoint_path(self.run_dir, state.train_steps)
        extra = {}
        for hook in self.hooks:
            extra.update(hook.checkpoint_extra(self))
        save_training_checkpoint(path, self.ctx, weights=lambda: self.task.checkpoint_weights(self.model, state.ema),
                                 state=state.state_dict(), extra=extra)
        self.logger.info(f"saved checkpoint {path}")
        self.last_saved, self.save_pending = state.train_steps, False
        state.guard.checkpoint_saved(path)  # healthy once the next step's loss says so (HEALTHY_RULE)

    # ------------------------------------------------------------------ the loop
    def run(self):
        from tqdm import tqdm
        state = self.state
        self._open_run()
        for hook in self.hooks:
            hook.start(self)
        forward = self._forward_model()
        self.meter = ThroughputMeter(self.device)
        self.window, self.window_steps, self.window_skipped, self.names = {}, 0, 0, ["loss"]
        self.grad_norm, self.save_pending = torch.zeros(()), False
        self.last_saved = state.train_steps if self.resume_checkpoint is not None else None
        self.progress = tqdm(total=state.total_steps, initial=state.train_steps, disable=not self.ctx.is_main,
                             desc=self.task.progress_label, dynamic_ncols=True)
        try:
            self._run_epochs(forward)
            if self.last_saved != state.train_steps:  # e.g. --epochs reached before a multiple of --ckpt-every
                self._save(final=True)
        except BaseException:
            self._discard_unsaved_run_folder()
            raise
        finally:
            self.progress.close()
            for hook in self.hooks:
                hook.close(self)
        self.model.eval()
        final_path = checkpoint_path(self.run_dir, state.train_steps)
        self.logger.info(f"done: {state.train_steps} steps, {state.guard.skipped_total} skipped; final checkpoint "
                         f"{final_path}")
        return LoopResult(state.train_steps, state.guard.skipped_total, final_path, state.ema, self.logger)

    def _discard_unsaved_run_folder(self):
        """A fresh run that failed before its first checkpoint (a damaged feature shard, a loss
        that diverged at once: failures no check can see before the loop) leaves no folder."""
        from tinyfusion.io.run_folder import release_run_folder
        if not getattr(self, "created_run_dir", False) or latest_checkpoint(self.run_dir) is not None:
            return
        for handler in list(self.logger.handlers):  # log.txt is inside the folder
            handler.close()
            self.logger.removeHandler(handler)
        release_run_folder(self.run_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _run_epochs(self, forward):
        state, config = self.state, self.config
        while state.train_steps < state.total_steps and state.epoch < config.epochs:
            for x, y in iterate_epoch(self.loader, self.sampler, state.epoch, state.batch):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                self._step(forward, x, y)
                state.train_steps += 1
                state.batch += 1
                self.meter.step(config.global_batch_size)
                self.progress.update(1)
                last = state.train_steps == state.total_steps
                if state.train_steps % config.log_every == 0 or last:
                    self._log()
                if state.train_steps % config.ckpt_every == 0 or last or self.save_pending:
                    self._save()
                if state.train_steps >= state.total_steps:
                    break
            state.epoch, state.batch = state.epoch + 1, 0

"""The one training loop of train.py, train_masked_kd.py and prune_by_learning.py.

The scripts differ in three things, passed in: the loss of a batch (`compute_losses`), what
trains (the model's requires_grad flags and `param_groups`) and what a checkpoint holds
(`checkpoint_weights`, `LoopHooks.checkpoint_extra`); learnable pruning adds per-step hooks
(the tau / scaling annealing, the gate decisions in the log). Everything else lives only here:
AdamW, the lr schedule, EMA, the non-finite guard, resume, checkpoint cadence and logging.

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
from tinyfusion.io.checkpoints import with_metadata
from tinyfusion.training.ema import ParameterEMA
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.finite import MAX_TRAINED_WEIGHT
from tinyfusion.training.gradients import NonFiniteGuard, all_reduce_gradients, largest_magnitude, step_unless_nonfinite
from tinyfusion.training.resume import restore_loop_state, save_training_checkpoint
from tinyfusion.io.run_folder import checkpoint_path, latest_checkpoint, open_run_folder
from tinyfusion.training.lr_schedules import make_lr_scheduler, total_training_steps


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
        if isinstance(result, tuple):
            output, hiddens = result
            return output.float(), [h.float() for h in hiddens]
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


def full_weights(metadata=None):
    """checkpoint_weights of a run that trains a whole model: its state dict and the EMA model's,
    both carrying `metadata` (e.g. the kept indices of a pruned student)."""
    def weights(model, ema):
        model_state, ema_state = model.state_dict(), ema.model_state_dict(model)
        if metadata:
            return with_metadata(model_state, metadata), with_metadata(ema_state, metadata)
        return model_state, ema_state
    return weights


def train_loop(**kwargs):
    """Run the training loop; see TrainingLoop for the keywords. Returns a LoopResult."""
    return TrainingLoop(**kwargs).run()


class TrainingLoop:
    def __init__(
        self, *,
        model,                      # the network; its requires_grad flags say what trains (and what the EMA covers)
        compute_losses,             # fn(forward, x, y, epoch) -> {"loss": fp32 scalar minimised, other terms logged}
        dataset,                    # (x, y) feature dataset (tinyfusion.io.feature_store)
        ctx,                        # tinyfusion.distributed.DistributedContext (process group already started)
        run_dir,                    # run folder, created when the loop starts (after every check passed)
        run_args,                   # plain dict of the command line: args.json and every checkpoint's "args"
        global_batch_size,          # images per step over all ranks
        epochs,                     # passes over the data (the loop also stops at max_steps)
        lr,                         # base learning rate of AdamW
        max_steps=None,             # stop after this many steps; also the length of the cosine schedule
        lr_schedule="constant",     # "cosine" (CosineAnnealingLR to min_lr over all steps) or "constant"
        min_lr=0.0,                 # eta_min of the cosine schedule
        weight_decay=0.0,           # AdamW weight decay
        grad_clip=1.0,              # max global grad norm; 0 disables clipping
        ema_decay=0.9999,           # EMA of the trained parameters
        param_groups=None,          # [(params, lr_scale)]; default: every trained parameter at scale 1
        gradient_sync="ddp",        # "ddp" wraps the model; "all_reduce" averages the trained grads by hand
        checkpoint_weights=None,    # fn(model, ema) -> (model state, ema state); default full_weights()
        hooks=(),                   # LoopHooks of the script (and metric writers)
        intro=(),                   # lines logged first in the run folder's log
        resume_checkpoint=None,     # a loaded training checkpoint to continue (model weights already loaded)
        resume_path=None,           # its path (for messages)
        global_seed=0,              # data order and the re-seed of a resume with another world size
        num_workers=4,              # DataLoader workers per rank
        log_every=100,              # steps between log lines / metrics records
        ckpt_every=50_000,          # steps between checkpoints (the last step is always saved)
        max_skipped_in_a_row=20,    # non-finite steps in a row that end the run
        precision="auto",           # autocast dtype: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
        grad_checkpointing=False,   # recompute block activations in backward
        compile_model=False,        # torch.compile the (wrapped) model
        progress_label="train",     # tqdm description
    ):
        self.__dict__.update({key: value for key, value in locals().items() if key != "self"})
        self.hooks = list(hooks)
        self.checkpoint_weights = checkpoint_weights or full_weights()
        self.notes = []
        self._setup()
        if resume_checkpoint is not None:
            restore_loop_state(self, resume_checkpoint, resume_path)

    # ------------------------------------------------------------------ setup
    def _setup(self):
        from tinyfusion.io.feature_store import batches_per_epoch, make_loader
        self.device = self.ctx.device
        self.dtype = resolve_precision(self.precision, self.device)
        self.model.to(self.device).train()
        self.model.grad_checkpointing = bool(self.grad_checkpointing)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if self.param_groups is not None:  # the groups' order is the order of the trained parameters
            name_of = {id(p): name for name, p in named}
            named = [(name_of[id(p)], p) for params, _ in self.param_groups for p in params]
        self.trainable_names = [name for name, _ in named]
        self.trainable = [p for _, p in named]
        self.ema = ParameterEMA(named, self.ema_decay)
        groups = self.param_groups or [(self.trainable, 1.0)]
        self.optimizer = torch.optim.AdamW(
            [{"params": list(params), "lr": self.lr * scale, "lr_scale": scale} for params, scale in groups],
            lr=self.lr, weight_decay=self.weight_decay, fused=self.device.type == "cuda")
        try:
            self.loader, self.sampler = make_loader(self.dataset, self.global_batch_size // self.ctx.world_size,
                                                    self.ctx, seed=self.global_seed, num_workers=self.num_workers)
        except ValueError as error:
            raise TinyFusionError(str(error).removeprefix("error: ")) from None
        self.steps_per_epoch = batches_per_epoch(self.sampler)
        self.total_steps = total_training_steps(self.epochs, self.steps_per_epoch, self.max_steps)
        self.scheduler = make_lr_scheduler(self.optimizer, schedule=self.lr_schedule, total_steps=self.total_steps,
                                           min_lr=self.min_lr)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.guard = NonFiniteGuard(self.max_skipped_in_a_row)
        self.train_steps, self.epoch, self.start_batch = 0, 0, 0

    def settings(self):
        """The optimisation settings stored in checkpoints (a resume compares them)."""
        return dict(lr=self.lr, lr_schedule=self.lr_schedule, min_lr=self.min_lr, weight_decay=self.weight_decay,
                    ema_decay=self.ema_decay, grad_clip=self.grad_clip, total_steps=self.total_steps,
                    lr_scales=[scale for _, scale in self.param_groups or [(None, 1.0)]])

    def _open_run(self):
        # a folder this fresh run creates is removed again if the run fails before its first checkpoint
        self.created_run_dir = self.ctx.is_main and self.resume_checkpoint is None and not os.path.exists(self.run_dir)
        self.logger, self.metrics = open_run_folder(self.run_args, self.ctx, self.run_dir,
                                                    resuming=self.resume_checkpoint is not None)
        if self.resume_checkpoint is not None:
            self.metrics.truncate_after(self.train_steps)  # records past the resumed step are redone
        for line in [*self.intro, *self.notes]:
            self.logger.info(line)
        trained = sum(p.numel() for p in self.trainable)
        self.logger.info(f"{trained:,} trained parameters; {len(self.dataset):,} samples, {self.steps_per_epoch} "
                         f"steps per epoch, {self.total_steps} steps in total; lr {self.lr:g} {self.lr_schedule}"
                         f"{f' to {self.min_lr:g}' if self.lr_schedule == 'cosine' else ''}; precision "
                         f"{str(self.dtype).replace('torch.', '')}, {self.ctx.world_size} rank(s) ({self.ctx.backend})")

    def _forward_model(self):
        wrapped = self.model
        if self.gradient_sync == "ddp" and self.ctx.is_distributed:
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
        if self.compile_model:
            from tinyfusion.sampling.cpu_compile import compile_options  # AVX2 kernels on an AVX-512 CPU
            wrapped = torch.compile(wrapped, options=compile_options(self.device, self.logger.info))
        return AutocastForward(wrapped, self.dtype, self.device)

    # ------------------------------------------------------------------ one step
    def _step(self, forward, x, y):
        for hook in self.hooks:
            hook.before_step(self, self.train_steps)
        losses = self.compute_losses(forward, x, y, self.epoch)
        names = sorted(losses)
        (self.scaler.scale(losses["loss"]) if self.scaler is not None else losses["loss"]).backward()
        if self.gradient_sync == "all_reduce":
            all_reduce_gradients(self.trainable, self.ctx)  # zero-fills grads of blocks this rank skipped
        stats = torch.stack([losses[name].detach().float() for name in names])
        stats, self.grad_norm, stepped = step_unless_nonfinite(
            stats, self.trainable, self.optimizer, self.scaler, self.ema, self.guard, self.train_steps + 1, self.ctx,
            self.grad_clip)
        self.guard.judge_loss(float(stats[names.index("loss")]) if stepped else float("nan"))
        if stepped:
            for name, value in zip(names, stats.cpu().tolist()):
                self.window[name] = self.window.get(name, 0.0) + value
            self.window_steps += 1
        else:
            self.window_skipped += 1
            self.logger.info(f"step {self.train_steps + 1}: non-finite loss or gradient, step skipped "
                             f"({self.guard.in_a_row} in a row, {self.guard.skipped_total} in total)")
        self.names = names
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # after skipped steps torch warns that the optimizer did not step yet
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()

    def _log(self):
        steps_per_sec, images_per_sec = self.meter.rates()
        means = {name: (self.window.get(name, 0.0) / self.window_steps if self.window_steps else float("nan"))
                 for name in self.names}
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)
        extra, text = {}, ""
        for hook in self.hooks:
            fields, hook_text = hook.log_fields(self, self.train_steps)
            extra.update(fields)
            text += f" {hook_text}" if hook_text else ""
        terms = " ".join(f"{name} {value:.4f}" for name, value in means.items() if name != "loss")
        self.logger.info(f"(step={self.train_steps:07d}) loss {means['loss']:.4f}{' ' + terms if terms else ''} "
                         f"lr {lr:.3g} steps/s {steps_per_sec:.2f} img/s {images_per_sec:.1f}{text} "
                         f"skipped {self.guard.skipped_total}")
        record = dict(step=self.train_steps, epoch=self.epoch, lr=lr, steps_per_sec=steps_per_sec,
                      images_per_sec=images_per_sec, skipped_steps=self.guard.skipped_total,
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
        if self.guard.in_a_row:
            return f"the last {self.guard.in_a_row} step(s) were skipped for non-finite losses"
        for label, tensors in (("weights", self.trainable), ("EMA weights", self.ema.shadows)):
            largest = largest_magnitude(tensors)
            if not math.isfinite(largest):
                return f"the {label} are not finite"
            if largest > MAX_TRAINED_WEIGHT:  # no trained model has them; save_checkpoint would refuse them
                return f"the {label} reach |w| = {largest:.4g}, above {MAX_TRAINED_WEIGHT:.0e}"
        return None

    def _save(self, batches_done, final=False):
        """Write the checkpoint of the current step (collective), or postpone it while the state is
        diverged; at the end of a run a diverged state is an error."""
        reason = self._unhealthy()
        if reason is not None:
            if final:
                raise TinyFusionError(f"the run ended at step {self.train_steps} diverged ({reason}); no checkpoint "
                                      f"written; {self.guard.advice()}")
            self.save_pending = True
            self.logger.info(f"step {self.train_steps}: checkpoint postponed: {reason}")
            return
        path = checkpoint_path(self.run_dir, self.train_steps)
        extra = {"skipped_steps": self.guard.skipped_total}
        for hook in self.hooks:
            extra.update(hook.checkpoint_extra(self))
        save_training_checkpoint(
            path, self.ctx, weights=lambda: self.checkpoint_weights(self.model, self.ema), optimizer=self.optimizer,
            scheduler=self.scheduler, train_steps=self.train_steps, epoch=self.epoch, batches_into_epoch=batches_done,
            run_args=self.run_args, loop_settings=self.settings(), scaler=self.scaler, extra=extra)
        self.logger.info(f"saved checkpoint {path}")
        self.last_saved, self.save_pending = self.train_steps, False
        self.guard.checkpoint_saved(path)  # healthy once the next step's loss says so (HEALTHY_RULE)

    # ------------------------------------------------------------------ the loop
    def run(self):
        from tqdm import tqdm
        self._open_run()
        for hook in self.hooks:
            hook.start(self)
        forward = self._forward_model()
        self.meter = ThroughputMeter(self.device)
        self.window, self.window_steps, self.window_skipped, self.names = {}, 0, 0, ["loss"]
        self.grad_norm, self.save_pending = torch.zeros(()), False
        self.last_saved = self.train_steps if self.resume_checkpoint is not None else None
        self.progress = tqdm(total=self.total_steps, initial=self.train_steps, disable=not self.ctx.is_main,
                             desc=self.progress_label, dynamic_ncols=True)
        try:
            self._run_epochs(forward)
            if self.last_saved != self.train_steps:  # e.g. --epochs reached before a multiple of --ckpt-every
                self._save(0, final=True)
        except BaseException:
            self._discard_unsaved_run_folder()
            raise
        finally:
            self.progress.close()
            for hook in self.hooks:
                hook.close(self)
        self.model.eval()
        final_path = checkpoint_path(self.run_dir, self.train_steps)
        self.logger.info(f"done: {self.train_steps} steps, {self.guard.skipped_total} skipped; final checkpoint "
                         f"{final_path}")
        return LoopResult(self.train_steps, self.guard.skipped_total, final_path, self.ema, self.logger)

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
        while self.train_steps < self.total_steps and self.epoch < self.epochs:
            batches_done = self.start_batch
            for x, y in iterate_epoch(self.loader, self.sampler, self.epoch, self.start_batch):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                self._step(forward, x, y)
                self.train_steps += 1
                batches_done += 1
                self.meter.step(self.global_batch_size)
                self.progress.update(1)
                last = self.train_steps == self.total_steps
                if self.train_steps % self.log_every == 0 or last:
                    self._log()
                if self.train_steps % self.ckpt_every == 0 or last or self.save_pending:
                    self._save(batches_done)
                if self.train_steps >= self.total_steps:
                    break
            self.epoch, self.start_batch = self.epoch + 1, 0

"""The resumable state of the training loop as one object: what a checkpoint holds besides the
weights, and how a run continues from one.

`LoopState` owns the optimizer (AdamW over what trains, one group per lr scale), the lr schedule,
the fp16 loss scaler, the EMA, the non-finite guard's counters and the loop position (step,
epoch, batches of the epoch done). `state_dict()` gives the checkpoint entries in the format every
training checkpoint has (tinyfusion/training/resume.py); `load_state_dict(checkpoint, path)`
continues from one, also from the original train.py's checkpoints and our older ones, and applies
the optimisation settings the command line changes, each with a line for the log.
"""
import torch

from tinyfusion.errors import TinyFusionError
from tinyfusion.training.ema import ParameterEMA
from tinyfusion.training.gradients import NonFiniteGuard
from tinyfusion.training.lr_schedules import make_lr_scheduler, restart_lr_schedule
from tinyfusion.training.resume import (checkpoint_position, gather_rng_states, map_full_model_optimizer_state,
                                        restore_rank_rng, saved_args)

SETTING_FLAGS = {"lr": "--lr", "lr_schedule": "--lr-schedule", "min_lr": "--min-lr", "weight_decay": "--weight-decay",
                 "ema_decay": "--ema-decay", "grad_clip": "--grad-clip",
                 "total_steps": "steps in total (--epochs/--max-steps)",
                 "lr_scales": "lr scale per parameter group (--logits-lr-scale)"}
SCHEDULE_SETTINGS = {"lr", "lr_schedule", "min_lr", "total_steps", "lr_scales"}


def trained_parameters(model, param_groups):
    """[(name, param)] of what trains, in the optimizer's order: the order of `param_groups`
    ([(params, lr_scale)]) when given, else the model's parameters with requires_grad."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if param_groups is None:
        return named
    name_of = {id(p): name for name, p in named}
    return [(name_of[id(p)], p) for params, _ in param_groups for p in params]


def describe_setting(value):
    if isinstance(value, list):
        return "[" + ", ".join(describe_setting(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


class LoopState:
    """See the module docstring. `config` is the loop's LoopConfig, `param_groups` the task's
    [(params, lr_scale)] (None: every trained parameter at scale 1), `dtype` the autocast dtype
    (fp16 adds a loss scaler)."""

    def __init__(self, model, *, config, param_groups, total_steps, steps_per_epoch, ctx, dtype):
        self.config, self.ctx = config, ctx
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        named = trained_parameters(model, param_groups)
        self.model_names = [name for name, _ in model.named_parameters()]
        self.trainable_names = [name for name, _ in named]
        self.trainable = [p for _, p in named]
        groups = param_groups or [(self.trainable, 1.0)]
        self.lr_scales = [scale for _, scale in groups]
        self.ema = ParameterEMA(named, config.ema_decay)
        self.optimizer = torch.optim.AdamW(
            [{"params": list(params), "lr": config.lr * scale, "lr_scale": scale} for params, scale in groups],
            lr=config.lr, weight_decay=config.weight_decay, fused=ctx.device.type == "cuda")
        self.scheduler = make_lr_scheduler(self.optimizer, schedule=config.lr_schedule, total_steps=total_steps,
                                           min_lr=config.min_lr)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if dtype == torch.float16 else None
        self.guard = NonFiniteGuard(config.max_skipped_in_a_row)
        self.train_steps, self.epoch, self.batch = 0, 0, 0  # batch: batches of `epoch` done

    def settings(self):
        """The optimisation settings stored in checkpoints (a resume compares them)."""
        config = self.config
        return dict(lr=config.lr, lr_schedule=config.lr_schedule, min_lr=config.min_lr,
                    weight_decay=config.weight_decay, ema_decay=config.ema_decay, grad_clip=config.grad_clip,
                    total_steps=self.total_steps, lr_scales=list(self.lr_scales))

    def state_dict(self):
        """The checkpoint's entries besides the weights ("model", "ema": the task's, since a
        fine-tune stores the whole EMA model and the gate search only what trains), in the
        order checkpoints have always had them. COLLECTIVE: every rank's RNG state is gathered."""
        state = {"opt": self.optimizer.state_dict(),
                 "sched": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "train_steps": int(self.train_steps), "epoch": int(self.epoch),
                 "batches_into_epoch": int(self.batch), "args": dict(self.config.run_args), "loop": self.settings(),
                 "world_size": self.ctx.world_size, "rng": gather_rng_states(self.ctx)}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        state["skipped_steps"] = self.guard.skipped_total
        return state

    def load_state_dict(self, checkpoint, path):
        """Continue from `checkpoint` (read from `path`; the model's weights are already loaded):
        EMA, optimizer, lr schedule, loss scaler, position, skip count and this rank's RNG.
        Settings the command line changes (lr, schedule, weight decay, EMA decay, clipping, run
        length) are applied. Returns the lines for the log saying what happened."""
        notes = []
        try:
            self.ema.load_state_dict(checkpoint["ema"])
        except ValueError as error:
            raise TinyFusionError(f"{path}: {error}") from None
        self._load_optimizer(checkpoint["opt"], path, notes)
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.train_steps = int(checkpoint["train_steps"])
        self.epoch, self.batch = checkpoint_position(checkpoint, self.steps_per_epoch)
        self._apply_settings(checkpoint, path, notes)
        self._note_other_changed_flags(checkpoint, notes)
        self.guard.skipped_total = int(checkpoint.get("skipped_steps", 0))
        self.guard.last_good_checkpoint = path
        if not restore_rank_rng(checkpoint, self.ctx, self.config.global_seed):
            notes.append(f"the checkpoint was written with {checkpoint.get('world_size')} ranks, this run has "
                         f"{self.ctx.world_size}: RNG streams re-seeded (the run continues, but not bit-identically)")
        notes.append(f"resumed {path} at step {self.train_steps} of {self.total_steps} (epoch {self.epoch}, "
                     f"batch {self.batch} of {self.steps_per_epoch})")
        return notes

    def _load_optimizer(self, saved, path, notes):
        count = sum(len(group["params"]) for group in saved.get("param_groups", []))
        if count != len(self.trainable) and len(self.optimizer.param_groups) == 1:
            saved = map_full_model_optimizer_state(saved, all_names=self.model_names,
                                                   trained_names=self.trainable_names, path=path)
            notes.append(f"{path}: optimizer state over all {count} parameter tensors (the original train.py's) "
                         f"mapped by position onto the {len(self.trainable)} that train")
        try:
            self.optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as error:
            raise TinyFusionError(f"{path}: its optimizer state does not fit this run ({error}); resume with the "
                                  f"flags it was started with, or start from its weights with --load-weight "
                                  f"{path}") from None

    def _apply_settings(self, checkpoint, path, notes):
        previous, current, config = checkpoint.get("loop"), self.settings(), self.config
        if previous is None:
            changed = {"weight_decay"} | SCHEDULE_SETTINGS
            notes.append(f"{path} does not record its optimisation settings (the original's or an older format): "
                         f"lr schedule and weight decay from the command line")
        else:
            changed = {key for key, value in current.items() if key in previous and previous[key] != value}
            for key in sorted(changed):
                notes.append(f"{SETTING_FLAGS[key]} {describe_setting(previous[key])} -> "
                             f"{describe_setting(current[key])} from the command line")
        if changed & SCHEDULE_SETTINGS or checkpoint.get("sched") is None:
            for group, scale in zip(self.optimizer.param_groups, current["lr_scales"]):
                group["lr_scale"] = scale
            self.scheduler = restart_lr_schedule(self.optimizer, step=self.train_steps, lr=config.lr,
                                                 schedule=config.lr_schedule, total_steps=self.total_steps,
                                                 min_lr=config.min_lr)
        else:
            self.scheduler.load_state_dict(checkpoint["sched"])
        if "weight_decay" in changed:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = config.weight_decay

    def _note_other_changed_flags(self, checkpoint, notes):
        """One log line listing the other flags that differ from the run being resumed (they apply)."""
        saved = saved_args(checkpoint)
        skip = set(SETTING_FLAGS) | {"resume", "epochs", "max_steps", "load_weight"}  # load_weight: unused on resume
        changed = [f"--{key.replace('_', '-')} {describe_setting(saved[key])} -> {describe_setting(value)}"
                   for key, value in self.config.run_args.items()
                   if key in saved and key not in skip and saved[key] != value]
        if changed:
            notes.append("flags changed since the resumed checkpoint (applied as given): " + ", ".join(changed))

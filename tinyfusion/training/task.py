"""A training as a task on the one loop (tinyfusion/training/loop.py). The three trainings,
train.py's fine-tuning (tinyfusion/training/fine_tuning.py), train_masked_kd.py's Masked KD
(tinyfusion/distillation/masked_kd.py) and prune_by_learning.py's gate search
(tinyfusion/pruning/gate_search.py), differ only in what their TrainingTask says; AdamW, the lr
schedule, EMA, the non-finite guard, resume, checkpoint cadence and logging are the loop's.

`run_task` is a training's life, on every rank:

    run = task.prepare()       every check and load, before the process group starts and before
                               any file is written (bad input is one line and leaves no folder)
    lines = task.begin(run)    the process group runs: build what the step needs; the lines the
                               log starts with
    task.losses(...)           every step: the loss of a batch (the loop does the rest)
    task.finish(result)        after the last checkpoint: what the script returns
"""
from tinyfusion.distributed import cleanup_distributed, start_process_group
from tinyfusion.io.checkpoints import with_metadata
from tinyfusion.training.hooks import LoopHooks
from tinyfusion.training.loop import TrainingLoop


def whole_model_weights(model, ema, metadata=None):
    """(model state, EMA model state) of a run that trains a whole model, both carrying
    `metadata` (e.g. the kept indices of a pruned student): what sample.py reads."""
    model_state, ema_state = model.state_dict(), ema.model_state_dict(model)
    if metadata:
        return with_metadata(model_state, metadata), with_metadata(ema_state, metadata)
    return model_state, ema_state


class TrainingTask(LoopHooks):
    """What one training says to the loop (see the module docstring). As LoopHooks it also sees
    every step, log line and checkpoint (the gate search anneals its temperature there)."""

    progress_label = "train"    # the progress bar's description
    gradient_sync = "ddp"       # "ddp" wraps the model; "all_reduce": the trained grads are averaged by hand

    def prepare(self):
        """Every check and load before the process group starts: a run_setup.PreparedRun."""
        raise NotImplementedError

    def begin(self, run):
        """The process group has started: build what `losses` needs; returns the log's first lines."""
        return []

    def losses(self, forward, x, y, epoch):
        """{"loss": fp32 scalar minimised, other terms logged} of a batch; `forward` calls the model
        under autocast and returns fp32 outputs."""
        raise NotImplementedError

    def param_groups(self, model):
        """[(params, lr_scale)] in the optimizer's order, or None: every parameter with
        requires_grad, at scale 1."""
        return None

    def checkpoint_weights(self, model, ema):
        """(model state, ema state) of every checkpoint (called on rank 0)."""
        return whole_model_weights(model, ema)

    def finish(self, result):
        """The loop ended with its final checkpoint (every rank, a LoopResult): what main returns."""
        return None


def run_task(task, config, hooks=()):
    """Run a TrainingTask on the loop with `config` (a LoopConfig) and extra LoopHooks (after
    the run's trackers); returns what task.finish returns."""
    run = task.prepare()  # every check before the process group starts and before any file is written
    start_process_group(run.ctx)
    intro = task.begin(run)
    result = TrainingLoop(task=task, run=run, config=config, hooks=[*run.trackers, *hooks], intro=intro).run()
    outcome = task.finish(result)
    cleanup_distributed()
    return outcome

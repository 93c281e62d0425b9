"""Experiment trackers as hooks of the training loop: every metrics record (losses, lr, steps/s,
and for learnable pruning the gate decisions and confidences) also goes to Weights & Biases
(`--wandb`) and/or TensorBoard (`--tensorboard`), from rank 0.

Both packages are optional: a missing one is a one-line error before the run starts. wandb
honours its own environment (WANDB_MODE=offline, WANDB_DIR, ...); the run id is stored in the
run folder (`wandb_run_id.txt`), so `--resume` continues the same wandb run.
"""
import numbers
import os
import uuid

from tinyfusion.errors import TinyFusionError
from tinyfusion.training.hooks import LoopHooks

WANDB_ID_FILE = "wandb_run_id.txt"


def scalars(record):
    """The numeric entries of a metrics record; a list of numbers becomes name/0, name/1, ..."""
    values = {}
    for name, value in record.items():
        if isinstance(value, bool) or name == "step":
            continue
        if isinstance(value, numbers.Number):
            values[name] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Number) for v in value):
            values.update({f"{name}/{index}": float(v) for index, v in enumerate(value)})
    return values


class WandbWriter:
    def __init__(self, run_dir, *, project, run_name, config):
        import wandb
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        run_id = open(id_path).read().strip() if os.path.isfile(id_path) else uuid.uuid4().hex[:8]
        with open(id_path, "w") as f:
            f.write(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name or os.path.basename(run_dir), id=run_id,
                              resume="allow", config=config, dir=run_dir)

    def log(self, values, step):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class TensorBoardWriter:
    def __init__(self, run_dir):
        # torch.utils.tensorboard imports TensorFlow when it is installed (the evaluator's extra), and
        # TensorFlow loaded before torch._dynamo (which the optimizer imports) makes triton's import
        # crash the process: load dynamo first
        import torch._dynamo  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, values, step):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class TrackerHook(LoopHooks):
    """Sends every metrics record to a writer built, on rank 0, once the run folder exists:
    `make_writer(run_dir)` returns an object with log(values, step) and close()."""

    def __init__(self, make_writer):
        self.make_writer, self.writer = make_writer, None

    def start(self, loop):
        if loop.ctx.is_main:
            self.writer = self.make_writer(loop.run_dir)

    def on_log(self, loop, record):
        if self.writer is not None:
            self.writer.log(scalars(record), step=record["step"])

    def close(self, loop):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tracker_hooks(args):
    """The TrackerHooks that --wandb / --tensorboard ask for; a missing package is a one-line
    error here, before anything starts."""
    hooks = []
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TinyFusionError("--wandb needs the wandb package (pip install wandb); drop --wandb to run "
                                  "without it") from None
        config = dict(vars(args))
        hooks.append(TrackerHook(lambda run_dir: WandbWriter(run_dir, project=args.wandb_project,
                                                             run_name=args.wandb_run_name, config=config)))
    if args.tensorboard:
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:  # not imported here: see TensorBoardWriter
            raise TinyFusionError("--tensorboard needs the tensorboard package (pip install tensorboard); drop "
                                  "--tensorboard to run without it")
        hooks.append(TrackerHook(TensorBoardWriter))
    return hooks

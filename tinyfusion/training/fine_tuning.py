"""train.py's training as a task on the loop: the model's own loss (a DiT's Gaussian diffusion
loss, mse + vb; a SiT's transport loss) on every parameter that trains, from scratch, from
--load-weight (e.g. a pruned model to recover) or from the resumed checkpoint. Its checkpoints
hold the whole model and its EMA with the run's metadata (a pruned student's kept indices, the
model family, a SiT's transport), so sample.py reads them."""
from tinyfusion.training.run_setup import prepare_training, training_metadata
from tinyfusion.training.task import TrainingTask, whole_model_weights


class FineTuning(TrainingTask):
    """train.py (see the module docstring); `args` are its parsed flags."""

    def __init__(self, args):
        self.args = args

    def prepare(self):
        return prepare_training(self.args)

    def begin(self, run):
        args, self.run = self.args, run
        intro = (f"run folder {run.run_dir}; model {args.model} (depth {run.model.depth})"
                 + (f" from {args.load_weight}" if args.load_weight and run.resume is None else ""))
        if run.family.describe():
            intro += f"; {run.family.describe()}"
        return [intro]

    def losses(self, forward, x, y, epoch):  # the family's loss: DiT's mse + vb, a SiT's transport loss
        return self.run.family.training_losses(forward, x, y)

    def checkpoint_weights(self, model, ema):
        return whole_model_weights(model, ema, training_metadata(self.run.metadata, model, self.run.family))

"""train.py's training as a task on the loop: the model's own loss (a DiT's Gaussian diffusion
loss, mse + vb; a SiT's transport loss) on every parameter that trains, from scratch, from
--load-weight (e.g. a pruned model to recover) or from the resumed checkpoint. Its checkpoints
hold the whole model and its EMA with the run's metadata (a pruned student's kept indices, the
model family, a SiT's transport), so sample.py reads them."""
import torch

from diffusion import create_diffusion
from tinyfusion.training.run_setup import prepare_training, training_metadata
from tinyfusion.training.task import TrainingTask, whole_model_weights
from transport.loss import training_losses


def diffusion_losses(model, diffusion, x, y):
    """The standard DiT loss of a batch (mse + vb), as fp32 scalars."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    terms = diffusion.training_losses(model, x, t, dict(y=y))
    return {"loss": terms["loss"].mean(), "gt": terms["loss"].mean().detach(), "mse": terms["mse"].mean().detach(),
            "vb": terms["vb"].mean().detach()}


def transport_losses(model, transport, x, y):
    """SiT's training loss of a batch (t and noise drawn from the global generator), fp32 scalars."""
    loss = training_losses(model, x, transport, dict(y=y))["loss"].mean()
    return {"loss": loss, "gt": loss.detach()}


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
        if run.transport is not None:
            intro += f"; transport {run.transport}"
        else:
            self.diffusion = create_diffusion(timestep_respacing="")  # default: 1000 steps, linear, learned sigma
        return [intro]

    def losses(self, forward, x, y, epoch):
        if self.run.transport is not None:
            return transport_losses(forward, self.run.transport, x, y)
        return diffusion_losses(forward, self.diffusion, x, y)

    def checkpoint_weights(self, model, ema):
        return whole_model_weights(model, ema, training_metadata(self.run.metadata, model, self.run.transport))

"""What a task or a script adds to the training loop (tinyfusion/training/loop.py): per-step
work, log fields, checkpoint entries, metric forwarding. Its own module so that the trackers and
the sample-quality hook import it without importing the loop."""


class LoopHooks:
    """What a task or script adds to the loop; override what it needs. Called on every rank with the
    running TrainingLoop (`loop.model`, `loop.ema`, `loop.total_steps`, ...)."""

    def start(self, loop):
        """The run folder exists and the first step is about to run."""

    def before_step(self, loop, step):
        """Step `step` (0-based) is about to run."""

    def log_fields(self, loop, step):
        """(dict of extra metrics, text appended to the log line) at a log step."""
        return {}, ""

    def checkpoint_extra(self, loop):
        """Plain values / tensors stored in every checkpoint besides the weights."""
        return {}

    def on_log(self, loop, record):
        """A metrics record was written (rank 0): e.g. forward it to an experiment tracker."""

    def close(self, loop):
        """The loop ended (normally or not)."""

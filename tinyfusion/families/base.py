"""What every model family answers (the registry is `tinyfusion/families/__init__.py`).

A family object is built from a script's flags (`Family.from_args(args)`) and then holds its
generative process (DiT: the 1000-step Gaussian diffusion; SiT: a transport). Its methods are
small: each hands the call to the family's maths (`diffusion/`, `transport/`) and turns the
maths' ValueErrors into one-line TinyFusionErrors.
"""
from contextlib import contextmanager

from tinyfusion.errors import TinyFusionError
from tinyfusion.families import REGISTRY


@contextmanager
def one_line_errors():
    """The maths packages raise ValueError (they know no flags); a script shows it as one line."""
    try:
        yield
    except ValueError as error:
        raise TinyFusionError(str(error)) from None


class ModelFamily:
    entry = None                              # its FamilyEntry (the registry's plain facts)
    exports_to_diffusers = False              # export_diffusers.py can write it as a diffusers pipeline
    measures_quality_while_training = False   # the training scripts' --eval-every can sample it
    original_grid = False                     # sample.py has the original's batch-noise grid for it
    record_keys = ()                          # the metadata keys `record` writes

    @classmethod
    def from_args(cls, args):
        """The family configured by a script's flags (its own flags checked)."""
        raise NotImplementedError

    def describe(self):
        """What a run's log says of the process beyond the family ("" when there is one setting)."""
        return ""

    # ------------------------------------------------------------------ checkpoints
    def record(self):
        """What a checkpoint of this family records of its process (metadata keys and values)."""
        return {}

    @classmethod
    def recorded_in(cls, metadata):
        """The part of a checkpoint's metadata that is this family's record (a pruned copy keeps it)."""
        return {key: metadata[key] for key in cls.record_keys if (metadata or {}).get(key)}

    def check_record(self, metadata, source):
        """One line when a checkpoint's record says it was trained with another process."""

    def resume_identity(self):
        """Settings a resumed run must share with the run it continues (name -> value)."""
        return {}

    # ------------------------------------------------------------------ training
    def training_losses(self, model, x, y):
        """{"loss": the scalar to minimise, ...: detached fp32 scalars to log} of a batch."""
        raise NotImplementedError

    def kd_losses(self, student, teacher, x, y, **settings):
        """Masked KD's losses of a batch (see diffusion/distillation.py for `settings`)."""
        raise NotImplementedError

    def calibration_inputs(self, x, generator, *, calibration, num_timesteps):
        """(x, t) the BI score measures a block on, drawn from `generator`."""
        raise NotImplementedError

    def calibration_forward(self, model, x, y, generator, *, calibration, num_timesteps):
        """The model called on the BI calibration inputs of latents x and labels y."""
        x_t, t = self.calibration_inputs(x, generator, calibration=calibration, num_timesteps=num_timesteps)
        device = next(model.parameters()).device
        return model(x_t.to(device), t.to(device), y.to(device))

    def check_calibration(self, calibration):
        """One line when prune_by_score.py's --calibration does not fit the family."""

    def calibration_record(self, calibration, num_timesteps):
        """(what prune_by_score.py records of its calibration inputs, their t range in words)."""
        raise NotImplementedError

    def activation_inputs(self, latents, generator, *, when=None, model=None):
        """(x_t, t) visualize_activation.py measures: `when` one timestep/time for all, else drawn."""
        raise NotImplementedError

    @staticmethod
    def activation_forward(model, x_t, t, y):
        """Every block's output on what activation_inputs returned (visualize_activation.py)."""
        from tinyfusion.study.activations import every_block_output
        return every_block_output(model, x_t, t, y)

    def check_noising_flags(self, model_name, *, timestep, time):
        """One line when visualize_activation.py gets the other family's --timestep / --time."""

    def noising_record(self, when):
        """What visualize_activation.py's JSON says of its noising."""
        raise NotImplementedError

    # ------------------------------------------------------------------ sampling
    def check_sampler(self, model_name, sampler):
        """One line when `sampler` is not one of this family's."""
        if sampler in self.entry.samplers:
            return
        owner = next((entry.name for entry in REGISTRY if sampler in entry.samplers), "other")
        choices = ", ".join(self.entry.samplers[:-1]) + " or " + self.entry.samplers[-1]
        raise TinyFusionError(f"--sampler {sampler} is for {owner} models; {model_name} is a {self.entry.name} "
                              f"(use {choices})")

    def sampling_options(self, args):
        """The sampler's keywords from the sampling flags (after check_sampler), checked."""
        return None

    def sampling_process(self, sampler, num_steps, timestep_spacing, options):
        """What `generate` hands to run_sampler."""
        raise NotImplementedError

    @staticmethod
    def run_sampler(process, sampler, model_fn, shape, loop_kwargs, eta, options, context=None):
        """Final latents from the start noise in loop_kwargs (see tinyfusion.sampling.generate);
        context: the model, per-sample generators, guidance scale and autocast (dtype, device),
        for a loop that needs more than model_fn (MAR's)."""
        raise NotImplementedError

    def sample_name_suffix(self, args, options):
        """Appended to a sample run's name so that two sampler settings never share a folder."""
        return ""

    def sample_identity(self, args, options):
        """The flags that change the images beyond the shared ones (sample_ddp's settings.json)."""
        return {}

    def check_preview_steps(self, num_steps):
        """One line when preview_samples cannot run with `num_steps`."""

    def preview_samples(self, model, labels, *, seed, cfg_scale, num_steps, vae, device):
        """A few decoded samples of `labels` that show what a model does (prune_by_score's --sample-grid)."""
        raise NotImplementedError

    @classmethod
    def default_checkpoint(cls, model_name, image_size):
        """The released checkpoint used without --ckpt (downloaded if missing)."""
        raise TinyFusionError(f"--ckpt is required for --model {model_name} at --image-size {image_size}")

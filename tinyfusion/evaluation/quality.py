"""Sample quality while training (train.py / train_masked_kd.py --eval-every N, ours).

Every N steps (and at the last step) rank 0 samples a fixed set of images from the EMA weights
with a fast solver (sample i: label and noise from (--eval-seed, i), as sample_ddp.py), computes
their features with evaluator.py's network (the Inception graph, or --eval-feature-net) and logs
the FID against --eval-ref (and the classifier's accuracy with a feature net) in the log line,
metrics.jsonl and the trackers, so a fine-tune that goes wrong shows it early.

The training is untouched: sampling runs on a copy of the model under torch.random.fork_rng (the
CPU and CUDA generators are restored afterwards; the samples' own noise comes from their own
generators), so a run with --eval-every ends with bit-identical weights and a resume stays exact.
The other ranks wait at their next gradient all-reduce meanwhile.
"""
import copy
import os

import numpy as np
import torch

from tinyfusion.flags import resolve_timestep_spacing
from tinyfusion.errors import TinyFusionError
from tinyfusion.families import family_for_model
from tinyfusion.training.hooks import LoopHooks


def check_eval_args(args):
    """One line for unusable --eval-* flags, before any work (None when --eval-every is off)."""
    if args.eval_every is None:
        return
    if not args.eval_ref:
        raise TinyFusionError("--eval-every needs --eval-ref: the reference batch .npz the FID is measured against")
    for flag, path in (("--eval-ref", args.eval_ref), ("--eval-feature-net", args.eval_feature_net)):
        if path is not None and not os.path.isfile(path):
            raise TinyFusionError(f"{flag} {path} does not exist")
    if args.eval_every % args.log_every:
        raise TinyFusionError(f"--eval-every {args.eval_every} must be a multiple of --log-every {args.log_every} "
                              f"(the measurements go into the log records)")
    family = family_for_model(args.model)
    if not family.measures_quality_while_training:
        raise TinyFusionError(f"--eval-every samples with DiT's samplers; it is not available for a {family.entry.name}")


class SampleQualityHook(LoopHooks):
    """The --eval-every measurement, as a training-loop hook (see the module docstring)."""

    def __init__(self, *, every, reference, feature_net, num_samples, sampler, steps, cfg_scale, seed, batch_size,
                 vae, vae_path):
        self.every, self.reference_path, self.feature_net = every, reference, feature_net
        self.num_samples, self.sampler, self.steps, self.cfg_scale = num_samples, sampler, steps, cfg_scale
        self.seed, self.batch_size, self.vae_name, self.vae_path = seed, batch_size, vae, vae_path

    def start(self, loop):
        if not loop.ctx.is_main:
            return
        from tinyfusion.evaluation.batch_metrics import reference_activations
        from tinyfusion.evaluation.feature_networks import load_feature_network
        from tinyfusion.evaluation.npz_batches import read_npz_statistics
        from tinyfusion.families.dit import sampling_process
        from tinyfusion.io.vae import load_vae
        self.network = load_feature_network(self.feature_net, device=loop.device)
        self.reference = reference_activations(self.reference_path, self.network, self.batch_size,
                                               log=loop.logger.info)
        if self.network.uses_npz_statistics:  # ADM reference batches store Inception's mu / sigma
            self.reference.update(read_npz_statistics(self.reference_path) or {})
        self.vae = load_vae(self.vae_name, self.vae_path, loop.device)
        self.process = sampling_process(self.sampler, self.steps, resolve_timestep_spacing(self.sampler, None))

    def log_fields(self, loop, step):
        if not loop.ctx.is_main or (step % self.every and step != loop.total_steps):
            return {}, ""
        devices = [torch.cuda.current_device()] if loop.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training's random stream stays untouched
            fid, accuracy = self.measure(loop)
        fields = {"eval_fid": fid, **({"eval_accuracy": accuracy} if accuracy is not None else {})}
        text = f"eval FID {fid:.3f}" + (f" accuracy {accuracy:.3f}" if accuracy is not None else "")
        return fields, f"{text} ({self.num_samples} samples, {self.sampler} {self.steps} steps)"

    @torch.no_grad()
    def measure(self, loop):
        """(FID, classifier accuracy or None) of the EMA weights' samples."""
        from tinyfusion.evaluation import metrics
        model = copy.deepcopy(loop.model).eval().requires_grad_(False)
        model.load_state_dict(loop.ema.model_state_dict(loop.model))
        images, labels = self.sample(model)
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            pool, _, logit = self.network(images[start: start + self.batch_size].astype(np.float32))
            pools.append(pool)
            logits.append(logit)
        mu, sigma = metrics.compute_statistics(np.concatenate(pools))
        fid = metrics.frechet_distance(mu, sigma, self.reference["mu"], self.reference["sigma"])
        accuracy = None
        if self.feature_net is not None:  # Inception's outputs are not the model's classes
            accuracy = metrics.classifier_accuracy(np.concatenate(logits), labels)
        return float(fid), accuracy

    def sample(self, model):
        """uint8 NHWC images and labels of samples 0..num_samples-1 (per-sample seeds, as sample_ddp.py)."""
        from tinyfusion.sampling.generate import generate, sample_generator, sample_labels
        from tinyfusion.io.vae import to_uint8_nhwc
        labels = sample_labels(self.seed, range(self.num_samples), model.num_classes)
        images = []
        for start in range(0, self.num_samples, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num_samples))
            batch = generate(model, self.process, labels[start: indices.stop],
                             [sample_generator(self.seed, i) for i in indices], self.cfg_scale, self.sampler,
                             vae=self.vae, pad_to=self.batch_size)
            images.append(to_uint8_nhwc(batch).numpy())
        return np.concatenate(images), labels.numpy()


def eval_hooks(args):
    """[the --eval-every hook] or [] (after check_eval_args)."""
    if args.eval_every is None:
        return []
    return [SampleQualityHook(every=args.eval_every, reference=args.eval_ref, feature_net=args.eval_feature_net,
                              num_samples=args.eval_samples, sampler=args.eval_sampler, steps=args.eval_steps,
                              cfg_scale=args.eval_cfg_scale, seed=args.eval_seed, batch_size=args.eval_batch_size,
                              vae=args.vae, vae_path=args.vae_path)]

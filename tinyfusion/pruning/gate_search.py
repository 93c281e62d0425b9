"""prune_by_learning.py's learnable depth pruning (TinyFusion; the script's docstring describes the
method) as a task on the training loop: the gated model and what trains (the gate logits; with
--delta-w also LoRA factors or the weights), the search loss, tau and the logit scaling annealed
linearly over the run, the decision of the EMA logits (kept blocks, confidences) in the log and
in every checkpoint, and at the end that decision applied to the ORIGINAL weights and saved.
Checkpoints and the EMA cover only what trains; the frozen model is not wrapped in DDP (the few
trained gradients are all-reduced by hand).
"""
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from models import ALL_MODELS, gate_decision
from tinyfusion.errors import TinyFusionError
from tinyfusion.families.build import unknown_model_message
from tinyfusion.pruning.lora import apply_lora
from tinyfusion.pruning.pruned_models import (check_output_path, linear_schedule, load_source_model, plain_name,
                                              save_pruned, source_lineage)
from tinyfusion.sampling.cpu_compile import compile_options
from tinyfusion.training.run_setup import loop_config, prepare_training, resumed_flag
from tinyfusion.training.task import TrainingTask


def gated_groups(args):
    """The gating pattern: --groups, else the gated --model's own."""
    if args.model not in ALL_MODELS:
        raise TinyFusionError(unknown_model_message(args.model))
    groups = args.groups or ALL_MODELS[args.model].default_groups
    if groups is None:
        raise TinyFusionError(f"--model {args.model} has no gates; use a gated model (DiT-XL-1-2, DiT-XL-2-4, "
                              f"DiT-XL-7-14, DiT-XL-1-4, DiT-D14-1-2, DiT-D14-2-4) or pass --groups \"[[1,2]]*14\"")
    return groups


def build_gated_model(args, groups):
    """The gated model on the original weights with what trains marked requires_grad:
    gate logits always; with --delta-w also LoRA factors (--lora) or all weights."""
    model, source_metadata = load_source_model(args.model, args.load_weight, args.image_size, args.num_classes,
                                               args.vae, args.vae_path, groups=groups)
    if args.delta_w and args.lora:
        apply_lora(model, rank=args.lora_rank, seed=args.global_seed)  # freezes everything else
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(args.delta_w and name != "pos_embed")
    for logits in model.gate_logits:
        logits.requires_grad_(True)
    return model, source_metadata


def trainable_groups(model):
    """([(name, param)] of trained weights, [(name, param)] of gate logits)."""
    weights, logits = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (logits if name.startswith("gate_logits.") else weights).append((name, param))
    return weights, logits


def restore_trained_parameters(model, checkpoint, path):
    """Copy the trained parameters (logits, LoRA factors or weights) of a search checkpoint."""
    weights, logits = trainable_groups(model)
    missing = [name for name, _ in weights + logits if name not in checkpoint["model"]]
    if missing:
        raise TinyFusionError(f"{path} lacks {missing[:2]}; resume with the same --model/--groups/"
                              f"--delta-w/--lora/--lora-rank it was started with")
    with torch.no_grad():
        for name, param in weights + logits:
            param.copy_(checkpoint["model"][name])


def ema_logits(ema, num_groups):
    state = dict(zip(ema.names, ema.shadows))
    return [state[f"gate_logits.{index}"] for index in range(num_groups)]


def trained_weights(model, ema):
    """What a search checkpoint holds: the trained parameters and their EMA (not the frozen model)."""
    return {name: param.detach().cpu().clone() for name, param in zip(ema.names, ema.sources)}, ema.state_dict()


def describe_search(args, groups, model):
    weights, logits = trainable_groups(model)
    total = sum(param.numel() for param in model.parameters())
    trained = sum(param.numel() for _, param in weights + logits)
    how = f", LoRA rank {args.lora_rank}" if args.delta_w and args.lora else ", all weights" if args.delta_w else ""
    lines = [f"{args.model} with groups {groups}: {trained:,} of {total:,} parameters train "
             f"({100.0 * trained / total:.3f}%: {len(logits)} gate logit vectors{how}); tau {args.tau_range[0]} -> "
             f"{args.tau_range[1]}, scaling {args.scaling_range[0]} -> {args.scaling_range[1]}"]
    if args.lora and not args.delta_w:
        lines.append("--lora has no effect without --delta-w: only the gate logits train")
    return lines


def save_decision(args, groups, kept, choices, confidences, final_logits, result, run_dir, save_path,
                  source_metadata, family):
    """Apply the decision to the ORIGINAL weights (the LoRA / weight update only estimated how well
    each choice recovers and is discarded) and save the shallow model with its metadata."""
    source_name = plain_name(args.model)
    original, _ = load_source_model(source_name, args.load_weight, args.image_size, args.num_classes, args.vae,
                                    args.vae_path)
    metadata = dict(method="learnable", source_model=source_name, source_checkpoint=args.load_weight,
                    source_depth=original.depth, groups=groups, choices=choices, confidences=confidences,
                    scores=final_logits, steps=result.train_steps, skipped_steps=result.skipped_steps,
                    delta_w=bool(args.delta_w), lora=bool(args.delta_w and args.lora), lora_rank=args.lora_rank,
                    tau_range=list(args.tau_range), scaling_range=list(args.scaling_range),
                    run_dir=run_dir, **source_lineage(source_metadata, kept), **family.record())
    save_pruned(original, kept, save_path, metadata, overwrite=args.overwrite)
    result.logger.info(f"saved the {len(kept)}-block model to {save_path}")


def search_loop_config(args):
    """The loop's configuration from the flags; --compile compiles the gated model's blocks one
    by one (GateSearch.begin, models.DiT.compile_gated_blocks) instead of the loop's whole-model graph."""
    config = loop_config(args)
    return replace(config, compile_model=False) if args.compile else config


class GateSearch(TrainingTask):
    """prune_by_learning.py (see the module docstring) on the loop; `args` are its parsed flags.
    `finish` returns the kept block indices."""

    progress_label = "prune"
    gradient_sync = "all_reduce"  # the frozen model is not wrapped in DDP: only the few trained grads are averaged

    def __init__(self, args):
        self.args = args

    # ------------------------------------------------------------------ before the loop
    def prepare(self):
        """Every check and load before the process group starts and before any file is written."""
        args = self.args
        if args.compile and args.recompute_elementwise:
            raise TinyFusionError("--recompute-elementwise is for eager runs: with --compile the compiler already "
                                  "recomputes elementwise ops in backward; pass one of the two")
        self.groups = gated_groups(args)
        return prepare_training(args, self.build_model)

    def build_model(self, args, run):
        """The gated model on --load-weight (or the resumed search's), with the trained parameters
        of a resumed search restored; the pruned model's path is checked first."""
        args.load_weight = args.load_weight or resumed_flag(run.resume, "load_weight")
        if not args.load_weight:
            raise TinyFusionError("--load-weight is required: the checkpoint to prune, e.g. "
                                  "pretrained/DiT-XL-2-256x256.pt")
        self.save_path = args.save_model or os.path.join(run.run_dir, "pruned.pt")
        check_output_path(self.save_path, args.overwrite)
        model, source_metadata = build_gated_model(args, self.groups)
        run.family.check_record(source_metadata, args.load_weight)
        if run.resume is not None:
            restore_trained_parameters(model, run.resume, run.resume_path)
        return model, source_metadata

    def begin(self, run):
        args, self.run, model = self.args, run, run.model
        model.gate_recompute_elementwise = args.recompute_elementwise
        if args.compile:
            model.compile_gated_blocks(options=compile_options(next(model.parameters()).device))
        return describe_search(args, self.groups, model)

    def param_groups(self, model):
        """The trained weights (if any) at --lr, the gate logits at --logits-lr-scale x --lr."""
        weights, logits = trainable_groups(model)
        return ([([p for _, p in weights], 1.0)] if weights else []) + \
            [([p for _, p in logits], self.args.logits_lr_scale)]

    # ------------------------------------------------------------------ every step
    def losses(self, forward, x, y, epoch):
        """The family's training loss (DiT's mse + vb, a SiT's transport loss); the gated model
        draws each sample's block mask itself (train mode)."""
        return {"loss": self.run.family.training_losses(forward, x, y)["loss"]}

    def before_step(self, loop, step):
        loop.model.tau = linear_schedule(*self.args.tau_range, step, loop.total_steps)
        loop.model.scaling = linear_schedule(*self.args.scaling_range, step, loop.total_steps)

    def decision(self, ema, scaling):
        return gate_decision(self.groups, ema_logits(ema, len(self.groups)), scaling)

    def log_fields(self, loop, step):
        kept, choices, confidences = self.decision(loop.ema, loop.model.scaling)
        fields = dict(tau=loop.model.tau, scaling=loop.model.scaling, kept_indices=kept, choices=choices,
                      confidences=confidences, groups=self.groups)
        return fields, (f"tau {loop.model.tau:.3f} scaling {loop.model.scaling:.1f} kept {kept} confidence "
                        f"[{', '.join(f'{c:.2f}' for c in confidences)}]")

    def checkpoint_weights(self, model, ema):
        return trained_weights(model, ema)

    def checkpoint_extra(self, loop):
        kept, _, confidences = self.decision(loop.ema, loop.model.scaling)
        return {"kept_indices": kept, "confidences": confidences, "groups": self.groups}

    # ------------------------------------------------------------------ after the loop
    def finish(self, result):
        """The decision of the EMA logits at the final scaling, applied to the original weights and
        saved by rank 0; returns the kept block indices."""
        args, run = self.args, self.run
        run.model = None  # the gated model with its LoRA adapters is not needed any more
        final_scaling = linear_schedule(*args.scaling_range, result.train_steps - 1, result.train_steps)
        kept, choices, confidences = self.decision(result.ema, final_scaling)
        result.logger.info(f"decision after {result.train_steps} steps: keep blocks {kept} (confidence per group "
                           f"[{', '.join(f'{c:.3f}' for c in confidences)}])")
        if run.ctx.is_main:
            final_logits = [[float(v) for v in group_logits]
                            for group_logits in ema_logits(result.ema, len(self.groups))]
            save_decision(args, self.groups, kept, choices, confidences, final_logits, result, run.run_dir,
                          self.save_path, run.metadata, run.family)
        if run.ctx.is_distributed:
            dist.barrier()
        return kept

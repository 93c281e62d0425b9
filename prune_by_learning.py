"""Learnable depth pruning (TinyFusion): learn which N of every M blocks to keep
by sampling per-sample block masks from trainable gate logits (hard Gumbel-softmax,
straight-through) while the model is optionally fine-tuned (`--delta-w`, with `--lora` by LoRA
adapters), so the search prefers the sub-network that recovers best. At the end the decision of
the EMA logits is applied to the ORIGINAL weights and the shallow model is saved.

    torchrun --nnodes=1 --nproc_per_node=8 prune_by_learning.py --model DiT-XL-1-2 \
        --load-weight pretrained/DiT-XL-2-256x256.pt --data-path data/imagenet_encoded \
        --epochs 1 --global-batch-size 128 --delta-w --lora --save-model outputs/pruned/DiT-D14-Learned.pt

Only the gate logits and the LoRA factors (or, with --delta-w alone, the weights) train; the
frozen model is not wrapped in DDP: their gradients are all-reduced by hand. The gated forward
runs a block's backward pass only for the samples that keep it (models.DiT.gate_forward
"sparse"), and the EMA covers only what trains. `--compile` compiles each block (dynamic batch
size, so the changing sub-batches do not recompile). The loop is tinyfusion/training/loop.py's, with the tau /
scaling annealing and the gate decisions added as hooks.

A gated SiT (`--model SiT-XL-1-2`, or a SiT with --groups) searches on SiT's transport loss, with
train.py's SiT flags (--path-type, --prediction, --loss-weight, --train-eps, --sample-eps).
"""
import os
from dataclasses import dataclass, replace

from tinyfusion.flags import (ArgumentParser, add_model_args, add_precision_arg, add_training_args,
                            add_transport_training_args, positive_float, positive_int)
from tinyfusion.errors import TinyFusionError, run_main


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL-1-2")
    add_training_args(parser, lr=1e-4, lr_schedule="constant", min_lr=0.0, epochs=1, global_batch_size=128,
                      log_every=50, ema_decay=0.999)
    add_precision_arg(parser)
    add_transport_training_args(parser)
    parser.add_argument("--delta-w", action="store_true",
                        help="also update the weights during the search (recoverability); without it only the logits train")
    parser.add_argument("--lora", action="store_true", help="with --delta-w: update the weights through LoRA adapters")
    parser.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--recompute-elementwise", action="store_true",
                        help="keep only matmul and attention outputs for backward and recompute the elementwise "
                             "ops: less activation memory (0.44x instead of 0.54x the original's step, measured), "
                             "slower (about 1.2x on CPU); same values and gradients")
    parser.add_argument("--tau-range", type=positive_float, nargs=2, default=[4.0, 0.1], metavar=("START", "END"),
                        help="Gumbel temperature (> 0), linear from START to END over the run (the paper anneals, "
                             "START > END; START = END keeps it constant)")
    parser.add_argument("--scaling-range", type=positive_float, nargs=2, default=[100.0, 100.0], metavar=("START", "END"),
                        help="logit scale (> 0: a negative one would prefer the worst blocks), linear from START to END")
    parser.add_argument("--logits-lr-scale", type=positive_float, default=10.0,
                        help="gate-logit lr = this x --lr (> 0: a negative lr would ascend the loss)")
    parser.add_argument("--save-model", type=str, default=None,
                        help="where to save the pruned model (default: pruned.pt in the run folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-model file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import torch
import torch.distributed as dist

from diffusion import create_diffusion
from models import DiT_models, SiT_models, gate_decision
from tinyfusion.distributed import check_global_batch, cleanup_distributed, distributed_context, start_process_group
from tinyfusion.sampling.cpu_compile import compile_options
from tinyfusion.pruning.lora import apply_lora
from tinyfusion.training.hooks import LoopHooks
from tinyfusion.training.loop import train_loop
from tinyfusion.pruning.pruned_models import (check_output_path, linear_schedule, load_source_model, plain_name, save_pruned,
                                source_lineage)
from tinyfusion.training.resume import seed_everything
from tinyfusion.training.trackers import tracker_hooks
from tinyfusion.io.checkpoints import MODEL_FAMILIES
from tinyfusion.training.run_setup import (PreparedRun, check_dataset_fits, device_flag, loop_config, open_training_data,
                                  resolve_run, resumed_flag)
from transport.cli import check_transport_flags, check_transport_record, transport_record
from transport.loss import training_losses


def gated_groups(args):
    """The gating pattern: --groups, else the gated --model's own."""
    registry = {**DiT_models, **SiT_models}
    if args.model not in registry:
        raise TinyFusionError(f"unknown --model {args.model}; choose one of {', '.join(DiT_models)} (or their SiT- "
                              f"twins)")
    groups = args.groups or registry[args.model].default_groups
    if groups is None:
        raise TinyFusionError(f"--model {args.model} has no gates; use a gated model (DiT-XL-1-2, DiT-XL-2-4, "
                              f"DiT-XL-7-14, DiT-XL-1-4, DiT-D14-1-2, DiT-D14-2-4) or pass --groups \"[[1,2]]*14\"")
    return groups


def build_gated_model(args, groups):
    """The gated model on the original weights with what trains marked requires_grad:
    gate logits always; with --delta-w also LoRA factors (--lora) or all weights."""
    model, source_metadata = load_source_model(args.model, args.load_weight, args.image_size, args.num_classes,
                                               args.vae, args.vae_path, groups=groups, families=MODEL_FAMILIES)
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


def pruning_loss(forward, diffusion, x, y):
    """The diffusion training loss at uniformly drawn timesteps; the gated model draws each
    sample's block mask itself (train mode)."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    return diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()


def transport_pruning_loss(forward, transport, x, y):
    """A gated SiT's search loss: SiT's transport loss (t and noise from the global generator)."""
    return training_losses(forward, x, transport, dict(y=y))["loss"].mean()


class GateSearch(LoopHooks):
    """The loop hooks of the search: tau and scaling annealed linearly over the run, and the
    decision of the EMA logits (kept blocks, confidences) in the log and in every checkpoint."""

    def __init__(self, groups, tau_range, scaling_range):
        self.groups, self.tau_range, self.scaling_range = groups, tau_range, scaling_range

    def before_step(self, loop, step):
        loop.model.tau = linear_schedule(*self.tau_range, step, loop.total_steps)
        loop.model.scaling = linear_schedule(*self.scaling_range, step, loop.total_steps)

    def decision(self, ema, scaling):
        return gate_decision(self.groups, ema_logits(ema, len(self.groups)), scaling)

    def log_fields(self, loop, step):
        kept, choices, confidences = self.decision(loop.ema, loop.model.scaling)
        fields = dict(tau=loop.model.tau, scaling=loop.model.scaling, kept_indices=kept, choices=choices,
                      confidences=confidences, groups=self.groups)
        return fields, (f"tau {loop.model.tau:.3f} scaling {loop.model.scaling:.1f} kept {kept} confidence "
                        f"[{', '.join(f'{c:.2f}' for c in confidences)}]")

    def checkpoint_extra(self, loop):
        kept, _, confidences = self.decision(loop.ema, loop.model.scaling)
        return {"kept_indices": kept, "confidences": confidences, "groups": self.groups}


@dataclass
class PreparedSearch(PreparedRun):
    groups: list = None        # the gating pattern
    save_path: str = None      # where the pruned model goes


def prepare_search(args):
    """Every check and load before the process group starts and before any file is written."""
    if args.compile and args.recompute_elementwise:
        raise TinyFusionError("--recompute-elementwise is for eager runs: with --compile the compiler already "
                              "recomputes elementwise ops in backward; pass one of the two")
    transport = check_transport_flags(args)  # a SiT's transport; a DiT refuses SiT flags
    ctx = distributed_context(device_flag(args))
    groups = gated_groups(args)
    check_global_batch(args.global_batch_size, ctx)
    run_dir, resume_path, resume = resolve_run(args, ctx)
    args.load_weight = args.load_weight or resumed_flag(resume, "load_weight")
    if not args.load_weight:
        raise TinyFusionError("--load-weight is required: the checkpoint to prune, e.g. pretrained/DiT-XL-2-256x256.pt")
    save_path = args.save_model or os.path.join(run_dir, "pruned.pt")
    check_output_path(save_path, args.overwrite)
    seed_everything(args.global_seed, ctx)
    model, source_metadata = build_gated_model(args, groups)
    check_transport_record(source_metadata, transport, args.load_weight)
    if resume is not None:
        restore_trained_parameters(model, resume, resume_path)
    dataset = open_training_data(args.data_path, args.global_seed)
    check_dataset_fits(dataset, model, data_path=args.data_path, model_name=args.model, vae=args.vae,
                       image_size=args.image_size)
    return PreparedSearch(ctx, dataset, run_dir, resume_path, resume, model, source_metadata, tracker_hooks(args),
                          transport=transport, groups=groups, save_path=save_path)


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
                  source_metadata, transport=None):
    """Apply the decision to the ORIGINAL weights (the LoRA / weight update only estimated how well
    each choice recovers and is discarded) and save the shallow model with its metadata."""
    source_name = plain_name(args.model)
    original, _ = load_source_model(source_name, args.load_weight, args.image_size, args.num_classes, args.vae,
                                    args.vae_path, families=MODEL_FAMILIES)
    metadata = dict(method="learnable", source_model=source_name, source_checkpoint=args.load_weight,
                    source_depth=original.depth, groups=groups, choices=choices, confidences=confidences,
                    scores=final_logits, steps=result.train_steps, skipped_steps=result.skipped_steps,
                    delta_w=bool(args.delta_w), lora=bool(args.delta_w and args.lora), lora_rank=args.lora_rank,
                    tau_range=list(args.tau_range), scaling_range=list(args.scaling_range),
                    run_dir=run_dir, **source_lineage(source_metadata, kept))
    if transport is not None:
        metadata["transport"] = transport_record(transport)
    save_pruned(original, kept, save_path, metadata, overwrite=args.overwrite)
    result.logger.info(f"saved the {len(kept)}-block model to {save_path}")


def search_loop_config(args, model):
    """The loop's configuration from the flags; --compile compiles the gated model's blocks one by one
    (models.DiT.compile_gated_blocks) instead of the loop's whole-model graph."""
    config = loop_config(args)
    model.gate_recompute_elementwise = args.recompute_elementwise
    if args.compile:
        model.compile_gated_blocks(options=compile_options(next(model.parameters()).device))
        config = replace(config, compile_model=False)
    return config


def main(args):
    run = prepare_search(args)
    start_process_group(run.ctx)
    if run.transport is not None:
        def search_loss(forward, x, y, epoch):
            return {"loss": transport_pruning_loss(forward, run.transport, x, y)}
    else:
        diffusion = create_diffusion("")

        def search_loss(forward, x, y, epoch):
            return {"loss": pruning_loss(forward, diffusion, x, y)}
    search = GateSearch(run.groups, args.tau_range, args.scaling_range)
    weights, logits = trainable_groups(run.model)
    param_groups = ([([p for _, p in weights], 1.0)] if weights else []) + \
        [([p for _, p in logits], args.logits_lr_scale)]
    result = train_loop(model=run.model, dataset=run.dataset, ctx=run.ctx, run_dir=run.run_dir,
                        intro=describe_search(args, run.groups, run.model), progress_label="prune",
                        compute_losses=search_loss,
                        param_groups=param_groups, gradient_sync="all_reduce", checkpoint_weights=trained_weights,
                        hooks=[search, *run.trackers], resume_checkpoint=run.resume, resume_path=run.resume_path,
                        config=search_loop_config(args, run.model))
    run.model = None  # the gated model with its LoRA adapters is not needed any more
    # the decision of the EMA logits at the final scaling
    final_scaling = linear_schedule(*args.scaling_range, result.train_steps - 1, result.train_steps)
    kept, choices, confidences = search.decision(result.ema, final_scaling)
    result.logger.info(f"decision after {result.train_steps} steps: keep blocks {kept} (confidence per group "
                       f"[{', '.join(f'{c:.3f}' for c in confidences)}])")
    if run.ctx.is_main:
        final_logits = [[float(v) for v in group_logits] for group_logits in ema_logits(result.ema, len(run.groups))]
        save_decision(args, run.groups, kept, choices, confidences, final_logits, result, run.run_dir, run.save_path,
                      run.metadata, run.transport)
    if run.ctx.is_distributed:
        dist.barrier()
    cleanup_distributed()
    return kept


if __name__ == "__main__":
    run_main(main, ARGS)

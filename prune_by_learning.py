"""Learnable depth pruning (TinyFusion, SPEC section 6): learn which N of every M blocks to keep
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
"sparse"), and the EMA covers only what trains.
"""
import argparse
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from tinyfusion.cli import add_model_args, add_precision_arg, resolve_precision
from diffusion import create_diffusion
from tinyfusion.distributed import check_global_batch, cleanup_distributed, setup_distributed
from tinyfusion.ema import ParameterEMA
from tinyfusion.lora import apply_lora
from models import DiT_models
from tinyfusion.pruning import (check_output_path, gate_decision, linear_schedule, load_source_model, plain_name, save_pruned,
                     source_lineage)
from tinyfusion.runlog import checkpoint_path, run_folder_name
from tinyfusion.training import (AutocastForward, NonFiniteGuard, ThroughputMeter, add_training_args, all_reduce_gradients,
                      check_dataset_fits, check_resume_compatible, device_flag, iterate_epoch,
                      load_training_checkpoint, normalize_position, open_run_folder, open_training_data,
                      resolve_resume, restore_rank_rng, save_training_checkpoint, seed_everything,
                      step_unless_nonfinite, total_training_steps)
from tinyfusion.errors import run_main


def gated_groups(args):
    """The gating pattern: --groups, else the gated --model's own."""
    if args.model not in DiT_models:
        raise SystemExit(f"error: unknown --model {args.model}; choose one of {', '.join(DiT_models)}")
    groups = args.groups or DiT_models[args.model].default_groups
    if groups is None:
        raise SystemExit(f"error: --model {args.model} has no gates; use a gated model (DiT-XL-1-2, DiT-XL-2-4, "
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


def ema_logits(ema, num_groups):
    state = dict(zip(ema.names, ema.shadows))
    return [state[f"gate_logits.{index}"] for index in range(num_groups)]


def pruning_loss(forward, diffusion, x, y):
    """The diffusion training loss at uniformly drawn timesteps; the gated model draws each
    sample's block mask itself (train mode)."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    return diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()


def main(args):
    ctx = setup_distributed(device_flag(args))
    device = ctx.device
    groups = gated_groups(args)
    per_rank_batch = check_global_batch(args.global_batch_size, ctx)
    run_dir = run_folder_name(args.results_dir, args.prefix, args.model)
    resume_path = resolve_resume(args.resume, run_dir)
    resume = load_training_checkpoint(resume_path) if resume_path else None
    if resume is not None:
        check_resume_compatible(resume, args, resume_path)
        args.load_weight = args.load_weight or getattr(resume.get("args"), "load_weight", None)
    if not args.load_weight:
        raise SystemExit("error: --load-weight is required: the checkpoint to prune, e.g. pretrained/DiT-XL-2-256x256.pt")
    save_path = args.save_model or os.path.join(run_dir, "pruned.pt")
    check_output_path(save_path, args.overwrite)
    logger, metrics = open_run_folder(args, ctx, run_dir, resuming=resume is not None)
    seed_everything(args.global_seed, ctx)
    if args.lora and not args.delta_w:
        logger.info("--lora has no effect without --delta-w: only the gate logits train")
    if args.compile:
        logger.info("--compile is ignored by pruning (the gated forward's sub-batches change shape every step)")

    model, source_metadata = build_gated_model(args, groups)
    model.to(device).train()
    model.grad_checkpointing = bool(args.grad_checkpointing)
    weights, logits = trainable_groups(model)
    trainable = [param for _, param in weights + logits]
    param_groups = [{"params": [param for _, param in logits], "lr": args.lr * args.logits_lr_scale}]
    if weights:
        param_groups.insert(0, {"params": [param for _, param in weights], "lr": args.lr})
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    ema = ParameterEMA(weights + logits, args.ema_decay)
    total_params = sum(param.numel() for param in model.parameters())
    trained = sum(param.numel() for param in trainable)
    logger.info(f"{args.model} with groups {groups}: {trained:,} of {total_params:,} parameters train "
                f"({100.0 * trained / total_params:.3f}%: {len(logits)} gate logit vectors"
                f"{', LoRA rank %d' % args.lora_rank if args.delta_w and args.lora else ', all weights' if args.delta_w else ''})")

    dataset = open_training_data(args, ctx)
    check_dataset_fits(dataset, model, args)
    from tinyfusion.feature_store import batches_per_epoch, make_loader
    try:
        loader, sampler = make_loader(dataset, per_rank_batch, ctx, seed=args.global_seed, num_workers=args.num_workers)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    steps_per_epoch = batches_per_epoch(sampler)
    total_steps = total_training_steps(args.epochs, steps_per_epoch, args.max_steps)
    guard = NonFiniteGuard(args.max_skipped_in_a_row)
    precision = resolve_precision(args.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None  # fp16 needs loss scaling
    train_steps, epoch, start_batch = 0, 0, 0
    if resume is not None:
        trained_state = resume["model"]
        missing = [name for name, _ in weights + logits if name not in trained_state]
        if missing:
            raise SystemExit(f"error: {resume_path} lacks {missing[:2]}; resume with the same --model/--groups/"
                             f"--delta-w/--lora/--lora-rank it was started with")
        with torch.no_grad():
            for name, param in weights + logits:
                param.copy_(trained_state[name])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["opt"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        train_steps = int(resume["train_steps"])
        epoch, start_batch = normalize_position(int(resume.get("epoch", 0)), int(resume.get("batches_into_epoch", 0)),
                                                steps_per_epoch)
        guard.skipped_total = int(resume.get("skipped_steps", 0))
        if not restore_rank_rng(resume, ctx, args.global_seed):
            logger.info(f"the checkpoint was written with {resume.get('world_size')} ranks, this run has "
                        f"{ctx.world_size}: RNG streams re-seeded")
        logger.info(f"resumed {resume_path} at step {train_steps} of {total_steps}")

    diffusion = create_diffusion("")
    forward = AutocastForward(model, precision, device)
    num_groups = len(groups)

    def decision(scaling):
        return gate_decision(groups, ema_logits(ema, num_groups), scaling)

    def save(step, epoch_now, batches_done):
        path = checkpoint_path(run_dir, step)
        kept, _, confidences = decision(model.scaling)
        save_training_checkpoint(
            path, ctx, model_state=lambda: {name: param.detach().cpu().clone() for name, param in weights + logits},
            ema_state=ema.state_dict, optimizer=optimizer, scheduler=None, train_steps=step, epoch=epoch_now,
            batches_into_epoch=batches_done, args=args, scaler=scaler,
            extra={"skipped_steps": guard.skipped_total, "kept_indices": kept, "confidences": confidences,
                   "groups": groups})
        logger.info(f"saved checkpoint {path}")

    logger.info(f"{len(dataset):,} samples, {steps_per_epoch} steps per epoch, {total_steps} steps; tau "
                f"{args.tau_range[0]} -> {args.tau_range[1]}, scaling {args.scaling_range[0]} -> {args.scaling_range[1]}; "
                f"precision {str(precision).replace('torch.', '')}; {ctx.world_size} rank(s) ({ctx.backend})")
    meter = ThroughputMeter(device)
    window_loss, window_steps = 0.0, 0
    last_saved = train_steps if resume is not None else None
    progress = tqdm(total=total_steps, initial=train_steps, disable=not ctx.is_main, desc="prune", dynamic_ncols=True)
    while train_steps < total_steps and epoch < args.epochs:
        batches_done = start_batch
        for x, y in iterate_epoch(loader, sampler, epoch, start_batch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            model.tau = linear_schedule(*args.tau_range, train_steps, total_steps)
            model.scaling = linear_schedule(*args.scaling_range, train_steps, total_steps)
            loss = pruning_loss(forward, diffusion, x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            all_reduce_gradients(trainable, ctx)  # zero-fills blocks this rank's samples all skipped
            mean_loss, grad_norm, stepped = step_unless_nonfinite(loss.detach().float().reshape(1), trainable,
                                                                  optimizer, scaler, ema, guard, train_steps + 1, ctx,
                                                                  args.grad_clip)
            if stepped:
                window_loss += float(mean_loss)
                window_steps += 1
            else:
                logger.info(f"step {train_steps + 1}: non-finite loss or gradient, step skipped "
                            f"({guard.skipped_total} skipped in total)")
            optimizer.zero_grad(set_to_none=True)
            train_steps += 1
            batches_done += 1
            meter.step(args.global_batch_size)
            progress.update(1)

            if train_steps % args.log_every == 0 or train_steps == total_steps:
                steps_per_sec, _ = meter.rates()
                kept, choices, confidences = decision(model.scaling)
                mean = window_loss / window_steps if window_steps else float("nan")
                logger.info(f"(step={train_steps:07d}) loss {mean:.4f} steps/s {steps_per_sec:.2f} tau {model.tau:.3f} "
                            f"scaling {model.scaling:.1f} kept {kept} confidence "
                            f"[{', '.join(f'{c:.2f}' for c in confidences)}] skipped {guard.skipped_total}")
                metrics.write(step=train_steps, epoch=epoch, loss=mean, steps_per_sec=steps_per_sec, tau=model.tau,
                              scaling=model.scaling, kept_indices=kept, choices=choices, confidences=confidences,
                              groups=groups, skipped_steps=guard.skipped_total, grad_norm=float(grad_norm))
                window_loss, window_steps = 0.0, 0
            if train_steps % args.ckpt_every == 0 or train_steps == total_steps:
                save(train_steps, epoch, batches_done)
                last_saved = train_steps
            if train_steps >= total_steps:
                break
        epoch, start_batch = epoch + 1, 0
    progress.close()
    if last_saved != train_steps:
        save(train_steps, epoch, 0)

    # the decision of the EMA logits at the final scaling, applied to the ORIGINAL weights (the
    # LoRA / weight update only estimated how well each choice recovers and is discarded)
    final_scaling = linear_schedule(*args.scaling_range, total_steps - 1, total_steps)
    kept, choices, confidences = decision(final_scaling)
    logger.info(f"decision after {train_steps} steps: keep blocks {kept} (confidence per group "
                f"[{', '.join(f'{c:.3f}' for c in confidences)}])")
    if ctx.is_main:
        final_logits = [[float(v) for v in group_logits] for group_logits in ema_logits(ema, num_groups)]
        del model, optimizer, ema, forward
        source_name = plain_name(args.model)
        original, _ = load_source_model(source_name, args.load_weight, args.image_size, args.num_classes, args.vae,
                                        args.vae_path)
        metadata = dict(method="learnable", source_model=source_name, source_checkpoint=args.load_weight,
                        source_depth=original.depth, groups=groups, choices=choices, confidences=confidences,
                        scores=final_logits, steps=train_steps, skipped_steps=guard.skipped_total,
                        delta_w=bool(args.delta_w), lora=bool(args.delta_w and args.lora), lora_rank=args.lora_rank,
                        tau_range=list(args.tau_range), scaling_range=list(args.scaling_range),
                        run_dir=run_dir, **source_lineage(source_metadata, kept))
        save_pruned(original, kept, save_path, metadata, overwrite=args.overwrite)
        logger.info(f"saved the {len(kept)}-block model to {save_path}")
    if ctx.is_distributed:
        dist.barrier()
    cleanup_distributed()
    return kept


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL-1-2")
    add_training_args(parser, lr=1e-4, epochs=1, global_batch_size=128, log_every=50, ckpt_every=1000,
                      ema_decay=0.999)
    add_precision_arg(parser)
    parser.add_argument("--delta-w", action="store_true",
                        help="also update the weights during the search (recoverability); without it only the logits train")
    parser.add_argument("--lora", action="store_true", help="with --delta-w: update the weights through LoRA adapters")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--tau-range", type=float, nargs=2, default=[4.0, 0.1], metavar=("START", "END"),
                        help="Gumbel temperature, linear from START to END over the run")
    parser.add_argument("--scaling-range", type=float, nargs=2, default=[100.0, 100.0], metavar=("START", "END"),
                        help="logit scale, linear from START to END over the run")
    parser.add_argument("--logits-lr-scale", type=float, default=10.0, help="gate-logit lr = this x --lr")
    parser.add_argument("--save-model", type=str, default=None,
                        help="where to save the pruned model (default: pruned.pt in the run folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-model file")
    args = parser.parse_args(argv)
    if args.lora_rank < 1:
        parser.error("--lora-rank must be at least 1")
    return args


if __name__ == "__main__":
    run_main(main, parse_args())

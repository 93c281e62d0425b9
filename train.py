"""Train a DiT with DDP: from scratch, or fine-tune a pruned model (`--load-weight`) to recover it.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded \
        --epochs 100 --prefix D14-Learned-Finetuning

Reads the feature store of extract_features.py (or the original imagenet256_features layout).
AdamW (lr 1e-4 constant, no weight decay), grad clip 1.0, EMA 0.9999, bf16 autocast on GPU with
fp32 losses. The run folder `{results-dir}/{prefix}-{model}` holds args.json, log.txt,
metrics.jsonl and checkpoints/{step:07d}.pt ({model, ema, opt, sched, train_steps, args, ...},
readable by sample.py); `--resume auto` continues the latest one bit-exactly.
"""
import argparse

import torch

from tinyfusion import training
from tinyfusion.cli import add_model_args, add_precision_arg
from diffusion import create_diffusion
from tinyfusion.distributed import cleanup_distributed
from tinyfusion.errors import run_main


def diffusion_losses(model, diffusion, x, y):
    """The standard DiT loss of a batch (mse + vb), as fp32 scalars."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    terms = diffusion.training_losses(model, x, t, dict(y=y))
    return {"loss": terms["loss"].mean(), "gt": terms["loss"].mean().detach(), "mse": terms["mse"].mean().detach(),
            "vb": terms["vb"].mean().detach()}


def main(args):
    ctx, dataset, run_dir, resume_path, resume, model, metadata = training.prepare_training(args)
    diffusion = create_diffusion(timestep_respacing="")  # default: 1000 steps, linear, learned sigma

    logger, metrics = training.open_run_folder(args, ctx, run_dir, resuming=resume is not None)
    logger.info(f"run folder {run_dir}; model {args.model} (depth {model.depth})"
                + (f" from {args.load_weight}" if args.load_weight and resume is None else "")
                + (f"; resuming {resume_path}" if resume is not None else ""))
    training.fit(args, ctx, model, metadata, dataset,
                 lambda student, x, y, epoch: diffusion_losses(student, diffusion, x, y),
                 logger, metrics, run_dir, resume_checkpoint=resume, schedule="constant")
    cleanup_distributed()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    training.add_training_args(parser, lr=1e-4)
    add_precision_arg(parser)
    parser.add_argument("--strict", action="store_true",
                        help="accepted for compatibility: weights are always loaded strictly (a mismatch is an error)")
    return parser


if __name__ == "__main__":
    run_main(main, build_parser().parse_args())

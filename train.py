"""Train a DiT or a SiT with DDP: from scratch, or fine-tune a pruned model (`--load-weight`) to recover it.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded \
        --epochs 100 --prefix D14-Learned-Finetuning

Reads the feature store of extract_features.py (or the original imagenet256_features layout).
The original's optimisation: AdamW lr 2e-4 with CosineAnnealingLR to 1e-4 over all steps
(stepped every iteration; `--lr-schedule constant` for DiT's constant lr), no weight decay, grad
clip 1.0, EMA 0.9999, bf16 autocast on GPU with fp32 losses. The run folder
`{results-dir}/{prefix}-{model}` holds args.json, log.txt, metrics.jsonl and
checkpoints/{step:07d}.pt ({model, ema, opt, sched, train_steps, args, ...}, readable by
sample.py); `--resume auto` continues the latest one bit-exactly.

A SiT (`--model SiT-...`) trains on SiT's transport loss (transport/loss.py) with SiT's flags and
defaults: `--path-type Linear`, `--prediction velocity`, `--loss-weight None`, `--train-eps` /
`--sample-eps` SiT's for the path; its checkpoints record that transport.
"""
from tinyfusion.flags import (ArgumentParser, add_compatibility_flags, add_model_args, add_precision_arg,
                            add_eval_args, add_training_args, add_transport_training_args)
from tinyfusion.errors import run_main


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    add_training_args(parser, lr=2e-4, lr_schedule="cosine", min_lr=1e-4)
    add_eval_args(parser)
    add_precision_arg(parser)
    add_transport_training_args(parser)
    add_compatibility_flags(parser, [("--strict", dict(action="store_true",
                                                       help="weights are always loaded strictly"))])
    return parser


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = build_parser().parse_args()

import torch

from diffusion import create_diffusion
from tinyfusion.distributed import cleanup_distributed, start_process_group
from tinyfusion.training.loop import full_weights, train_loop
from tinyfusion.evaluation.quality import check_eval_args, eval_hooks
from tinyfusion.training.run_setup import loop_config, prepare_training, training_metadata
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


def main(args):
    check_eval_args(args)
    run = prepare_training(args)  # every check before the process group starts and before any file is written
    start_process_group(run.ctx)
    intro = (f"run folder {run.run_dir}; model {args.model} (depth {run.model.depth})"
             + (f" from {args.load_weight}" if args.load_weight and run.resume is None else ""))
    if run.transport is not None:
        transport = run.transport
        intro += f"; transport {transport}"

        def compute_losses(student, x, y, epoch):
            return transport_losses(student, transport, x, y)
    else:
        diffusion = create_diffusion(timestep_respacing="")  # default: 1000 steps, linear, learned sigma

        def compute_losses(student, x, y, epoch):
            return diffusion_losses(student, diffusion, x, y)
    train_loop(model=run.model, dataset=run.dataset, ctx=run.ctx, run_dir=run.run_dir, intro=[intro],
               compute_losses=compute_losses,
               checkpoint_weights=full_weights(training_metadata(run.metadata, run.model, run.transport)),
               hooks=run.trackers + eval_hooks(args), resume_checkpoint=run.resume,
               resume_path=run.resume_path, config=loop_config(args))
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main, ARGS)

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
                            add_eval_args, add_training_args, add_family_training_args)
from tinyfusion.errors import run_main


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    add_training_args(parser, lr=2e-4, lr_schedule="cosine", min_lr=1e-4)
    add_eval_args(parser)
    add_precision_arg(parser)
    add_family_training_args(parser)
    add_compatibility_flags(parser, [("--strict", dict(action="store_true",
                                                       help="weights are always loaded strictly"))])
    return parser


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = build_parser().parse_args()

from tinyfusion.evaluation.quality import check_eval_args, eval_hooks
from tinyfusion.training.fine_tuning import FineTuning
from tinyfusion.training.run_setup import loop_config
from tinyfusion.training.task import run_task


def main(args):
    check_eval_args(args)
    run_task(FineTuning(args), loop_config(args), hooks=eval_hooks(args))


if __name__ == "__main__":
    run_main(main, ARGS)

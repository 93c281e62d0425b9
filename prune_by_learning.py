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
size, so the changing sub-batches do not recompile). The search is a task on the one training loop
(tinyfusion/pruning/gate_search.py), with the tau / scaling annealing and the gate decisions.

A gated SiT (`--model SiT-XL-1-2`, or a SiT with --groups) searches on SiT's transport loss, with
train.py's SiT flags (--path-type, --prediction, --loss-weight, --train-eps, --sample-eps).
"""
from tinyfusion.flags import (ArgumentParser, add_model_args, add_precision_arg, add_training_args,
                            add_family_training_args, positive_float, positive_int)
from tinyfusion.errors import run_main


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL-1-2")
    add_training_args(parser, lr=1e-4, lr_schedule="constant", min_lr=0.0, epochs=1, global_batch_size=128,
                      log_every=50, ema_decay=0.999)
    add_precision_arg(parser)
    add_family_training_args(parser)
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

from tinyfusion.pruning.gate_search import GateSearch, search_loop_config
from tinyfusion.training.task import run_task


def main(args):
    return run_task(GateSearch(args), search_loop_config(args))


if __name__ == "__main__":
    run_main(main, ARGS)

"""Recover a pruned DiT or SiT by Masked Knowledge Distillation from its dense teacher (TinyFusion).

    torchrun --nnodes=1 --nproc_per_node=8 train_masked_kd.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded \
        --epochs 100 --prefix D14-Learned-RepKD --teacher DiT-XL/2 --load-teacher pretrained/DiT-XL-2-256x256.pt

Everything of train.py (run folder, checkpoints, --resume auto, precision, EMA) plus a frozen
teacher: loss = alpha * kd + (1 - alpha) * gt + beta * feat (diffusion/distillation.py has the
formulas and the student/teacher block alignment rule). AdamW lr 2e-4 with CosineAnnealingLR to
1e-4 over all steps, stepped every iteration. `--mask-sigma 0` is plain RepKD (no outlier
masks); `--beta-feat 0` drops the feature term.

A SiT student (`--model SiT-...`) distils from a SiT teacher (the two must be of one family) on
SiT's transport: kd on the model outputs (velocities by default), gt the transport loss, the same
masked features (transport/distillation.py), with train.py's SiT flags.
"""
from tinyfusion.flags import (ArgumentParser, add_compatibility_flags, add_model_args, add_precision_arg,
                            add_eval_args, add_teacher_precision_arg, add_training_args, add_family_training_args,
                            nonnegative_float, unit_interval)
from tinyfusion.errors import run_main


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-D14/2")
    add_training_args(parser, lr=2e-4, lr_schedule="cosine", min_lr=1e-4, min_lr_aliases=("--final-lr",))
    add_eval_args(parser)
    add_precision_arg(parser)
    add_teacher_precision_arg(parser)
    add_family_training_args(parser)
    parser.add_argument("--teacher", type=str, default="DiT-XL/2")
    parser.add_argument("--load-teacher", type=str, default=None, help="teacher weights (e.g. DiT-XL-2-256x256.pt)")
    parser.add_argument("--alpha-kd", type=unit_interval, default=0.9, help="weight of the output KD term (gt gets 1 - alpha)")
    parser.add_argument("--beta-feat", type=nonnegative_float, default=1e-2,
                        help="weight of the masked feature loss at epoch 0 (linearly to 0 at the last epoch)")
    parser.add_argument("--mask-sigma", type=nonnegative_float, default=2.0,
                        help="keep hidden entries within k std of their mean; 0 disables masking (plain RepKD)")
    parser.add_argument("--kd-layer-map", type=str, default="original",
                        help="original: the original's fixed maps (2i+1 for D14 from 28 and D7 from 14, fixed D19 "
                             "pairs; span ends for other depths); span-end: the last teacher block of the span each "
                             "student block replaces; or explicit student:teacher pairs, e.g. \"0:1,1:3,2:5\"")
    add_compatibility_flags(parser, [
        ("--strong-aug", dict(action="store_true", help="training reads pre-extracted features (image and flip only)")),
        ("--strict", dict(action="store_true", help="weights are always loaded strictly"))])
    return parser


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = build_parser().parse_args()

from tinyfusion.distillation.masked_kd import MaskedKD
from tinyfusion.evaluation.quality import check_eval_args, eval_hooks
from tinyfusion.training.run_setup import loop_config
from tinyfusion.training.task import run_task


def main(args):
    check_eval_args(args)
    run_task(MaskedKD(args), loop_config(args), hooks=eval_hooks(args))


if __name__ == "__main__":
    run_main(main, ARGS)

"""Recover a pruned DiT by Masked Knowledge Distillation from its dense teacher (TinyFusion).

    torchrun --nnodes=1 --nproc_per_node=8 train_masked_kd.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded \
        --epochs 100 --prefix D14-Learned-RepKD --teacher DiT-XL/2 --load-teacher pretrained/DiT-XL-2-256x256.pt

Everything of train.py (run folder, checkpoints, --resume auto, precision, EMA) plus a frozen
teacher: loss = alpha * kd + (1 - alpha) * gt + beta * feat (diffusion/distillation.py has the
formulas and the student/teacher block alignment rule). AdamW lr 2e-4 cosine to 1e-4 over all
steps. `--mask-sigma 0` is plain RepKD (no outlier masks); `--beta-feat 0` drops the feature term.
"""
import argparse

from tinyfusion import training
from tinyfusion.checkpoints import build_model
from tinyfusion.cli import add_model_args, add_precision_arg
from diffusion import create_diffusion
from diffusion.distillation import default_layer_map, feature_beta, masked_kd_losses, parse_layer_map, validate_layer_map
from tinyfusion.distributed import cleanup_distributed
from tinyfusion.errors import run_main
from tinyfusion.precision import FrozenForward, add_teacher_precision_arg, resolve_teacher_precision


def build_teacher(args, device):
    """The frozen teacher: --teacher with --load-teacher weights, eval mode, no grad, no DDP."""
    if not args.load_teacher:
        raise SystemExit("error: --load-teacher is required (the dense teacher's weights, e.g. "
                         "pretrained/DiT-XL-2-256x256.pt)")
    teacher, _ = build_model(args.teacher, args.image_size, args.num_classes, args.vae, args.vae_path,
                             ckpt=args.load_teacher, flag="--teacher")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def resolve_layer_map(args, student, metadata, teacher):
    """(pairs, how they were chosen) from --kd-layer-map or the default rule; one-line errors."""
    try:
        if args.kd_layer_map:
            pairs, source = parse_layer_map(args.kd_layer_map), "--kd-layer-map"
        else:
            kept = metadata.get("kept_indices") if metadata else None
            pairs, source = default_layer_map(student.depth, teacher.depth, kept)
        return validate_layer_map(pairs, student.depth, teacher.depth), source
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def main(args):
    ctx, dataset, run_dir, resume_path, resume, student, metadata = training.prepare_training(args)
    teacher = build_teacher(args, ctx.device)
    if student.depth > teacher.depth:
        raise SystemExit(f"error: the student has {student.depth} blocks but the teacher --teacher {args.teacher} only "
                         f"{teacher.depth}; distil a pruned (shallower) student from its dense source model")
    if (student.in_channels, student.input_size, student.num_classes, student.learn_sigma) != \
            (teacher.in_channels, teacher.input_size, teacher.num_classes, teacher.learn_sigma):
        raise SystemExit(f"error: teacher {args.teacher} and student {args.model} predict different things "
                         f"(channels/input size/classes/learned sigma); use the teacher the student was pruned from")
    layer_pairs, map_source = resolve_layer_map(args, student, metadata, teacher)
    if args.beta_feat > 0 and student.hidden_size != teacher.hidden_size:
        raise SystemExit(f"error: the feature loss needs equal hidden sizes (student {student.hidden_size}, teacher "
                         f"{teacher.hidden_size}); pass --beta-feat 0")
    diffusion = create_diffusion(timestep_respacing="")

    logger, metrics = training.open_run_folder(args, ctx, run_dir, resuming=resume is not None)
    logger.info(f"run folder {run_dir}; student {args.model} (depth {student.depth}), teacher {args.teacher} "
                f"(depth {teacher.depth}) from {args.load_teacher}" + (f"; resuming {resume_path}" if resume else ""))
    logger.info(f"layer map ({map_source}): " + ", ".join(f"{s}:{t}" for s, t in layer_pairs))
    if args.strong_aug:
        logger.info("--strong-aug is accepted for compatibility but has no effect: training reads pre-extracted "
                    "features (image and flip only)")
    teacher_dtype = resolve_teacher_precision(args.teacher_precision, training.resolve_precision(args.precision,
                                                                                               ctx.device), ctx.device)
    teacher_forward = FrozenForward(teacher, teacher_dtype, ctx.device)  # inference mode, weights cast once
    logger.info(f"teacher precision {str(teacher_dtype).replace('torch.', '')}")

    def compute_losses(student_forward, x, y, epoch):
        return masked_kd_losses(student_forward, teacher_forward, diffusion, x, y, alpha=args.alpha_kd,
                                beta=feature_beta(epoch, args.epochs, args.beta_feat), mask_sigma=args.mask_sigma,
                                layer_pairs=layer_pairs, class_dropout_prob=student.class_dropout_prob)

    training.fit(args, ctx, student, metadata, dataset, compute_losses, logger, metrics, run_dir,
                 resume_checkpoint=resume, schedule="cosine", final_lr=args.final_lr)
    cleanup_distributed()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-D14/2")
    training.add_training_args(parser, lr=2e-4)
    add_precision_arg(parser)
    add_teacher_precision_arg(parser)
    parser.add_argument("--final-lr", type=float, default=1e-4, help="the cosine schedule ends at this lr")
    parser.add_argument("--teacher", type=str, default="DiT-XL/2")
    parser.add_argument("--load-teacher", type=str, default=None, help="teacher weights (e.g. DiT-XL-2-256x256.pt)")
    parser.add_argument("--alpha-kd", type=float, default=0.9, help="weight of the output KD term (gt gets 1 - alpha)")
    parser.add_argument("--beta-feat", type=float, default=1e-2,
                        help="weight of the masked feature loss at epoch 0 (linearly to 0 at the last epoch)")
    parser.add_argument("--mask-sigma", type=float, default=2.0,
                        help="keep hidden entries within k std of their mean; 0 disables masking (plain RepKD)")
    parser.add_argument("--kd-layer-map", type=str, default=None,
                        help="explicit student:teacher block pairs, e.g. \"0:1,1:3,2:5\" (default: span ends of the "
                             "student's kept indices)")
    parser.add_argument("--strong-aug", action="store_true", help="accepted for compatibility; no effect")
    parser.add_argument("--strict", action="store_true", help="accepted for compatibility; loading is always strict")
    return parser


if __name__ == "__main__":
    run_main(main, build_parser().parse_args())

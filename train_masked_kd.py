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
                            add_eval_args, add_teacher_precision_arg, add_training_args, add_transport_training_args,
                            nonnegative_float, resolve_precision, unit_interval)
from tinyfusion.errors import TinyFusionError, run_main


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-D14/2")
    add_training_args(parser, lr=2e-4, lr_schedule="cosine", min_lr=1e-4, min_lr_aliases=("--final-lr",))
    add_eval_args(parser)
    add_precision_arg(parser)
    add_teacher_precision_arg(parser)
    add_transport_training_args(parser)
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

from diffusion import create_diffusion
from diffusion.distillation import (LAYER_MAP_RULES, feature_beta, masked_kd_losses, parse_layer_map, rule_layer_map,
                                    validate_layer_map)
from tinyfusion.io.checkpoints import MODEL_FAMILIES, build_model
from tinyfusion.distributed import cleanup_distributed, start_process_group
from tinyfusion.training.loop import full_weights, train_loop
from tinyfusion.sampling.precision import FrozenForward, resolve_teacher_precision
from tinyfusion.pruning.pruned_models import kept_indices_in_frame
from tinyfusion.evaluation.quality import check_eval_args, eval_hooks
from tinyfusion.training.run_setup import loop_config, prepare_training, training_metadata
from transport.cli import check_transport_record
from transport.distillation import transport_kd_losses


def build_teacher(args, device, transport=None):
    """The frozen teacher: --teacher with --load-teacher weights, eval mode, no grad, no DDP (a
    SiT teacher's recorded transport must be the student's)."""
    if not args.load_teacher:
        raise TinyFusionError("--load-teacher is required (the dense teacher's weights, e.g. "
                              "pretrained/DiT-XL-2-256x256.pt)")
    teacher, metadata = build_model(args.teacher, args.image_size, args.num_classes, args.vae, args.vae_path,
                                    ckpt=args.load_teacher, flag="--teacher", families=MODEL_FAMILIES)
    check_transport_record(metadata, transport, args.load_teacher)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def check_teacher_fits(args, student, teacher):
    """One-line errors when the teacher cannot teach this student."""
    if student.model_family != teacher.model_family:
        raise TinyFusionError(f"--teacher {args.teacher} is a {teacher.model_family} but the student --model "
                              f"{args.model} a {student.model_family}; distil from a teacher of the same family")
    if student.depth > teacher.depth:
        raise TinyFusionError(f"the student has {student.depth} blocks but the teacher --teacher {args.teacher} only "
                              f"{teacher.depth}; distil a pruned (shallower) student from its dense source model")
    if (student.in_channels, student.input_size, student.num_classes, student.learn_sigma) != \
            (teacher.in_channels, teacher.input_size, teacher.num_classes, teacher.learn_sigma):
        raise TinyFusionError(f"teacher {args.teacher} and student {args.model} predict different things "
                              f"(channels/input size/classes/learned sigma); use the teacher the student was pruned from")
    if args.beta_feat > 0 and student.hidden_size != teacher.hidden_size:
        raise TinyFusionError(f"the feature loss needs equal hidden sizes (student {student.hidden_size}, teacher "
                              f"{teacher.hidden_size}); pass --beta-feat 0")


def resolve_layer_map(args, student, metadata, teacher):
    """(pairs, how they were chosen) for --kd-layer-map: original (the default), span-end (kept
    indices in the loaded teacher's frame) or explicit pairs; one-line errors."""
    try:
        if args.kd_layer_map in LAYER_MAP_RULES:
            pairs, source = rule_layer_map(args.kd_layer_map, student.depth, teacher.depth,
                                           lambda: kept_indices_in_frame(metadata, teacher.depth))
        else:
            pairs, source = parse_layer_map(args.kd_layer_map), "--kd-layer-map"
        return validate_layer_map(pairs, student.depth, teacher.depth), source
    except ValueError as error:
        raise TinyFusionError(str(error)) from None


def main(args):
    check_eval_args(args)
    run = prepare_training(args)  # every check before the process group starts and before any file is written
    student = run.model
    teacher = build_teacher(args, run.ctx.device, run.transport)
    check_teacher_fits(args, student, teacher)
    layer_pairs, map_source = resolve_layer_map(args, student, run.metadata, teacher)
    start_process_group(run.ctx)
    diffusion = create_diffusion(timestep_respacing="") if run.transport is None else None
    teacher_dtype = resolve_teacher_precision(args.teacher_precision,
                                              resolve_precision(args.precision, run.ctx.device), run.ctx.device)
    teacher_forward = FrozenForward(teacher, teacher_dtype, run.ctx.device)  # inference mode, weights cast once

    def compute_losses(student_forward, x, y, epoch):
        settings = dict(alpha=args.alpha_kd, beta=feature_beta(epoch, args.epochs, args.beta_feat),
                        mask_sigma=args.mask_sigma, layer_pairs=layer_pairs,
                        class_dropout_prob=student.class_dropout_prob)
        if run.transport is not None:
            return transport_kd_losses(student_forward, teacher_forward, run.transport, x, y, **settings)
        return masked_kd_losses(student_forward, teacher_forward, diffusion, x, y, **settings)

    intro = [f"run folder {run.run_dir}; student {args.model} (depth {student.depth}), teacher {args.teacher} "
             f"(depth {teacher.depth}) from {args.load_teacher}",
             f"layer map ({map_source}): " + ", ".join(f"{s}:{t}" for s, t in layer_pairs),
             f"teacher precision {str(teacher_dtype).replace('torch.', '')}"]
    train_loop(model=student, dataset=run.dataset, ctx=run.ctx, run_dir=run.run_dir, intro=intro,
               compute_losses=compute_losses,
               checkpoint_weights=full_weights(training_metadata(run.metadata, student, run.transport)),
               hooks=run.trackers + eval_hooks(args), resume_checkpoint=run.resume, resume_path=run.resume_path,
               config=loop_config(args))
    cleanup_distributed()


if __name__ == "__main__":
    run_main(main, ARGS)

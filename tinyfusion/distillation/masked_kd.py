"""train_masked_kd.py's training as a task on the loop: a pruned student recovers by Masked
Knowledge Distillation from its frozen dense teacher (TinyFusion): loss = alpha * kd + (1 - alpha)
* gt + beta * feat, with beta decaying linearly to 0 over the epochs (the formulas and the
student/teacher block alignment rules are diffusion/distillation.py's; a SiT's are
transport/distillation.py's). Everything else is fine-tuning's (tinyfusion/training/fine_tuning.py):
what trains, the checkpoints and their metadata."""
from diffusion.distillation import LAYER_MAP_RULES, feature_beta, parse_layer_map, rule_layer_map, validate_layer_map
from tinyfusion.errors import TinyFusionError
from tinyfusion.flags import resolve_precision
from tinyfusion.families.build import build_model
from tinyfusion.pruning.pruned_models import kept_indices_in_frame
from tinyfusion.sampling.precision import FrozenForward, resolve_teacher_precision
from tinyfusion.training.fine_tuning import FineTuning


def build_teacher(args, device, family):
    """The frozen teacher: --teacher with --load-teacher weights, eval mode, no grad, no DDP (what
    its checkpoint records of the process must fit the student's family: a SiT teacher's transport)."""
    if not args.load_teacher:
        raise TinyFusionError("--load-teacher is required (the dense teacher's weights, e.g. "
                              "pretrained/DiT-XL-2-256x256.pt)")
    teacher, metadata = build_model(args.teacher, args.image_size, args.num_classes, args.vae, args.vae_path,
                                    ckpt=args.load_teacher, flag="--teacher")
    family.check_record(metadata, args.load_teacher)
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
    if student.prediction_signature() != teacher.prediction_signature():
        raise TinyFusionError(f"teacher {args.teacher} and student {args.model} predict different things "
                              f"(channels/input size/classes/learned sigma); use the teacher the student was pruned from")


def check_pair_widths(args, student, teacher, pairs):
    """The feature loss compares each aligned pair of blocks: their widths must agree."""
    student_widths, teacher_widths = student.block_widths(), teacher.block_widths()
    for s, t in pairs:
        if args.beta_feat > 0 and student_widths[s] != teacher_widths[t]:
            raise TinyFusionError(f"the feature loss needs equal hidden sizes (student block {s}: {student_widths[s]}, "
                                  f"teacher block {t}: {teacher_widths[t]}); pass --beta-feat 0")


def resolve_layer_map(args, student, metadata, teacher):
    """(pairs, how they were chosen) for --kd-layer-map: original (the default), span-end (kept
    indices in the loaded teacher's frame) or explicit pairs; one-line errors."""
    try:
        if args.kd_layer_map in LAYER_MAP_RULES:
            pairs, source = rule_layer_map(args.kd_layer_map, student.depth, teacher.depth,
                                           lambda: kept_indices_in_frame(metadata, teacher.depth),
                                           teacher.block_list_sizes())
        else:
            pairs, source = parse_layer_map(args.kd_layer_map), "--kd-layer-map"
        return validate_layer_map(pairs, student.depth, teacher.depth), source
    except ValueError as error:
        raise TinyFusionError(str(error)) from None


class MaskedKD(FineTuning):
    """train_masked_kd.py (see the module docstring); `args` are its parsed flags."""

    def prepare(self):
        args = self.args
        run = super().prepare()
        self.teacher = build_teacher(args, run.ctx.device, run.family)
        check_teacher_fits(args, run.model, self.teacher)
        self.layer_pairs, self.map_source = resolve_layer_map(args, run.model, run.metadata, self.teacher)
        check_pair_widths(args, run.model, self.teacher, self.layer_pairs)
        return run

    def begin(self, run):
        args, self.run, student, teacher = self.args, run, run.model, self.teacher
        teacher_dtype = resolve_teacher_precision(args.teacher_precision,
                                                  resolve_precision(args.precision, run.ctx.device), run.ctx.device)
        # inference mode, weights cast once
        self.teacher_forward = FrozenForward(teacher, teacher_dtype, run.ctx.device)
        return [f"run folder {run.run_dir}; student {args.model} (depth {student.depth}), teacher {args.teacher} "
                f"(depth {teacher.depth}) from {args.load_teacher}",
                f"layer map ({self.map_source}): " + ", ".join(f"{s}:{t}" for s, t in self.layer_pairs),
                f"teacher precision {str(teacher_dtype).replace('torch.', '')}"]

    def losses(self, student_forward, x, y, epoch):
        args, run, teacher_forward = self.args, self.run, self.teacher_forward
        settings = dict(alpha=args.alpha_kd, beta=feature_beta(epoch, args.epochs, args.beta_feat),
                        mask_sigma=args.mask_sigma, layer_pairs=self.layer_pairs,
                        class_dropout_prob=run.model.class_dropout_prob)
        return run.family.kd_losses(student_forward, teacher_forward, x, y, **settings)

"""Images/s of a train.py (fine-tuning) step and a train_masked_kd.py (Masked KD) step on one
config, and the KD step's cost relative to the plain step, measured in one run.

    python bench/bench_train.py                      # 14-block student, 28-block teacher, hidden 384
    python bench/bench_train.py --input-size 32 --batch-size 32 --device cuda --precision bf16

A step is what the training loop does per batch: the DiT family's losses (its training_losses
or diffusion.distillation.masked_kd_losses), backward, grad clipping, AdamW, EMA. Variants,
alternated ABBA (bench/harness.py), median of per-round ratios to the plain step:
  plain       train.py's step
  kd-before   the KD step with the teacher as before (no_grad + autocast re-casting its weights)
  kd-fp32     train_masked_kd.py --teacher-precision fp32 (inference mode; the CPU default)
  kd-bf16     --teacher-precision bf16 (weights cast once; LayerNorm and residual stream fp32)
and the change of each loss term with the low-precision teacher vs the fp32 one (same draws).
Goal (issue): KD step <= 1.3x the plain step.
Expectation from FLOPs: a training step costs ~3 student forwards (forward + backward), the teacher
adds one forward of 28/14 = 2 student forwards; on a GPU in bf16 the teacher's inference forward
(no activations kept, no autograd) is relatively cheaper than in fp32 on a CPU.
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyfusion.flags import resolve_precision  # noqa: E402
from diffusion.distillation import span_end_layer_map  # noqa: E402
from tinyfusion.families import dit  # noqa: E402
from tinyfusion.training.ema import ParameterEMA  # noqa: E402
from models import DiT_models, prune_to_kept_blocks  # noqa: E402
from tinyfusion.training.gradients import clip_grad_norm  # noqa: E402
from tinyfusion.training.loop import AutocastForward  # noqa: E402
from tinyfusion.sampling.precision import FrozenForward, resolve_teacher_precision  # noqa: E402
from bench.bench_model import fill_random  # noqa: E402
from bench.harness import alternate, machine_info, print_comparison, summary  # noqa: E402


def build(args, device, precision):
    torch.manual_seed(0)
    config = dict(input_size=args.input_size, in_channels=4, num_classes=1000)
    teacher = fill_random(DiT_models[args.model](depth=args.teacher_depth, **config))
    kept = list(range(0, args.teacher_depth, args.teacher_depth // args.student_depth))[:args.student_depth]
    student = prune_to_kept_blocks(teacher, kept).to(device).train()
    teacher = teacher.to(device).eval().requires_grad_(False)
    return teacher, student, kept


def main(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds = 3
    precision = resolve_precision(args.precision, device)
    teacher_dtype = resolve_teacher_precision(args.teacher_precision, precision, device)
    teacher, student, kept = build(args, device, precision)
    pairs = span_end_layer_map(kept, args.teacher_depth)
    family = dit.Family()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    ema = ParameterEMA([(n, p) for n, p in student.named_parameters() if p.requires_grad], 0.9999)
    student_forward = AutocastForward(student, precision, device)
    teachers = {"before": AutocastForward(teacher, precision, device),  # no_grad + autocast (re-casts weights)
                "fp32": FrozenForward(copy.deepcopy(teacher), torch.float32, device)}
    low_name = str(teacher_dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float16", "fp16")
    if teacher_dtype != torch.float32:
        teachers[low_name] = FrozenForward(copy.deepcopy(teacher), teacher_dtype, device)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def kd_losses(teacher_forward, **draws):
        return family.kd_losses(student_forward, teacher_forward, x, y, alpha=0.9, beta=1e-2,
                                mask_sigma=2.0, layer_pairs=pairs, class_dropout_prob=0.1, **draws)

    def step(compute):
        def run():
            losses = compute()
            losses["loss"].backward()
            clip_grad_norm(params, 1.0)
            optimizer.step()
            ema.update()
            optimizer.zero_grad(set_to_none=True)
        return run
    variants = {"plain": step(lambda: family.training_losses(student_forward, x, y))}
    variants.update({f"kd-{name}": step(lambda forward=forward: kd_losses(forward)) for name, forward in teachers.items()})
    times = alternate(variants, rounds=args.rounds, warmup=args.warmup, device=device)

    # each loss term with the low-precision teacher vs the fp32 teacher: same student, t, noise, drops
    draws = dict(t=torch.randint(0, 1000, (len(x),), device=device), noise=torch.randn_like(x),
                 force_drop_ids=torch.zeros(len(x), dtype=torch.long, device=device))
    with torch.no_grad():
        terms = {name: {k: float(v) for k, v in kd_losses(forward, **draws).items()} for name, forward in teachers.items()}
    tokens = (args.input_size // DiT_models[args.model].patch_size) ** 2
    print(f"{machine_info()}\nconfig: {args.model} width, student {args.student_depth} blocks (kept {kept[:3]}...), "
          f"teacher {args.teacher_depth} blocks, input {args.input_size} ({tokens} tokens), batch {args.batch_size}, "
          f"{device.type}, training {str(precision).replace('torch.', '')}, {torch.get_num_threads()} thread(s); "
          f"FLOP estimate of KD/plain: 1 + {args.teacher_depth}/(3 x {args.student_depth}) = "
          f"{1 + args.teacher_depth / (3 * args.student_depth):.2f} with a teacher as fast per FLOP as the student")
    records = {}
    for name in teachers:
        records[f"kd-{name} vs plain"] = summary(times, f"kd-{name}", "plain")
        print_comparison(records[f"kd-{name} vs plain"], f"KD step (teacher {name})", goal="<= 1.3x")
    if "kd-before" in times:
        records["kd-fp32 vs kd-before"] = summary(times, "kd-fp32", "kd-before")
        print_comparison(records["kd-fp32 vs kd-before"], "fp32 teacher in inference mode vs before")
    for name, values in terms.items():
        if name != "fp32":
            change = {k: abs(values[k] - terms["fp32"][k]) / max(abs(terms["fp32"][k]), 1e-12) for k in values}
            print(f"loss terms, teacher {name} vs fp32: " + ", ".join(
                f"{k} {terms['fp32'][k]:.5g} -> {values[k]:.5g} (rel. change {change[k]:.1e})" for k in values))
    result = dict(config=dict(model=args.model, student_depth=args.student_depth, teacher_depth=args.teacher_depth,
                              input_size=args.input_size, batch_size=args.batch_size, device=device.type,
                              training_precision=str(precision), teacher_precision=str(teacher_dtype)),
                  comparisons=records, loss_terms=terms)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-S/2", help="architecture family (hidden size, heads, patch)")
    parser.add_argument("--student-depth", type=int, default=14)
    parser.add_argument("--teacher-depth", type=int, default=28)
    parser.add_argument("--input-size", type=int, default=16, help="latent side (16 = 64 tokens at patch 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (ABBA) of every variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16", "fp16"], default="bf16",
                        help="the low-precision teacher variant timed next to the fp32 one")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

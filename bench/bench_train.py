"""Images/s of a train.py (fine-tuning) step and a train_masked_kd.py (Masked KD) step on one
config, and the KD step's cost relative to the plain step, measured in one run.

    python bench/bench_train.py                      # 14-block student, 28-block teacher, hidden 384
    python bench/bench_train.py --input-size 32 --batch-size 32 --device cuda --precision bf16

A step is what the training loop does per batch: the script's loss function (train.diffusion_losses
or diffusion.distillation.masked_kd_losses), backward, grad clipping, AdamW, EMA. The two kinds of
step are interleaved (ABAB...) and the median taken, so load changes on a shared machine hit both.
Expectation from FLOPs: a training step costs ~3 student forwards (forward + backward), the teacher
adds one forward of 28/14 = 2 student forwards; on a GPU in bf16 the teacher's inference forward
(no activations kept, no autograd) is relatively cheaper than in fp32 on a CPU.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from tinyfusion.cli import autocast, resolve_precision  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from diffusion.distillation import masked_kd_losses, span_end_layer_map  # noqa: E402
from tinyfusion.ema import ParameterEMA  # noqa: E402
from models import DiT_models, prune_to_kept_blocks  # noqa: E402
from tinyfusion.gradients import clip_grad_norm  # noqa: E402
from tinyfusion.loop import AutocastForward  # noqa: E402


def main(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    config = dict(input_size=args.input_size, in_channels=4, num_classes=1000)
    teacher = DiT_models[args.model](depth=args.teacher_depth, **config)
    kept = list(range(0, args.teacher_depth, args.teacher_depth // args.student_depth))[:args.student_depth]
    student = prune_to_kept_blocks(teacher, kept).to(device).train()
    teacher = teacher.to(device).eval().requires_grad_(False)
    pairs = span_end_layer_map(kept, args.teacher_depth)
    diffusion = create_diffusion("")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    ema = ParameterEMA([(n, p) for n, p in student.named_parameters() if p.requires_grad], 0.9999)
    student_forward = AutocastForward(student, precision, device)
    teacher_forward = AutocastForward(teacher, precision, device)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    def plain_losses():
        return train.diffusion_losses(student_forward, diffusion, x, y)

    def kd_losses():
        return masked_kd_losses(student_forward, teacher_forward, diffusion, x, y, alpha=0.9, beta=1e-2,
                                mask_sigma=2.0, layer_pairs=pairs, class_dropout_prob=0.1)

    def teacher_only():
        with torch.no_grad(), autocast(precision, device):
            teacher(x, torch.randint(0, 1000, (len(x),), device=device), y)

    def step(compute):
        losses = compute()
        losses["loss"].backward()
        clip_grad_norm(params, 1.0)
        optimizer.step()
        ema.update()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step(plain_losses), step(kd_losses), teacher_only()
    plain, kd, teacher_times = [], [], []
    for _ in range(args.repeats):
        plain.append(timed(lambda: step(plain_losses)))
        kd.append(timed(lambda: step(kd_losses)))
        teacher_times.append(timed(teacher_only))
    plain_s, kd_s, teacher_s = (statistics.median(v) for v in (plain, kd, teacher_times))
    tokens = (args.input_size // DiT_models[args.model].patch_size) ** 2
    print(f"config: {args.model} hidden, student {args.student_depth} blocks (kept {kept[:3]}...), teacher "
          f"{args.teacher_depth} blocks, input {args.input_size} ({tokens} tokens), batch {args.batch_size}, "
          f"{device.type} {str(precision).replace('torch.', '')}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats}")
    print(f"train.py step:          {plain_s * 1000:8.1f} ms  {args.batch_size / plain_s:8.1f} images/s")
    print(f"train_masked_kd.py step:{kd_s * 1000:8.1f} ms  {args.batch_size / kd_s:8.1f} images/s")
    print(f"teacher forward alone:  {teacher_s * 1000:8.1f} ms")
    print(f"KD step / fine-tuning step: {kd_s / plain_s:.2f}x (+{100 * (kd_s / plain_s - 1):.0f}%); "
          f"teacher forward / fine-tuning step: {teacher_s / plain_s:.2f} "
          f"(FLOP estimate {args.teacher_depth / (3 * args.student_depth):.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-S/2", help="architecture family (hidden size, heads, patch)")
    parser.add_argument("--student-depth", type=int, default=14)
    parser.add_argument("--teacher-depth", type=int, default=28)
    parser.add_argument("--input-size", type=int, default=16, help="latent side (16 = 64 tokens at patch 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    main(parser.parse_args())

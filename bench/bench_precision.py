"""Sampling speed in low precision vs fp32 on the same weights, measured alternately in one run.

Variants, each a few DDPM steps of tinyfusion.sampling.generate.generate with classifier-free guidance
(what sample.py / sample_ddp.py run per image):
  fp32          the reference sampler (fp32 weights, no autocast)
  autocast      --precision bf16 as before: fp32 weights under autocast, re-cast on every call
  cast-once     --precision bf16 now: Linear/Conv weights held once in bf16, the rest fp32
Goal (issue): cast-once >= 2.5x the images/s of fp32 on hardware with native bf16 matmul. The
report states whether this machine has it (an AVX2-only CPU emulates bf16 and is slower).

    python bench/bench_precision.py [--quick] [--dtype bf16|fp16] [--json out.json]
"""
import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import alternate, machine_info, print_comparison, summary, write_json  # noqa: E402
from bench.bench_model import fill_random  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402
from tinyfusion.flags import PRECISIONS  # noqa: E402
from tinyfusion.sampling.precision import cast_weights_once, native_low_precision  # noqa: E402
from tinyfusion.sampling.generate import generate, sample_generator  # noqa: E402


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, PRECISIONS[args.dtype])
    torch.manual_seed(0)
    model = fill_random(DiT_models[args.model](input_size=args.input_size)).to(device).eval().requires_grad_(False)
    low = cast_weights_once(copy.deepcopy(model), dtype)
    diffusion = create_diffusion(str(args.steps))
    labels = list(range(args.images))
    generators = lambda: [sample_generator(0, i) for i in labels]  # noqa: E731  same noise for every variant
    outputs = {}

    def sampler(name, net, amp_dtype):
        def call():
            outputs[name] = generate(net, diffusion, labels, generators(), cfg_scale=4.0, amp_dtype=amp_dtype)
        return call
    variants = {"fp32": sampler("fp32", model, torch.float32),
                "autocast": sampler("autocast", model, dtype),
                "cast-once": sampler("cast-once", low, dtype)}
    times = alternate(variants, rounds=args.rounds, device=device)
    reference = outputs["fp32"].float()
    deviation = {name: float((out.float() - reference).norm() / reference.norm()) for name, out in outputs.items()}
    records = {"cast-once vs fp32": summary(times, "cast-once", "fp32"),
               "cast-once vs autocast": summary(times, "cast-once", "autocast")}
    tokens = args.images * 2 * (args.input_size // model.patch_size) ** 2  # cfg doubles the batch
    rates = matmul_rates(model.hidden_size, tokens, dtype, args.rounds, device)
    return dict(matmul_gflops={"fp32": rates["fp32"], args.dtype: rates["low"]},
                config=dict(model=args.model, input_size=args.input_size, images=args.images, steps=args.steps,
                            dtype=args.dtype, cfg_scale=4.0, device=device,
                            native_low_precision=native_low_precision(dtype, device)),
                comparisons=records, relative_deviation_from_fp32=deviation,
                identical_to_autocast=bool(torch.equal(outputs["cast-once"], outputs["autocast"])))


def matmul_rates(hidden, tokens, dtype, rounds, device):
    """GFLOP/s of the model's MLP GEMM (tokens x hidden @ hidden x 4 hidden) in fp32 and in `dtype`,
    alternated: the hardware ceiling that decides whether low precision can pay off here."""
    a32, b32 = torch.randn(tokens, hidden, device=device), torch.randn(hidden, 4 * hidden, device=device)
    a_low, b_low = a32.to(dtype), b32.to(dtype)
    repeats = 5
    variants = {"fp32": lambda: [a32 @ b32 for _ in range(repeats)],
                "low": lambda: [a_low @ b_low for _ in range(repeats)]}
    times = alternate(variants, rounds=rounds, device=device)
    flops = 2.0 * tokens * hidden * 4 * hidden * repeats
    return {name: flops / statistics.median(seconds) / 1e9 for name, seconds in times.items()}


def main(args):
    if args.quick:
        args.model, args.input_size, args.images, args.steps, args.rounds = "DiT-S/2", 16, 4, 2, 4
    result = run(args)
    config = result["config"]
    print(f"{machine_info()}\n{config['model']} at {config['input_size']}x{config['input_size']} latents, "
          f"{config['images']} images x {config['steps']} DDPM steps with cfg ({config['device']}, native "
          f"{config['dtype']} matmul: {config['native_low_precision']})")
    for label, record in result["comparisons"].items():
        print_comparison(record, label, goal=">= 2.5x images/s = <= 0.40x time" if label.endswith("fp32") else None)
    rates = result["matmul_gflops"]
    print("the model's MLP GEMM on this machine: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()) +
          f" ({config['dtype']} / fp32 = {rates[config['dtype']] / rates['fp32']:.2f}x: low precision can only pay off"
          " where this is well above 1)")
    print(f"images/s of cast-once {config['dtype']} / fp32: "
          f"{1 / result['comparisons']['cast-once vs fp32']['ratio_median']:.2f}x")
    print("relative deviation of the latents from fp32: " +
          ", ".join(f"{k} {v:.1e}" for k, v in result["relative_deviation_from_fp32"].items()) +
          f"; cast-once identical to autocast: {result['identical_to_autocast']}")
    return write_json(args.json, result)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="DDPM steps per timed sampling run")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--quick", action="store_true", help="DiT-S/2 at 16x16, 4 images, 2 steps, 4 rounds")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

"""Sampling speed of TinyDiT-D14 over DiT-XL/2 at the paper's setting, measured alternately in one run.

The paper reports 6.91 it/s for DiT-XL/2 and 13.54 it/s for TinyDiT-D14 (1.96x) with 250 DDPM
steps, classifier-free guidance 1.5, batch 32, 256 px images (32 x 32 x 4 latents). Each timed
call here is that: tinyfusion.sampling.generate.generate (what sample_ddp.py runs per batch; no VAE
decode) of one batch, for DiT-XL/2 with random weights and for the D14 made of its even blocks.
Random weights give the same speed as trained ones. The variants alternate ABBA; the figure is
the median of the per-round ratios XL time / D14 time.

    python bench/bench_sampling_ratio.py                        # the paper's setting (a GPU: a few minutes)
    python bench/bench_sampling_ratio.py --precision bf16       # the same in bf16 (weights cast once)
    python bench/bench_sampling_ratio.py --stand-in --steps 10 --batch 4   # XL's depth, tiny width: any CPU
    python bench/bench_sampling_ratio.py --sampler dpm-solver++ --steps 20 # a fast solver: NFE and images/s

`--stand-in` keeps XL's 28 blocks and the D14's 14 but makes them 64 wide at 8 x 8 latents: it
checks the machinery, its ratio is not comparable to the paper's. `--min-speedup X` exits 1 when
the measured speed-up is below X (bench/gpu_check.sh uses it).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_model import fill_random  # noqa: E402
from bench.harness import alternate, machine_info, print_comparison, summary, write_json  # noqa: E402
from models import DiT, DiT_models, prune_to_kept_blocks  # noqa: E402
from tinyfusion.flags import PRECISIONS, SAMPLER_NAMES, resolve_timestep_spacing  # noqa: E402
from tinyfusion.sampling.precision import cast_weights_once  # noqa: E402
from tinyfusion.sampling.generate import generate, sample_generator  # noqa: E402
from tinyfusion.families.dit import sampling_process  # noqa: E402

PAPER_IT_PER_S = {"DiT-XL/2": 6.91, "DiT-D14/2": 13.54}
PAPER_SPEEDUP = 1.96  # 13.54 / 6.91, as the paper rounds it
STAND_IN = dict(hidden_size=64, num_heads=4, depth=28)  # XL's depth, tiny width
D14_KEPT = list(range(0, 28, 2))  # any 14 blocks cost the same


def build_models(stand_in, latent_size, device, dtype):
    """(XL, D14) with random weights, eval mode, weights cast once to `dtype` as sample_ddp.py does."""
    if stand_in:
        xl = DiT(input_size=latent_size, **STAND_IN)
    else:
        with torch.device("meta"):  # skips XL's slow initialisation; fill_random sets every weight
            xl = DiT_models["DiT-XL/2"](input_size=latent_size)
        xl = xl.to_empty(device="cpu")
    xl = fill_random(xl)
    xl.pos_embed.data.zero_()  # a buffer-like parameter fill_random skips (to_empty leaves it undefined)
    d14 = prune_to_kept_blocks(xl, D14_KEPT)
    return tuple(cast_weights_once(model.to(device).eval().requires_grad_(False), dtype) for model in (xl, d14))


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cuda":  # TF32 as sample_ddp.py's default (the original's)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = getattr(torch, PRECISIONS[args.precision])
    xl, d14 = build_models(args.stand_in, args.image_size // 8, device, dtype)
    labels = [i % 1000 for i in range(args.batch)]

    def sampler(model, steps):
        process = sampling_process(args.sampler, steps, resolve_timestep_spacing(args.sampler, None))
        return lambda: generate(model, process, labels, [sample_generator(0, i) for i in labels],
                                cfg_scale=args.cfg_scale, sampler=args.sampler, amp_dtype=dtype)
    for model in (xl, d14):  # warm-up (kernel choice, allocator) on a 2-step schedule, not timed
        sampler(model, 2)()
    times = alternate({"DiT-XL/2": sampler(xl, args.steps), "DiT-D14/2": sampler(d14, args.steps)},
                      rounds=args.rounds, warmup=0, device=device)
    record = summary(times, "DiT-XL/2", "DiT-D14/2")  # XL time / D14 time = D14's speed-up
    config = dict(stand_in=args.stand_in, sampler=args.sampler, steps=args.steps, nfe=args.steps,
                  cfg_scale=args.cfg_scale, batch=args.batch,
                  image_size=args.image_size, precision=args.precision, device=device, rounds=args.rounds)
    return dict(config=config, machine=machine_info(), record=record, speedup=record["ratio_median"],
                it_per_s={"DiT-XL/2": args.steps / record["variant_median_s"],
                          "DiT-D14/2": args.steps / record["baseline_median_s"]},
                images_per_s={"DiT-XL/2": args.batch / record["variant_median_s"],
                              "DiT-D14/2": args.batch / record["baseline_median_s"]})


def main(args):
    result = run(args)
    config, speed = result["config"], result["it_per_s"]
    what = "stand-in (XL's depth, width 64)" if args.stand_in else "DiT-XL/2 and its 14 even blocks, random weights"
    print(f"{result['machine']}\n{what}: {config['sampler']}, {config['steps']} steps, cfg {config['cfg_scale']}, batch "
          f"{config['batch']}, {config['image_size']} px, {config['precision']} on {config['device']}, "
          f"{config['rounds']} rounds")
    print_comparison(result["record"], "sampling time per batch", unit_ms=result["record"]["variant_median_s"] < 10)
    print(f"it/s: DiT-XL/2 {speed['DiT-XL/2']:.2f}, DiT-D14/2 {speed['DiT-D14/2']:.2f}" + (
        "" if args.stand_in else f" (paper: {PAPER_IT_PER_S['DiT-XL/2']}, {PAPER_IT_PER_S['DiT-D14/2']})"))
    rate = result["images_per_s"]
    print(f"{config['sampler']} at NFE {config['nfe']}: images/s DiT-XL/2 {rate['DiT-XL/2']:.3f}, "
          f"DiT-D14/2 {rate['DiT-D14/2']:.3f}")
    print(f"D14 sampling speed-up over XL: {result['speedup']:.2f}x (paper: {PAPER_SPEEDUP}x)"
          + (" [stand-in: not comparable]" if args.stand_in else ""))
    write_json(args.json, result)
    if args.min_speedup is not None and result["speedup"] < args.min_speedup:
        raise SystemExit(f"error: the speed-up {result['speedup']:.2f}x is below --min-speedup {args.min_speedup}")
    return result


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm",
                        help="DiT's sampler (the paper's: ddpm); the fast solvers take e.g. --steps 20")
    parser.add_argument("--steps", type=int, default=250, help="sampling steps (= NFE) per timed call")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=32, help="images per call (x2 rows with guidance)")
    parser.add_argument("--image-size", type=int, default=256, help="pixels; the latents are 1/8 of it")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="fp32 (sample_ddp.py's default, TF32 on GPU) or weights cast once to bf16/fp16")
    parser.add_argument("--rounds", type=int, default=3, help="alternated (ABBA) rounds of each variant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a busy shared CPU, where spinning threads slow tiny models)")
    parser.add_argument("--stand-in", action="store_true", help="a tiny model with XL's depth instead of DiT-XL/2")
    parser.add_argument("--min-speedup", type=float, default=None, help="exit 1 if the speed-up is below this")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

"""How close the fp32 DiT forward gets to this CPU's fp32 matmul rate, measured in one run.

Efficiency = (FLOPs of one forward / its time) / (FLOP rate of a plain GEMM of the forward's
largest shape), both timed in the same round, rounds alternated ABBA, median of per-round
figures. FLOPs are counted by torch.utils.flop_counter (matmuls, attention, the patch conv).
Variants (same weights and inputs):
  current   models.py as it is
  legacy    the previous formulas: transposed (strided) residual stream from the patch embedding,
            modulate and the gated residual as separate mul and add passes
Goal (issue): current >= 70% of the matmul rate. `--profile` prints the op table of one
forward, i.e. where the non-GEMM time goes.

    python bench/bench_forward.py [--quick] [--profile] [--json out.json]
"""
import argparse
import contextlib
import os
import statistics
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import models  # noqa: E402
from bench.bench_model import fill_random  # noqa: E402
from bench.harness import alternate, machine_info, print_comparison, summary, write_json  # noqa: E402


def _legacy_block_forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * self.attn(_legacy_modulate(self.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * self.mlp(_legacy_modulate(self.norm2(x), shift_mlp, scale_mlp))


def _legacy_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


@contextlib.contextmanager
def legacy_formulas():
    saved = models.DiTBlock.forward, models.PatchEmbed.forward
    models.DiTBlock.forward = _legacy_block_forward
    models.PatchEmbed.forward = lambda self, x: self.proj(x).flatten(2).transpose(1, 2)
    try:
        yield
    finally:
        models.DiTBlock.forward, models.PatchEmbed.forward = saved


def build(args):
    with torch.device("meta"):
        model = models.DiT_models[args.model](input_size=args.input_size)
    model = fill_random(model.to_empty(device="cpu")).eval().requires_grad_(False)  # meta + fill: no slow init
    grid = args.input_size // model.patch_size  # pos_embed is not trainable, so fill_random skips it
    model.pos_embed.data.copy_(torch.from_numpy(models.get_2d_sincos_pos_embed(model.hidden_size, grid)).unsqueeze(0))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=generator)
    t = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    y = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    return model, (x, t, y)


def run(args):
    model, inputs = build(args)
    tokens = args.batch_size * (args.input_size // model.patch_size) ** 2
    gemm_a = torch.randn(tokens, model.hidden_size)
    gemm_b = torch.randn(model.hidden_size, int(model.hidden_size * model.mlp_ratio))
    gemm_flops = 2 * gemm_a.shape[0] * gemm_a.shape[1] * gemm_b.shape[1]
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(*inputs)
        forward_flops = counter.get_total_flops()
        with legacy_formulas():
            legacy_out = model(*inputs)
        current_out = model(*inputs)

        def legacy():
            with legacy_formulas():
                model(*inputs)
        variants = {"current": lambda: model(*inputs), "gemm": lambda: gemm_a @ gemm_b, "legacy": legacy}
        times = alternate(variants, rounds=args.rounds)
    rate = lambda flops, seconds: [flops / s for s in seconds]  # noqa: E731
    gemm_rate = rate(gemm_flops, times["gemm"])
    efficiency = {name: [f / g for f, g in zip(rate(forward_flops, times[name]), gemm_rate)]
                  for name in ("current", "legacy")}
    return dict(config=dict(model=args.model, input_size=args.input_size, batch_size=args.batch_size,
                            tokens=tokens, threads=torch.get_num_threads()),
                forward_gflop=forward_flops / 1e9, gemm_shape=[gemm_a.shape[0], gemm_a.shape[1], gemm_b.shape[1]],
                gemm_gflops=statistics.median(gemm_rate) / 1e9,
                efficiency={name: dict(every_round=values, median=statistics.median(values))
                            for name, values in efficiency.items()},
                current_vs_legacy=summary(times, "current", "legacy"),
                max_abs_difference_vs_legacy=float((current_out - legacy_out).abs().max()),
                max_abs_output=float(legacy_out.abs().max()))


def profile_table(args, rows=15):
    model, inputs = build(args)
    with torch.no_grad():
        model(*inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(*inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.rounds = "DiT-B/2", 4
    result = run(args)
    config = result["config"]
    print(f"{machine_info()}\n{config['model']}, batch {config['batch_size']} at {config['input_size']}x"
          f"{config['input_size']} ({config['tokens']} tokens), {config['threads']} threads: "
          f"{result['forward_gflop']:.1f} GFLOP per forward; GEMM {result['gemm_shape']} at "
          f"{result['gemm_gflops']:.1f} GFLOP/s (median)")
    for name, record in result["efficiency"].items():
        print(f"{name}: forward at {100 * record['median']:.0f}% of the GEMM rate (median; every round: "
              + ", ".join(f"{100 * v:.0f}%" for v in record["every_round"]) + ")"
              + ("; goal >= 70%" if name == "current" else ""))
    print_comparison(result["current_vs_legacy"], "forward time")
    print(f"current vs legacy outputs: max |difference| {result['max_abs_difference_vs_legacy']:.1e} "
          f"(outputs up to {result['max_abs_output']:.1f})")
    if args.profile:
        print(profile_table(args))
    return write_json(args.json, result)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="DiT-B/2, 4 rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also print the op profile of one forward")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

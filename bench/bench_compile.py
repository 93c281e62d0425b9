"""Does torch.compile speed up sampling here? The sampler's forward (forward_with_cfg, a fixed
batch, a new timestep every step) eager vs torch.compile'd, alternated ABBA in one run, after the
compiled one's first call (whose compile time is reported separately); and how many times it
compiled over the timed steps (it must be once: the shapes never change while sampling).

    python bench/bench_compile.py [--quick] [--json out.json]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_model import fill_random  # noqa: E402
from bench.harness import alternate, machine_info, print_comparison, summary, write_json  # noqa: E402
from models import DiT_models  # noqa: E402


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.model, args.input_size, args.rounds = "DiT-S/2", 16, 4
    torch.manual_seed(0)
    model = fill_random(DiT_models[args.model](input_size=args.input_size)).eval().requires_grad_(False)
    half = args.batch_size
    x = torch.randn(2 * half, 4, args.input_size, args.input_size)
    y = torch.cat([torch.randint(0, 1000, (half,)), torch.full((half,), 1000)])
    steps = iter(range(10 ** 6))
    compiled = torch.compile(model.forward_with_cfg)

    def call(fn):
        t = torch.full((2 * half,), 999 - next(steps) % 1000)  # a new timestep every call, as in sampling
        with torch.no_grad():
            return fn(x, t, y, 4.0)
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    call(compiled)
    compile_seconds = time.perf_counter() - start
    times = alternate({"compiled": lambda: call(compiled), "eager": lambda: call(model.forward_with_cfg)},
                      rounds=args.rounds)
    compiles = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    record = summary(times, "compiled", "eager")
    with torch.no_grad():
        t = torch.full((2 * half,), 500)
        difference = float((compiled(x, t, y, 4.0) - model.forward_with_cfg(x, t, y, 4.0)).abs().max())
    print(f"{machine_info()}\n{args.model} at {args.input_size}x{args.input_size}, cfg batch {2 * half}, "
          f"{torch.get_num_threads()} thread(s): first compiled call {compile_seconds:.1f} s, graphs compiled "
          f"{compiles}, max |compiled - eager| {difference:.1e}")
    print_comparison(record, "sampling forward")
    result = dict(compile_seconds=compile_seconds, graphs_compiled=compiles, max_abs_difference=difference,
                  comparison=record)
    return write_json(args.json, result)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2, help="images (the cfg batch is twice this)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="DiT-S/2 at 16x16, 4 rounds")
    parser.add_argument("--json", default=None)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

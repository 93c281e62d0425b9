"""Model benchmarks, measured in one run on this machine (CPU unless a GPU is visible):

1. Sampling-speed claim: forward time of DiT-XL/2 vs DiT-D14/2 (batch 2, 256 px latents =
   4 x 32 x 32, no grad). Goal: D14 >= 1.95x faster.
2. The gated training step (forward + backward) of a 1:2-gated model, ours ("sparse": no
   backward pass and no stored activations for blocks a sample skips) vs the literal formula
   m*block(x) + (1-m)*x over all blocks ("dense"), same weights and Gumbel draws; once with all
   weights training, once with frozen weights (only the gate logits train). Goals: <= 0.75x the
   time, <= 0.7x the peak memory. Peak memory is the peak of the C heap in use during one step
   above its start (sampled after every op), and, exactly, the bytes of the activations autograd
   saved for the backward pass.

    python bench/bench_model.py [--quick]
"""
import argparse
import ctypes
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import DiT_models, prune_to_kept_blocks  # noqa: E402
from bench.harness import alternate, print_comparison, summary  # noqa: E402

GATED_CONFIG = dict(hidden_size=384, num_heads=6, depth=28, input_size=16, num_classes=1000,
                    groups=[[1, 2]] * 14)


def fill_random(model, seed=0):
    """Random weights everywhere (our init zeroes the adaLN layers, which would make every block
    an identity and the timing unrepresentative)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def bench_depth(repeats, device):
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"]()
    xl = fill_random(xl.to_empty(device="cpu")).to(device).eval()  # meta + fill: skips a slow xavier init
    xl.pos_embed.data.zero_()
    d14 = prune_to_kept_blocks(xl, list(range(0, 28, 2))).eval()
    x = torch.randn(2, 4, 32, 32, device=device)
    t, y = torch.tensor([500, 10], device=device), torch.tensor([3, 207], device=device)

    def forward(model):
        with torch.no_grad():
            model(x, t, y)
        if device == "cuda":
            torch.cuda.synchronize()
    times = alternate({"DiT-XL/2": lambda: forward(xl), "DiT-D14/2": lambda: forward(d14)}, rounds=repeats,
                      device=device)
    record = summary(times, "DiT-XL/2", "DiT-D14/2")  # ratio XL/D14 time = D14's speed-up
    return dict(xl_forward_s=record["variant_median_s"], d14_forward_s=record["baseline_median_s"],
                d14_speedup=record["ratio_median"], record=record)


def gated_model(weights_train, mode):
    model = fill_random(DiT_models["DiT-S/2"](**GATED_CONFIG))
    model.train()
    model.gate_forward = mode
    model.tau, model.scaling = 1.0, 1.0
    for name, param in model.named_parameters():
        if not name.startswith("gate_logits") and name != "pos_embed":
            param.requires_grad_(weights_train)
    return model


def gated_step(model, batch, draw_seed):
    x, t, y, drops = batch
    onehots = model.sample_gate_onehots(len(x), generator=torch.Generator().manual_seed(draw_seed))
    out = model(x, t, y, force_drop_ids=drops, gate_onehots=onehots)
    out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)


def make_batch(batch_size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 4, 16, 16, generator=generator)
    return x, torch.randint(0, 1000, (batch_size,), generator=generator), \
        torch.randint(0, 1000, (batch_size,), generator=generator), torch.zeros(batch_size, dtype=torch.long)


def saved_activation_bytes(model, batch):
    """Bytes of the distinct tensors autograd keeps for the backward pass during one step."""
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        gated_step(model, batch, draw_seed=0)
    return sum(seen.values())


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapPeak(TorchDispatchMode):
    """Peak bytes in use on the C heap (glibc mallinfo2: small blocks + mmapped blocks), sampled
    after every tensor op of the forward and backward pass. Unlike RSS it drops when tensors are
    freed, so it measures what one step really holds at its worst moment."""

    def __init__(self):
        super().__init__()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = _MallInfo
        self.base = self.peak = self.in_use()

    def in_use(self):
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def peak_step_mib(model, batch):
    gated_step(model, batch, draw_seed=1)  # warm-up: optimizer-free, but lazily created buffers
    meter = HeapPeak()
    with meter:
        gated_step(model, batch, draw_seed=0)
    return (meter.peak - meter.base) / 2 ** 20


def bench_gated(repeats):
    rows = {}
    batch = make_batch()
    for weights_train in (True, False):
        label = "all weights train" if weights_train else "only gate logits train"
        peaks, saved, steps = {}, {}, {}
        for mode in ("dense", "sparse"):
            model = gated_model(weights_train, mode)
            draws = iter(range(10 ** 6))
            steps[mode] = lambda model=model, draws=draws: gated_step(model, batch, next(draws))
            peaks[mode] = peak_step_mib(model, batch)
            saved[mode] = saved_activation_bytes(model, batch)
        record = summary(alternate(steps, rounds=repeats), "sparse", "dense")
        rows[label] = dict(
            dense_step_s=record["baseline_median_s"], sparse_step_s=record["variant_median_s"],
            time_ratio=record["ratio_median"], record=record,
            dense_peak_mib=peaks["dense"], sparse_peak_mib=peaks["sparse"], peak_ratio=peaks["sparse"] / peaks["dense"],
            activation_ratio=saved["sparse"] / saved["dense"])
    return rows


def main(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = 2
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    depth = bench_depth(args.repeats, device) if args.only in (None, "depth") else {}
    if depth:
        print(f"\n[1] forward, batch 2, 4x32x32 latents: DiT-XL/2 {depth['xl_forward_s'] * 1000:.0f} ms, "
              f"DiT-D14/2 {depth['d14_forward_s'] * 1000:.0f} ms (medians) -> D14 is {depth['d14_speedup']:.2f}x "
              f"faster (median of per-round XL/D14 ratios; goal >= 1.95x)")
        print_comparison(depth["record"], "    XL/D14 time")
    if args.only == "depth":
        return dict(depth=depth)
    print("\n[2] gated training step (fwd+bwd), hidden 384, depth 28, 1:2 groups, batch 16 at 4x16x16:")
    gated = bench_gated(args.repeats)
    for label, row in gated.items():
        print(f"  {label}: dense {row['dense_step_s'] * 1000:.0f} ms / {row['dense_peak_mib']:.0f} MiB peak, "
              f"sparse {row['sparse_step_s'] * 1000:.0f} ms / {row['sparse_peak_mib']:.0f} MiB peak -> "
              f"time {row['time_ratio']:.2f}x (goal <= 0.75x), peak memory {row['peak_ratio']:.2f}x "
              f"(goal <= 0.7x), saved activations {row['activation_ratio']:.2f}x")
        print_comparison(row["record"], "    sparse/dense step time")
    if args.json:
        print(json.dumps(dict(depth=depth, gated=gated)))
    return dict(depth=depth, gated=gated)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4, help="alternated (ABBA) rounds of each variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--only", choices=["depth", "gated"], default=None, help="run one part")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

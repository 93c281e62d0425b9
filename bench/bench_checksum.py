"""Cost of the checkpoint checksum (tinyfusion/io/checkpoints.py `tensors_checksum`: CRC32 over the
raw bytes of every tensor) against blake2b over the same bytes, and of the non-finite check that
every loaded model gets, on a state dict of --params float32 parameters shaped like DiT blocks
(default 340M, about half of DiT-XL/2's 675M). Variants alternate ABBA in one run; the median and
every pair are printed.

    python bench/bench_checksum.py                  # 340M parameters (1.36 GB), 2 ABBA rounds
    python bench/bench_checksum.py --params 50e6    # quick look
"""
import argparse
import hashlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyfusion.io.checkpoints import check_finite_weights, tensors_checksum  # noqa: E402


def dit_like_state_dict(params, hidden=1152):
    """Tensors of DiT-XL block shapes (qkv, proj, fc1, fc2, adaLN) until `params` are reached."""
    shapes = [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden), (6 * hidden, hidden)]
    state, total, block = {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    while total < params:
        for index, shape in enumerate(shapes):
            rows = min(shape[0], -(-(params - total) // shape[1]))  # the last tensor is cut to hit `params`
            if rows <= 0:
                break
            state[f"blocks.{block}.{index}.weight"] = torch.randn((rows, shape[1]), generator=generator)
            total += rows * shape[1]
        block += 1
    return state, total


def blake2b_checksum(state):
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def timed(function, state):
    start = time.perf_counter()
    function(state)
    return time.perf_counter() - start


def main(args):
    torch.set_num_threads(1)
    state, total = dit_like_state_dict(int(args.params))
    gigabytes = total * 4 / 1e9
    print(f"{total / 1e6:.0f}M float32 parameters ({gigabytes:.2f} GB) in {len(state)} tensors, 1 thread")
    variants = {"crc32 (ours)": tensors_checksum, "blake2b": blake2b_checksum,
                "non-finite check": lambda s: check_finite_weights(s, "bench")}
    times = {name: [] for name in variants}
    names = list(variants)
    for _ in range(args.rounds):
        for name in names + names[::-1]:  # ABBA
            times[name].append(timed(variants[name], state))
    for name in names:
        pairs = " ".join(f"{t:.2f}" for t in times[name])
        median = statistics.median(times[name])
        print(f"{name:18s} median {median:.2f} s ({gigabytes / median:.2f} GB/s); every run: {pairs}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--params", type=float, default=340e6)
    parser.add_argument("--rounds", type=int, default=2)
    main(parser.parse_args())

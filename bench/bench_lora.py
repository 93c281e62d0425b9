"""Our LoRA layer (tinyfusion/pruning/lora.py) against peft's injection on a small DiT: one forward +
backward with frozen base weights, as in pruning, the two alternated (ABBA) so that a busy
machine slows both alike. Prints the median of each and every pair, and the key names each
produces (peft renames the wrapped weights).

    python bench/bench_lora.py
"""
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import DiT_models  # noqa: E402
from tinyfusion.pruning.lora import apply_lora  # noqa: E402


def main(args=None):
    from peft import LoraConfig, inject_adapter_in_model
    torch.manual_seed(0)
    base = DiT_models["DiT-S/2"](input_size=8, depth=4, num_classes=10)
    ours = copy.deepcopy(base)
    apply_lora(ours, rank=8)
    targets = r".*(qkv|proj|fc1|fc2|adaLN_modulation\.1|mlp\.0|mlp\.2|linear)$"
    theirs = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets), copy.deepcopy(base))
    for name, param in theirs.named_parameters():
        param.requires_grad_("lora_" in name)
    x, t, y = torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))

    def timed(model):
        start = time.perf_counter()
        model(x, t, y).square().mean().backward()
        return time.perf_counter() - start

    timed(ours), timed(theirs)  # warm-up
    pairs = []
    for index in range(args.pairs if args else 16):  # ABBA: ours first on even pairs, peft first on odd ones
        if index % 2 == 0:
            a, b = timed(ours), timed(theirs)
        else:
            b, a = timed(theirs), timed(ours)
        pairs.append((a, b))
    for a, b in pairs:
        print(f"ours {a * 1e3:7.1f} ms  peft {b * 1e3:7.1f} ms  ratio {a / b:.3f}")
    print(f"median ratio ours/peft {statistics.median(a / b for a, b in pairs):.3f} "
          f"(ours {statistics.median(a for a, _ in pairs) * 1e3:.1f} ms, "
          f"peft {statistics.median(b for _, b in pairs) * 1e3:.1f} ms)")
    print("peft keys:", [k for k in theirs.state_dict() if k.startswith("blocks.0.attn.qkv")])
    print("our keys: ", [k for k in ours.state_dict() if k.startswith("blocks.0.attn.qkv")])
    return dict(ratio_ours_over_peft=statistics.median(a / b for a, b in pairs), pairs=[list(p) for p in pairs])


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16, help="timed (ours, peft) pairs, in ABBA order")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

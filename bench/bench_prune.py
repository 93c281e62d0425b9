"""Time and peak memory of one learnable-pruning step: ours (prune_by_learning.py's step: the
sparse gated forward, LoRA, EMA of the trainable parameters only) against the original
algorithm written out here (every block run with autograd on every sample and mixed as
m*block(x) + (1-m)*x, LoRA, EMA of the full model updated by a per-tensor loop), same config,
same optimizer, same loss. Goals: time <= 0.75x, memory <= 0.6x.

    python bench/bench_prune.py --threads 1           # DiT-S/2 width, 28 blocks, 1:2 groups, batch 8, 32x32x4
    python bench/bench_prune.py --latent-size 16 --train weights   # --delta-w without --lora

Time: the two steps alternate ABBA in one process (a busy machine slows both alike), median of
the per-round ratios over --steps rounds after a warm-up step each; every pair is printed. Memory: each variant runs alone in a fresh subprocess, and
its peak resident set (getrusage ru_maxrss, the kernel's high-water mark, which sees every
allocation torch makes) minus the resident set after imports is reported: model, EMA,
optimizer state and the step's activations.
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import alternate, print_comparison, summary  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from tinyfusion.ema import ParameterEMA  # noqa: E402
from tinyfusion.lora import apply_lora  # noqa: E402
from models import DiT_models  # noqa: E402
from prune_by_learning import pruning_loss  # noqa: E402
from tinyfusion.gradients import clip_grad_norm  # noqa: E402
from tinyfusion.loop import AutocastForward  # noqa: E402


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(args, seed=0):
    torch.manual_seed(seed)
    model = DiT_models[args.model](input_size=args.latent_size, in_channels=4, num_classes=1000, depth=args.depth,
                                   groups=[[1, 2]] * (args.depth // 2))
    for block in model.blocks:  # trained-like adaLN, so blocks are not identities
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    if args.train == "lora":
        apply_lora(model, rank=8)
    else:  # "weights": every weight trains (--delta-w alone); "logits": only the gates (no --delta-w)
        for name, param in model.named_parameters():
            param.requires_grad_(args.train == "weights" and name != "pos_embed")
    for logits in model.gate_logits:
        logits.requires_grad_(True)
    model.tau, model.scaling = 1.0, 100.0
    return model.train()


def make_optimizer(model):
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("gate_logits")]
    return torch.optim.AdamW([{"params": weights, "lr": 1e-4},
                              {"params": list(model.gate_logits), "lr": 1e-3}], weight_decay=0)


class OursStep:
    """prune_by_learning.py's step (one rank): sparse gated forward inside the model, EMA of the
    trainable parameters only."""

    def __init__(self, args):
        self.model = build(args)
        self.model.gate_forward = "sparse"
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model)
        self.ema = ParameterEMA([(n, p) for n, p in self.model.named_parameters() if p.requires_grad], 0.999)
        self.forward = AutocastForward(self.model, torch.float32, torch.device("cpu"))
        self.diffusion = create_diffusion("")

    def __call__(self, x, y):
        loss = pruning_loss(self.forward, self.diffusion, x, y)
        loss.backward()
        clip_grad_norm(self.trainable, 1.0)
        self.optimizer.step()
        self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class OriginalStep:
    """The original algorithm: all blocks run with autograd for every sample, each output mixed
    as m*block(x) + (1-m)*x, and an EMA copy of the whole model updated tensor by tensor."""

    def __init__(self, args):
        self.model = build(args)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model)
        self.diffusion = create_diffusion("")

    def gated_forward(self, x, t, y):
        model = self.model
        masks = model.block_masks_from_onehots(model.sample_gate_onehots(x.shape[0]))
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, model.training)
        for index, block in enumerate(model.blocks):
            m = masks[:, index].view(-1, 1, 1)
            h = m * block(h, c) + (1 - m) * h
        return model.unpatchify(model.final_layer(h, c))

    @torch.no_grad()
    def update_ema(self, decay=0.999):
        ema_params = dict(self.ema_model.named_parameters())
        for name, param in self.model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def __call__(self, x, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],))
        loss = self.diffusion.training_losses(self.gated_forward, x, t, dict(y=y))["loss"].mean()
        loss.backward()
        clip_grad_norm(self.trainable, 1.0)
        self.optimizer.step()
        self.update_ema()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


VARIANTS = {"ours": OursStep, "original": OriginalStep}


def batch(args, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=generator)
    y = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    return x, y


def memory_of(variant, args):
    """Run one variant alone in this process: peak RSS above the post-import RSS."""
    baseline = rss_mb()
    step = VARIANTS[variant](args)
    x, y = batch(args, 0)
    for _ in range(2):  # the second step has the optimizer state allocated
        step(x, y)
    return {"variant": variant, "peak_mb": peak_rss_mb() - baseline}


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(memory_of(args.memory_only, args)))
        return
    trains = {"lora": "LoRA rank 8 + logits", "weights": "all weights + logits", "logits": "logits only"}[args.train]
    print(f"config: {args.model} width, depth {args.depth}, groups [[1,2]]*{args.depth // 2}, {trains} train, "
          f"batch {args.batch_size} of 4x{args.latent_size}x{args.latent_size} latents, fp32 on CPU, "
          f"{torch.get_num_threads()} threads")
    memory = {}
    for variant in VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--memory-only", variant, "--model", args.model,
                   "--depth", str(args.depth), "--batch-size", str(args.batch_size), "--latent-size", str(args.latent_size),
                   "--threads", str(args.threads), "--train", args.train]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[variant] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
        print(f"  peak memory {variant:8s}: {memory[variant]:8.1f} MB")

    steps = {variant: cls(args) for variant, cls in VARIANTS.items()}
    batches = {variant: iter(range(10 ** 6)) for variant in VARIANTS}  # each variant sees batch 0, 1, 2, ...
    calls = {variant: (lambda variant=variant: steps[variant](*batch(args, next(batches[variant]))))
             for variant in VARIANTS}
    record = summary(alternate(calls, rounds=args.steps), "ours", "original")  # ABBA after one warm-up each
    medians = {"ours": record["variant_median_s"], "original": record["baseline_median_s"]}
    print_comparison(record, "  time per step")
    time_ratio = record["ratio_median"]
    memory_ratio = memory["ours"] / memory["original"]
    print(f"ours / original: time {time_ratio:.3f}x (goal <= 0.75x), memory {memory_ratio:.3f}x (goal <= 0.6x)")
    result = {"time_ratio": time_ratio, "memory_ratio": memory_ratio, "ms": medians, "peak_mb": memory, "time": record}
    if args.json:
        print(json.dumps(result))
    return result


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-S/2", help="width/heads/patch of this DiT config")
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--train", choices=["lora", "weights", "logits"], default="lora",
                        help="what trains: --delta-w --lora (default), --delta-w alone, or the logits only")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory-only", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

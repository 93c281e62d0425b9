"""LoRA (low-rank adaptation) on every nn.Linear of a model, for the recoverability estimate of
learnable pruning (`prune_by_learning.py --delta-w --lora`).

`LoRALinear` replaces an nn.Linear in place and *reuses* its `weight` and `bias` Parameters, so
every original state-dict key stays where it was (`blocks.3.attn.qkv.weight`) and only
`lora_A` / `lora_B` are added. Its forward is
    y = x W^T + b + (alpha / rank) * (x A^T) B^T
on whatever batch it gets: the gated forward runs a block on a sub-batch (the samples that keep
it), which needs nothing special. Without autograd, on enough rows, it computes
x (W + (alpha / rank) B A)^T + b: the same up to rounding, in one matmul. B starts at zero, so the model's output is unchanged at the
start; A gets kaiming-uniform(a=sqrt(5)) like nn.Linear (and peft).

Why our own layer and not peft's `inject_adapter_in_model`: measured with `python bench/bench_lora.py` (one
forward+backward of a small DiT, the two alternated) they run at the same speed (ours/peft 1.05 on
a busy 2-core CPU, within noise), but peft wraps each Linear in a `LoraLayer` that moves the
frozen weights to `...qkv.base_layer.weight` and the factors to `...qkv.lora_A.default.weight`,
which breaks the key names that every checkpoint tool here relies on, and importing it costs
~10 s. The layer below is 20 lines and keeps the keys.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, base, rank=8, alpha=None, generator=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: names and values stay put
        self.bias = base.bias
        self.rank = rank
        self.scaling = (2 * rank if alpha is None else alpha) / rank  # the original's alpha = 2 x rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        if base.weight.device.type != "meta":
            # drawn on the CPU, then moved: the same adapters on every device and rank
            init = torch.empty(rank, self.in_features)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                self.lora_A.copy_(init)

    def forward(self, x):
        rows = x.numel() // self.in_features
        if not torch.is_grad_enabled() and rows * (self.in_features + self.out_features) >= self.in_features * self.out_features:
            # no autograd (the gated forward's pass over the samples that drop a block) and enough
            # rows that folding the update into the weight, W + s B A (out x in x rank FLOPs),
            # costs less than applying it to every row (rows x (in + out) x rank): one matmul over
            # x instead of three matmuls and an elementwise pass
            return F.linear(x, torch.addmm(self.weight, self.lora_B, self.lora_A, alpha=self.scaling), self.bias)
        # the scale goes on the rank-r intermediate (tiny), and the update is accumulated onto the
        # base output by one rank-r matmul (addmm), which keeps for backward only that tiny
        # intermediate; out of place, so the base output can be kept by a selective checkpoint
        low = F.linear(x, self.lora_A) * self.scaling
        base = F.linear(x, self.weight, self.bias)
        return torch.addmm(base.flatten(0, -2), low.flatten(0, -2), self.lora_B.t()).view(base.shape)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, scaling={self.scaling}"


def apply_lora(model, rank=8, alpha=None, seed=0):
    """Replace every nn.Linear inside `model` by a LoRALinear (in place), freeze everything that
    is not LoRA, and return the [(name, parameter)] of the LoRA factors in model order.

    A is drawn from a generator seeded by `seed`, so every rank of a distributed run starts from
    the same adapters without any communication."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise ValueError("apply_lora found no nn.Linear in the model")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, generator=generator))
    for param in model.parameters():
        param.requires_grad_(False)
    named = lora_parameters(model)
    for _, param in named:
        param.requires_grad_(True)
    return named


def lora_parameters(model):
    """[(name, parameter)] of every LoRA factor in `model`."""
    return [(name, param) for name, param in model.named_parameters()
            if name.endswith((".lora_A", ".lora_B"))]

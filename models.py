"""The DiT model (Peebles & Xie) with TinyFusion's learnable depth gates.

Read top to bottom: embedders -> transformer block -> final layer -> DiT -> gates -> pruning ->
configurations. Parameter and buffer names match the official DiT checkpoints exactly, so the
published `DiT-XL-2-256x256.pt` loads with strict=True.

A *gated* model (`groups=[[N, M], ...]`) splits its blocks into consecutive groups of M and
learns, per group, which N blocks to keep: each group holds one logit per candidate mask (every
M-bit vector with N ones, in `itertools.combinations` order). In training each sample draws a
hard Gumbel-softmax choice (straight-through), and block j computes m_j*block(x) + (1-m_j)*x.
"""
import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def modulate(x, shift, scale):
    """x * (1 + scale) + shift per sample, in one pass over x (addcmul) instead of two."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


#################################################################################
#                       Embedding layers for patches, time, labels              #
#################################################################################

class PatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = patch) then tokens in row-major order, stored contiguously:
    the transposed view of the conv output would otherwise be inherited by the whole residual
    stream (x + ... keeps its input's layout), making every LayerNorm and elementwise op of every
    block work on strided memory."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (float) timestep, then a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first, as the released weights expect
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        frequencies = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with an extra "null" row (index num_classes) for classifier-free guidance.
    In training, labels are dropped to the null class with probability `dropout_prob`;
    `force_drop_ids` (1 = drop) replaces the random draw, so that a teacher and a student
    can share exactly the same drops."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT block                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, via PyTorch's SDPA kernel; MAR's
    blocks add dropout on the attention weights and on the output (active in training only)."""

    def __init__(self, dim, num_heads, attn_dropout=0.0, proj_dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout, self.proj_dropout = attn_dropout, proj_dropout

    def forward(self, x):
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.proj(x.transpose(1, 2).reshape(batch, tokens, channels))
        return F.dropout(x, self.proj_dropout, self.training) if self.proj_dropout else x


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (DiT: tanh GELU; MAR's ViT blocks: exact GELU and dropout after each)."""

    def __init__(self, dim, hidden_dim, approximate="tanh", dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = dropout

    def forward(self, x):
        if not self.dropout:
            return self.fc2(self.act(self.fc1(x)))
        x = F.dropout(self.act(self.fc1(x)), self.dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + gate * branch, as one addcmul pass over the residual stream
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                Gates (TinyFusion)                             #
#################################################################################

def candidate_masks(keep, group_size):
    """All `group_size`-bit masks with `keep` ones, in itertools.combinations order."""
    combos = list(itertools.combinations(range(group_size), keep))
    masks = torch.zeros(len(combos), group_size)
    for row, kept in enumerate(combos):
        masks[row, list(kept)] = 1.0
    return masks


def gate_decision(groups, logits, scaling):
    """(kept_indices, choices, confidences) of gate logits (one 1-D tensor per group): per group
    the argmax candidate and max softmax(logits * scaling). Takes the logits explicitly so the
    decision can be read from an EMA of them without touching the model."""
    kept, choices, confidences, offset = [], [], [], 0
    for (keep, group_size), group_logits in zip(groups, logits):
        group_logits = group_logits.detach().float().cpu()
        choice = int(group_logits.argmax())
        mask = candidate_masks(keep, group_size)[choice]
        kept += [offset + int(j) for j in torch.nonzero(mask).flatten()]
        choices.append(choice)
        confidences.append(float(torch.softmax(group_logits * scaling, dim=0).max()))
        offset += group_size
    return kept, choices, confidences


def validate_groups(groups, depth, list_sizes=None):
    """One-line errors for a pattern that cannot describe `depth` blocks (split into block lists
    of `list_sizes`, e.g. MAR's encoder and decoder: no group may span two lists)."""
    if not groups:
        raise ValueError("groups must be a non-empty list of [keep, of] pairs, e.g. [[1, 2]] * 14")
    for keep, group_size in groups:
        if not 1 <= keep <= group_size:
            raise ValueError(f"group [{keep}, {group_size}] must keep between 1 and {group_size} blocks")
    total = sum(group_size for _, group_size in groups)
    if total != depth:
        raise ValueError(f"groups {groups} cover {total} blocks but the model has depth {depth}; "
                         f"the group sizes (second numbers) must add up to {depth}")
    boundaries, edge = set(), 0
    for size in (list_sizes or [depth])[:-1]:
        edge += size
        boundaries.add(edge)
    start = 0
    for keep, group_size in groups:
        crossed = [edge for edge in boundaries if start < edge < start + group_size]
        if crossed:
            raise ValueError(f"group [{keep}, {group_size}] over blocks {start}..{start + group_size - 1} spans the "
                             f"boundary at block {crossed[0]} between two block lists (sizes {list_sizes}); "
                             f"give each list its own groups")
        start += group_size


def straight_through_gumbel_onehot(logits, tau, batch_size, generator=None):
    """Per-sample hard one-hot draws from Gumbel-softmax(logits / tau) whose forward value is
    exactly 0/1 and whose gradient is that of the soft sample (straight-through)."""
    uniform = torch.rand(batch_size, logits.shape[-1], device=logits.device, generator=generator)
    gumbels = -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))
    soft = torch.softmax((logits.float().unsqueeze(0) + gumbels) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # value == hard exactly (soft - soft.detach() is exactly 0)


_aten = torch.ops.aten
# outputs a block keeps for backward under selective recomputation: matmuls and attention, the
# costly ones to recompute (the attention kernels' names differ per device)
_KEPT_OUTPUT_OPS = {_aten.mm.default, _aten.bmm.default} | {
    getattr(_aten, name).default for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(_aten, name)}


def _keep_matmul_outputs(ctx, op, *args, **kwargs):
    """Selective-recomputation policy of the gated blocks' autograd pass: keep what matmuls and
    attention output, recompute the rest in backward (layer norms, modulation, GELU, the gated
    residual adds, layout copies: elementwise passes, cheap next to the matmuls). A linear's addmm
    (1-D bias) is kept; an addmm onto a full-size tensor (LoRA's rank-r update) is recomputed from
    the kept base output and the kept rank-r intermediate."""
    if op in _KEPT_OUTPUT_OPS or (op is _aten.addmm.default and args[0].dim() <= 1):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_recompute_context():
    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


# Below this many token rows of dropped samples, a gated block runs one autograd pass over the
# whole batch instead of a second, small call for the dropped samples: the split saves the dropped
# samples' backward but its small matmuls run slowly. Measured per block (`python
# bench/bench_prune.py --crossover`, DiT-S width, LoRA, batch 8, 1 thread): the split costs 1.01-1.02x
# one pass at 16-32 dropped rows, 0.95x at 48, 0.89x at 64, 0.71x at 112. DiT at 256 px has 256
# tokens per sample, so there every dropped sample is split off; tiny latents run one pass.
DEFAULT_SPLIT_MIN_DROPPED_ROWS = 48


# an upper bound on the graphs a compiled block needs in the gated forward (2 autograd modes x 2
# requires-grad states of the input x 2 batch kinds (one sample, more) x 2 LoRA forms), with room
COMPILED_BLOCK_VARIANTS = 32


class StraightThroughGate(torch.autograd.Function):
    """The gated block's output m*block(x) + (1-m)*x for a 0/1 mask m, given as
    `kept` = block(x) where m = 1 and x where m = 0 (computed with autograd through the kept
    samples only) and `delta` = block(x) - x for every sample (without autograd).

    Forward: `kept` (in the dtype m*block(x) would have). Backward: `kept` gets the incoming
    gradient g unchanged, and each sample's mask gets <g, delta>, which is what the dense formula
    gives (d/dm = <g, block(x) - x>, d/dblock(x) = m g, d/dx = (1 - m) g: `kept`'s own
    gradient). `delta` is the only tensor kept for the backward pass, and the per-sample dot
    products are one batched matmul."""

    @staticmethod
    def forward(ctx, kept, mask, delta):
        ctx.save_for_backward(delta)
        ctx.kept_dtype, ctx.mask_dtype = kept.dtype, mask.dtype
        out_dtype = torch.result_type(kept, mask)
        return kept.to(out_dtype) if out_dtype != kept.dtype else kept.view_as(kept)

    @staticmethod
    def backward(ctx, grad):
        (delta,) = ctx.saved_tensors
        dtype = torch.promote_types(torch.promote_types(grad.dtype, delta.dtype), torch.float32)
        per_sample = torch.bmm(grad.reshape(len(grad), 1, -1).to(dtype), delta.reshape(len(delta), -1, 1).to(dtype))
        return grad.to(ctx.kept_dtype), per_sample.view(-1).to(ctx.mask_dtype), None


class DepthGates:
    """TinyFusion's learnable depth gates, for any model whose prunable blocks are
    `gated_blocks()` (one global index frame over its block lists) and are called block(x, c)."""

    def block_list_sizes(self):
        """Blocks per block list (a group may not span two lists)."""
        return [self.depth]

    def setup_gates(self, groups):
        self.groups = None
        if groups is not None:
            validate_groups(groups, self.depth, self.block_list_sizes())
            self.groups = [list(group) for group in groups]
            self.tau = 1.0
            self.scaling = 1.0
            self.gate_forward = "sparse"
            # the sparse forward runs a block's dropped samples in a call of their own only when
            # they hold at least this many token rows (fewer: one autograd pass over the batch)
            self.gate_split_min_dropped_rows = DEFAULT_SPLIT_MIN_DROPPED_ROWS
            # with True, the sparse forward's autograd passes keep only matmul/attention outputs and
            # recompute the elementwise ops in backward (`prune_by_learning.py --recompute-elementwise`):
            # measured on the DiT-S-width bench at 256 tokens, LoRA, batch 8, peak memory 0.44x the
            # original's step instead of 0.54x, but about 20% more time on CPU, so it is off by default
            self.gate_recompute_elementwise = False
            self.gate_logits = nn.ParameterList()
            for index, (keep, group_size) in enumerate(self.groups):
                masks = candidate_masks(keep, group_size)
                self.register_buffer(f"gate_candidates_{index}", masks, persistent=False)
                self.gate_logits.append(nn.Parameter(torch.full((masks.shape[0],), 0.02)))

    def gate_candidates(self, group_index):
        return getattr(self, f"gate_candidates_{group_index}")

    def sample_gate_onehots(self, batch_size, generator=None):
        """One straight-through hard Gumbel one-hot per sample and group, drawn from
        softmax(logits * scaling / tau) (what training uses; exposed so that two forward
        passes can share the same draw)."""
        return [straight_through_gumbel_onehot(logits * self.scaling, self.tau, batch_size, generator)
                for logits in self.gate_logits]

    def block_masks_from_onehots(self, onehots):
        """(B, depth) per-sample block masks: each group's one-hot times its candidate table."""
        return torch.cat([onehot @ self.gate_candidates(index).to(onehot.dtype)
                          for index, onehot in enumerate(onehots)], dim=1)

    def gate_decisions(self):
        """Per group, the index of the most likely candidate (the current decision)."""
        return gate_decision(self.groups, self.gate_logits, self.scaling)[1]

    def gate_confidences(self):
        """Per group, max softmax(logits * scaling): how settled the decision is."""
        return gate_decision(self.groups, self.gate_logits, self.scaling)[2]

    def kept_indices(self):
        """Global indices of the blocks the current decision keeps."""
        return gate_decision(self.groups, self.gate_logits, self.scaling)[0]

    def _gated_block(self, block, x, c, mask):
        """m*block(x) + (1-m)*x for a per-sample 0/1 mask with a straight-through gradient.

        The gradient of that expression w.r.t. m needs block(x) for every sample, but the
        gradients w.r.t. the block's weights and input are zero where m == 0. So "sparse" runs
        the block with autograd only on the samples that keep it, and without autograd (no
        activations kept, no backward pass) on the others; the result, and every gradient, is
        the dense formula's."""
        on = mask.detach() != 0
        if not mask.requires_grad:  # no gate gradient wanted: skipped blocks cost nothing
            return self._kept_samples_only(block, x, c, on)
        if self.gate_forward == "dense":
            scale = mask.view(-1, 1, 1)
            return scale * self._run_block(block, x, c) + (1 - scale) * x
        kept, delta = self._kept_and_delta(block, x, c, on)
        return StraightThroughGate.apply(kept, mask, delta)

    def _kept_samples_only(self, block, x, c, on):
        """block(x) where `on`, x elsewhere; the block runs on the kept samples only."""
        if bool(on.all()):
            return self._run_block(block, x, c)
        out = x.clone()
        if bool(on.any()):
            on_index = on.nonzero().squeeze(1)
            out = out.index_copy(0, on_index, self._run_block(block, x[on_index], _rows(c, on_index)).to(x.dtype))
        return out

    def _kept_and_delta(self, block, x, c, on):
        """(kept, delta) of one gated block: kept = block(x) where `on` and x elsewhere, with
        autograd through the kept samples only; delta = block(x) - x for every sample, without
        autograd (the straight-through gradient of the mask needs it).

        The batch is split into the samples that keep the block (run with autograd) and those
        that drop it (run without), unless the dropped samples are too few for the split to pay:
        then one autograd pass over the whole batch is cheaper than a second, small block call
        (see `gate_split_min_dropped_rows`). Both give the same values and gradients."""
        num_kept, batch = int(on.sum()), len(on)
        dropped_rows = (batch - num_kept) * x.shape[1]  # token rows of the dropped samples
        if num_kept == 0:
            with torch.no_grad():
                return x, self._run_block(block, x.detach(), _detached(c)).sub_(x)
        if num_kept == batch or dropped_rows < self.gate_split_min_dropped_rows:
            block_out = self._run_gated_block(block, x, c)
            kept = block_out if num_kept == batch else torch.where(on.view(-1, 1, 1), block_out, x)
            return kept, block_out.detach() - x.detach()
        on_index, off_index = on.nonzero().squeeze(1), (~on).nonzero().squeeze(1)
        on_x = x.index_select(0, on_index)
        on_out = self._run_gated_block(block, on_x, _rows(c, on_index))
        with torch.no_grad():
            off_x = x.detach().index_select(0, off_index)
            off_delta = self._run_block(block, off_x, _rows(_detached(c), off_index)).sub_(off_x)
            delta = torch.empty_like(x, memory_format=torch.contiguous_format)
            delta.index_copy_(0, off_index, off_delta.to(delta.dtype))
            delta.index_copy_(0, on_index, (on_out.detach() - on_x.detach()).to(delta.dtype))
        return x.index_copy(0, on_index, on_out.to(x.dtype)), delta

    def _run_block(self, block, x, c):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

    def _run_gated_block(self, block, x, c):
        """A block's autograd pass in the gated forward: with `gate_recompute_elementwise`, it keeps
        only the matmul and attention outputs for backward and recomputes the elementwise ops
        (same values and gradients, about half the activation memory)."""
        if self.gate_recompute_elementwise and not self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False, context_fn=_selective_recompute_context)
        return self._run_block(block, x, c)

    def compile_gated_blocks(self, backend="inductor", options=None):
        """torch.compile every block, for the gated forward (`prune_by_learning.py --compile`).

        The blocks, not the whole model: the sparse forward chooses sub-batches and paths from the
        drawn masks' values, which a whole-model graph would have to re-trace on every new draw.
        A block's batch dimension turns dynamic at its first change of size (torch's automatic
        dynamic shapes; marking every dimension dynamic up front made guards re-evaluate for
        seconds per step), so every later sub-batch size shares that graph. What remains are a
        few variants, each compiled once, on first sight: autograd on or off,
        an input that requires grad or not (the first block's, when the embedders are frozen),
        a batch of one sample (torch specialises size 1) and, without autograd, LoRA's folded
        weight or not. The recompile limit is raised above their count (8 would be hit), so no
        variant falls back to eager and no step compiles once all have been seen. The
        selective recomputation is off: the compiler's own partitioner already recomputes
        elementwise ops in backward."""
        import torch._dynamo  # only a compiled run pays for importing the compiler

        self.gate_recompute_elementwise = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_BLOCK_VARIANTS)
        for block in self.gated_blocks():  # options: inductor's (tinyfusion.sampling.cpu_compile.compile_options)
            block.compile(backend=backend, **({"options": options} if options else {}))


    def block_masks(self, batch_size, gate_onehots, device):
        """(B, depth) 0/1 block masks of a forward, or None for an ungated model: the given draw,
        else a fresh one in training mode, else (eval mode) the decided blocks for every sample."""
        if self.groups is None:
            return None
        if gate_onehots is None and self.training:
            gate_onehots = self.sample_gate_onehots(batch_size)
        if gate_onehots is not None:
            return self.block_masks_from_onehots(gate_onehots)
        kept = set(self.kept_indices())
        masks = torch.tensor([[float(j in kept) for j in range(self.depth)]], device=device)
        return masks.expand(batch_size, -1)

    def run_blocks(self, blocks, x, c, masks, first_index, hiddens, wanted):
        """x through `blocks` (global indices first_index, ...), each gated by its column of `masks`
        (None: ungated); the outputs of the blocks in `wanted` land in hiddens[index]."""
        for offset, block in enumerate(blocks):
            index = first_index + offset
            if masks is None:
                x = self._run_block(block, x, c)
            else:
                x = self._gated_block(block, x, c, masks[:, index])
            if index in wanted:
                hiddens[index] = x
        return x


def _rows(c, index):
    """The condition rows of a sub-batch (None: blocks without a condition)."""
    return None if c is None else c.index_select(0, index)


def _detached(c):
    return None if c is None else c.detach()


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiT(DepthGates, nn.Module):
    """Diffusion model with a Transformer backbone, optionally gated for learnable pruning.

    `groups=None` is the plain DiT. With groups, `tau` and `scaling` are the Gumbel temperature
    and logit scale (the pruning script anneals them), and `gate_forward` chooses how training
    runs the gated blocks: "sparse" (default) runs the backward pass of a block only for the
    samples that keep it, "dense" is the literal m*block(x) + (1-m)*x (reference and benchmark).
    """

    model_family = "DiT"  # checkpoint metadata: which generative process the weights belong to
    BLOCK_LISTS = ("blocks",)  # the state-dict prefixes of the prunable block lists, in index order

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, groups=None):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # fixed sin-cos table; a Parameter (not a buffer) because the official files store it under this name
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

        self.setup_gates(groups)
        self.initialize_weights()

    @property
    def depth(self):
        return len(self.blocks)

    def gated_blocks(self):
        return list(self.blocks)

    @staticmethod
    def depths_of_kept(kept_indices, config):
        """The depth settings of a model keeping `kept_indices` of the model of `config`."""
        return dict(depth=len(kept_indices))

    @staticmethod
    def saved_depths(metadata):
        """The depth settings of a pruned checkpoint, from its metadata."""
        return dict(depth=len(metadata["kept_indices"]))

    def prediction_signature(self):
        """What the output means (a KD teacher must share it with its student)."""
        return (self.in_channels, self.input_size, self.num_classes, self.learn_sigma)

    def block_widths(self):
        """Hidden size at each block's output, by global block index."""
        return [self.hidden_size] * self.depth

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        grid_size = int(self.x_embedder_num_patches() ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view([weight.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def x_embedder_num_patches(self):
        return (self.input_size // self.patch_size) ** 2

    def config(self):
        """Constructor arguments that rebuild this architecture (used in checkpoint metadata)."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, class_dropout_prob=self.class_dropout_prob,
                    num_classes=self.num_classes, learn_sigma=self.learn_sigma, groups=self.groups)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W) images."""
        channels, patch = self.out_channels, self.patch_size
        height = width = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], height, width, patch, patch, channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], channels, height * patch, width * patch)

    # --------------------------------------------------------------- forward
    def forward(self, x, t, y, force_drop_ids=None, hidden_indices=None, gate_onehots=None):
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels.

        force_drop_ids: (N,) 1 = use the null label (shared teacher/student drops in KD).
        hidden_indices: block indices whose output hidden states (N, T, D) to return as well,
            as `(output, [hidden, ...])` (distillation reads them; no hooks needed).
        gate_onehots: a draw from `sample_gate_onehots` to reuse; gated models in training mode
            draw their own otherwise, and in eval mode run the decided blocks only.
        """
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        masks = self.block_masks(x.shape[0], gate_onehots, x.device)
        hiddens = {}
        x = self.run_blocks(self.blocks, x, c, masks, 0, hiddens, set(hidden_indices or ()))
        x = self.unpatchify(self.final_layer(x, c))
        if hidden_indices is not None:
            return x, [hiddens[index] for index in hidden_indices]
        return x

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False):
        """Classifier-free guidance: the batch is [conditional; unconditional] halves. As in the
        released DiT, only the first 3 channels are guided by default (the others pass through);
        `guide_all_channels` guides every noise channel instead."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided = self.in_channels if guide_all_channels else 3
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


#################################################################################
#                                   Pruning                                     #
#################################################################################

def validate_kept_indices(kept_indices, depth):
    """ValueError (one line) unless `kept_indices` is a non-empty, sorted list of distinct block
    indices in 0..depth-1; returns it as a list of ints."""
    if not isinstance(kept_indices, (list, tuple)) or not all(isinstance(i, int) for i in kept_indices):
        raise ValueError(f"kept indices must be a list of integers such as [0, 2, 4], got {kept_indices!r}")
    if not kept_indices:
        raise ValueError("kept indices are empty; keep at least one block, e.g. \"[0, 2, 4]\"")
    outside = [i for i in kept_indices if not 0 <= i < depth]
    if outside:
        raise ValueError(f"kept indices {outside} are out of range for a model with {depth} blocks (valid: 0..{depth - 1})")
    duplicates = sorted({i for i in kept_indices if list(kept_indices).count(i) > 1})
    if duplicates:
        raise ValueError(f"kept indices repeat {duplicates}; list every kept block once")
    if list(kept_indices) != sorted(kept_indices):
        raise ValueError(f"kept indices {list(kept_indices)} are not sorted; write them in increasing order, "
                         f"e.g. {sorted(kept_indices)}")
    return [int(i) for i in kept_indices]


def prune_to_kept_blocks(model, kept_indices):
    """A plain (ungated) model of the same class holding only `kept_indices` of `model`'s blocks
    (global indices over its block lists), renumbered 0..K-1 within each list, with every other
    weight copied. Its state dict has no gate keys."""
    kept_indices = validate_kept_indices([int(i) for i in kept_indices], model.depth)
    config = model.config()
    config.update(type(model).depths_of_kept(kept_indices, config), groups=None)
    pruned = type(model)(**config).to(next(model.parameters()).device)  # a DiT stays a DiT, a MAR a MAR
    new_name, first = {}, 0  # "encoder_blocks.3" -> its pruned name, by global index
    for list_name, size in zip(model.BLOCK_LISTS, model.block_list_sizes()):
        kept_here = [index - first for index in kept_indices if first <= index < first + size]
        new_name.update({f"{list_name}.{local}": f"{list_name}.{position}" for position, local in enumerate(kept_here)})
        first += size
    target = {}
    for key, value in model.state_dict().items():
        if key.startswith("gate_logits"):
            continue
        list_name, _, rest = key.partition(".")
        if list_name in model.BLOCK_LISTS:
            index, _, rest = rest.partition(".")
            if f"{list_name}.{index}" not in new_name:
                continue
            key = f"{new_name[f'{list_name}.{index}']}.{rest}"
        target[key] = value
    pruned.load_state_dict(target, strict=True)
    return pruned


#################################################################################
#                                     SiT                                       #
#################################################################################

class SiT(DiT):
    """SiT (Ma et al. 2024): the same backbone and parameter names, trained and sampled with the
    flow-matching transport of transport/ instead of diffusion/. It is called with continuous
    time t in [0, 1] (not 0..999) and returns one prediction (velocity by default) with the input's
    C channels. As in SiT's code, learn_sigma=True (SiT's default, and the layout of the released
    SiT-XL-2-256x256.pt) keeps a final layer of p*p*2C outputs whose second half is dropped."""

    model_family = "SiT"

    def forward(self, x, t, y, **kwargs):
        out = super().forward(x, t, y, **kwargs)
        if not self.learn_sigma:
            return out
        if isinstance(out, tuple):  # (output, hidden states) with hidden_indices
            return out[0][:, :self.in_channels], out[1]
        return out[:, :self.in_channels]


#################################################################################
#                                     MAR                                       #
#################################################################################

class ViTBlock(nn.Module):
    """MAR's encoder / decoder block: a plain pre-norm ViT block (timm's Block: norm1, attn,
    norm2, mlp; LayerNorm eps 1e-6, exact GELU, dropout on the attention and after the
    projections). `c` is unused: the gated forward hands every block a condition."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, attn_dropout=0.1, proj_dropout=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dropout, proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none", dropout=proj_dropout)

    def forward(self, x, c=None):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def modulate_rows(x, shift, scale):
    """x * (1 + scale) + shift for (N, C) rows (the head's tokens, one condition each)."""
    return torch.addcmul(shift, x, 1 + scale)


class HeadResBlock(nn.Module):
    """A residual MLP block of MAR's diffusion head, modulated (shift, scale, gate) by t + z."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, condition):
        shift, scale, gate = self.adaLN_modulation(condition).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate_rows(self.in_ln(x), shift, scale))


class HeadFinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, condition):
        shift, scale = self.adaLN_modulation(condition).chunk(2, dim=-1)
        return self.linear(modulate_rows(self.norm_final(x), shift, scale))


class DiffusionHead(nn.Module):
    """MAR's per-token denoiser (its DiffLoss MLP): x_t (N, C) of one token each, the timestep
    t (N,) and the token's condition z (N, Z) -> (N, 2C): the noise and the variance interpolation
    of a learned-sigma Gaussian diffusion (the family holds the diffusion itself)."""

    def __init__(self, in_channels, width, z_channels, depth):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([HeadResBlock(width) for _ in range(depth)])
        self.final_layer = HeadFinalLayer(width, 2 * in_channels)

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zeroed = [block.adaLN_modulation[-1] for block in self.res_blocks]  # every block starts as the identity
        for layer in zeroed + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def forward(self, x, t, c):
        condition = self.time_embed(t) + self.cond_embed(c)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, condition)
        return self.final_layer(x, condition)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Guidance over [conditional; unconditional] rows: both halves denoise the first half's
        x_t, and the guided noise (every channel) replaces both halves' noise."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        conditional, unconditional = eps.chunk(2)
        guided = unconditional + cfg_scale * (conditional - unconditional)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


class MARHeadHolder(nn.Module):
    """Holds the head as `diffloss.net`, the released checkpoints' name (MAR's DiffLoss module)."""

    def __init__(self, net):
        super().__init__()
        self.net = net


class MAR(DepthGates, nn.Module):
    """MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization"): an
    MAE-style encoder over the visible tokens plus `buffer_size` class tokens, a decoder over all
    positions (mask tokens where hidden), and a small diffusion head that models each token given
    the decoder's output z. Parameter names match the released checkpoints (strict load).

    Tokens are the latents (N, C, H, W) cut into patch_size x patch_size patches, channel-major
    (MAR's patchify). `mask` (N, L) marks the hidden tokens (1); every sample hides the same
    number. Labels index `class_emb`; label num_classes (the null class, as DiT's) means MAR's
    `fake_latent`, which is also what a label drop gives. Learnable depth pruning gates the
    encoder blocks (global indices 0..E-1) and the decoder blocks (E..E+D-1) in one frame; a
    group may not span the two lists.
    """

    model_family = "MAR"
    BLOCK_LISTS = ("encoder_blocks", "decoder_blocks")

    def __init__(self, input_size=16, patch_size=1, in_channels=16, encoder_hidden_size=768, encoder_depth=12,
                 encoder_num_heads=12, decoder_hidden_size=768, decoder_depth=12, decoder_num_heads=12,
                 mlp_ratio=4.0, num_classes=1000, buffer_size=64, head_depth=6, head_width=1024,
                 label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1, groups=None):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.encoder_hidden_size, self.encoder_num_heads = encoder_hidden_size, encoder_num_heads
        self.decoder_hidden_size, self.decoder_num_heads = decoder_hidden_size, decoder_num_heads
        self.mlp_ratio, self.num_classes, self.buffer_size = mlp_ratio, num_classes, buffer_size
        self.head_depth, self.head_width, self.label_drop_prob = head_depth, head_width, label_drop_prob
        self.attn_dropout, self.proj_dropout = attn_dropout, proj_dropout
        self.grad_checkpointing = False
        self.seq_len = (input_size // patch_size) ** 2
        self.token_channels = in_channels * patch_size ** 2
        positions = self.seq_len + buffer_size

        self.class_emb = nn.Embedding(num_classes, encoder_hidden_size)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_hidden_size))
        self.z_proj = nn.Linear(self.token_channels, encoder_hidden_size)
        self.z_proj_ln = nn.LayerNorm(encoder_hidden_size, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, encoder_hidden_size))
        self.encoder_blocks = nn.ModuleList([
            ViTBlock(encoder_hidden_size, encoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
            for _ in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(encoder_hidden_size, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_hidden_size, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, decoder_hidden_size))
        self.decoder_blocks = nn.ModuleList([
            ViTBlock(decoder_hidden_size, decoder_num_heads, mlp_ratio, attn_dropout, proj_dropout)
            for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_hidden_size))
        self.diffloss = MARHeadHolder(DiffusionHead(self.token_channels, head_width, decoder_hidden_size, head_depth))
        self.setup_gates(groups)
        self.initialize_weights()

    # ------------------------------------------------------------------ structure
    @property
    def encoder_depth(self):
        return len(self.encoder_blocks)

    @property
    def decoder_depth(self):
        return len(self.decoder_blocks)

    @property
    def depth(self):
        return self.encoder_depth + self.decoder_depth

    def gated_blocks(self):
        return list(self.encoder_blocks) + list(self.decoder_blocks)

    def block_list_sizes(self):
        return [self.encoder_depth, self.decoder_depth]

    @property
    def head(self):
        return self.diffloss.net

    def prediction_signature(self):
        return (self.in_channels, self.input_size, self.patch_size, self.num_classes)

    def block_widths(self):
        return [self.encoder_hidden_size] * self.encoder_depth + [self.decoder_hidden_size] * self.decoder_depth

    def initialize_weights(self):
        """MAR's: N(0, 0.02) embeddings and tokens, Xavier-uniform linears, unit LayerNorms; the
        head's own (zeroed modulation and output)."""
        for table in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(table, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0)
        self.head.initialize_weights()

    def config(self):
        """Constructor arguments that rebuild this architecture (used in checkpoint metadata)."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    encoder_hidden_size=self.encoder_hidden_size, encoder_depth=self.encoder_depth,
                    encoder_num_heads=self.encoder_num_heads, decoder_hidden_size=self.decoder_hidden_size,
                    decoder_depth=self.decoder_depth, decoder_num_heads=self.decoder_num_heads,
                    mlp_ratio=self.mlp_ratio, num_classes=self.num_classes, buffer_size=self.buffer_size,
                    head_depth=self.head_depth, head_width=self.head_width, label_drop_prob=self.label_drop_prob,
                    attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout, groups=self.groups)

    @staticmethod
    def depths_of_kept(kept_indices, config):
        """Encoder and decoder depths of a model keeping `kept_indices` of the model of `config`."""
        encoder = sum(1 for index in kept_indices if index < config["encoder_depth"])
        return dict(encoder_depth=encoder, decoder_depth=len(kept_indices) - encoder)

    @staticmethod
    def saved_depths(metadata):
        """Encoder and decoder depths of a pruned checkpoint (its saved config says them)."""
        config = metadata.get("config") or {}
        if "encoder_depth" not in config:
            raise ValueError("a pruned MAR checkpoint must record its config (encoder_depth, decoder_depth)")
        return dict(encoder_depth=config["encoder_depth"], decoder_depth=config["decoder_depth"])

    # ------------------------------------------------------------------ tokens
    def patchify(self, x):
        """(N, C, H, W) -> (N, L, C*p*p), channel-major within a token (MAR's order)."""
        batch, channels, height, width = x.shape
        p = self.patch_size
        x = x.reshape(batch, channels, height // p, p, width // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(batch, (height // p) * (width // p), channels * p * p)

    def unpatchify(self, tokens):
        batch, p, side = tokens.shape[0], self.patch_size, self.input_size // self.patch_size
        x = tokens.reshape(batch, side, side, self.in_channels, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(batch, self.in_channels, side * p, side * p)

    def class_embedding(self, labels, drop=None):
        """class_emb(labels), fake_latent where a label is the null class or `drop` (N,) is set."""
        null = labels >= self.num_classes
        if drop is not None:
            null = null | drop.bool()
        embedded = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where(null.unsqueeze(1), self.fake_latent.to(embedded.dtype), embedded)

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, tokens, mask, class_embedding, masks=None, hiddens=None, wanted=()):
        x = self.z_proj(tokens)
        batch, _, width = x.shape
        x = torch.cat([class_embedding.unsqueeze(1).expand(batch, self.buffer_size, width).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        visible = torch.cat([torch.zeros(batch, self.buffer_size, device=x.device), mask], dim=1) == 0
        x = x[visible].reshape(batch, -1, width)  # the buffer and the visible tokens, in position order
        x = self.run_blocks(self.encoder_blocks, x, None, masks, 0, {} if hiddens is None else hiddens, wanted)
        return self.encoder_norm(x), visible

    def forward_decoder(self, x, visible, masks=None, hiddens=None, wanted=()):
        x = self.decoder_embed(x)
        batch, positions = visible.shape
        padded = self.mask_token.to(x.dtype).expand(batch, positions, x.shape[-1]).clone()
        padded[visible] = x.reshape(-1, x.shape[-1])
        x = padded + self.decoder_pos_embed_learned
        x = self.run_blocks(self.decoder_blocks, x, None, masks, self.encoder_depth,
                            {} if hiddens is None else hiddens, wanted)
        return self.decoder_norm(x)[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def forward(self, tokens, labels, mask, drop=None, hidden_indices=None, gate_onehots=None, head_x=None,
                head_t=None):
        """z (N, L, decoder width): the head's condition for every token. tokens (N, L, C*p*p)
        (hidden tokens are never read), labels (N,), mask (N, L) with 1 = hidden, drop (N,) label
        drops (training).

        head_x, head_t: the head's noisy tokens (R, C*p*p) and timesteps (R,) of a training step,
        R a multiple of N*L (z is repeated to R rows, as MAR's diffusion_batch_mul): the head runs
        in the same call (one forward for DistributedDataParallel) and the result starts with its
        output, as (head output, z, ...). hidden_indices: global block indices whose outputs end
        the result, as (..., [hidden, ...])."""
        masks = self.block_masks(tokens.shape[0], gate_onehots, tokens.device)
        wanted, hiddens = set(hidden_indices or ()), {}
        x, visible = self.forward_encoder(tokens, mask, self.class_embedding(labels, drop), masks, hiddens, wanted)
        z = self.forward_decoder(x, visible, masks, hiddens, wanted)
        result = [z]
        if head_x is not None:
            rows = z.reshape(-1, z.shape[-1])
            result.insert(0, self.head(head_x, head_t, rows.repeat(len(head_x) // len(rows), 1)))
        if hidden_indices is not None:
            result.append([hiddens[index] for index in hidden_indices])
        return result[0] if len(result) == 1 else tuple(result)

    @property
    def class_dropout_prob(self):  # the name Masked KD and the loop read (DiT's)
        return self.label_drop_prob


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) table; the first half of the channels encodes the column,
    the second half the row (float64 like the released weights)."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")
    column_half = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))
    row_half = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))
    return np.concatenate([column_half, row_half], axis=1)


def get_1d_sincos_pos_embed(embed_dim, positions):
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(positions, omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


#################################################################################
#                                 DiT Configs                                   #
#################################################################################

# (depth, hidden size, heads) of each family; patch sizes 2/4/8 for the published ones
# XS is ours, not the paper's: a CPU-sized DiT for the digits quick start and tests.
FAMILIES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6),
            "D19": (19, 1152, 16), "D14": (14, 1152, 16), "D7": (7, 1152, 16), "XS": (12, 128, 4)}


def _config(family, patch_size, groups=None, model_class=DiT):
    depth, hidden_size, num_heads = FAMILIES[family]

    def build(**kwargs):
        settings = dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
        if groups is not None:
            settings["groups"] = groups
        settings.update(kwargs)  # e.g. depth= for a pruned student, groups= for a custom pattern
        return model_class(**settings)
    build.family, build.patch_size, build.default_groups = family, patch_size, groups
    build.model_family, build.model_class = model_class.model_family, model_class
    return build


DiT_models = {}
for _family in ("XL", "L", "B", "S"):
    for _patch in (2, 4, 8):
        DiT_models[f"DiT-{_family}/{_patch}"] = _config(_family, _patch)
for _family in ("D19", "D14", "D7"):
    DiT_models[f"DiT-{_family}/2"] = _config(_family, 2)
for _patch in (1, 2, 4):
    DiT_models[f"DiT-XS/{_patch}"] = _config("XS", _patch)
DiT_models.update({
    "DiT-XL-1-2": _config("XL", 2, [[1, 2]] * 14),
    "DiT-XL-2-4": _config("XL", 2, [[2, 4]] * 7),
    "DiT-XL-7-14": _config("XL", 2, [[7, 14]] * 2),
    "DiT-XL-1-4": _config("XL", 2, [[1, 4]] * 7),
    "DiT-D14-1-2": _config("D14", 2, [[1, 2]] * 7),
    # 7 x [2, 4] would cover 28 blocks, not 14: "2 of every 4" over 14 blocks
    # that ends at 7 is three [2, 4] groups and a last [1, 2]
    "DiT-D14-2-4": _config("D14", 2, [[2, 4]] * 3 + [[1, 2]]),
})


# SiT under the same names with the SiT- prefix (the 12 published configurations, our XS and
# the shallow / gated ones)
SiT_models = {name.replace("DiT-", "SiT-", 1): _config(build.family, build.patch_size, build.default_groups, SiT)
              for name, build in DiT_models.items()}

ALL_MODELS = {**DiT_models, **SiT_models}  # every --model name of every family


#################################################################################
#                                  MAR Configs                                  #
#################################################################################

# (encoder = decoder depth, width, heads; diffusion head depth, width; class-token buffer) of
# MAR's released models (their evaluation heads), and XS: ours, a CPU-sized MAR for tests and the
# digits quick start
MAR_FAMILIES = {"B": (12, 768, 12, 6, 1024, 64), "L": (16, 1024, 16, 8, 1280, 64),
                "H": (20, 1280, 16, 12, 1536, 64), "XS": (6, 128, 4, 3, 128, 4)}


def _mar_config(family, patch_size, groups=None):
    depth, width, heads, head_depth, head_width, buffer_size = MAR_FAMILIES[family]

    def build(**kwargs):
        settings = dict(patch_size=patch_size, encoder_hidden_size=width, encoder_depth=depth, encoder_num_heads=heads,
                        decoder_hidden_size=width, decoder_depth=depth, decoder_num_heads=heads,
                        head_depth=head_depth, head_width=head_width, buffer_size=buffer_size)
        if groups is not None:
            settings["groups"] = groups
        settings.update(kwargs)
        return MAR(**settings)
    build.family, build.patch_size, build.default_groups = family, patch_size, groups
    build.model_family, build.model_class = MAR.model_family, MAR
    return build


# MAR-B/L/H: the released layout (one 16-channel KL-16 token per patch, patch size 1); the
# -1-2 variants gate "keep 1 of every 2" blocks of the encoder and of the decoder
MAR_models = {f"MAR-{family}": _mar_config(family, 1) for family in ("B", "L", "H")}
MAR_models.update({f"MAR-{family}-1-2": _mar_config(family, 1, [[1, 2]] * MAR_FAMILIES[family][0])
                   for family in ("B", "L", "H")})
MAR_models.update({f"MAR-XS/{patch}": _mar_config("XS", patch) for patch in (1, 2, 4)})

ALL_MODELS.update(MAR_models)

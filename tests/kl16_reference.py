"""An independent reference of MAR's KL-16 tokenizer (LTH14/mar, models/vae.py), written from its
published structure, with its state-dict names, for testing tools/convert_mar_tokenizer.py.

The structure is the LDM KL autoencoder: a convolutional encoder of `len(ch_mult)` levels (each
`num_res_blocks` residual blocks, then a stride-2 convolution on all but the last level), a middle
of block / self-attention / block, GroupNorm(32) + swish + a 3x3 convolution to 2 x 16 channels
(mean and log-variance), a 1x1 `quant_conv`; the decoder mirrors it with `num_res_blocks + 1`
blocks per level, nearest-neighbour 2x upsampling followed by a 3x3 convolution, and a 1x1
`post_quant_conv` in front. Self-attention in the encoder's levels sits where the running
resolution (starting at `resolution`, halved per level) is in `attn_resolutions`: for MAR's
256 / (16,) that is the last of the five levels only; the decoder has none outside its middle.
MAR's KL-16 is `ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16`; tests shrink
`ch` (GroupNorm keeps its 32 groups, so `ch` stays a multiple of 32).
"""
import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
NORM_EPS = 1e-6


def group_norm(channels):
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, affine=True)


def swish(x):
    return x * torch.sigmoid(x)


def conv3x3(cin, cout, stride=1, padding=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


class ResidualBlock(nn.Module):
    """norm1 swish conv1 norm2 swish conv2, plus the input (through a 1x1 `nin_shortcut` when the
    width changes). No time embedding: the tokenizer has none."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), conv3x3(cin, cout)
        self.norm2, self.conv2 = group_norm(cout), conv3x3(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x):
        residual = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + residual


class SelfAttention(nn.Module):
    """Single-head attention over the H*W positions, projections as 1x1 convolutions q, k, v,
    proj_out, scores scaled by 1/sqrt(channels), residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        for name in ("q", "k", "v", "proj_out"):
            setattr(self, name, nn.Conv2d(channels, channels, kernel_size=1))

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        queries, keys, values = (proj(h).flatten(2) for proj in (self.q, self.k, self.v))  # (B, C, N)
        scores = torch.einsum("bci,bcj->bij", queries, keys) / channels ** 0.5
        mixed = torch.einsum("bij,bcj->bci", scores.softmax(dim=-1), values)
        return x + self.proj_out(mixed.reshape(batch, channels, height, width))


class HalveResolution(nn.Module):
    """Zero-pad one row at the bottom and one column at the right, then a 3x3 stride-2 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DoubleResolution(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResidualBlock(channels, channels), SelfAttention(channels), \
        ResidualBlock(channels, channels)
    return mid


def run_middle(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, resolution, attn_resolutions):
        super().__init__()
        self.conv_in = conv3x3(3, ch)
        self.down = nn.ModuleList()
        width, size = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResidualBlock(width, ch * mult))
                width = ch * mult
                if size in attn_resolutions:
                    stage.attn.append(SelfAttention(width))
            if level < len(ch_mult) - 1:
                stage.downsample = HalveResolution(width)
                size //= 2
            self.down.append(stage)
        self.mid = middle(width)
        self.norm_out, self.conv_out = group_norm(width), conv3x3(width, 2 * z_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[index](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(swish(self.norm_out(run_middle(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = conv3x3(z_channels, width)
        self.mid = middle(width)
        stages = []
        for level in reversed(range(len(ch_mult))):  # built deepest first, stored shallowest first
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResidualBlock(width, ch * ch_mult[level]))
                width = ch * ch_mult[level]
            if level > 0:
                stage.upsample = DoubleResolution(width)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out, self.conv_out = group_norm(width), conv3x3(width, 3)

    def forward(self, z):
        h = run_middle(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class KL16Reference(nn.Module):
    """encode(images) -> (mean, std) of the diagonal Gaussian posterior (log-variance clamped to
    [-30, 20]); decode(z) -> images. MAR's latents are posterior samples x 0.2325."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16, resolution=256,
                 attn_resolutions=(16,)):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, embed_dim, resolution, attn_resolutions)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    def encode(self, images):
        mean, log_variance = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def random_reference(ch=32, seed=0, **kwargs):
    """A KL16Reference in eval mode with random weights from `seed` (the global RNG is left
    untouched). Norm scales and all biases are drawn too (PyTorch initialises them to 1 and 0),
    so that a norm or bias landing in the wrong place changes the output."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = KL16Reference(ch=ch, **kwargs)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_(0.0, 0.1)
                elif parameter.dim() == 1:  # GroupNorm scales
                    parameter.normal_(1.0, 0.2)
    return model.eval().requires_grad_(False)

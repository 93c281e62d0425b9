"""An independent reference of MAR (Li et al. 2024, "Autoregressive Image Generation without Vector
Quantization") for the parity tests, written here from the published model's structure and formulas,
not from models.py. Module and parameter names are the released checkpoints' (MAR's `MAR` with timm
ViT blocks and its DiffLoss MLP held as `diffloss.net`), so `state_dict()` has their key names.

Evaluation mode only (no dropout, no label drops), on whatever device the inputs are on. The
constructor takes the original's own arguments (img_size / vae_stride / patch_size, embed dims,
class_num, diffloss_d / diffloss_w, ...). Everything is plain torch: attention is the explicit
softmax(q k^T / sqrt(d)) v, GELU the erf formula, so no kernel of models.py is shared.
"""
import math

import torch
import torch.nn as nn

LAYER_NORM_EPS = 1e-6  # every LayerNorm of MAR (its norm_layer and z_proj_ln) and of the DiffLoss MLP


def exact_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


# --------------------------------------------------------------------------- ViT block (timm's layout)
class ReferenceAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        # the fused projection's output is [q | k | v], each split into heads
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj(mixed)


class ReferenceMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(exact_gelu(self.fc1(x)))


class ReferenceViTBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = ReferenceAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ReferenceMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- DiffLoss MLP (SimpleMLPAdaLN)
def shift_and_scale(x, shift, scale):
    return x * (1 + scale) + shift


def sinusoidal_time_features(t, dim=256, max_period=10000):
    """[cos(t w_k), sin(t w_k)] with w_k = max_period^(-k / (dim/2)), k = 0..dim/2-1."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    angles = t.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ReferenceTimeEmbed(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(sinusoidal_time_features(t))


class ReferenceResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(shift_and_scale(self.in_ln(x), shift, scale))


class ReferenceHeadFinal(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(shift_and_scale(self.norm_final(x), shift, scale))


class ReferenceDiffLossNet(nn.Module):
    """(x_t (N, C), t (N,), c (N, Z)) -> (N, 2C): noise prediction, then the variance values."""

    def __init__(self, in_channels, width, z_channels, depth):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = ReferenceTimeEmbed(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ReferenceResBlock(width) for _ in range(depth))
        self.final_layer = ReferenceHeadFinal(width, 2 * in_channels)

    def forward(self, x, t, c):
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Rows are [conditional; unconditional]; both halves see the conditional half's x_t, the
        guided noise u + s (c - u) replaces the noise of both, the variance values stay per row."""
        rows = x.shape[0] // 2
        out = self.forward(torch.cat([x[:rows], x[:rows]]), t, c)
        noise, variance = out[:, :self.in_channels], out[:, self.in_channels:]
        guided = noise[rows:] + cfg_scale * (noise[:rows] - noise[rows:])
        return torch.cat([torch.cat([guided, guided]), variance], dim=1)


class ReferenceDiffLoss(nn.Module):
    def __init__(self, target_channels, z_channels, depth, width):
        super().__init__()
        self.net = ReferenceDiffLossNet(target_channels, width, z_channels, depth)


# --------------------------------------------------------------------------- MAR
class ReferenceMAR(nn.Module):
    def __init__(self, img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=1024, encoder_depth=16,
                 encoder_num_heads=16, decoder_embed_dim=1024, decoder_depth=16, decoder_num_heads=16,
                 mlp_ratio=4.0, vae_embed_dim=16, class_num=1000, buffer_size=64, diffloss_d=3, diffloss_w=1024):
        super().__init__()
        self.vae_embed_dim, self.patch_size, self.buffer_size = vae_embed_dim, patch_size, buffer_size
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.num_classes = class_num
        positions = self.seq_len + buffer_size
        # registration order as in the original (its state_dict lists the parameters first)
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(0.02 * torch.randn(1, encoder_embed_dim))
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=LAYER_NORM_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(0.02 * torch.randn(1, positions, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(ReferenceViTBlock(encoder_embed_dim, encoder_num_heads, mlp_ratio)
                                            for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_embed_dim, eps=LAYER_NORM_EPS)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(0.02 * torch.randn(1, positions, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(ReferenceViTBlock(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LAYER_NORM_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(0.02 * torch.randn(1, self.seq_len, decoder_embed_dim))
        self.diffloss = ReferenceDiffLoss(self.token_embed_dim, decoder_embed_dim, diffloss_d, diffloss_w)
        self.eval()

    # tokens: (N, C, h, w) latents -> (N, h/p * w/p, C p p): patches in row-major order, and
    # inside a patch the channel first, then the row and the column within the patch
    def patchify(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        patches = x.view(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(n, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens):
        n, p, c = tokens.shape[0], self.patch_size, self.vae_embed_dim
        grid = tokens.reshape(n, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return grid.reshape(n, c, self.seq_h * p, self.seq_w * p)

    def _with_buffer(self, mask):
        return torch.cat([torch.zeros(mask.shape[0], self.buffer_size, device=mask.device), mask.float()], dim=1)

    def forward_mae_encoder(self, tokens, mask, class_embedding):
        """tokens (N, L, C p p), mask (N, L) with 1 = hidden (every row hides as many), class_embedding
        (N, D) -> (N, buffer + visible, D): the class vector fills every buffer slot."""
        x = self.z_proj(tokens)
        n, _, dim = x.shape
        x = torch.cat([torch.zeros(n, self.buffer_size, dim, device=x.device, dtype=x.dtype), x], dim=1)
        x[:, :self.buffer_size] = class_embedding.unsqueeze(1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        kept = (self._with_buffer(mask) == 0).nonzero()[:, 1].view(n, -1)  # increasing positions per row
        x = torch.gather(x, 1, kept.unsqueeze(-1).expand(-1, -1, dim))
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x, mask):
        """Encoder output -> z (N, L, D_dec): the visible rows go back to their positions, mask_token
        elsewhere; the buffer is dropped after the decoder and the diffusion position added."""
        x = self.decoder_embed(x)
        n, dim = x.shape[0], x.shape[-1]
        with_buffer = self._with_buffer(mask)
        kept = (with_buffer == 0).nonzero()[:, 1].view(n, -1)
        padded = self.mask_token.to(x.dtype).repeat(n, with_buffer.shape[1], 1)
        padded = padded.scatter(1, kept.unsqueeze(-1).expand(-1, -1, dim), x)
        x = padded + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned


def mar_reference_for(config):
    """The reference of the architecture a models.MAR `config()` describes (latent size times a
    vae_stride of 16 as img_size)."""
    return ReferenceMAR(
        img_size=config["input_size"] * 16, vae_stride=16, patch_size=config["patch_size"],
        encoder_embed_dim=config["encoder_hidden_size"], encoder_depth=config["encoder_depth"],
        encoder_num_heads=config["encoder_num_heads"], decoder_embed_dim=config["decoder_hidden_size"],
        decoder_depth=config["decoder_depth"], decoder_num_heads=config["decoder_num_heads"],
        mlp_ratio=config["mlp_ratio"], vae_embed_dim=config["in_channels"], class_num=config["num_classes"],
        buffer_size=config["buffer_size"], diffloss_d=config["head_depth"], diffloss_w=config["head_width"])


# --------------------------------------------------------------------------- one step of sample_tokens
def next_mask_length(seq_len, hidden_now, step, num_iter):
    """Tokens still hidden after this step: floor(seq_len cos(pi/2 (step+1)/num_iter)), at least one
    fewer than now, and at least 1 (the last step then predicts everything that is left)."""
    ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
    return max(1, min(hidden_now - 1, math.floor(seq_len * ratio)))


def mask_by_order(mask_len, orders):
    """(N, L) bool: the first mask_len positions of each row's order are hidden."""
    hidden = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return hidden.scatter(1, orders[:, :mask_len], True)


def guidance_scale(cfg, cfg_schedule, seq_len, mask_len):
    if cfg_schedule == "linear":  # grows with the share of tokens known after this step (Muse)
        return 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
    if cfg_schedule == "constant":
        return cfg
    raise ValueError(f"unknown cfg schedule {cfg_schedule!r}")


@torch.no_grad()
def reference_generation_step(ref, tokens, mask, orders, step, num_iter, labels, cfg, cfg_schedule, temperature,
                              head_sample):
    """One iteration of MAR's sample_tokens loop. tokens (N, L, C p p), mask (N, L) with 1 = still
    hidden, orders (N, L) each row a permutation, labels (N,) or None (unconditional: fake_latent).

    Returns (z, cfg_iter, mask_next, mask_to_pred): z the decoder rows of the tokens predicted now
    (row-major over the batch; with cfg != 1 the conditional rows, then the same rows of the
    fake_latent half), cfg_iter the guidance of this step, mask_next (N, L) bool the mask after it,
    mask_to_pred (N, L) bool the positions predicted now. With head_sample (a callable
    (z, temperature, cfg_iter) -> one row per z row, both halves with cfg, as DiffLoss.sample),
    its conditional rows are written into `tokens` in place at mask_to_pred."""
    n = tokens.shape[0]
    mask = mask.float()
    if labels is not None:
        class_embedding = ref.class_emb(labels)
    else:
        class_embedding = ref.fake_latent.expand(n, -1)
    guided = cfg != 1.0
    run_tokens, run_mask = tokens, mask
    if guided:
        run_tokens, run_mask = torch.cat([tokens, tokens]), torch.cat([mask, mask])
        class_embedding = torch.cat([class_embedding, ref.fake_latent.expand(n, -1)])
    z = ref.forward_mae_decoder(ref.forward_mae_encoder(run_tokens, run_mask, class_embedding), run_mask)

    mask_len = next_mask_length(ref.seq_len, int(mask[0].sum()), step, num_iter)
    mask_next = mask_by_order(mask_len, orders)
    mask_to_pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next
    rows = torch.cat([mask_to_pred, mask_to_pred]) if guided else mask_to_pred
    z = z[rows]
    cfg_iter = guidance_scale(cfg, cfg_schedule, ref.seq_len, mask_len)
    if head_sample is not None:
        sampled = head_sample(z, temperature, cfg_iter)
        tokens[mask_to_pred] = sampled[: int(mask_to_pred.sum())].to(tokens.dtype)
    return z, cfg_iter, mask_next, mask_to_pred

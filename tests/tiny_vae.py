"""A tiny randomly initialised AutoencoderKL that stands in for the SD-VAE in tests.

It is the SD-VAE architecture (`stabilityai/sd-vae-ft-ema|mse`: four DownEncoderBlock2D
levels, so 8x downsampling, 4 latent channels, a mid block with attention) with narrower
blocks and one layer per block, so that encoding a 32x32 image takes milliseconds on a CPU.
"""
import os

import torch

# config.json of stabilityai/sd-vae-ft-ema (and -mse): what `--vae ema|mse` loads
SD_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
}

TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=[16, 16, 32, 32], layers_per_block=1,
                       norm_num_groups=8, sample_size=32)


def make_tiny_vae(folder, seed=0):
    """Write a diffusers AutoencoderKL folder (config.json + safetensors weights) with random
    weights drawn from `seed` (the global torch RNG is left untouched); returns `folder`."""
    from diffusers.models import AutoencoderKL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    os.makedirs(folder, exist_ok=True)
    vae.save_pretrained(folder)
    return str(folder)

"""The image <-> latent codec: the SD-VAE of the original (`--vae ema|mse`), any local
diffusers AutoencoderKL folder (`--vae-path DIR` or `--vae DIR`), or `--vae none` for pixel
space (small data on a CPU, where the DiT works on the images themselves)."""
import json
import os

import torch
from tinyfusion.errors import TinyFusionError
from tinyfusion.finite import check_finite_output

LATENT_SCALE = 0.18215  # SD-VAE latent scale factor used by DiT and TinyFusion
HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def is_pixel_space(vae_name):
    return str(vae_name).lower() == "none"


def vae_source(vae_name, vae_path=None):
    """Where the VAE comes from: a local folder wins over the hub id."""
    if vae_path:
        return vae_path
    if vae_name in HUB_IDS:
        return HUB_IDS[vae_name]
    return vae_name  # a path given directly as --vae


def load_vae(vae_name="ema", vae_path=None, device="cpu"):
    """Load the AutoencoderKL in eval mode, or None for pixel space. A VAE that cannot be
    loaded (offline, wrong folder) is one clear error saying what to download and where; an
    unreachable hub fails at once (the hub client would otherwise retry for about a minute)."""
    if is_pixel_space(vae_name) and not vae_path:
        return None
    source = vae_source(vae_name, vae_path)
    if source not in HUB_IDS.values() and not os.path.isdir(source):
        raise TinyFusionError(f"VAE folder {source} does not exist; pass --vae-path with a diffusers AutoencoderKL "
                              f"folder (config.json + weights), e.g. a local copy of {HUB_IDS['ema']}")
    from diffusers.models import AutoencoderKL
    try:
        if source in HUB_IDS.values():
            vae = load_from_hub(AutoencoderKL, source)
        else:
            vae = AutoencoderKL.from_pretrained(source)
    except Exception as error:  # offline hub, missing files, wrong format: all the same fix
        hub_id = HUB_IDS.get(vae_name, HUB_IDS["ema"])
        raise TinyFusionError(f"could not load the VAE from {source} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:120] if str(error) else ''}); on a machine with internet "
                              f"run `{download_command(hub_id)}` and pass --vae-path {local_folder(hub_id)}") from None
    return vae.to(device).eval().requires_grad_(False)


def local_folder(hub_id):
    return f"pretrained/{hub_id.split('/')[1]}"


def download_command(hub_id):
    """The download recipe of the hub client's command line (`hf`, shipped with huggingface_hub)."""
    return f"hf download {hub_id} --local-dir {local_folder(hub_id)}"


def load_from_hub(model_class, hub_id):
    """The hub cache first (no network); the hub only if it is reachable within a few seconds."""
    import huggingface_hub.constants
    try:
        return model_class.from_pretrained(hub_id, local_files_only=True)
    except Exception:
        if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true"):
            raise OSError(f"{hub_id} is not in the hub cache and HF_HUB_OFFLINE is set") from None
    endpoint = os.environ.get("HF_ENDPOINT") or huggingface_hub.constants.ENDPOINT
    if not hub_reachable(endpoint):
        raise OSError(f"{hub_id} is not in the hub cache and {endpoint} cannot be reached")
    return model_class.from_pretrained(hub_id)


def hub_reachable(endpoint, timeout=5.0):
    """Whether a TCP connection to the hub's host opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def latent_geometry(vae, image_size):
    """(channels, spatial size) of what the DiT sees for images of `image_size`."""
    if vae is None:
        return 3, image_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor != 0:
        raise TinyFusionError(f"--image-size {image_size} is not divisible by the VAE downsampling factor {factor}")
    return vae.config.latent_channels, image_size // factor


def latent_geometry_from_flags(vae_name, image_size, vae_path=None):
    """Geometry without loading any weights: pixel space for `none`, the config.json of a
    local AutoencoderKL folder when one is given, else the SD-VAE (4 channels, 8x down)."""
    if is_pixel_space(vae_name) and not vae_path:
        return 3, image_size
    source = vae_source(vae_name, vae_path)
    channels, factor = 4, 8
    config_file = os.path.join(source, "config.json")
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
        channels = config.get("latent_channels", 4)
        factor = 2 ** (len(config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if image_size % factor != 0:
        raise TinyFusionError(f"--image-size {image_size} is not divisible by the VAE downsampling factor {factor}; "
                              f"use a multiple of {factor} (or --vae none for pixel space)")
    return channels, image_size // factor


@torch.no_grad()
def encode(vae, images):
    """Images in [-1, 1] -> latents (a sample of the posterior, scaled by 0.18215)."""
    if vae is None:
        return images
    return vae.encode(images).latent_dist.sample() * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents):
    """Latents -> images in roughly [-1, 1] (callers clamp when converting to uint8)."""
    if vae is None:
        return latents
    return vae.decode(latents / LATENT_SCALE).sample


def to_uint8_nhwc(images, what="the samples"):
    """[-1, 1] float NCHW -> uint8 NHWC exactly as the original sample_ddp.py
    (clamp(127.5 * x + 128, 0, 255)); a single channel is repeated to RGB. NaN / inf is refused
    (a TinyFusionError naming `what`): it would become pixel 0."""
    check_finite_output(images, what)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)

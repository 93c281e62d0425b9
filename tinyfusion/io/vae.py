"""The image <-> latent codec: the SD-VAE of the original (`--vae ema|mse`), any local
diffusers AutoencoderKL folder (`--vae-path DIR` or `--vae DIR`), or `--vae none` for pixel
space (small data on a CPU, where the DiT works on the images themselves).

Latents are posterior samples times the VAE's own `scaling_factor` (its config.json): 0.18215 for
the SD-VAE, as in DiT; 0.2325 for MAR's KL-16 tokenizer converted by
tools/convert_mar_tokenizer.py. A VAE whose config names no factor uses 0.18215."""
import json
import os

import torch
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.finite import check_finite_output

LATENT_SCALE = 0.18215  # the SD-VAE's latent scale (DiT's), and the default of a VAE that names none
HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# The SD-VAE weights as published: the sha256 the hub states for each repository's
# diffusion_pytorch_model.safetensors (its Git LFS pointer), and the size where one is stated.
SD_VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SD_VAE_SHA256 = {"stabilityai/sd-vae-ft-ema": "32db726da04f06c1b6b14c0043ce115cc87a501482945c5add89a40d838fcb46",
                 "stabilityai/sd-vae-ft-mse": "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815"}
SD_VAE_BYTES = {"stabilityai/sd-vae-ft-mse": 334643276}


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
    check_sd_vae_weights(source)  # a local copy of the SD-VAE: before loading it
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
    if source in HUB_IDS.values():
        check_sd_vae_weights(source)  # the hub cache's copy, now that it is there
    return vae.to(device).eval().requires_grad_(False)


def check_sd_vae_weights(source):
    """Refuse SD-VAE weights other than the published ones: the hub cache's file of a hub id, or
    the file of a local folder named after the hub repository (pretrained/sd-vae-ft-ema, as
    `hf download` makes it). Other folders are the user's own VAEs and are not checked."""
    from tinyfusion.io.downloads import file_sha256
    names = {hub_id.split("/")[1]: hub_id for hub_id in HUB_IDS.values()}
    hub_id = source if source in SD_VAE_SHA256 else names.get(os.path.basename(os.path.normpath(str(source))))
    if hub_id is None:
        return
    path = os.path.join(source, SD_VAE_WEIGHTS) if os.path.isdir(source) else _hub_cache_file(hub_id)
    if not path or not os.path.isfile(path):
        return  # weights in another format (.bin): no published hash to check against
    size = os.path.getsize(path)
    if SD_VAE_BYTES.get(hub_id, size) != size or file_sha256(path) != SD_VAE_SHA256[hub_id]:
        raise TinyFusionError(f"{path} is not {hub_id}'s published {SD_VAE_WEIGHTS} (sha256 "
                              f"{SD_VAE_SHA256[hub_id]}); download it again: {download_command(hub_id)}")


def _hub_cache_file(hub_id):
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(hub_id, SD_VAE_WEIGHTS)
    return path if isinstance(path, str) else None


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


def latent_scale(vae):
    """The factor between the VAE's posterior and our latents: its config's scaling_factor
    (0.18215 for the SD-VAE, 0.2325 for MAR's KL-16), LATENT_SCALE when it names none."""
    factor = getattr(getattr(vae, "config", None), "scaling_factor", None)
    return LATENT_SCALE if factor is None else float(factor)


@torch.no_grad()
def encode(vae, images):
    """Images in [-1, 1] -> latents (a sample of the posterior, scaled by latent_scale(vae))."""
    if vae is None:
        return images
    return vae.encode(images).latent_dist.sample() * latent_scale(vae)


@torch.no_grad()
def decode(vae, latents):
    """Latents (scaled by latent_scale(vae)) -> images in roughly [-1, 1] (callers clamp when
    converting to uint8)."""
    if vae is None:
        return latents
    return vae.decode(latents / latent_scale(vae)).sample


def to_uint8_nhwc(images, what="the samples"):
    """[-1, 1] float NCHW -> uint8 NHWC exactly as the original sample_ddp.py
    (clamp(127.5 * x + 128, 0, 255)); a single channel is repeated to RGB. NaN / inf is refused
    (a TinyFusionError naming `what`): it would become pixel 0."""
    check_finite_output(images, what)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)

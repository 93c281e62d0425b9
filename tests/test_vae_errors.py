"""A missing SD-VAE is one clear error at once: the hub cache is tried without network, an
unreachable hub is detected by one short connection attempt instead of the hub client's minute of
retries, and the error gives the download command of the installed hub client (`hf download`)."""
import os
import shutil
import socket
import sys

import pytest

from tinyfusion.errors import TinyFusionError
from diffusers.models import AutoencoderKL

from tinyfusion.io import vae as vae_io


@pytest.fixture
def recorded_loads(monkeypatch, tmp_path):
    """Every from_pretrained call (its keyword arguments), each failing like an empty cache would."""
    calls = []

    def fake_from_pretrained(source, **kwargs):
        calls.append((source, kwargs))
        raise OSError(f"{source} not found")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", fake_from_pretrained)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_hub_fails_without_a_network_download(recorded_loads, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TinyFusionError) as error:
        vae_io.load_vae("ema")
    message = str(error.value)
    # only the cache lookup ran: no online from_pretrained call (the one that retries)
    assert recorded_loads == [("stabilityai/sd-vae-ft-ema", {"local_files_only": True})]
    assert "\n" not in message and "cannot be reached" in message
    assert "`hf download stabilityai/sd-vae-ft-ema --local-dir pretrained/sd-vae-ft-ema`" in message
    assert "--vae-path pretrained/sd-vae-ft-ema" in message and "huggingface-cli" not in message


def test_offline_flag_skips_the_network_and_a_reachable_hub_is_used(recorded_loads, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TinyFusionError, match="HF_HUB_OFFLINE"):
        vae_io.load_vae("mse")
    assert recorded_loads == [("stabilityai/sd-vae-ft-mse", {"local_files_only": True})]

    recorded_loads.clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:  # a listening local "hub": the online load is attempted
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        with pytest.raises(TinyFusionError):
            vae_io.load_vae("ema")
    assert recorded_loads == [("stabilityai/sd-vae-ft-ema", {"local_files_only": True}),
                              ("stabilityai/sd-vae-ft-ema", {})]


def test_the_download_command_is_the_installed_clients():
    # the command named in the error ships with the installed huggingface_hub (next to this python)
    assert shutil.which("hf", path=os.path.dirname(sys.executable)) or shutil.which("hf")
    assert vae_io.download_command("stabilityai/sd-vae-ft-ema") == \
        "hf download stabilityai/sd-vae-ft-ema --local-dir pretrained/sd-vae-ft-ema"


def test_a_local_sd_vae_copy_must_be_the_published_weights(tmp_path, monkeypatch):
    """pretrained/sd-vae-ft-ema (where `hf download` puts it) is checked against the sha256 the hub
    publishes for diffusion_pytorch_model.safetensors; a folder of another name is the user's VAE."""
    from tiny_vae import make_tiny_vae
    from tinyfusion.io.downloads import file_sha256
    copy = make_tiny_vae(tmp_path / "pretrained" / "sd-vae-ft-ema")
    with pytest.raises(TinyFusionError) as error:
        vae_io.load_vae("ema", vae_path=str(copy))
    message = str(error.value)
    assert "\n" not in message and f"{copy}/diffusion_pytorch_model.safetensors is not stabilityai/sd-vae-ft-ema" in message
    assert vae_io.SD_VAE_SHA256["stabilityai/sd-vae-ft-ema"] in message and "hf download" in message
    own = shutil.copytree(copy, tmp_path / "my-vae")
    assert vae_io.load_vae("ema", vae_path=str(own)) is not None  # not named after the hub: the user's own VAE
    published = file_sha256(os.path.join(copy, "diffusion_pytorch_model.safetensors"))
    monkeypatch.setitem(vae_io.SD_VAE_SHA256, "stabilityai/sd-vae-ft-ema", published)  # as if it were the release
    assert vae_io.load_vae("ema", vae_path=str(copy)) is not None

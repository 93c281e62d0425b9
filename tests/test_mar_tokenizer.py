"""MAR's KL-16 tokenizer as a diffusers AutoencoderKL (tools/convert_mar_tokenizer.py), and the
VAE's own latent scale in tinyfusion/io/vae.py, against an independent reference of the tokenizer
(tests/kl16_reference.py) holding random weights, saved the way MAR's loader reads it
({"model": state_dict}).

The tokenizer is KL-16's structure (five levels, stride 16, two blocks per level, attention in the
encoder's last level and in both middles, 16 latent channels) at a quarter of its width (ch 32:
widths 32 32 64 64 128); the full width is checked on the meta device (names and shapes only).
Outputs are compared in float32 with atol 1e-4 (measured: posterior mean/std within 2e-6 of
values up to 1.3, decoded images within 2e-5 of values up to 3.9; diffusers' attention kernel and
convolution order round differently from the reference's einsum).
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools"), str(REPO / "tests")]

import convert_mar_tokenizer as converter  # noqa: E402
import extract_features  # noqa: E402
from kl16_reference import KL16Reference, random_reference  # noqa: E402
from tiny_vae import make_tiny_vae  # noqa: E402
from tinyfusion.errors import TinyFusionError  # noqa: E402
from tinyfusion.io import feature_store  # noqa: E402
from tinyfusion.io import vae as vae_io  # noqa: E402
from tinyfusion.io.image_folder import image_folder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-4
MAR_SCALE = 0.2325
SD_SCALE = 0.18215
MAR_TENSOR_COUNT = 312  # tensors of MAR's models/vae.py AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))


def convert(ckpt, out, *extra):
    converter.main(converter.parse_args(["--ckpt", str(ckpt), "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def reference():
    return random_reference(ch=32, seed=0)


@pytest.fixture(scope="module")
def mar_ckpt(tmp_path_factory, reference):
    path = tmp_path_factory.mktemp("mar") / "kl16.ckpt"
    torch.save({"model": reference.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, mar_ckpt):
    out = tmp_path_factory.mktemp("converted") / "kl16"
    convert(mar_ckpt, out)
    return out


@pytest.fixture(scope="module")
def converted_vae(converted):
    return vae_io.load_vae("ema", vae_path=str(converted))


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


# ---------------------------------------------------------------- the layout

def test_full_width_kl16_maps_strictly_onto_its_diffusers_config():
    """Full KL-16 (meta tensors): the architecture read from the shapes is KL-16's, the config puts
    AttnDownEncoderBlock2D at the last level only, and all 312 tensors map strictly."""
    with torch.device("meta"):
        state_dict = KL16Reference().state_dict()
    assert len(state_dict) == MAR_TENSOR_COUNT
    architecture = converter.infer_architecture(state_dict)
    assert architecture == converter.KL16_ARCHITECTURE
    config = converter.diffusers_config(architecture)
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["UpDecoderBlock2D"] * 5
    assert (config["block_out_channels"], config["layers_per_block"]) == ([128, 128, 256, 256, 512], 2)
    assert (config["latent_channels"], config["scaling_factor"]) == (16, MAR_SCALE)
    vae = converter.build_diffusers_vae(state_dict, config)
    assert len(vae.state_dict()) == MAR_TENSOR_COUNT
    assert vae.encoder.down_blocks[4].attentions[1].to_q.weight.shape == (512, 512)


def test_converted_folder_is_the_reduced_architecture(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["block_out_channels"] == [32, 32, 64, 64, 128] and config["latent_channels"] == 16
    assert config["down_block_types"][-1] == "AttnDownEncoderBlock2D" and config["scaling_factor"] == MAR_SCALE


def break_ckpt(state_dict, how):
    """A MAR-style checkpoint object with one defect, and a phrase its error line must hold."""
    state_dict = dict(state_dict)
    if how == "missing":
        del state_dict["encoder.down.4.attn.1.k.weight"]
        return {"model": state_dict}, "encoder.down_blocks.4.attentions.1.to_k.weight is filled by no tensor"
    if how == "extra":  # attention in a decoder level, which KL-16 does not have
        state_dict["decoder.up.4.attn.0.q.weight"] = torch.zeros(128, 128, 1, 1)
        return {"model": state_dict}, "decoder.up.4.attn.0.q.weight has no place"
    if how == "shape":
        state_dict["quant_conv.weight"] = torch.zeros(32, 32, 3, 3)
        return {"model": state_dict}, "quant_conv.weight has shape (32, 32, 3, 3)"
    if how == "prefixed":
        return {"model": {f"first_stage_model.{k}": v for k, v in state_dict.items()}}, "encoder levels are []"
    assert how == "no model entry"
    return state_dict, 'no state dict under "model"'


@pytest.mark.parametrize("how", ["missing", "extra", "shape", "prefixed", "no model entry"])
def test_a_checkpoint_that_does_not_map_strictly_is_refused_in_one_line(tmp_path, reference, how):
    checkpoint, phrase = break_ckpt(reference.state_dict(), how)
    torch.save(checkpoint, tmp_path / "kl16.ckpt")
    with pytest.raises(TinyFusionError) as error:
        convert(tmp_path / "kl16.ckpt", tmp_path / "out")
    assert phrase in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


class NotATensor:
    pass


@pytest.mark.parametrize("content, phrase", [(None, "does not exist"), (b"not a checkpoint", "could not read"),
                                             ("pickle", "Python object (test_mar_tokenizer.NotATensor)")])
def test_a_missing_unreadable_or_unsafe_file_is_refused_in_one_line(tmp_path, content, phrase):
    ckpt = tmp_path / "kl16.ckpt"
    if content == "pickle":  # a Python object weights_only=True must not unpickle
        torch.save({"model": {}, "args": NotATensor()}, ckpt)
    elif content is not None:
        ckpt.write_bytes(content)
    with pytest.raises(TinyFusionError) as error:
        convert(ckpt, tmp_path / "out")
    assert phrase in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_existing_out_is_kept_unless_overwrite(tmp_path, mar_ckpt):
    out = tmp_path / "kl16"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(TinyFusionError, match="already exists"):
        convert(mar_ckpt, out)
    assert sorted(os.listdir(out)) == ["mine.txt"]
    convert(mar_ckpt, out, "--overwrite")
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_the_script_exits_2_with_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_mar_tokenizer.py"), "--ckpt",
                           str(tmp_path / "absent.ckpt"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: checkpoint")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the numbers

def test_posterior_mean_and_std_equal_the_reference(converted_vae, reference, images):
    expected_mean, expected_std = reference.encode(images)
    with torch.no_grad():
        posterior = converted_vae.encode(images).latent_dist
    assert posterior.mean.shape == (2, 16, 4, 4)
    torch.testing.assert_close(posterior.mean, expected_mean, rtol=0, atol=ATOL)
    torch.testing.assert_close(posterior.std, expected_std, rtol=0, atol=ATOL)
    assert expected_std.std() > 0.05  # the std really varies: a wrong log-variance half would show


def test_decode_equals_the_reference(converted_vae, reference):
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        decoded = converted_vae.decode(z).sample
    assert decoded.shape == (2, 3, 64, 64)
    torch.testing.assert_close(decoded, reference.decode(z), rtol=0, atol=ATOL)


def test_io_vae_scales_kl16_latents_by_0_2325(converted_vae, reference, images):
    """encode = (posterior mean + std * the global RNG's noise) x 0.2325; decode divides by it."""
    assert vae_io.latent_scale(converted_vae) == MAR_SCALE
    torch.manual_seed(3)
    latents = vae_io.encode(converted_vae, images)
    torch.manual_seed(3)
    noise = torch.randn(2, 16, 4, 4)
    mean, std = reference.encode(images)
    torch.testing.assert_close(latents, (mean + std * noise) * MAR_SCALE, rtol=0, atol=ATOL)
    torch.testing.assert_close(vae_io.decode(converted_vae, latents), reference.decode(latents / MAR_SCALE),
                               rtol=0, atol=ATOL)


@pytest.mark.parametrize("config_names_a_scale", [True, False])
def test_io_vae_keeps_0_18215_for_an_sd_vae_folder(tmp_path, config_names_a_scale):
    """The SD-VAE-like tiny folder (its config says 0.18215), and one whose config.json names no
    scaling_factor: 0.18215 both."""
    folder = make_tiny_vae(tmp_path / "tiny-vae")
    if not config_names_a_scale:
        config = json.loads((tmp_path / "tiny-vae" / "config.json").read_text())
        del config["scaling_factor"]
        (tmp_path / "tiny-vae" / "config.json").write_text(json.dumps(config))
    vae = vae_io.load_vae("ema", vae_path=folder)
    assert vae_io.latent_scale(vae) == SD_SCALE
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        torch.manual_seed(4)
        latents = vae_io.encode(vae, images)
        torch.manual_seed(4)
        expected = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape)) * SD_SCALE
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(vae_io.decode(vae, latents), vae.decode(latents / SD_SCALE).sample,
                                   rtol=0, atol=1e-6)


def test_a_vae_whose_config_names_no_scale_uses_0_18215():
    assert vae_io.latent_scale(SimpleNamespace(config=SimpleNamespace())) == SD_SCALE
    assert vae_io.latent_scale(SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5))) == 0.5


# ---------------------------------------------------------------- the scripts

def test_full_kl16_config_gives_16_by_16_latents_at_256(tmp_path):
    folder = tmp_path / "kl16"
    folder.mkdir()
    config = converter.diffusers_config(converter.KL16_ARCHITECTURE)
    (folder / "config.json").write_text(json.dumps(config))
    assert vae_io.latent_geometry_from_flags(str(folder), 256) == (16, 16)
    assert vae_io.latent_geometry_from_flags("ema", 512, vae_path=str(folder)) == (16, 32)
    with pytest.raises(TinyFusionError, match="downsampling factor 16"):
        vae_io.latent_geometry_from_flags(str(folder), 264)


def write_images(root, count=3):
    rng = np.random.default_rng(5)
    for label in range(2):
        os.makedirs(root / f"class_{label}")
        for i in range(count):
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{label}" / f"{i}.png")
    return root


def test_extract_features_on_the_converted_folder_stores_kl16_latents(tmp_path, converted, reference):
    """32x32 images through stride 16: 16 x 2 x 2 latents, each (mean + std * the store's noise of
    that image) x 0.2325 by the reference, and the manifest says 0.2325."""
    data = write_images(tmp_path / "images")
    argv = ["--data-path", str(data), "--features-path", str(tmp_path / "features"), "--image-size", "32",
            "--num-workers", "0", "--batch-size", "4", "--vae-path", str(converted)]
    extract_features.main(extract_features.parse_args(argv))
    manifest = feature_store.read_manifest(tmp_path / "features")
    assert manifest["sample_shape"] == [16, 2, 2] and manifest["scale_factor"] == MAR_SCALE
    dataset = feature_store.open_feature_dataset(tmp_path / "features", flip_prob=0.0)
    source = image_folder(str(data), 32)
    for index in (0, 4):
        image = source[index][0]
        pair = torch.stack([image, image.flip(dims=[2])])
        noise = torch.randn((2, 16, 2, 2), generator=torch.Generator().manual_seed(feature_store.hash64(0, index) >> 1))
        mean, std = reference.encode(pair)
        torch.testing.assert_close(torch.as_tensor(dataset[index][0]), ((mean + std * noise) * MAR_SCALE)[0],
                                   rtol=0, atol=ATOL)


def test_a_dit_exported_with_the_kl16_folder_keeps_its_0_2325(tmp_path, converted):
    """export_diffusers.py: the pipeline decodes latents / vae.config.scaling_factor, so it must be
    the 0.2325 our latents were scaled by (the SD-VAE's 0.18215 would decode them 28% too large)."""
    import export_diffusers
    from models import DiT_models
    from tinyfusion.io.checkpoints import save_checkpoint
    model = DiT_models["DiT-XS/2"](input_size=4, in_channels=16, num_classes=10)
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict()}, tmp_path / "dit.pt")
    out = tmp_path / "pipeline"
    export_diffusers.main(export_diffusers.parse_args([
        "--model", "DiT-XS/2", "--image-size", "64", "--num-classes", "10", "--vae-path", str(converted),
        "--ckpt", str(tmp_path / "dit.pt"), "--out", str(out)]))
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == MAR_SCALE

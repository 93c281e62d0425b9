"""Non-finite numbers never become pixels, arrays or checkpoints: a checkpoint in the official
format (no checksum of ours) whose flipped byte holds a finite but huge weight is refused when it
is loaded, and every writer of model output refuses NaN / inf, with one line and no file."""
import os

import numpy as np
import pytest
import torch

import prune_by_index
import sample
import sample_ddp
from models import DiT_models
from tinyfusion.io.checkpoints import (MAX_TRAINED_WEIGHT, check_finite_weights, load_checkpoint_file,
                                       save_checkpoint, save_pruned_model)
from tinyfusion.families.build import build_model
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.vae import to_uint8_nhwc

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PIXEL = ["--model", "DiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10",
         "--num-sampling-steps", "2"]
HUGE = 3e38  # what an exponent bit flip makes of a weight: finite, far beyond any trained value


def official_style_checkpoint(path, value=HUGE):
    """A plain state dict of the full-depth DiT-XS/4 (no metadata, no checksum: the official
    format) with one weight set to `value`."""
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)
        model.blocks[1].mlp.fc1.weight[3, 2] = value
    torch.save(model.state_dict(), path)
    return str(path)


def test_a_huge_finite_weight_is_refused_by_every_loader(tmp_path):
    ckpt = official_style_checkpoint(tmp_path / "flipped.pt")
    expected = r"a weight no trained model has: blocks.1.mlp.fc1.weight holds \|w\| = 3.0000e\+38, above 1e\+04"
    out = tmp_path / "grid.png"
    with pytest.raises(TinyFusionError, match=expected):
        sample.main(sample.parse_args([*PIXEL, "--ckpt", ckpt, "--out", str(out), "--class-labels", "1", "2"]))
    samples = tmp_path / "samples"
    with pytest.raises(TinyFusionError, match=expected):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL, "--ckpt", ckpt, "--sample-dir", str(samples),
                                               "--per-proc-batch-size", "2", "--num-fid-samples", "2"]))
    pruned = tmp_path / "pruned.pt"
    with pytest.raises(TinyFusionError, match=expected):  # never re-saved under a fresh valid checksum
        prune_by_index.main(prune_by_index.parse_args([*PIXEL[:8], "--ckpt", ckpt, "--kept-indices", "[0, 1]",
                                                       "--save-model", str(pruned)]))
    assert os.listdir(tmp_path) == ["flipped.pt"]  # no grid, no sample folder, no pruned file


def test_the_bound_is_inclusive_and_names_the_tensor(tmp_path):
    state = {"a": torch.zeros(3), "b": torch.tensor([0.5, -MAX_TRAINED_WEIGHT])}
    check_finite_weights(state, "ok.pt")  # exactly the bound is still accepted
    state["b"][0] = -1.0001 * MAX_TRAINED_WEIGHT
    with pytest.raises(TinyFusionError, match=r"x.pt holds a weight no trained model has: b holds \|w\| = 1\.0001e\+04, above 1e\+04"):
        check_finite_weights(state, "x.pt")
    # integer buffers (no weights) are not judged by the bound
    check_finite_weights({"steps": torch.tensor([10 ** 9])}, "int.pt")


def test_checkpoint_writers_refuse_weights_no_trained_model_has(tmp_path):
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=2)
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[0] = float("nan")
    target = tmp_path / "pruned.pt"
    with pytest.raises(TinyFusionError, match=r"refusing to write .*pruned.pt: .*NaN.inf values in blocks.0.attn.qkv.bias"):
        save_pruned_model(model, str(target), {"kept_indices": [0, 1]})
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias[0] = 2e5
    training = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "train_steps": 1}
    with pytest.raises(TinyFusionError, match=r"refusing to write .*0000001.pt: .*above 1e\+04"):
        save_checkpoint(training, str(tmp_path / "0000001.pt"))
    assert os.listdir(tmp_path) == []


def test_non_finite_images_are_never_converted_to_pixels():
    images = torch.zeros(2, 3, 4, 4)
    assert to_uint8_nhwc(images).shape == (2, 4, 4, 3)
    images[1, 0, 2, 2] = float("nan")
    with pytest.raises(TinyFusionError, match=r"1 NaN/inf values"):
        to_uint8_nhwc(images)


def nan_generate(real):
    def generate(*args, **kwargs):
        return real(*args, **kwargs) * float("nan")
    return generate


def healthy_checkpoint(tmp_path):
    return official_style_checkpoint(tmp_path / "healthy.pt", value=0.5)


def test_sample_py_writes_no_grid_of_nan_samples(tmp_path, monkeypatch):
    ckpt = healthy_checkpoint(tmp_path)
    monkeypatch.setattr(sample, "generate", nan_generate(sample.generate))
    from tinyfusion.families import dit
    monkeypatch.setattr(dit.Family, "original_grid_samples", nan_generate(dit.Family.original_grid_samples))
    for extra in ([], ["--per-sample-seeds"], ["--grid", "labeled"]):
        out = tmp_path / "grid.png"
        with pytest.raises(TinyFusionError, match=r"NaN/inf values"):
            sample.main(sample.parse_args([*PIXEL, "--ckpt", ckpt, "--out", str(out), "--class-labels", "1", *extra]))
        assert not out.exists()


def test_sample_ddp_writes_no_npz_of_nan_samples(tmp_path, monkeypatch):
    ckpt = healthy_checkpoint(tmp_path)
    monkeypatch.setattr(sample_ddp, "generate", nan_generate(sample_ddp.generate))
    samples = tmp_path / "samples"
    with pytest.raises(TinyFusionError, match=r"NaN/inf values"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL, "--ckpt", ckpt, "--sample-dir", str(samples),
                                               "--per-proc-batch-size", "2", "--num-fid-samples", "4"]))
    assert not samples.exists() or os.listdir(samples) == []  # a fresh run's folder is removed with its parts
    assert not list(tmp_path.glob("**/*.npz")) and not list(tmp_path.glob("**/*.npy"))


def test_loaded_official_checkpoint_within_the_bound_samples(tmp_path):
    """The bound does not refuse a healthy official-format file (second path: the same model)."""
    ckpt = official_style_checkpoint(tmp_path / "ok.pt", value=MAX_TRAINED_WEIGHT / 2)
    model, _ = build_model("DiT-XS/4", image_size=8, num_classes=10, vae="none", ckpt=ckpt)
    assert model.blocks[1].mlp.fc1.weight[3, 2].item() == MAX_TRAINED_WEIGHT / 2
    assert isinstance(load_checkpoint_file(ckpt), dict) and np.isfinite(MAX_TRAINED_WEIGHT)

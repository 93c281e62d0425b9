"""No silently wrong result: every input below used to give wrong numbers (or overwrite a result)
with exit code 0; each test reproduces the case and asserts that it now stops with one line."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
import prune_by_learning
import prune_by_score
import sample
import sample_ddp
import train
import train_masked_kd
from models import DiT_models
from tinyfusion import flags as cli
from tinyfusion.evaluation.batch_metrics import evaluate
from tinyfusion.io import feature_store
from tinyfusion.io.checkpoints import (CorruptCheckpointError, load_checkpoint_file, newest_loadable_checkpoint,
                                       save_checkpoint, save_pruned_model, tensors_checksum, with_checksum,
                                       with_metadata)
from tinyfusion.families.build import build_model
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.image_folder import load_image_uint8, to_rgb8

STEPS = 3
PIXEL_FLAGS = ["--model", "DiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10",
               "--num-sampling-steps", str(STEPS), "--per-proc-batch-size", "4", "--num-fid-samples", "4"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_dit(seed, depth=2):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=depth)
    with torch.no_grad():  # adaLN-Zero starts at the identity: give the output some weight
        model.final_layer.linear.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return model


def save_small_checkpoint(path, seed):
    model = small_dit(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_pruned_model(model, path, {"kept_indices": [0, 1], "method": "test"}, overwrite=True)
    return str(path)


def flip_bytes_inside(path, tensor, value=4e37):
    """Overwrite, in the file, the first float of `tensor`'s stored bytes with `value` (as a bit
    flip in the exponent would): the zip stores tensors uncompressed."""
    data = bytearray(open(path, "rb").read())
    raw = tensor.detach().contiguous().numpy().tobytes()
    start = data.find(raw)
    assert start > 0 and data.find(raw, start + 1) < 0
    data[start:start + 4] = np.float32(value).tobytes()
    open(path, "wb").write(bytes(data))


# ---------------------------------------------------------------- 1. sample_ddp --resume keys
def test_sample_ddp_resume_never_reuses_another_models_samples(tmp_path):
    samples = str(tmp_path / "samples")
    first = save_small_checkpoint(tmp_path / "a" / "checkpoints" / "0000010.pt", seed=1)
    sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", first, "--sample-dir", samples]))
    (final,) = glob.glob(os.path.join(samples, "*.npz"))
    before = open(final, "rb").read()
    # another run's checkpoint of the same file name: same run name, other weights
    other = save_small_checkpoint(tmp_path / "b" / "checkpoints" / "0000010.pt", seed=2)
    with pytest.raises(TinyFusionError, match="weights_sha256"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", other, "--sample-dir", samples, "--resume"]))
    # the same file without EMA (a plain state dict has no ema, but the flag changes the identity)
    with pytest.raises(TinyFusionError, match="no_ema False -> True"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", first, "--sample-dir", samples, "--resume",
                                               "--no-ema"]))
    # the same checkpoint file, overwritten in place by a later training: other contents, same path
    save_small_checkpoint(tmp_path / "a" / "checkpoints" / "0000010.pt", seed=3)
    with pytest.raises(TinyFusionError, match="weights_sha256"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", first, "--sample-dir", samples, "--resume"]))
    assert open(final, "rb").read() == before
    # the identical checkpoint is still recognised as complete
    save_small_checkpoint(tmp_path / "a" / "checkpoints" / "0000010.pt", seed=1)
    sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", first, "--sample-dir", samples, "--resume"]))
    assert open(final, "rb").read() == before


def test_unfinished_parts_of_a_rewritten_checkpoint_are_not_resumed(tmp_path):
    samples = str(tmp_path / "samples")
    ckpt = save_small_checkpoint(tmp_path / "checkpoints" / "0000010.pt", seed=1)
    sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", ckpt, "--sample-dir", samples, "--keep-parts",
                                           "--per-proc-batch-size", "2"]))
    (final,) = glob.glob(os.path.join(samples, "*.npz"))
    os.remove(final)
    os.remove(sorted(glob.glob(os.path.join(final[:-4], "parts", "*.json")))[0])  # an interrupted run
    save_small_checkpoint(tmp_path / "checkpoints" / "0000010.pt", seed=5)  # the path now holds other weights
    with pytest.raises(TinyFusionError, match=r"cannot resume .*\(weights_sha256"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", ckpt, "--sample-dir", samples, "--resume"]))
    assert not os.path.exists(final)


# ---------------------------------------------------------------- 5. corrupt weights
def test_flipped_bytes_in_our_checkpoint_are_refused(tmp_path):
    path = save_small_checkpoint(tmp_path / "student.pt", seed=1)
    state = load_checkpoint_file(path)
    flip_bytes_inside(path, state["blocks.0.attn.qkv.weight"])
    loaded = torch.load(path, map_location="cpu", weights_only=True)  # torch itself does not notice
    assert loaded["blocks.0.attn.qkv.weight"].abs().max() > 1e37
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {path} is corrupted"):
        build_model("DiT-XS/4", image_size=8, num_classes=10, vae="none", ckpt=path)


def test_checksum_covers_training_checkpoints_and_is_order_and_value_sensitive(tmp_path):
    model = small_dit(1)
    checkpoint = {"model": model.state_dict(), "ema": model.state_dict(), "opt": {"state": {0: {"step": torch.tensor(3.0)}}},
                  "train_steps": 10}
    path = str(tmp_path / "0000010.pt")
    save_checkpoint(checkpoint, path)
    assert load_checkpoint_file(path)["train_steps"] == 10
    digest = tensors_checksum(checkpoint)
    changed = dict(checkpoint, train_steps=11)
    assert tensors_checksum(changed) != digest
    swapped = dict(checkpoint, model=checkpoint["ema"], ema=dict(checkpoint["model"]))
    swapped["ema"]["pos_embed"] = swapped["ema"]["pos_embed"] + 1e-7
    assert tensors_checksum(swapped) != digest
    flip_bytes_inside(path, checkpoint["model"]["x_embedder.proj.weight"][0], value=0.5)
    with pytest.raises(CorruptCheckpointError, match="corrupted"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("ours", [True, False])
def test_non_finite_weights_are_refused_before_sampling(tmp_path, ours):
    model = small_dit(1, depth=2 if ours else 12)  # an official file has the model's full depth
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 2] = float("nan")
    path = str(tmp_path / "nan.pt")
    if ours:  # our format with a valid checksum (save_checkpoint itself refuses to write it)
        torch.save(with_checksum(with_metadata(model.state_dict(), {"kept_indices": [0, 1], "method": "test"})), path)
    else:  # an official-style plain state dict: no checksum, still checked
        torch.save(model.state_dict(), path)
    samples = str(tmp_path / "samples")
    with pytest.raises(TinyFusionError, match=r"non-finite weights \(1 NaN/inf values in blocks.1.mlp.fc1.weight\)"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", path, "--sample-dir", samples]))
    assert not os.path.exists(samples)  # refused before any folder was made
    with pytest.raises(TinyFusionError, match="non-finite weights"):  # every script's model loading
        build_model("DiT-XS/4", image_size=8, num_classes=10, vae="none", ckpt=path)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    from training_helpers import make_digits_store
    return make_digits_store(str(tmp_path_factory.mktemp("store")), limit=40)


def test_training_reads_feature_shards_with_checksums(digits_store, tmp_path):
    store = str(tmp_path / "store")
    shutil.copytree(digits_store, store)
    dataset = feature_store.open_feature_dataset(store)
    clean = dataset[5][0].clone()
    (shard,) = glob.glob(os.path.join(store, "shard-*.safetensors"))
    tensors, _ = feature_store.read_shard_header(shard)
    data = bytearray(open(shard, "rb").read())
    offset = tensors["latents"][2] + 4 * int(np.prod(tensors["latents"][1][1:])) * 30  # image 30's latents
    data[offset + 3] ^= 0x40  # one flipped bit of one float
    open(shard, "wb").write(bytes(data))
    damaged = feature_store.open_feature_dataset(store)
    with pytest.raises(TinyFusionError, match=r"shard-00000.safetensors does not match its checksum"):
        damaged[5]  # any sample of the shard: it is verified at its first use
    # with verification off the damaged value is read silently: the check is what catches it
    unchecked = feature_store.open_feature_dataset(store, verify_checksums=False)
    assert torch.equal(unchecked[5][0], clean)


# ---------------------------------------------------------------- 6. 16-bit images
def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    values = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    path = str(tmp_path / "grey16.png")
    Image.fromarray(values).save(path)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        rgb = np.asarray(to_rgb8(image, path))
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))  # v*257 -> v exactly
    assert (rgb == 255).mean() < 0.01
    crop = load_image_uint8(path, 16)
    assert torch.equal(crop, torch.from_numpy(expected)[None].expand(3, 16, 16))
    float_path = str(tmp_path / "float.tif")
    Image.fromarray(values.astype(np.float32) / 65535).save(float_path)
    with pytest.raises(ValueError, match="float.tif is a F .* convert it to 8-bit RGB"):
        load_image_uint8(float_path, 16)


def test_extract_features_stores_sixteen_bit_images_scaled(tmp_path):
    folder = tmp_path / "images" / "class0"
    folder.mkdir(parents=True)
    values = (np.random.default_rng(0).integers(0, 256, (8, 8)) * 257).astype(np.uint16)
    Image.fromarray(values).save(folder / "a.png")
    extract_features.main(extract_features.parse_args(
        ["--data-path", str(tmp_path / "images"), "--features-path", str(tmp_path / "features"), "--image-size", "8",
         "--vae", "none", "--num-classes", "1", "--num-workers", "0"]))
    x, _ = feature_store.open_feature_dataset(str(tmp_path / "features"), flip_prob=0.0)[0]
    expected = torch.from_numpy((values // 257).astype(np.float32)) / 255 * 2 - 1
    assert torch.allclose(x, expected.expand(3, 8, 8), atol=1e-6)


# ---------------------------------------------------------------- 7. evaluator input types
class RecordingNetwork:
    """A feature network that records every batch it is asked about (none must be)."""
    name = "recording"
    uses_npz_statistics = False

    def __init__(self):
        self.batches = 0

    def __call__(self, images):
        self.batches += 1
        raise AssertionError("an activation was computed before both files were validated")


@pytest.mark.parametrize("bad", ["float01", "int16", "bad_stats"])
def test_evaluator_accepts_only_uint8_rgb_and_checks_both_files_first(tmp_path, bad):
    good = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    ref, samples = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
    np.savez(ref, arr_0=good)
    if bad == "float01":
        np.savez(samples, arr_0=good.astype(np.float32) / 255)
        match = "'arr_0' is float32, expected uint8"
    elif bad == "int16":
        np.savez(samples, arr_0=good.astype(np.int16) - 128)
        match = "'arr_0' is int16, expected uint8"
    else:
        np.savez(samples, arr_0=good, mu=np.zeros(4), sigma=np.full((4, 4), np.nan), mu_s=np.zeros(2),
                 sigma_s=np.eye(2))
        match = "hold NaN or inf"
    network = RecordingNetwork()
    with pytest.raises(ValueError, match=match):  # the sample file is bad: not even the reference is computed
        evaluate(ref, samples, network, device="cpu", log=lambda *a: None)
    assert network.batches == 0


# ---------------------------------------------------------------- 8. numeric flags
@pytest.mark.parametrize("parse, argv, flag", [
    (sample.parse_args, ["--cfg-scale", "-1"], "--cfg-scale"),
    (sample.parse_args, ["--num-sampling-steps", "0"], "--num-sampling-steps"),
    (sample_ddp.parse_args, ["--num-sampling-steps", "-5"], "--num-sampling-steps"),
    (sample_ddp.parse_args, ["--num-sampling-steps", "1001"], "--num-sampling-steps"),
    (sample_ddp.parse_args, ["--per-proc-batch-size", "0"], "--per-proc-batch-size"),
    (sample_ddp.parse_args, ["--num-fid-samples", "0"], "--num-fid-samples"),
    (prune_by_score.parse_args, ["--nsamples", "0"], "--nsamples"),
    (prune_by_score.parse_args, ["--batch-size", "0"], "--batch-size"),
    (extract_features.parse_args, ["--data-path", "x", "--batch-size", "0"], "--batch-size"),
    (extract_features.parse_args, ["--data-path", "x", "--shard-size", "-1"], "--shard-size"),
    # the training flags (train.py, train_masked_kd.py and prune_by_learning.py share them)
    (lambda argv: train.build_parser().parse_args(["--data-path", "x", *argv]), ["--ckpt-every", "0"], "--ckpt-every"),
    (lambda argv: train.build_parser().parse_args(["--data-path", "x", *argv]), ["--log-every", "0"], "--log-every"),
    (lambda argv: train.build_parser().parse_args(["--data-path", "x", *argv]), ["--ema-decay", "1.5"], "--ema-decay"),
    (lambda argv: train.build_parser().parse_args(["--data-path", "x", *argv]), ["--lr", "0"], "--lr"),
    (lambda argv: train_masked_kd.build_parser().parse_args(["--data-path", "x", *argv]), ["--global-batch-size", "0"],
     "--global-batch-size"),
    (lambda argv: prune_by_learning.parse_args(["--data-path", "x", *argv]), ["--max-steps", "-1"], "--max-steps"),
])
def test_bad_numeric_flags_stop_at_parsing(parse, argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    assert f"error: argument {flag}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_validators():
    assert cli.positive_int("3") == 3 and cli.nonnegative_int("0") == 0
    assert cli.positive_float("1e-4") == 1e-4 and cli.unit_interval("0.9999") == 0.9999
    assert cli.unit_interval("0") == 0 and cli.unit_interval("1") == 1 and cli.sampling_steps("1000") == 1000
    for validator, text in [(cli.positive_int, "0"), (cli.positive_int, "-2"), (cli.positive_int, "1.5"),
                            (cli.nonnegative_int, "-1"), (cli.positive_float, "0"), (cli.positive_float, "-1e-4"),
                            (cli.positive_float, "nan"), (cli.positive_float, "inf"), (cli.nonnegative_float, "-0.5"),
                            (cli.unit_interval, "1.0001"), (cli.unit_interval, "-0.1"), (cli.unit_interval, "nan"),
                            (cli.sampling_steps, "0")]:  # > 1000 is refused for a DiT only (test_flag_table.py)
        with pytest.raises(Exception) as error:
            validator(text)
        assert error.type.__name__ == "ArgumentTypeError", (validator.__name__, text)


# ---------------------------------------------------------------- 9. clear failures
def test_save_npz_names_a_truncated_or_non_image_file(tmp_path):
    import save_npz
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        noise = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
        Image.fromarray(noise).save(folder / f"{i:06d}.png")
    data = open(folder / "000001.png", "rb").read()
    open(folder / "000001.png", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"000001.png is not a readable image \(.*truncated"):
        save_npz.load_image_folder(str(folder))
    open(folder / "000001.png", "wb").write(data)
    (folder / "000002.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"000002.png is not a readable image"):
        save_npz.load_image_folder(str(folder))


def test_resume_auto_with_a_corrupt_newest_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    model = small_dit(1)
    for step in (10, 20, 30):
        save_checkpoint({"model": model.state_dict(), "train_steps": step},
                        os.path.join(run_dir, "checkpoints", f"{step:07d}.pt"))
    newest = os.path.join(run_dir, "checkpoints", "0000030.pt")
    data = open(newest, "rb").read()
    open(newest, "wb").write(data[: len(data) // 2])  # e.g. a copy cut off by a full disk
    path, checkpoint = newest_loadable_checkpoint(os.path.join(run_dir, "nothing-here"))
    assert (path, checkpoint) == (None, None)
    with pytest.raises(TinyFusionError, match=r"newest checkpoint is corrupt \(could not read checkpoint .*0000030.pt.*"
                                              r"the newest good one is .*0000020.pt: pass --resume .*0000020.pt"):
        newest_loadable_checkpoint(run_dir)
    messages = []
    path, checkpoint = newest_loadable_checkpoint(run_dir, fall_back=True, log=messages.append)
    assert path.endswith("0000020.pt") and checkpoint["train_steps"] == 20
    assert "skipping corrupt checkpoint" in messages[0] and "resuming from" in messages[1]

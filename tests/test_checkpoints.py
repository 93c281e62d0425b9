"""Checkpoint I/O: every format round-trips, mismatches are one-line errors that
name the model the file fits, pickles that run code are refused, writes are atomic."""
import argparse
import os
import pickle
from collections import OrderedDict

import pytest
import torch

from tinyfusion.errors import TinyFusionError
from tinyfusion.io.checkpoints import (describe_architecture, infer_architecture, load_state_dict, read_metadata,
                                       save_checkpoint, save_pruned_model)
from tinyfusion.families.build import build_model
from models import DiT_models, prune_to_kept_blocks
from test_models import randomize

SMALL = dict(image_size=16, num_classes=10, vae="none", depth=2)  # pixel space: 3 x 16 x 16, 2 blocks


def tiny_model(name="DiT-S/4", depth=2, **kw):
    return randomize(DiT_models[name](input_size=16, num_classes=10, in_channels=3, depth=depth, **kw))


def assert_same_weights(model, other):
    own, theirs = model.state_dict(), other.state_dict()
    assert set(own) == set(theirs)
    assert all(torch.equal(own[key], theirs[key]) for key in own)


def test_plain_state_dict_round_trip(tmp_path):
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded, metadata = build_model("DiT-S/4", ckpt=str(tmp_path / "plain.pt"), **SMALL)
    assert metadata is None
    assert_same_weights(model, loaded)


def test_training_checkpoint_takes_ema_unless_no_ema(tmp_path):
    model, ema = tiny_model(), randomize(tiny_model(), seed=1)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                  "train_steps": 7, "args": argparse.Namespace(model="DiT-S/4", epochs=3)}
    torch.save(checkpoint, tmp_path / "0000007.pt")
    from_ema, _ = build_model("DiT-S/4", ckpt=str(tmp_path / "0000007.pt"), **SMALL)
    from_model, _ = build_model("DiT-S/4", ckpt=str(tmp_path / "0000007.pt"), use_ema=False, **SMALL)
    assert_same_weights(ema, from_ema)
    assert_same_weights(model, from_model)


def test_ddp_prefix_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model()
    torch.save({f"module.{key}": value for key, value in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert_same_weights(model, build_model("DiT-S/4", ckpt=str(tmp_path / "ddp.pt"), **SMALL)[0])
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, tmp_path / "w.safetensors")
    assert_same_weights(model, build_model("DiT-S/4", ckpt=str(tmp_path / "w.safetensors"), **SMALL)[0])


def test_pruned_checkpoint_is_plain_and_carries_metadata(tmp_path):
    source = tiny_model("DiT-S/4", depth=6)
    pruned = prune_to_kept_blocks(source, [0, 3, 5])
    path = save_pruned_model(pruned, tmp_path / "pruned.pt", {"kept_indices": [0, 3, 5], "method": "index",
                                                               "source_model": "DiT-S/4"})
    # the original loading rule: a plain state dict, strict load into the shallow model
    raw = torch.load(path, weights_only=True)
    assert all(torch.is_tensor(value) for value in raw.values())
    plain = DiT_models["DiT-S/4"](input_size=16, num_classes=10, in_channels=3, depth=3)
    plain.load_state_dict(raw, strict=True)
    assert_same_weights(pruned, plain)
    # our metadata rides along and sets the depth for `--model DiT-S/4`
    assert read_metadata(raw)["kept_indices"] == [0, 3, 5]
    built, metadata = build_model("DiT-S/4", ckpt=str(path), image_size=16, num_classes=10, vae="none")
    assert built.depth == 3 and metadata["method"] == "index" and metadata["depth"] == 3
    assert_same_weights(pruned, built)
    # results are not silently overwritten
    with pytest.raises(FileExistsError):
        save_pruned_model(pruned, path, {"kept_indices": [0, 3, 5]})


def test_gated_model_starts_from_plain_weights(tmp_path):
    plain = tiny_model("DiT-S/4", depth=4)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    gated, _ = build_model("DiT-S/4", ckpt=str(tmp_path / "plain.pt"), groups=[[1, 2], [1, 2]],
                           **dict(SMALL, depth=4))
    assert all(torch.equal(logits, torch.full((2,), 0.02)) for logits in gated.gate_logits)
    for key, value in plain.state_dict().items():
        assert torch.equal(gated.state_dict()[key], value)


def test_mismatch_names_the_model_the_checkpoint_fits(tmp_path):
    torch.save(tiny_model("DiT-B/4", depth=12).state_dict(), tmp_path / "b4.pt")
    with pytest.raises(TinyFusionError) as error:
        build_model("DiT-S/4", ckpt=str(tmp_path / "b4.pt"), image_size=16, num_classes=10, vae="none")
    message = str(error.value)
    assert "\n" not in message and "DiT-B/4 (depth 12, hidden 768, patch 4, input 16" in message
    assert "shape mismatch: pos_embed" in message
    # a checkpoint for another image size names its input size
    torch.save(tiny_model("DiT-S/4").state_dict(), tmp_path / "s4.pt")
    with pytest.raises(TinyFusionError, match="input 16"):
        build_model("DiT-S/4", ckpt=str(tmp_path / "s4.pt"), image_size=32, num_classes=10, vae="none", depth=2)


def test_d14_shapes_are_recognised_as_dit_d14():
    with torch.device("meta"):
        d14 = DiT_models["DiT-D14/2"]()
    arch = infer_architecture(d14.state_dict())
    assert arch == dict(depth=14, hidden_size=1152, patch_size=2, input_size=32, in_channels=4,
                        num_classes=1000, learn_sigma=True, gated=False)
    assert describe_architecture(arch).startswith("DiT-D14/2 (depth 14, hidden 1152, patch 2, input 32")


@pytest.mark.slow
def test_full_size_d14_checkpoint_given_to_xl_fails_naming_d14(tmp_path):
    d14 = DiT_models["DiT-D14/2"](input_size=8)
    torch.save(d14.state_dict(), tmp_path / "d14.pt")
    del d14
    with pytest.raises(TinyFusionError) as error:
        build_model("DiT-XL/2", image_size=64, ckpt=str(tmp_path / "d14.pt"))
    assert "DiT-D14/2 (depth 14" in str(error.value) and "missing: blocks.14." in str(error.value)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode(str(marker))}, f)
    with pytest.raises(TinyFusionError, match="refusing to load"):
        load_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(TinyFusionError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.ones(2)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"w": Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_metadata_survives_the_state_dict_metadata_of_torch():
    model = tiny_model()
    state = model.state_dict()
    assert isinstance(state, OrderedDict) and "" in state._metadata  # torch's own per-module versions
    from tinyfusion.io.checkpoints import with_metadata
    tagged = with_metadata(state, {"kept_indices": [1]})
    assert tagged._metadata[""] == state._metadata[""] and read_metadata(tagged) == {"kept_indices": [1]}
    assert read_metadata(state) is None


def hash_fixture():
    """Weights of every kind a hash meets: a non-contiguous view, 0-d, empty, int, bf16, bool."""
    weights = {"proj.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
               "proj.bias": torch.tensor([0.5, -2.0]), "scale": torch.tensor(3.0, dtype=torch.float64),
               "empty": torch.zeros(0, 4), "count": torch.tensor([7], dtype=torch.int64)}
    return weights, dict(weights, half=torch.tensor([1.5, -0.25], dtype=torch.bfloat16),
                         flag=torch.tensor([True, False]))


def test_weight_hashes_keep_the_values_recorded_before_they_shared_one_core():
    """The digests the three hashes gave before they were folded into one (computed by the code of
    then: sample_ddp.py's weights_sha256, extract_features.py's vae_weights_sha256, the checkpoint
    CRC): sample folders, feature stores and checkpoints written earlier still match."""
    from tinyfusion.io.checkpoints import state_dict_sha256, tensors_checksum
    weights, mixed = hash_fixture()
    assert state_dict_sha256(mixed) == "be11390776c524bed0debc0637b2f5254c5e4c9624f29f414d9e948e30e4f21b"
    assert state_dict_sha256(weights, layout=False) == "7527328b2ee37c065f5ce124a1f81f27da063fe7845777b0f9ec373959c15063"
    assert tensors_checksum({"model": mixed, "steps": 3, "args": None}) == "84740c34"
    assert state_dict_sha256(dict(mixed, scale=torch.tensor(3.0))) != state_dict_sha256(mixed)  # dtype counts


def test_data_that_cannot_feed_the_model_is_one_line():
    from types import SimpleNamespace
    from tinyfusion.pruning.block_importance import check_latents_fit
    from tinyfusion.io.checkpoints import check_data_fits
    model = SimpleNamespace(in_channels=4, input_size=8, num_classes=10)
    check_latents_fit(torch.zeros(2, 4, 8, 8), torch.tensor([0, 9]), model)  # labels 0..9 of 10 classes fit
    features = dict(data="the features in f", model_flags="--model m with --vae ema --image-size 64")  # training's
    check_data_fits(model, (4, 8, 8), 10, **features)
    with pytest.raises(TinyFusionError, match=r"^the calibration latents have labels up to 10 but --num-classes is "
                                              r"10; pass --num-classes 11$"):
        check_latents_fit(torch.zeros(2, 4, 8, 8), torch.tensor([0, 10]), model)
    with pytest.raises(TinyFusionError, match=r"^the calibration latents are \(3, 8, 8\) but the model expects "
                                              r"\(4, 8, 8\); pass the --vae/--image-size they were made with$"):
        check_latents_fit(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), model)
    with pytest.raises(TinyFusionError, match=r"^the features in f are \(4, 16, 16\) but --model m with --vae ema "
                                              r"--image-size 64 expects \(4, 8, 8\)"):
        check_data_fits(model, (4, 16, 16), 10, **features)
    with pytest.raises(TinyFusionError, match=r"^the features in f have labels up to 11 .* pass --num-classes 12$"):
        check_data_fits(model, (4, 8, 8), 12, **features)

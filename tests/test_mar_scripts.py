"""Every script on a tiny MAR (pixel-space digits): train -> prune (learned over both block lists,
BI, index) -> Masked KD -> sample / sample_ddp; each step's checkpoint builds as a MAR."""
import glob
import json

import numpy as np
import pytest

import prune_by_index
import prune_by_learning
import prune_by_score
import sample
import sample_ddp
import train
import train_masked_kd
import visualize_activation
from models import MAR, MAR_models
from test_train import checkpoint
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.checkpoints import read_metadata, save_checkpoint, with_metadata
from training_helpers import COMMON_FLAGS, IMAGE_SIZE, make_digits_store

MODEL = "MAR-XS/4"
PIXELS = ["--image-size", str(IMAGE_SIZE), "--vae", "none", "--num-classes", "10"]


def flags(features, results, *extra):
    return ["--model", MODEL, "--data-path", features, "--results-dir", str(results), "--global-batch-size", "8",
            *COMMON_FLAGS, *extra]


def test_every_script_on_a_tiny_mar(tmp_path):
    features = make_digits_store(str(tmp_path), limit=32)
    teacher = str(tmp_path / "teacher.pt")
    model = MAR_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10)
    save_checkpoint(with_metadata(model.state_dict(), {"model_family": "MAR"}), teacher)
    results = tmp_path / "results"
    train.main(train.build_parser().parse_args(flags(features, results, "--load-weight", teacher, "--max-steps", "2",
                                                     "--prefix", "teacher")))
    trained = str(results / "teacher-MAR-XS-4" / "checkpoints" / "0000002.pt")
    # 6 encoder + 6 decoder blocks: keep 1 of 2 in each list
    prune_by_learning.main(prune_by_learning.parse_args(flags(
        features, results, "--groups", "[[1,2]]*6", "--load-weight", trained, "--max-steps", "2", "--delta-w",
        "--lora", "--lora-rank", "2", "--prefix", "prune", "--save-model", str(tmp_path / "learned.pt"))))
    prune_by_score.main(prune_by_score.parse_args([
        "--model", MODEL, "--ckpt", trained, "--features-path", features, "--n-pruned", "6", "--nsamples", "8",
        "--batch-size", "4", "--save-model", str(tmp_path / "bi.pt"), *PIXELS]))
    prune_by_index.main(prune_by_index.parse_args(["--model", MODEL, "--ckpt", trained, "--kept-indices", "[0, 3, 6, 9]",
                                                   "--save-model", str(tmp_path / "index.pt"), *PIXELS]))
    for pruned, kept in (("learned.pt", 6), ("bi.pt", 6), ("index.pt", 4)):
        metadata = read_metadata(checkpoint(tmp_path / pruned))
        assert metadata["model_family"] == "MAR" and len(metadata["kept_indices"]) == kept, pruned
    learned = read_metadata(checkpoint(tmp_path / "learned.pt"))["kept_indices"]
    assert sum(index < 6 for index in learned) == 3  # one of every pair in each list
    train_masked_kd.main(train_masked_kd.build_parser().parse_args(flags(
        features, results, "--load-weight", str(tmp_path / "index.pt"), "--teacher", MODEL, "--load-teacher",
        trained, "--max-steps", "2", "--prefix", "kd")))
    student = str(results / "kd-MAR-XS-4" / "checkpoints" / "0000002.pt")
    sample.main(sample.parse_args(["--model", MODEL, "--ckpt", student, "--num-sampling-steps", "3", "--num-iter", "4",
                                   "--class-labels", "1", "2", "--out", str(tmp_path / "grid.png"), *PIXELS]))
    sample_ddp.main(sample_ddp.parse_args(["--model", MODEL, "--ckpt", student, "--num-sampling-steps", "3",
                                           "--num-iter", "4", "--num-fid-samples", "3", "--sample-dir",
                                           str(tmp_path / "samples"), *PIXELS]))
    (npz,) = glob.glob(str(tmp_path / "samples" / "*.npz"))
    with np.load(npz) as batch:
        assert batch["arr_0"].shape == (3, 8, 8, 3)
    from tinyfusion.families.build import build_model
    built, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=student)
    assert type(built) is MAR and (built.encoder_depth, built.decoder_depth) == (2, 2)
    # block outputs at one mask ratio: 12 blocks; an encoder block sees the 4 class tokens and the visible tokens
    visualize_activation.main(visualize_activation.parse_args([
        "--model", MODEL, "--ckpt", trained, "--features-path", features, "--nsamples", "8", "--batch-size", "4",
        "--time", "0.75", "--out", str(tmp_path / "activations"), *PIXELS]))
    record = json.loads((tmp_path / "activations" / "activations.json").read_text())
    assert len(record["blocks"]) == 12 and record["mask_ratio"] == 0.75
    assert record["blocks"][0]["entries"] == 8 * (4 + 1) * 128 and record["blocks"][6]["entries"] == 8 * (4 + 4) * 128
    import export_diffusers
    with pytest.raises(TinyFusionError, match="MAR"):
        export_diffusers.main(export_diffusers.parse_args(["--model", MODEL, "--ckpt", student, "--out",
                                                           str(tmp_path / "export"), *PIXELS]))

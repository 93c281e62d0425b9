"""prune_by_index.py and prune_by_score.py as users run them: checkpoints in, pruned
checkpoints (plain state dict + metadata) out, one-line errors for bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import prune_by_index
import prune_by_score
from tinyfusion.io.checkpoints import load_checkpoint_file, read_metadata
from tinyfusion.families.build import build_model
from models import DiT_models
from tests.prune_helpers import make_digits_features, save_plain, set_block_gates, xs_model
from tests.tiny_vae import make_tiny_vae
from tinyfusion.errors import TinyFusionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ORACLE = "[0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("prune_scripts")


@pytest.fixture(scope="module")
def source28(folder):
    """A 28-block DiT-XS/4 saved like the official files (the oracle indices need 28 blocks)."""
    return save_plain(xs_model(depth=28, patch=4), folder / "xs28.pt")


def assert_blocks_equal(saved, original, kept):
    for key, value in saved.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{kept[int(index)]}.{rest}"
        assert torch.equal(value, original[key]), key


def test_prune_by_index_keeps_exactly_the_listed_blocks(folder, source28):
    source = source28
    out = folder / "oracle.pt"
    prune_by_index.main(prune_by_index.parse_args([
        "--model", "DiT-XS/4", "--ckpt", source, "--kept-indices", ORACLE, "--save-model", str(out),
        "--image-size", "8", "--vae", "none", "--num-classes", "10"]))
    saved = load_checkpoint_file(out)
    metadata = read_metadata(saved)
    kept = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    assert metadata["kept_indices"] == kept and metadata["method"] == "index"
    assert metadata["source_checkpoint"] == source and metadata["source_model"] == "DiT-XS/4"
    plain = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=14)
    plain.load_state_dict(saved, strict=True)  # the original loading rule reads it
    assert_blocks_equal(plain.state_dict(), torch.load(source, weights_only=True), kept)
    # every later script builds the right depth from the metadata
    rebuilt, _ = build_model("DiT-XS/4", 8, 10, "none", ckpt=str(out))
    assert rebuilt.depth == 14

    # pruning the pruned model again tracks the blocks back to the original
    again = folder / "again.pt"
    prune_by_index.main(prune_by_index.parse_args([
        "--model", "DiT-XS/4", "--ckpt", str(out), "--kept-indices", "0,13", "--save-model", str(again),
        "--image-size", "8", "--vae", "none", "--num-classes", "10"]))
    lineage = read_metadata(load_checkpoint_file(again))
    assert (lineage["kept_indices"], lineage["source_depth"]) == ([0, 13], 14)
    assert (lineage["root_kept_indices"], lineage["root_depth"]) == ([0, 27], 28)


@pytest.mark.parametrize("indices, message", [
    ("[]", "empty"), ("[0, 28]", "out of range"), ("[0, 2, 2]", "repeat"), ("[4, 2]", "not sorted")])
def test_prune_by_index_rejects_bad_indices_in_one_line(folder, source28, indices, message):
    source = source28
    out = folder / f"never-{message.replace(' ', '-')}.pt"
    with pytest.raises(TinyFusionError, match=message) as info:
        prune_by_index.main(prune_by_index.parse_args([
            "--model", "DiT-XS/4", "--ckpt", source, "--kept-indices", indices, "--save-model", str(out),
            "--image-size", "8", "--vae", "none", "--num-classes", "10"]))
    assert str(info.value).startswith("--kept-indices") and "\n" not in str(info.value)
    assert not out.exists()


def test_prune_by_index_never_overwrites_silently(folder):
    source = save_plain(xs_model(depth=4, patch=4), folder / "xs4.pt")
    out = folder / "taken.pt"
    out.write_bytes(b"keep me")
    argv = ["--model", "DiT-XS/4", "--ckpt", source, "--kept-indices", "[0, 3]", "--save-model", str(out),
            "--image-size", "8", "--vae", "none", "--num-classes", "10"]
    with pytest.raises(TinyFusionError, match="already exists; pass --overwrite"):
        prune_by_index.main(prune_by_index.parse_args(argv))
    assert out.read_bytes() == b"keep me"
    prune_by_index.main(prune_by_index.parse_args(argv + ["--overwrite"]))
    assert read_metadata(load_checkpoint_file(out))["kept_indices"] == [0, 3]


def known_similarity_teacher(folder, patch=2, channels=3, image_size=8):
    """6 blocks whose input/output similarity order is known (see test_prune_units): the two most
    similar non-last blocks are 1 (identity) and 3 (gate 0.01); the last block is an identity too."""
    model = xs_model(depth=6, patch=patch, channels=channels, image_size=image_size)
    for block, value in zip(model.blocks, [1.0, 0.0, 10.0, 0.01, 0.3, 0.0]):
        set_block_gates(block, value)
    return save_plain(model, folder / f"known{patch}{channels}.pt")


def test_prune_by_score_on_features_removes_the_most_similar_blocks(folder, capsys):
    _, features = make_digits_features(str(folder), limit=64)
    source = known_similarity_teacher(folder)
    out = folder / "score.pt"
    for calibration in ("clean", "noised"):  # the identity blocks are found by both procedures
        prune_by_score.main(prune_by_score.parse_args([
            "--model", "DiT-XS/2", "--ckpt", source, "--features-path", features, "--n-pruned", "2", "--nsamples",
            "24", "--batch-size", "8", "--save-model", str(out), "--image-size", "8", "--vae", "none",
            "--num-classes", "10", "--calibration", calibration, "--overwrite"]))
        printed = capsys.readouterr().out
        assert "kept indices: [0, 2, 4, 5]" in printed and "block  1: similarity 1.000000" in printed
        saved = load_checkpoint_file(out)
        metadata = read_metadata(saved)
        assert metadata["kept_indices"] == [0, 2, 4, 5] and metadata["method"] == "bi-score"
        assert len(metadata["scores"]) == 6 and metadata["nsamples"] == 24 and metadata["calibration"] == calibration
        with open(folder / "score.scores.json") as f:
            scores = json.load(f)
        assert scores["similarity"] == metadata["scores"] and scores["removed_indices"] == [1, 3]
        assert scores["calibration"] == calibration and scores["timesteps"] == (250 if calibration == "clean" else 1000)
    plain = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10, depth=4)
    plain.load_state_dict(saved, strict=True)
    assert_blocks_equal(plain.state_dict(), torch.load(source, weights_only=True), [0, 2, 4, 5])


def original_bi_reference(model, image_folder, nsamples, batch_size, steps, seed, n_pruned):
    """The original TinyFusion BI procedure written out independently: images read with PIL
    (8x8 digits: the center crop is the identity), the subset and flips drawn as documented in
    calibration_latents, clean inputs, t ~ U{0..steps-1}, a manual loop over the blocks;
    per batch the mean over tokens and samples, then the mean over batches."""
    files = [(os.path.join(image_folder, label, name), int(label)) for label in sorted(os.listdir(image_folder))
             for name in sorted(os.listdir(os.path.join(image_folder, label)))]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=gen)[:nsamples].tolist()
    flips = (torch.rand(len(order), generator=gen) < 0.5).tolist()
    images, labels = [], []
    for index, flip in zip(order, flips):
        pixels = np.asarray(Image.open(files[index][0]).convert("RGB"), dtype=np.float64) / 127.5 - 1.0
        images.append(torch.tensor(np.ascontiguousarray(pixels[:, ::-1] if flip else pixels)).permute(2, 0, 1).float())
        labels.append(files[index][1])
    x_all, y_all = torch.stack(images), torch.tensor(labels)
    t_gen = torch.Generator().manual_seed(seed)
    batch_means = []
    with torch.no_grad():
        for start in range(0, len(x_all), batch_size):
            x, y = x_all[start:start + batch_size], y_all[start:start + batch_size]
            t = torch.randint(0, steps, (len(x),), generator=t_gen)
            hidden = model.x_embedder(x) + model.pos_embed
            c = model.t_embedder(t) + model.y_embedder(y, False)
            means = []
            for block in model.blocks:
                out = block(hidden, c)
                means.append(torch.nn.functional.cosine_similarity(hidden, out, dim=-1).mean().item())
                hidden = out
            batch_means.append(means)
    scores = np.mean(batch_means, axis=0)
    removed = sorted(range(len(scores) - 1), key=lambda j: -scores[j])[:n_pruned]
    return [j for j in range(len(scores)) if j not in removed], scores


def test_prune_by_score_default_is_the_original_clean_calibration(folder):
    images, _ = make_digits_features(str(folder), limit=64)
    model = xs_model(depth=8, patch=2, seed=3)
    with torch.no_grad():  # strong, t-dependent blocks so that every detail of the procedure shows in the scores
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.mul_(20.0)
    source = save_plain(model, folder / "strong8.pt")
    out = folder / "clean.pt"
    argv = ["--model", "DiT-XS/2", "--ckpt", source, "--data-path", images, "--n-pruned", "3", "--nsamples", "40",
            "--batch-size", "16", "--image-size", "8", "--vae", "none", "--num-classes", "10", "--seed", "7"]
    prune_by_score.main(prune_by_score.parse_args(argv + ["--save-model", str(out)]))
    with open(folder / "clean.scores.json") as f:
        written = json.load(f)
    kept, scores = original_bi_reference(model.eval(), images, nsamples=40, batch_size=16, steps=250, seed=7, n_pruned=3)
    np.testing.assert_allclose(written["similarity"], scores, rtol=0, atol=2e-6)
    assert written["kept_indices"] == kept == read_metadata(load_checkpoint_file(out))["kept_indices"]
    # the test can tell the procedures apart: our noised variant scores differently
    prune_by_score.main(prune_by_score.parse_args(argv + ["--save-model", str(folder / "noised.pt"),
                                                          "--calibration", "noised"]))
    with open(folder / "noised.scores.json") as f:
        noised = json.load(f)
    assert np.abs(np.array(noised["similarity"]) - scores).max() > 1e-3


def test_prune_by_score_through_the_vae_on_an_image_folder_with_a_sample_grid(folder):
    images, _ = make_digits_features(str(folder), image_size=16, limit=40)
    vae_dir = make_tiny_vae(str(folder / "tiny_vae"))
    source = known_similarity_teacher(folder, patch=2, channels=4, image_size=2)
    out, grid = folder / "score_vae.pt", folder / "grid.png"
    prune_by_score.main(prune_by_score.parse_args([
        "--model", "DiT-XS/2", "--ckpt", source, "--data-path", images, "--vae", "ema", "--vae-path", vae_dir,
        "--image-size", "16", "--num-classes", "10", "--n-pruned", "2", "--nsamples", "16", "--batch-size", "8",
        "--save-model", str(out), "--sample-grid", str(grid), "--num-sampling-steps", "2"]))
    assert read_metadata(load_checkpoint_file(out))["kept_indices"] == [0, 2, 4, 5]
    with open(grid, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the readable layout: labels 207 360 387 974 88 979 417 279 mod 10 are classes 0 4 7 8 9 (5 rows, class 7
    # three times -> 3 columns), 16 px upscaled x4 to 64 px tiles with 4 px gaps: 4 + 5 * 68 px high
    from PIL import Image
    with Image.open(grid) as image:
        assert image.size[1] == 4 + 5 * 68 and image.size[0] > 4 + 3 * 68


def test_prune_by_score_errors(folder, capsys):
    source = known_similarity_teacher(folder)
    never = folder / "never.pt"
    for argv in (["--ckpt", source], ["--ckpt", source, "--data-path", "", "--save-model", str(never)]):
        with pytest.raises(TinyFusionError, match="^--data-path is required") as info:
            prune_by_score.main(prune_by_score.parse_args([
                "--model", "DiT-XS/2", *argv, "--image-size", "8", "--vae", "none", "--num-classes", "10"]))
        assert "\n" not in str(info.value)
    assert capsys.readouterr().out == ""  # refused before any work
    _, features = make_digits_features(str(folder), limit=64)
    with pytest.raises(TinyFusionError, match="between 0 and 5"):
        prune_by_score.main(prune_by_score.parse_args([
            "--model", "DiT-XS/2", "--ckpt", source, "--features-path", features, "--n-pruned", "6", "--nsamples", "8",
            "--save-model", str(never), "--image-size", "8", "--vae", "none", "--num-classes", "10"]))
    assert not never.exists() and not (folder / "never.scores.json").exists()
    # an existing scores file is never replaced silently either
    (folder / "taken.scores.json").write_text("{}")
    with pytest.raises(TinyFusionError, match="already exists"):
        prune_by_score.main(prune_by_score.parse_args([
            "--model", "DiT-XS/2", "--ckpt", source, "--features-path", features, "--save-model",
            str(folder / "taken.pt"), "--image-size", "8", "--vae", "none", "--num-classes", "10"]))


def test_prune_by_score_script_refuses_without_data_in_one_line(folder):
    import subprocess
    import sys
    source = known_similarity_teacher(folder)
    done = subprocess.run([sys.executable, os.path.join(REPO, "prune_by_score.py"), "--model", "DiT-XS/2", "--ckpt",
                           source, "--save-model", str(folder / "x.pt")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: --data-path is required")
    assert done.stderr.count("\n") == 1 and not (folder / "x.pt").exists()

"""visualize_activation.py on a DiT-XS/4 over 8x8 digits in pixel space (the quick start's
setting): the figures are written, and the JSON's numbers equal a hand computation from hidden
states captured with forward hooks (another path than the model's hidden_indices) in NumPy."""
import json

import numpy as np
import pytest
import torch

import visualize_activation
from tests.prune_helpers import make_digits_features, save_plain, xs_model
from tinyfusion.errors import TinyFusionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FLAGS = ["--model", "DiT-XS/4", "--vae", "none", "--image-size", "8", "--num-classes", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("activations")
    images, features = make_digits_features(str(folder), limit=64)
    model = xs_model(depth=4, seed=3)
    with torch.no_grad():  # block 1 adds ~60 to 3 channels of every token, like DiT's massive activations
        hidden = model.blocks[1].mlp.fc2.out_features
        model.blocks[1].adaLN_modulation[-1].bias[5 * hidden:] += 1.0  # gate_mlp about 1
        model.blocks[1].mlp.fc2.bias[:3] = 60.0
    return dict(folder=folder, images=images, features=features, ckpt=save_plain(model, folder / "teacher.pt"))


def hand_statistics(workspace, nsamples, seed, k):
    """Per block (masked share, min, max, std, sorted |h|) of the same inputs, from forward hooks."""
    from models import DiT_models
    from tinyfusion.pruning import calibration_latents
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=4)
    model.load_state_dict(torch.load(workspace["ckpt"], weights_only=True))
    model.eval()
    latents, labels = calibration_latents(nsamples, seed, workspace["features"])
    x_t, t, y = visualize_activation.model_inputs(latents, labels, seed)
    captured = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: captured.append(output.double().numpy()))
             for block in model.blocks]
    with torch.no_grad():
        model(x_t, t, y)  # all samples in one batch (the script used batches of 16 and 8)
    for hook in hooks:
        hook.remove()
    results = []
    for h in captured:
        flat = h.reshape(len(h), -1)
        mu = flat.mean(axis=1, keepdims=True)
        std = np.sqrt(((flat - mu) ** 2).mean(axis=1, keepdims=True))
        results.append(dict(masked=int((np.abs(flat - mu) >= k * std).sum()), entries=flat.size, min=flat.min(),
                            max=flat.max(), std=flat.std(), top=np.sort(np.abs(flat).ravel())[::-1]))
    return results


def test_figures_and_json_match_a_hand_computation(workspace, tmp_path):
    out = tmp_path / "out"
    visualize_activation.main(visualize_activation.parse_args([
        *FLAGS, "--ckpt", workspace["ckpt"], "--features-path", workspace["features"], "--nsamples", "24",
        "--batch-size", "16", "--topk", "5", "--seed", "7", "--out", str(out)]))
    for path in [out / "summary.png", *[out / "blocks" / f"block_{i:02d}.png" for i in range(4)]]:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, path
    record = json.loads((out / "activations.json").read_text())
    assert record["nsamples"] == 24 and record["mask_sigma"] == 2.0 and len(record["blocks"]) == 4
    hand = hand_statistics(workspace, 24, 7, 2.0)
    for block, expected in zip(record["blocks"], hand):
        assert block["entries"] == expected["entries"] == 24 * 4 * 128  # samples x tokens x channels
        # the same masked entries, up to an entry whose |h - mu| sits on k * std to float rounding
        assert abs(block["masked_share"] * block["entries"] - expected["masked"]) <= 1
        np.testing.assert_allclose([block["min"], block["max"], block["std"]],
                                   [expected["min"], expected["max"], expected["std"]], rtol=1e-5)
        np.testing.assert_allclose(block["topk_abs"], expected["top"][:5], rtol=1e-5)
    shares = [block["masked_share"] for block in record["blocks"]]
    assert all(0 < share < 0.2 for share in shares)  # a Gaussian would give 4.6% at k = 2
    assert record["blocks"][1]["max"] > 5 * record["blocks"][0]["max"]  # the amplified block stands out


def test_image_folder_input_and_refusals(workspace, tmp_path):
    out = tmp_path / "from-images"
    args = [*FLAGS, "--ckpt", workspace["ckpt"], "--data-path", workspace["images"], "--nsamples", "8", "--out", str(out)]
    visualize_activation.main(visualize_activation.parse_args(args))
    assert json.loads((out / "activations.json").read_text())["nsamples"] == 8
    with pytest.raises(TinyFusionError, match="already holds activations.json; pass --overwrite"):
        visualize_activation.main(visualize_activation.parse_args(args))
    with pytest.raises(TinyFusionError, match="pass --data-path"):
        visualize_activation.main(visualize_activation.parse_args([*FLAGS, "--ckpt", workspace["ckpt"],
                                                                  "--out", str(tmp_path / "never")]))
    with pytest.raises(TinyFusionError, match="--ckpt is required"):
        visualize_activation.main(visualize_activation.parse_args([*FLAGS, "--features-path", workspace["features"],
                                                                  "--out", str(tmp_path / "never")]))
    assert not (tmp_path / "never").exists()

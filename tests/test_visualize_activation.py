"""visualize_activation.py on a DiT-XS/4 over 8x8 digits in pixel space (the quick start's
setting): the figures are written, and the JSON's numbers equal a hand computation from hidden
states captured with forward hooks (another path than the model's hidden_indices) in NumPy. The
same weights saved as a SiT-XS/4 are run on SiT's Linear path, its inputs built by hand."""
import json

import numpy as np
import pytest
import torch

import visualize_activation
from tests.prune_helpers import make_digits_features, save_plain, xs_model
from tinyfusion.io.checkpoints import save_checkpoint, with_metadata
from tinyfusion.errors import TinyFusionError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PIXELS = ["--vae", "none", "--image-size", "8", "--num-classes", "10", "--device", "cpu"]
FLAGS = ["--model", "DiT-XS/4", *PIXELS]
SIT_FLAGS = ["--model", "SiT-XS/4", *PIXELS]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("activations")
    images, features = make_digits_features(str(folder), limit=64)
    model = xs_model(depth=4, seed=3)
    with torch.no_grad():  # block 1 adds ~60 to 3 channels of every token, like DiT's massive activations
        hidden = model.blocks[1].mlp.fc2.out_features
        model.blocks[1].adaLN_modulation[-1].bias[5 * hidden:] += 1.0  # gate_mlp about 1
        model.blocks[1].mlp.fc2.bias[:3] = 60.0
    ckpt = save_plain(model, folder / "teacher.pt")
    # the same weights as a SiT (same keys and shapes), recording its family and interpolant as ours do
    sit_ckpt, dit_ckpt = str(folder / "sit.pt"), str(folder / "dit.pt")
    save_checkpoint(with_metadata(model.state_dict(), {"model_family": "SiT", "transport": dict(
        path_type="Linear", prediction="velocity")}), sit_ckpt)
    save_checkpoint(with_metadata(model.state_dict(), {"model_family": "DiT"}), dit_ckpt)
    return dict(folder=folder, images=images, features=features, ckpt=ckpt, sit_ckpt=sit_ckpt, dit_ckpt=dit_ckpt)


def tiny_model(workspace, family):
    from models import DiT_models, SiT_models
    registry = {"DiT": DiT_models, "SiT": SiT_models}[family]
    model = registry[f"{family}-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=4)
    model.load_state_dict(torch.load(workspace["ckpt"], weights_only=True))
    return model.eval()


def hand_statistics(workspace, nsamples, seed, k):
    """Per block (masked share, min, max, std, sorted |h|) of the same inputs, from forward hooks."""
    from tinyfusion.pruning.block_importance import calibration_latents
    latents, labels = calibration_latents(nsamples, seed, workspace["features"])
    from tinyfusion.families import dit
    x_t, t = dit.Family().activation_inputs(latents, torch.Generator().manual_seed(seed))
    return hooked_statistics(tiny_model(workspace, "DiT"), x_t, t, labels, k)


def hooked_statistics(model, x_t, t, y, k):
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


def sit_hand_inputs(workspace, nsamples, seed, time=None):
    """SiT's Linear path by hand: x_t = t x1 + (1 - t) x0 (t = 1 the data), t uniform on [0, 1]
    (a velocity model's training interval) then x0, from the generator of `seed`."""
    from tinyfusion.pruning.block_importance import calibration_latents
    x1, labels = calibration_latents(nsamples, seed, workspace["features"])
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(nsamples, generator=generator) if time is None else torch.full((nsamples,), time)
    x0 = torch.randn(x1.shape, generator=generator)
    return t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0, t, labels


@pytest.mark.parametrize("time", [None, 0.25])
def test_a_sit_sees_its_transports_noising(workspace, tmp_path, time):
    out = tmp_path / "sit"
    extra = [] if time is None else ["--time", str(time)]
    visualize_activation.main(visualize_activation.parse_args([
        *SIT_FLAGS, "--ckpt", workspace["sit_ckpt"], "--features-path", workspace["features"], "--nsamples", "12",
        "--batch-size", "8", "--topk", "3", "--seed", "5", "--out", str(out), *extra]))
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    record = json.loads((out / "activations.json").read_text())
    assert record["times"] == ("uniform on [0.0, 1.0]" if time is None else time) and "timesteps" not in record
    assert record["transport"]["path_type"] == "Linear" and record["transport"]["prediction"] == "velocity"
    x_t, t, y = sit_hand_inputs(workspace, 12, 5, time)
    if time is None:
        assert float(t.std()) > 0.1  # the times differ per sample
    hand = hooked_statistics(tiny_model(workspace, "SiT"), x_t, t, y, 2.0)
    for block, expected in zip(record["blocks"], hand, strict=True):
        assert block["entries"] == expected["entries"] == 12 * 4 * 128
        assert abs(block["masked_share"] * block["entries"] - expected["masked"]) <= 1
        np.testing.assert_allclose([block["min"], block["max"], block["std"]],
                                   [expected["min"], expected["max"], expected["std"]], rtol=1e-5)
        np.testing.assert_allclose(block["topk_abs"], expected["top"][:3], rtol=1e-5)
    # the DiT reading of the same weights (integer timesteps, q_sample) gives other numbers
    dit = hand_statistics(workspace, 12, 5, 2.0)
    assert not np.isclose(record["blocks"][0]["std"], dit[0]["std"], rtol=1e-3)


def test_the_families_and_their_time_flags_are_refused_in_one_line(workspace, tmp_path):
    noise_sit = str(tmp_path / "noise-sit.pt")
    save_checkpoint(with_metadata(torch.load(workspace["ckpt"], weights_only=True), {
        "model_family": "SiT", "transport": dict(path_type="Linear", prediction="noise")}), noise_sit)
    data = ["--features-path", workspace["features"], "--out", str(tmp_path / "never")]
    cases = [
        ([*SIT_FLAGS, "--ckpt", workspace["dit_ckpt"]], "holds DiT weights but --model SiT-XS/4 is a SiT"),
        ([*FLAGS, "--ckpt", workspace["sit_ckpt"]], "holds SiT weights but --model DiT-XS/4 is a DiT"),
        ([*FLAGS, "--ckpt", workspace["ckpt"], "--path-type", "GVP"], "--path-type is a SiT flag; --model DiT-XS/4"),
        ([*FLAGS, "--ckpt", workspace["ckpt"], "--time", "0.5"], "--time is a SiT time; DiT-XS/4 is a DiT"),
        ([*SIT_FLAGS, "--ckpt", workspace["sit_ckpt"], "--timestep", "10"], "--timestep is a DiT timestep"),
        # --time outside [0, 1] stops at parsing (tests/test_flag_table.py)
        ([*SIT_FLAGS, "--ckpt", noise_sit], "trained with --prediction noise, not velocity; pass --prediction noise"),
    ]
    for flags, message in cases:
        with pytest.raises(TinyFusionError, match=message) as info:
            visualize_activation.main(visualize_activation.parse_args([*flags, *data]))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists()

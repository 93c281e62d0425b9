"""SiT (models.SiT + transport/) against a reference written here from SiT's published formulas
and checkpoint layout: the forward pass computed from the state dict by name (as SiT's code
consumes the released SiT-XL-2-256x256.pt), classifier-free guidance on 3 channels, and one ODE
(Euler, Heun) and one SDE (Euler-Maruyama, default settings) trajectory with the same noise."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from models import DiT_models, SiT, SiT_models, prune_to_kept_blocks
from test_models import ORIGINAL_BLOCK_KEYS, ORIGINAL_OTHER_KEYS, randomize
from tinyfusion.pruning.pruned_models import plain_name
from transport import create_transport, sample_ode, sample_sde, training_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_sit(name="SiT-XS/2", **kw):
    settings = dict(input_size=8, num_classes=10)
    settings.update(kw)
    return randomize(SiT_models[name](**settings), std=0.1).eval()


# --------------------------------------------------------------------------- layout
def test_sit_xl2_has_the_released_checkpoint_layout():
    """SiT-XL-2-256x256.pt has DiT-XL/2's 292 keys and shapes: SiT's code builds it with
    learn_sigma=True, so its final layer has p*p*2C = 32 outputs (the forward drops half)."""
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"]()
        no_sigma = SiT_models["SiT-XL/2"](learn_sigma=False)
    expected = dict(ORIGINAL_OTHER_KEYS)
    for block in range(28):
        expected.update({f"blocks.{block}.{key}": shape for key, shape in ORIGINAL_BLOCK_KEYS.items()})
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == expected
    assert tuple(no_sigma.state_dict()["final_layer.linear.weight"].shape) == (2 * 2 * 4, 1152)
    assert model.model_family == "SiT" and DiT_models["DiT-XL/2"].model_family == "DiT"


def test_every_dit_name_has_a_sit_twin_with_the_same_state_dict():
    assert set(SiT_models) == {name.replace("DiT-", "SiT-") for name in DiT_models}
    for name in ("S/2", "XS/4", "XL-1-2"):
        dit = DiT_models[f"DiT-{name}"](input_size=8, num_classes=10, hidden_size=32, num_heads=4)
        sit = SiT_models[f"SiT-{name}"](input_size=8, num_classes=10, hidden_size=32, num_heads=4)
        sit.load_state_dict(dit.state_dict(), strict=True)  # same names and shapes
        assert type(sit) is SiT and type(dit).__name__ == "DiT"
    assert plain_name("SiT-XL-1-2") == "SiT-XL/2" and plain_name("DiT-XL-1-2") == "DiT-XL/2"


# --------------------------------------------------------------------------- forward
def reference_forward(state, x, t, y, patch, heads, channels):
    """SiT's forward from the state dict: conv patchify + fixed pos_embed, t embedded as given
    (t in [0, 1]; cos then sin of t * 10000^(-k/128), float32 like the original), adaLN-Zero
    blocks, final layer, unpatchify, and the first C of 2C output channels."""
    def linear(prefix, v):
        return v @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]

    def layer_norm(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)
    n, hidden = x.shape[0], state["pos_embed"].shape[-1]
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    t_emb = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", t_freq)))
    c = t_emb + state["y_embedder.embedding_table.weight"][y]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    tokens = h.shape[1]
    for i in range(depth):
        mod = linear(f"blocks.{i}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        a = layer_norm(h) * (1 + mod[1][:, None]) + mod[0][:, None]
        q, k, v = linear(f"blocks.{i}.attn.qkv", a).view(n, tokens, 3, heads, hidden // heads).unbind(2)
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hidden // heads), dim=-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(n, tokens, hidden)
        h = h + mod[2][:, None] * linear(f"blocks.{i}.attn.proj", attn)
        a = layer_norm(h) * (1 + mod[4][:, None]) + mod[3][:, None]
        u = linear(f"blocks.{i}.mlp.fc1", a)
        gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        h = h + mod[5][:, None] * linear(f"blocks.{i}.mlp.fc2", gelu)
    shift, scale = linear("final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = linear("final_layer.linear", layer_norm(h) * (1 + scale[:, None]) + shift[:, None])
    side = int(tokens ** 0.5)
    out_channels = out.shape[-1] // (patch * patch)
    out = out.view(n, side, side, patch, patch, out_channels).permute(0, 5, 1, 3, 2, 4)
    out = out.reshape(n, out_channels, side * patch, side * patch)
    return out[:, :channels]


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_velocity_output_matches_the_reference_forward(learn_sigma):
    torch.manual_seed(0)
    model = small_sit("SiT-XS/2", learn_sigma=learn_sigma).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64), torch.tensor([1, 7, 10])
    state = {key: value for key, value in model.state_dict().items()}
    expected = reference_forward(state, x, t, y, patch=2, heads=4, channels=4)
    out = model(x, t, y)
    assert out.shape == (3, 4, 8, 8) and expected.abs().max() > 0.1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_forward_with_cfg_guides_three_of_the_four_velocity_channels():
    torch.manual_seed(0)
    model = small_sit()
    half = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([0.3, 0.8, 0.3, 0.8]), torch.tensor([1, 2, 10, 10])
    raw = model(torch.cat([half, half]), t, y)
    out = model.forward_with_cfg(torch.cat([half, torch.randn_like(half)]), t, y, 4.0)
    assert out.shape == (4, 4, 8, 8)
    guided = raw[2:, :3] + 4.0 * (raw[:2, :3] - raw[2:, :3])
    torch.testing.assert_close(out[:2, :3], guided)
    torch.testing.assert_close(out[2:, :3], guided)
    torch.testing.assert_close(out[:, 3:], raw[:, 3:])  # the 4th channel passes through unguided


# --------------------------------------------------------------------------- trajectories
def cfg_model_fn(model, y, scale):
    return lambda x, t: model.forward_with_cfg(x, t, y, scale)


@pytest.mark.parametrize("method", ["euler", "heun2"])
def test_one_ode_trajectory_matches_sits_fixed_grid_updates(method):
    """SiT's ODE on a fixed torchdiffeq grid: times linspace(0, 1, N) (float32), the model called
    with ones(B) * t_i; euler x + dt v, heun2 x + dt (v1 / 2 + v2 / 2), v2 at t_i + dt."""
    torch.manual_seed(0)
    model = small_sit()
    z = torch.randn(2, 4, 8, 8)
    x, y = torch.cat([z, z]), torch.tensor([3, 5, 10, 10])
    fn = cfg_model_fn(model, y, 4.0)
    steps = 6
    with torch.no_grad():
        got = sample_ode(fn, x, create_transport(), method=method, num_steps=steps)
        grid = torch.linspace(0, 1, steps)
        expected = x
        for i in range(steps - 1):
            dt = grid[i + 1] - grid[i]
            v1 = fn(expected, torch.ones(4) * grid[i])
            if method == "euler":
                expected = expected + dt * v1
            else:
                v2 = fn(expected + dt * v1 * 1.0, torch.ones(4) * (grid[i] + dt * 1.0))
                expected = expected + dt * (v1 * 0.5 + v2 * 0.5)
    assert (expected - x).abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_one_sde_trajectory_with_the_same_noise_matches_sits_euler_maruyama():
    """SiT's default SDE (Linear, velocity, Euler-Maruyama, D = sigma_t = 1 - t, last step "Mean"
    of 0.04): times linspace(0, 0.96, N), dt their first gap, noise torch.randn(x.size()) from the
    global generator at each step; score = (t v - x) / ((1 - t)^2 + t (1 - t))."""
    torch.manual_seed(0)
    model = small_sit()
    z = torch.randn(2, 4, 8, 8)
    x, y = torch.cat([z, z]), torch.tensor([3, 5, 10, 10])
    fn = cfg_model_fn(model, y, 4.0)
    steps = 5

    def sde_drift(state, t):
        v = fn(state, t)
        tt = t.view(-1, 1, 1, 1)
        score = (tt * v - state) / ((1 - tt) ** 2 - tt * (-1) * (1 - tt))
        return v + (1 - tt) * score, tt
    with torch.no_grad():
        torch.manual_seed(123)
        got = sample_sde(fn, x, create_transport(), num_steps=steps)
        torch.manual_seed(123)
        grid = torch.linspace(0, 0.96, steps)
        dt = grid[1] - grid[0]
        expected = x
        for time in grid[:-1]:
            dw = torch.randn(expected.size()) * torch.sqrt(dt)
            drift, tt = sde_drift(expected, torch.ones(4) * time)
            expected = expected + drift * dt + torch.sqrt(2 * (1 - tt)) * dw
        expected = expected + sde_drift(expected, torch.ones(4) * 0.96)[0] * 0.04
    assert (expected - x).abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- training, gates
def test_velocity_loss_of_a_sit_by_hand():
    torch.manual_seed(0)
    model = small_sit()
    x1, x0 = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t, y = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 2])
    losses = training_losses(model, x1, create_transport(), dict(y=y), t=t, noise=x0)["loss"]
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    expected = ((model(xt, t, y) - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses, expected)


def test_gated_sit_prunes_to_a_plain_sit_with_the_same_output():
    torch.manual_seed(0)
    gated = small_sit("SiT-D14-1-2", hidden_size=32, num_heads=4)
    kept = gated.kept_indices()
    pruned = prune_to_kept_blocks(gated, kept).eval()
    assert type(pruned) is SiT and pruned.depth == 7
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([1, 2])
    assert torch.equal(gated(x, t, y), pruned(x, t, y))
    assert pruned(x, t, y).shape == (2, 4, 8, 8)


# --------------------------------------------------------------------------- sample.py, family checks
def save_xs4(path, family, **metadata):
    from tinyfusion.io.checkpoints import save_pruned_model
    registry = SiT_models if family == "SiT" else DiT_models
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = randomize(registry[f"{family}-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=2), std=0.05)
    save_pruned_model(model, path, {"kept_indices": [0, 1], "method": "test", **metadata})
    return model.eval(), str(path)


BOTH = ("DiT", "SiT")
PIXEL = ["--model", "SiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10"]


@pytest.mark.parametrize("flags", [["--sampler", "sde", "--num-sampling-steps", "6"],
                                   ["--sampler", "ode", "--sampling-method", "heun2", "--num-sampling-steps", "5"]])
def test_sample_py_draws_a_sit_grid_from_per_sample_noise(tmp_path, flags):
    """Tile i is sample_ode / sample_sde run on sample i alone: its start and step noise drawn
    from the generator of (seed, i), guided with SiT's forward_with_cfg."""
    import numpy as np
    from PIL import Image

    import sample
    from tinyfusion.sampling.generate import sample_generator
    model, ckpt = save_xs4(tmp_path / "sit.pt", "SiT")
    out = str(tmp_path / "grid.png")
    labels = [3, 1, 4, 1, 5]
    sample.main(sample.parse_args([*PIXEL, *flags, "--ckpt", ckpt, "--seed", "5", "--out", out,
                                   "--class-labels", *map(str, labels)]))
    grid = np.asarray(Image.open(out)).astype(int)
    args = sample.parse_args([*PIXEL, *flags])
    for i, label in enumerate(labels):
        generator = sample_generator(5, i)
        z = torch.randn((3, 8, 8), generator=generator)[None]
        y = torch.tensor([label, 10])

        def fn(x, t):
            return model.forward_with_cfg(x, t, y, 4.0)
        with torch.no_grad():
            x = torch.cat([z, z])
            if args.sampler == "sde":
                noise = lambda like: torch.randn((3, 8, 8), generator=generator)[None].repeat(2, 1, 1, 1)  # noqa: E731
                image = sample_sde(fn, x, create_transport(), num_steps=6, noise_fn=noise)[0]
            else:
                image = sample_ode(fn, x, create_transport(), method="heun2", num_steps=5)[0]
        expected = torch.clamp((image + 1) / 2 * 255 + 0.5, 0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        row, col = divmod(i, 4)
        tile = grid[2 + 10 * row: 10 + 10 * row, 2 + 10 * col: 10 + 10 * col]
        assert np.abs(tile - expected.astype(int)).max() <= 1
        assert len(np.unique(expected)) > 20


def test_family_mismatch_and_sampler_errors_are_one_line(tmp_path, monkeypatch):
    import argparse

    import sample
    from tinyfusion.families.build import build_model
    from tinyfusion.errors import TinyFusionError
    _, sit_ckpt = save_xs4(tmp_path / "sit.pt", "SiT")
    dit_model, dit_ckpt = save_xs4(tmp_path / "dit.pt", "DiT")
    with pytest.raises(TinyFusionError, match="holds DiT weights but --model SiT-XS/4 is a SiT; pass --model DiT-XS/4"):
        build_model("SiT-XS/4", 8, 10, "none", ckpt=dit_ckpt)
    with pytest.raises(TinyFusionError, match="holds SiT weights but --model DiT-XS/4 is a DiT"):
        build_model("DiT-XS/4", 8, 10, "none", ckpt=sit_ckpt)
    training = str(tmp_path / "0000010.pt")  # a training checkpoint names its model in args
    torch.save({"model": dit_model.state_dict(), "ema": dit_model.state_dict(),
                "args": argparse.Namespace(model="DiT-XS/4")}, training)
    with pytest.raises(TinyFusionError, match="holds DiT weights"):
        build_model("SiT-XS/4", 8, 10, "none", ckpt=training)
    plain = str(tmp_path / "plain.pt")  # no metadata, args or name: its trained sigma half says DiT
    torch.save(dit_model.state_dict(), plain)
    with pytest.raises(TinyFusionError, match="holds DiT weights \\(the sigma half of its final layer is trained"):
        build_model("SiT-XS/4", 8, 10, "none", ckpt=plain, depth=2)
    no_sigma = str(tmp_path / "no-sigma.pt")  # p*p*C outputs (SiT trained with learn_sigma=False)
    torch.save(SiT_models["SiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=2, learn_sigma=False)
               .state_dict(), no_sigma)
    assert build_model("SiT-XS/4", 8, 10, "none", ckpt=no_sigma, depth=2)[0].learn_sigma is False
    import export_diffusers  # a script of one family refuses the other's --model
    with pytest.raises(TinyFusionError, match="--model SiT-XS/4 is a SiT; this script supports DiT models only"):
        export_diffusers.main(export_diffusers.parse_args(["--model", "SiT-XS/4", "--ckpt", sit_ckpt,
                                                           "--out", str(tmp_path / "never")]))
    out = str(tmp_path / "never.png")
    for flags, message in ((["--ckpt", sit_ckpt], "is a SiT: pass --sampler ode or --sampler sde"),
                           (["--ckpt", sit_ckpt, "--sampler", "ddpm"], "is a SiT"),
                           (["--ckpt", dit_ckpt, "--model", "DiT-XS/4", "--sampler", "sde"], "is for SiT models"),
                           (["--ckpt", sit_ckpt, "--sampler", "ode", "--sampling-method", "Heun"], "SDE method")):
        with pytest.raises(TinyFusionError, match=message):
            sample.main(sample.parse_args([*PIXEL, *flags, "--out", out]))
    with monkeypatch.context() as without:  # an install without torchdiffeq: refused before any work
        without.setitem(sys.modules, "torchdiffeq", None)
        with pytest.raises(TinyFusionError, match="torchdiffeq package, one of the requirements"):
            sample.main(sample.parse_args([*PIXEL, "--ckpt", sit_ckpt, "--sampler", "ode", "--out", out]))
    assert not os.path.exists(out)


def test_sample_ddp_sit_npz_names_its_sampler_and_ignores_the_batch_size(tmp_path):
    import numpy as np

    import sample_ddp
    _, ckpt = save_xs4(tmp_path / "sit.pt", "SiT")
    flags = [*PIXEL, "--ckpt", ckpt, "--sampler", "sde", "--num-sampling-steps", "4", "--num-fid-samples", "5"]
    for batch in ("4", "2"):
        sample_ddp.main(sample_ddp.parse_args([*flags, "--per-proc-batch-size", batch,
                                               "--sample-dir", str(tmp_path / batch)]))
    name = "SiT-XS-4-sit-size-8-vae-none-cfg-1.5-seed-0-steps-4-sde-Euler-sigma-1.0-Mean-0.04.npz"
    with np.load(tmp_path / "4" / name) as four, np.load(tmp_path / "2" / name) as two:
        assert four["arr_0"].shape == (5, 8, 8, 3) and np.array_equal(four["labels"], two["labels"])
        assert np.abs(four["arr_0"].astype(int) - two["arr_0"].astype(int)).max() <= 1
        assert len(np.unique(four["arr_0"])) > 50


@pytest.mark.parametrize("mismatch", ["family", "size"])
def test_sample_ddp_refuses_a_family_or_size_mismatch_before_making_its_folder(tmp_path, mismatch):
    import sample_ddp
    from tinyfusion.errors import TinyFusionError
    _, dit_ckpt = save_xs4(tmp_path / "dit.pt", "DiT")
    model, size, extra = ("SiT-XS/4", "8", ["--sampler", "ode"]) if mismatch == "family" else ("DiT-XS/4", "16", [])
    samples = tmp_path / "samples"
    args = sample_ddp.parse_args(["--model", model, "--image-size", size, "--vae", "none", "--num-classes", "10",
                                  "--ckpt", dit_ckpt, "--num-fid-samples", "4", "--per-proc-batch-size", "4",
                                  "--sample-dir", str(samples), "--num-sampling-steps", "2", *extra])
    with pytest.raises(TinyFusionError) as error:
        sample_ddp.main(args)
    assert "\n" not in str(error.value)
    assert ("holds DiT weights" if mismatch == "family" else "does not fit --model DiT-XS/4") in str(error.value)
    assert not samples.exists()

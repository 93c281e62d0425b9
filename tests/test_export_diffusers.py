"""export_diffusers.py: the exported DiTTransformer2DModel predicts the same noise and variance as
our DiT (XL-shaped with a small hidden size, and a pruned-depth checkpoint), and the pipeline
folder loads with DiTPipeline.from_pretrained and samples an image.

Every parameter is re-randomised (our init zeroes the adaLN and final layers, which would make
both models output zeros whatever the mapping)."""
import json
import math
import os

import pytest
import torch

from tinyfusion.errors import TinyFusionError
import models
from tinyfusion.io.checkpoints import save_checkpoint, save_pruned_model
from export_diffusers import main, match_original_timestep_embedding, parse_args, to_diffusers_transformer
from models import DiT_models, prune_to_kept_blocks
from tiny_vae import make_tiny_vae

diffusers = pytest.importorskip("diffusers")

SMALL_XL = dict(hidden_size=96, num_heads=16)  # XL's 28 blocks and 16 heads, hidden 96 instead of 1152


def use_small_xl(monkeypatch):
    """Make `--model DiT-XL/2` build the small-hidden XL, so the whole CLI runs on it."""
    original = DiT_models["DiT-XL/2"]

    def build(**kwargs):
        return original(**{**SMALL_XL, **kwargs})
    build.family, build.patch_size, build.default_groups = original.family, original.patch_size, None
    build.model_class = original.model_class
    monkeypatch.setitem(models.DiT_models, "DiT-XL/2", build)
    monkeypatch.setitem(models.ALL_MODELS, "DiT-XL/2", build)


def randomise(model, seed):
    """Random non-zero values for every trained parameter (pos_embed is the fixed sin-cos table)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "pos_embed":
                continue
            scale = 1 / math.sqrt(parameter[0].numel()) if parameter.dim() > 1 else 0.2
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def compare(model, folder, null_label_in_diffusers):
    """Max abs differences (eps half, variance half) between our model and the exported
    transformer with DiT's timestep frequencies, and the eps difference of a stock load."""
    from diffusers import DiTTransformer2DModel
    transformer = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, model.in_channels, model.input_size, model.input_size, generator=generator)
    t = torch.tensor([0, 1, 417, 999])
    ours_y = torch.tensor([0, model.num_classes - 1, 3, model.num_classes])  # the last one is the null class
    diffusers_y = torch.where(ours_y == model.num_classes, null_label_in_diffusers, ours_y)
    with torch.no_grad():
        ours = model(x, t, ours_y)
        stock = transformer(x, timestep=t, class_labels=diffusers_y).sample
        theirs = match_original_timestep_embedding(transformer)(x, timestep=t, class_labels=diffusers_y).sample
    assert ours.shape == theirs.shape == (4, 2 * model.in_channels, model.input_size, model.input_size)
    assert ours.abs().mean() > 0.05  # random weights: a real signal to compare
    channels = model.in_channels
    eps_diff = (ours[:, :channels] - theirs[:, :channels]).abs().max().item()
    var_diff = (ours[:, channels:] - theirs[:, channels:]).abs().max().item()
    return eps_diff, var_diff, (ours - stock).abs().max().item(), transformer


def test_xl_shaped_export_matches_noise_and_variance(tmp_path, monkeypatch, capsys):
    use_small_xl(monkeypatch)
    model = randomise(DiT_models["DiT-XL/2"](input_size=8), seed=0)  # 1000 classes, as DiT-XL/2
    ckpt = tmp_path / "xl.pt"
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict()}, ckpt)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    argv = ["--model", "DiT-XL/2", "--image-size", "64", "--ckpt", str(ckpt), "--out", str(out)]

    with pytest.raises(TinyFusionError, match="already exists.*--overwrite"):
        main(parse_args(argv))
    assert (out / "keep.txt").exists()

    main(parse_args(argv + ["--overwrite"]))
    message = capsys.readouterr().out
    assert "only the transformer" in message and "--vae-path" in message
    assert not (out / "keep.txt").exists() and not (out / "model_index.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["exported", "xl.pt"]  # no temp or set-aside folders left

    eps_diff, var_diff, stock_diff, transformer = compare(model, out, null_label_in_diffusers=1000)
    assert transformer.config.num_layers == 28 and transformer.config.num_embeds_ada_norm == 1000
    assert eps_diff <= 1e-4 and var_diff <= 1e-4, (eps_diff, var_diff)
    # diffusers' own k/127 timestep frequencies really differ: the fix above is what makes the match
    assert stock_diff > 1e-3


def test_pruned_depth_export_and_pipeline(tmp_path, monkeypatch, capsys):
    use_small_xl(monkeypatch)
    teacher = randomise(DiT_models["DiT-XL/2"](input_size=8, depth=8, num_classes=10), seed=2)
    kept_indices = [0, 3, 4, 7]
    pruned = prune_to_kept_blocks(teacher, kept_indices).eval()
    ckpt = tmp_path / "pruned.pt"
    save_pruned_model(pruned, ckpt, dict(kept_indices=kept_indices, source_model="DiT-XL/2"))
    vae_path = make_tiny_vae(tmp_path / "vae")
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps({str(i): f"class{i}, alias{i}" for i in range(10)}))
    out = tmp_path / "pipeline"

    main(parse_args(["--model", "DiT-XL/2", "--image-size", "64", "--num-classes", "10", "--vae-path", vae_path,
                     "--ckpt", str(ckpt), "--out", str(out), "--id2label", str(labels_file)]))
    assert "DiTPipeline" in capsys.readouterr().out
    assert json.loads((out / "tinyfusion_export.json").read_text())["pruning_metadata"]["kept_indices"] == kept_indices

    # 10 classes: DiTPipeline's hard-coded null label 1000 must reach our null row
    eps_diff, var_diff, _, transformer = compare(pruned, out, null_label_in_diffusers=1000)
    assert transformer.config.num_layers == 4
    assert eps_diff <= 1e-4 and var_diff <= 1e-4, (eps_diff, var_diff)

    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.get_label_ids(["alias7", "class2"]) == [7, 2]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[7, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # default guidance 4.0 runs the null class
    assert images.shape == (2, 64, 64, 3)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_refuses_a_learned_position_table():
    model = randomise(DiT_models["DiT-S/2"](input_size=4, hidden_size=32, num_heads=2, depth=1), seed=3)
    with torch.no_grad():
        model.pos_embed.add_(0.01)
    with pytest.raises(TinyFusionError, match="pos_embed differs from the fixed 2-D sin-cos table"):
        to_diffusers_transformer(model)


def use_small(monkeypatch, name):
    """Make `--model name` (plain or gated) build the small-hidden XL."""
    original = DiT_models[name]

    def build(**kwargs):
        return original(**{**SMALL_XL, **kwargs})
    build.family, build.patch_size, build.default_groups = original.family, original.patch_size, original.default_groups
    build.model_class = original.model_class
    monkeypatch.setitem(models.DiT_models, name, build)
    monkeypatch.setitem(models.ALL_MODELS, name, build)


def test_gated_export_needs_trained_gates_and_records_kept_blocks(tmp_path, monkeypatch):
    from tinyfusion.errors import TinyFusionError
    use_small(monkeypatch, "DiT-D14/2")
    use_small(monkeypatch, "DiT-D14-1-2")  # 14 blocks, 7 x [1, 2]
    plain = randomise(DiT_models["DiT-D14/2"](input_size=8, num_classes=10), seed=4)
    ckpt = tmp_path / "plain.pt"
    save_checkpoint(plain.state_dict(), ckpt)
    flags = ["--image-size", "64", "--num-classes", "10"]
    # plain weights in a gated config: the gates keep their untrained, tied init
    with pytest.raises(TinyFusionError, match="group 0 .* were never trained: its 2 best candidates tie"):
        main(parse_args(["--model", "DiT-D14-1-2", "--ckpt", str(ckpt), "--out", str(tmp_path / "never"), *flags]))
    assert not (tmp_path / "never").exists()

    gated = DiT_models["DiT-D14-1-2"](input_size=8, num_classes=10)
    gated.load_state_dict({**plain.state_dict(), **{k: v for k, v in gated.state_dict().items() if "gate" in k}})
    with torch.no_grad():  # trained gates: keep the first block of even groups, the second of odd ones
        for index, logits in enumerate(gated.gate_logits):
            logits.copy_(torch.tensor([1.0, -1.0]) if index % 2 == 0 else torch.tensor([-1.0, 1.0]))
    expected = [2 * g + (g % 2) for g in range(7)]
    assert gated.kept_indices() == expected
    gated_ckpt = tmp_path / "gated.pt"
    save_checkpoint({"model": gated.state_dict(), "ema": gated.state_dict()}, gated_ckpt)
    out = tmp_path / "gated-export"
    main(parse_args(["--model", "DiT-D14-1-2", "--ckpt", str(gated_ckpt), "--out", str(out), *flags]))
    info = json.loads((out / "tinyfusion_export.json").read_text())
    assert info["kept_blocks"] == expected and info["source_depth"] == 14 and info["depth"] == 7
    from safetensors.torch import load_file
    exported = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    for slot, block in enumerate(expected):  # exported layer i is the kept block expected[i]
        assert torch.equal(exported[f"transformer_blocks.{slot}.ff.net.2.weight"], plain.state_dict()[f"blocks.{block}.mlp.fc2.weight"])


def diffusers_warnings(action):
    """The messages diffusers logs (its logger does not propagate to the root) while running action."""
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        result = action()
    finally:
        logger.removeHandler(handler)
    return result, [record.getMessage() for record in records]


def test_load_pipeline_checks_labels_and_matches_our_ddim_settings(tmp_path, monkeypatch):
    from diffusers import DiTPipeline

    from diffusion import create_diffusion
    from export_diffusers import load_pipeline
    from tinyfusion.sampling.generate import generate
    from tinyfusion.io.vae import load_vae
    use_small_xl(monkeypatch)
    model = randomise(DiT_models["DiT-XL/2"](input_size=8, depth=3, num_classes=10), seed=6)
    ckpt = tmp_path / "small.pt"
    save_pruned_model(model, ckpt, dict(kept_indices=[0, 1, 2], source_model="DiT-XL/2"))
    vae_path = make_tiny_vae(tmp_path / "vae")
    out = tmp_path / "pipeline"
    main(parse_args(["--model", "DiT-XL/2", "--image-size", "64", "--num-classes", "10", "--vae-path", vae_path,
                     "--ckpt", str(ckpt), "--out", str(out)]))

    _, stock_messages = diffusers_warnings(lambda: DiTPipeline.from_pretrained(out))
    assert any("id2label" in message for message in stock_messages)  # diffusers' own load warns
    pipe, messages = diffusers_warnings(lambda: load_pipeline(out))
    assert not any("id2label" in message for message in messages), messages
    assert pipe.get_label_ids(["3"]) == [3]
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"class labels \[10, 999\] are outside this model's 10 classes"):
        pipe(class_labels=[2, 10, 999], num_inference_steps=2)

    # the documented settings: DDIM, diffusers' "leading" timesteps, every channel guided, same x_T
    seed, steps, cfg = 11, 10, 4.0
    theirs = pipe(class_labels=[7], num_inference_steps=steps, guidance_scale=cfg,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    vae = load_vae("ema", vae_path)

    def ours(spacing, all_channels):
        images = generate(model, create_diffusion(spacing + str(steps)), [7], [torch.Generator().manual_seed(seed)],
                          cfg_scale=cfg, sampler="ddim", vae=vae, guide_all_channels=all_channels)
        return (images / 2 + 0.5).clamp(0, 1)
    assert (ours("leading", True) - theirs).abs().max().item() <= 1e-4
    # each of the two settings matters: DiT's 3-channel guidance or DiT's spacing give other images
    assert (ours("leading", False) - theirs).abs().max().item() > 1e-3
    assert (ours("", True) - theirs).abs().max().item() > 1e-3


def test_a_prune_by_learning_run_checkpoint_exports_what_its_save_model_output_exports(tmp_path, monkeypatch):
    """A real search checkpoint (gate logits + LoRA factors only) is exported by applying its EMA
    decision to the run's --load-weight: the same transformer as the run's own pruned.pt gives."""
    import prune_by_learning
    from safetensors.torch import load_file
    from tests.prune_helpers import make_digits_features, save_plain, xs_model
    monkeypatch.chdir(tmp_path)
    _, features = make_digits_features(str(tmp_path))
    teacher = xs_model(depth=4)
    save_plain(teacher, tmp_path / "teacher.pt")
    flags = ["--image-size", "8", "--vae", "none", "--num-classes", "10"]
    prune_by_learning.main(prune_by_learning.parse_args([
        "--model", "DiT-XS/4", "--groups", "[[1,2]]*2", "--load-weight", "teacher.pt", "--data-path", features,
        "--global-batch-size", "8", "--num-workers", "0", "--max-steps", "4", "--ema-decay", "0.5", "--delta-w",
        "--lora", "--lora-rank", "4", "--prefix", "search", *flags]))
    run_ckpt = tmp_path / "outputs/search-DiT-XS-4/checkpoints/0000004.pt"
    saved = torch.load(run_ckpt, weights_only=True)
    assert not any(key.startswith("blocks.") and key.endswith(".qkv.weight") for key in saved["ema"])  # no model
    kept = saved["kept_indices"]

    main(parse_args(["--model", "DiT-XS/4", "--ckpt", str(run_ckpt), "--out", "from-run", *flags]))
    main(parse_args(["--model", "DiT-XS/4", "--ckpt", "outputs/search-DiT-XS-4/pruned.pt", "--out", "from-pruned",
                     *flags]))
    from_run = load_file("from-run/transformer/diffusion_pytorch_model.safetensors")
    from_pruned = load_file("from-pruned/transformer/diffusion_pytorch_model.safetensors")
    assert from_run.keys() == from_pruned.keys()
    assert all(torch.equal(from_run[key], from_pruned[key]) for key in from_run)
    for slot, block in enumerate(kept):  # exported layer i is the teacher's kept block, not a LoRA-updated one
        assert torch.equal(from_run[f"transformer_blocks.{slot}.ff.net.2.weight"],
                           teacher.state_dict()[f"blocks.{block}.mlp.fc2.weight"])
    info = json.loads((tmp_path / "from-run/tinyfusion_export.json").read_text())
    assert info["kept_blocks"] == kept and info["source_checkpoint"] == str(tmp_path / "teacher.pt")

    # from another folder the run's relative --load-weight is not found: one line naming the file to export
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(TinyFusionError) as error:
        main(parse_args(["--model", "DiT-XS/4", "--ckpt", str(run_ckpt), "--out", "never", *flags]))
    message = str(error.value)
    assert "\n" not in message and "--load-weight teacher.pt, which does not exist here" in message
    assert "(--save-model, here outputs/search-DiT-XS-4/pruned.pt) with --model DiT-XS/4" in message
    assert not (elsewhere / "never").exists()

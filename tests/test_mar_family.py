"""The MAR family (tinyfusion/families/mar.py): MAR's masking distribution, its unmasking and
guidance schedules against hand-computed values, Masked KD on one shared draw, the layer map
within block lists, gates over both lists, world-size-invariant generation and bit-exact resume."""
import json
import math
import os

import pytest
import torch

import train
import train_masked_kd
from diffusion.distillation import span_end_layer_map
from models import MAR_models, prune_to_kept_blocks
from test_train import assert_same_tensors, checkpoint
from test_train import parse as train_parse
from tinyfusion.errors import TinyFusionError
from tinyfusion.families import mar
from tinyfusion.families.build import build_model
from tinyfusion.io.checkpoints import save_checkpoint, save_pruned_model, with_metadata
from tinyfusion.sampling.generate import generate, sample_generator
from training_helpers import COMMON_FLAGS, IMAGE_SIZE, make_digits_store, run_interrupted_in_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MODEL = "MAR-XS/2"  # 8x8 pixels in 2x2 patches: 16 tokens of 12 channels


def tiny_mar(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MAR_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10, **kwargs)
    with torch.no_grad():  # the head starts as zero output: give it some weight so it predicts something
        for parameter in model.head.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape))
    return model


# ------------------------------------------------------------------ masking and schedules
def test_mask_ratio_is_the_truncated_gaussian_of_mar():
    """N(1, 0.25^2) truncated to [0.7, 1]: mean 1 + 0.25 (phi(a) - phi(0)) / (Phi(0) - Phi(a)), a = -1.2."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([mar.draw_mask_ratio(0.7, generator) for _ in range(20000)], dtype=torch.float64)
    a = -1.2
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    big_phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    mean = 1 + 0.25 * (phi(a) - phi(0)) / (big_phi(0) - big_phi(a))  # 0.8673...
    assert abs(mean - 0.8673) < 1e-3
    assert float(draws.min()) >= 0.7 and float(draws.max()) <= 1.0
    assert abs(float(draws.mean()) - mean) < 4 * float(draws.std()) / math.sqrt(len(draws))


def test_training_mask_hides_ceil_of_the_ratio_in_each_random_order():
    generator = torch.Generator().manual_seed(1)
    mask = mar.training_mask(5, 16, 0.7, "cpu", generator)
    replay = torch.Generator().manual_seed(1)
    orders = mar.random_orders(5, 16, "cpu", replay)
    hidden = math.ceil(16 * mar.draw_mask_ratio(0.7, replay))
    assert mask.sum(dim=1).tolist() == [hidden] * 5
    for row, order in zip(mask, orders):
        assert row[order[:hidden]].eq(1).all() and row[order[hidden:]].eq(0).all()


def test_unmasking_and_guidance_schedules_hand_computed():
    # L = 16, 4 steps: floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11, floor(16 cos(3pi/8)) = 6, then 1
    hidden, left = [], 16
    for step in range(4):
        left = mar.tokens_still_hidden(step, 4, 16, left)
        hidden.append(left)
    assert hidden == [14, 11, 6, 1]
    assert mar.tokens_still_hidden(0, 64, 16, 16) == 15  # floor(16 cos(pi/128)) = 15, at most 16 - 1
    assert mar.tokens_still_hidden(10, 64, 16, 1) == 1  # never below one before the last step
    assert mar.guidance_at(3.0, "linear", 16, 14) == pytest.approx(1.25)  # 1 + 2 * 2 / 16
    assert mar.guidance_at(3.0, "constant", 16, 14) == 3.0


def test_sampling_predicts_the_scheduled_tokens_each_step_and_fills_every_token():
    model = tiny_mar().eval()
    rows_per_call = []
    original = model.head.forward

    def counting(x, t, c):
        rows_per_call.append(len(x))
        return original(x, t, c)
    model.head.forward = counting
    process = mar.Family().sampling_process("mar", 2, None, None)
    generators = [sample_generator(0, i) for i in range(2)]
    latents = mar.sample_tokens(model, process, torch.tensor([1, 2]), generators, cfg_scale=1.0,
                                amp=(torch.float32, "cpu"), num_iter=4, cfg_schedule="linear", temperature=1.0)
    # 2 head steps per generation step; 2 samples x (16-14, 14-11, 11-6, 6) tokens
    assert rows_per_call == [4, 4, 6, 6, 10, 10, 12, 12]
    assert latents.shape == (2, 3, 8, 8) and bool((latents != 0).all())


def test_generation_does_not_depend_on_the_batch():
    """Sample i's order and head noise come from its own generator: one batch of 3 equals
    batches of 2 and 1 at the same padded batch shape, bit for bit (also with guidance)."""
    model = tiny_mar().eval()
    process = mar.Family().sampling_process("mar", 3, None, None)
    options = dict(num_iter=4, cfg_schedule="linear", temperature=0.9)
    for cfg in (1.0, 2.5):
        whole = generate(model, process, [3, 1, 4], [sample_generator(7, i) for i in range(3)], cfg, "mar",
                         pad_to=4, flow_options=options)
        first = generate(model, process, [3, 1], [sample_generator(7, i) for i in range(2)], cfg, "mar",
                         pad_to=4, flow_options=options)
        last = generate(model, process, [4], [sample_generator(7, 2)], cfg, "mar", pad_to=4, flow_options=options)
        assert torch.equal(whole, torch.cat([first, last]))


# ------------------------------------------------------------------ Masked KD and pruning
def test_kd_of_a_model_with_itself_is_zero_and_its_gt_is_the_training_loss():
    """Eval mode (no dropout): the teacher's and the student's passes see one draw of order,
    mask, drops, t and noise, so a model distilled from itself has kd = feat = 0 exactly, and
    gt is the training loss of the same draws."""
    model = tiny_mar().eval()
    family = mar.Family()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    kd = family.kd_losses(model, model, x, y, alpha=0.5, beta=1.0, mask_sigma=2.0, layer_pairs=[(0, 0), (5, 5)])
    torch.manual_seed(5)
    plain = family.training_losses(model, x, y)
    assert float(kd["kd"].detach()) == 0.0 and float(kd["feat"].detach()) == 0.0
    assert float(kd["gt"]) == pytest.approx(float(plain["loss"]), rel=1e-6)
    assert float(kd["loss"]) == pytest.approx(0.5 * float(plain["loss"]), rel=1e-6)


def test_span_end_layer_map_stays_within_each_block_list():
    assert span_end_layer_map([0, 3, 4, 7], 8, [4, 4]) == [(0, 2), (1, 3), (2, 6), (3, 7)]
    # encoder block 0 replaces encoder blocks 0..3 (not up to decoder block 4)
    assert span_end_layer_map([0, 5], 8, [4, 4]) == [(0, 3), (1, 7)]
    assert span_end_layer_map([0, 5], 8) == [(0, 4), (1, 7)]  # one list (DiT): unchanged


def test_gates_cover_both_lists_and_a_group_may_not_span_them():
    with pytest.raises(TinyFusionError, match="spans the boundary at block 6"):
        build_model(MODEL, IMAGE_SIZE, 10, "none", groups=[[1, 5], [1, 7]])
    model = tiny_mar(groups=[[1, 2]] * 6).eval()
    with torch.no_grad():
        for logits, choice in zip(model.gate_logits, [1, 0, 0, 1, 0, 1]):
            logits.copy_(torch.tensor([0.0, 1.0]) if choice else torch.tensor([1.0, 0.0]))
    assert model.kept_indices() == [1, 2, 4, 7, 8, 11]
    pruned = prune_to_kept_blocks(model, model.kept_indices()).eval()  # eval: MAR's blocks have dropout
    assert (pruned.encoder_depth, pruned.decoder_depth) == (3, 3)
    tokens, y = torch.randn(2, 16, 12), torch.tensor([3, 10])
    mask = mar.mask_first(torch.arange(16).repeat(2, 1), 12)
    with torch.no_grad():  # eval: the gated model runs its decided blocks, as the pruned copy does
        assert torch.allclose(model(tokens, y, mask), pruned(tokens, y, mask), atol=1e-6)


# ------------------------------------------------------------------ bit-exact resume
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mar")
    features = make_digits_store(str(folder))
    teacher_model = tiny_mar()
    teacher = str(folder / "teacher.pt")
    save_checkpoint(with_metadata(teacher_model.state_dict(), {"model_family": "MAR"}), teacher)
    student = str(folder / "student.pt")
    save_pruned_model(prune_to_kept_blocks(teacher_model, [0, 3, 6, 9]), student,
                      dict(kept_indices=[0, 3, 6, 9], source_depth=12, model_family="MAR"))
    return {"features": features, "teacher": teacher, "student": student}


def parse(script, workspace, results, *extra):
    return train_parse(script, workspace, results, *extra, model=MODEL)


@pytest.mark.parametrize("script, loss_name", [(train, "training_losses"), (train_masked_kd, "kd_losses")])
def test_interrupted_mar_run_resumes_bit_exactly(workspace, tmp_path, monkeypatch, script, loss_name):
    flags = ["--load-weight", workspace["student"], "--max-steps", "8", "--ckpt-every", "3", "--log-every", "1"]
    script.main(parse(script, workspace, tmp_path / "a", *flags))
    run_interrupted_in_step(monkeypatch, mar.Family, loss_name, 5,
                            lambda: script.main(parse(script, workspace, tmp_path / "b", *flags)))
    script.main(parse(script, workspace, tmp_path / "b", *flags, "--resume", "auto"))
    run = "run-MAR-XS-2"
    final_a = checkpoint(tmp_path / "a" / run / "checkpoints" / "0000008.pt")
    final_b = checkpoint(tmp_path / "b" / run / "checkpoints" / "0000008.pt")
    for key in ("model", "ema", "opt", "rng"):
        assert_same_tensors(final_a[key], final_b[key], key)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / side / run / "metrics.jsonl"))}
              for side in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert os.path.isfile(tmp_path / "b" / run / "checkpoints" / "0000006.pt")


def test_mar_s_own_checkpoint_format_loads_its_ema_and_refuses_another_family(tmp_path):
    """MAR's checkpoint-last.pth: {"model", "model_ema", "optimizer", "epoch", "args": Namespace};
    ours reads model_ema (model with use_ema=False), and tells --model DiT-... which family to pass."""
    import argparse
    raw, ema = tiny_mar(seed=1), tiny_mar(seed=2)
    path = str(tmp_path / "checkpoint-last.pth")
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "optimizer": {"state": {}}, "epoch": 3,
                "args": argparse.Namespace(model="mar_base", vae_embed_dim=3)}, path)
    built, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=path)
    assert all(torch.equal(built.state_dict()[key], value) for key, value in ema.state_dict().items())
    built, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=path, use_ema=False)
    assert all(torch.equal(built.state_dict()[key], value) for key, value in raw.state_dict().items())
    with pytest.raises(TinyFusionError, match=r"holds MAR weights but --model DiT-XS/2 is a DiT; pass a --model of "
                                              r"the MAR family \(MAR-\.\.\.\)"):
        build_model("DiT-XS/2", IMAGE_SIZE, 10, "none", ckpt=path)


def test_sample_ddp_two_ranks_match_one_for_a_mar(workspace, tmp_path):
    """Acceptance: 2 gloo ranks x 3 per process give the same images and labels as 1 rank x 3,
    with guidance (MAR's linear schedule) and a temperature."""
    import glob

    import numpy as np

    import sample_ddp
    from training_helpers import torchrun
    flags = ["--model", MODEL, *COMMON_FLAGS[:6], "--ckpt", workspace["teacher"], "--num-fid-samples", "7",
             "--per-proc-batch-size", "3", "--num-sampling-steps", "4", "--num-iter", "5", "--cfg-scale", "2.0",
             "--temperature", "0.9"]
    sample_ddp.main(sample_ddp.parse_args([*flags, "--sample-dir", str(tmp_path / "one")]))
    result = torchrun("sample_ddp.py", [*flags, "--sample-dir", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*.npz")), glob.glob(str(tmp_path / "two" / "*.npz"))
    assert "-steps-4-" in one and "-iter-5-temp-0.9" in one
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (7, 8, 8, 3)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_head_spacing_is_mar_s_by_default_and_leading_on_request():
    """MAR's respacing starts at t = 999 (alpha_bar 2.4e-9): its first step multiplies the head's
    noise error by beta / sqrt(alpha (1 - alpha_bar)) = 632 at 50 steps; leading spacing (ours)
    starts at t = 980, where the factor is 1.6."""
    from tinyfusion.flags import resolve_timestep_spacing
    family = mar.Family()

    def first_step_factor(process):
        beta = float(process.betas[-1])
        return beta / math.sqrt((1 - beta) * (1 - float(process.alphas_cumprod[-1])))
    mar_s, leading = (family.sampling_process("mar", 50, spacing, None) for spacing in ("dit", "leading"))
    assert (mar_s.timestep_map[0], mar_s.timestep_map[-1]) == (0, 999)
    assert (leading.timestep_map[0], leading.timestep_map[-1]) == (0, 980)
    assert first_step_factor(mar_s) == pytest.approx(632.35, abs=0.01)
    assert first_step_factor(leading) == pytest.approx(1.565, abs=0.001)
    assert resolve_timestep_spacing("mar", None) == "dit"
    with pytest.raises(ValueError, match="does not fit --sampler mar"):
        resolve_timestep_spacing("mar", "trailing")

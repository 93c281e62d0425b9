"""The TinyFusion pipeline on a tiny SiT (random init, 8x8 pixel-space digits): every script runs
(train, prune_by_learning, prune_by_score, prune_by_index, train_masked_kd, sample, sample_ddp),
the loop's loss is SiT's transport loss (checked against SiT's closed forms on a fixed batch),
resume is bit-exact, checkpoints record the family and the transport, the other family and other
interpolants are refused in one line, and 2 gloo ranks sample the same .npz as one. The default
suite runs the cheap checks; `-m slow` every script end to end, the Masked KD resume and the
2-rank sampling."""
import glob
import json
import math
import os

import numpy as np
import pytest
import torch

import prune_by_index
import prune_by_learning
import prune_by_score
import sample
import sample_ddp
import train
import train_masked_kd
from models import SiT, SiT_models
from test_models import randomize
from test_train import assert_same_tensors, checkpoint
from tinyfusion.families import sit
from tinyfusion.io.checkpoints import read_metadata, save_checkpoint, with_metadata
from tinyfusion.errors import TinyFusionError
from training_helpers import COMMON_FLAGS, IMAGE_SIZE, make_digits_store, run_interrupted_in_step, torchrun
from transport import create_transport
from transport.distillation import transport_kd_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "SiT-XS/4"
PIXELS = ["--image-size", str(IMAGE_SIZE), "--vae", "none", "--num-classes", "10"]
RUN = "run-SiT-XS-4"


def tiny_sit(depth=12, seed=0, **kw):
    """A SiT-XS/4 on 8x8 RGB digits with every weight random (with adaLN-Zero's init every block
    would be the identity and the output zero)."""
    return randomize(SiT_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10, depth=depth, **kw),
                     std=0.05, seed=seed)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Digits features, a 12-block SiT-XS/4 teacher (a plain state dict that records its family)
    and a 2-block student pruned from it (pruned metadata, as prune_by_index.py writes)."""
    folder = tmp_path_factory.mktemp("sit")
    features = make_digits_store(str(folder), limit=32)  # 4 batches of 8 per epoch
    teacher_path = str(folder / "teacher.pt")
    save_checkpoint(with_metadata(tiny_sit().state_dict(), {"model_family": "SiT"}), teacher_path)
    student_path = str(folder / "student.pt")
    prune_by_index.main(prune_by_index.parse_args(["--model", MODEL, "--ckpt", teacher_path, "--kept-indices",
                                                   "[0, 2]", "--save-model", student_path, *PIXELS]))
    return {"folder": folder, "features": features, "teacher": teacher_path, "student": student_path}


def training_flags(workspace, results, *extra, model=MODEL):
    return ["--model", model, "--data-path", workspace["features"], "--results-dir", str(results),
            "--global-batch-size", "8", *COMMON_FLAGS, *extra]


def parse(script, workspace, results, *extra):
    flags = training_flags(workspace, results, *extra)
    if script is train_masked_kd:
        flags += ["--teacher", MODEL, "--load-teacher", workspace["teacher"]]
    return script.build_parser().parse_args(flags)


# ------------------------------------------------------------------ SiT's loss, independently
def closed_form_loss(model, x1, y, t, x0, path, prediction, weight):
    """SiT's loss written from its published closed forms (not transport/): Linear x_t = t x1 +
    (1 - t) x0, u = x1 - x0; GVP x_t = sin(a) x1 + cos(a) x0, a = pi t / 2, u = pi/2 (cos(a) x1 -
    sin(a) x0); noise target x0; w_velocity = (lam / sigma)^2 with lam = (1 - t) / t (Linear) and
    pi/2 cot(a) (GVP); per-sample means."""
    tt = t.view(-1, 1, 1, 1)
    if path == "Linear":
        xt, ut, sigma, lam = tt * x1 + (1 - tt) * x0, x1 - x0, 1 - tt, (1 - tt) / tt
    else:
        a = tt * math.pi / 2
        xt, ut = torch.sin(a) * x1 + torch.cos(a) * x0, math.pi / 2 * (torch.cos(a) * x1 - torch.sin(a) * x0)
        sigma, lam = torch.cos(a), math.pi / 2 / torch.tan(a)
    out = model(xt, t, y)
    if prediction == "velocity":
        return ((out - ut) ** 2).mean(dim=(1, 2, 3))
    w = (lam / sigma) ** 2 if weight == "velocity" else 1.0
    return (w * (out - x0) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("path, prediction, weight", [("Linear", "velocity", None), ("GVP", "noise", "velocity")])
def test_the_training_loss_is_sits_closed_form_on_a_fixed_batch(path, prediction, weight):
    """A SiT family's training_losses (what the loop minimises for a SiT) draws t ~ U[t0, t1] then x0 from
    the global generator (as SiT, in that order on the CPU) and returns SiT's loss."""
    torch.manual_seed(0)
    model = tiny_sit().eval()
    x1, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 3, 5, 7, 9])
    transport = create_transport(path, prediction, weight)
    t0, t1 = (0.0, 1.0) if prediction == "velocity" else (1e-3, 1 - 1e-3)
    torch.manual_seed(7)
    got = sit.Family(transport).training_losses(model, x1, y)
    torch.manual_seed(7)
    t = torch.rand(5) * (t1 - t0) + t0
    x0 = torch.randn(5, 3, 8, 8)
    expected = closed_form_loss(model, x1, y, t, x0, path, prediction, weight).mean()
    assert expected > 0.01
    torch.testing.assert_close(got["loss"], expected, rtol=1e-6, atol=0)


def test_the_loop_minimises_and_logs_exactly_that_loss(workspace, tmp_path, monkeypatch):
    """Inside train.py's loop: each step's loss (with the model in train mode, label dropout
    included) equals the closed form recomputed from the same generator state, and is the
    logged loss."""
    real, recomputed = sit.Family.training_losses, []

    def checked(family, model, x, y):
        state = torch.get_rng_state()
        result = real(family, model, x, y)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        with torch.no_grad():
            t, x0 = torch.rand(len(x)), torch.randn(x.shape)
            recomputed.append((closed_form_loss(model, x, y, t, x0, "Linear", "velocity", None).mean().item(),
                               result["loss"].item()))
        torch.set_rng_state(after)
        return result
    monkeypatch.setattr(sit.Family, "training_losses", checked)
    train.main(parse(train, workspace, tmp_path, "--load-weight", workspace["teacher"], "--max-steps", "3",
                     "--log-every", "1"))
    logged = [json.loads(line)["loss"] for line in open(tmp_path / RUN / "metrics.jsonl")]
    assert len(recomputed) == 3
    for (expected, got), log in zip(recomputed, logged):
        assert got == pytest.approx(expected, rel=1e-5) and log == pytest.approx(got, rel=1e-6)


def test_kd_terms_by_hand():
    """transport_kd_losses: kd = mean((v_s - v_t)^2), gt = the student's velocity loss at the same
    x_t, feat the masked feature loss (mask off here: plain squared differences)."""
    torch.manual_seed(0)
    student, teacher = tiny_sit(depth=2, seed=1), tiny_sit(depth=4, seed=2)
    x1, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    t, x0 = torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, 3, 8, 8)
    drops = torch.tensor([0, 1, 0])
    got = transport_kd_losses(student, teacher, create_transport(), x1, y, alpha=0.9, beta=0.5, mask_sigma=0,
                              layer_pairs=[(0, 1), (1, 3)], class_dropout_prob=0.1, t=t, noise=x0,
                              force_drop_ids=drops)
    tt = t.view(-1, 1, 1, 1)
    xt = tt * x1 + (1 - tt) * x0
    out_s, h_s = student(xt, t, y, force_drop_ids=drops, hidden_indices=[0, 1])
    out_t, h_t = teacher(xt, t, y, force_drop_ids=drops, hidden_indices=[1, 3])
    kd = ((out_s - out_t) ** 2).mean()
    gt = ((out_s - (x1 - x0)) ** 2).mean()
    feat = (((h_s[0] - h_t[0]) ** 2).mean() + ((h_s[1] - h_t[1]) ** 2).mean()) / 2
    for name, value in (("kd", kd), ("gt", gt), ("feat", feat), ("loss", 0.9 * kd + 0.1 * gt + 0.5 * feat)):
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=0, msg=name)
    assert kd > 1e-3 and feat > 1e-3


# ------------------------------------------------------------------ resume, checkpoints
@pytest.mark.parametrize("script, loss_name", [(train, "training_losses"),
                                               pytest.param(train_masked_kd, "kd_losses",
                                                            marks=pytest.mark.slow)])
def test_interrupted_sit_run_resumed_with_auto_ends_with_the_same_weights(workspace, tmp_path, monkeypatch, script,
                                                                          loss_name):
    # 5 steps over 4-batch epochs, checkpoints at 2, 4, 5; the interrupted run dies in step 3
    flags = ["--load-weight", workspace["student"], "--max-steps", "5", "--ckpt-every", "2", "--log-every", "1",
             "--epochs", "3"]
    script.main(parse(script, workspace, tmp_path / "a", *flags))
    run_interrupted_in_step(monkeypatch, sit.Family, loss_name, 3,
                            lambda: script.main(parse(script, workspace, tmp_path / "b", *flags)))
    assert sorted(os.listdir(tmp_path / "b" / RUN / "checkpoints")) == ["0000002.pt"]
    script.main(parse(script, workspace, tmp_path / "b", *flags, "--resume", "auto"))
    final_a = checkpoint(tmp_path / "a" / RUN / "checkpoints" / "0000005.pt")
    final_b = checkpoint(tmp_path / "b" / RUN / "checkpoints" / "0000005.pt")
    for key in ("model", "ema", "opt", "sched", "train_steps", "epoch", "batches_into_epoch", "rng"):
        assert_same_tensors(final_a[key], final_b[key], key)
    assert (final_a["epoch"], final_a["batches_into_epoch"]) == (1, 1)  # the run crossed an epoch after resuming
    metrics = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / run / RUN / "metrics.jsonl"))}
               for run in ("a", "b")]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 5
    # the checkpoint records the family, the transport and the student's pruning
    metadata = read_metadata(final_a)
    assert metadata["model_family"] == "SiT" and metadata["kept_indices"] == [0, 2]
    assert metadata["transport"] == dict(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=0.0,
                                         sample_eps=0.0)
    # resuming with another interpolant is refused
    with pytest.raises(TinyFusionError, match="trained with --prediction velocity, not noise"):
        script.main(parse(script, workspace, tmp_path / "b", *flags, "--resume", "auto", "--prediction", "noise"))


# ------------------------------------------------------------------ every script, end to end
@pytest.mark.slow
def test_every_script_on_a_tiny_sit(workspace, tmp_path, capsys, monkeypatch):
    """train -> prune_by_learning / prune_by_score / prune_by_index -> train_masked_kd -> sample,
    sample_ddp: each writes a SiT that the next builds as a SiT."""
    results, teacher = tmp_path / "results", workspace["teacher"]
    train.main(parse(train, workspace, results, "--load-weight", teacher, "--max-steps", "2", "--prefix", "teacher"))
    trained = str(results / "teacher-SiT-XS-4" / "checkpoints" / "0000002.pt")
    from tinyfusion.families import sit
    calls, real_losses = [], sit.Family.training_losses
    monkeypatch.setattr(sit.Family, "training_losses", lambda *a: calls.append(1) or real_losses(*a))
    prune_by_learning.main(prune_by_learning.parse_args(training_flags(
        workspace, results, "--groups", "[[1,6]]*2", "--load-weight", trained, "--max-steps", "2", "--delta-w",
        "--lora", "--lora-rank", "2", "--prefix", "prune", "--save-model", str(tmp_path / "learned.pt"))))
    assert len(calls) == 2  # the gates learned on the transport loss
    prune_by_score.main(prune_by_score.parse_args([
        "--model", MODEL, "--ckpt", trained, "--features-path", workspace["features"], "--n-pruned", "10",
        "--nsamples", "8", "--batch-size", "4", "--save-model", str(tmp_path / "bi.pt"), *PIXELS,
        "--sample-grid", str(tmp_path / "bi.png"), "--num-sampling-steps", "3"]))
    assert "noised calibration samples, t in [0.0, 1.0] of the transport" in capsys.readouterr().out
    for pruned in ("learned.pt", "bi.pt"):
        metadata = read_metadata(checkpoint(tmp_path / pruned))
        assert metadata["model_family"] == "SiT" and metadata["transport"]["prediction"] == "velocity"
        assert len(metadata["kept_indices"]) == 2, pruned
    assert os.path.isfile(tmp_path / "bi.png")
    train_masked_kd.main(train_masked_kd.build_parser().parse_args(training_flags(
        workspace, results, "--load-weight", str(tmp_path / "learned.pt"), "--teacher", MODEL, "--load-teacher",
        trained, "--max-steps", "2", "--prefix", "kd")))
    student = str(results / "kd-SiT-XS-4" / "checkpoints" / "0000002.pt")
    sample.main(sample.parse_args(["--model", MODEL, "--ckpt", student, "--sampler", "ode", "--sampling-method",
                                   "euler", "--num-sampling-steps", "3", "--class-labels", "1", "2",
                                   "--out", str(tmp_path / "grid.png"), *PIXELS]))
    sample_ddp.main(sample_ddp.parse_args(["--model", MODEL, "--ckpt", student, "--sampler", "sde",
                                           "--num-sampling-steps", "3", "--num-fid-samples", "3",
                                           "--sample-dir", str(tmp_path / "samples"), *PIXELS]))
    (npz,) = glob.glob(str(tmp_path / "samples" / "*.npz"))
    with np.load(npz) as batch:
        assert batch["arr_0"].shape == (3, 8, 8, 3)
    from tinyfusion.families.build import build_model
    model, _ = build_model(MODEL, 8, 10, "none", ckpt=student)
    assert type(model) is SiT and model.depth == 2


def test_bi_calibration_of_a_sit_is_its_transports_noising(tmp_path):
    """The model sees x_t = t x1 + (1 - t) x0 with its t in [0, 1], t then x0 drawn per batch from
    the generator of --seed; the clean (DiT-timestep) calibration is refused for a SiT."""
    from tinyfusion.families import sit
    from tinyfusion.pruning.block_importance import bi_scores
    model = tiny_sit().eval()
    latents, labels = torch.randn(6, 3, 8, 8), torch.arange(6)
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append([v.clone() for v in inputs]))
    family = sit.Family(create_transport())
    bi_scores(model, latents, labels, family=family, calibration="noised", batch_size=4, seed=3)
    generator = torch.Generator().manual_seed(3)
    for (x, t, y), start in zip(seen, (0, 4)):
        x1 = latents[start:start + 4]
        expected_t = torch.rand(len(x1), generator=generator)
        x0 = torch.randn(x1.shape, generator=generator)
        torch.testing.assert_close(t, expected_t, rtol=0, atol=0)
        torch.testing.assert_close(x, expected_t.view(-1, 1, 1, 1) * x1 + (1 - expected_t.view(-1, 1, 1, 1)) * x0)
        assert torch.equal(y, labels[start:start + 4])
    with pytest.raises(TinyFusionError, match="a SiT is calibrated on its transport's noised inputs"):
        prune_by_score.main(prune_by_score.parse_args(["--model", MODEL, "--ckpt", str(tmp_path / "sit.pt"),
                                                       "--features-path", str(tmp_path), "--calibration", "clean",
                                                       *PIXELS]))


# ------------------------------------------------------------------ one-line refusals
def test_the_other_family_and_another_interpolant_are_refused_in_one_line(workspace, tmp_path):
    from tinyfusion.io.checkpoints import save_pruned_model
    from models import DiT_models
    dit = str(tmp_path / "dit.pt")
    save_pruned_model(DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=2), dit,
                      {"kept_indices": [0, 1], "method": "test"})
    noise_sit = str(tmp_path / "noise.pt")  # a SiT that records another prediction
    save_checkpoint(with_metadata(tiny_sit().state_dict(), {"model_family": "SiT", "transport": dict(
        path_type="Linear", prediction="noise")}), noise_sit)
    cases = [
        (lambda: train.main(parse(train, workspace, tmp_path, "--load-weight", dit)),
         "holds DiT weights but --model SiT-XS/4 is a SiT; pass --model DiT-XS/4"),
        (lambda: train.main(train.build_parser().parse_args(
            training_flags(workspace, tmp_path, "--load-weight", workspace["teacher"], model="DiT-XS/4"))),
         "holds SiT weights but --model DiT-XS/4 is a DiT"),
        (lambda: train.main(train.build_parser().parse_args(
            training_flags(workspace, tmp_path, "--path-type", "GVP", model="DiT-XS/4"))),
         "--path-type is a SiT flag; --model DiT-XS/4 is a DiT"),
        (lambda: train.main(parse(train, workspace, tmp_path, "--load-weight", noise_sit)),
         "is a SiT trained with --prediction noise, not velocity; pass --prediction noise"),
        (lambda: train_masked_kd.main(train_masked_kd.build_parser().parse_args(training_flags(
            workspace, tmp_path, "--load-weight", workspace["student"], "--teacher", "DiT-XS/4", "--load-teacher",
            dit))), "--teacher DiT-XS/4 is a DiT but the student --model SiT-XS/4 a SiT"),
        (lambda: prune_by_index.main(prune_by_index.parse_args(["--model", MODEL, "--ckpt", dit, "--kept-indices",
                                                                "[0]", "--save-model", str(tmp_path / "x.pt"),
                                                                *PIXELS])), "holds DiT weights"),
        (lambda: sample.main(sample.parse_args(["--model", MODEL, "--ckpt", noise_sit, "--sampler", "sde",
                                                "--class-labels", "1", "--out", str(tmp_path / "x.png"), *PIXELS])),
         "trained with --prediction noise"),
    ]
    for run, message in cases:
        with pytest.raises(TinyFusionError, match=message) as info:
            run()
        assert "\n" not in str(info.value)
    for written in (RUN, "run-DiT-XS-4", "x.pt", "x.png"):
        assert not os.path.exists(tmp_path / written), written


# ------------------------------------------------------------------ world-size invariance (slow)
@pytest.mark.slow
def test_sample_ddp_two_gloo_ranks_give_the_npz_of_one(workspace, tmp_path):
    common = ["--model", MODEL, "--ckpt", workspace["teacher"], "--sampler", "sde", "--num-sampling-steps", "4",
              "--num-fid-samples", "7", "--per-proc-batch-size", "2", "--cfg-scale", "4.0", *PIXELS]
    sample_ddp.main(sample_ddp.parse_args([*common, "--sample-dir", str(tmp_path / "one")]))
    result = torchrun("sample_ddp.py", [*common, "--sample-dir", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    (one,), (two,) = glob.glob(str(tmp_path / "one" / "*.npz")), glob.glob(str(tmp_path / "two" / "*.npz"))
    assert os.path.basename(one) == os.path.basename(two)
    with np.load(one) as a, np.load(two) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
        assert len(np.unique(a["arr_0"])) > 50

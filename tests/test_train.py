"""train.py and the shared training machinery (tinyfusion/training/loop.py, resume.py, schedules.py,
gradients.py, run_setup.py): run folder and checkpoint format,
bit-exact resume after an interruption, skipped non-finite steps, bad input, and the small
helpers. The 2-rank end-to-end runs (loss goes down from scratch, resume under torchrun) are slow."""
import dataclasses
import io
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from tinyfusion.errors import TinyFusionError
import train
import train_masked_kd
from tinyfusion.families import dit
from tinyfusion.training import gradients
from tinyfusion.training import loop
from tinyfusion.training import resume
from tinyfusion.training import run_setup
from tinyfusion.training import lr_schedules as schedules
from tinyfusion.distributed import DistributedContext
from training_helpers import (COMMON_FLAGS, IMAGE_SIZE, MODEL, loss_task, make_digits_store, make_teacher_and_student,
                              run_interrupted_in_step, torchrun)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    features = make_digits_store(str(folder))  # 96 digits: 12 batches of 8 per epoch
    teacher, student = make_teacher_and_student(str(folder))
    return {"folder": folder, "features": features, "teacher": teacher, "student": student}


def parse(script, workspace, results, *extra, model=MODEL):
    flags = ["--model", model, "--data-path", workspace["features"], "--results-dir", str(results),
             "--global-batch-size", "8", *COMMON_FLAGS, *extra]
    if script is train_masked_kd:
        flags += ["--teacher", model, "--load-teacher", workspace["teacher"]]
    return script.build_parser().parse_args(flags)


def checkpoint(path):
    from tinyfusion.io.checkpoints import load_checkpoint_file
    return load_checkpoint_file(str(path))


def assert_same_tensors(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("script, loss_name", [(train, "training_losses"), (train_masked_kd, "kd_losses")])
def test_interrupted_run_resumed_with_auto_ends_with_the_same_weights(workspace, tmp_path, monkeypatch, script,
                                                                      loss_name):
    # 14 steps over 12-batch epochs, checkpoints at 5, 10, 14; the interrupted run dies in step 8
    flags = ["--load-weight", workspace["student"], "--max-steps", "14", "--ckpt-every", "5", "--log-every", "1",
             "--epochs", "3"]
    script.main(parse(script, workspace, tmp_path / "a", *flags))

    run_interrupted_in_step(monkeypatch, dit.Family, loss_name, 8,
                            lambda: script.main(parse(script, workspace, tmp_path / "b", *flags)))
    run_b = tmp_path / "b" / "run-DiT-XS-4"
    assert sorted(os.listdir(run_b / "checkpoints")) == ["0000005.pt"]
    script.main(parse(script, workspace, tmp_path / "b", *flags, "--resume", "auto"))

    final_a = checkpoint(tmp_path / "a" / "run-DiT-XS-4" / "checkpoints" / "0000014.pt")
    final_b = checkpoint(run_b / "checkpoints" / "0000014.pt")
    for key in ("model", "ema", "opt", "sched", "train_steps", "epoch", "batches_into_epoch", "rng"):
        assert_same_tensors(final_a[key], final_b[key], key)
    assert (final_a["epoch"], final_a["batches_into_epoch"]) == (1, 2)
    # the resumed run logged the same losses as the uninterrupted one
    metrics_a = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "a" / "run-DiT-XS-4" / "metrics.jsonl"))}
    metrics_b = {r["step"]: r["loss"] for r in map(json.loads, open(run_b / "metrics.jsonl"))}
    assert metrics_b == metrics_a and len(metrics_a) == 14
    # running the finished command again without --resume refuses to touch the run
    with pytest.raises(TinyFusionError, match="already holds checkpoints; pass --resume auto"):
        script.main(parse(script, workspace, tmp_path / "b", *flags))


# ------------------------------------------------------------------ run folder and checkpoint format
def test_training_from_scratch_writes_the_run_folder_and_original_format_checkpoints(workspace, tmp_path):
    from tinyfusion.families.build import build_model
    from models import DiT_models
    train.main(parse(train, workspace, tmp_path, "--max-steps", "4", "--ckpt-every", "3", "--log-every", "2",
                     "--prefix", "scratch"))
    run = tmp_path / "scratch-DiT-XS-4"
    assert sorted(set(os.listdir(run)) - {".tinyfusion.lock"}) == ["args.json", "checkpoints", "log.txt", "metrics.jsonl"]
    assert sorted(os.listdir(run / "checkpoints")) == ["0000003.pt", "0000004.pt"]
    assert json.load(open(run / "args.json"))["model"] == MODEL
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("loss", "gt", "mse", "vb", "lr", "steps_per_sec", "images_per_sec", "skipped_steps"):
        assert key in records[0]
    assert records[0]["lr"] == pytest.approx(1.5e-4, rel=1e-12)  # the default cosine, 2e-4 to 1e-4, at step 2 of 4
    assert records[0]["loss"] == pytest.approx(records[0]["mse"] + records[0]["vb"])
    saved = checkpoint(run / "checkpoints" / "0000004.pt")
    assert type(saved["args"]) is dict and saved["args"]["model"] == MODEL and saved["train_steps"] == 4
    # the original loading rule: torch.load(weights_only) + ["ema"] into the plain architecture
    original = torch.load(run / "checkpoints" / "0000004.pt", map_location="cpu", weights_only=True)
    model = DiT_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10)
    model.load_state_dict(original["ema"], strict=True)
    assert not torch.equal(original["ema"]["blocks.0.attn.qkv.weight"], original["model"]["blocks.0.attn.qkv.weight"])
    trained, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=str(run / "checkpoints" / "0000004.pt"), use_ema=False)
    assert torch.equal(trained.state_dict()["final_layer.linear.weight"], original["model"]["final_layer.linear.weight"])


@pytest.mark.parametrize("case", ["no-features", "batch-not-divisible", "wrong-geometry", "resume-plain-weights"])
def test_bad_input_is_one_line_and_writes_nothing(workspace, tmp_path, monkeypatch, case):
    empty = tmp_path / "empty"
    empty.mkdir()
    results = tmp_path / "results"
    flags = []
    if case == "no-features":
        args = parse(train, workspace, results)
        args.data_path = str(empty)
        expected = f"no features found in {empty}"
    elif case == "batch-not-divisible":
        args = parse(train, workspace, results, "--global-batch-size", "9")
        fake = DistributedContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
        monkeypatch.setattr(run_setup, "distributed_context", lambda device=None: fake)
        expected = "--global-batch-size 9 is not divisible by the world size 2"
    elif case == "wrong-geometry":
        args = parse(train, workspace, results, "--image-size", "16")
        expected = "expects (3, 16, 16)"
    else:
        args = parse(train, workspace, results, "--resume", workspace["student"], *flags)
        expected = "is not a training checkpoint"
    with pytest.raises(TinyFusionError) as error:
        train.main(args)
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert not results.exists()


def flip_a_latent_byte(store, into):
    """A copy of the feature store whose last shard has one flipped byte in its latents: same
    size, valid header, so only the shard's sha256 (checked when it is first read) finds it."""
    shutil.copytree(store, into)
    path = os.path.join(into, sorted(name for name in os.listdir(into) if name.startswith("shard-"))[-1])
    data = bytearray(open(path, "rb").read())
    data[-64] ^= 0xFF  # well inside the last array of the file, past the header
    open(path, "wb").write(bytes(data))
    return str(into)


@pytest.mark.parametrize("script, failure", [(train, "damaged-store"), (train, "diverges"),
                                             (train_masked_kd, "damaged-store")])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(workspace, tmp_path, monkeypatch, script,
                                                                       failure):
    results = tmp_path / "results"
    args = parse(script, workspace, results, "--max-steps", "30", "--ckpt-every", "100",
                 *(["--load-weight", workspace["student"]] if script is train_masked_kd else []))
    if failure == "damaged-store":
        args.data_path = flip_a_latent_byte(workspace["features"], tmp_path / "features")
        expected = "damaged"
    else:
        def diverged(family, model, x, y):
            return {"loss": model(x, torch.zeros(len(x), dtype=torch.long), y).mean() * float("inf")}
        monkeypatch.setattr(dit.Family, "training_losses", diverged)
        args.max_skipped_in_a_row = 2
        expected = "2 non-finite losses in a row"
    with pytest.raises(TinyFusionError, match=expected) as error:
        script.main(args)
    assert "\n" not in str(error.value)
    assert not results.exists() or os.listdir(results) == []


# ------------------------------------------------------------------ non-finite losses
def make_fit_inputs(workspace, tmp_path, *extra):
    """The keywords of a TrainingLoop as train.py makes them (the run folder is tmp_path/run)."""
    args = parse(train, workspace, tmp_path, "--load-weight", workspace["student"], "--log-every", "1",
                 "--ckpt-every", "100", *extra)
    run = run_setup.prepare_training(args)
    return run.model, dict(run=dataclasses.replace(run, run_dir=str(tmp_path / "run")),
                           config=run_setup.loop_config(args))


def test_non_finite_losses_skip_the_step_and_are_counted(workspace, tmp_path):
    model, keywords = make_fit_inputs(workspace, tmp_path, "--max-steps", "6")
    run_dir = keywords["run"].run_dir
    family = dit.Family()
    snapshots = []

    def losses_nan_in_steps_3_and_4(student, x, y, epoch):
        snapshots.append(model.final_layer.linear.weight.detach().clone())
        losses = family.training_losses(student, x, y)
        if len(snapshots) in (3, 4):
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    result = loop.TrainingLoop(task=loss_task(losses_nan_in_steps_3_and_4), **keywords).run()
    assert result.skipped_steps == 2 and result.train_steps == 6
    assert not torch.equal(snapshots[1], snapshots[2])  # step 2 updated the weights
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])  # 3, 4 did not
    assert not torch.equal(snapshots[4], snapshots[5])
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert "step 3: non-finite loss or gradient, step skipped" in open(os.path.join(run_dir, "log.txt")).read()
    assert checkpoint(os.path.join(run_dir, "checkpoints", "0000006.pt"))["skipped_steps"] == 2


def test_too_many_non_finite_losses_in_a_row_stop_the_run(workspace, tmp_path):
    model, keywords = make_fit_inputs(workspace, tmp_path, "--max-steps", "10", "--max-skipped-in-a-row", "3")

    def always_nan(student, x, y, epoch):
        out = student(x, torch.zeros(len(x), dtype=torch.long), y)
        return {"loss": out.mean() * float("inf")}

    with pytest.raises(TinyFusionError, match="3 non-finite losses in a row at step 3"):
        loop.TrainingLoop(task=loss_task(always_nan), **keywords).run()


# ------------------------------------------------------------------ small helpers
def test_rng_state_survives_a_weights_only_checkpoint():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    buffer = io.BytesIO()
    torch.save({"rng": [resume.capture_rng_state()]}, buffer)
    expected = (random.random(), np.random.rand(), torch.rand(4))
    buffer.seek(0)
    resume.restore_rng_state(torch.load(buffer, weights_only=True)["rng"][0])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(4), expected[2])


def test_loop_state_continues_from_its_state_dict_as_if_never_stopped():
    """LoopState.state_dict() + the weights, loaded into a fresh LoopState: the next step of the
    continued state equals the next step of the original (parameters, EMA, lr, RNG draws)."""
    from tinyfusion.training.loop import LoopConfig
    from tinyfusion.training.state import LoopState
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    config = LoopConfig(epochs=2, max_steps=None, global_batch_size=8, global_seed=0, lr=1e-2, lr_schedule="cosine",
                        min_lr=1e-3, weight_decay=0.01, grad_clip=1.0, ema_decay=0.9, log_every=1, ckpt_every=1,
                        precision="fp32", grad_checkpointing=False, compile_model=False, num_workers=0,
                        max_skipped_in_a_row=3, run_args={"model": "m"})

    def fresh(model):
        return LoopState(model, config=config, param_groups=None, total_steps=10, steps_per_epoch=5, ctx=ctx,
                         dtype=torch.float32)

    def step(state, model):
        model.weight.grad = torch.rand(model.weight.shape)  # a draw from the global generator
        model.bias.grad = torch.ones_like(model.bias)
        state.optimizer.step(), state.scheduler.step(), state.ema.update()

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    state = fresh(model)
    for _ in range(3):
        step(state, model)
    state.train_steps, state.epoch, state.batch, state.guard.skipped_total = 3, 0, 3, 1
    buffer = io.BytesIO()  # through a file, as a checkpoint (the state dicts hold live tensors)
    torch.save({"model": model.state_dict(), "ema": state.ema.state_dict(), **state.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    step(state, model)  # the original goes on ...
    torch.manual_seed(123)  # ... and the global RNG moves on: the continued state must restore it
    continued_model = torch.nn.Linear(3, 2)
    continued_model.load_state_dict(saved["model"])
    continued = fresh(continued_model)
    notes = continued.load_state_dict(saved, "ckpt.pt")
    assert notes == ["resumed ckpt.pt at step 3 of 10 (epoch 0, batch 3 of 5)"]
    assert (continued.train_steps, continued.epoch, continued.batch, continued.guard.skipped_total) == (3, 0, 3, 1)
    assert continued.guard.last_good_checkpoint == "ckpt.pt"
    step(continued, continued_model)
    assert_same_tensors(continued_model.state_dict(), model.state_dict())
    assert_same_tensors(continued.ema.state_dict(), state.ema.state_dict())
    assert continued.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]


def test_cosine_schedule_is_cosine_annealing_lr_step_for_step_and_restarts_on_its_closed_form():
    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    ours_opt, reference_opt = optimizer(), optimizer()
    ours = schedules.make_lr_scheduler(ours_opt, schedule="cosine", total_steps=10, min_lr=1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=10, eta_min=1e-4)
    for step in range(10):
        assert ours_opt.param_groups[0]["lr"] == reference_opt.param_groups[0]["lr"]
        closed = 1e-4 + 1e-4 * (1 + math.cos(math.pi * step / 10)) / 2
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(closed, rel=1e-12, abs=0)
        ours_opt.step(), ours.step(), reference_opt.step(), reference.step()
    assert ours_opt.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-12)
    # a schedule restarted at step 4 (a resume that changed the settings) goes on on the same curve
    restarted_opt = optimizer()
    restarted = schedules.restart_lr_schedule(restarted_opt, step=4, lr=2e-4, schedule="cosine", total_steps=10,
                                              min_lr=1e-4)
    for step in range(4, 10):
        expected = 1e-4 + 1e-4 * (1 + math.cos(math.pi * step / 10)) / 2
        assert restarted_opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
        restarted_opt.step(), restarted.step()
    constant_opt = optimizer()
    constant = schedules.make_lr_scheduler(constant_opt, schedule="constant", total_steps=10, min_lr=1e-4)
    for _ in range(3):
        constant_opt.step(), constant.step()
    assert constant_opt.param_groups[0]["lr"] == 2e-4


def test_resolve_resume_and_loop_position(tmp_path):
    assert resume.resolve_resume(None, str(tmp_path)) is None
    assert resume.resolve_resume("auto", str(tmp_path)) is None  # nothing yet: a fresh start
    (tmp_path / "checkpoints").mkdir()
    for step in (5, 40, 12):
        (tmp_path / "checkpoints" / f"{step:07d}.pt").write_bytes(b"")
    assert resume.resolve_resume("auto", str(tmp_path)).endswith("0000040.pt")
    with pytest.raises(TinyFusionError, match="--resume nope.pt does not exist"):
        resume.resolve_resume("nope.pt", str(tmp_path))
    assert resume.normalize_position(3, 12, 12) == (4, 0)
    assert resume.normalize_position(3, 7, 12) == (3, 7)


def test_gradient_all_reduce_zero_fills_missing_grads_and_guard_counts():
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    used, unused, frozen = (torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2)),
                            torch.nn.Parameter(torch.ones(2), requires_grad=False))
    (used * 2).sum().backward()
    gradients.all_reduce_gradients([used, unused, frozen], ctx)
    assert torch.equal(used.grad, torch.full((3,), 2.0)) and torch.equal(unused.grad, torch.zeros(2))
    assert frozen.grad is None
    guard = gradients.NonFiniteGuard(max_in_a_row=2)
    assert guard.check(True, 1) and not guard.check(False, 2) and guard.check(True, 3) and not guard.check(False, 4)
    assert guard.skipped_total == 2
    with pytest.raises(TinyFusionError, match="2 non-finite losses in a row at step 5"):
        guard.check(False, 5)


# ------------------------------------------------------------------ slow: 2 ranks under torchrun
@pytest.mark.slow
def test_two_rank_training_from_scratch_lowers_the_loss(tmp_path):
    features = make_digits_store(str(tmp_path), limit=512)
    done = torchrun("train.py", ["--model", MODEL, "--data-path", features, "--results-dir", str(tmp_path / "r"),
                                 "--global-batch-size", "32", "--max-steps", "300", "--log-every", "25",
                                 "--ckpt-every", "300", "--lr", "5e-4", *COMMON_FLAGS])
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in open(tmp_path / "r" / "run-DiT-XS-4" / "metrics.jsonl")]
    first, last = records[0]["loss"], records[-1]["loss"]
    print(f"loss over steps 1-25: {first:.4f}, steps 276-300: {last:.4f}")
    assert last < 0.6 * first


@pytest.mark.slow
def test_two_rank_resume_is_bit_exact(workspace, tmp_path):
    common = ["--model", MODEL, "--data-path", workspace["features"], "--global-batch-size", "8", "--max-steps",
              "14", "--ckpt-every", "5", "--epochs", "3", "--load-weight", workspace["student"], *COMMON_FLAGS]
    done = torchrun("train.py", ["--results-dir", str(tmp_path / "a"), *common])
    assert done.returncode == 0, done.stderr[-2000:]
    # a run killed after its step-5 checkpoint: its folder holds exactly that checkpoint
    os.makedirs(tmp_path / "b" / "run-DiT-XS-4" / "checkpoints")
    shutil.copy(tmp_path / "a" / "run-DiT-XS-4" / "checkpoints" / "0000005.pt",
                tmp_path / "b" / "run-DiT-XS-4" / "checkpoints" / "0000005.pt")
    done = torchrun("train.py", ["--results-dir", str(tmp_path / "b"), "--resume", "auto", *common])
    assert done.returncode == 0, done.stderr[-2000:]
    final_a = checkpoint(tmp_path / "a" / "run-DiT-XS-4" / "checkpoints" / "0000014.pt")
    final_b = checkpoint(tmp_path / "b" / "run-DiT-XS-4" / "checkpoints" / "0000014.pt")
    assert len(final_a["rng"]) == 2
    for key in ("model", "ema", "opt", "rng"):
        assert_same_tensors(final_a[key], final_b[key], key)


@pytest.mark.slow
def test_two_rank_global_batch_not_divisible(workspace, tmp_path):
    done = torchrun("train.py", ["--model", MODEL, "--data-path", workspace["features"], "--results-dir",
                                 str(tmp_path / "r"), "--global-batch-size", "9", *COMMON_FLAGS])
    assert done.returncode != 0
    assert "error: --global-batch-size 9 is not divisible by the world size 2" in done.stderr
    assert not (tmp_path / "r").exists()

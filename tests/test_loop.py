"""The one training loop (tinyfusion/training/loop.py) through train.py: the default lr schedule is torch's
CosineAnnealingLR step for step (also across --resume), a resume applies and logs changed
settings, metrics.jsonl holds every step once after a resume, a diverged run writes no
checkpoint of exploded weights (tests/test_advice.py: which one it recommends), the original
train.py's checkpoints resume, and bad input under torchrun is one line printed once (slow)."""
import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from models import DiT_models
from tinyfusion.io.checkpoints import load_checkpoint_file
from tinyfusion.errors import TinyFusionError
from training_helpers import (COMMON_FLAGS, IMAGE_SIZE, MODEL, loss_task, make_digits_store, make_teacher_and_student,
                              torchrun)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = "run-DiT-XS-4"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop")
    features = make_digits_store(str(folder))  # 96 digits: 12 batches of 8 per epoch
    _, student = make_teacher_and_student(str(folder))
    return {"folder": folder, "features": features, "student": student}


def run_train(workspace, results, *extra):
    args = train.build_parser().parse_args(
        ["--model", MODEL, "--data-path", workspace["features"], "--results-dir", str(results),
         "--global-batch-size", "8", "--load-weight", workspace["student"], *COMMON_FLAGS, *extra])
    train.main(args)
    return results / RUN


def metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def keep_only_checkpoint(source_run, target_run, step):
    """A copy of a finished run as if it had been killed right after checkpoint `step`."""
    shutil.copytree(source_run, target_run)
    for name in os.listdir(target_run / "checkpoints"):
        if name != f"{step:07d}.pt":
            os.remove(target_run / "checkpoints" / name)


@pytest.fixture(scope="module")
def finished_run(workspace):
    """6 steps with the defaults (cosine 2e-4 -> 1e-4), a checkpoint every 3 steps, a log line every step."""
    return run_train(workspace, workspace["folder"] / "finished", "--max-steps", "6", "--ckpt-every", "3",
                     "--log-every", "1")


def test_default_lr_is_cosine_annealing_lr_step_for_step_also_across_resume(workspace, finished_run, tmp_path):
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=6, eta_min=1e-4)  # T_max = steps run
    expected = []
    for _ in range(6):
        reference_opt.step(), reference.step()
        expected.append(reference.get_last_lr()[0])  # the lr after step s, as the run logs it
    assert [r["lr"] for r in metrics(finished_run)] == expected
    # killed after step 3 with its metrics of steps 4-6 already written: the resumed run drops them,
    # logs them again (each step once) with the same lr
    resumed = tmp_path / RUN
    keep_only_checkpoint(finished_run, resumed, 3)
    run_train(workspace, tmp_path, "--max-steps", "6", "--ckpt-every", "3", "--log-every", "1", "--resume", "auto")
    records = metrics(resumed)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records] == expected
    assert [r["loss"] for r in records] == [r["loss"] for r in metrics(finished_run)]


# every training checkpoint's entries, key for key in this order, as checkpoints written before the
# loop's state was one object (tinyfusion/training/state.py) have them: those still resume, and
# other tools (sample.py, export_diffusers.py, the original's loaders) read these keys
TRAINING_CHECKPOINT_KEYS = ["model", "ema", "opt", "sched", "train_steps", "epoch", "batches_into_epoch", "args",
                            "loop", "world_size", "rng", "skipped_steps"]


def test_checkpoints_keep_their_format_key_for_key(finished_run):
    saved = torch.load(finished_run / "checkpoints" / "0000003.pt", map_location="cpu", weights_only=True)
    assert list(saved) == TRAINING_CHECKPOINT_KEYS
    assert (saved["train_steps"], saved["epoch"], saved["batches_into_epoch"], saved["world_size"],
            saved["skipped_steps"]) == (3, 0, 3, 1, 0)
    assert saved["loop"] == dict(lr=2e-4, lr_schedule="cosine", min_lr=1e-4, weight_decay=0.0, ema_decay=0.9999,
                                 grad_clip=1.0, total_steps=6, lr_scales=[1.0])
    assert list(saved["loop"]) == ["lr", "lr_schedule", "min_lr", "weight_decay", "ema_decay", "grad_clip",
                                   "total_steps", "lr_scales"]
    assert saved["sched"]["last_epoch"] == 3 and saved["args"]["max_steps"] == 6
    assert len(saved["rng"]) == 1 and list(saved["rng"][0]) == ["python", "numpy", "torch", "cuda"]
    assert {float(state["step"]) for state in saved["opt"]["state"].values()} == {3.0}


def test_resume_applies_changed_settings_and_logs_each(workspace, finished_run, tmp_path):
    resumed = tmp_path / RUN
    keep_only_checkpoint(finished_run, resumed, 3)
    run_train(workspace, tmp_path, "--max-steps", "6", "--ckpt-every", "3", "--log-every", "1", "--resume", "auto",
              "--lr", "1e-3", "--weight-decay", "0.05", "--ema-decay", "0.5", "--grad-clip", "2")
    log = open(resumed / "log.txt").read()
    for line in ("--lr 0.0002 -> 0.001 from the command line", "--weight-decay 0 -> 0.05 from the command line",
                 "--ema-decay 0.9999 -> 0.5 from the command line", "--grad-clip 1 -> 2 from the command line"):
        assert line in log
    # the cosine from the new lr, at the same position: lr after step s = 1e-4 + 9e-4 (1 + cos(pi s / 6)) / 2
    for record in metrics(resumed)[3:]:
        expected = 1e-4 + 9e-4 * (1 + math.cos(math.pi * record["step"] / 6)) / 2
        assert record["lr"] == pytest.approx(expected, rel=1e-12)
    final = load_checkpoint_file(str(resumed / "checkpoints" / "0000006.pt"))
    assert final["opt"]["param_groups"][0]["weight_decay"] == 0.05
    assert final["loop"]["lr"] == 1e-3 and final["loop"]["ema_decay"] == 0.5


def test_a_diverged_run_writes_no_checkpoint_of_exploded_weights(workspace, tmp_path):
    with pytest.raises(TinyFusionError, match="non-finite losses in a row") as error:
        run_train(workspace, tmp_path, "--max-steps", "10", "--ckpt-every", "1", "--log-every", "1",
                  "--lr", "1e6", "--lr-schedule", "constant", "--max-skipped-in-a-row", "3")
    # the first step's loss is finite, but its update (lr 1e6) moves the weights to about 1e6: no
    # trained model has them, so that checkpoint is postponed, and never written once steps are
    # skipped; a run that fails before its first checkpoint leaves no folder
    assert not (tmp_path / RUN).exists()
    assert str(error.value).endswith("no healthy checkpoint was written; start again with a lower --lr or "
                                     "--precision bf16/fp32")


def original_checkpoint(path, steps=2):
    """A checkpoint as the original train.py writes it: AdamW over model.parameters() (also the
    frozen pos_embed), CosineAnnealingLR, args as an argparse.Namespace, no RNG / position."""
    model = DiT_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10)
    ema = DiT_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=1e-4)
    for _ in range(steps):
        out = model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,)))
        out.square().mean().backward()
        opt.step(), sched.step(), opt.zero_grad()
    args = argparse.Namespace(model=MODEL, global_batch_size=8, image_size=IMAGE_SIZE, num_classes=10, epochs=1)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),  # as the original
                "sched": sched.state_dict(), "train_steps": steps, "args": args}, str(path))
    return model, opt


def test_the_original_train_py_checkpoint_resumes_with_its_optimizer_state(workspace, tmp_path):
    path = tmp_path / "original.pt"
    model, opt = original_checkpoint(path)
    names = [name for name, _ in model.named_parameters()]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["pos_embed"] and len(opt.state_dict()["param_groups"][0]["params"]) == len(names)
    run_dir = run_train(workspace, tmp_path / "r", "--max-steps", "4", "--ckpt-every", "4", "--log-every", "1",
                        "--epochs", "1", "--resume", str(path))
    log = open(run_dir / "log.txt").read()
    assert f"mapped by position onto the {len(names) - 1} that train" in log
    assert "resumed" in log and "at step 2 of 4" in log
    final = load_checkpoint_file(str(run_dir / "checkpoints" / "0000004.pt"))
    # every trained tensor's AdamW state went on from the original's 2 steps: 2 + 2 = 4
    assert {float(state["step"]) for state in final["opt"]["state"].values()} == {4.0}
    assert len(final["opt"]["state"]) == len(names) - 1
    # our checkpoints hold plain values only: a plain torch.load (weights_only=True) in a fresh process reads them
    code = f"import torch; c = torch.load({str(run_dir / 'checkpoints' / '0000004.pt')!r}); print(c['args']['model'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == MODEL, done.stderr[-500:]


def test_an_original_checkpoint_of_another_model_is_refused_in_one_line(workspace, tmp_path):
    path = tmp_path / "original.pt"
    original_checkpoint(path, steps=1)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["opt"]["param_groups"][0]["params"] = checkpoint["opt"]["param_groups"][0]["params"][:-3]
    torch.save(checkpoint, path)
    with pytest.raises(TinyFusionError, match=f"start from its weights with --load-weight {path}") as error:
        run_train(workspace, tmp_path / "r", "--max-steps", "2", "--resume", str(path))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_torchrun_bad_input_prints_one_line_once_and_leaves_no_run_folder(workspace, tmp_path):
    missing = str(tmp_path / "missing.pt")
    done = torchrun("train.py", ["--model", MODEL, "--data-path", workspace["features"], "--results-dir",
                                 str(tmp_path / "r"), "--global-batch-size", "8", "--load-weight", missing,
                                 *COMMON_FLAGS])
    assert done.returncode != 0
    line = f"error: checkpoint {missing} does not exist"
    assert done.stderr.count(line) == 1, done.stderr[-3000:]
    assert not (tmp_path / "r").exists()
    # a flag argparse refuses: its usage error once too
    done = torchrun("train.py", ["--model", MODEL, "--data-path", workspace["features"], "--results-dir",
                                 str(tmp_path / "r"), "--global-batch-size", "eight", *COMMON_FLAGS])
    assert done.returncode != 0
    usage_errors = [line for line in done.stderr.splitlines() if line.startswith("train.py: error: argument --global-batch-size: ")]
    assert len(usage_errors) == 1 and "'eight'" in usage_errors[0], done.stderr[-3000:]  # the validator's wording
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ experiment trackers
def test_a_tracker_hook_gets_every_metrics_record_from_rank_0_and_is_closed(workspace, tmp_path):
    from tinyfusion.families import dit
    from tinyfusion.training import loop
    from tinyfusion.training import run_setup
    from tinyfusion.training import trackers

    class FakeWriter:
        def __init__(self, run_dir):
            self.run_dir, self.logged, self.closed = run_dir, [], False
            made.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def close(self):
            self.closed = True

    made, family = [], dit.Family()
    args = train.build_parser().parse_args(
        ["--model", MODEL, "--data-path", workspace["features"], "--results-dir", str(tmp_path),
         "--global-batch-size", "8", "--load-weight", workspace["student"], "--max-steps", "4", "--log-every", "2",
         *COMMON_FLAGS])
    run = run_setup.prepare_training(args)
    run_dir = str(tmp_path / "run")
    task = loss_task(lambda forward, x, y, epoch: family.training_losses(forward, x, y))
    loop.TrainingLoop(task=task, run=dataclasses.replace(run, run_dir=run_dir), config=run_setup.loop_config(args),
                      hooks=[trackers.TrackerHook(FakeWriter)]).run()
    (writer,) = made
    assert writer.run_dir == run_dir and writer.closed
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [step for step, _ in writer.logged] == [r["step"] for r in records] == [2, 4]
    for (_, values), record in zip(writer.logged, records):
        assert values["loss"] == record["loss"] and values["lr"] == record["lr"] and "steps_per_sec" in values


def test_tracker_scalars_flatten_gate_confidences_and_skip_what_is_not_a_number():
    from tinyfusion.training.trackers import scalars
    record = {"step": 7, "loss": 0.5, "tau": 0.1, "kept_indices": [0, 3], "confidences": [0.625, 0.875],
              "groups": [[1, 2], [1, 2]], "note": "x", "flag": True}
    assert scalars(record) == {"loss": 0.5, "tau": 0.1, "kept_indices/0": 0.0, "kept_indices/1": 3.0,
                               "confidences/0": 0.625, "confidences/1": 0.875}


def test_wandb_run_id_is_kept_in_the_run_folder_so_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    import types

    from tinyfusion.training.trackers import WandbWriter
    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs) or types.SimpleNamespace(
        log=lambda values, step: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    WandbWriter(str(tmp_path), project="p", run_name=None, config={"lr": 1.0})
    WandbWriter(str(tmp_path), project="p", run_name=None, config={"lr": 1.0})  # the resumed run
    assert calls[0]["id"] == calls[1]["id"] and len(calls[0]["id"]) == 8 and all(c["resume"] == "allow" for c in calls)
    os.makedirs(tmp_path / "other")
    WandbWriter(str(tmp_path / "other"), project="p", run_name=None, config={})  # another run folder: a new id
    assert calls[2]["id"] != calls[0]["id"]
    assert calls[0]["name"] == os.path.basename(str(tmp_path)) and calls[0]["dir"] == str(tmp_path)


def test_wandb_without_the_package_is_one_line_before_anything_is_written(workspace, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    with pytest.raises(TinyFusionError, match=r"--wandb needs the wandb package \(pip install wandb\)"):
        run_train(workspace, tmp_path / "r", "--max-steps", "2", "--wandb")
    assert not (tmp_path / "r").exists()

"""Advice that does not mislead: after a divergence the recommended checkpoint is the last healthy
one by a stated rule (not merely the last one of finite weights); a broken starting file is
named as the cause instead of the learning rate; save_npz.py scales 16-bit PNGs instead of
clipping them; a SiT samples with more than 1000 ODE / SDE steps."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models import DiT_models, SiT_models
from tinyfusion.io.checkpoints import save_pruned_model
from tinyfusion.errors import TinyFusionError
from tinyfusion.training.gradients import HEALTHY_LOSS_FACTOR, NonFiniteGuard
from training_helpers import COMMON_FLAGS, MODEL, make_digits_store, make_teacher_and_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = "run-DiT-XS-4"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("advice")
    features = make_digits_store(str(folder))
    _, student = make_teacher_and_student(str(folder))
    return {"folder": folder, "features": features, "student": student}


def run_train(workspace, results, *extra, load_weight=None):
    train.main(train.build_parser().parse_args(
        ["--model", MODEL, "--data-path", workspace["features"], "--results-dir", str(results), "--global-batch-size",
         "8", "--load-weight", load_weight or workspace["student"], "--log-every", "1", *COMMON_FLAGS, *extra]))
    return results / RUN


def test_the_recommended_checkpoint_is_the_last_healthy_one(workspace, tmp_path):
    run_dir = run_train(workspace, tmp_path, "--max-steps", "4", "--ckpt-every", "1")
    # lr 30 from step 5: checkpoint 5 holds finite weights (|w| about 30), but the very next step,
    # the first computed with them, is NaN: recommending it would restart the divergence
    with pytest.raises(TinyFusionError, match="non-finite losses in a row") as error:
        run_train(workspace, tmp_path, "--max-steps", "40", "--ckpt-every", "1", "--resume", "auto", "--lr", "30",
                  "--lr-schedule", "constant", "--max-skipped-in-a-row", "2")
    message = str(error.value)
    written = sorted(os.listdir(run_dir / "checkpoints"))
    assert written[-1] == "0000005.pt"  # finite, within the bound: written, but not healthy
    losses = {r["step"]: r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl"))}
    assert np.isfinite(losses[5]) and not np.isfinite(losses[6])
    assert f"resume from {run_dir / 'checkpoints' / '0000004.pt'} (the last healthy checkpoint: " in message
    assert "the loss of the step after it, the first computed with its weights, finite and at most 10x" in message
    assert "0000005.pt" not in message


def test_the_healthy_rule_judges_a_checkpoint_by_the_next_loss_against_the_median():
    guard = NonFiniteGuard()
    for loss in (1.0, 1.2, 0.8):  # median 1.0
        assert guard.judge_loss(loss)
    guard.checkpoint_saved("a.pt")
    assert guard.judge_loss(HEALTHY_LOSS_FACTOR * 1.0) and guard.last_good_checkpoint == "a.pt"  # the bound: healthy
    guard.checkpoint_saved("b.pt")
    assert not guard.judge_loss(5e8)  # finite but exploded (the case of weights of 1.9e3)
    assert guard.last_good_checkpoint == "a.pt" and guard.candidate is None
    guard.checkpoint_saved("c.pt")
    assert not guard.judge_loss(float("nan")) and guard.last_good_checkpoint == "a.pt"
    # the explosion never entered the reference: the median is still that of 1.0, 1.2, 0.8, 10
    assert sorted(guard.accepted_losses) == [0.8, 1.0, 1.2, 10.0]
    assert not guard.judge_loss(1.1 * HEALTHY_LOSS_FACTOR * 1.1)  # 10x the median 1.1, plus 10%


def test_a_broken_starting_file_is_named_not_the_learning_rate(workspace, tmp_path):
    torch.manual_seed(0)
    broken = DiT_models[MODEL](input_size=8, in_channels=3, num_classes=10, depth=4)
    with torch.no_grad():  # garbage within the weight bound: it loads, and its first loss is already NaN
        for param in broken.parameters():
            param.uniform_(-1e4, 1e4)
    path = str(tmp_path / "broken.pt")
    save_pruned_model(broken, path, {"kept_indices": [0, 3, 6, 9], "source_depth": 12, "source_model": MODEL})
    with pytest.raises(TinyFusionError) as error:
        run_train(workspace, tmp_path / "runs", "--max-steps", "5", "--max-skipped-in-a-row", "2", load_weight=path)
    message = str(error.value)
    assert "2 non-finite losses in a row at step 2" in message
    assert "not one step of this run had a finite loss, so the learning rate is not the cause" in message
    assert "--load-weight" in message and "lower --lr" not in message


def test_save_npz_scales_sixteen_bit_pngs_instead_of_clipping_them(tmp_path):
    import save_npz
    folder = tmp_path / "samples"
    folder.mkdir()
    values = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    Image.fromarray(values).save(folder / "000000.png")
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(folder / "000001.png")
    images = save_npz.load_image_folder(str(folder))
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # v * 257 -> v exactly
    assert np.array_equal(images[0], np.repeat(expected[..., None], 3, axis=2))
    assert (images[0] == 255).mean() < 0.01  # PIL's convert("RGB") makes 255 of all but the first value
    assert np.array_equal(images[1], np.full((16, 16, 3), 7, np.uint8))


def test_a_sit_samples_with_more_than_1000_steps(tmp_path, monkeypatch):
    import sample
    torch.manual_seed(0)
    model = SiT_models["SiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=1)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)
    path = str(tmp_path / "sit.pt")
    save_pruned_model(model, path, {"kept_indices": [0], "source_depth": 12, "source_model": "SiT-XS/4"})
    calls = []  # the class's forward counts the solver's evaluations (guided: one batched call per step)
    original = type(model).forward

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(type(model), "forward", counting_forward)
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--model", "SiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10",
                                   "--ckpt", path, "--sampler", "ode", "--sampling-method", "euler",
                                   "--num-sampling-steps", "1500", "--class-labels", "3", "--out", str(out)]))
    assert len(calls) == 1499 and out.exists()  # 1500 grid times, 1499 Euler steps

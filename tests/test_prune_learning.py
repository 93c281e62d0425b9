"""prune_by_learning.py end to end on 8x8 pixel-space digits with DiT-XS teachers: the saved
model, the log, the EMA's coverage, NaN skipping, resume, and (slow) that the search finds the
blocks a teacher really uses, in one process and under torchrun with 2 gloo ranks."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tinyfusion.errors import TinyFusionError
import prune_by_learning
from tinyfusion.io.checkpoints import load_checkpoint_file, read_metadata
from models import DiT_models
from tinyfusion.io.run_folder import read_metrics
from tinyfusion.pruning import gate_search
from test_loop import TRAINING_CHECKPOINT_KEYS
from tests.prune_helpers import make_digits_features, save_plain, set_block_gates, xs_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune_learning")
    _, features = make_digits_features(str(folder))
    teacher = save_plain(xs_model(depth=4), folder / "teacher.pt")
    return folder, features, teacher


def run_args(folder, features, teacher, prefix, *extra):
    return ["--model", "DiT-XS/4", "--groups", "[[1,2]]*2", "--load-weight", str(teacher), "--data-path", features,
            "--image-size", "8", "--vae", "none", "--num-classes", "10", "--global-batch-size", "8",
            "--num-workers", "0", "--results-dir", str(folder / "results"), "--prefix", prefix, *extra]


@pytest.fixture(scope="module")
def lora_run(workspace):
    folder, features, teacher = workspace
    args = prune_by_learning.parse_args(run_args(folder, features, teacher, "lora", "--max-steps", "4",
                                                 "--log-every", "2", "--ckpt-every", "2", "--ema-decay", "0.5",
                                                 "--delta-w", "--lora", "--lora-rank", "4"))
    kept = prune_by_learning.main(args)
    return args, kept, os.path.join(str(folder / "results"), "lora-DiT-XS-4")


def test_saved_model_loads_strict_and_equals_the_original_kept_blocks(workspace, lora_run):
    _, _, teacher = workspace
    args, kept, run_dir = lora_run
    saved = load_checkpoint_file(os.path.join(run_dir, "pruned.pt"))
    metadata = read_metadata(saved)
    assert metadata["method"] == "learnable" and metadata["kept_indices"] == kept
    assert metadata["groups"] == [[1, 2], [1, 2]] and metadata["source_checkpoint"] == str(teacher)
    assert metadata["steps"] == 4 and len(metadata["confidences"]) == 2 and metadata["lora"]
    assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)
    assert not any("lora" in key or "gate" in key for key in saved)
    plain = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=2)
    plain.load_state_dict(saved, strict=True)
    original = torch.load(teacher, weights_only=True)
    for key, value in plain.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{kept[int(index)]}.{rest}"
        assert torch.equal(value, original[key]), key


def test_log_has_schedules_decisions_and_confidences(lora_run):
    _, kept, run_dir = lora_run
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [2, 4]
    # the logged tau/scaling are those of the step's own update (0-based step s = step - 1) of 4
    for record in records:
        assert record["tau"] == pytest.approx(4.0 + (0.1 - 4.0) * (record["step"] - 1) / 3)
        assert record["scaling"] == 100.0
        assert len(record["kept_indices"]) == 2 and len(record["confidences"]) == 2
        assert all(0.5 <= c <= 1.0 for c in record["confidences"])
        assert record["loss"] > 0 and record["steps_per_sec"] > 0 and record["skipped_steps"] == 0
    assert records[-1]["kept_indices"] == kept
    # the run's log draws (draw_decision.py --log RUN_DIR)
    import argparse

    import draw_decision
    draw_decision.main(argparse.Namespace(log=run_dir, out=None, title=None, overwrite=False))
    with open(os.path.join(run_dir, "decision.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ema_covers_exactly_the_trainable_parameters(lora_run):
    args, _, run_dir = lora_run
    checkpoint = load_checkpoint_file(os.path.join(run_dir, "checkpoints", "0000004.pt"))
    model, _ = gate_search.build_gated_model(args, [[1, 2], [1, 2]])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    linears = [name for name, module in model.named_modules() if type(module).__name__ == "LoRALinear"]
    assert trainable == {f"{n}.{f}" for n in linears for f in ("lora_A", "lora_B")} | {"gate_logits.0", "gate_logits.1"}
    assert set(checkpoint["ema"]) == trainable and set(checkpoint["model"]) == trainable
    # the training checkpoint format (tests/test_loop.py) plus the decision, key for key
    assert list(checkpoint) == TRAINING_CHECKPOINT_KEYS + ["kept_indices", "confidences", "groups"]
    assert checkpoint["train_steps"] == 4 and checkpoint["kept_indices"] == read_metadata(
        load_checkpoint_file(os.path.join(run_dir, "pruned.pt")))["kept_indices"]


def test_resume_continues_from_the_same_step_logits_and_optimizer(workspace, lora_run):
    folder, features, teacher = workspace
    args, kept, run_dir = lora_run
    copy_dir = os.path.join(str(folder / "results"), "lora2-DiT-XS-4")
    shutil.copytree(run_dir, copy_dir)
    os.remove(os.path.join(copy_dir, "checkpoints", "0000004.pt"))
    os.remove(os.path.join(copy_dir, "pruned.pt"))
    mid = load_checkpoint_file(os.path.join(copy_dir, "checkpoints", "0000002.pt"))
    assert mid["train_steps"] == 2
    resumed_args = prune_by_learning.parse_args(run_args(folder, features, teacher, "lora2", "--max-steps", "4",
                                                         "--log-every", "2", "--ckpt-every", "2", "--ema-decay", "0.5",
                                                         "--delta-w", "--lora", "--lora-rank", "4", "--resume", "auto"))
    assert prune_by_learning.main(resumed_args) == kept
    with open(os.path.join(copy_dir, "log.txt")) as f:
        assert "at step 2 of 4" in f.read()
    reference = load_checkpoint_file(os.path.join(run_dir, "checkpoints", "0000004.pt"))
    resumed = load_checkpoint_file(os.path.join(copy_dir, "checkpoints", "0000004.pt"))
    for part in ("model", "ema"):
        for name, value in reference[part].items():
            assert torch.equal(resumed[part][name], value), (part, name)
    for index, state in reference["opt"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["opt"]["state"][index][key], value), (index, key)
    # resuming a finished run (pruned file lost) only saves the pruned model again
    os.remove(os.path.join(copy_dir, "pruned.pt"))
    assert prune_by_learning.main(resumed_args) == kept
    assert os.path.isfile(os.path.join(copy_dir, "pruned.pt"))
    # the copied log had steps 2 and 4; resuming at step 2 dropped the record of step 4 and logged it
    # again, resuming the finished run at step 4 logged nothing: every step is recorded once
    assert [r["step"] for r in read_metrics(os.path.join(copy_dir, "metrics.jsonl"))] == [2, 4]


def test_nan_step_is_skipped_and_counted_and_logits_only_ema(workspace, monkeypatch):
    folder, features, teacher = workspace
    calls = {"n": 0}
    from tinyfusion.families import dit
    original_losses = dit.Family.training_losses

    def losses_with_one_nan(family, forward, x, y):
        calls["n"] += 1
        losses = original_losses(family, forward, x, y)
        return dict(losses, loss=losses["loss"] * float("nan")) if calls["n"] == 2 else losses

    monkeypatch.setattr(dit.Family, "training_losses", losses_with_one_nan)
    args = prune_by_learning.parse_args(run_args(folder, features, teacher, "nan", "--max-steps", "3",
                                                 "--log-every", "1", "--ckpt-every", "1"))
    prune_by_learning.main(args)
    run_dir = os.path.join(str(folder / "results"), "nan-DiT-XS-4")
    # step 2 was skipped: its checkpoint is postponed to step 3 (never written while skipping)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000001.pt", "0000003.pt"]
    assert "step 2: checkpoint postponed: the last 1 step(s) were skipped" in open(os.path.join(run_dir, "log.txt")).read()
    checkpoints = [load_checkpoint_file(os.path.join(run_dir, "checkpoints", f"{s:07d}.pt")) for s in (1, 3)]
    assert [c["skipped_steps"] for c in checkpoints] == [0, 1]
    assert set(checkpoints[0]["ema"]) == {"gate_logits.0", "gate_logits.1"}  # without --delta-w only logits train
    for name in checkpoints[0]["model"]:
        assert not torch.equal(checkpoints[1]["model"][name], checkpoints[0]["model"][name])  # step 3 trained
    steps_taken = [c["opt"]["state"][0]["step"].item() for c in checkpoints]
    assert steps_taken == [1, 2]  # three steps, one skipped
    assert [r["skipped_steps"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))] == [0, 1, 1]


def test_bad_input_is_one_line(workspace):
    folder, features, teacher = workspace
    existing = folder / "exists.pt"
    existing.write_bytes(b"x")
    with pytest.raises(TinyFusionError, match="already exists; pass --overwrite") as info:
        prune_by_learning.main(prune_by_learning.parse_args(
            run_args(folder, features, teacher, "bad", "--save-model", str(existing))))
    assert "\n" not in str(info.value)
    plain = run_args(folder, features, teacher, "bad2")
    plain.remove("--groups"), plain.remove("[[1,2]]*2")
    with pytest.raises(TinyFusionError, match="has no gates"):
        prune_by_learning.main(prune_by_learning.parse_args(plain))
    with pytest.raises(TinyFusionError, match="cover 6 blocks but the model has depth 4"):
        prune_by_learning.main(prune_by_learning.parse_args(
            run_args(folder, features, teacher, "bad3") + ["--groups", "[[1,2]]*3"]))


@pytest.mark.slow
def test_compile_runs_the_same_search_as_eager(workspace):
    """--compile (each block through inductor): the same losses, logged every step, as the eager
    run of the same settings (compiled kernels round differently: 1e-4 relative), the same
    decision, and a bounded number of compiled graphs for 6 steps of changing sub-batches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import models
    folder, features, teacher = workspace
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        torch._dynamo.reset()
        args = prune_by_learning.parse_args(run_args(folder, features, teacher, f"compile-{name}", "--max-steps", "6",
                                                     "--log-every", "1", "--delta-w", "--lora", "--lora-rank", "4",
                                                     *extra))
        kept = prune_by_learning.main(args)
        runs[name] = kept, read_metrics(os.path.join(str(folder / "results"), f"compile-{name}-DiT-XS-4", "metrics.jsonl"))
    assert 2 <= counters["stats"]["unique_graphs"] <= models.COMPILED_BLOCK_VARIANTS
    assert runs["compiled"][0] == runs["eager"][0]
    eager_losses = [record["loss"] for record in runs["eager"][1]]
    assert len(eager_losses) == 6
    assert [record["loss"] for record in runs["compiled"][1]] == pytest.approx(eager_losses, rel=1e-4)


# ----------------------------------------------------------------------------- slow: the search works
IDENTITY_BLOCKS = (1, 2, 4)  # of 6; groups [[1,2]]*3 -> the right answer keeps blocks 0, 3, 5


@pytest.fixture(scope="module")
def identity_teacher(workspace):
    """A DiT-XS/4 (6 blocks) trained briefly on the digits with blocks 1, 2, 4 held at the
    identity (adaLN zeroed and frozen): the other blocks carry everything it learned, so removing
    one of them hurts while removing an identity block costs nothing."""
    folder, features, _ = workspace
    from diffusion import create_diffusion
    from tinyfusion.io.feature_store import open_feature_dataset
    dataset = open_feature_dataset(features, flip_prob=0.0)
    data = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.stack([dataset[i][1] for i in range(len(dataset))])
    model = xs_model(depth=6, seed=1)
    for index in IDENTITY_BLOCKS:
        set_block_gates(model.blocks[index], 0.0)
        model.blocks[index].adaLN_modulation.requires_grad_(False)
    diffusion = create_diffusion("")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        index = torch.randint(0, len(data), (32,), generator=generator)
        t = torch.randint(0, 1000, (32,), generator=generator)
        loss = diffusion.training_losses(model, data[index], t, dict(y=labels[index]))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for index in IDENTITY_BLOCKS:
        assert model.blocks[index].adaLN_modulation[-1].weight.abs().sum() == 0
    return save_plain(model, folder / "identity_teacher.pt")


def search_args(folder, features, teacher, prefix):
    args = run_args(folder, features, teacher, prefix, "--epochs", "50", "--max-steps", "200", "--log-every", "50",
                    "--ckpt-every", "1000", "--ema-decay", "0.99", "--global-batch-size", "16", "--delta-w", "--lora")
    args[args.index("[[1,2]]*2")] = "[[1,2]]*3"
    return args


@pytest.mark.slow
def test_search_keeps_the_blocks_the_teacher_uses(workspace, identity_teacher):
    folder, features, _ = workspace
    kept = prune_by_learning.main(prune_by_learning.parse_args(search_args(folder, features, identity_teacher, "id")))
    assert kept == [0, 3, 5]


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_converge_and_save_the_kept_original_blocks(workspace, identity_teacher):
    folder, features, _ = workspace
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
               os.path.join(ROOT, "prune_by_learning.py"), *search_args(folder, features, identity_teacher, "ddp")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = os.path.join(str(folder / "results"), "ddp-DiT-XS-4")
    records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    assert records[-1]["kept_indices"] == [0, 3, 5]
    assert min(records[-1]["confidences"]) > 0.9  # converged, not a coin flip
    assert "2 rank(s) (gloo)" in open(os.path.join(run_dir, "log.txt")).read()
    saved = load_checkpoint_file(os.path.join(run_dir, "pruned.pt"))
    plain = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=3)
    plain.load_state_dict(saved, strict=True)
    original = torch.load(identity_teacher, weights_only=True)
    for key, value in plain.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{[0, 3, 5][int(index)]}.{rest}"
        assert torch.equal(value, original[key]), key

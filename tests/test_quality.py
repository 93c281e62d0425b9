"""--eval-every (tinyfusion/evaluation/quality.py): the FID it logs is evaluator.py's FID of the same samples
computed independently from the checkpoint's EMA weights, and the training is untouched: a run
with it ends with the bit-identical checkpoint of a run without it, also after a resume."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import train
import train_masked_kd
from tinyfusion.errors import TinyFusionError
from test_train import assert_same_tensors, checkpoint, parse
from training_helpers import ROOT, make_digits_store, make_teacher_and_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EVAL_STEPS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    features = make_digits_store(str(folder))
    teacher, student = make_teacher_and_student(str(folder))
    classifier, reference = str(folder / "classifier.pt"), str(folder / "reference.npz")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_digits_classifier.py"), "--out", classifier,
                    "--ref-out", reference, "--image-size", "8", "--epochs", "1", "--threads", "1"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    return {"folder": folder, "features": features, "teacher": teacher, "student": student,
            "classifier": classifier, "reference": reference}


def eval_flags(workspace, every=2):
    return ["--eval-every", str(every), "--eval-ref", workspace["reference"], "--eval-feature-net",
            workspace["classifier"], "--eval-samples", "6", "--eval-steps", str(EVAL_STEPS), "--eval-batch-size", "4",
            "--eval-cfg-scale", "4.0", "--eval-seed", "3"]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def independent_fid(workspace, checkpoint_path):
    """The checkpoint's EMA weights sampled through generate and scored by evaluator.py's evaluate (the
    whole ADM path, from an .npz), sharing nothing with the hook but the sampler and the network."""
    from tinyfusion.evaluation.batch_metrics import evaluate
    from tinyfusion.evaluation.feature_networks import load_feature_network
    from tinyfusion.families.build import build_model
    from tinyfusion.sampling.generate import generate, sample_generator, sample_labels
    from tinyfusion.families.dit import sampling_process
    from tinyfusion.io.vae import to_uint8_nhwc
    model, _ = build_model("DiT-XS/4", 8, 10, "none", ckpt=checkpoint_path, use_ema=True)
    model.eval()
    labels = sample_labels(3, range(6), 10)
    solver = sampling_process("dpm-solver++", EVAL_STEPS, "linspace")
    images = [to_uint8_nhwc(generate(model, solver, labels[start: start + 4],
                                     [sample_generator(3, i) for i in range(start, min(start + 4, 6))], 4.0,
                                     "dpm-solver++", pad_to=4)).numpy() for start in (0, 4)]
    path = os.path.join(os.path.dirname(checkpoint_path), "independent.npz")
    np.savez(path, arr_0=np.concatenate(images), labels=labels.numpy())
    network = load_feature_network(workspace["classifier"], device="cpu")
    return evaluate(workspace["reference"], path, network, batch_size=4, log=lambda *a: None)


def test_eval_every_logs_the_fid_and_leaves_the_training_bit_exact(workspace, tmp_path):
    flags = ["--load-weight", workspace["student"], "--max-steps", "4", "--ckpt-every", "2", "--log-every", "2",
             "--ema-decay", "0.5", "--lr", "1e-2"]  # EMA weights that move within 4 steps
    train.main(parse(train, workspace, tmp_path / "plain", *flags))
    train.main(parse(train, workspace, tmp_path / "eval", *flags, *eval_flags(workspace)))
    plain_dir, eval_dir = tmp_path / "plain" / "run-DiT-XS-4", tmp_path / "eval" / "run-DiT-XS-4"
    final = {name: checkpoint(run / "checkpoints" / "0000004.pt") for name, run in (("plain", plain_dir),
                                                                                      ("eval", eval_dir))}
    for key in ("model", "ema", "opt", "sched", "rng"):
        assert_same_tensors(final["plain"][key], final["eval"][key], key)
    plain, measured = records(plain_dir), records(eval_dir)
    assert [r["loss"] for r in plain] == [r["loss"] for r in measured]
    assert [r["step"] for r in measured if "eval_fid" in r] == [2, 4] and not any("eval_fid" in r for r in plain)
    # the logged FID and accuracy are evaluator.py's for the same samples of the step-4 EMA weights
    expected = independent_fid(workspace, str(eval_dir / "checkpoints" / "0000004.pt"))
    assert measured[-1]["eval_fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert measured[-1]["eval_accuracy"] == expected["classifier_accuracy"]
    assert measured[0]["eval_fid"] != measured[-1]["eval_fid"]  # other weights, other samples' statistics
    assert "eval FID" in open(eval_dir / "log.txt").read()

    # a resume from step 2 with --eval-every ends at the same checkpoint and measures the same
    resumed_dir = tmp_path / "resumed" / "run-DiT-XS-4"
    shutil.copytree(eval_dir, resumed_dir)
    os.remove(resumed_dir / "checkpoints" / "0000004.pt")
    train.main(parse(train, workspace, tmp_path / "resumed", *flags, *eval_flags(workspace), "--resume", "auto"))
    resumed = checkpoint(resumed_dir / "checkpoints" / "0000004.pt")
    for key in ("model", "ema", "opt", "sched", "rng"):
        assert_same_tensors(final["eval"][key], resumed[key], key)
    assert records(resumed_dir)[-1]["eval_fid"] == measured[-1]["eval_fid"]


@pytest.mark.parametrize("script", [train, train_masked_kd])
@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "2"], "--eval-every needs --eval-ref"),
    (["--eval-every", "3", "--log-every", "2", "--eval-ref", "REF"], "--eval-every 3 must be a multiple of --log-every 2"),
    (["--eval-every", "2", "--log-every", "2", "--eval-ref", "missing.npz"], "--eval-ref missing.npz does not exist"),
])
def test_unusable_eval_flags_are_one_line_before_any_folder(workspace, tmp_path, flags, message, script):
    flags = [workspace["reference"] if flag == "REF" else flag for flag in flags]
    with pytest.raises(TinyFusionError, match=message):
        script.main(parse(script, workspace, tmp_path / "runs", "--max-steps", "2", *flags))
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
def test_eval_every_on_two_ranks(workspace, tmp_path):
    """Rank 0 measures while rank 1 waits at its next all-reduce: the run ends, logs the FID, and its
    weights are those of the same 2-rank run without --eval-every."""
    from training_helpers import COMMON_FLAGS, MODEL, torchrun
    common = ["--model", MODEL, "--data-path", workspace["features"], "--global-batch-size", "8", *COMMON_FLAGS,
              "--load-weight", workspace["student"], "--max-steps", "4", "--ckpt-every", "4", "--log-every", "2"]
    for name, extra in (("plain", []), ("eval", eval_flags(workspace))):
        done = torchrun("train.py", [*common, "--results-dir", str(tmp_path / name), *extra])
        assert done.returncode == 0, done.stderr[-3000:]
    plain = checkpoint(tmp_path / "plain" / "run-DiT-XS-4" / "checkpoints" / "0000004.pt")
    measured = checkpoint(tmp_path / "eval" / "run-DiT-XS-4" / "checkpoints" / "0000004.pt")
    for key in ("model", "ema", "opt"):
        assert_same_tensors(plain[key], measured[key], key)
    assert [r["step"] for r in records(tmp_path / "eval" / "run-DiT-XS-4") if "eval_fid" in r] == [2, 4]

"""Every numeric flag of every script is checked when the flags are parsed, before any work and
before any folder exists: a negative --tau-range, --scaling-range or --logits-lr-scale used to keep
exactly the complement of the right blocks, and --min-lr above --lr to raise the lr, with exit 0.

Each row of TABLE runs the script's own `__main__` up to its argparse call (no torch, no work)
with one bad value; test_every_numeric_flag_has_a_row fails when a script gains a numeric flag
without a validated type and a row here."""
import argparse
import os
import runpy
import subprocess
import sys

import pytest

from tinyfusion import flags as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the arguments a script requires before its numeric flags are looked at
REQUIRED = {"train.py": ["--data-path", "d"], "train_masked_kd.py": ["--data-path", "d"],
            "prune_by_learning.py": ["--data-path", "d"], "extract_features.py": ["--data-path", "d"],
            "save_npz.py": ["--image_dir", "d"], "evaluator.py": ["ref.npz", "sample.npz"],
            "export_diffusers.py": ["--ckpt", "c.pt", "--out", "o"]}
TRAINING = ("train.py", "train_masked_kd.py", "prune_by_learning.py")
MODEL_ARGS = ("sample.py", "sample_ddp.py", "prune_by_index.py", "prune_by_score.py", "extract_features.py",
              "export_diffusers.py", "visualize_activation.py", *TRAINING)
SIT_TRAINING = (*TRAINING, "visualize_activation.py")
SIT_SAMPLING = ("sample.py", "sample_ddp.py")
POSITIVE, NONNEGATIVE = "must be a positive", "must be >= 0"
INTEGER, NUMBER, UNIT = "expected an integer", "expected a number", "must be in [0, 1]"

TABLE = [
    *[(script, argv, fragment) for script in MODEL_ARGS for argv, fragment in [
        (["--image-size", "0"], POSITIVE), (["--num-classes", "-3"], POSITIVE), (["--image-size", "2.5"], INTEGER),
        (["--groups", "[[3,2]]"], "keeps 1 to `of` blocks"), (["--groups", "[[0,2]]"], "keeps 1 to `of` blocks")]],
    *[(script, argv, fragment) for script in TRAINING for argv, fragment in [
        (["--epochs", "0"], POSITIVE), (["--max-steps", "-1"], POSITIVE), (["--global-batch-size", "0"], POSITIVE),
        (["--global-seed", "-1"], NONNEGATIVE), (["--num-workers", "-1"], NONNEGATIVE), (["--log-every", "0"], POSITIVE),
        (["--ckpt-every", "0"], POSITIVE), (["--lr", "-0.0001"], POSITIVE), (["--lr", "nan"], NUMBER),
        (["--min-lr", "-1"], NONNEGATIVE), (["--weight-decay", "-0.1"], NONNEGATIVE), (["--grad-clip", "-1"], NONNEGATIVE),
        (["--ema-decay", "1.01"], UNIT), (["--max-skipped-in-a-row", "0"], POSITIVE),
        # cross-flag: the cosine schedule would climb from --lr up to --min-lr
        (["--lr", "1e-4", "--min-lr", "2e-4", "--lr-schedule", "cosine"], "is above --lr 0.0001")]],
    *[(script, argv, "must lie in [0, 0.5)") for script in (*SIT_TRAINING, *SIT_SAMPLING, "prune_by_score.py")
      for argv in (["--train-eps", "-0.1"], ["--sample-eps", "0.5"])],
    *[(script, argv, fragment) for script in SIT_SAMPLING for argv, fragment in [
        (["--atol", "0"], POSITIVE), (["--rtol", "-0.001"], POSITIVE), (["--diffusion-norm", "-1"], NONNEGATIVE),
        (["--last-step-size", "0.7"], "must lie in [0, 0.5)"), (["--cfg-scale", "-1"], NONNEGATIVE),
        (["--ddim-eta", "1.5"], UNIT), (["--num-sampling-steps", "0"], POSITIVE),
        (["--num-sampling-steps", "1001"], "at most the diffusion's 1000 steps for a DiT")]],
    *[(script, argv, fragment) for script in SIT_TRAINING for argv, fragment in [
        (["--mask-ratio-min", "1.5"], UNIT), (["--diffusion-batch-mul", "0"], POSITIVE)]],
    *[(script, argv, fragment) for script in SIT_SAMPLING for argv, fragment in [
        (["--num-iter", "0"], POSITIVE), (["--temperature", "0"], POSITIVE)]],
    ("sample.py", ["--seed", "-1"], NONNEGATIVE),
    ("sample.py", ["--class-labels", "3", "-1"], NONNEGATIVE),
    ("sample_ddp.py", ["--per-proc-batch-size", "0"], POSITIVE),
    ("sample_ddp.py", ["--num-fid-samples", "0"], POSITIVE),
    ("sample_ddp.py", ["--global-seed", "-2"], NONNEGATIVE),
    ("sample_ddp.py", ["--cpu-threads", "0"], POSITIVE),
    ("prune_by_learning.py", ["--tau-range", "0", "-1"], POSITIVE),  # tau = 0: a NaN Gumbel-softmax step
    ("prune_by_learning.py", ["--tau-range", "4", "-0.1"], POSITIVE),
    ("prune_by_learning.py", ["--scaling-range", "-100", "-100"], POSITIVE),  # keeps the complement
    ("prune_by_learning.py", ["--scaling-range", "100", "0"], POSITIVE),
    ("prune_by_learning.py", ["--logits-lr-scale", "-10"], POSITIVE),  # ascends the loss: the complement again
    ("prune_by_learning.py", ["--lora-rank", "0"], POSITIVE),
    *[(script, argv, fragment) for script in ("train.py", "train_masked_kd.py") for argv, fragment in [
        (["--eval-every", "0"], POSITIVE), (["--eval-samples", "0"], POSITIVE), (["--eval-steps", "0"], POSITIVE),
        (["--eval-steps", "1001"], "--eval-steps: must be at most the diffusion's 1000 steps"),
        (["--eval-cfg-scale", "-1"], NONNEGATIVE), (["--eval-seed", "-1"], NONNEGATIVE),
        (["--eval-batch-size", "0"], POSITIVE)]],
    ("train_masked_kd.py", ["--alpha-kd", "1.5"], UNIT),
    ("train_masked_kd.py", ["--beta-feat", "-0.01"], NONNEGATIVE),
    ("train_masked_kd.py", ["--mask-sigma", "-2"], NONNEGATIVE),
    ("train_masked_kd.py", ["--lr", "5e-5"], "--min-lr: 0.0001 is above --lr 5e-05"),  # its default --min-lr 1e-4
    ("prune_by_score.py", ["--nsamples", "0"], POSITIVE),
    ("prune_by_score.py", ["--batch-size", "0"], POSITIVE),
    ("prune_by_score.py", ["--n-pruned", "-1"], NONNEGATIVE),
    ("prune_by_score.py", ["--seed", "-1"], NONNEGATIVE),
    ("prune_by_score.py", ["--cfg-scale", "-4"], NONNEGATIVE),
    ("prune_by_score.py", ["--num-sampling-steps", "1001"], "at most the diffusion's 1000 steps for a DiT"),
    ("prune_by_index.py", ["--kept-indices", "[-1, 2]"], "block indices count from 0"),
    ("prune_by_index.py", ["--cfg-scale", "-1.5"], NONNEGATIVE),
    ("prune_by_index.py", ["--num-sampling-steps", "0"], POSITIVE),
    ("prune_by_index.py", ["--seed", "-1"], NONNEGATIVE),
    ("prune_by_index.py", ["--nsamples", "0"], POSITIVE),
    ("prune_by_index.py", ["--batch-size", "0"], POSITIVE),
    ("extract_features.py", ["--global-seed", "-1"], NONNEGATIVE),
    ("extract_features.py", ["--num-workers", "-1"], NONNEGATIVE),
    ("extract_features.py", ["--batch-size", "0"], POSITIVE),
    ("extract_features.py", ["--shard-size", "0"], POSITIVE),
    *[("extract_features.py", [flag, "0"], POSITIVE)  # the original's flags, accepted and ignored
      for flag in ("--epochs", "--global-batch-size", "--log-every", "--ckpt-every")],
    ("save_npz.py", ["--num", "0"], POSITIVE),
    ("evaluator.py", ["--batch-size", "0"], POSITIVE),
    ("visualize_activation.py", ["--nsamples", "0"], POSITIVE),
    ("visualize_activation.py", ["--batch-size", "-1"], POSITIVE),
    ("visualize_activation.py", ["--seed", "-1"], NONNEGATIVE),
    ("visualize_activation.py", ["--timestep", "1000"], "a timestep in [0, 1000)"),
    ("visualize_activation.py", ["--timestep", "-1"], "a timestep in [0, 1000)"),
    ("visualize_activation.py", ["--time", "1.5"], UNIT),
    ("visualize_activation.py", ["--mask-sigma", "0"], POSITIVE),
    ("visualize_activation.py", ["--topk", "0"], POSITIVE),
    ("draw_decision.py", ["--depth", "0"], POSITIVE),
    ("quickstart.py", ["--seeds", "0"], POSITIVE),
    ("quickstart.py", ["--nproc", "0"], POSITIVE),
    ("reproduce.py", ["--nproc", "-2"], POSITIVE),
    ("reproduce.py", ["--threads", "0"], POSITIVE),
    ("download.py", ["--timeout", "0"], POSITIVE),
    ("download.py", ["--timeout", "nan"], NUMBER),
]


class Parsed(Exception):
    """Raised instead of returning from ArgumentParser.parse_args: the script does no work."""


def parse_with_script(script, argv):
    """(parser, args) of `script`'s own __main__ run with `argv`, stopped right after parsing; a
    parse error is the SystemExit argparse raises."""
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(self, real_parse_args(self, args, namespace))

    saved_argv, saved_path = sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [script, *REQUIRED.get(script, []), *argv]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except Parsed as parsed:
        return parsed.args
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{script} never called ArgumentParser.parse_args")


@pytest.mark.parametrize("script, argv, fragment", TABLE, ids=[f"{s} {' '.join(a)}" for s, a, _ in TABLE])
def test_bad_numeric_value_stops_at_parsing(script, argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        parse_with_script(script, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert fragment in err, err
    assert err.count("error:") == 1
    assert os.listdir(tmp_path) == []


SCRIPTS = ["train.py", "train_masked_kd.py", "prune_by_learning.py", "prune_by_score.py", "prune_by_index.py",
           "sample.py", "sample_ddp.py", "extract_features.py", "save_npz.py", "evaluator.py", "export_diffusers.py",
           "visualize_activation.py", "draw_decision.py", "download.py", "quickstart.py", "reproduce.py"]


def test_every_numeric_flag_has_a_row():
    covered = {(script, arg) for script, argv, _ in TABLE for arg in argv if arg.startswith("--")}
    unchecked, missing = [], []
    for script in SCRIPTS:
        parser, _ = parse_with_script(script, [])
        for action in parser._actions:
            flag = action.option_strings[-1] if action.option_strings else action.dest
            if action.type in (int, float):
                unchecked.append(f"{script} {flag}")
            if action.type in (*cli.NUMERIC_TYPES, cli.parse_groups, cli.parse_index_list) and not (
                    any((script, option) in covered for option in action.option_strings)):
                missing.append(f"{script} {flag}")
    assert not unchecked, f"numeric flags without a validated type: {unchecked}"
    assert not missing, f"numeric flags without a row in TABLE: {missing}"


@pytest.mark.parametrize("script, argv", [
    ("prune_by_learning.py", ["--tau-range", "4", "4"]),  # a constant temperature
    ("prune_by_learning.py", ["--tau-range", "0.1", "4"]),  # either direction: the original's linear schedule
    ("train.py", ["--lr", "1e-4", "--min-lr", "2e-4", "--lr-schedule", "constant"]),  # no schedule to invert
    ("sample.py", ["--model", "SiT-XS/4", "--num-sampling-steps", "1500"]),  # a SiT's ODE / SDE grid has no limit
    ("sample_ddp.py", ["--model", "SiT-XS/4", "--num-sampling-steps", "1500"]),
    ("sample.py", ["--num-sampling-steps", "1000", "--ddim-eta", "1"]),
])
def test_good_values_at_the_edges_are_accepted(script, argv):
    parse_with_script(script, argv)


@pytest.mark.parametrize("script, argv, fragment", [
    ("prune_by_learning.py", ["--data-path", "d", "--tau-range", "0", "-1", "--results-dir", "runs"], "--tau-range"),
    ("train.py", ["--data-path", "d", "--lr", "1e-5", "--results-dir", "runs"], "--min-lr: 0.0001 is above --lr 1e-05"),
    ("sample_ddp.py", ["--num-sampling-steps", "1001", "--sample-dir", "samples"], "--num-sampling-steps"),
])
def test_a_real_run_stops_with_one_line_and_creates_nothing(script, argv, fragment, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], done.stderr
    assert "Traceback" not in done.stderr and os.listdir(tmp_path) == []

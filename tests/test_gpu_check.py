"""bench/gpu_check.sh, the GPU owner's check: it is valid bash, runs every script of the recipes,
reports a failing check as FAIL with exit code 1, and its CPU dry-run passes end to end (slow)."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
RECIPE_SCRIPTS = {"extract_features.py", "prune_by_learning.py", "prune_by_score.py", "prune_by_index.py", "train.py",
                  "train_masked_kd.py", "sample.py", "sample_ddp.py", "evaluator.py"}
CHECKS = 18  # the lines of a full run: process group, data, 15 script runs (3 precisions each for train, sample_ddp,
# and sample_ddp with dpm-solver++), ratio, the fast solvers' images/s


def called_scripts():
    """The repository's .py files the check runs (through torchrun, `script` or $ROOT/...)."""
    text = open(SCRIPT).read()
    return set(re.findall(r"(?:torchrun|script) ([\w/]+\.py)", text)) | set(re.findall(r"\$ROOT/([\w/]+\.py)", text))


def run_check(*flags, python=sys.executable, timeout=None):
    return subprocess.run(["bash", SCRIPT, *flags], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, PYTHON=python))


def verdicts(stdout):
    return re.findall(r"^(PASS|FAIL)  (.+?)\s{2,}", stdout, flags=re.M)


def test_gpu_check_is_valid_bash_and_runs_every_recipe_script():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    called = called_scripts()
    assert RECIPE_SCRIPTS <= called, RECIPE_SCRIPTS - called
    missing = [name for name in called if not os.path.isfile(os.path.join(ROOT, name))]
    assert not missing


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path):
    """With an interpreter that always fails (`false`), every check is a FAIL line (the later ones
    not run, naming the missing input) and the exit code is 1; no torch is involved."""
    done = run_check("--cpu-dry-run", "--out", str(tmp_path / "work"), python="false")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = verdicts(done.stdout)
    assert len(lines) == CHECKS and {verdict for verdict, _ in lines} == {"FAIL"}, done.stdout
    assert "not run: digits is missing" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith(f"gpu_check (cpu-dry-run): 0 passed, {CHECKS} failed")
    assert os.path.isfile(tmp_path / "work" / "logs" / "process-group.log")


def test_unknown_option_is_refused():
    done = run_check("--bogus")
    assert done.returncode == 2 and "unknown option --bogus" in done.stderr


@pytest.mark.slow  # every script under torchrun (2 gloo ranks) for a few steps: minutes on 2 cores
def test_cpu_dry_run_passes_every_check(tmp_path):
    work = tmp_path / "work"
    done = run_check("--cpu-dry-run", "--out", str(work), timeout=3600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = verdicts(done.stdout)
    assert len(lines) == CHECKS and {verdict for verdict, _ in lines} == {"PASS"}, done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"gpu_check (cpu-dry-run): {CHECKS} passed, 0 failed; logs in {work}/logs"
    group_log = open(work / "logs" / "process-group.log").read()
    assert "rank 0/2 on cpu: gloo all_reduce ok" in group_log and "rank 1/2 on cpu: gloo all_reduce ok" in group_log
    for precision in ("fp32", "bf16", "fp16"):
        assert len(os.listdir(work / "samples" / precision)) >= 1
    with open(work / "eval.json") as f:
        assert math.isfinite(json.load(f)["fid"])
    with open(work / "ratio.json") as f:
        ratio = json.load(f)
    assert ratio["config"]["stand_in"] and math.isfinite(ratio["speedup"]) and ratio["speedup"] > 0
    assert len(os.listdir(work / "samples" / "fp32-dpm-solver++")) >= 1
    for solver in ("dpm-solver++", "unipc"):
        with open(work / f"solver-{solver}.json") as f:
            record = json.load(f)
        assert record["config"]["sampler"] == solver and record["config"]["nfe"] == 20
        assert all(rate > 0 for rate in record["images_per_s"].values())
    assert "at NFE 20: images/s DiT-XL/2" in done.stdout  # shown on the console

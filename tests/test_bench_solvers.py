"""bench/bench_solvers.py: the quality-vs-cost table from hand-made records (the statistics and
the equal-quality choice computed by hand), and end to end on tiny inputs (slow)."""
import argparse
import glob
import json
import os
import subprocess
import sys

import pytest

from bench import bench_solvers
from training_helpers import ROOT


def records_of(model, sampler, steps, fids, rate):
    return [dict(model=model, sampler=sampler, steps=steps, nfe=steps, seed=seed, fid=fid, accuracy=0.8 + 0.01 * seed,
                 images_per_sec=rate) for seed, fid in enumerate(fids)]


def test_settings_parse_and_bad_ones_are_refused():
    assert bench_solvers.parse_settings("ddpm:250,50;unipc:10") == [("ddpm", 250), ("ddpm", 50), ("unipc", 10)]
    for bad in ("heun:10", "ddpm", "ddpm:ten"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_solvers.parse_settings(bad)


def test_table_statistics_and_equal_quality_by_hand():
    records = (records_of("teacher", "ddpm", 250, [10, 11, 12], 5.0)       # mean 11, seed std 1: FID <= 12
               + records_of("teacher", "ddpm", 50, [20, 21, 22], 25.0)     # above: no ddpm row qualifies but 250
               + records_of("teacher", "dpm-solver++", 10, [14, 15, 16], 125.0)  # mean 15: above 12
               + records_of("teacher", "dpm-solver++", 15, [11.5, 12, 12.5], 83.0)  # mean 12 <= 12: chosen
               + records_of("teacher", "dpm-solver++", 25, [11, 11, 11], 50.0)      # good too, but more NFE
               + records_of("teacher", "unipc", 10, [15, 16, 17], 125.0)           # never good enough
               + records_of("teacher", "ddim", 10, [5, 6, 7], 125.0)    # better FID than DDPM 250 counts ...
               + [dict(r, accuracy=r["accuracy"] - 0.05) for r in       # ... unless accuracy falls below
                  records_of("teacher", "ddim", 5, [4, 5, 6], 250.0)])  # 0.81 - 0.01 (0.76 here): refused
    rows = bench_solvers.summarize(records)
    row = next(r for r in rows if (r["sampler"], r["steps"]) == ("dpm-solver++", 15))
    assert row["fid"]["mean"] == pytest.approx(12.0) and row["fid"]["std"] == pytest.approx(0.5)
    # 95% t interval, 2 degrees of freedom: t = 4.3027, half width 4.3027 * 0.5 / sqrt(3) = 1.2421
    assert row["fid"]["low"] == pytest.approx(12 - 1.2421, abs=1e-4)
    # per seed minus DDPM 250: 1.5, 1.0, 0.5 -> mean 1.0, std 0.5, the same half width
    assert row["fid_vs_baseline"]["mean"] == pytest.approx(1.0)
    assert row["fid_vs_baseline"]["high"] == pytest.approx(1 + 1.2421, abs=1e-4)
    assert row["accuracy"]["mean"] == pytest.approx(0.81)
    chosen = bench_solvers.equal_quality(rows)["teacher"]
    assert chosen["dpm-solver++"]["nfe"] == 15 and chosen["unipc"] is None and chosen["ddpm"]["nfe"] == 250
    assert chosen["ddim"]["nfe"] == 10
    table = bench_solvers.markdown(rows, {"teacher": chosen})
    assert "| teacher | dpm-solver++ | 15 | 12.00 | 83.00 | 16.60x |" in table  # 83 / 5 images/s
    assert "| teacher | unipc | none reaches it | | | |" in table
    assert "| teacher | dpm-solver++ | 15 | 12.00 +/- 0.50 | [10.76, 13.24] | +1.00 [-0.24, +2.24] | 0.810 +/- 0.010 |" \
        in table


@pytest.mark.slow
def test_bench_solvers_end_to_end_on_tiny_inputs(tmp_path):
    """Two tiny checkpoints, a 1-epoch digits classifier, 8 images per point, 2 seeds: every point is
    a real sample_ddp.py + evaluator.py run, the table, JSON and plot are written, and a rerun
    measures nothing again."""
    from test_sampling import save_tame_checkpoint
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    classifier, reference = str(tmp_path / "classifier.pt"), str(tmp_path / "reference.npz")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_digits_classifier.py"), "--out", classifier,
                    "--ref-out", reference, "--image-size", "8", "--epochs", "1", "--threads", "1"],
                   check=True, env=env, capture_output=True)
    teacher = save_tame_checkpoint(tmp_path / "teacher.pt", depth=2, seed=0)
    student = save_tame_checkpoint(tmp_path / "student.pt", depth=1, seed=1)
    out = str(tmp_path / "solvers")
    command = [sys.executable, os.path.join(ROOT, "bench", "bench_solvers.py"), "--teacher", teacher, "--student",
               student, "--classifier", classifier, "--reference", reference, "--out", out,
               "--model-flags", "--model DiT-XS/4 --image-size 8 --vae none --num-classes 10 --cfg-scale 4.0",
               "--settings", "ddpm:4;dpm-solver++:2,3", "--baseline", "ddpm:4", "--seeds", "0", "1",
               "--num-samples", "8", "--batch", "4", "--nproc", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(os.path.join(out, "solvers.json")) as f:
        result = json.load(f)
    assert len(result["records"]) == 2 * 3 * 2 and len(result["rows"]) == 2 * 3
    assert {(r["model"], r["sampler"], r["nfe"]) for r in result["rows"]} == {
        (m, s, n) for m in ("teacher", "student") for s, n in (("ddpm", 4), ("dpm-solver++", 2), ("dpm-solver++", 3))}
    assert all(r["fid"] > 0 and 0 <= r["accuracy"] <= 1 and r["images_per_sec"] > 0 for r in result["records"])
    # a seed's points of two samplers differ (other images), the same point is not re-sampled on a rerun
    fids = {(r["model"], r["sampler"], r["steps"], r["seed"]): r["fid"] for r in result["records"]}
    assert fids[("teacher", "ddpm", 4, 0)] != fids[("teacher", "dpm-solver++", 2, 0)]
    assert os.path.getsize(os.path.join(out, "solvers.png")) > 1000 and "| teacher | ddpm | 4 |" in done.stdout
    npz_times = {path: os.path.getmtime(path) for path in glob.glob(os.path.join(out, "points", "*", "*.npz"))}
    assert len(npz_times) == 12
    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and {p: os.path.getmtime(p) for p in npz_times} == npz_times


def test_the_solvers_page_holds_the_table_of_its_json():
    """docs/solvers.md's table is bench_solvers.markdown of the rows kept in bench/solvers.json, with
    the equal-quality choice recomputed by today's rule (regenerate: python bench/bench_solvers.py
    --run quickstart-run --write docs/solvers.md, then copy quickstart-run/solvers/solvers.json)."""
    from bench.report import replace_generated
    with open(os.path.join(ROOT, "bench", "solvers.json")) as f:
        rows = json.load(f)["rows"]
    table = bench_solvers.markdown(rows, bench_solvers.equal_quality(rows)).rstrip("\n")
    with open(os.path.join(ROOT, "docs", "solvers.md")) as f:
        page = f.read()
    assert replace_generated(page, table) == page

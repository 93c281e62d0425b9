"""The quick start end to end. The default suite runs the cheap path (tiny schedules, one process
per stage, the learned method only: digits -> features -> classifier -> teacher -> learnable
pruning -> decision plot -> Masked KD -> sampling -> evaluation, each through the real script);
`-m slow` runs every method with two processes per stage. Both check that every artefact lands in
the run folder, the results table parses, a rerun reuses every finished stage, only the final
checkpoints are kept, the grids are the labelled layout and the logged commands can be pasted."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import quickstart  # noqa: E402


def run_quickstart(out, *extra):
    # one intra-op thread per process, as everywhere in the suite: torchrun sets it only for 2+ ranks, and
    # OpenMP's spinning threads make these tiny models 10x slower on a shared CPU
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--out", str(out),
                           "--schedule", "tiny", *extra], cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env=env)


def check_run_folder(out, result, names, models, model_slug="DiT-XS-4"):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.path.join(str(out), "logs", "<stage>.log") in result.stdout  # where the logs are is printed
    assert "[teacher] done in" in result.stdout
    for artefact in ["shared/features/manifest.json", "shared/digits_classifier.pt", "shared/reference.npz",
                     "pruned/learned.pt", "decision.png", "results.md", "results.json"]:
        assert (out / artefact).exists(), artefact
    # later stages read only each run's final checkpoint: the intermediate ones are gone
    assert os.listdir(out / "runs" / f"teacher-{model_slug}" / "checkpoints") == ["0000030.pt"]
    assert not [name for name in os.listdir(out / "runs" / f"prune-{model_slug}" / "checkpoints") if name.endswith(".pt")]
    for name in names:
        assert (out / "samples" / f"{name}.png").exists() and (out / "samples" / f"{name}.json").exists(), name

    # the markdown table: a header, a rule, one row per model with finite metrics
    lines = (out / "results.md").read_text().strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "depth", "params", "kept", "images_per_sec"] and "fid" in header
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    assert [row["model"] for row in rows] == models
    assert rows[0]["depth"] == "12" and all(row["depth"] == "6" for row in rows[1:])
    for row in rows:
        for column in ("fid", "inception_score", "precision", "recall", "accuracy"):
            assert float(row[column]) == float(row[column]) and abs(float(row[column])) < 1e6, (row, column)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == len(models)

    # a logged command is shell-quoted: pasted into a shell it gives back the same arguments
    with open(out / "logs" / "prune-learned.log") as log:
        logged = log.readline()
    assert logged.startswith("$ ") and "[[1,2]]*6" in shlex.split(logged[2:])

    # the grid: one row per class present among the samples, 8 px digits upscaled to 64 px tiles
    from PIL import Image
    with np.load(next((out / "samples" / "teacher").rglob("*.npz"))) as batch:
        classes = len(np.unique(batch["labels"]))
    with Image.open(out / "samples" / "teacher.png") as grid:
        assert grid.size[1] == 4 + classes * (64 + 4)


def check_rerun_does_no_work(out, *extra):
    again = run_quickstart(out, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "running" not in again.stdout
    return again.stdout.count("done already")


def test_quickstart_cheap_path_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_quickstart(out, "--nproc", "1", "--methods", "learned")
    check_run_folder(out, result, ["teacher", "learned-masked-KD"], ["teacher", "learned + masked KD"])
    assert check_rerun_does_no_work(out, "--nproc", "1", "--methods", "learned") >= 10


@pytest.mark.slow
def test_quickstart_tiny_end_to_end_every_method(tmp_path):
    out = tmp_path / "run"
    result = run_quickstart(out)
    names = ["teacher", "learned-masked-KD", "bi-score-masked-KD", "oracle-masked-KD", "learned-fine-tuning"]
    check_run_folder(out, result, names, ["teacher", "learned + masked KD", "bi-score + masked KD",
                                          "oracle + masked KD", "learned + fine-tuning"])
    for artefact in ["pruned/bi-score.pt", "pruned/oracle.pt"]:
        assert (out / artefact).exists(), artefact
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[3]["kept"] == "0 2 4 7 9 11"  # the oracle pattern, read back from the checkpoint metadata
    with open(out / "logs" / "prune-oracle.log") as log:
        assert "[0, 2, 4, 7, 9, 11]" in shlex.split(log.readline()[2:])
    assert check_rerun_does_no_work(out) >= 15


@pytest.mark.slow
@pytest.mark.parametrize("family, name, slug, sampler_tag", [("sit", "SiT", "SiT-XS-4", "-ode-heun2"),
                                                             ("mar", "MAR", "MAR-XS-2", "-leading-iter-16")])
def test_quickstart_family_has_the_stages_and_rows_of_the_dit_one(tmp_path, family, name, slug, sampler_tag):
    """--family sit (a SiT-XS/4, sampled with SiT's ODE) and --family mar (a MAR-XS/2: 6 encoder +
    6 decoder blocks, sampled with MAR's loop): every stage (one process each, tiny schedules),
    the DiT table's rows, the oracle's blocks, and every checkpoint of the family."""
    from tinyfusion.io.checkpoints import load_checkpoint_file, read_metadata
    out = tmp_path / "run"
    result = run_quickstart(out, "--family", family, "--nproc", "1")
    names = ["teacher", "learned-masked-KD", "bi-score-masked-KD", "oracle-masked-KD", "learned-fine-tuning"]
    check_run_folder(out, result, names, ["teacher", "learned + masked KD", "bi-score + masked KD",
                                          "oracle + masked KD", "learned + fine-tuning"], model_slug=slug)
    teacher = load_checkpoint_file(str(out / "runs" / f"teacher-{slug}" / "checkpoints" / "0000030.pt"))
    assert read_metadata(teacher)["model_family"] == name and teacher["args"]["model"] == slug.replace("-XS-", "-XS/")
    for pruned in ("learned", "bi-score", "oracle"):
        metadata = read_metadata(load_checkpoint_file(str(out / "pruned" / f"{pruned}.pt")))
        assert metadata["model_family"] == name and len(metadata["kept_indices"]) == 6
    assert json.loads((out / "results.json").read_text())["rows"][3]["kept"] == "0 2 4 7 9 11"
    npz = [os.path.basename(path) for path in (out / "samples").rglob("*.npz")]
    assert len(npz) == 5 and all(path.startswith(f"{slug}-") and sampler_tag in path for path in npz), npz
    assert check_rerun_does_no_work(out, "--family", family, "--nproc", "1") >= 15


def test_sample_file_names_are_the_ones_sample_ddp_writes():
    """The quick start finds a finished sampling stage by sample_ddp.py's own naming: the DiT's is
    the original folder name, the SiT's adds its sampler and solver."""
    from tinyfusion.sampling.batch_settings import batch_file_name
    from tinyfusion.sampling.generate import run_name
    common = ["--image-size", "8", "--vae", "none", "--num-classes", "10", "--ckpt", "runs/x/0001500.pt",
              "--num-sampling-steps", "50", "--cfg-scale", "4.0", "--global-seed", "0"]
    assert batch_file_name(["--model", "DiT-XS/4", *common]) == \
        run_name("DiT-XS/4", "runs/x/0001500.pt", 8, "none", 4.0, 0, 50)
    sit = quickstart.FAMILIES["sit"]
    assert batch_file_name(["--model", sit["model"], *common, *sit["sampler"]]) == \
        "SiT-XS-4-0001500-size-8-vae-none-cfg-4.0-seed-0-steps-50-ode-heun2"
    # reproduce.py's samples: balanced labels are another batch; the raw weights' the same name as the EMA's
    assert batch_file_name(["--model", "DiT-XS/4", *common, "--balanced-labels", "--no-ema"]) == \
        run_name("DiT-XS/4", "runs/x/0001500.pt", 8, "none", 4.0, 0, 50) + "-balanced"


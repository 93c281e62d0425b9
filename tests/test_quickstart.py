"""The quick start end to end with tiny schedules (about 2 minutes, so it runs in the default
suite): every stage runs through the real scripts, every artefact lands in the run folder, the
results table parses, and a rerun reuses every finished stage."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_quickstart(out):
    return subprocess.run([sys.executable, os.path.join(ROOT, "quickstart.py"), "--out", str(out),
                           "--schedule", "tiny"], cwd=ROOT, capture_output=True, text=True, timeout=1800)


def test_quickstart_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = run_quickstart(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for artefact in ["shared/features/manifest.json", "shared/digits_classifier.pt", "shared/reference.npz",
                     "runs/teacher-DiT-XS-4/checkpoints/0000030.pt", "pruned/learned.pt", "pruned/bi-score.pt",
                     "pruned/oracle.pt", "decision.png", "results.md", "results.json"]:
        assert (out / artefact).exists(), artefact
    names = ["teacher", "learned-masked-KD", "bi-score-masked-KD", "oracle-masked-KD", "learned-fine-tuning"]
    for name in names:
        assert (out / "samples" / f"{name}.png").exists() and (out / "samples" / f"{name}.json").exists(), name

    # the markdown table: a header, a rule, one row per model with finite metrics
    lines = (out / "results.md").read_text().strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "depth", "params", "kept", "images_per_sec"] and "fid" in header
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    assert [row["model"] for row in rows] == ["teacher", "learned + masked KD", "bi-score + masked KD",
                                             "oracle + masked KD", "learned + fine-tuning"]
    assert rows[0]["depth"] == "12" and all(row["depth"] == "6" for row in rows[1:])
    assert rows[3]["kept"] == "0 2 4 7 9 11"  # the oracle pattern, read back from the checkpoint metadata
    for row in rows:
        for column in ("fid", "inception_score", "precision", "recall", "accuracy"):
            assert float(row[column]) == float(row[column]) and abs(float(row[column])) < 1e6, (row, column)
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 5

    # a rerun does no work: every stage is found finished
    again = run_quickstart(out)
    assert again.returncode == 0
    assert "running" not in again.stdout and again.stdout.count("done already") >= 15

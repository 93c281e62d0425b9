"""draw_decision.py also reads the original's command line `draw_decision.py BASE LOGFILE`: the
stdout of the original prune_by_learning.py, whose `Decision:` lines hold the kept block indices
and `Confidence:` lines one value per group."""
import os
import subprocess
import sys

import numpy as np
import pytest

from draw_decision import original_log_series

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the shape of the original's output: 8 blocks, groups [[2, 4], [2, 4]], --log-every 100
ORIGINAL_LOG = """\
Starting rank=0, seed=0, world_size=1.
Experiment directory created at outputs/learn_mask-DiT-XL-2-4
Dataset contains 1,281,167 images (data/imagenet_encoded)
Training for 1 epochs (300 steps)...
Init Probs and Selection:
Decision: [0, 1, 4, 5]
Confidence: [0.16666666666666666, 0.16666666666666666]
Beginning epoch 0...
(step=0000100) Train Loss: 0.1525, Train Steps/Sec: 1.21, LR: 0.000100
Probs and Selection:
Decision: [0, 2, 4, 7]
Confidence: [0.5833, 0.4167]
(step=0000200) Train Loss: 0.1490, Train Steps/Sec: 1.22, LR: 0.000100
Probs and Selection:
Decision: [1, 2, 5, 7]
Confidence: [0.9167, 0.75]
[!] Final Decision: [1, 2, 5, 7]
[!] Final Confidence: [0.9167, 0.75]
Remaining Layers: [1, 2, 5, 7]
"""


def test_original_log_series_by_hand():
    base = 1 / 6  # 6 candidate masks per [2, 4] group: a uniform choice draws transparent
    steps, kept, alpha = original_log_series(ORIGINAL_LOG.splitlines(), base)
    assert steps.tolist() == [0, 100, 200]  # the Final lines are not a logged step
    assert kept.tolist() == [[0, 1, 4, 5], [0, 2, 4, 7], [1, 2, 5, 7]]
    expected = np.array([[1 / 6] * 4, [0.5833, 0.5833, 0.4167, 0.4167], [0.9167, 0.9167, 0.75, 0.75]])
    np.testing.assert_allclose(alpha, (expected - base) / (1 - base), rtol=0, atol=1e-12)
    assert alpha[0].tolist() == pytest.approx([0, 0, 0, 0], abs=1e-12)


def test_logger_prefix_masks_and_missing_steps():
    # the same decisions through a logger ([time] prefix, ANSI colours), as per-group 0/1 masks,
    # without step lines: every 100 steps, as the original plot assumes
    lines = ["[\x1b[34m2024-12-02 10:00:00\x1b[0m] Decision: [[1, 1, 0, 0], [1, 1, 0, 0]]",
             "[\x1b[34m2024-12-02 10:00:00\x1b[0m] Confidence: [0.2, 0.3]",
             "[2024-12-02 10:05:00] Decision: [[1, 0, 1, 0], [1, 0, 0, 1]]",
             "[2024-12-02 10:05:00] Confidence: [0.6, 0.7]"]
    steps, kept, alpha = original_log_series(lines, 0.0)
    assert steps.tolist() == [0, 100]
    assert kept.tolist() == [[0, 1, 4, 5], [0, 2, 4, 7]]
    assert alpha.tolist() == [[0.2, 0.2, 0.3, 0.3], [0.6, 0.6, 0.7, 0.7]]
    with pytest.raises(ValueError, match="no `Decision"):
        original_log_series(["(step=0000100) Train Loss: 0.1"], 0.5)
    with pytest.raises(ValueError, match="3 kept blocks cannot be spread over 2"):
        original_log_series(["Decision: [0, 2, 5]", "Confidence: [0.5, 0.6]"], 0.5)
    with pytest.raises(ValueError, match="BASE must lie in"):
        original_log_series(["Decision: [0]", "Confidence: [1.0]"], 1.0)


def run(*arguments, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "draw_decision.py"), *arguments], cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)


def test_original_command_line_writes_png_and_pdf(tmp_path):
    (tmp_path / "prune_log.txt").write_text(ORIGINAL_LOG)
    done = run("0.1667", "prune_log.txt", "--depth", "8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    png, pdf = (tmp_path / "decision.png").read_bytes(), (tmp_path / "decision.pdf").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    again = run("0.1667", "prune_log.txt", cwd=tmp_path)  # results are never silently replaced
    assert again.returncode == 2 and "already exists" in again.stderr
    both = run("0.5", "prune_log.txt", "--log", "x", cwd=tmp_path)
    assert both.returncode == 2 and "either --log RUN" in both.stderr
    deep = run("0.5", "prune_log.txt", "--depth", "6", "--out", "d.png", cwd=tmp_path)
    assert deep.returncode == 2 and "keeps block 7, beyond --depth 6" in deep.stderr


def test_existing_png_is_refused_naming_overwrite(tmp_path):
    import argparse
    import json

    import draw_decision
    from tinyfusion.errors import TinyFusionError
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 10, "kept_indices": [0, 3], "confidences": [0.6, 0.9],
                               "groups": [[1, 2], [1, 2]]}) + "\n")
    out = tmp_path / "decision.png"
    out.write_bytes(b"an earlier plot")
    args = argparse.Namespace(original=[], log=str(tmp_path), out=None, title=None, overwrite=False)
    with pytest.raises(TinyFusionError) as refused:
        draw_decision.main(args)
    message = str(refused.value)
    assert "\n" not in message and "--overwrite" in message and str(out) in message
    assert out.read_bytes() == b"an earlier plot"
    draw_decision.main(argparse.Namespace(original=[], log=str(log), out=None, title=None, overwrite=True))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

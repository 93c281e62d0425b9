"""The reproduction study's measurements (tinyfusion/study.py) and report (study_report.py) on
constructed inputs; `reproduce.py --quick` end to end under -m slow."""
import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion import create_diffusion
from models import DiT_models
from tinyfusion.study import activation_statistics, heldout_loss, make_heldout_triples, pattern_subsets
from tinyfusion.study_report import write_report
from training_helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pattern_subsets_enumerate_the_gate_candidates():
    subsets = pattern_subsets([[1, 2]] * 6)
    assert len(subsets) == 64 and len({tuple(s) for s in subsets}) == 64
    assert subsets[0] == [0, 2, 4, 6, 8, 10] and subsets[-1] == [1, 3, 5, 7, 9, 11]
    assert [0, 2, 4, 7, 9, 11] in subsets  # the oracle's pattern is a 1:2 choice
    assert len(pattern_subsets([[2, 4]] * 3)) == 6 ** 3 and len(pattern_subsets([[3, 6]] * 2)) == 20 ** 2
    assert pattern_subsets([[2, 4], [1, 2]]) [:2] == [[0, 1, 4], [0, 1, 5]]


class ToyDataset:
    def __init__(self, count=20):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 3, 8, 8, generator=generator)
        self.y = torch.arange(count) % 10

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


def small_model(depth=3):
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=depth)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.normal_(0, 0.05)
    return model.eval()


def test_heldout_loss_is_the_diffusion_loss_of_the_fixed_triples():
    triples = make_heldout_triples(ToyDataset(), 12, seed=3)
    again = make_heldout_triples(ToyDataset(), 12, seed=3)
    assert all(torch.equal(triples[key], again[key]) for key in triples)
    model = small_model()
    batched = heldout_loss(model, triples, batch_size=5)  # 5 + 5 + 2: batching must not change the mean
    with torch.no_grad():
        terms = create_diffusion("").training_losses(model, triples["x"], triples["t"], dict(y=triples["y"]),
                                                     noise=triples["noise"])
    assert batched["loss"] == pytest.approx(float(terms["loss"].mean()), rel=1e-5)
    assert batched["mse"] == pytest.approx(float(terms["mse"].mean()), rel=1e-5)


def test_activation_statistics_match_a_direct_count():
    triples = make_heldout_triples(ToyDataset(), 8, seed=1)
    model = small_model()
    rows = activation_statistics(model, triples, mask_sigma=1.0)
    x_t = create_diffusion("").q_sample(triples["x"], triples["t"], noise=triples["noise"])
    with torch.no_grad():
        _, hiddens = model(x_t, triples["t"], triples["y"], hidden_indices=[0, 1, 2])
    for row, hidden in zip(rows, hiddens):
        h = hidden.double()
        mu = h.mean(dim=(1, 2), keepdim=True)
        std = ((h - mu) ** 2).mean(dim=(1, 2), keepdim=True).sqrt()
        assert row["masked_share"] == pytest.approx(float(((h - mu).abs() >= std).double().mean()), abs=1e-6)
        assert row["max_abs"] == pytest.approx(float(h.abs().max()), rel=1e-6)
        assert row["std"] == pytest.approx(float(h.std(unbiased=False)), rel=1e-5)
        assert 0.2 < row["masked_share"] < 0.45  # about a third of a roughly Gaussian sample lies beyond 1 std


class FakeStudy:
    def __init__(self, out):
        self.out = out


def test_report_has_every_table_figure_and_verdict(tmp_path):
    rows = [{"kept": [0, 2, 4, 6, 8, 10], "calibration": 1.0, "recovered": 0.5},
            {"kept": [0, 2, 4, 7, 9, 11], "calibration": 2.0, "recovered": 0.4},
            {"kept": [1, 3, 5, 7, 9, 11], "calibration": 3.0, "recovered": 0.6, "fid": 12.5, "accuracy": 0.75}]
    strategy = {"learned": [{"seed": s, "fid": 10.0 + s, "loss": 0.1, "accuracy": 0.9} for s in range(3)],
                "random": [{"seed": s, "fid": 12.0 + s + 0.1 * s * s, "loss": 0.2, "accuracy": 0.8} for s in range(3)]}
    results = {
        "schedule": "quick", "budget": {"teacher": 1}, "wall_minutes": 1.0, "cpu_minutes": 2.0,
        "activations": {"blocks": [{"block": 0, "max_abs": 9.0, "std": 1.0, "max_over_std": 9.0, "masked_share": 0.04,
                                    "masked_share_k4": 0.001}]},
        "calibration": {"rows": rows, "spearman": 0.5, "spearman_ci": [-0.5, 1.0], "population": 3,
                        "random_median_rank": 2.0,
                        "choices": {"oracle": {"kept": [0, 2, 4, 7, 9, 11], "recovered": 0.4, "rank": 1,
                                               "probed": True}}},
        "strategies": {"per_method": strategy, "teacher": [{"seed": s, "fid": 9.0 + s, "loss": 0.05, "accuracy": 0.95} for s in range(3)]},
        "recovery": {"per_method": {"masked KD k=2": strategy["learned"],
                                    "RepKD k=0 (no mask)": [{"seed": 0, "diverged": True, "message": "NaN"}]}},
    }
    write_report(FakeStudy(str(tmp_path)), results)
    report = (tmp_path / "report.md").read_text()
    assert os.path.getsize(tmp_path / "calibration-vs-recovery.png") > 1000
    assert "**0.500** (95% bootstrap interval [-0.500, 1.000]): no reliable relation" in report
    assert "| oracle | 0 2 4 7 9 11 | 0.4000 | 1 of 3 |" in report
    # paired differences of learned minus random: fid -2, -2.1, -2.4 -> the interval excludes 0
    assert "| random | fid | -2.167 |" in report and "learned is better (95% interval excludes 0)" in report
    assert "RepKD k=0 (no mask) (1 diverged) | 0 |" in report
    assert "The teacher (mean FID 10.000) is better than every recovered student (best: learned, 11.000)" in report
    assert "| teacher | fid | +1 | [+1, +1] | teacher is better (95% interval excludes 0) |" in report
    assert "| 1 3 5 7 9 11 | 3.0000 | 0.6000 | 12.500 | 0.750 |" in report  # the one sampled probe
    assert json.loads((tmp_path / "results.json").read_text())["schedule"] == "quick"


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--quick", "--out", str(tmp_path / "s"),
                             "--nproc", "1"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "s" / "report.md").read_text()
    for heading in ("## 1.", "## 2.", "## 2b.", "## 3.", "## 4.", "## 5."):
        assert heading in report
    for figure in ("calibration-vs-recovery.png", "decision-1of2.png", "decision-2of4.png", "decision-3of6.png"):
        assert os.path.getsize(tmp_path / "s" / figure) > 1000

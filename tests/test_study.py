"""The reproduction study's measurements (tinyfusion/study/measure.py) and report (study_report.py) on
constructed inputs; `reproduce.py --quick` end to end under -m slow."""
import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion import create_diffusion
from models import DiT_models
from tinyfusion.study.measure import (activation_statistics, heldout_loss, make_heldout_triples, pattern_subsets,
                              primary_comparisons, rank_by_budget, teacher_gate)
from tinyfusion.study.report import write_report
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


def constructed_results():
    """A study's results by hand: 4 candidates (keys = kept blocks in hex), budgets 5 and 10,
    3 paired seeds for learned / min calibration / BI."""
    keys = ["02468a", "13579b", "0247ab", "012345"]
    calibration = dict(zip(keys, [1.0, 2.0, 3.0, 4.0]))
    at_10 = {"02468a": [1.0, 1.1, 1.2], "13579b": [1.1, 1.3, 1.25], "0247ab": [1.4, 1.4, 1.4], "012345": [1.5, 1.6, 1.7]}
    curves = {key: {str(s): {"0": calibration[key], "5": at_10[key][s] + 0.1, "10": at_10[key][s]} for s in range(3)}
              for key in keys}
    return {"schedule": "quick", "model": "DiT-XS/4", "image_size": 16,
            "budget": {"budgets": [5, 10], "candidates": 2, "seeds": 3, "heldout": 8},
            "declared": {"primary": reproduce_primary(), "smallest_effect": {"loss_fraction": 0.01, "rho": 0.3},
                         "gate_sigmas": 5.0, "extreme_ratio": 50.0, "cfg_scales": [1.0, 4.0]},
            "choices": {"learned": ["02468a"] * 3, "min calibration": ["13579b"] * 3, "BI": ["02468a"] * 3,
                        "oracle": ["0247ab"] * 3},
            "recovery": {"candidates": keys, "curves": curves, "calibration": calibration},
            "gate": dict(teacher_gate(0.5, {"02468a": [1.0, 1.1, 1.2]}, 5.0), control=[0.49, 0.48], teacher_raw=0.45,
                         enforced=False),
            "activations": {"blocks": [{"block": 0, "max_abs": 9.0, "std": 1.0, "max_over_std": 9.0,
                                        "masked_share": 0.04, "masked_share_k4": 0.001}],
                            "threshold": 50.0, "extreme": False},
            "fid": {"rows": [{"model": "teacher", "cfg": 1.0, "seed": 0, "fid": 10.0, "accuracy": 0.9},
                             {"model": "real train images", "cfg": None, "seed": 0, "fid": 1.0, "accuracy": 0.99}]}}


def reproduce_primary():
    sys.path.insert(0, ROOT)
    import reproduce
    return reproduce.PRIMARY


def test_teacher_gate_hand_computed():
    # A: mean 1.11, std 0.01414, margin 0.11 >= 5 std = 0.0707; B: mean 1.03, margin 0.03 < 5 * 0.02828
    gate = teacher_gate(1.0, {"A": [1.10, 1.12], "B": [1.01, 1.05]}, 5.0)
    assert gate["students"]["A"]["needed"] == pytest.approx(5 * 0.0141421356, rel=1e-6)
    assert gate["students"]["B"]["margin"] == pytest.approx(0.03) and not gate["passed"] and gate["failed"] == ["B"]
    assert teacher_gate(1.0, {"A": [1.10, 1.12]}, 5.0)["passed"]
    assert not teacher_gate(1.2, {"A": [1.10, 1.12]}, 5.0)["passed"]  # a student better than the teacher
    assert not teacher_gate(1.0, {"A": [1.5]}, 5.0)["passed"]  # one seed: no std, no pass


def test_primary_comparisons_hand_computed():
    results = constructed_results()
    primary = primary_comparisons(results, results["declared"]["smallest_effect"])
    by_name = {row["name"]: row for row in primary["rows"]}
    learned_vs_min = by_name["learned < min-calibration"]
    # differences -0.1, -0.2, -0.05: all 8 sign patterns, only the observed one is as low -> 1/8
    assert learned_vs_min["p"] == 1 / 8 and learned_vs_min["effect"] == pytest.approx(-0.35 / 3)
    assert by_name["learned < BI"]["identical_choices"] and by_name["learned < BI"]["p"] == 1.0
    rank = by_name["calibration ranks recovery"]
    assert rank["effect"] == pytest.approx(1.0) and rank["p"] == pytest.approx(1 / 24, abs=0.01)  # 4! orders
    # Holm over (1/8, 1, ~1/24): ~1/24 * 3 = 0.125, 1/8 * 2 = 0.25, 1 * 1 = 1
    assert learned_vs_min["p_holm"] == pytest.approx(0.25) and by_name["learned < BI"]["p_holm"] == 1.0
    assert rank["p_holm"] == pytest.approx(0.125, abs=0.03)
    assert not any(row["supported"] for row in primary["rows"])
    table = rank_by_budget(dict(results, primary=primary))
    assert table[0]["rho"] == pytest.approx(1.0) and table[10]["rho_with_longest"] == pytest.approx(1.0)


def test_report_is_generated_whole_from_its_json(tmp_path):
    results = constructed_results()
    results["primary"] = primary_comparisons(results, results["declared"]["smallest_effect"])
    write_report(str(tmp_path), results)
    report = (tmp_path / "report.md").read_text()
    assert report.index("## 0. Declared before any result") < report.index("## 2. Primary comparisons")
    assert "| learned < min-calibration | 3 | -0.11667 |" in report and "| 0.125 | 0.25 | 0.125 |" in report
    assert "untestable: both methods chose the same blocks in every seed" in report
    assert "Gate **passed** (not enforced in the quick schedule" in report
    assert "| 0 2 4 6 8 10 | BI, learned | 3 | 1.10000 +/- 0.10000 | +0.60000 | 0.50000 |" in report
    assert "The teacher's EMA weights (the gate's, and every student's start) score 0.50000; its raw weights 0.45000" \
        in report
    assert "**Masked KD is not testable here**" in report and "real 1.000 (worst seed) vs best model 10.000" in report
    assert "| 0 2 4 6 8 10 | BI, learned | 1.00000 | 1.20000 | 1.10000 |" in report
    assert os.path.getsize(tmp_path / "calibration-vs-loss-10steps.png") > 1000
    (tmp_path / "report.md").unlink()
    write_report(str(tmp_path), json.loads((tmp_path / "results.json").read_text()))  # from the JSON alone
    assert (tmp_path / "report.md").read_text() == report


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--quick", "--out", str(tmp_path / "s"),
                             "--nproc", "1"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "s" / "report.md").read_text()
    for heading in ("## 0.", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        assert heading in report
    for figure in ("calibration-vs-loss-20steps.png", "decision-1of2-seed0.png"):
        assert os.path.getsize(tmp_path / "s" / figure) > 1000


def test_balanced_picks_and_kept_keys():
    sys.path.insert(0, ROOT)
    import numpy as np

    from reproduce import balanced_picks, kept_key
    labels = np.repeat(np.arange(10), 7)
    picks = balanced_picks(labels, 25, seed=0)
    assert len(set(picks.tolist())) == 25
    assert np.bincount(labels[picks], minlength=10).tolist() == [3] * 5 + [2] * 5
    assert kept_key([0, 2, 4, 7, 9, 11]) == "02479b"


def test_every_schedule_teacher_ema_forgets_its_initialisation(tmp_path):
    """The EMA starts as a copy of the random initialisation and keeps a share decay**steps of it:
    0.999**3000 (5%) made the first full run's teacher worse by its EMA than by its raw weights."""
    sys.path.insert(0, ROOT)
    import reproduce
    for name, schedule in reproduce.SCHEDULES.items():
        assert schedule["teacher_ema"] ** schedule["teacher"] <= reproduce.INIT_SHARE, name
    study = reproduce.Study(str(tmp_path / "s"), "quick", nproc=1)
    study.budget = dict(study.budget, teacher_ema=0.9)  # 0.9**60 = 0.18%
    with pytest.raises(reproduce.TinyFusionError, match=r"0\.18% of its random initialisation"):
        study.teacher()


def test_report_only_without_results_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "reproduce.py"), "--out", str(tmp_path / "none"),
                             "--report-only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "results.json, which does not exist" in result.stderr
    assert not (tmp_path / "none").exists()


def test_the_committed_report_is_the_render_of_its_json(tmp_path):
    """docs/study/mnist/report.md is exactly what --report-only writes from results.json beside it."""
    import shutil
    shutil.copy(os.path.join(ROOT, "docs", "study", "mnist", "results.json"), tmp_path / "results.json")
    write_report(str(tmp_path), json.loads((tmp_path / "results.json").read_text()))
    with open(os.path.join(ROOT, "docs", "study", "mnist", "report.md")) as f:
        assert (tmp_path / "report.md").read_text() == f.read()

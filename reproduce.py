"""The paper's questions, re-examined on the scikit-learn digits through the real scripts, with
seeds and intervals: one command, a `report.md` with every table and figure.

    python reproduce.py --out study            # the full study (see SCHEDULES for its budget)
    python reproduce.py --quick --out study-q  # the same questions on tiny budgets (minutes)

1. Calibration loss vs recoverability: every 1:2 sub-network of the 12-block teacher (64) is
   pruned (prune_by_index.py), its loss on a fixed held-out set of (image, t, noise) triples is
   measured, it is fine-tuned with the same short budget (train.py) and measured again. Spearman's
   correlation of the two with a bootstrap interval; where each method's choice ranks.
2. Strategies and patterns: learned vs oracle vs BI vs random, each recovered the same way,
   over paired seeds (the seed drives recovery and sampling alike); learned 1:2 vs 2:4 vs 3:6.
3. Recovery methods: Masked KD (k = 2, 4), RepKD without a mask (k = 0), logits-only KD and
   fine-tuning of the same student, over paired seeds; a diverged run is a result.
4. Extreme activations of the teacher, per block. 5. Decision dynamics per pattern.

A rerun reuses every finished stage (every script resumes or is skipped when its output exists).
"""
import argparse
import json
import os
import shutil
import time

import numpy as np

import quickstart
from quickstart import python, torchrun
from tinyfusion.cli import positive_int

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL = "DiT-XS/4"
DEPTH = 12
ORACLE_KEPT = [0, 2, 4, 7, 9, 11]
PATTERNS = {"1:2": "[[1,2]]*6", "2:4": "[[2,4]]*3", "3:6": "[[3,6]]*2"}
RECOVERY_METHODS = {  # name -> (script, extra flags)
    "masked KD k=2": ("train_masked_kd.py", ["--mask-sigma", "2"]),
    "masked KD k=4": ("train_masked_kd.py", ["--mask-sigma", "4"]),
    "RepKD k=0 (no mask)": ("train_masked_kd.py", ["--mask-sigma", "0"]),
    "logits-only KD": ("train_masked_kd.py", ["--beta-feat", "0"]),
    "fine-tuning": ("train.py", []),
}
# sub-networks probed (question 1; 64 = all, fewer are spread evenly), teacher steps, probe
# fine-tune steps, pruning steps, recovery steps, seeds for
# questions 2 / patterns / 3, samples per FID, sampling steps, held-out triples
SCHEDULES = {
    "full": dict(subsets=64, teacher=4000, probe=50, prune=200, recover=200, seeds=5, pattern_seeds=3, method_seeds=3,
                 samples=500, sampling_steps=50, heldout=1024),
    "quick": dict(subsets=6, teacher=40, probe=5, prune=10, recover=10, seeds=2, pattern_seeds=2, method_seeds=2,
                  samples=64, sampling_steps=5, heldout=128),
}


class Study:
    def __init__(self, out, schedule, nproc):
        self.out, self.nproc = out, nproc
        self.budget = SCHEDULES[schedule]
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.common = ["--model", MODEL, "--image-size", "8", "--vae", "none", "--num-classes", "10"]
        self.results = {}

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def stage(self, name, outputs, command):
        """Run `command` unless every path in `outputs` exists; a failure raises StageFailed."""
        if all(os.path.exists(path) for path in outputs):
            return True
        quickstart.run(name, command, os.path.join(self.logs, f"{name}.log"))  # progress and ETA on the console
        return True

    # ------------------------------------------------------------------ shared inputs
    def data(self):
        digits, features = self.path("data", "digits"), self.path("data", "features")
        os.makedirs(self.path("data"), exist_ok=True)
        self.stage("digits", [digits], python("tools/make_digits.py") + ["--out", digits, "--image-size", "8"])
        self.stage("features", [os.path.join(features, "manifest.json")],
                   self.launch("extract_features.py") + self.common + ["--data-path", digits,
                                                                                 "--features-path", features])
        classifier, reference = self.path("data", "digits_classifier.pt"), self.path("data", "reference.npz")
        self.stage("classifier", [classifier, reference], python("tools/train_digits_classifier.py") +
                   ["--out", classifier, "--ref-out", reference, "--image-size", "8", "--overwrite"])
        self.features, self.classifier, self.reference = features, classifier, reference

    def launch(self, script, nproc=None):
        """torchrun with --nproc processes, or a plain process for one (half the start-up time)."""
        nproc = nproc or self.nproc
        return torchrun(script, nproc) if nproc > 1 else python(script)

    def train(self, name, script, steps, seed, extra, results_dir=None, nproc=None):
        """A train.py / train_masked_kd.py run; returns its final checkpoint."""
        results_dir = results_dir or self.path("runs")
        run_dir = os.path.join(results_dir, f"{name}-{MODEL.replace('/', '-')}")
        final = os.path.join(run_dir, "checkpoints", f"{steps:07d}.pt")
        resume = ["--resume", "auto"] if os.path.isdir(run_dir) else []
        self.stage(name, [final], self.launch(script, nproc) + self.common + [
            "--data-path", self.features, "--results-dir", results_dir, "--prefix", name, "--max-steps", str(steps),
            "--global-batch-size", "128", "--global-seed", str(seed), "--log-every", str(max(steps // 10, 1)),
            "--ckpt-every", str(max(steps // 2, 1)), "--num-workers", "0"] + resume + extra)
        return final

    def teacher(self):
        self.teacher_path = self.train("teacher", "train.py", self.budget["teacher"], 0,
                                       ["--lr", "1e-3", "--ema-decay", "0.999"])
        return self.teacher_path

    def heldout(self):
        """The fixed held-out triples (written once, read by every measurement)."""
        import torch

        from tinyfusion.feature_store import open_feature_dataset
        from tinyfusion.study import make_heldout_triples
        path = self.path("heldout.pt")
        if not os.path.exists(path):
            dataset = open_feature_dataset(self.features, flip_prob=0.0)
            torch.save(make_heldout_triples(dataset, self.budget["heldout"], seed=1234), path)
        self.triples = torch.load(path, weights_only=True)
        return self.triples

    def loss_of(self, checkpoint, use_ema=True):
        from tinyfusion.checkpoints import build_model, extract_state_dict, load_checkpoint_file, load_into_model
        from tinyfusion.study import heldout_loss
        model, _ = build_model(MODEL, 8, 10, "none", ckpt=checkpoint)
        if not use_ema:
            load_into_model(model, extract_state_dict(load_checkpoint_file(checkpoint), use_ema=False), MODEL,
                            checkpoint)
        return heldout_loss(model, self.triples)

    # ------------------------------------------------------------------ pruning methods
    def prune_index(self, name, kept):
        path = self.path("pruned", f"{name}.pt")
        os.makedirs(self.path("pruned"), exist_ok=True)
        self.stage(f"prune-{name}", [path], python("prune_by_index.py") + self.common +
                   ["--ckpt", self.teacher_path, "--kept-indices", json.dumps(kept), "--save-model", path])
        return path

    def prune_learned(self, pattern, seed):
        name = f"learned-{pattern.replace(':', 'of')}-seed{seed}"
        path, prefix = self.path("pruned", f"{name}.pt"), f"prune-{name}"
        run_dir = self.path("runs", f"{prefix}-{MODEL.replace('/', '-')}")
        self.stage(f"prune-{name}", [path], self.launch("prune_by_learning.py") + self.common + [
            "--groups", PATTERNS[pattern], "--load-weight", self.teacher_path, "--data-path", self.features,
            "--results-dir", self.path("runs"), "--prefix", prefix, "--epochs", "1000",
            "--max-steps", str(self.budget["prune"]), "--global-batch-size", "128", "--global-seed", str(seed),
            "--log-every", str(max(self.budget["prune"] // 30, 1)), "--num-workers", "0",
            "--ckpt-every", str(self.budget["prune"]), "--delta-w", "--lora", "--save-model", path] +
            (["--resume", "auto"] if os.path.isdir(run_dir) else []))
        return path, run_dir

    def prune_bi(self, seed):
        path = self.path("pruned", f"bi-seed{seed}.pt")
        self.stage(f"prune-bi-seed{seed}", [path], python("prune_by_score.py") + self.common + [
            "--ckpt", self.teacher_path, "--features-path", self.features, "--n-pruned", str(DEPTH // 2),
            "--seed", str(seed), "--save-model", path])
        return path

    def kept_of(self, checkpoint):
        from tinyfusion.checkpoints import load_checkpoint_file, read_metadata
        return list(read_metadata(load_checkpoint_file(checkpoint))["kept_indices"])

    # ------------------------------------------------------------------ evaluation
    def fid(self, name, checkpoint, seed, use_ema=True):
        """FID, accuracy, ... of `checkpoint` with the digits feature network (sample_ddp + evaluator)."""
        from tinyfusion.sampling import run_name
        sample_dir = self.path("samples", name)
        os.makedirs(sample_dir, exist_ok=True)
        steps, samples = self.budget["sampling_steps"], self.budget["samples"]
        npz = os.path.join(sample_dir, run_name(MODEL, checkpoint, 8, "none", quickstart.CFG_SCALE, seed, steps) + ".npz")
        # one process: a few hundred tiny images take less time than a second rank's start-up
        self.stage(f"sample-{name}", [npz], self.launch("sample_ddp.py", nproc=1) + self.common + [
            "--ckpt", checkpoint, "--sample-dir", sample_dir, "--num-fid-samples", str(samples),
            "--num-sampling-steps", str(steps), "--per-proc-batch-size", "64", "--cfg-scale", str(quickstart.CFG_SCALE),
            "--global-seed", str(seed), "--resume"] + ([] if use_ema else ["--no-ema"]))
        result = self.path("samples", f"{name}.json")
        self.stage(f"evaluate-{name}", [result], python("evaluator.py") + [
            self.reference, npz, "--feature-net", self.classifier, "--json", result, "--overwrite"])
        with open(result) as f:
            metrics = json.load(f)
        return {"fid": metrics["fid"], "accuracy": metrics.get("classifier_accuracy"),
                "precision": metrics["precision"], "recall": metrics["recall"]}


# ---------------------------------------------------------------------- the questions
def calibration_vs_recovery(study):
    """Question 1: the held-out loss of every 1:2 sub-network right after pruning and after the
    same short fine-tuning; where learned, BI, oracle, min-calibration and random land."""
    from tinyfusion.stats import bootstrap_interval, rank_among, spearman
    from tinyfusion.study import pattern_subsets
    subsets, rows = pattern_subsets([[1, 2]] * (DEPTH // 2)), []
    chosen = np.unique(np.linspace(0, len(subsets) - 1, study.budget["subsets"]).round().astype(int))
    for number in chosen:
        kept = subsets[number]
        name = f"subset{number:02d}"
        pruned = study.prune_index(name, kept)
        tuned = study.train(f"probe-{name}", "train.py", study.budget["probe"], 0, probe_flags(pruned), nproc=1)
        rows.append({"kept": kept, "subset": int(number), "calibration": study.loss_of(pruned)["loss"],
                     "recovered": study.loss_of(tuned, use_ema=False)["loss"], "tuned": tuned})
    calibration = [row["calibration"] for row in rows]
    recovered = [row["recovered"] for row in rows]
    # FID of a few fine-tuned sub-networks (best, median and worst by held-out loss, and the
    # min-calibration one): does the cheap held-out loss order them as FID does?
    order = np.argsort(recovered)
    for position in sorted({int(order[0]), int(order[len(order) // 2]), int(order[-1]), int(np.argmin(calibration))}):
        row = rows[position]
        # the probes' raw weights, as their held-out loss (an EMA of 0.99 over a short probe still
        # holds much of the pruned start)
        row.update(study.fid(f"probe-subset{row['subset']:02d}", row["tuned"], 0, use_ema=False))
    for row in rows:
        del row["tuned"]
    choices = {"oracle": ORACLE_KEPT, "min calibration loss": rows[int(np.argmin(calibration))]["kept"],
               "learned": study.kept_of(study.prune_learned("1:2", 0)[0]),
               "BI": study.kept_of(study.prune_bi(0))}
    placed = {}
    for method, kept in choices.items():
        match = [row for row in rows if row["kept"] == kept]
        if match:
            value = match[0]["recovered"]
        else:  # outside the 1:2 space (BI ignores the pattern): probe it the same way
            tuned = study.train(f"probe-{method.replace(' ', '-')}", "train.py", study.budget["probe"], 0,
                                probe_flags(study.prune_index(method.replace(" ", "-"), kept)), nproc=1)
            value = study.loss_of(tuned, use_ema=False)["loss"]
        placed[method] = {"kept": kept, "recovered": value, "rank": rank_among(value, recovered),
                          "probed": bool(match)}
    low, high = bootstrap_interval(calibration, recovered)
    return {"rows": rows, "spearman": spearman(calibration, recovered), "spearman_ci": [low, high],
            "choices": placed, "random_median_rank": (len(rows) + 1) / 2, "population": len(rows)}


def probe_flags(pruned):
    return ["--load-weight", pruned, "--lr", "5e-4", "--ema-decay", "0.99"]


def recover(study, name, student, seed, method="fine-tuning"):
    """The same recovery for every strategy: RECOVERY_METHODS[method] for budget["recover"] steps."""
    script, extra = RECOVERY_METHODS[method]
    flags = ["--load-weight", student, "--lr", "5e-4", "--ema-decay", "0.99"] + extra
    if script == "train_masked_kd.py":
        flags += ["--teacher", MODEL, "--load-teacher", study.teacher_path]
    return study.train(name, script, study.budget["recover"], seed, flags)


def strategies(study):
    """Question 2: learned vs oracle vs BI vs random over paired seeds (recovery and sampling)."""
    from tinyfusion.study import pattern_subsets
    subsets = pattern_subsets([[1, 2]] * (DEPTH // 2))
    per_method = {}
    for seed in range(study.budget["seeds"]):
        random_kept = subsets[np.random.default_rng(seed).integers(len(subsets))]
        students = {"learned": study.prune_learned("1:2", seed)[0], "oracle": study.prune_index("oracle", ORACLE_KEPT),
                    "BI": study.prune_bi(seed), "random": study.prune_index(f"random-seed{seed}", random_kept)}
        for method, student in students.items():
            tuned = recover(study, f"recover-{method}-seed{seed}", student, seed)
            row = study.fid(f"{method}-seed{seed}", tuned, seed)
            row.update(loss=study.loss_of(tuned)["loss"], kept=study.kept_of(student), seed=seed)
            per_method.setdefault(method, []).append(row)
    # the teacher with the same sampling seeds: FID on a few hundred samples moves by more from
    # seed to seed than between methods, so the teacher is compared paired too
    teacher = []
    for seed in range(study.budget["seeds"]):
        row = study.fid("teacher" if seed == 0 else f"teacher-seed{seed}", study.teacher_path, seed)
        row.update(loss=study.loss_of(study.teacher_path)["loss"], seed=seed)
        teacher.append(row)
    return {"per_method": per_method, "teacher": teacher}


def patterns(study):
    """Question 2b: learned pruning with 1:2, 2:4 and 3:6, same recovery, paired seeds."""
    per_pattern = {}
    for seed in range(study.budget["pattern_seeds"]):
        for pattern in PATTERNS:
            student, _ = study.prune_learned(pattern, seed)
            # 1:2 is question 2's "learned" run (same student, recovery and seed): reuse it
            name = "learned" if pattern == "1:2" else f"learned-{pattern.replace(':', 'of')}"
            tuned = recover(study, f"recover-{name}-seed{seed}", student, seed)
            row = study.fid(f"{name}-seed{seed}", tuned, seed)
            row.update(loss=study.loss_of(tuned)["loss"], kept=study.kept_of(student), seed=seed)
            per_pattern.setdefault(pattern, []).append(row)
    return {"per_pattern": per_pattern}


def recovery_methods(study):
    """Question 3: the paper's Table 5 on one student (the oracle's, fixed across methods)."""
    student = study.prune_index("oracle", ORACLE_KEPT)
    per_method = {}
    for seed in range(study.budget["method_seeds"]):
        for method in RECOVERY_METHODS:
            # fine-tuning the oracle's student is question 2's "oracle" run (same seed): reuse it
            tag = "oracle" if method == "fine-tuning" else "method-" + method.split(" (")[0].replace(" ", "-").replace("=", "")
            try:
                tuned = recover(study, f"recover-{tag}-seed{seed}", student, seed, method)
            except SystemExit as failure:  # a diverged run (NaN guard) is a result, not a crash
                per_method.setdefault(method, []).append({"seed": seed, "diverged": True,
                                                          "message": str(failure).splitlines()[0]})
                continue
            row = study.fid(f"{tag}-seed{seed}", tuned, seed)
            row.update(loss=study.loss_of(tuned)["loss"], seed=seed, diverged=False)
            per_method.setdefault(method, []).append(row)
    return {"per_method": per_method}


def activations(study):
    """Question 4: max |h| / std and the masked share at k = 2 and 4 per teacher block."""
    from tinyfusion.checkpoints import build_model
    from tinyfusion.study import activation_statistics
    teacher, _ = build_model(MODEL, 8, 10, "none", ckpt=study.teacher_path)
    rows = activation_statistics(teacher, study.triples, mask_sigma=2.0)
    for row, wide in zip(rows, activation_statistics(teacher, study.triples, mask_sigma=4.0)):
        row["masked_share_k4"] = wide["masked_share"]
    return {"blocks": rows}


def decisions(study):
    """Question 5: the decision-over-steps figure of each pattern's learned run (seed 0)."""
    figures = {}
    for pattern in PATTERNS:
        _, run_dir = study.prune_learned(pattern, 0)
        figure = study.path(f"decision-{pattern.replace(':', 'of')}.png")
        study.stage(f"decision-{pattern.replace(':', 'of')}", [figure], python("draw_decision.py") +
                    ["--log", run_dir, "--out", figure, "--overwrite"])
        figures[pattern] = os.path.basename(figure)
    return {"figures": figures}


QUESTIONS = [("activations", activations), ("calibration", calibration_vs_recovery), ("strategies", strategies),
             ("patterns", patterns), ("recovery", recovery_methods), ("decisions", decisions)]


def main(args):
    from tinyfusion import study_report
    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    started, cpu_started = time.time(), os.times()
    study = Study(out, "quick" if args.quick else "full", args.nproc)
    study.data()
    study.teacher()
    study.heldout()
    results = {"schedule": "quick" if args.quick else "full", "budget": study.budget}
    for question, function in QUESTIONS:
        if args.only and question not in args.only:
            continue
        print(f"question {question}", flush=True)
        results[question] = function(study)
    times = os.times()
    results["wall_minutes"] = (time.time() - started) / 60
    results["cpu_minutes"] = (times.children_user + times.children_system + times.user + times.system
                              - cpu_started.children_user - cpu_started.children_system - cpu_started.user
                              - cpu_started.system) / 60
    study_report.write_report(study, results)
    print(f"report: {os.path.join(out, 'report.md')} ({results['wall_minutes']:.1f} min wall, "
          f"{results['cpu_minutes']:.1f} min CPU)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="study", help="run folder (every artefact and report.md land here)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the machinery in minutes")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder and start over")
    parser.add_argument("--only", nargs="*", default=None, help="questions to run (calibration, strategies, "
                                                                "patterns, recovery, activations, decisions)")
    parser.add_argument("--nproc", type=positive_int, default=2, help="torchrun processes per stage")
    main(parser.parse_args())

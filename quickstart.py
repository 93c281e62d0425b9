"""TinyFusion end to end on a CPU in minutes: the real scripts, run through torchrun as a user
would, on scikit-learn's bundled handwritten digits (8x8, 10 classes, no download).

    digits ImageFolder -> extract_features.py --vae none -> train.py (a 12-block DiT-XS/4 teacher)
    -> prune to 6 blocks three ways: prune_by_learning.py (1:2 gates + LoRA), prune_by_score.py (BI),
       prune_by_index.py (the oracle's alternating pattern)
    -> recover each student with train_masked_kd.py, and the learned one also with plain train.py
    -> sample_ddp.py for the teacher and every student -> evaluator.py with a digits classifier as
       the feature network (FID, IS, precision, recall, and the classifier's accuracy on the
       samples' own labels).

`--family sit` runs the same stages and table on a SiT (`SiT-XS/4`, the same backbone trained on
SiT's flow-matching transport) and samples it with SiT's ODE; `--family mar` on a MAR (`MAR-XS/2`:
6 encoder and 6 decoder blocks, gated 1:2 within each list) sampled with MAR's masked-autoregressive
loop (see FAMILIES for their settings).

Everything lands in one run folder (`--out`); a rerun reuses every finished stage (each script
resumes), `--fresh` starts over. `--full` is the small-scale reproduction of the paper's
comparison: longer schedules and 3 seeds (one shared teacher; the seeds vary pruning, recovery
and sampling), reported as mean +/- std.
"""
import argparse
import json
import os
import shutil
import time

import numpy as np

from tinyfusion.errors import run_main
from tinyfusion.flags import positive_int
from tinyfusion.io.run_folder import run_folder_name
from tinyfusion.study.stages import StageRunner, resume_flags

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL = "DiT-XS/4"  # 12 blocks, hidden 128, 4 tokens of 4x4 pixels: trains in minutes on 2 cores
ORACLE_KEPT = [0, 2, 4, 7, 9, 11]  # BK-SDM's pattern (even blocks, then odd ones up to the last), at 12 -> 6
CFG_SCALE = 4.0  # sample.py's default guidance; the digits classifier reads guided samples far better

# What differs between the families: the model, the teacher's optimisation and steps per schedule
# (absent: the schedule's), the sampler (sample_ddp.py flags), the guidance, the sampling steps per
# schedule and the default run folder. The SiT's were tuned on the digits classifier's reading of
# the teacher's samples (1,000 samples each, standard error about 0.011): with the DiT's constant
# lr its EMA teacher stayed near 0.80 from 750 to 1,500 steps whatever the sampler, while a cosine
# decay to 1e-4 over 1,000 steps reads 0.85-0.87; SiT's deterministic ODE with 10 Heun steps (20
# model evaluations, vs the DiT's 50 DDPM steps) reads as well as 20 Euler or 20 Euler-Maruyama
# steps. Both use cfg 4.0 (SiT's sample.py default for grids): unguided samples read near 0.35.
DIT_TEACHER = ["--lr", "1e-3", "--ema-decay", "0.995", "--lr-schedule", "constant"]
FAMILIES = {
    "dit": dict(model=MODEL, teacher=DIT_TEACHER, teacher_steps={}, sampler=[], cfg_scale=CFG_SCALE,
                sampling_steps={}, out="quickstart-run"),
    "sit": dict(model="SiT-XS/4", teacher=["--lr", "1e-3", "--ema-decay", "0.995", "--lr-schedule", "cosine",
                                           "--min-lr", "1e-4"],
                teacher_steps={"quick": 1000, "full": 1500}, sampler=["--sampler", "ode", "--sampling-method", "heun2"],
                cfg_scale=CFG_SCALE, sampling_steps={"quick": 11, "full": 11}, out="quickstart-sit-run"),
    # MAR-XS/2: 6 encoder + 6 decoder blocks over 16 tokens of 2x2 pixels, the same 1:2 groups (3 per
    # list) and oracle pattern (encoder 0 2 4, decoder 7 9 11); one head draw per token and step
    # (--diffusion-batch-mul 1, main_mar.py's default; the README's 4 costs 30% more time per step
    # here); MAR's loop with 16 steps (one per token on average), its head's diffusion respaced to 50
    # steps with leading spacing (ours): MAR's own spacing starts at t = 999, where the tiny head's
    # noise error is multiplied by 632 and its samples explode (teacher: classifier accuracy 0.38 and
    # FID 21.3 vs 0.62 and 10.4 with leading spacing, 300 samples; see docs/mar.md)
    "mar": dict(model="MAR-XS/2", teacher=["--lr", "1e-3", "--ema-decay", "0.995", "--lr-schedule", "cosine",
                                           "--min-lr", "1e-4"],
                teacher_steps={}, sampler=["--num-iter", "16", "--timestep-spacing", "leading"], cfg_scale=CFG_SCALE,
                sampling_steps={"quick": 50, "full": 50}, out="quickstart-mar-run",
                training=["--diffusion-batch-mul", "1"]),
}

# (teacher steps, pruning steps, recovery steps, samples per model, sampling steps, classifier epochs);
# "tiny" is for the tests: every stage runs, as briefly as possible
SCHEDULES = {"quick": (1500, 300, 250, 1000, 50, 15), "full": (2500, 400, 400, 1000, 50, 15),
             "tiny": (30, 10, 10, 64, 5, 1)}


class Pipeline(StageRunner):
    """The quick start's stages for one seed in the run folder `out` (each announced as it is
    skipped, runs and ends); `teacher_runs`: where the shared teacher is trained (several seeds)."""

    def __init__(self, args, out, seed, teacher_runs=None):
        super().__init__(out, ROOT)
        self.args, self.seed = args, seed
        self.teacher_runs = teacher_runs
        (self.teacher_steps, self.prune_steps, self.recover_steps, self.num_samples, self.sampling_steps,
         self.classifier_epochs) = SCHEDULES[args.schedule]
        self.family = FAMILIES[args.family]
        self.model = self.family["model"]
        self.sampling_steps = self.family["sampling_steps"].get(args.schedule, self.sampling_steps)
        self.teacher_steps = self.family["teacher_steps"].get(args.schedule, self.teacher_steps)
        self.common = ["--model", self.model, "--image-size", "8", "--vae", "none", "--num-classes", "10"]

    def data(self, shared):
        digits, features = os.path.join(shared, "digits"), os.path.join(shared, "features")
        self.stage("digits", [digits], self.python("tools/make_digits.py") + ["--out", digits, "--image-size", "8"])
        self.stage("features", [os.path.join(features, "manifest.json")],
                   self.torchrun("extract_features.py", self.args.nproc) + self.common +
                   ["--data-path", digits, "--features-path", features])
        classifier, reference = os.path.join(shared, "digits_classifier.pt"), os.path.join(shared, "reference.npz")
        self.stage("classifier", [classifier, reference],
                   self.python("tools/train_digits_classifier.py") +
                   ["--out", classifier, "--ref-out", reference, "--image-size", "8", "--overwrite",
                    "--epochs", str(self.classifier_epochs)])
        self.features, self.classifier, self.reference = features, classifier, reference

    def train_run(self, name, script, steps, extra, results=None):
        """A train.py / train_masked_kd.py stage; returns its final checkpoint."""
        results = results or self.path("runs")
        final = os.path.join(run_folder_name(results, name, self.model), "checkpoints", f"{steps:07d}.pt")
        resume = resume_flags(os.path.dirname(final))
        self.stage(name, [final], self.torchrun(script, self.args.nproc) + self.common + [
            "--data-path", self.features, "--results-dir", results, "--prefix", name, "--max-steps", str(steps),
            "--global-batch-size", "128", "--global-seed", str(self.seed), "--log-every", "50",
            "--ckpt-every", str(max(steps // 4, 1)), "--num-workers", "0"] + resume + self.family.get("training", [])
            + extra)
        self.drop_intermediate_checkpoints(os.path.dirname(final), keep=final)
        return final

    def drop_intermediate_checkpoints(self, folder, keep=None):
        """Once a run has finished, its intermediate checkpoints (written so that an interrupted
        stage resumes) are not read by any later stage: delete them unless --keep-checkpoints."""
        if self.args.keep_checkpoints or not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.endswith(".pt") and (keep is None or not os.path.samefile(path, keep)):
                os.remove(path)

    def run_all(self):
        # with several seeds the teacher is trained once (seed 0) and the seeds vary what the paper
        # compares: the pruning, the recovery and the sampling
        teacher = self.train_run("teacher", "train.py", self.teacher_steps, self.family["teacher"],
                                 results=self.teacher_runs)
        students = self.prune(teacher)
        kd = ["--teacher", self.model, "--load-teacher", teacher, "--lr", "5e-4", "--final-lr", "2.5e-4",
              "--ema-decay", "0.99"]
        models = {"teacher": teacher}
        for method, checkpoint in students.items():
            models[f"{method} + masked KD"] = self.train_run(f"kd-{method}", "train_masked_kd.py",
                                                             self.recover_steps, ["--load-weight", checkpoint] + kd)
        if "finetune" in self.args.methods:
            models["learned + fine-tuning"] = self.train_run("finetune-learned", "train.py", self.recover_steps,
                                                             ["--load-weight", students["learned"], "--lr", "5e-4",
                                                              "--lr-schedule", "constant", "--ema-decay", "0.99"])
        return [self.evaluate(name, checkpoint) for name, checkpoint in models.items()]

    def prune(self, teacher):
        """The teacher pruned to 6 blocks by each method of --methods; returns {method: checkpoint}."""
        os.makedirs(self.path("pruned"), exist_ok=True)
        students = {}
        prune_run = run_folder_name(self.path("runs"), "prune", self.model)
        students["learned"] = self.path("pruned", "learned.pt")
        self.stage("prune-learned", [students["learned"]], self.torchrun("prune_by_learning.py", self.args.nproc) +
                   self.common + ["--groups", "[[1,2]]*6", "--load-weight", teacher, "--data-path", self.features,
                                  "--results-dir", self.path("runs"), "--prefix", "prune", "--epochs", "100",
                                  "--max-steps", str(self.prune_steps), "--global-batch-size", "128",
                                  "--global-seed", str(self.seed), "--log-every", "10", "--num-workers", "0",
                                  "--ckpt-every", str(max(self.prune_steps // 2, 1)), "--delta-w", "--lora",
                                  "--save-model", students["learned"]] + self.family.get("training", []) +
                   resume_flags(prune_run))
        self.drop_intermediate_checkpoints(os.path.join(prune_run, "checkpoints"))  # learned.pt holds the result
        self.stage("decision-plot", [self.path("decision.png")], self.python("draw_decision.py") +
                   ["--log", prune_run, "--out", self.path("decision.png"), "--overwrite"])
        if "bi-score" in self.args.methods:
            students["bi-score"] = self.path("pruned", "bi-score.pt")
            self.stage("prune-bi-score", [students["bi-score"]], self.python("prune_by_score.py") + self.common +
                       ["--ckpt", teacher, "--features-path", self.features, "--n-pruned", "6",
                        "--seed", str(self.seed), "--save-model", students["bi-score"]])
        if "oracle" in self.args.methods:
            students["oracle"] = self.path("pruned", "oracle.pt")
            self.stage("prune-oracle", [students["oracle"]], self.python("prune_by_index.py") + self.common +
                       ["--ckpt", teacher, "--kept-indices", json.dumps(ORACLE_KEPT),
                        "--save-model", students["oracle"]])
        return students

    def evaluate(self, name, checkpoint):
        from tinyfusion.sampling.batch_settings import batch_file_name  # torch: not imported for --help
        slug = name.replace(" + ", "-").replace(" ", "-")
        sample_dir = self.path("samples", slug)
        os.makedirs(sample_dir, exist_ok=True)
        flags = self.common + ["--ckpt", checkpoint, "--sample-dir", sample_dir, "--num-fid-samples",
                               str(self.num_samples), "--num-sampling-steps", str(self.sampling_steps),
                               "--per-proc-batch-size", "100", "--cfg-scale", str(self.family["cfg_scale"]),
                               "--global-seed", str(self.seed), "--resume", *self.family["sampler"]]
        npz = os.path.join(sample_dir, batch_file_name(flags) + ".npz")
        self.stage(f"sample-{slug}", [npz], self.torchrun("sample_ddp.py", self.args.nproc) + flags)
        metrics_json = self.path("samples", f"{slug}.json")
        self.stage(f"evaluate-{slug}", [metrics_json], self.python("evaluator.py") +
                   [self.reference, npz, "--feature-net", self.classifier, "--json", metrics_json, "--overwrite"])
        write_grid(npz, self.path("samples", f"{slug}.png"))
        with open(metrics_json) as f:
            metrics = json.load(f)
        return dict(model=name, **describe_checkpoint(self.model, checkpoint), images_per_sec=sampling_rate(sample_dir),
                    fid=metrics["fid"], inception_score=metrics["inception_score"],
                    precision=metrics["precision"], recall=metrics["recall"],
                    accuracy=metrics.get("classifier_accuracy"))


def describe_checkpoint(model_name, path):
    from tinyfusion.families.build import build_model
    model, metadata = build_model(model_name, 8, 10, "none", ckpt=path)
    kept = metadata.get("kept_indices") if metadata else None
    return dict(depth=model.depth, params=sum(p.numel() for p in model.parameters()),
                kept=" ".join(map(str, kept)) if kept else "all")


def sampling_rate(sample_dir):
    """Images/s of the sampling run, from the log line sample_ddp.py writes at its end."""
    for root, _, files in os.walk(sample_dir):
        if "log.txt" in files:
            with open(os.path.join(root, "log.txt")) as f:
                rates = [line.split(":")[-1].split("images/s")[0].strip() for line in f if "images/s on" in line]
            if rates:
                return float(rates[-1].split()[-1])
    return float("nan")


def write_grid(npz_path, png_path, per_class=10):
    """Up to `per_class` samples of each class, one labelled row per class (tinyfusion/sampling/grids.py)."""
    from tinyfusion.sampling.grids import save_labeled_grid
    with np.load(npz_path) as batch:
        images, labels = batch["arr_0"], batch["labels"] if "labels" in batch else np.zeros(len(batch["arr_0"]), int)
    save_labeled_grid(png_path, images, labels, columns=per_class)


COLUMNS = [("model", "{}"), ("depth", "{}"), ("params", "{:,}"), ("kept", "{}"), ("images_per_sec", "{:.1f}"),
           ("fid", "{:.2f}"), ("inception_score", "{:.2f}"), ("precision", "{:.3f}"), ("recall", "{:.3f}"),
           ("accuracy", "{:.3f}")]


def markdown_table(rows):
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row.get(name) for name, _ in COLUMNS]
        lines.append("| " + " | ".join("" if value is None else value if isinstance(value, str) else fmt.format(value)
                                       for value, (_, fmt) in zip(cells, COLUMNS)) + " |")
    return "\n".join(lines)


def aggregate(per_seed):
    """mean +/- std over seeds for every numeric column."""
    rows = []
    for index, first in enumerate(per_seed[0]):
        row = dict(first)
        for name in ("images_per_sec", "fid", "inception_score", "precision", "recall", "accuracy"):
            values = np.array([seed_rows[index][name] for seed_rows in per_seed], dtype=float)
            row[name] = f"{values.mean():.3f} +/- {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"
        rows.append(row)
    return rows


def main(args):
    if args.full:
        args.schedule = "full"
    out = os.path.abspath(args.out or FAMILIES[args.family]["out"])
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    seeds = list(range(args.seeds)) if args.full else [0]
    started = time.time()
    per_seed = []
    for seed in seeds:
        folder = os.path.join(out, f"seed-{seed}") if len(seeds) > 1 else out
        print(f"seed {seed}: {folder}")
        print(f"  each stage's command and full output: {os.path.join(folder, 'logs', '<stage>.log')}", flush=True)
        pipeline = Pipeline(args, folder, seed, os.path.join(out, "shared", "runs") if len(seeds) > 1 else None)
        pipeline.data(os.path.join(out, "shared"))
        per_seed.append(pipeline.run_all())
    rows = aggregate(per_seed) if len(seeds) > 1 else per_seed[0]
    table = markdown_table(rows)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(dict(rows=rows, per_seed=per_seed, schedule=args.schedule, seeds=seeds,
                       minutes=(time.time() - started) / 60), f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    teacher = rows[0]
    print(f"\nteacher samples: a digits classifier reads {teacher['accuracy']} of them as their conditioning "
          f"label (a trained teacher should be >= 0.8)")
    print(f"\nresults: {os.path.join(out, 'results.md')} (and results.json); sample grids in {out}/samples/, "
          f"decision dynamics in decision.png; {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="run folder (every artefact lands here); default quickstart-run, with --family sit "
                             "quickstart-sit-run, with --family mar quickstart-mar-run")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="dit",
                        help="dit: a DiT-XS/4 teacher (diffusion); sit: a SiT-XS/4 teacher (flow matching); "
                             "mar: a MAR-XS/2 teacher (masked autoregression, per-token diffusion head)")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder and start over")
    parser.add_argument("--full", action="store_true", help="longer schedules and --seeds seeds (mean +/- std)")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds for --full")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="quick", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=positive_int, default=2, help="torchrun processes per stage")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every intermediate training checkpoint (by default only each run's final one, "
                             "the one later stages read, is kept)")
    # a subset of the pruning methods (learned is always run: fine-tuning and the decision plot use it);
    # the default suite's test uses it to stay short
    parser.add_argument("--methods", type=lambda text: text.split(","), default=["learned", "bi-score", "oracle", "finetune"],
                        help=argparse.SUPPRESS)
    run_main(main, parser.parse_args())

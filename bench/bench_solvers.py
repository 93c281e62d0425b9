"""Quality against cost of DiT's samplers: FID and the classifier's accuracy against model evaluations
(NFE) for the quick start's teacher and its learned + masked KD student, over seeds, with intervals.

Every point is a real `sample_ddp.py` run (--num-samples images, cfg 4.0 as the quick start) read by
`evaluator.py` with the quick start's digits classifier as the feature network. Seed s samples
every setting from the same per-sample noise and labels, so settings are compared per seed.
NFE = model evaluations per image (one per step for every sampler here; with guidance each is one
forward of the doubled batch). At least the original's quality: the smallest NFE of a sampler whose
mean FID is at most the 250-step DDPM's mean + its seed standard deviation and whose mean accuracy
is at least DDPM 250's mean - its seed standard deviation (a sampler that beats DDPM 250 on FID
counts; one that is worse by more than DDPM 250's own seed-to-seed spread does not); images/s there
against DDPM 250's is the headline.

    python quickstart.py                                  # the teacher and student (once)
    python bench/bench_solvers.py --run quickstart-run    # then the curve: table, JSON and plot in
                                                          # quickstart-run/solvers/

Finished points are kept (a rerun samples only what is missing); --settings and --seeds pick the
points, e.g. --settings ddpm:250,dpm-solver++:10,15 --seeds 0.
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tinyfusion.flags import SAMPLER_NAMES  # noqa: E402

DEFAULT_SETTINGS = ("ddpm:250,50;ddim:10,15,25,50;dpm-solver++:10,15,25,50;unipc:10,15,25,50")
BASELINE = "ddpm:250"  # the original's sampler: what equal quality is measured against
QUICKSTART_FLAGS = ["--model", "DiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10",
                    "--cfg-scale", "4.0"]


def parse_settings(text):
    """"ddpm:250,50;unipc:10,15" -> [("ddpm", 250), ("ddpm", 50), ("unipc", 10), ("unipc", 15)]."""
    settings = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        sampler, _, steps = part.partition(":")
        if sampler not in SAMPLER_NAMES or not steps:
            raise argparse.ArgumentTypeError(f"bad setting {part!r}: expected SAMPLER:STEPS[,STEPS...] with a "
                                             f"sampler of {', '.join(SAMPLER_NAMES)}")
        try:
            settings += [(sampler, int(n)) for n in steps.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad steps in {part!r}: integers separated by commas") from None
    return settings


def newest_checkpoint(folder):
    found = sorted(glob.glob(os.path.join(folder, "checkpoints", "*.pt")))
    if not found:
        raise SystemExit(f"error: no checkpoint in {folder}/checkpoints; run `python quickstart.py` first")
    return found[-1]


def quickstart_inputs(run):
    """The quick start's teacher, learned + masked KD student, classifier and reference batch."""
    inputs = dict(teacher=newest_checkpoint(os.path.join(run, "runs", "teacher-DiT-XS-4")),
                  student=newest_checkpoint(os.path.join(run, "runs", "kd-learned-DiT-XS-4")),
                  classifier=os.path.join(run, "shared", "digits_classifier.pt"),
                  reference=os.path.join(run, "shared", "reference.npz"))
    missing = [path for path in (inputs["classifier"], inputs["reference"]) if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"error: {missing[0]} is missing; run `python quickstart.py --out {run}` first")
    return inputs


# ----------------------------------------------------------------------- one point
def run_logged(command, log_path):
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:4])} ... failed; see {log_path}")


def sampling_rate(run_dir):
    """Images/s of a sample_ddp.py run, from the line its log ends with."""
    with open(os.path.join(run_dir, "log.txt")) as f:
        rates = [line.split(" images/s on")[0].split()[-1] for line in f if " images/s on " in line]
    return float(rates[-1])


def measure_point(args, model, ckpt, sampler, steps, seed):
    """Sample and evaluate one (model, sampler, steps, seed); returns its record (kept on disk)."""
    folder = os.path.join(args.out, "points", f"{model}-{sampler}-{steps}-seed-{seed}")
    record_path = os.path.join(folder, "record.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    os.makedirs(folder, exist_ok=True)
    flags = [*args.model_flags, "--ckpt", ckpt, "--sample-dir", folder, "--num-fid-samples", str(args.num_samples),
             "--num-sampling-steps", str(steps), "--sampler", sampler, "--global-seed", str(seed),
             "--per-proc-batch-size", str(args.batch), "--resume"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc > 1 else [sys.executable])
    run_logged(launcher + [os.path.join(ROOT, "sample_ddp.py"), *flags], os.path.join(folder, "sample.log"))
    (npz,) = glob.glob(os.path.join(folder, "*.npz"))
    metrics_path = os.path.join(folder, "metrics.json")
    run_logged([sys.executable, os.path.join(ROOT, "evaluator.py"), args.reference, npz, "--feature-net",
                args.classifier, "--json", metrics_path, "--overwrite", "--device", "cpu"],
               os.path.join(folder, "evaluate.log"))
    with open(metrics_path) as f:
        metrics = json.load(f)
    record = dict(model=model, sampler=sampler, steps=steps, nfe=steps, seed=seed, fid=metrics["fid"],
                  accuracy=metrics["classifier_accuracy"], images_per_sec=sampling_rate(npz[:-len(".npz")]))
    with open(record_path, "w") as f:
        json.dump(record, f, indent=1)
    return record


# ----------------------------------------------------------------------- the table
def summarize(records, baseline=("ddpm", 250)):
    """One row per (model, sampler, steps): FID and accuracy mean, std and 95% t interval over the
    seeds, images/s, and the per-seed FID difference to the model's `baseline` (sampler, steps)
    with its interval."""
    from tinyfusion.study.stats import mean_and_std, paired_difference
    rows = []
    keys = sorted({(r["model"], r["sampler"], r["steps"]) for r in records}, key=lambda k: (k[0], k[1], k[2]))
    for model, sampler, steps in keys:
        points = sorted((r for r in records if (r["model"], r["sampler"], r["steps"]) == (model, sampler, steps)),
                        key=lambda r: r["seed"])
        row = dict(model=model, sampler=sampler, steps=steps, nfe=points[0]["nfe"], seeds=[r["seed"] for r in points])
        for name in ("fid", "accuracy", "images_per_sec"):
            values = [r[name] for r in points]
            interval = paired_difference(values, [0.0] * len(values))
            row[name] = dict(zip(("mean", "std"), mean_and_std(values)), low=interval["low"], high=interval["high"])
        reference = {r["seed"]: r["fid"] for r in records if (r["model"], r["sampler"], r["steps"]) == (model, *baseline)}
        shared = [r for r in points if r["seed"] in reference]
        if shared and (sampler, steps) != tuple(baseline):
            row["fid_vs_baseline"] = paired_difference([r["fid"] for r in shared], [reference[r["seed"]] for r in shared])
        rows.append(row)
    return rows


def baseline_row(rows, model, baseline):
    return next((r for r in rows if r["model"] == model and (r["sampler"], r["steps"]) == tuple(baseline)), None)


def equal_quality(rows, baseline=("ddpm", 250)):
    """{model: {sampler: row}}: per model and sampler the smallest-NFE row at least as good as the
    baseline within its seed spread: mean FID <= the baseline's mean + seed std, and mean accuracy
    >= the baseline's mean - seed std (None when no NFE reaches it)."""
    chosen = {}
    for model in sorted({row["model"] for row in rows}):
        reference = baseline_row(rows, model, baseline)
        if reference is None:
            continue
        fid_limit = reference["fid"]["mean"] + reference["fid"]["std"]
        accuracy_floor = reference["accuracy"]["mean"] - reference["accuracy"]["std"]
        chosen[model] = {}
        for sampler in sorted({r["sampler"] for r in rows if r["model"] == model}):
            good = [r for r in rows if r["model"] == model and r["sampler"] == sampler
                    and r["fid"]["mean"] <= fid_limit and r["accuracy"]["mean"] >= accuracy_floor]
            chosen[model][sampler] = min(good, key=lambda r: r["nfe"]) if good else None
    return chosen


def markdown(rows, chosen, baseline=("ddpm", 250)):
    name = f"{baseline[0]} {baseline[1]}"
    lines = [f"| model | sampler | NFE | FID (mean +/- std) | FID 95% interval | FID - {name}, per seed (95%) | "
             "accuracy (mean +/- std) | images/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = r.get("fid_vs_baseline")
        diff_text = f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]" if diff else ""
        accuracy = f"{r['accuracy']['mean']:.3f} +/- {r['accuracy']['std']:.3f}"
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['fid']['mean']:.2f} +/- {r['fid']['std']:.2f} | "
                     f"[{r['fid']['low']:.2f}, {r['fid']['high']:.2f}] | {diff_text} | {accuracy} | "
                     f"{r['images_per_sec']['mean']:.2f} |")
    lines += ["", f"At least {name}'s quality (mean FID <= its mean + seed std, mean accuracy >= its mean - seed std): "
              "the smallest NFE per sampler", "",
              f"| model | sampler | NFE | FID | images/s | images/s / {name}'s |", "|---|---|---|---|---|---|"]
    for model, per_sampler in chosen.items():
        baseline_rate = baseline_row(rows, model, baseline)["images_per_sec"]["mean"]
        for sampler, row in per_sampler.items():
            if row is None:
                lines.append(f"| {model} | {sampler} | none reaches it | | | |")
            else:
                rate = row["images_per_sec"]["mean"]
                lines.append(f"| {model} | {sampler} | {row['nfe']} | {row['fid']['mean']:.2f} | {rate:.2f} | "
                             f"{rate / baseline_rate:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """FID against NFE (log scale), one panel per model, one line per sampler, 95% intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from tinyfusion.io.atomic_files import atomic_save_figure
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for sampler in sorted({r["sampler"] for r in rows if r["model"] == model}):
            points = sorted((r for r in rows if r["model"] == model and r["sampler"] == sampler), key=lambda r: r["nfe"])
            nfe = [r["nfe"] for r in points]
            mean = [r["fid"]["mean"] for r in points]
            # the 95% interval (none with a single seed)
            errors = [[0.0 if math.isnan(r["fid"]["low"]) else m - r["fid"]["low"] for m, r in zip(mean, points)],
                      [0.0 if math.isnan(r["fid"]["high"]) else r["fid"]["high"] - m for m, r in zip(mean, points)]]
            ax.errorbar(nfe, mean, yerr=errors, marker="o", capsize=3, label=sampler)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["nfe"] for r in rows if r["model"] == model}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model evaluations per image (NFE)")
        ax.set_ylabel("FID (digits classifier features)")
        ax.set_title(model)
        ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


def main(args):
    if args.run:
        inputs = quickstart_inputs(args.run)
        args.out = args.out or os.path.join(args.run, "solvers")
    else:
        missing = [name for name in ("teacher", "classifier", "reference") if not getattr(args, name)]
        if missing or not args.out:
            raise SystemExit("error: pass --run QUICKSTART_FOLDER, or --teacher, --classifier, --reference and --out")
        inputs = dict(teacher=args.teacher, student=args.student, classifier=args.classifier, reference=args.reference)
    args.classifier, args.reference = inputs["classifier"], inputs["reference"]
    args.model_flags = args.model_flags.split() if args.model_flags else QUICKSTART_FLAGS
    models = {name: inputs[name] for name in ("teacher", "student") if inputs.get(name)}
    os.makedirs(args.out, exist_ok=True)
    records = [measure_point(args, model, ckpt, sampler, steps, seed)
               for model, ckpt in models.items() for sampler, steps in args.settings for seed in args.seeds]
    rows = summarize(records, args.baseline)
    chosen = equal_quality(rows, args.baseline)
    table = markdown(rows, chosen, args.baseline)
    with open(os.path.join(args.out, "solvers.json"), "w") as f:
        json.dump(dict(rows=rows, records=records, equal_quality=chosen, num_samples=args.num_samples), f, indent=1)
    with open(os.path.join(args.out, "solvers.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(args.out, "solvers.png"))
    print(table + f"\nwritten: {args.out}/solvers.md, solvers.json, solvers.png")
    if args.write:  # the docs page's table: generated, never typed (tests/test_bench_solvers.py)
        from bench.report import write_generated
        write_generated(args.write, table.rstrip("\n"))
        print(f"replaced the table of {args.write}")
    return rows, chosen


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="a quick start run folder (python quickstart.py --out ...)")
    parser.add_argument("--teacher", default=None, help="instead of --run: the teacher checkpoint")
    parser.add_argument("--student", default=None, help="instead of --run: the student checkpoint (optional)")
    parser.add_argument("--classifier", default=None, help="instead of --run: evaluator.py --feature-net")
    parser.add_argument("--reference", default=None, help="instead of --run: the reference batch .npz")
    parser.add_argument("--model-flags", default=None,
                        help=f"sample_ddp.py model flags (default: the quick start's: {' '.join(QUICKSTART_FLAGS)})")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/solvers)")
    parser.add_argument("--write", default=None, metavar="PAGE",
                        help="also replace the generated section of this page (docs/solvers.md)")
    parser.add_argument("--settings", type=parse_settings, default=parse_settings(DEFAULT_SETTINGS),
                        help=f"SAMPLER:STEPS,... separated by ';' (default {DEFAULT_SETTINGS}); include the --baseline")
    parser.add_argument("--baseline", type=lambda text: parse_settings(text)[0], default=parse_settings(BASELINE)[0],
                        help=f"the setting equal quality is measured against (default {BASELINE}, the original's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=1000, help="images per point (the quick start's 1,000)")
    parser.add_argument("--batch", type=int, default=100, help="sample_ddp.py --per-proc-batch-size")
    parser.add_argument("--nproc", type=int, default=2, help="sample_ddp.py ranks")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

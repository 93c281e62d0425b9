"""report.md (tables, figures and the plain-language verdict of each question) from the results
of reproduce.py. Every claim is printed with its interval; a verdict only says "separates" when
the 95% interval of the paired difference excludes 0."""
import json
import os

from tinyfusion.atomic_files import atomic_save_figure, atomic_write_text
from tinyfusion.stats import mean_and_std, paired_difference


def fmt_interval(low, high):
    return f"[{low:+.3g}, {high:+.3g}]"


def verdict(result, lower_is_better=True, names=("A", "B")):
    """One sentence on a paired difference A - B."""
    low, high = result["low"], result["high"]
    if result["n"] < 2 or low != low:
        return "one pair only: no interval"
    if high < 0 or low > 0:
        better = names[0] if (high < 0) == lower_is_better else names[1]
        return f"{better} is better (95% interval excludes 0)"
    return "not separable at this scale (95% interval includes 0)"


def summary_table(groups, columns=("loss", "fid", "accuracy")):
    """Markdown rows `name | n | col mean +/- std ...` for {name: [row, ...]}."""
    lines = ["| | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, rows in groups.items():
        finished = [row for row in rows if not row.get("diverged")]
        cells = []
        for column in columns:
            values = [row[column] for row in finished if row.get(column) is not None]
            cells.append("{:.4f} +/- {:.4f}".format(*mean_and_std(values)) if values else "-")
        diverged = len(rows) - len(finished)
        label = f"{name} ({diverged} diverged)" if diverged else name
        lines.append(f"| {label} | {len(finished)} | " + " | ".join(cells) + " |")
    return lines


def paired_lines(groups, reference, metrics=(("fid", True), ("loss", True), ("accuracy", False))):
    """Paired differences of every group against `reference`, matched by seed."""
    lines = [f"| {reference} minus | metric | mean difference | 95% interval | verdict |", "|---|---|---|---|---|"]
    base = {row["seed"]: row for row in groups[reference] if not row.get("diverged")}
    for name, rows in groups.items():
        if name == reference:
            continue
        pairs = [(base[row["seed"]], row) for row in rows if not row.get("diverged") and row["seed"] in base]
        for metric, lower_is_better in metrics:
            usable = [(a[metric], b[metric]) for a, b in pairs if a.get(metric) is not None and b.get(metric) is not None]
            if not usable:
                continue
            result = paired_difference([a for a, _ in usable], [b for _, b in usable])
            interval = fmt_interval(result["low"], result["high"]) if result["n"] > 1 else "-"
            lines.append(f"| {name} | {metric} | {result['mean']:+.4g} | {interval} | "
                         f"{verdict(result, lower_is_better, (reference, name))} |")
    return lines


def teacher_check(teacher, groups):
    """Is the teacher (rows over the same seeds) better than every recovered student? If not,
    the students' extra training, not the pruning, could explain a ranking."""
    teacher_fid = mean_and_std([row["fid"] for row in teacher])[0]
    best_name, best = min(((name, mean_and_std([row["fid"] for row in rows])[0]) for name, rows in groups.items()),
                          key=lambda item: item[1])
    if teacher_fid < best:
        return f"The teacher (mean FID {teacher_fid:.3f}) is better than every recovered student (best: {best_name}, {best:.3f})."
    return (f"The teacher (mean FID {teacher_fid:.3f}) is NOT better than the best recovered student ({best_name}, "
            f"{best:.3f}): the students' extra training, not the pruning, may drive a ranking.")


def calibration_section(result, out_dir):
    figure = scatter_figure(result, os.path.join(out_dir, "calibration-vs-recovery.png"))
    low, high = result["spearman_ci"]
    strength = "no reliable relation" if low <= 0 <= high else ("a positive relation" if low > 0 else "a negative relation")
    lines = ["## 1. Is calibration loss a reliable indicator of recoverability?", "",
             f"Over all {result['population']} sub-networks of the 1:2 pattern: Spearman's rank correlation between "
             f"the held-out loss right after pruning and after the same short fine-tuning is "
             f"**{result['spearman']:.3f}** (95% bootstrap interval [{low:.3f}, {high:.3f}]): {strength}.", "",
             f"![calibration vs recovery]({os.path.basename(figure)})", "",
             "| method | kept blocks | loss after fine-tuning | rank among the sub-networks (1 = best) |",
             "|---|---|---|---|"]
    for method, choice in result["choices"].items():
        note = "" if choice["probed"] else " (not among the probed sub-networks: probed the same way)"
        lines.append(f"| {method} | {' '.join(map(str, choice['kept']))} | {choice['recovered']:.4f} | "
                     f"{choice['rank']} of {result['population']}{note} |")
    lines.append(f"| random | - | - | {result['random_median_rank']:.1f} expected (uniform over the space) |")
    return lines + [""] + probe_fid_lines(result["rows"])


def probe_fid_lines(rows):
    """The few fine-tuned sub-networks that were also sampled: does the held-out loss order them as FID does?"""
    sampled = sorted((row for row in rows if row.get("fid") is not None), key=lambda row: row["recovered"])
    if not sampled:
        return []
    lines = ["FID of a few fine-tuned sub-networks (best, median and worst by held-out loss after fine-tuning, "
             "and the min-calibration one; seed 0, raw weights):", "",
             "| kept blocks | loss right after pruning | loss after fine-tuning | FID | classifier accuracy |",
             "|---|---|---|---|---|"]
    for row in sampled:
        lines.append(f"| {' '.join(map(str, row['kept']))} | {row['calibration']:.4f} | {row['recovered']:.4f} | "
                     f"{row['fid']:.3f} | {row['accuracy']:.3f} |")
    return lines


def scatter_figure(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    calibration = [row["calibration"] for row in result["rows"]]
    recovered = [row["recovered"] for row in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(calibration, recovered, s=16, color="0.55", label="every 1:2 sub-network")
    lookup = {tuple(row["kept"]): row for row in result["rows"]}
    for (method, choice), color in zip(result["choices"].items(), ("tab:blue", "tab:orange", "tab:red", "tab:green")):
        row = lookup.get(tuple(choice["kept"]))
        if row is not None:
            ax.scatter([row["calibration"]], [row["recovered"]], s=60, color=color, label=method, edgecolors="black")
    ax.set_xlabel("held-out loss right after pruning (calibration loss)")
    ax.set_ylabel("held-out loss after the same fine-tuning")
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


def activation_lines(result):
    lines = ["## 4. Extreme activations of the teacher", "",
             "| block | max abs h | std | max / std | masked share k=2 | masked share k=4 |", "|---|---|---|---|---|---|"]
    for row in result["blocks"]:
        lines.append(f"| {row['block']} | {row['max_abs']:.2f} | {row['std']:.3f} | {row['max_over_std']:.1f} | "
                     f"{row['masked_share']:.4f} | {row['masked_share_k4']:.5f} |")
    return lines


def write_report(study, results):
    """report.md and results.json in the study folder."""
    out_dir = study.out
    lines = ["# TinyFusion on the digits: the paper's questions", "",
             f"Schedule `{results['schedule']}`: {json.dumps(results['budget'])}. "
             f"This invocation: {results['wall_minutes']:.1f} min wall, {results['cpu_minutes']:.1f} min CPU "
             "(a rerun reuses every finished stage and times only what it ran).", ""]
    if "activations" in results:
        lines += activation_lines(results["activations"]) + [""]
    if "calibration" in results:
        lines += calibration_section(results["calibration"], out_dir) + [""]
    if "strategies" in results:
        strategy = results["strategies"]
        teacher = strategy["teacher"]
        with_teacher = dict(strategy["per_method"], teacher=teacher)
        lines += ["## 2. Pruning strategies, the same recovery, paired seeds", "",
                  teacher_check(teacher, strategy["per_method"]), ""]
        lines += summary_table(with_teacher) + [""] + paired_lines(with_teacher, "learned") + [""]
    if "patterns" in results:
        lines += ["## 2b. Patterns of learned pruning", ""]
        lines += summary_table(results["patterns"]["per_pattern"]) + [""]
        lines += paired_lines(results["patterns"]["per_pattern"], "1:2") + [""]
    if "recovery" in results:
        lines += ["## 3. Recovery methods (one student, paired seeds)", ""]
        lines += summary_table(results["recovery"]["per_method"]) + [""]
        lines += paired_lines(results["recovery"]["per_method"], "masked KD k=2") + [""]
    if "decisions" in results:
        lines += ["## 5. Decision dynamics", ""]
        lines += [f"![{pattern}]({figure})" for pattern, figure in results["decisions"]["figures"].items()] + [""]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
    atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1, default=float) + "\n")

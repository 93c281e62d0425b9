"""Plot the decision dynamics of a learnable-pruning run (the paper's figure): for each kept slot,
the index of the block it keeps over the training steps, coloured per slot, with the opacity
given by the confidence of the slot's group (max softmax(logits * scaling) of the EMA logits).

    python draw_decision.py --log outputs/run-DiT-XL-1-2/metrics.jsonl --out decision.png
    python draw_decision.py 0.5 prune_log.txt            # the original's command line

Reads the `kept_indices`, `confidences` and `groups` that prune_by_learning.py writes to its
JSONL log every --log-every steps. The original's form `draw_decision.py BASE LOGFILE` reads the
stdout of the original prune_by_learning.py: `Decision: [kept block indices]` and
`Confidence: [one value per group]` lines (the steps from the `(step=N)` lines before them, else
every 100 steps as the original assumed), with opacity (confidence - BASE) / (1 - BASE), and
writes decision.png and decision.pdf in the current folder (or --out).
"""
import argparse
import ast
import os
import re

import numpy as np
from tinyfusion.flags import positive_int
from tinyfusion.errors import TinyFusionError, run_main


def group_of_blocks(groups):
    """block index -> index of the group holding it."""
    owner = []
    for index, (_, group_size) in enumerate(groups):
        owner += [index] * group_size
    return owner


def decision_series(records):
    """(steps (n,), kept (n, K) block indices, alpha (n, K) confidences of each slot's group)
    from the decision records of a pruning log (records without a decision are skipped)."""
    rows = [r for r in records if r.get("kept_indices") is not None and r.get("confidences") is not None]
    if not rows:
        raise ValueError("the log has no decision records (kept_indices/confidences); is it a prune_by_learning.py log?")
    widths = {len(r["kept_indices"]) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"the log mixes decisions of different sizes {sorted(widths)}; is it from one run?")
    steps = np.array([r["step"] for r in rows], dtype=np.int64)
    kept = np.array([r["kept_indices"] for r in rows], dtype=np.int64)
    alpha = np.zeros(kept.shape, dtype=np.float64)
    for row, record in enumerate(rows):
        owner = group_of_blocks(record["groups"])
        alpha[row] = [record["confidences"][owner[j]] for j in record["kept_indices"]]
    return steps, kept, alpha


def original_log_series(lines, base=0.0, default_every=100):
    """(steps, kept (n, K), alpha (n, K)) of the original prune_by_learning.py's stdout.

    `Decision: [...]` holds the kept block indices (nested 0/1 masks per group are read too),
    `Confidence: [...]` one value per group, spread over the group's kept slots as the original
    plot does (every group keeps len(kept) / len(confidences) blocks). `[!] Final ...` lines are
    not logged steps and are skipped, like the original. Opacity is (confidence - base) / (1 - base)."""
    if not 0 <= base < 1:
        raise ValueError(f"BASE must lie in [0, 1) (the confidence drawn fully transparent, e.g. 0.5 for 1:2 groups), got {base}")
    steps, kept, confidences, step = [], [], [], None
    for number, raw in enumerate(lines, 1):
        line = re.sub(r"\x1b\[[0-9;]*m", "", raw).strip()
        line = re.sub(r"^\[[^\]]*\d{2}:\d{2}[^\]]*\]\s*", "", line)  # a logger's [date time] prefix
        match = re.match(r"\(step=(\d+)\)", line)
        if match:
            step = int(match.group(1))
            continue
        match = re.match(r"(Decision|Confidence): (\[.*\])$", line)
        if not match:
            continue
        try:
            values = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            raise ValueError(f"line {number}: cannot read {match.group(1)} list {match.group(2)[:60]!r}") from None
        if match.group(1) == "Decision":
            if values and isinstance(values[0], (list, tuple)):  # per-group 0/1 masks
                flat = [bit for mask in values for bit in mask]
                values = [index for index, bit in enumerate(flat) if bit]
            kept.append([int(v) for v in values])
            steps.append(step if step is not None else default_every * (len(kept) - 1))
            step = None
        else:
            if len(confidences) != len(kept) - 1:
                raise ValueError(f"line {number}: a Confidence line without its Decision line")
            confidences.append([float(v) for v in values])
    if not kept:
        raise ValueError("the log has no `Decision: [...]` lines; is it the output of the original prune_by_learning.py?")
    kept, confidences = kept[: len(confidences)], confidences
    if len({len(row) for row in kept}) != 1 or len({len(row) for row in confidences}) != 1:
        raise ValueError("the log mixes decisions of different sizes; is it from one run?")
    slots, groups = len(kept[0]), len(confidences[0])
    if groups == 0 or slots % groups:
        raise ValueError(f"{slots} kept blocks cannot be spread over {groups} group confidences")
    alpha = np.repeat(np.array(confidences, dtype=np.float64), slots // groups, axis=1)
    return np.array(steps[: len(kept)], dtype=np.int64), np.array(kept, dtype=np.int64), (alpha - base) / (1 - base)


def draw(records, out_path, title=None, overwrite=False):
    steps, kept, alpha = decision_series(records)
    depth = sum(size for _, size in records[-1]["groups"]) if records[-1].get("groups") else int(kept.max()) + 1
    return draw_series(steps, kept, alpha, depth, [out_path], title, overwrite)[0]


def draw_series(steps, kept, alpha, depth, out_paths, title=None, overwrite=False):
    """Plot kept block index per slot over steps, opacity alpha; one file per path (.png, .pdf)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    from tinyfusion.io.atomic_files import atomic_path
    slots = kept.shape[1]
    # distinct saturated colours (tab20's pale halves would read as low confidence)
    colors = colormaps["tab10"](np.arange(slots)) if slots <= 10 else colormaps["turbo"](np.linspace(0.05, 0.95, slots))
    fig, ax = plt.subplots(figsize=(10, 0.22 * depth + 2))
    for slot in range(slots):
        ax.plot(steps, kept[:, slot], color=colors[slot], linewidth=0.8, alpha=0.35, drawstyle="steps-post")
        rgba = np.tile(colors[slot], (len(steps), 1))
        rgba[:, 3] = np.clip(alpha[:, slot], 0.05, 1.0)
        ax.scatter(steps, kept[:, slot], c=rgba, s=14, edgecolors="none")
    ax.set_xlabel("training step")
    ax.set_ylabel("kept block index")
    ax.set_yticks(range(depth))
    ax.set_ylim(-0.5, depth - 0.5)
    ax.grid(axis="y", linewidth=0.3, alpha=0.5)
    ax.set_title(title or f"decision dynamics ({slots} of {depth} blocks kept; opacity = group confidence)")
    fig.tight_layout()
    for out_path in out_paths:
        with atomic_path(out_path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, dpi=150)
    plt.close(fig)
    return out_paths


def main(args):
    original = getattr(args, "original", None) or []
    if original and (len(original) != 2 or args.log):
        raise TinyFusionError("pass either --log RUN (our JSONL) or the original's two arguments BASE LOGFILE, "
                              "e.g. `python draw_decision.py 0.5 prune_log.txt`")
    if not original and not args.log:
        raise TinyFusionError("pass --log RUN (metrics.jsonl of a prune_by_learning.py run, or its folder), or "
                              "the original's BASE LOGFILE")
    try:
        if original:
            outs = draw_original_log(original[0], original[1], args.out, getattr(args, "depth", None), args.title,
                                     args.overwrite)
        else:
            outs = [draw_jsonl_log(args.log, args.out, args.title, args.overwrite)]
    except (ValueError, FileExistsError) as error:
        raise TinyFusionError(str(error)) from None
    print("saved " + " and ".join(outs))


def draw_jsonl_log(log, out, title, overwrite):
    from tinyfusion.io.run_folder import read_metrics
    path = os.path.join(log, "metrics.jsonl") if os.path.isdir(log) else log
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass the metrics.jsonl of a prune_by_learning.py run (or its folder)")
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), "decision.png")
    if os.path.exists(out) and not overwrite:  # checked before reading the log
        raise ValueError(f"{out} already exists; pass --overwrite to replace it or --out to write elsewhere")
    return draw(read_metrics(path), out, title, overwrite=overwrite)


def draw_original_log(base, log_file, out, depth, title, overwrite):
    """The original's `draw_decision.py BASE LOGFILE`: decision.png and decision.pdf in the
    current folder (or --out and the same name as .pdf)."""
    try:
        base = float(base)
    except ValueError:
        raise ValueError(f"BASE must be a number (the confidence drawn fully transparent), got {base!r}") from None
    if not os.path.isfile(log_file):
        raise ValueError(f"{log_file} does not exist; pass the saved output of the original prune_by_learning.py")
    with open(log_file, errors="replace") as f:
        steps, kept, alpha = original_log_series(f, base)
    depth = depth or int(kept.max()) + 1
    if kept.max() >= depth:
        raise ValueError(f"the log keeps block {int(kept.max())}, beyond --depth {depth}")
    stem = os.path.splitext(out)[0] if out else "decision"
    return draw_series(steps, kept, alpha, depth, [stem + ".png", stem + ".pdf"], title, overwrite)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", nargs="*", metavar="BASE LOGFILE",
                        help="the original's arguments: the confidence shown transparent, and its log")
    parser.add_argument("--log", type=str, default=None, help="metrics.jsonl of a pruning run, or the run folder")
    parser.add_argument("--out", type=str, default=None, help="PNG to write (default: decision.png next to the log; "
                                                             "with BASE LOGFILE decision.png and .pdf here)")
    parser.add_argument("--depth", type=positive_int, default=None, help="BASE LOGFILE: blocks on the y axis "
                                                               "(default: the largest kept index + 1)")
    parser.add_argument("--title", type=str, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    run_main(main, parser.parse_args())

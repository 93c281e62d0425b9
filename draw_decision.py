"""Plot the decision dynamics of a learnable-pruning run (the paper's figure): for each kept slot,
the index of the block it keeps over the training steps, coloured per slot, with the opacity
given by the confidence of the slot's group (max softmax(logits * scaling) of the EMA logits).

    python draw_decision.py --log results/000-DiT-XL-1-2/metrics.jsonl --out decision.png

Reads the `kept_indices`, `confidences` and `groups` that prune_by_learning.py writes to its
JSONL log every --log-every steps.
"""
import argparse
import os

import numpy as np


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


def draw(records, out_path, title=None, overwrite=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    from tinyfusion.atomic_files import atomic_path
    steps, kept, alpha = decision_series(records)
    depth = sum(size for _, size in records[-1]["groups"]) if records[-1].get("groups") else int(kept.max()) + 1
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
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)
    return out_path


def main(args):
    from tinyfusion.runlog import read_metrics
    path = os.path.join(args.log, "metrics.jsonl") if os.path.isdir(args.log) else args.log
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist; pass the metrics.jsonl of a prune_by_learning.py run (or its folder)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "decision.png")
    if os.path.exists(out) and not args.overwrite:  # checked before reading the log
        raise SystemExit(f"error: {out} already exists; pass --overwrite to replace it or --out to write elsewhere")
    try:
        draw(read_metrics(path), out, args.title, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as error:
        message = str(error)
        raise SystemExit(message if message.startswith("error:") else f"error: {message}") from None
    print(f"saved {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=str, required=True, help="metrics.jsonl of a pruning run, or the run folder")
    parser.add_argument("--out", type=str, default=None, help="PNG to write (default: decision.png next to the log)")
    parser.add_argument("--title", type=str, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    main(parser.parse_args())

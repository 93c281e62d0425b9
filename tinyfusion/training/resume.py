"""Training checkpoint files and `--resume`: the RNG state of every rank, training checkpoints
(written atomically by rank 0, read back with weights_only=True), `--resume PATH|auto`, the loop
position (epoch, batches consumed in it) and the original's optimizer state. The loop's state
itself, what it saves and restores, is tinyfusion/training/state.py's LoopState.

A training checkpoint is the original's dict `{model, ema, opt, sched, train_steps, args}` plus
`epoch`, `batches_into_epoch`, `rng` (one state per rank), `world_size`, `skipped_steps` and
`loop` (the optimisation settings it was written with, so a resume can tell which of them the
command line changes). `args` is a plain dict, so `torch.load(path)` reads it with its default
weights_only=True; checkpoints whose `args` is an argparse.Namespace (the original's and our
older ones) are still read (the class is allow-listed in tinyfusion.io.checkpoints).

The original train.py saves the state of an AdamW over every parameter of the model, including
the frozen `pos_embed`; ours covers only what trains. `map_full_model_optimizer_state`
translates the first into the second by parameter position.
"""
import argparse
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from tinyfusion.io.checkpoints import load_checkpoint_file, save_checkpoint
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.run_folder import latest_checkpoint

CHECKPOINT_KEYS = ("model", "ema", "opt", "train_steps")


# ------------------------------------------------------------------------------ RNG
def seed_everything(global_seed, ctx):
    """Seed python, numpy and torch with `global_seed * world_size + rank` (DiT's rule: every rank
    draws different noise). Returns the seed."""
    seed = global_seed * ctx.world_size + ctx.rank
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return seed


def capture_rng_state():
    """This process's RNG states as plain values and tensors (safe for weights_only loading)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state):
    """Inverse of capture_rng_state."""
    python = state["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"].tolist()), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx):
    """Every rank's RNG state, as a list indexed by rank (collective: call on all ranks)."""
    state = capture_rng_state()
    if not ctx.is_distributed:
        return [state]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng(checkpoint, ctx, global_seed):
    """Restore this rank's RNG from a checkpoint saved with the same world size. With another
    world size (or no stored states) the ranks are re-seeded from (global_seed, train_steps), so
    the run goes on with fresh but reproducible noise. Returns True if the exact state was restored."""
    states = checkpoint.get("rng")
    if states and len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
        return True
    step = int(checkpoint.get("train_steps", 0))
    seed = (global_seed * 1_000_003 + step) * ctx.world_size + ctx.rank
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    return False


# ------------------------------------------------------------------------------ checkpoints
def save_training_checkpoint(path, ctx, *, weights, state, extra=None):
    """Write a training checkpoint atomically. COLLECTIVE: call on every rank, with `state` the
    loop's LoopState.state_dict() (which gathers every rank's RNG state); only rank 0 writes.
    `weights()` returns (model state, ema state) and is called on rank 0 only (the state dicts
    may be large); `extra` (plain values / tensors, e.g. the gate decision) is merged in last.
    Returns `path`."""
    if ctx.is_main:
        model_state, ema_state = weights()
        checkpoint = {"model": model_state, "ema": ema_state, **state, **(extra or {})}
        save_checkpoint(checkpoint, path, overwrite=True)
    if ctx.is_distributed:
        dist.barrier()
    return path


def load_training_checkpoint(path):
    """A training checkpoint (weights_only) with its keys checked: a plain weights file is a
    one-line error pointing at --load-weight."""
    checkpoint = load_checkpoint_file(path)
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise TinyFusionError(f"{path} is not a training checkpoint (no {', '.join(missing)}); "
                              f"to start from its weights use --load-weight {path} instead of --resume")
    return checkpoint


def saved_args(checkpoint):
    """The flags a training checkpoint was written with, as a dict (args may be a Namespace)."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def resolve_resume(resume_flag, run_dir):
    """The checkpoint to resume from: None without --resume, the newest checkpoint of `run_dir`
    for 'auto' (None when there is none yet: a fresh start), else the given path (must exist)."""
    if not resume_flag:
        return None
    if resume_flag == "auto":
        return latest_checkpoint(run_dir)
    if not os.path.isfile(resume_flag):
        raise TinyFusionError(f"--resume {resume_flag} does not exist; pass a checkpoint file or 'auto'")
    return resume_flag


def check_resume_compatible(checkpoint, path, **current):
    """A resumed run must keep the model and the global batch (the data position counts
    batches): `current` holds e.g. model=..., global_batch_size=... as the command line has them."""
    saved = saved_args(checkpoint)
    for flag, new in current.items():
        old = saved.get(flag)
        if old is not None and old != new:
            raise TinyFusionError(f"{path} was trained with --{flag.replace('_', '-')} {old}, not {new}; "
                                  f"resume with the same value or start a new run (another --prefix)")


# ------------------------------------------------------------------------------ loop position
def normalize_position(epoch, batches_into_epoch, batches_per_epoch):
    """(epoch, batch) to continue from: a checkpoint written after an epoch's last batch
    continues at the next epoch's first."""
    if batches_into_epoch >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, batches_into_epoch


def checkpoint_position(checkpoint, batches_per_epoch):
    """(epoch, batch) a checkpoint continues from. The original's checkpoints store only
    train_steps: with the same global batch that is train_steps // batches_per_epoch epochs."""
    if "epoch" in checkpoint:
        return normalize_position(int(checkpoint["epoch"]), int(checkpoint.get("batches_into_epoch", 0)),
                                  batches_per_epoch)
    return divmod(int(checkpoint["train_steps"]), batches_per_epoch)


def map_full_model_optimizer_state(saved_state, *, all_names, trained_names, path):
    """An optimizer state saved over every parameter of the model (`all_names`, in
    model.parameters() order: the original train.py's AdamW(model.parameters())) rewritten for
    an optimizer over `trained_names` only (one group). Refuses in one line when the saved
    state does not cover the model parameter for parameter."""
    groups = saved_state.get("param_groups", [])
    indices = [index for group in groups for index in group["params"]]
    if len(groups) != 1 or len(indices) != len(all_names):
        raise TinyFusionError(f"{path} holds optimizer state for {len(indices)} tensors in {len(groups)} group(s), "
                              f"the model has {len(all_names)}; start from its weights with --load-weight {path} "
                              f"instead of --resume")
    name_of = dict(zip(indices, all_names))
    position = {name: index for index, name in enumerate(trained_names)}
    state = {position[name_of[index]]: value for index, value in saved_state.get("state", {}).items()
             if name_of[index] in position}
    group = dict(groups[0], params=list(range(len(trained_names))))
    return {"state": state, "param_groups": [group]}

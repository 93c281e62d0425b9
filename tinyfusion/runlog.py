"""Run folders and logging shared by the training and pruning scripts.

A run lives in `{results_dir}/{prefix}-{model with / replaced by -}` (the original layout) with
`args.json`, `log.txt`, `metrics.jsonl` and `checkpoints/{step:07d}.pt`. Only rank 0 writes.
"""
import glob
import json
import logging
import os
import sys
import time

from tinyfusion.atomic_files import atomic_path, atomic_write_json
from tinyfusion.errors import TinyFusionError


def run_folder_name(results_dir, prefix, model_name):
    return os.path.join(results_dir, f"{prefix}-{model_name.replace('/', '-')}")


def latest_checkpoint(run_dir):
    """Path of the newest `checkpoints/NNNNNNN.pt` in a run folder, or None."""
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))
    return found[-1] if found else None


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def prepare_run_folder(run_dir, args, resuming, is_main):
    """Create the run folder (rank 0). A folder that already holds checkpoints is only reused
    with --resume, so a finished run is never overwritten by a copy-pasted command."""
    if not is_main:
        return run_dir
    if not resuming and latest_checkpoint(run_dir) is not None:
        raise TinyFusionError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                              f"or choose another --prefix/--results-dir")
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    args_name = "args.json" if not resuming else f"args-resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(os.path.join(run_dir, args_name), args if isinstance(args, dict) else vars(args))
    return run_dir


def create_logger(run_dir=None, is_main=True, name="tinyfusion"):
    """Rank 0 logs to the console and `run_dir/log.txt`; other ranks get a silent logger."""
    logger = logging.getLogger(f"{name}.{os.getpid()}")
    logger.handlers.clear()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        return logger
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "log.txt")))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


class MetricsLog:
    """Append-only JSONL of training metrics (one object per line, flushed each write so a
    killed run keeps everything it logged). Silent on ranks other than 0."""

    def __init__(self, path, is_main=True):
        self.path = path
        self.is_main = is_main

    def write(self, **record):
        if not self.is_main:
            return
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def truncate_after(self, step):
        """Drop the records of steps after `step` (a resumed run logs them again), atomically:
        a crash leaves the old file or the new one, never a half-written one."""
        if not self.is_main or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) == len(lines):
            return
        with atomic_path(self.path, overwrite=True) as tmp:
            with open(tmp, "w") as f:
                f.writelines(kept)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

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

from tinyfusion.io.atomic_files import atomic_path, atomic_write_json
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.run_lock import lock_folder, release_folder


def run_folder_name(results_dir, prefix, model_name):
    return os.path.join(results_dir, f"{prefix}-{model_name.replace('/', '-')}")


def latest_checkpoint(run_dir):
    """Path of the newest `checkpoints/NNNNNNN.pt` in a run folder, or None."""
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "[0-9]" * 7 + ".pt")))
    return found[-1] if found else None


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def prepare_run_folder(run_dir, args, resuming, is_main):
    """Create and lock the run folder (rank 0). A folder that already holds checkpoints is only
    reused with --resume, so a finished run is never overwritten by a copy-pasted command; a
    folder another live run holds is refused (naming that run); temporaries of a checkpoint
    write that was killed are removed. The lock lasts until `release_run_folder(run_dir)` or
    the end of the process."""
    if not is_main:
        return run_dir
    if not resuming and latest_checkpoint(run_dir) is not None:
        raise TinyFusionError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                         f"or choose another --prefix/--results-dir")
    lock_run_folder(run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    remove_stale_temporaries(run_dir)
    args_name = "args.json" if not resuming else f"args-resume-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(os.path.join(run_dir, args_name), args if isinstance(args, dict) else vars(args))
    return run_dir


def log_to_run_folder(run_dir, message):
    """A line for the console and `run_dir/log.txt` before the run's logger exists."""
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(os.path.join(run_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def lock_run_folder(run_dir):
    """Take the exclusive lock of a run folder (see tinyfusion/io/run_lock.py); a TinyFusionError
    naming the holder (host, pid, start time) when another live run has it."""
    return lock_folder(run_dir, what="run folder", log=lambda message: log_to_run_folder(run_dir, message))


def release_run_folder(run_dir):
    """Release the lock `prepare_run_folder` took (call it when the run ends, also on error)."""
    release_folder(run_dir)


def stale_temporaries(run_dir):
    """Temporary files (`.0000500.x1y2.tmp.pt`, `.args.json.*.tmp.json`) of writes that a killed
    run never finished: only complete files are ever renamed into place, so these are litter."""
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", ".*.tmp*")) + glob.glob(os.path.join(run_dir, ".*.tmp*")))


def remove_stale_temporaries(run_dir):
    """Delete stale_temporaries(run_dir) with a log line; call only while holding the folder's lock
    (a live run's temporaries are not stale). Returns the removed paths."""
    found = stale_temporaries(run_dir)
    if found:
        size = sum(os.path.getsize(path) for path in found)
        for path in found:
            os.remove(path)
        log_to_run_folder(run_dir, f"removed {len(found)} temporary file(s) of an interrupted write "
                                   f"({size / 2 ** 20:.1f} MiB): {', '.join(os.path.basename(p) for p in found[:3])}")
    return found


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


def open_run_folder(run_args, ctx, run_dir, resuming):
    """Create the run folder on rank 0 (args.json; refuses to reuse a folder holding checkpoints
    unless resuming) and return (logger, metrics); an error reaches every rank as one line."""
    from tinyfusion.distributed import broadcast_object  # imports torch; the rest of this module does not
    error = None
    if ctx.is_main:
        try:
            prepare_run_folder(run_dir, run_args, resuming, ctx.is_main)
        except TinyFusionError as refused:
            error = str(refused)
    error = broadcast_object(error, ctx)
    if error:
        raise TinyFusionError(error)
    logger = create_logger(run_dir, ctx.is_main)
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), ctx.is_main)
    return logger, metrics

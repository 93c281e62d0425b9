"""The one error type of the library, and how scripts report it.

Library code raises `TinyFusionError("what is wrong and what to do")` for bad input or a
refused operation: one line a user can act on. Only scripts exit: `run_main(main, args)` turns
the error into `error: ...` on stderr (printed once, by rank 0 under torchrun) and exit code 2.
A write the filesystem refuses (read-only, no permission, full disk) ends the same way, wherever
it happens: it is the user's environment, not a bug, and a traceback would hide the path.
"""
import errno
import os
import sys

UNWRITABLE = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted", errno.ENOSPC: "no space left on device",
              errno.EDQUOT: "disk quota exceeded"}


class TinyFusionError(Exception):
    """Bad input or a refused operation, explained in one line (no traceback for the user)."""


def run_main(main, *args, **kwargs):
    """Call a script's `main`; a TinyFusionError becomes one line on stderr and exit code 2."""
    try:
        return main(*args, **kwargs)
    except (TinyFusionError, OSError) as error:
        message = str(error) if isinstance(error, TinyFusionError) else unwritable_message(error)
        if message is None:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr, flush=True)
        _leave_process_group()
        sys.exit(2)


def unwritable_message(error, path=None):
    """One line for an OSError of a refused write (read-only file system, no permission, full
    disk) naming `path` (default: the file in the error); None for any other error."""
    if not isinstance(error, OSError) or error.errno not in UNWRITABLE:
        return None
    path = path or error.filename or "the output"
    return (f"cannot write {path}: {UNWRITABLE[error.errno]} (errno {errno.errorcode[error.errno]}); choose a folder "
            f"you can write to")


def _leave_process_group():
    """Every rank raised the same error: leave the process group cleanly (no teardown warnings)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

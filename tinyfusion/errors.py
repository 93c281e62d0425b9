"""The one error type of the library, and how scripts report it.

Library code raises `TinyFusionError("what is wrong and what to do")` for bad input or a
refused operation: one line a user can act on. Only scripts exit: `run_main(main, args)` turns
the error into `error: ...` on stderr (printed once, by rank 0 under torchrun) and exit code 2.
"""
import os
import sys


class TinyFusionError(Exception):
    """Bad input or a refused operation, explained in one line (no traceback for the user)."""


def run_main(main, *args, **kwargs):
    """Call a script's `main`; a TinyFusionError becomes one line on stderr and exit code 2."""
    try:
        return main(*args, **kwargs)
    except TinyFusionError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            message = str(error)
            print(message if message.startswith("error:") else f"error: {message}", file=sys.stderr, flush=True)
        _leave_process_group()
        sys.exit(2)


def _leave_process_group():
    """Every rank raised the same error: leave the process group cleanly (no teardown warnings)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

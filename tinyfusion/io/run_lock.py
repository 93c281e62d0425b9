"""An exclusive lock on an output folder (training run, sample run, feature store), so that two
runs pointed at the same folder never overwrite each other's checkpoints, logs or samples.

The lock is `FOLDER/.tinyfusion.lock`: an `flock` held by the running process (the kernel drops
it when the process dies, even on kill -9) plus a line of JSON naming the holder (host, pid,
start time, command) for the error message of a second run. A lock file whose flock is free
was left by a run that died without releasing it: it is taken over, with a log line. On a
filesystem without flock support the holder's pid decides: a dead pid on this host is stale,
anything else is refused.

Only one rank (rank 0) takes the lock. Inside one process the lock is re-entrant: taking a
folder this process already holds returns the same lock (sequential runs in one Python process,
as in the tests, need no release in between; `release_folder` or process exit ends it).
"""
import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time

from tinyfusion.errors import TinyFusionError, unwritable_message

LOCK_FILE = ".tinyfusion.lock"
_held = {}  # realpath of the folder -> FolderLock held by this process


class FolderLocked(TinyFusionError):
    """Another live run holds the folder."""


def _process_start_ticks(pid):
    """Start time of `pid` in clock ticks since boot (Linux), or None: tells a recycled pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid, start_ticks=None):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start_ticks is not None:
        now = _process_start_ticks(pid)
        return now is None or now == start_ticks
    return True


def describe_holder(holder):
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {started}: {holder.get('command', '?')})"


class FolderLock:
    """An acquired lock on `folder`; `release()` (idempotent) removes it."""

    def __init__(self, folder, handle, holder):
        self.folder, self.path, self.handle, self.holder = folder, os.path.join(folder, LOCK_FILE), handle, holder

    def release(self):
        if self.handle is None:
            return
        try:
            os.remove(self.path)  # while still holding the flock: nobody can take it in between
        except OSError:
            pass
        self.handle.close()
        self.handle = None
        _held.pop(os.path.realpath(self.folder), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_holder(handle):
    handle.seek(0)
    try:
        return json.loads(handle.read() or "null")
    except ValueError:
        return None


def _try_flock(handle):
    """True when locked, False when another process holds it, None when the filesystem has no flock."""
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise


def lock_folder(folder, *, what="run folder", log=print):
    """Take the exclusive lock on `folder` (created if missing) and return a FolderLock; raise
    FolderLocked naming the holder when another live run has it. A stale lock (its run died) is
    taken over and `log` says so."""
    folder = os.fspath(folder)
    key = os.path.realpath(folder)
    if key in _held:
        return _held[key]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    while True:
        handle = open(path, "a+")
        locked = _try_flock(handle)
        previous = _read_holder(handle)
        if locked is None:  # no flock here: judge by the recorded pid
            same_host = previous and previous.get("host") == socket.gethostname()
            locked = not previous or (same_host and not _pid_alive(previous.get("pid", -1), previous.get("start_ticks")))
        if not locked:
            handle.close()
            raise FolderLocked(f"{what} {folder} is in use by {describe_holder(previous)}; wait for that run to "
                               f"finish (or stop it), or choose another folder")
        try:
            same_file = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        handle.close()  # the previous holder removed this lock file while we opened it: try again
    if previous:
        log(f"taking over the stale lock of {what} {folder} left by {describe_holder(previous)}, which is no "
            f"longer running")
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _process_start_ticks(os.getpid()),
              "started": time.time(), "command": " ".join([os.path.basename(sys.argv[0] if sys.argv else "python"), *sys.argv[1:]])[:160]}
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
    except OSError as error:  # a full or read-only disk: no lock, no lock file, one line
        os.remove(path)
        try:
            handle.close()  # flushes the unwritten holder again: the same error
        except OSError:
            pass
        raise TinyFusionError(unwritable_message(error, path) or f"cannot write {path}: {error}") from None
    lock = FolderLock(folder, handle, holder)
    _held[key] = lock
    return lock


def release_folder(folder):
    """Release this process's lock on `folder` (no-op when it holds none)."""
    lock = _held.get(os.path.realpath(os.fspath(folder)))
    if lock is not None:
        lock.release()


@atexit.register
def _release_all():
    for lock in list(_held.values()):
        lock.release()

"""Atomic file writes: a result is either absent or complete, never half-written.

Every writer goes to a temporary file in the destination folder (same filesystem, so the
final os.replace is atomic) and is renamed into place only after it was flushed and fsynced.
A full disk is reported as such ("no space left on device while writing PATH"), whatever the
writer (torch.save only says "file write failed"). A folder (a diffusers model, a pipeline) is
written into a temporary sibling folder and renamed into place the same way.
"""
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from tinyfusion.errors import TinyFusionError, unwritable_message

FULL_DISK_BYTES = 1 << 20  # a write that failed with less than this left on the device ran out of space


@contextmanager
def atomic_path(path, overwrite=True):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.
    With overwrite=False an existing `path` is an error (results are never silently
    replaced). The temporary file is removed if the body raises."""
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"error: {path} already exists; remove it or choose another output path")
    folder = os.path.dirname(os.path.abspath(path))
    # keep the real suffix so libraries that dispatch on it (np.savez, PIL) behave
    base, suffix = os.path.splitext(os.path.basename(path))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, tmp_path = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{suffix}", dir=folder)
    except OSError as error:
        message = unwritable_message(error, path)
        if message is None:
            raise
        raise TinyFusionError(message) from None
    os.close(handle)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb") as written:
                os.fsync(written.fileno())
        except Exception as error:
            if out_of_space(folder, error):
                raise TinyFusionError(f"no space left on device while writing {path} "
                                      f"({free_bytes(folder) / 2 ** 20:.1f} MiB free in {folder})") from None
            raise
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp makes 0600; results should read like any file
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def atomic_write_bytes(path, data, overwrite=True):
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text, overwrite=True):
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path, obj, overwrite=True):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", overwrite=overwrite)


def atomic_save_figure(fig, path, dpi=120):
    """A matplotlib figure laid out, written atomically as PNG, and closed; returns `path`."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def write_folder_atomically(out, overwrite, write):
    """Call write(tmp_folder), then move tmp_folder to `out` with a rename: `out` is absent or complete.
    An existing `out` is replaced only with overwrite=True (else a TinyFusionError)."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise TinyFusionError(f"{out} already exists; choose another output folder or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        write(tmp)
        # mkdtemp (and some writers) make owner-only entries; give the result the usual permissions
        umask = _current_umask()
        for root, folders, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        if os.path.exists(out):  # only reached with --overwrite: set the old folder aside until the new one is in
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".old", dir=parent)
            os.replace(out, os.path.join(old, "replaced"))
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(os.path.join(old, "replaced"), out)  # put the old folder back
                raise
            finally:
                if os.path.exists(out):
                    shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def free_bytes(folder):
    """Bytes this process may still write on folder's device (root may use the reserved blocks)."""
    stats = os.statvfs(folder)
    return (stats.f_bfree if os.geteuid() == 0 else stats.f_bavail) * stats.f_frsize


def out_of_space(folder, error):
    """Whether a failed write into folder failed for lack of space: ENOSPC / EDQUOT, or any
    writer error while (almost) nothing is left on the device (torch.save hides the errno)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(folder) < FULL_DISK_BYTES
    except OSError:
        return False

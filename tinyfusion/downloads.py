"""The released weights: where they come from, where they are kept, and how they are fetched.

A released file is named by its bare file name (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`,
`TinyDiT-D14-MaskedKD-500K.pt`) wherever a script takes a checkpoint. It is looked up in
`pretrained/` and in the original's `pretrained_models/`, and otherwise downloaded once into
`pretrained/`: into `<name>.part` (resumed with an HTTP Range request after an interruption, even
in a later run), checked against the expected size, and renamed into place only when complete,
so a file under the final name is always whole.

`TINYFUSION_DOWNLOAD_URL`, when set, replaces every base URL (files are fetched as
`$TINYFUSION_DOWNLOAD_URL/<file name>`): a mirror, or a local server in the tests.
"""
import fcntl
import hashlib
import http.client
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from tinyfusion.errors import TinyFusionError

DIT_RELEASE = "https://dl.fbaipublicfiles.com/DiT/models"
TINYFUSION_RELEASE = "https://github.com/VainF/TinyFusion/releases/download/v1.0.0"
# size: bytes of the released file when known (then checked); None = check only that the
# server delivered the Content-Length it announced
RELEASED = {
    "DiT-XL-2-256x256.pt": dict(base=DIT_RELEASE, size=None, about="DiT-XL/2, ImageNet 256x256 (675M parameters)"),
    "DiT-XL-2-512x512.pt": dict(base=DIT_RELEASE, size=None, about="DiT-XL/2, ImageNet 512x512 (675M parameters)"),
    "TinyDiT-D14-MaskedKD-500K.pt": dict(base=TINYFUSION_RELEASE, size=None,
                                         about="TinyDiT-D14 (DiT-D14/2), Masked KD 500K steps (340M parameters)"),
}
DOWNLOAD_FOLDER = "pretrained"
SEARCH_FOLDERS = ("pretrained", "pretrained_models")  # ours, then the original's
URL_ENVIRONMENT_VARIABLE = "TINYFUSION_DOWNLOAD_URL"
CHUNK_BYTES = 1 << 20


class _Interrupted(Exception):
    """The connection ended before the announced length: resume from the .part file."""


def release_url(name):
    """The URL of released file `name` ($TINYFUSION_DOWNLOAD_URL/<name> when that is set)."""
    if name not in RELEASED:
        raise TinyFusionError(f"{name} is not a released file; choose one of {', '.join(RELEASED)}")
    base = os.environ.get(URL_ENVIRONMENT_VARIABLE) or RELEASED[name]["base"]
    return f"{base.rstrip('/')}/{name}"


def is_released_name(name_or_path):
    """True for a bare released file name (no folder), the form that triggers a download."""
    name_or_path = os.fspath(name_or_path)
    return name_or_path in RELEASED and os.path.basename(name_or_path) == name_or_path


def find_local(name, folders=SEARCH_FOLDERS):
    """The path of a downloaded copy of `name` in `folders`, or None."""
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def resolve_released(name_or_path, folder=DOWNLOAD_FOLDER, progress=True):
    """An existing path is returned as is; a bare released name becomes its local copy,
    downloaded first if there is none; anything else is returned unchanged (the caller reports
    it missing with `missing_checkpoint_message`)."""
    name_or_path = os.fspath(name_or_path)
    if os.path.exists(name_or_path) or not is_released_name(name_or_path):
        return name_or_path
    return find_local(name_or_path, (folder,) + SEARCH_FOLDERS) or download(name_or_path, folder=folder,
                                                                            progress=progress)


def missing_checkpoint_message(path):
    """One line for a checkpoint that does not exist: the release URL when the file name is a
    released one, no URL otherwise (the user's own files cannot be downloaded)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if name in RELEASED:
        return (f"checkpoint {path} does not exist; it is a released file: `python download.py {name}` "
                f"fetches it into {DOWNLOAD_FOLDER}/ (or pass the bare name {name}, which downloads it), "
                f"or `wget -c {release_url(name)} -P {DOWNLOAD_FOLDER}`")
    return f"checkpoint {path} does not exist; check the path"


@contextmanager
def _download_lock(final_path):
    """One downloader per file on this machine: the ranks of a torchrun job wait for the first
    one instead of writing the same .part together. The lock lives in the temp folder, so a
    failed download leaves nothing next to the weights."""
    key = hashlib.sha1(os.path.abspath(final_path).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"tinyfusion-download-{key}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def download(name, folder=DOWNLOAD_FOLDER, progress=True, max_attempts=20, max_stalls=3, retry_wait=2.0,
             timeout=60.0):
    """Fetch released file `name` into `folder` and return its path (an existing copy is kept).

    Interruptions are retried from where they stopped (HTTP Range); after `max_stalls`
    consecutive attempts without a new byte (or `max_attempts` in all, or at once when the host
    cannot be resolved or refuses the connection: offline) it gives up with one line, keeping `<name>.part` for the next run. A completed file of the wrong size is deleted."""
    url = release_url(name)
    final_path = os.path.join(folder, name)
    part_path = final_path + ".part"
    expected = RELEASED[name]["size"]
    with _download_lock(final_path):
        if os.path.isfile(final_path):  # another rank finished it while we waited
            return final_path
        stalls, attempts, last_error = 0, 0, None
        while True:
            before = _size(part_path)
            attempts += 1
            try:
                _fetch(url, part_path, expected, progress, timeout)
                break
            except urllib.error.HTTPError as error:
                raise TinyFusionError(f"cannot download {name}: HTTP {error.code} {error.reason} from {url}; "
                                      f"check the URL{_mirror_hint()}") from None
            except (_Interrupted, urllib.error.URLError, http.client.HTTPException, ConnectionError,
                    socket.timeout, TimeoutError) as error:
                last_error = error
                stalls = 0 if _size(part_path) > before else stalls + 1
                unreachable = isinstance(getattr(error, "reason", None), (socket.gaierror, ConnectionRefusedError))
                if unreachable or stalls >= max_stalls or attempts >= max_attempts:
                    raise TinyFusionError(_failure_message(name, url, part_path, last_error)) from None
                time.sleep(retry_wait)
        size = _size(part_path)
        if expected is not None and size != expected:
            os.remove(part_path)
            raise TinyFusionError(f"downloaded {name} has {size} bytes, expected {expected}: the server sent "
                                  f"another file; removed it. Check {url}{_mirror_hint()}")
        with open(part_path, "rb") as complete:
            os.fsync(complete.fileno())
        os.replace(part_path, final_path)
        return final_path


def _fetch(url, part_path, expected, progress, timeout):
    """One HTTP request appending to part_path from its current size; returns the total size
    (None if the server did not say). Raises _Interrupted when the body ends early."""
    from tqdm import tqdm
    start = _size(part_path)
    headers = {"User-Agent": "tinyfusion-download", **({"Range": f"bytes={start}-"} if start else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # nothing left to send: complete, or a stale longer file
            match = re.match(r"bytes \*/(\d+)", error.headers.get("Content-Range", ""))
            if match and int(match.group(1)) == start:
                return start
            os.remove(part_path)
            raise _Interrupted("the partial file did not match the server's; restarting") from None
        raise
    with response:
        resumed = start and response.status == 206
        if start and not resumed:
            start = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        if expected is not None and total is not None and total != expected:
            raise TinyFusionError(f"{url} announces {total} bytes, but {os.path.basename(part_path)[:-5]} has "
                                  f"{expected}: not the released file{_mirror_hint()}")
        os.makedirs(os.path.dirname(part_path) or ".", exist_ok=True)
        with open(part_path, "ab" if resumed else "wb", buffering=0) as out, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                     desc=os.path.basename(part_path)[:-5] + (" (resumed)" if resumed else "")) as bar:
            while True:
                chunk = response.read1(CHUNK_BYTES)  # what has arrived: the .part grows as bytes come in
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and _size(part_path) < total:
        raise _Interrupted(f"connection closed at {_size(part_path)} of {total} bytes")
    return total


def _failure_message(name, url, part_path, error):
    reason = getattr(error, "reason", None) or error
    kept = _size(part_path)
    partial = (f"; {part_path} keeps the {kept} bytes received and the next run resumes from there"
               if kept else "; nothing was written")
    return (f"cannot download {name} from {url} ({type(error).__name__}: {reason}); offline? fetch it yourself: "
            f"wget -c {url} -P {os.path.dirname(part_path) or '.'}{partial}")


def _mirror_hint():
    value = os.environ.get(URL_ENVIRONMENT_VARIABLE)
    return f" ({URL_ENVIRONMENT_VARIABLE}={value} replaces the release URL)" if value else ""


def _size(path):
    return os.path.getsize(path) if os.path.isfile(path) else 0

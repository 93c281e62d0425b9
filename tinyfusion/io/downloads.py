"""The released files: where they come from, how they are checked, where they are kept, how they are fetched.

A released file is named by its bare file name (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`,
`TinyDiT-D14-MaskedKD-500K.pt`, `SiT-XL-2-256x256.pt`) wherever a script takes a checkpoint; the
evaluator fetches `classify_image_graph_def.pb` the same way. A file is looked up in `pretrained/` and
in the original's `pretrained_models/`, and otherwise downloaded once into `pretrained/`: into
`<name>.part` (resumed with an HTTP Range request after an interruption, even in a later run), then
checked (size, sha256, not an HTML page, not shorter than the model it must hold) and renamed into
place only when it passed, so a file under the final name is always the released one.

The sha256 and size of a file are taken from the table below where public material states them. Where
none does, the first download pins them (trust on first use) in `MANIFEST.json` next to the files,
and every later download into that folder must match. A lock file `.<name>.lock` in the download
folder keeps the ranks of a torchrun job from writing the same file together; it is removed after.

`TINYFUSION_DOWNLOAD_URL`, when set, replaces every base URL (files are fetched as
`$TINYFUSION_DOWNLOAD_URL/<file name>`): a mirror, or a local server in the tests.
"""
import fcntl
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from tinyfusion.errors import TinyFusionError

DIT_RELEASE = "https://dl.fbaipublicfiles.com/DiT/models"
TINYFUSION_RELEASE = "https://github.com/VainF/TinyFusion/releases/download/v1.0.0"
ADM_REFERENCE_FILES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches"
SIT_RELEASE_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                   "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0")
# sha256 / size: published values, or None (then pinned in MANIFEST.json at the first download).
# min_size: a floor no complete file can be under (parameters x 2 bytes, true even for fp16 weights),
# so a short body or an error page is refused even before anything is pinned.
# default: fetched by a bare `python download.py`.
RELEASED = {
    "DiT-XL-2-256x256.pt": dict(base=DIT_RELEASE, sha256=None, size=None, min_size=1_300_000_000, default=True,
                                about="DiT-XL/2, ImageNet 256x256 (675M parameters)"),
    "DiT-XL-2-512x512.pt": dict(base=DIT_RELEASE, sha256=None, size=None, min_size=1_300_000_000, default=True,
                                about="DiT-XL/2, ImageNet 512x512 (675M parameters)"),
    "TinyDiT-D14-MaskedKD-500K.pt": dict(base=TINYFUSION_RELEASE, sha256=None, size=None, min_size=650_000_000,
                                         default=True,
                                         about="TinyDiT-D14 (DiT-D14/2), Masked KD 500K steps (340M parameters)"),
    "SiT-XL-2-256x256.pt": dict(url=SIT_RELEASE_URL, sha256=None, size=None, min_size=1_300_000_000, default=False,
                                about="SiT-XL/2, ImageNet 256x256 (675M parameters)"),
    "classify_image_graph_def.pb": dict(base=ADM_REFERENCE_FILES, sha256=None, size=None, min_size=80_000_000,
                                        default=False,
                                        about="ADM evaluator's Inception-v3 graph (24M float32 weights)"),
}
DEFAULT_NAMES = tuple(name for name, entry in RELEASED.items() if entry["default"])
DOWNLOAD_FOLDER = "pretrained"
SEARCH_FOLDERS = ("pretrained", "pretrained_models")  # ours, then the original's
MANIFEST_NAME = "MANIFEST.json"
URL_ENVIRONMENT_VARIABLE = "TINYFUSION_DOWNLOAD_URL"
DEFAULT_TIMEOUT = 60.0  # seconds without a byte from the server before a download gives up
CHUNK_BYTES = 1 << 20


class _Interrupted(Exception):
    """The connection ended before the announced length: resume from the .part file."""


def release_url(name):
    """The URL of released file `name` ($TINYFUSION_DOWNLOAD_URL/<name> when that is set)."""
    if name not in RELEASED:
        raise TinyFusionError(f"{name} is not a released file; choose one of {', '.join(RELEASED)}")
    mirror = os.environ.get(URL_ENVIRONMENT_VARIABLE)
    if not mirror and "url" in RELEASED[name]:
        return RELEASED[name]["url"]
    return f"{(mirror or RELEASED[name]['base']).rstrip('/')}/{name}"


def is_released_name(name_or_path):
    """True for a bare released file name (no folder), the form that triggers a download."""
    name_or_path = os.fspath(name_or_path)
    return name_or_path in RELEASED and os.path.basename(name_or_path) == name_or_path


def find_local(name, folders=SEARCH_FOLDERS):
    """The path of a downloaded copy of `name` in `folders`, or None. A copy whose size differs
    from the published or pinned one is refused (cheap: no hashing of gigabytes on every run)."""
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            expected = RELEASED[name]["size"] or _pinned(folder, name).get("size") if name in RELEASED else None
            if expected is not None and os.path.getsize(path) != expected:
                raise TinyFusionError(f"{path} has {os.path.getsize(path)} bytes, but {name} has {expected}: it is not "
                                      f"the released file; remove it and run `python download.py {name}`")
            return path
    return None


def resolve_released(name_or_path, folder=DOWNLOAD_FOLDER, progress=True, timeout=DEFAULT_TIMEOUT):
    """An existing path is returned as is; a bare released name becomes its local copy,
    downloaded first if there is none; anything else is returned unchanged (the caller reports
    it missing with `missing_checkpoint_message`)."""
    name_or_path = os.fspath(name_or_path)
    if os.path.exists(name_or_path) or not is_released_name(name_or_path):
        return name_or_path
    return find_local(name_or_path, (folder,) + SEARCH_FOLDERS) or download(name_or_path, folder=folder,
                                                                            progress=progress, timeout=timeout)


def missing_checkpoint_message(path):
    """One line for a checkpoint that does not exist: the release URL when the file name is a
    released one, no URL otherwise (the user's own files cannot be downloaded)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if name in RELEASED:
        return (f"checkpoint {path} does not exist; it is a released file: `python download.py {name}` "
                f"fetches it into {DOWNLOAD_FOLDER}/ (or pass the bare name {name}, which downloads it), "
                f"or `{_wget(release_url(name), os.path.join(DOWNLOAD_FOLDER, name))}`")
    return f"checkpoint {path} does not exist; check the path"


@contextmanager
def lock_file(lock_path):
    """An exclusive lock held through `lock_path`, which is removed on release. A waiter that
    locked a file already removed by the previous holder takes a fresh one (inode check)."""
    while True:
        handle = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(handle)
    try:
        yield
    finally:
        try:
            os.remove(lock_path)
        finally:
            os.close(handle)


def download(name, folder=DOWNLOAD_FOLDER, progress=True, max_attempts=20, max_stalls=3, retry_wait=2.0,
             timeout=DEFAULT_TIMEOUT, log=print):
    """Fetch released file `name` into `folder` and return its path (an existing copy is kept).

    Interruptions are retried from where they stopped (HTTP Range); after `max_stalls`
    consecutive attempts without a new byte (or `max_attempts` in all, or at once when the host
    cannot be resolved, refuses the connection or sends nothing for `timeout` seconds) it gives
    up with one line, keeping `<name>.part` for the next run. The complete file is verified
    (verify_download) before it gets its final name; a file that fails is deleted."""
    url = release_url(name)
    final_path = os.path.join(folder, name)
    part_path = final_path + ".part"
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        with lock_file(os.path.join(folder, f".{name}.lock")):
            if os.path.isfile(final_path):  # another rank finished it while we waited
                return final_path
            _fetch_with_retries(name, url, part_path, progress, timeout, max_attempts, max_stalls, retry_wait)
            verify_download(name, part_path, folder, url, log)
            with open(part_path, "rb") as complete:
                os.fsync(complete.fileno())
            os.replace(part_path, final_path)
            return final_path
    finally:
        if created and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # a failed first download leaves no empty pretrained/


def _fetch_with_retries(name, url, part_path, progress, timeout, max_attempts, max_stalls, retry_wait):
    expected = RELEASED[name]["size"]
    stalls, attempts = 0, 0
    while True:
        before = _size(part_path)
        attempts += 1
        try:
            _fetch(url, part_path, expected, progress, timeout)
            return
        except urllib.error.HTTPError as error:
            raise TinyFusionError(f"cannot download {name}: HTTP {error.code} {error.reason} from {url}; "
                                  f"check the URL{_mirror_hint()}") from None
        except (_Interrupted, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
            progressed = _size(part_path) > before
            stalls = 0 if progressed else stalls + 1
            reason = getattr(error, "reason", None)
            if isinstance(error, TimeoutError) or isinstance(reason, TimeoutError):
                if not progressed:  # a silent server: waiting again would only hold the user longer
                    raise TinyFusionError(_failure_message(name, url, part_path, error, timeout)) from None
            unreachable = isinstance(reason, (socket.gaierror, ConnectionRefusedError))
            if unreachable or stalls >= max_stalls or attempts >= max_attempts:
                raise TinyFusionError(_failure_message(name, url, part_path, error)) from None
            time.sleep(retry_wait)


def verify_download(name, part_path, folder, url, log=print):
    """Refuse a completed download that is not the released file: an HTML page, shorter than the
    model it must hold, or of another size or sha256 than the published or pinned one. The
    refused .part is deleted (the next run starts afresh). Without a published hash the first
    download pins its sha256 and size in folder/MANIFEST.json, and says so in one line."""
    entry, pinned = RELEASED[name], _pinned(folder, name)
    size = _size(part_path)
    problem = None
    if _looks_like_html(part_path):
        problem = "the server sent an HTML page (an error or login page of the mirror?)"
    elif size < entry["min_size"]:
        problem = f"it has {size} bytes, fewer than the {entry['min_size']} any complete {name} has"
    elif (entry["size"] or pinned.get("size", size)) != size:
        problem = f"it has {size} bytes, expected {entry['size'] or pinned['size']}"
    digest = None if problem else file_sha256(part_path)
    expected_digest = entry["sha256"] or pinned.get("sha256")
    if not problem and expected_digest and digest != expected_digest:
        source = "published" if entry["sha256"] else f"pinned in {os.path.join(folder, MANIFEST_NAME)}"
        problem = f"its sha256 {digest} differs from the {source} {expected_digest}"
    if problem:
        os.remove(part_path)
        raise TinyFusionError(f"downloaded {name} is not the released file: {problem}; removed it. "
                              f"Check {url}{_mirror_hint()}")
    if not expected_digest:
        manifest = _pin(folder, name, digest, size, url)
        log(f"{name}: no published sha256; pinned {digest} ({size} bytes) in {manifest} at this first "
            f"download (trust on first use): later downloads into {folder} must match it")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder):
    """folder/MANIFEST.json as {name: {sha256, size, url}} ({} when there is none)."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise TinyFusionError(f"{path} is not readable JSON ({error}); restore it or remove it "
                              f"(the hashes pinned in it are then lost)") from None
    if not isinstance(manifest, dict):
        raise TinyFusionError(f"{path} is not a name -> {{sha256, size}} table; restore it or remove it")
    return manifest


def _pinned(folder, name):
    return read_manifest(folder).get(name) or {}


def _pin(folder, name, digest, size, url):
    from tinyfusion.io.atomic_files import atomic_write_json
    path = os.path.join(folder, MANIFEST_NAME)
    with lock_file(os.path.join(folder, f".{MANIFEST_NAME}.lock")):  # files downloaded at once pin one by one
        manifest = read_manifest(folder)
        manifest[name] = dict(sha256=digest, size=size, url=url, pinned="first download")
        atomic_write_json(path, manifest)
    return path


def _looks_like_html(path):
    with open(path, "rb") as f:
        start = f.read(512).lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml"))


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
        name = os.path.basename(part_path)[:-5]
        if response.headers.get("Content-Type", "").lower().startswith("text/html"):
            raise TinyFusionError(f"{url} sent an HTML page, not {name} (an error or login page of the mirror?); "
                                  f"nothing was saved under {name}{_mirror_hint()}")
        resumed = start and response.status == 206
        if start and not resumed:
            start = 0  # the server ignored the Range request: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        if expected is not None and total is not None and total != expected:
            raise TinyFusionError(f"{url} announces {total} bytes, but {name} has "
                                  f"{expected}: not the released file{_mirror_hint()}")
        with open(part_path, "ab" if resumed else "wb", buffering=0) as out, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
                     desc=name + (" (resumed)" if resumed else "")) as bar:
            while True:
                chunk = response.read1(CHUNK_BYTES)  # what has arrived: the .part grows as bytes come in
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and _size(part_path) < total:
        raise _Interrupted(f"connection closed at {_size(part_path)} of {total} bytes")
    return total


def _failure_message(name, url, part_path, error, silent_for=None):
    reason = getattr(error, "reason", None) or error
    kept = _size(part_path)
    partial = (f"; {part_path} keeps the {kept} bytes received and the next run resumes from there"
               if kept else "; nothing was written")
    cause = (f"no byte for {silent_for:g} s (--timeout)" if silent_for is not None
             else f"{type(error).__name__}: {reason}")
    return f"cannot download {name} from {url} ({cause}); offline? fetch it yourself: {_wget(url, part_path[:-5])}{partial}"


def _wget(url, final_path):
    """The wget command that saves url as final_path."""
    if url.rsplit("/", 1)[-1] == os.path.basename(final_path):
        return f"wget -c {url} -P {os.path.dirname(final_path) or '.'}"
    return f"wget -c '{url}' -O {final_path}"


def _mirror_hint():
    value = os.environ.get(URL_ENVIRONMENT_VARIABLE)
    return f" ({URL_ENVIRONMENT_VARIABLE}={value} replaces the release URL)" if value else ""


def _size(path):
    return os.path.getsize(path) if os.path.isfile(path) else 0

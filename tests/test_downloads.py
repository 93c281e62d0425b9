"""The released-weights downloader against a local HTTP server on 127.0.0.1: a full download, a
download killed halfway and resumed by the next run, a server that drops the connection, a 404,
a wrong-size file, a server that ignores Range, offline; and the scripts' use of released names."""
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tinyfusion.io import downloads
from tinyfusion.errors import TinyFusionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "DiT-XL-2-256x256.pt"
PAYLOAD = bytes(range(256)) * 12289  # 3,145,984 bytes: several read chunks, not a multiple of one


def download_script():
    """`python download.py` with the plausibility floors lowered to the stand-ins' sizes."""
    prelude = ("import runpy, sys; from tinyfusion.io import downloads\n"
               "for entry in downloads.RELEASED.values(): entry['min_size'] = 1\n"
               f"sys.argv[0] = {os.path.join(ROOT, 'download.py')!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return [sys.executable, "-c", prelude]


class ServerState:
    def __init__(self):
        self.files = {NAME: PAYLOAD}
        self.requests = []        # (file name, Range header or None)
        self.ranges = True        # honour Range requests
        self.send_length = True   # announce Content-Length
        self.cut_at = None        # close the connection once this absolute offset is sent
        self.cuts_left = 0        # ... for this many requests
        self.stall = None         # an Event to wait on (instead of closing) at cut_at
        self.silent = None        # an Event to wait on before answering at all
        self.content_type = "application/octet-stream"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        state = self.server.state
        name, requested = self.path.rsplit("/", 1)[-1], self.headers.get("Range")
        state.requests.append((name, requested))
        if state.silent is not None:
            state.silent.wait(30)
            return
        if name not in state.files:
            self.send_error(404)
            return
        data, start = state.files[name], 0
        if requested and state.ranges:
            start = int(re.match(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", state.content_type)
        if state.send_length:
            self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if state.cut_at is not None and state.cuts_left > 0:
            state.cuts_left -= 1
            self.wfile.write(body[:max(0, state.cut_at - start)])
            self.wfile.flush()
            if state.stall is not None:
                state.stall.wait(30)
            return  # HTTP/1.0: returning closes the connection mid-body
        self.wfile.write(body)


@contextmanager
def serve(files, monkeypatch):
    """A local HTTP server of `files` ({name: bytes}) as $TINYFUSION_DOWNLOAD_URL, with the
    plausibility floors lowered to the stand-ins' sizes; yields its ServerState."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState()
    httpd.state.files = dict(files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(downloads.URL_ENVIRONMENT_VARIABLE, f"http://127.0.0.1:{httpd.server_port}/files")
    for name, entry in downloads.RELEASED.items():  # the stand-ins are smaller than any real model
        monkeypatch.setitem(downloads.RELEASED, name, dict(entry, min_size=1))
    try:
        yield httpd.state
    finally:
        for event in (httpd.state.stall, httpd.state.silent):
            if event is not None:
                event.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    with serve({NAME: PAYLOAD}, monkeypatch) as state:
        yield state


@pytest.fixture
def fast_retries(monkeypatch):
    original = downloads.download

    def quick(*args, **kwargs):
        return original(*args, **dict(dict(progress=False, retry_wait=0.0, timeout=10.0), **kwargs))
    monkeypatch.setattr(downloads, "download", quick)


def test_url_table_and_environment_override(monkeypatch):
    monkeypatch.delenv(downloads.URL_ENVIRONMENT_VARIABLE, raising=False)
    assert downloads.release_url("DiT-XL-2-512x512.pt") == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"
    assert downloads.release_url("TinyDiT-D14-MaskedKD-500K.pt") == \
        "https://github.com/VainF/TinyFusion/releases/download/v1.0.0/TinyDiT-D14-MaskedKD-500K.pt"
    monkeypatch.setenv(downloads.URL_ENVIRONMENT_VARIABLE, "http://mirror.example/w/")
    assert downloads.release_url(NAME) == f"http://mirror.example/w/{NAME}"
    assert downloads.is_released_name(NAME) and not downloads.is_released_name(f"pretrained/{NAME}")
    assert not downloads.is_released_name("my-model.pt")


def test_full_download_then_found_without_a_request(server, fast_retries, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = downloads.resolve_released(NAME)
    assert path == os.path.join("pretrained", NAME)
    assert open(path, "rb").read() == PAYLOAD
    assert sorted(os.listdir("pretrained")) == [NAME, "MANIFEST.json"]  # no .part or lock file left behind
    assert server.requests == [(NAME, None)]
    assert downloads.resolve_released(NAME) == path and len(server.requests) == 1
    # a copy in the original's folder is used as it is
    os.makedirs("elsewhere/pretrained_models")
    monkeypatch.chdir("elsewhere")
    open(f"pretrained_models/{NAME}", "wb").close()
    assert downloads.resolve_released(NAME) == os.path.join("pretrained_models", NAME)
    assert len(server.requests) == 1


def test_download_killed_halfway_resumes_in_the_next_run(server, tmp_path):
    half = len(PAYLOAD) // 2
    server.cut_at, server.cuts_left, server.stall = half, 1, threading.Event()
    env = dict(os.environ, PYTHONPATH=ROOT)
    command = [*download_script(), NAME]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    part = tmp_path / "pretrained" / f"{NAME}.part"
    deadline = time.time() + 60
    while not (part.exists() and part.stat().st_size == half) and time.time() < deadline:
        time.sleep(0.05)
    process.kill()
    process.communicate()
    assert part.stat().st_size == half
    assert not (tmp_path / "pretrained" / NAME).exists()  # nothing under the final name
    server.stall.set()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pretrained" / NAME).read_bytes() == PAYLOAD
    assert not part.exists()
    assert server.requests == [(NAME, None), (NAME, f"bytes={half}-")]
    assert "(resumed)" in done.stderr  # the progress bar says so


def test_dropped_connection_is_resumed_within_the_run(server, fast_retries, tmp_path):
    third = len(PAYLOAD) // 3
    server.cut_at, server.cuts_left = third, 1
    path = downloads.download(NAME, folder=str(tmp_path))
    assert open(path, "rb").read() == PAYLOAD
    assert server.requests == [(NAME, None), (NAME, f"bytes={third}-")]


def test_a_server_that_always_drops_leaves_only_the_part_file(server, fast_retries, tmp_path):
    third = len(PAYLOAD) // 3
    server.cut_at, server.cuts_left = third, 100
    with pytest.raises(TinyFusionError) as error:
        downloads.download(NAME, folder=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert f"{NAME}.part keeps the {third} bytes received and the next run resumes" in message
    assert f"wget -c {downloads.release_url(NAME)}" in message
    assert sorted(os.listdir(tmp_path)) == [f"{NAME}.part"]
    assert len(server.requests) == 4  # the first, then 3 attempts that brought nothing new


def test_404_is_one_line_and_writes_nothing(server, fast_retries, tmp_path):
    server.files = {}
    with pytest.raises(TinyFusionError, match=r"HTTP 404 .* from http://127\.0\.0\.1:\d+/files/DiT-XL-2-256x256\.pt"):
        downloads.download(NAME, folder=str(tmp_path / "pretrained"))
    assert not (tmp_path / "pretrained").exists()


def test_wrong_size_is_refused(server, fast_retries, tmp_path, monkeypatch):
    monkeypatch.setitem(downloads.RELEASED, NAME, dict(downloads.RELEASED[NAME], size=len(PAYLOAD) + 1))
    with pytest.raises(TinyFusionError, match=f"announces {len(PAYLOAD)} bytes.*has {len(PAYLOAD) + 1}"):
        downloads.download(NAME, folder=str(tmp_path))
    assert os.listdir(tmp_path) == []
    # a server that does not announce the length: found after the download, the file removed
    server.send_length = False
    with pytest.raises(TinyFusionError, match=f"has {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 1}"):
        downloads.download(NAME, folder=str(tmp_path))
    assert os.listdir(tmp_path) == []
    # the right size passes
    monkeypatch.setitem(downloads.RELEASED, NAME, dict(downloads.RELEASED[NAME], size=len(PAYLOAD)))
    assert open(downloads.download(NAME, folder=str(tmp_path)), "rb").read() == PAYLOAD


def sha256_of(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


def leftovers(folder, name=NAME):
    """Files of a download of `name` in progress: .part and lock files in the folder, and the lock
    file an older version kept in the temp folder (named by a hash of the final path)."""
    import hashlib
    import tempfile
    here = [n for n in os.listdir(folder) if n.endswith((".part", ".lock"))] if os.path.isdir(folder) else []
    key = hashlib.sha1(os.path.abspath(os.path.join(folder, name)).encode()).hexdigest()[:16]
    old_lock = os.path.join(tempfile.gettempdir(), f"tinyfusion-download-{key}.lock")
    return here + ([old_lock] if os.path.exists(old_lock) else [])


def test_wrong_sha256_is_refused_and_never_gets_the_final_name(server, fast_retries, tmp_path, monkeypatch):
    other = bytes(reversed(PAYLOAD))  # the same length: only the hash tells them apart
    monkeypatch.setitem(downloads.RELEASED, NAME, dict(downloads.RELEASED[NAME], sha256=sha256_of(other)))
    with pytest.raises(TinyFusionError, match=f"its sha256 {sha256_of(PAYLOAD)} differs from the published "
                                              f"{sha256_of(other)}; removed it") as error:
        downloads.download(NAME, folder=str(tmp_path))
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == [] and leftovers(tmp_path) == []
    server.files[NAME] = other  # the published file passes, and nothing is pinned for it
    assert open(downloads.download(NAME, folder=str(tmp_path)), "rb").read() == other
    assert os.listdir(tmp_path) == [NAME]


def test_html_page_short_body_and_unannounced_length_are_checked(server, fast_retries, tmp_path, monkeypatch):
    page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>" * 100
    server.files[NAME] = page
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(TinyFusionError, match="sent an HTML page, not DiT-XL-2-256x256.pt"):
        downloads.download(NAME, folder=str(tmp_path))
    server.content_type = "application/octet-stream"  # a page served as a binary is still a page
    with pytest.raises(TinyFusionError, match="the server sent an HTML page"):
        downloads.download(NAME, folder=str(tmp_path))
    assert os.listdir(tmp_path) == []
    # a short file with its own, honest Content-Length: shorter than any complete model
    server.files[NAME] = PAYLOAD[:1000]
    monkeypatch.setitem(downloads.RELEASED, NAME, dict(downloads.RELEASED[NAME], min_size=len(PAYLOAD)))
    with pytest.raises(TinyFusionError, match=f"it has 1000 bytes, fewer than the {len(PAYLOAD)} any complete"):
        downloads.download(NAME, folder=str(tmp_path))
    assert os.listdir(tmp_path) == []
    # a body without Content-Length is hashed like any other: the wrong one refused, the right one kept
    server.send_length, server.files[NAME] = False, PAYLOAD[:-1] + b"x"
    monkeypatch.setitem(downloads.RELEASED, NAME, dict(downloads.RELEASED[NAME], sha256=sha256_of(PAYLOAD)))
    with pytest.raises(TinyFusionError, match="differs from the published"):
        downloads.download(NAME, folder=str(tmp_path))
    assert os.listdir(tmp_path) == [] and leftovers(tmp_path) == []
    server.files[NAME] = PAYLOAD
    assert open(downloads.download(NAME, folder=str(tmp_path)), "rb").read() == PAYLOAD


def test_silent_server_gives_up_after_timeout(server, fast_retries, tmp_path):
    server.silent = threading.Event()
    started = time.time()
    with pytest.raises(TinyFusionError, match=r"no byte for 1\.5 s \(--timeout\).*nothing was written"):
        downloads.download(NAME, folder=str(tmp_path / "pretrained"), timeout=1.5)
    # one wait of --timeout, not one per retry (3 x 1.5 s before): a silent server is not retried
    assert len(server.requests) == 1 and time.time() - started < 4.0
    assert not (tmp_path / "pretrained").exists()
    done = subprocess.run([*download_script(), NAME, "--timeout", "1.5"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "no byte for 1.5 s (--timeout)" in lines[0], done.stderr
    assert len(server.requests) == 2 and os.listdir(tmp_path) == []
    bad = subprocess.run([*download_script(), NAME, "--timeout", "0"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "argument --timeout: must be a positive number" in bad.stderr


def test_first_download_pins_its_hash_and_later_ones_must_match(server, fast_retries, tmp_path, capsys):
    folder = str(tmp_path / "pretrained")
    path = downloads.download(NAME, folder=folder)
    manifest = downloads.read_manifest(folder)
    assert manifest[NAME]["sha256"] == sha256_of(PAYLOAD) and manifest[NAME]["size"] == len(PAYLOAD)
    said = [line for line in capsys.readouterr().out.splitlines() if "pinned" in line]
    assert len(said) == 1 and "no published sha256" in said[0] and "trust on first use" in said[0]
    # the next download into this folder must bring the same bytes
    os.remove(path)
    server.files[NAME] = PAYLOAD[::-1]
    with pytest.raises(TinyFusionError, match=f"differs from the pinned in {re.escape(folder)}/MANIFEST.json"):
        downloads.download(NAME, folder=folder)
    assert sorted(os.listdir(folder)) == ["MANIFEST.json"]
    server.files[NAME] = PAYLOAD
    downloads.download(NAME, folder=folder)
    assert downloads.read_manifest(folder) == manifest and capsys.readouterr().out.count("pinned") == 0
    # a local copy of another size than the pinned one is refused without hashing it
    with open(path, "ab") as f:
        f.write(b"extra")
    with pytest.raises(TinyFusionError, match=f"has {len(PAYLOAD) + 5} bytes, but {NAME} has {len(PAYLOAD)}"):
        downloads.find_local(NAME, (folder,))
    assert leftovers(folder) == []


def test_sit_and_inception_graph_download_through_the_same_path(server, fast_retries, tmp_path, monkeypatch):
    from tinyfusion.families import default_checkpoint
    monkeypatch.chdir(tmp_path)
    server.files = {"SiT-XL-2-256x256.pt": b"sit weights"}
    assert default_checkpoint("SiT-XL/2", 256) == os.path.join("pretrained", "SiT-XL-2-256x256.pt")
    assert downloads.read_manifest("pretrained")["SiT-XL-2-256x256.pt"]["sha256"] == sha256_of(b"sit weights")
    monkeypatch.delenv(downloads.URL_ENVIRONMENT_VARIABLE)
    assert downloads.release_url("SiT-XL-2-256x256.pt") == downloads.SIT_RELEASE_URL
    assert downloads.release_url("classify_image_graph_def.pb") == \
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"


def test_server_without_range_support_restarts_from_zero(server, fast_retries, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(b"stale bytes of an older attempt")
    server.ranges = False
    assert open(downloads.download(NAME, folder=str(tmp_path)), "rb").read() == PAYLOAD
    # a complete .part (killed between the last byte and the rename) is not fetched again
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD)
    os.remove(tmp_path / NAME)
    server.ranges = True
    assert open(downloads.download(NAME, folder=str(tmp_path)), "rb").read() == PAYLOAD
    assert server.requests[-1] == (NAME, f"bytes={len(PAYLOAD)}-")


def closed_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_offline_is_one_line_naming_url_and_wget(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    env = dict(os.environ, PYTHONPATH=ROOT, **{downloads.URL_ENVIRONMENT_VARIABLE: url})
    done = subprocess.run([sys.executable, os.path.join(ROOT, "download.py"), "TinyDiT-D14-MaskedKD-500K.pt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: cannot download TinyDiT-D14-MaskedKD-500K.pt from "
                               f"{url}/TinyDiT-D14-MaskedKD-500K.pt")
    assert f"wget -c {url}/TinyDiT-D14-MaskedKD-500K.pt -P pretrained; nothing was written" in lines[0]
    assert os.listdir(tmp_path) == []


def test_download_script_rejects_unknown_names(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "download.py"), "DiT-XL-2-1024x1024.pt"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    assert done.returncode == 2 and "unknown released file DiT-XL-2-1024x1024.pt" in done.stderr


# ----------------------------------------------------------------------- scripts' use
def tiny_state_dict_bytes(tmp_path):
    from models import DiT_models
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/4"](input_size=8, num_classes=10, in_channels=3)
    path = tmp_path / "served.pt"
    torch.save({"model": model.state_dict(), "ema": {k: v + 1 for k, v in model.state_dict().items()}}, path)
    return path.read_bytes(), model.state_dict()


def test_released_name_as_checkpoint_downloads_and_loads(server, fast_retries, tmp_path, monkeypatch):
    from download import find_model
    from tinyfusion.families.build import build_model
    payload, weights = tiny_state_dict_bytes(tmp_path)
    server.files = {"TinyDiT-D14-MaskedKD-500K.pt": payload}
    monkeypatch.chdir(tmp_path)
    model, _ = build_model("DiT-XS/4", 8, 10, "none", ckpt="TinyDiT-D14-MaskedKD-500K.pt")
    assert torch.equal(model.state_dict()["pos_embed"], weights["pos_embed"] + 1)  # the ema weights
    assert os.path.isfile("pretrained/TinyDiT-D14-MaskedKD-500K.pt")
    ema = find_model("TinyDiT-D14-MaskedKD-500K.pt")
    plain = find_model("pretrained/TinyDiT-D14-MaskedKD-500K.pt", no_ema=True)
    assert torch.equal(ema["x_embedder.proj.weight"], weights["x_embedder.proj.weight"] + 1)
    assert torch.equal(plain["x_embedder.proj.weight"], weights["x_embedder.proj.weight"])
    assert len(server.requests) == 1


def test_sampling_without_ckpt_uses_the_released_dit(server, fast_retries, tmp_path, monkeypatch):
    from tinyfusion.families import default_checkpoint
    monkeypatch.chdir(tmp_path)
    server.files = {"DiT-XL-2-512x512.pt": b"weights"}
    assert default_checkpoint("DiT-XL/2", 512) == os.path.join("pretrained", "DiT-XL-2-512x512.pt")
    with pytest.raises(TinyFusionError, match="--ckpt is required for --model DiT-D14/2.*TinyDiT-D14-MaskedKD-500K.pt"):
        default_checkpoint("DiT-D14/2", 256)
    with pytest.raises(TinyFusionError) as error:
        default_checkpoint("DiT-S/2", 256)
    assert "TinyDiT" not in str(error.value) and "http" not in str(error.value)


def test_missing_checkpoint_names_the_right_url_or_none(tmp_path, monkeypatch):
    from tinyfusion.io.checkpoints import load_checkpoint_file
    monkeypatch.delenv(downloads.URL_ENVIRONMENT_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TinyFusionError) as error:
        load_checkpoint_file("outputs/D14-Learned-Finetuning/checkpoints/0500000.pt")
    assert "does not exist" in str(error.value) and "http" not in str(error.value)
    with pytest.raises(TinyFusionError) as error:
        load_checkpoint_file("pretrained/TinyDiT-D14-MaskedKD-500K.pt")
    assert "https://github.com/VainF/TinyFusion/releases/download/v1.0.0/TinyDiT-D14-MaskedKD-500K.pt" in str(error.value)
    assert "fbaipublicfiles" not in str(error.value)
    with pytest.raises(TinyFusionError, match=r"https://dl\.fbaipublicfiles\.com/DiT/models/DiT-XL-2-512x512\.pt"):
        load_checkpoint_file("pretrained_models/DiT-XL-2-512x512.pt")

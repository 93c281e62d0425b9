"""Fault injection: a checkpoint write killed with SIGKILL, a full disk (a 1 MiB tmpfs, mounted
when the test runs as root and skipped otherwise), and two runs on one folder. Each must end in
a complete result or a one-line error, never in a silently mixed or truncated one."""
import argparse
import glob
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tinyfusion.io import run_lock

from tinyfusion.io import run_folder as runlog
from tinyfusion.io.atomic_files import atomic_write_json
from tinyfusion.io.checkpoints import load_checkpoint_file, save_checkpoint
from tinyfusion.errors import TinyFusionError
from training_helpers import COMMON_FLAGS, MODEL, ROOT, make_digits_store

HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from tinyfusion.io.run_lock import lock_folder
lock_folder(sys.argv[1], log=print)
print("locked", flush=True)
time.sleep(600)
"""


def start_lock_holder(folder):
    """A separate process (another run) that takes the lock of `folder` and keeps it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=ROOT), str(folder)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.fixture
def lock_holder():
    started = []

    def start(folder):
        started.append(start_lock_holder(folder))
        return started[-1]
    yield start
    for process in started:  # only the processes this test started, by their pid
        if process.poll() is None:
            process.kill()
        process.wait()


def run_args(**kwargs):
    return argparse.Namespace(model=MODEL, **kwargs)


# ---------------------------------------------------------------- two runs on one folder
def test_second_run_on_a_locked_run_folder_fails_naming_the_holder(tmp_path, lock_holder, capsys):
    run_dir = str(tmp_path / "results" / "run-DiT-XS-4")
    holder = lock_holder(run_dir)
    with pytest.raises(TinyFusionError, match=rf"run folder {run_dir} is in use by pid {holder.pid} on "
                                              rf"{os.uname().nodename} \(started 20"):
        runlog.prepare_run_folder(run_dir, run_args(), resuming=False, is_main=True)
    assert not os.path.exists(os.path.join(run_dir, "args.json"))  # nothing of the second run was written
    # the holder is killed (kill -9: no chance to clean up); its lock file stays but is stale
    holder.kill()
    holder.wait()
    assert os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))
    runlog.prepare_run_folder(run_dir, run_args(), resuming=False, is_main=True)
    try:
        log = open(os.path.join(run_dir, "log.txt")).read()
        assert f"taking over the stale lock of run folder {run_dir} left by pid {holder.pid}" in log
        # this process now holds it: a third run is refused in turn
        third = subprocess.run([sys.executable, "-c", HOLD_LOCK.format(root=ROOT), run_dir], capture_output=True,
                               text=True, timeout=60)
        assert third.returncode == 1 and f"in use by pid {os.getpid()}" in third.stderr
    finally:
        runlog.release_run_folder(run_dir)
    assert not os.path.exists(os.path.join(run_dir, run_lock.LOCK_FILE))  # released: no stale lock left


def test_lock_is_released_when_the_holder_exits_normally(tmp_path):
    folder = str(tmp_path / "run")
    script = HOLD_LOCK.format(root=ROOT).replace("time.sleep(600)", "")
    result = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert not os.path.exists(os.path.join(folder, run_lock.LOCK_FILE))  # atexit released it
    lock = run_lock.lock_folder(folder, log=pytest.fail)  # no stale-lock message: it was released
    lock.release()


def test_sample_dir_and_feature_store_are_locked(tmp_path, lock_holder):
    import extract_features
    import sample_ddp
    from test_trust import PIXEL_FLAGS, save_small_checkpoint
    ckpt = save_small_checkpoint(tmp_path / "ckpt.pt", seed=1)
    samples = tmp_path / "samples"
    name = "DiT-XS-4-ckpt-size-8-vae-none-cfg-1.5-seed-0-steps-3"
    holder = lock_holder(samples / name)
    with pytest.raises(TinyFusionError, match=rf"sample folder .*{name} is in use by pid {holder.pid}"):
        sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, "--ckpt", ckpt, "--sample-dir", str(samples)]))
    assert os.listdir(samples / name) == [run_lock.LOCK_FILE]

    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
    holder = lock_holder(tmp_path / "features")
    with pytest.raises(TinyFusionError, match=rf"feature store .*features is in use by pid {holder.pid}"):
        extract_features.main(extract_features.parse_args(
            ["--data-path", str(tmp_path / "images"), "--features-path", str(tmp_path / "features"),
             "--image-size", "8", "--vae", "none", "--num-classes", "1", "--num-workers", "0"]))
    assert os.listdir(tmp_path / "features") == [run_lock.LOCK_FILE]


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory):
    return make_digits_store(str(tmp_path_factory.mktemp("faults")), limit=64)


def test_train_py_on_a_locked_run_folder_exits_2_naming_the_holder(tmp_path, digits_features, lock_holder):
    results = tmp_path / "results"
    holder = lock_holder(results / "run-DiT-XS-4")
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--model", MODEL, "--data-path", digits_features,
               "--results-dir", str(results), "--prefix", "run", "--global-batch-size", "8", "--max-steps", "2",
               "--device", "cpu", *COMMON_FLAGS]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"is in use by pid {holder.pid}" in result.stderr
    assert sorted(os.listdir(results / "run-DiT-XS-4")) == [run_lock.LOCK_FILE]  # no log, no args.json


@pytest.mark.slow
def test_two_concurrent_train_runs_one_fails(tmp_path, digits_features):
    """Two train.py runs started together on one --results-dir/--prefix: exactly one trains."""
    results = tmp_path / "results"
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--model", MODEL, "--data-path", digits_features,
               "--results-dir", str(results), "--prefix", "run", "--global-batch-size", "8", "--max-steps", "400",
               "--ckpt-every", "50", "--device", "cpu", *COMMON_FLAGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    outcomes = sorted((process.wait(timeout=900), process.stderr.read()) for process in processes)
    assert [code for code, _ in outcomes] == [0, 2], outcomes
    assert "is in use by pid" in outcomes[1][1]
    assert torch.load(os.path.join(results, "run-DiT-XS-4", "checkpoints", "0000400.pt"),
                      weights_only=True)["train_steps"] == 400


# ---------------------------------------------------------------- kill -9 during a checkpoint write
WRITE_FOREVER = """
import sys, torch
sys.path.insert(0, {root!r})
from tinyfusion.io.checkpoints import save_checkpoint
state = {{"model": {{"w": torch.arange(32 * 2 ** 20, dtype=torch.float32) / 2 ** 12}}, "train_steps": 10}}  # |w| < 1e4
print("ready", flush=True)
while True:
    save_checkpoint(state, sys.argv[1])
"""


def test_checkpoint_write_killed_leaves_the_old_file_or_none_and_litter_is_cleaned(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    path = run_dir / "checkpoints" / "0000010.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER.format(root=ROOT), str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.time() + 120
        while not glob.glob(str(run_dir / "checkpoints" / ".0000010.*.tmp.pt")):  # a write under way
            assert time.time() < deadline and writer.poll() is None
            time.sleep(0.002)
        time.sleep(0.02)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    temporaries = glob.glob(str(run_dir / "checkpoints" / ".0000010.*.tmp.pt"))
    assert len(temporaries) == 1  # torn mid-write: litter of ~128 MB that nothing else removes
    if path.exists():  # a complete earlier write: intact, checksum verified
        assert load_checkpoint_file(str(path))["model"]["w"][-1] == (32 * 2 ** 20 - 1) / 2 ** 12
    runlog.prepare_run_folder(str(run_dir), run_args(), resuming=True, is_main=True)
    try:
        assert glob.glob(str(run_dir / "checkpoints" / ".*.tmp*")) == []
        assert "removed 1 temporary file(s) of an interrupted write" in open(run_dir / "log.txt").read()
    finally:
        runlog.release_run_folder(str(run_dir))


# ---------------------------------------------------------------- disk full
@contextmanager
def mounted_tmpfs(mount_point, options):
    """A 1 MiB tmpfs at mount_point (root only); the test is skipped where it cannot be mounted."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},size=1m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.strip()[:100]}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def tiny_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "rw") as mount_point:
        yield mount_point


def test_disk_full_names_the_file_and_leaves_nothing(tiny_disk):
    path = str(tiny_disk / "checkpoints" / "0000010.pt")
    with pytest.raises(TinyFusionError, match=rf"^no space left on device while writing {path} "):
        save_checkpoint({"model": {"w": torch.zeros(2 ** 19)}}, path)  # 2 MiB on a 1 MiB disk
    with pytest.raises(TinyFusionError, match="no space left on device while writing .*args.json"):
        atomic_write_json(str(tiny_disk / "args.json"), {"x": "y" * 2 ** 21})
    assert os.listdir(tiny_disk / "checkpoints") == [] and os.listdir(tiny_disk) == ["checkpoints"]
    save_checkpoint({"model": {"w": torch.zeros(1000)}}, path)  # a file that fits is written as usual
    assert torch.equal(load_checkpoint_file(path)["model"]["w"], torch.zeros(1000))


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """Filesystems without flock: a dead pid on this host is stale, a live one or another host's is not."""
    import json
    import socket
    monkeypatch.setattr(run_lock, "_try_flock", lambda handle: None)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder, refused in [({"host": socket.gethostname(), "pid": sleeper.pid}, True),
                                ({"host": "another-node", "pid": int(dead.stdout)}, True),
                                ({"host": socket.gethostname(), "pid": int(dead.stdout)}, False)]:
            (folder / run_lock.LOCK_FILE).write_text(json.dumps(dict(holder, started=0, command="train.py")))
            messages = []
            if refused:
                with pytest.raises(run_lock.FolderLocked, match=f"in use by pid {holder['pid']} on {holder['host']}"):
                    run_lock.lock_folder(str(folder), log=messages.append)
            else:
                run_lock.lock_folder(str(folder), log=messages.append).release()
                assert len(messages) == 1 and "taking over the stale lock" in messages[0]
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- unwritable places, unreadable files
@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no write can go to: a read-only tmpfs (EROFS) as root, else a folder without
    write permission (EACCES: root ignores permissions, so that only works for other users)."""
    folder = tmp_path / "readonly"
    if os.geteuid() != 0:
        folder.mkdir(mode=0o500)
        yield folder
        folder.chmod(0o700)
        return
    with mounted_tmpfs(folder, "ro") as mount_point:
        yield mount_point


def tiny_dit_checkpoint(path):
    from models import DiT_models
    from tinyfusion.io.checkpoints import save_pruned_model
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10)
    save_pruned_model(model, str(path), {"kept_indices": list(range(model.depth)), "method": "test"})
    return str(path)


SAMPLE_FLAGS = ["--model", "DiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", "10",
                "--num-sampling-steps", "2"]


def run_script_main(module, *flags, capsys):
    """A script's main through run_main, in this process: (exit code, stderr lines)."""
    from tinyfusion.errors import run_main
    with pytest.raises(SystemExit) as exit_:
        run_main(module.main, module.parse_args(list(flags)))
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def test_unwritable_output_is_one_line_naming_the_path(tmp_path, read_only_folder, capsys):
    import sample_ddp
    reason = "read-only" if os.geteuid() == 0 else "permission denied"
    with pytest.raises(TinyFusionError, match=f"^cannot write {read_only_folder}/args.json: the file system is "
                                              f"{reason}|^cannot write {read_only_folder}/args.json: {reason}"):
        atomic_write_json(str(read_only_folder / "args.json"), {"x": 1})
    ckpt = tiny_dit_checkpoint(tmp_path / "tiny.pt")
    code, lines = run_script_main(sample_ddp, *SAMPLE_FLAGS, "--ckpt", ckpt, "--num-fid-samples", "4",
                                  "--per-proc-batch-size", "4", "--sample-dir", str(read_only_folder / "samples"),
                                  capsys=capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot write {read_only_folder}/samples") and "choose a folder" in lines[0]


def test_a_refused_operation_anywhere_in_a_script_is_one_line(capsys):
    """EPERM (sysfs refuses new folders even to root), EACCES and EROFS end as one line through
    run_main, whichever write raised them; other OSErrors keep their traceback (they are bugs)."""
    from tinyfusion.errors import run_main

    def make_folder_in_sysfs():
        os.makedirs("/sys/tinyfusion-test/run")

    if os.path.isdir("/sys/kernel"):
        with pytest.raises(SystemExit) as exit_:
            run_main(make_folder_in_sysfs)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: cannot write /sys/tinyfusion-test") and "\n" not in err
    for code in ("EACCES", "EROFS"):
        def refused(code=code):
            import errno
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/data/run")
        with pytest.raises(SystemExit):
            run_main(refused)
        assert capsys.readouterr().err.strip().startswith("error: cannot write /data/run: ")
    with pytest.raises(FileNotFoundError):
        run_main(lambda: open("/nonexistent/tinyfusion/file"))


def test_garbage_safetensors_checkpoint_is_one_line(tmp_path, capsys):
    import sample
    from tinyfusion.io.checkpoints import CorruptCheckpointError
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CorruptCheckpointError, match=f"could not read checkpoint {garbage} as safetensors"):
        load_checkpoint_file(str(garbage))
    code, lines = run_script_main(sample, *SAMPLE_FLAGS, "--ckpt", str(garbage), "--class-labels", "1",
                                  "--out", str(tmp_path / "grid.png"), capsys=capsys)
    assert code == 2 and lines == [
        f"error: could not read checkpoint {garbage} as safetensors (Error while deserializing header: header too "
        f"large); the file is truncated, damaged or not a .safetensors file"], lines
    assert not (tmp_path / "grid.png").exists()


def fill(disk):
    """Fill a small disk completely (ENOSPC is the end of the loop)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_feature_extraction_on_a_full_disk_leaves_no_store_folder(tmp_path, tiny_disk):
    import extract_features
    from tinyfusion.study.digits import write_digits_folder
    write_digits_folder(str(tmp_path / "digits"), 8, limit=12)
    fill(tiny_disk)
    features = tiny_disk / "features"
    with pytest.raises(TinyFusionError, match="no space left on device"):
        extract_features.main(extract_features.parse_args(
            ["--data-path", str(tmp_path / "digits"), "--features-path", str(features), "--image-size", "8",
             "--vae", "none", "--num-classes", "10", "--num-workers", "0"]))
    assert not features.exists()

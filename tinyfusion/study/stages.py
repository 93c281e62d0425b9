"""The stage runner of the drivers (quickstart.py, reproduce.py): each stage is one of our scripts
run as a user would run it, in its own process, with its command and full output in
`{run folder}/logs/{stage}.log`; the console shows the stage's progress bar (read from the log)
and ETA. A stage whose outputs all exist is finished and skipped, so a rerun of a driver reuses
every finished stage; a failed stage stops the driver with the tail of its log.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from tinyfusion.errors import TinyFusionError

TQDM_STATUS = re.compile(r"(?:([A-Za-z][\w .-]*):\s*)?(\d+)%\|[^|]*\|\s*(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
HEARTBEAT_SECONDS = 60  # off a terminal, a still-running stage prints its status this often
FAILED_LOG_LINES = 15  # the lines of a failed stage's log shown in its error


def stage_status(log_path):
    """The newest tqdm line of a stage's log as 'desc 450/1500 (30%), ETA 03:12', or ''."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(os.path.getsize(log_path) - 8192, 0))
            tail = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    for segment in reversed(re.split(r"[\r\n]", tail)):
        match = TQDM_STATUS.search(segment)
        if match:
            desc, percent, done, total, _, eta = match.groups()
            return f"{desc + ' ' if desc else ''}{done}/{total} ({percent}%), ETA {eta}"
    return ""


def show(text, final=False):
    """One console line per stage: redrawn in place on a terminal; elsewhere (a pipe, a file) the
    final line and a heartbeat line every minute."""
    if sys.stdout.isatty():
        width = shutil.get_terminal_size().columns - 1
        sys.stdout.write("\r" + text[:width] + "\033[K" + ("\n" if final else ""))
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def format_seconds(seconds):
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def run_stage(name, command, log_path, cwd, threads=None):
    """Run one stage's command in `cwd`; its output goes to `log_path` while the console shows the
    stage's progress. Returns its wall seconds; a failure raises TinyFusionError with the log's tail."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    started = last_heartbeat = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")  # shell-quoted: the line can be pasted to rerun the stage
        log.flush()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            line = f"  [{name}] {format_seconds(time.time() - started)} {stage_status(log_path)}".rstrip()
            if sys.stdout.isatty():
                show(line)
            elif time.time() - last_heartbeat >= HEARTBEAT_SECONDS:
                show(line)
                last_heartbeat = time.time()
    if process.returncode != 0:
        if sys.stdout.isatty():
            show(f"  [{name}] failed", final=True)
        with open(log_path) as log:
            tail = "".join(log.readlines()[-FAILED_LOG_LINES:])
        raise TinyFusionError(f"stage {name} failed; its command and full output are in {log_path}, "
                              f"whose last lines are:\n{tail}")
    return time.time() - started


def python_command(script):
    return [sys.executable, script]


def torchrun_command(script, nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]


def resume_flags(folder):
    """`--resume auto` for a training script whose run folder (or checkpoints) already exists."""
    return ["--resume", "auto"] if os.path.isdir(folder) else []


class StageRunner:
    """A driver's run folder `out` and its stages: the scripts live in `root` (the working folder
    of every stage), the logs in `out/logs`. `threads`: OMP_NUM_THREADS of every stage (None:
    inherited). `announce`: print a line when a stage is skipped, starts (off a terminal) and ends;
    otherwise only the progress and heartbeat lines. `stage_seconds` holds the wall time of each
    stage run by this runner."""

    def __init__(self, out, root, threads=None, announce=True):
        self.out, self.root, self.threads, self.announce = out, root, threads, announce
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.stage_seconds = {}

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def stage(self, name, outputs, command):
        """Run `command` unless every path in `outputs` already exists (a finished stage)."""
        if all(os.path.exists(path) for path in outputs):
            if self.announce:
                print(f"  [{name}] done already")
            return
        if self.announce and not sys.stdout.isatty():  # a terminal gets the live progress line instead
            print(f"  [{name}] running ...", flush=True)
        self.stage_seconds[name] = run_stage(name, command, os.path.join(self.logs, f"{name}.log"), self.root,
                                             self.threads)
        if self.announce:
            show(f"  [{name}] done in {format_seconds(self.stage_seconds[name])}", final=True)

    def python(self, script):
        """The command running `script` (a path under root) in one plain process."""
        return python_command(os.path.join(self.root, script))

    def torchrun(self, script, nproc):
        """The command running `script` under torchrun with `nproc` processes on this machine."""
        return torchrun_command(os.path.join(self.root, script), nproc)

    def launch(self, script, nproc):
        """torchrun with `nproc` processes, or a plain process for one (half the start-up time)."""
        return self.torchrun(script, nproc) if nproc > 1 else self.python(script)

"""The drivers' stage runner (tinyfusion/study/stages.py), with small real commands: a finished
stage is skipped, a run stage logs its pasteable command and output, the console gets progress
lines off a terminal, and a failed stage stops with the tail of its log (one line per script)."""
import os
import shlex
import subprocess
import sys

import pytest

from tinyfusion.errors import TinyFusionError
from tinyfusion.study import stages
from tinyfusion.study.stages import StageRunner, resume_flags, stage_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_code(code):
    return [sys.executable, "-c", code]


def test_stage_status_reads_the_newest_progress_bar(tmp_path):
    log = tmp_path / "teacher.log"
    log.write_text("$ python train.py\nrun folder x\n"
                   "train:  10%|#         | 3/30 [00:02<00:20,  1.31it/s]\r"
                   "train:  83%|########3 | 25/30 [08:07<01:40, 20.16s/it]")
    assert stage_status(str(log)) == "train 25/30 (83%), ETA 01:40"
    log.write_text("100%|##########| 64/64 [00:01<00:00, 40.1img/s]\nsaved\n")  # no description
    assert stage_status(str(log)) == "64/64 (100%), ETA 00:00"
    log.write_text("starting\n")
    assert stage_status(str(log)) == ""
    assert stage_status(str(tmp_path / "absent.log")) == ""


def test_a_stage_runs_once_with_its_log_threads_and_folder(tmp_path, capsys):
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), threads=3)
    output = runner.path("made.txt")
    command = python_code(f"import os; open({output!r}, 'w').write(os.environ['OMP_NUM_THREADS'] + ' ' + os.getcwd()); "
                          f"print('it ran', flush=True)")
    runner.stage("make", [output], command)
    assert open(output).read() == f"3 {tmp_path}"  # OMP threads of the runner, the scripts' folder as cwd
    with open(runner.path("logs", "make.log")) as log:
        first, rest = log.readline(), log.read()
    assert shlex.split(first[2:]) == command and rest == "it ran\n"  # the logged command can be pasted
    assert set(runner.stage_seconds) == {"make"}
    assert capsys.readouterr().out.splitlines() == ["  [make] running ...", "  [make] done in 00:00"]

    runner.stage("make", [output], python_code("raise SystemExit(1)"))  # finished: not run again
    assert capsys.readouterr().out == "  [make] done already\n" and set(runner.stage_seconds) == {"make"}
    quiet = StageRunner(str(tmp_path / "run"), str(tmp_path), announce=False)
    quiet.stage("make", [output], python_code("raise SystemExit(1)"))
    quiet.stage("other", [runner.path("never")], python_code("pass"))
    assert capsys.readouterr().out == "" and set(quiet.stage_seconds) == {"other"}


def test_off_a_terminal_a_running_stage_prints_its_progress_as_heartbeats(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stages, "HEARTBEAT_SECONDS", 0)
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path), announce=False)
    runner.stage("train", [runner.path("never")], python_code(
        "import sys, time; sys.stderr.write('train:  10%|#  | 3/30 [00:02<00:20,  1.31it/s]'); "
        "sys.stderr.flush(); time.sleep(2.5)"))
    heartbeats = capsys.readouterr().out.splitlines()
    assert heartbeats and all(line.startswith("  [train] 00:0") for line in heartbeats)
    assert heartbeats[-1].endswith(" train 3/30 (10%), ETA 00:20")


def test_a_failed_stage_stops_with_the_tail_of_its_log(tmp_path):
    runner = StageRunner(str(tmp_path / "run"), str(tmp_path))
    with pytest.raises(TinyFusionError) as failure:
        runner.stage("boom", [runner.path("never")], python_code("for i in range(20): print(f'line {i}')\nraise SystemExit(3)"))
    message = str(failure.value)
    log = runner.path("logs", "boom.log")
    assert message.startswith(f"stage boom failed; its command and full output are in {log}, whose last lines are:")
    # the log holds the command and lines 0..19: its last 15 lines are lines 5..19
    assert message.endswith("".join(f"line {i}\n" for i in range(5, 20))) and "line 4\n" not in message
    assert "boom" not in runner.stage_seconds

    # through a script's run_main: one line on stderr, no traceback, exit code 2
    script = ("import sys; from tinyfusion.errors import run_main; from tinyfusion.study.stages import StageRunner; "
              f"run_main(lambda: StageRunner({str(tmp_path / 'run')!r}, {ROOT!r}).stage('boom', ['never'], "
              "[sys.executable, '-c', 'raise SystemExit(3)']))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: stage boom failed;")
    assert "Traceback" not in done.stderr


def test_commands_run_the_scripts_of_the_root(tmp_path):
    runner = StageRunner(str(tmp_path / "run"), "/repo")
    assert runner.python("tools/make_digits.py") == [sys.executable, "/repo/tools/make_digits.py"]
    assert runner.torchrun("train.py", 2) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node=2", "/repo/train.py"]
    assert runner.launch("train.py", 2) == runner.torchrun("train.py", 2)
    assert runner.launch("train.py", 1) == runner.python("train.py")  # one process: no torchrun start-up
    assert resume_flags(str(tmp_path / "absent")) == []
    assert resume_flags(str(tmp_path)) == ["--resume", "auto"]

"""Every command of README.md is checked, so that none can rot.

Each fenced ```bash block is split into commands (`\\` continuations joined, `# comments` dropped).
A command is either
  - a script command (`python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...`): the default suite
    parses it with the script's real argparse (a flag that does not exist fails here), and the
    slow suite (`-m slow`) runs it, in README order, in a temporary folder that holds small
    stand-ins under the README's own file names (see make_standins); or
  - listed in NOT_RUN with the reason it is not run (downloads, the install, the suite itself).
A command that is neither fails the default suite: add it to NOT_RUN or make it runnable.
The ```python snippets are compiled, the attributes they use of our scripts must exist, and the
slow suite runs them after the commands (same folder).

How a README command becomes a tiny run (the only rewriting; edit these tables when you add one):
  - architectures: tests/readme_standins.py runs each script with every published DiT config at
    its real depth and gating but 64 wide (DiT-XL/2 = 28 blocks of width 64), so `--model` values
    are not rewritten;
  - FLAG_VALUES: the value of a flag is replaced (image size 256 -> 32 through the tiny VAE, 8
    processes -> 1, batch 128 -> 8, ...);
  - PLACEHOLDERS: README placeholder text -> a concrete path (a function of the run folder);
  - EXTRA_ARGS: flags appended per script when the command does not give them (step caps, few
    sampling steps, few samples), so the run takes seconds;
  - PATH_ALIASES: inputs the README names by the file a full-size run would have made (its name
    encodes sizes) -> the file the tiny run made; PATHS: absolute README paths -> the run folder.
A script without an EXTRA_ARGS entry runs with the README's own arguments. A command that needs
the network (a download) goes in NOT_RUN with its reason; it is still parsed if it is a script.
"""
import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
STANDINS = os.path.join(ROOT, "tests", "readme_standins.py")

# regex on the joined command -> why the tests do not run it (parsed by argparse all the same
# when it is a script command)
NOT_RUN = [
    (r"^python3 -m venv \.venv && ", "the install: downloads wheels (.ci/run does it on a fresh machine)"),
    (r"^python -m pytest ", "the test suite itself"),
    (r"^mkdir -p pretrained$", "the folder of the downloads below (the tests create their own)"),
    (r"^wget ", "a download (no network in tests); a stand-in is created under the same file name"),
    (r"^hf download ", "a download (no network in tests); the tiny VAE stands in under the same folder name"),
    (r"^python quickstart\.py\b", "run by tests/test_quickstart.py with tiny schedules (the real run takes minutes)"),
    (r"^bench/gpu_check\.sh\b", "needs a GPU; its --cpu-dry-run is run by tests/test_gpu_check.py (slow)"),
    (r"^python reproduce\.py --quick\b", "run end to end by tests/test_study.py (slow; about 10 minutes)"),
    (r"^python visualize_activation\.py .*quickstart-run/", "reads the run folder of `python quickstart.py`; "
     "tests/test_visualize_activation.py runs the script on a tiny teacher's feature store"),
]

FLAG_VALUES = {"--nproc_per_node": "1", "--image-size": "32", "--global-batch-size": "8", "--epochs": "1",
               "--per-proc-batch-size": "4"}

PLACEHOLDERS = {
    "[--vae-path pretrained/sd-vae-ft-ema]": "--vae-path pretrained/sd-vae-ft-ema",  # an optional flag: given
    "results/<run folder>": lambda work: newest(work, "results/*DiT-XL-1-2"),
    "YOUR_IMAGE_FOLDER": "imagenet-train/3",
}

TRAINING = ["--max-steps", "2", "--ckpt-every", "2", "--log-every", "1", "--num-workers", "0",
            "--global-batch-size", "8"]  # the stand-in data set has 40 images (80 with flips)
EXTRA_ARGS = {
    "extract_features.py": ["--num-workers", "0"],
    "prune_by_learning.py": TRAINING,
    "train.py": TRAINING,
    "train_masked_kd.py": TRAINING,
    "prune_by_score.py": ["--nsamples", "8", "--batch-size", "4"],
    "prune_by_index.py": [],
    "sample.py": ["--num-sampling-steps", "2"],
    "sample_ddp.py": ["--num-fid-samples", "12", "--num-sampling-steps", "2"],
    "export_diffusers.py": [],
    "evaluator.py": [],
    "save_npz.py": [],
    "draw_decision.py": [],
    "visualize_activation.py": ["--batch-size", "16"],
}
MODEL_SCRIPTS = {"extract_features.py", "prune_by_learning.py", "train.py", "train_masked_kd.py", "prune_by_score.py",
                 "prune_by_index.py", "sample.py", "sample_ddp.py", "export_diffusers.py",
                 "visualize_activation.py"}  # take --image-size/--vae-path

PATH_ALIASES = {
    "samples/DiT-D14-2-0500000-size-256-vae-ema-cfg-1.5-seed-0.npz": lambda work: newest(work, "samples/*.npz"),
    "results/SiT-D14-Learned-RepKD-SiT-D14-2/checkpoints/0500000.pt":
        lambda work: newest(work, "results/SiT-D14-Learned-RepKD-SiT-D14-2/checkpoints/*.pt"),
}

PATHS = {"/data/imagenet/train": "imagenet-train"}  # absolute README paths -> inside the run folder


def newest(work, pattern):
    """The newest file matching `pattern` in the run folder (the pattern itself when only parsing)."""
    if work is None:
        return pattern
    matches = sorted(glob.glob(os.path.join(work, pattern)), key=os.path.getmtime)
    assert matches, f"nothing matches {pattern} in {work}"
    return os.path.relpath(matches[-1], work)


# ------------------------------------------------------------------------------- reading the README
def fenced_blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def bash_commands(block):
    """Commands of a bash block: continuations joined, comment lines and trailing comments dropped."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        command = strip_comment(pending).strip()
        pending = ""
        if command:
            commands.append(" ".join(command.split()))
    return commands


def strip_comment(line):
    """The line without a trailing `# ...` that is outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def readme_commands():
    with open(README) as f:
        text = f.read()
    return [command for block in fenced_blocks(text, "bash") for command in bash_commands(block)]


def doc_texts():
    """README.md and the pages of docs/ it links to (their commands are parsed too)."""
    texts = []
    for path in [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(path) as f:
            texts.append(f.read())
    return texts


def doc_commands():
    """Commands of docs/*.md that the README does not hold (parsed by the default suite, not run)."""
    in_readme = set(readme_commands())
    return [command for text in doc_texts()[1:] for block in fenced_blocks(text, "bash")
            for command in bash_commands(block) if command not in in_readme]


def python_snippets(texts=None):
    """```python snippets of README.md and docs/ (compiled by the default suite)."""
    return [snippet for text in (texts or doc_texts()) for snippet in fenced_blocks(text, "python")]


def readme_python_snippets():
    """The README's own snippets: the slow suite runs them after its commands, in the same folder."""
    return python_snippets(doc_texts()[:1])


def not_run_reason(command):
    return next((reason for pattern, reason in NOT_RUN if re.search(pattern, command)), None)


def script_call(command):
    """(launcher 'python' | 'torchrun', launcher args, script, script args) or None."""
    words = shlex.split(command)
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return "python", [], words[1], words[2:]
    if words[0] == "torchrun":
        index = next(i for i, word in enumerate(words) if word.endswith(".py"))
        return "torchrun", words[1:index], words[index], words[index + 1:]
    return None


def with_placeholders(command, work=None):
    for text, value in PLACEHOLDERS.items():
        if text in command:
            command = command.replace(text, value(work) if callable(value) else value)
    return command


# ------------------------------------------------------------------------------ default suite
class Parsed(Exception):
    pass


@contextmanager
def argparse_only(argv):
    """Run a script's __main__ up to its argparse call: parse `argv`, then stop (no work is done)."""
    import argparse
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(real_parse_args(self, args, namespace))

    saved_argv, saved_path = sys.argv, list(sys.path)
    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = argv
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args
        sys.argv, sys.path[:] = saved_argv, saved_path


def parse_with_script(script, args, capsys):
    import runpy
    with argparse_only([script] + args):
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except Parsed as parsed:
            return parsed.args
        except SystemExit:
            pytest.fail(f"{script} rejects the README's arguments {shlex.join(args)}:\n{capsys.readouterr().err}")
    pytest.fail(f"{script} never called ArgumentParser.parse_args")


def test_every_command_is_run_or_listed_with_a_reason():
    commands = readme_commands()
    assert len(commands) >= 15, commands  # the README's recipes were found
    for command in commands:
        assert not_run_reason(command) or script_call(with_placeholders(command)), (
            f"README command neither run by tests/test_readme.py nor listed in its NOT_RUN: {command}")
        if script_call(with_placeholders(command)):
            assert os.path.isfile(os.path.join(ROOT, script_call(with_placeholders(command))[2])), command


@pytest.mark.parametrize("command", [c for c in readme_commands() if script_call(with_placeholders(c))])
def test_every_script_command_parses_with_the_real_argparse(command, capsys):
    _, _, script, args = script_call(with_placeholders(command))
    assert parse_with_script(script, args, capsys) is not None


@pytest.mark.parametrize("command", [c for c in doc_commands() if script_call(with_placeholders(c))])
def test_every_docs_script_command_parses_with_the_real_argparse(command, capsys):
    _, _, script, args = script_call(with_placeholders(command))
    assert parse_with_script(script, args, capsys) is not None


def test_python_snippets_compile_and_use_existing_names():
    snippets = python_snippets()
    assert snippets
    for snippet in snippets:
        tree = ast.parse(snippet)
        ours = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
                if os.path.isfile(os.path.join(ROOT, f"{alias.name}.py"))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ours:
                module = __import__(node.value.id)
                assert hasattr(module, node.attr), f"README snippet uses {node.value.id}.{node.attr}, which does not exist"


@pytest.mark.parametrize("command", [c for c in readme_commands() if script_call(c) and not not_run_reason(c)])
def test_the_tiny_rewrite_of_every_run_command_parses(command, capsys):
    """What the slow suite runs (the tables below applied) is valid too, so a table entry that
    names a flag a script no longer has fails here and not only in the slow run."""
    argv = tiny_command(command, work=None)
    script_index = argv.index(STANDINS) + 1
    parse_with_script(os.path.relpath(argv[script_index], ROOT), argv[script_index + 1:], capsys)


# --------------------------------------------------------------------------------- slow suite
def make_standins(work):
    """The README's input files, tiny, under the README's names (relative to `work`)."""
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from readme_standins import install_standins
    from test_evaluator import build_tiny_inception_graph
    from tiny_vae import make_tiny_vae
    from tools.make_digits import write_digits_folder
    install_standins()
    from models import DiT_models, SiT_models
    os.makedirs(os.path.join(work, "pretrained"))
    os.makedirs(os.path.join(work, "data"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = DiT_models["DiT-XL/2"](input_size=4, in_channels=4, num_classes=1000)
        torch.save(teacher.state_dict(), os.path.join(work, "pretrained/DiT-XL-2-256x256.pt"))
        student = DiT_models["DiT-D14/2"](input_size=4, in_channels=4, num_classes=1000)
        sit = SiT_models["SiT-XL/2"](input_size=4, in_channels=4, num_classes=1000)  # its file name says SiT
        torch.save(sit.state_dict(), os.path.join(work, "pretrained/SiT-XL-2-256x256.pt"))
        # `python download.py` (every released file) finds them all and fetches nothing
        torch.save(DiT_models["DiT-XL/2"](input_size=8, in_channels=4, num_classes=1000).state_dict(),
                   os.path.join(work, "pretrained/DiT-XL-2-512x512.pt"))
    torch.save(student.state_dict(), os.path.join(work, "pretrained/TinyDiT-D14-MaskedKD-500K.pt"))
    os.makedirs(os.path.join(work, "outputs/D14-Learned-Finetuning/checkpoints"))
    torch.save(student.state_dict(), os.path.join(work, "outputs/D14-Learned-Finetuning/checkpoints/0500000.pt"))
    make_tiny_vae(os.path.join(work, "pretrained/sd-vae-ft-ema"))
    make_tiny_vae(os.path.join(work, "pretrained/sd-vae-ft-mse"))
    build_tiny_inception_graph(os.path.join(work, "pretrained/classify_image_graph_def.pb"), np.random.default_rng(0))
    np.savez(os.path.join(work, "data/VIRTUAL_imagenet256_labeled.npz"),
             arr_0=np.random.default_rng(1).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8))
    write_digits_folder(os.path.join(work, "imagenet-train"), image_size=32, limit=40)


def substitute_values(words):
    """FLAG_VALUES applied to `--flag value` and `--flag=value` words."""
    out = []
    for word in words:
        flag, equals, _ = word.partition("=")
        if equals and flag in FLAG_VALUES:
            word = f"{flag}={FLAG_VALUES[flag]}"
        elif out and out[-1] in FLAG_VALUES:
            word = FLAG_VALUES[out[-1]]
        out.append(word)
    return out


def tiny_command(command, work):
    """The README command rewritten by the tables above, as an argv list."""
    launcher, launcher_args, script, args = script_call(with_placeholders(command, work))
    args = [PATHS.get(arg, PATH_ALIASES[arg](work) if arg in PATH_ALIASES else arg) for arg in args]
    args = substitute_values(args)
    extra = list(EXTRA_ARGS.get(script, []))  # a new script runs with the README's own arguments
    if script in MODEL_SCRIPTS:  # the tiny VAE at 32 px unless the command names its own
        extra += ["--image-size", "32", "--vae-path", "pretrained/sd-vae-ft-ema"]
    for index in range(0, len(extra), 2):
        if extra[index] not in args:
            args += extra[index:index + 2]
    start = [sys.executable]
    if launcher == "torchrun":
        start += ["-m", "torch.distributed.run", "--standalone"] + substitute_values(launcher_args)
    return start + [STANDINS, os.path.join(ROOT, script)] + args


@pytest.mark.slow
def test_readme_commands_run_in_order_on_stand_ins(tmp_path):
    work = str(tmp_path / "work")
    os.makedirs(work)
    make_standins(work)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    failures = []  # every failing command is reported, not only the first
    for command in readme_commands():
        if not_run_reason(command):
            continue
        argv = tiny_command(command, work)
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:") or "Error:" in line]
            failures.append(f"README command failed: {command}\nran: {shlex.join(argv)}\n" +
                            "\n".join(errors[:5]) + f"\n{done.stderr[-1000:]}")
    for snippet in readme_python_snippets():
        done = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            failures.append(f"README python snippet failed:\n{snippet}\n{done.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    shutil.rmtree(work)

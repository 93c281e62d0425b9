"""Every command of README.md is checked, so that none can rot, and the recipes run as written.

Each fenced ```bash block is split into commands (`\\` continuations joined, `# comments` dropped).
A command is either
  - a script command (`python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...`): the default suite
    parses it with the script's real argparse (a flag that does not exist fails here), and the
    slow suite (`-m slow`) runs them all, in README order, in ONE temporary folder; or
  - listed in NOT_RUN with the reason it is not run (downloads, the install, the suite itself).
A command that is neither fails the default suite: add it to NOT_RUN or make it runnable.
The ```python snippets are compiled, the attributes they use of our scripts must exist, and the
slow suite runs them after the commands (same folder).

The hand-offs. Every file a README command reads must be one an earlier README command wrote,
or an input from outside the recipes, listed in OUTSIDE with the stand-in the slow suite puts
under the README's own name (released weights, ImageNet, the Inception graph, the reference
batch). The default suite checks this in a second without running anything
(test_every_file_a_command_reads_was_written_before): the paths a command writes are computed
from its parsed flags by the scripts' own naming functions (run_folder_name, sample_ddp.py's
batch_name, save_npz.py's default_output), so a changed default or name breaks it. The slow
suite then runs the chain for real: extract -> prune -> fine-tune and Masked KD -> sample_ddp ->
save_npz -> evaluator (an FID line), and the SiT recipes on the same features.

How a README command becomes a tiny run. The paths and names a user types are never rewritten;
only sizes are:
  - architectures: tests/readme_standins.py runs each script with every published DiT/SiT config
    at its real depth and gating but 64 wide (DiT-XL/2 = 28 blocks of width 64), so `--model`
    values are kept;
  - FLAG_VALUES: the value of a size flag is replaced (8 processes -> 1, batch 128 -> 8, 50,000
    FID samples -> 12, ...); EXTRA_ARGS: size flags appended when the command does not give them
    (a step cap, few sampling steps where the step count is not part of a later-read name);
  - the one allowed substitution: a shrunk run cannot reach step 500,000, so STEP_SUBSTITUTION
    replaces the README's step `0500000` by the step the shrunk run saves (TINY_STEPS), in the
    `--ckpt` path and in the sample names that carry it;
  - the environment (ENVIRONMENT): the SD-VAE of `--vae ema|mse` is found in a hub cache that holds
    a tiny AutoencoderKL under the hub's name, offline; the evaluator finds the Inception graph
    stand-in through its environment variable; the ImageNet stand-in is a small image folder in
    the run folder (the README's `/data/imagenet/train` is the one absolute path, mapped there
    because a test never writes outside its folder).
"""
import ast
import fnmatch
import glob
import os
import re
import shlex
import subprocess
import sys
import time
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

FLAG_VALUES = {"--nproc_per_node": "1", "--global-batch-size": "8", "--epochs": "1", "--per-proc-batch-size": "4",
               "--num-fid-samples": "12", "--nsamples": "8", "--num-sampling-steps": "2"}

PLACEHOLDERS = {
    "[--vae-path pretrained/sd-vae-ft-ema]": "--vae-path pretrained/sd-vae-ft-ema",  # an optional flag: given
}

TINY_STEPS = 2  # optimizer steps of every shrunk training run; its last checkpoint is checkpoints/0000002.pt
STEP_SUBSTITUTION = ("0500000", f"{TINY_STEPS:07d}")
TINY_FID_SAMPLES = FLAG_VALUES["--num-fid-samples"]
TRAINING = ["--max-steps", str(TINY_STEPS), "--log-every", "1", "--num-workers", "0",
            "--global-batch-size", "8"]  # the ImageNet stand-in has 40 images
EXTRA_ARGS = {
    "extract_features.py": ["--num-workers", "0"],
    "prune_by_learning.py": TRAINING,
    "train.py": TRAINING,
    "train_masked_kd.py": TRAINING,
    "prune_by_score.py": ["--nsamples", "8", "--batch-size", "4"],
    "sample.py": ["--num-sampling-steps", "2"],
    # sample_ddp.py keeps its 250 steps: another step count would change the name save_npz.py reads
    "sample_ddp.py": ["--num-fid-samples", TINY_FID_SAMPLES],
    "save_npz.py": ["--num", TINY_FID_SAMPLES],
    "visualize_activation.py": ["--batch-size", "8"],
}

IMAGENET = "/data/imagenet/train"  # the README's ImageNet: stood in for by a small image folder in the run folder
IMAGENET_STANDIN = "imagenet-train"
INCEPTION_STANDIN = "pretrained/classify_image_graph_def.pb"
HUB_CACHE = "hub-cache"  # HF_HUB_CACHE of the runs: the tiny VAE under stabilityai/sd-vae-ft-{ema,mse}


def environment(work):
    """The environment of every README command of the slow suite (see the module docstring)."""
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                HF_HUB_CACHE=os.path.join(work, HUB_CACHE), TINYFUSION_INCEPTION=INCEPTION_STANDIN)


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
            return parsed.args[0]  # the Namespace
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
    argv = tiny_command(command)
    script_index = argv.index(STANDINS) + 1
    parse_with_script(os.path.relpath(argv[script_index], ROOT), argv[script_index + 1:], capsys)


# ------------------------------------------------------------------------------- the hand-offs
def save_model(model_name, input_size, path, family="DiT"):
    """A 64-wide stand-in of a released checkpoint (run inside install_standins)."""
    import torch
    from models import DiT_models, SiT_models
    registry = SiT_models if family == "SiT" else DiT_models
    torch.save(registry[model_name](input_size=input_size, in_channels=4, num_classes=1000).state_dict(), path)


def make_imagenet(path):
    from tinyfusion.study.digits import write_digits_folder
    write_digits_folder(path, image_size=32, limit=40)  # 10 class folders; extract_features.py resizes to 256


def make_vae(path):
    from tiny_vae import make_tiny_vae
    make_tiny_vae(path)


def make_reference_batch(path):
    import numpy as np
    np.savez(path, arr_0=np.random.default_rng(1).integers(0, 256, (24, 256, 256, 3), dtype=np.uint8))


# a path a README command reads that no README command writes -> (what it is, how its stand-in is made)
OUTSIDE = {
    IMAGENET: ("ImageNet's training images", make_imagenet),
    "pretrained/DiT-XL-2-256x256.pt": ("the released DiT-XL/2", lambda path: save_model("DiT-XL/2", 32, path)),
    "pretrained/DiT-XL-2-512x512.pt": ("the released DiT-XL/2 at 512", lambda path: save_model("DiT-XL/2", 64, path)),
    "pretrained/TinyDiT-D14-MaskedKD-500K.pt": ("the released TinyDiT-D14",
                                                lambda path: save_model("DiT-D14/2", 32, path)),
    "pretrained/SiT-XL-2-256x256.pt": ("the released SiT-XL/2", lambda path: save_model("SiT-XL/2", 32, path, "SiT")),
    "pretrained/sd-vae-ft-ema": ("the SD-VAE (`hf download`)", make_vae),
    "pretrained/sd-vae-ft-mse": ("the SD-VAE (`hf download`)", make_vae),
    "data/VIRTUAL_imagenet256_labeled.npz": ("ADM's reference batch", make_reference_batch),
}

READ_FLAGS = ("data_path", "load_weight", "load_teacher", "ckpt", "image_dir", "log", "vae_path", "ref_batch",
              "sample_batch")
DIT_CHAIN = ["extract_features.py", "prune_by_learning.py", "train.py", "train_masked_kd.py", "sample_ddp.py",
             "save_npz.py", "evaluator.py"]  # the DiT recipe, in the README's order
ANY_STEP = "[0-9]" * 7  # a run folder stands for its checkpoints {step:07d}.pt (a shrunk run saves another step)


def run_folder_outputs(folder):
    return [folder, os.path.join(folder, "metrics.jsonl"), os.path.join(folder, "checkpoints", f"{ANY_STEP}.pt")]


def written_paths(script, args):
    """What `script` run with the parsed `args` writes (glob patterns), named by the scripts' own functions."""
    from tinyfusion.io.run_folder import run_folder_name
    if script == "download.py":
        from tinyfusion.io.downloads import RELEASED
        return [os.path.join(args.folder, name) for name in (args.names or RELEASED)]
    if script == "extract_features.py":
        return [args.features_path]
    if script in ("train.py", "train_masked_kd.py", "prune_by_learning.py"):
        run = run_folder_name(args.results_dir, args.prefix, args.model)
        pruned = [args.save_model or os.path.join(run, "pruned.pt")] if script == "prune_by_learning.py" else []
        return run_folder_outputs(run) + pruned
    if script in ("prune_by_score.py", "prune_by_index.py", "export_diffusers.py"):
        return [args.save_model if script != "export_diffusers.py" else args.out]
    if script == "sample_ddp.py":
        from tinyfusion.sampling.batch_settings import batch_name, check_batch_args
        folder = os.path.join(args.sample_dir, batch_name(args, *check_batch_args(args), args.precision))
        return [folder, f"{folder}.npz"]
    if script == "save_npz.py":
        import save_npz
        return [args.out or save_npz.default_output(args.image_dir.rstrip("/"))]
    return []


def read_paths(script, args):
    """The files and folders `script` reads from its parsed `args` (a bare released name: its pretrained/ copy)."""
    from tinyfusion.io.downloads import DOWNLOAD_FOLDER, is_released_name
    reads = [getattr(args, flag) for flag in READ_FLAGS if getattr(args, flag, None)]
    if script != "extract_features.py" and getattr(args, "features_path", None):
        reads.append(args.features_path)  # prune_by_score.py / visualize_activation.py calibrate on a store
    return [os.path.join(DOWNLOAD_FOLDER, path) if is_released_name(path) and os.sep not in path else path
            for path in reads]


def chain_report(capsys):
    """[(command, script, reads, writes)] of every run README command, in order."""
    report = []
    for command in readme_commands():
        if not_run_reason(command):
            continue
        _, _, script, args = script_call(with_placeholders(command))
        parsed = parse_with_script(script, args, capsys)
        report.append((command, script, read_paths(script, parsed), written_paths(script, parsed)))
    return report


def test_every_file_a_command_reads_was_written_before(capsys):
    """The README's hand-offs, without running anything: each path a command reads is an outside
    input (OUTSIDE) or matches what an earlier command writes, per the scripts' naming functions."""
    import difflib
    written, missing = [], []
    report = chain_report(capsys)
    for command, script, reads, writes in report:
        for path in map(os.path.normpath, reads):
            if path not in OUTSIDE and not any(fnmatch.fnmatchcase(path, pattern) for pattern in written):
                closest = difflib.get_close_matches(path, written, n=1, cutoff=0.0)
                missing.append(f"{command}\n  reads {path}, which no earlier README command writes"
                               f" (closest written: {closest[0] if closest else 'nothing'})")
        written += [os.path.normpath(path) for path in writes]
    assert not missing, "\n".join(missing)
    dit = [script for command, script, _, _ in report if "SiT-" not in command and script in DIT_CHAIN]
    chain = iter(dit)
    assert all(step in chain for step in DIT_CHAIN), f"the README's DiT recipe lacks a step of {DIT_CHAIN}: {dit}"


def test_only_the_step_number_of_a_checkpoint_is_substituted():
    """STEP_SUBSTITUTION touches nothing but the step in --ckpt paths and the sample names built from them."""
    for command in readme_commands():
        words = shlex.split(with_placeholders(command))
        for index, word in enumerate(words):
            if STEP_SUBSTITUTION[0] in word:
                assert words[index - 1] in ("--ckpt", "--image_dir") or words[0:2] == ["python", "evaluator.py"], (
                    f"{word} of `{command}` holds {STEP_SUBSTITUTION[0]} outside a checkpoint or sample name")
                assert re.search(rf"(/{STEP_SUBSTITUTION[0]}\.pt$|-{STEP_SUBSTITUTION[0]}-)", word), word


# --------------------------------------------------------------------------------- slow suite
def make_standins(work):
    """OUTSIDE's stand-ins under the README's names, the hub cache of the VAE and the Inception
    graph, in `work` (run in a child process: the 64-wide architectures patch models.py)."""
    import numpy as np
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from readme_standins import install_standins
    from test_evaluator import build_tiny_inception_graph
    from tiny_vae import make_tiny_vae
    install_standins()
    os.chdir(work)
    import torch
    torch.manual_seed(0)
    for path, (_, make) in OUTSIDE.items():
        target = IMAGENET_STANDIN if path == IMAGENET else path
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        make(target)
    build_tiny_inception_graph(INCEPTION_STANDIN, np.random.default_rng(0))
    for hub_id in ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse"):  # what `--vae ema|mse` finds offline
        repo = os.path.join(HUB_CACHE, "models--" + hub_id.replace("/", "--"))
        make_tiny_vae(os.path.join(repo, "snapshots", "0" * 40))
        os.makedirs(os.path.join(repo, "refs"))
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write("0" * 40)


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


def tiny_command(command):
    """The README command as the argv of its tiny run: sizes shrunk, the step substituted, ImageNet's stand-in."""
    launcher, launcher_args, script, args = script_call(with_placeholders(command))
    args = [IMAGENET_STANDIN if arg == IMAGENET else arg.replace(*STEP_SUBSTITUTION) for arg in args]
    args = substitute_values(args)
    extra = EXTRA_ARGS.get(script, [])
    for index in range(0, len(extra), 2):
        if extra[index] not in args:
            args += extra[index:index + 2]
    start = [sys.executable]
    if launcher == "torchrun":
        start += ["-m", "torch.distributed.run", "--standalone"] + substitute_values(launcher_args)
    return start + [STANDINS, os.path.join(ROOT, script)] + args


@pytest.mark.slow
def test_readme_commands_run_in_order_on_stand_ins(tmp_path):
    """Every run README command, in order, in one folder: the DiT chain reaches an FID line and the
    SiT recipes run on its features."""
    work = str(tmp_path / "work")
    os.makedirs(work)
    made = subprocess.run([sys.executable, __file__, work], capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-2000:]
    failures, outputs, start = [], {}, time.time()
    for command in readme_commands():
        if not_run_reason(command):
            continue
        argv, started = tiny_command(command), time.time()
        done = subprocess.run(argv, cwd=work, env=environment(work), capture_output=True, text=True, timeout=900)
        outputs[command] = done.stdout
        print(f"{time.time() - started:6.1f} s  {command[:110]}")
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("error:") or "Error:" in line]
            failures.append(f"README command failed: {command}\nran: {shlex.join(argv)}\n" +
                            "\n".join(errors[:5]) + f"\n{done.stderr[-1000:]}")
    for snippet in readme_python_snippets():
        done = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=environment(work), capture_output=True,
                              text=True, timeout=900)
        if done.returncode != 0:
            failures.append(f"README python snippet failed:\n{snippet}\n{done.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    evaluations = [out for command, out in outputs.items() if script_call(command)[2] == "evaluator.py"]
    assert evaluations and all(re.search(r"^FID: \d", out, re.M) for out in evaluations), evaluations
    print(f"README commands ran in {time.time() - start:.0f} s")


if __name__ == "__main__":  # python tests/test_readme.py WORK: the stand-ins of the slow suite
    make_standins(sys.argv[1])

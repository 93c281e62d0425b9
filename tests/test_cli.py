"""The shared flags: every flag of the original scripts is accepted by our script
of the same name, and the pattern parsers give the documented values and one-line errors."""
import argparse
import glob
import json
import os
import subprocess
import sys

import pytest

from tinyfusion.flags import parse_groups, parse_index_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ORIGINAL_FLAGS = {
    "extract_features.py": "--data-path --features-path --results-dir --model --image-size --num-classes --epochs "
                           "--global-batch-size --global-seed --vae --num-workers --log-every --ckpt-every",
    "prune_by_learning.py": "--data-path --results-dir --model --image-size --num-classes --epochs --global-batch-size "
                            "--global-seed --vae --num-workers --log-every --ckpt-every --resume --load-weight --prefix "
                            "--ema-decay --lora-rank --lora --delta-w --scaling-range --tau-range --save-model",
    "prune_by_score.py": "--model --vae --data-path --image-size --num-classes --cfg-scale --num-sampling-steps --seed "
                         "--ckpt --nsamples --batch-size --save-model --n-pruned",
    "prune_by_index.py": "--model --vae --data-path --image-size --num-classes --cfg-scale --num-sampling-steps --seed "
                         "--ckpt --pruner --nsamples --batch-size --save-model --kept-indices",
    "train.py": "--data-path --results-dir --model --image-size --num-classes --epochs --global-batch-size --global-seed "
                "--vae --num-workers --log-every --ckpt-every --resume --load-weight --prefix --ema-decay --strict",
    "train_masked_kd.py": "--data-path --results-dir --model --teacher --image-size --num-classes --epochs "
                          "--global-batch-size --global-seed --vae --num-workers --log-every --ckpt-every --resume "
                          "--load-weight --load-teacher --prefix --ema-decay --strong-aug",
    "sample.py": "--model --vae --image-size --num-classes --cfg-scale --num-sampling-steps --seed --ckpt --no-ema",
    "sample_ddp.py": "--model --vae --sample-dir --per-proc-batch-size --num-fid-samples --image-size --num-classes "
                     "--cfg-scale --num-sampling-steps --global-seed --tf32 --no-tf32 --ckpt --no-ema",
    "save_npz.py": "--image_dir",
}


def test_every_original_flag_is_accepted():
    # all --help runs at once: each pays the torch import
    runs = {script: subprocess.Popen([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for script in ORIGINAL_FLAGS if os.path.exists(os.path.join(ROOT, script))}
    assert len(runs) == len(ORIGINAL_FLAGS), f"missing scripts: {set(ORIGINAL_FLAGS) - set(runs)}"
    for script, process in runs.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{script} --help failed: {err[-500:]}"
        help_words = set(out.replace(",", " ").replace("[", " ").replace("]", " ").replace("|", " ").split())
        missing = [flag for flag in ORIGINAL_FLAGS[script].split() if flag not in help_words]
        assert not missing, f"{script} lacks {missing}"


def test_parse_groups():
    assert parse_groups("[[2,4],[2,4],[3,4]]") == [[2, 4], [2, 4], [3, 4]]
    assert parse_groups("[[1,2]]*14") == [[1, 2]] * 14
    assert parse_groups("[[1, 2]] * 2 ") == [[1, 2], [1, 2]]
    for bad in ("[[1,2]*3", "[1,2]", "[[1,2,3]]", "[[1.5,2]]", "import os"):
        with pytest.raises(argparse.ArgumentTypeError, match="list of \\[keep, of\\] pairs"):
            parse_groups(bad)


def test_parse_index_list():
    assert parse_index_list("[0, 2, 4, 6]") == [0, 2, 4, 6]
    assert parse_index_list("0,2, 5") == [0, 2, 5]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_index_list("[0, 'a']")


def test_choice_lists_of_the_help_are_the_code_s():
    """The choice lists tinyfusion/flags.py repeats so that --help needs no torch are the registries
    the code runs (the model zoo, the samplers, the feature store's dtypes, SiT's interpolants)."""
    from models import MAR_models, DiT_models
    from tinyfusion import flags as cli
    from tinyfusion.io import feature_store
    from transport import paths, samplers, settings
    assert cli.MODEL_NAMES == list(DiT_models)
    assert cli.MAR_MODEL_NAMES == list(MAR_models)
    from tinyfusion.families import dit
    assert cli.SAMPLER_NAMES == tuple(dit.SAMPLERS)
    assert cli.STORE_DTYPE_NAMES == tuple(sorted(feature_store.STORE_DTYPES))
    # SiT's names are defined by transport/ (the maths imports no flags); the flags repeat them
    assert (paths.PATHS, paths.PREDICTIONS) == (cli.SIT_PATHS, cli.SIT_PREDICTIONS) == (
        ("Linear", "GVP", "VP"), ("velocity", "score", "noise"))
    assert samplers.DIFFUSION_FORMS == cli.SIT_DIFFUSION_FORMS and samplers.LAST_STEPS == cli.SIT_LAST_STEPS
    assert settings.LOSS_WEIGHTS == cli.SIT_LOSS_WEIGHTS


def test_precision_flags_resolve_to_torch_dtypes():
    import torch
    from tinyfusion.flags import resolve_precision
    assert resolve_precision("auto", "cpu") is torch.float32
    assert [resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16,
                                                                                torch.float16]


HEAVY_MODULES = ("torch", "diffusers", "tensorflow")  # each takes seconds to import
# Runs `SCRIPT --help` for every script given, in one Python (as `python SCRIPT --help` would: the
# script's folder first on sys.path), and prints per script its exit code, whether the usage was
# printed (the code is an exception's repr if one escaped), and which HEAVY_MODULES were imported while it ran.
HELP_PROBE = """
import contextlib, io, json, os, runpy, sys
heavy = {heavy!r}
for path in sys.argv[1:]:
    before = {{name for name in heavy if name in sys.modules}}
    sys.argv, out, code = [path, "--help"], io.StringIO(), None
    sys.path.insert(0, os.path.dirname(path))
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    except Exception as error:
        code = repr(error)
    sys.path.pop(0)
    loaded = sorted(name for name in heavy if name in sys.modules and name not in before)
    print(json.dumps(dict(script=path, code=code, usage="usage:" in out.getvalue(), loaded=loaded)))
"""


def scripts():
    """Every script a user runs: the .py files of the root and of tools/ with a __main__ block."""
    paths = sorted(glob.glob(os.path.join(ROOT, "*.py"))) + sorted(glob.glob(os.path.join(ROOT, "tools", "*.py")))
    return [path for path in paths if 'if __name__ == "__main__":' in open(path).read()]


def help_probe(paths):
    done = subprocess.run([sys.executable, "-c", HELP_PROBE.format(heavy=HEAVY_MODULES), *paths],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return {json.loads(line)["script"]: json.loads(line) for line in done.stdout.splitlines()}


def test_help_of_every_script_loads_no_heavy_library(tmp_path):
    """`SCRIPT --help` prints the usage and exits 0 without importing torch, diffusers or
    TensorFlow, for every script (bench/bench_help.py times it). The control, a script that
    imports a stand-in `torch` package before parsing, shows that the probe sees such an import."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    control = tmp_path / "control.py"
    control.write_text('import argparse\nimport torch\nif __name__ == "__main__":\n'
                       '    argparse.ArgumentParser().parse_args()\n')
    found = scripts()
    assert len(found) >= 18 and os.path.join(ROOT, "train.py") in found  # the scripts were found
    results = help_probe(found + [str(control)])
    assert results.pop(str(control))["loaded"] == ["torch"]
    assert sorted(results) == sorted(found)
    for path, result in results.items():
        assert (result["code"], result["usage"], result["loaded"]) == (0, True, []), result

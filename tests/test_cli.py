"""The shared flags: every flag of the original scripts is accepted by our script
of the same name, and the pattern parsers give the documented values and one-line errors."""
import argparse
import os
import subprocess
import sys

import pytest

from tinyfusion.cli import parse_groups, parse_index_list

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


def test_model_names_of_the_help_are_the_models():
    """cli.MODEL_NAMES (the --model help, listed so that --help needs no torch) is models.DiT_models."""
    from models import DiT_models
    from tinyfusion.cli import MODEL_NAMES
    assert MODEL_NAMES == list(DiT_models)


def test_precision_flags_resolve_to_torch_dtypes():
    import torch
    from tinyfusion.cli import resolve_precision
    assert resolve_precision("auto", "cpu") is torch.float32
    assert [resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16,
                                                                                torch.float16]


@pytest.mark.parametrize("script", ["prune_by_index.py", "export_diffusers.py", "save_npz.py", "draw_decision.py",
                                    "quickstart.py", "tools/make_digits.py"])
def test_help_loads_no_heavy_library(script):
    """`--help` of these scripts answers without importing torch, diffusers or TensorFlow (whose
    import alone takes seconds); bench/bench_help.py times every script."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, '--help']\n"
             f"sys.path.insert(0, {ROOT!r})\n"
             "try:\n"
             f"    runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'tensorflow') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]

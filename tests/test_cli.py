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

"""Small real inputs for the training tests: a pixel-space digits feature store (written by
tools/make_digits.py + extract_features.py, as a user would) and tiny DiT-XS checkpoints."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 8  # 8x8 digits in pixel space: DiT-XS/4 sees 4 tokens
MODEL = "DiT-XS/4"
COMMON_FLAGS = ["--image-size", str(IMAGE_SIZE), "--vae", "none", "--num-classes", "10", "--num-workers", "0"]


def make_digits_store(folder, limit=96):
    """A finished feature store of the first `limit` digits (pixels and their flips)."""
    import extract_features
    from tinyfusion.study.digits import write_digits_folder
    images = os.path.join(folder, "digits")
    features = os.path.join(folder, "features")
    write_digits_folder(images, IMAGE_SIZE, limit=limit)
    extract_features.main(extract_features.parse_args(
        ["--data-path", images, "--features-path", features, "--image-size", str(IMAGE_SIZE), "--vae", "none",
         "--num-classes", "10", "--num-workers", "0", "--batch-size", "64"]))
    return features


def make_teacher_and_student(folder, kept_indices=(0, 3, 6, 9), seed=0):
    """(teacher.pt, student.pt): a random 12-block DiT-XS/4 (plain state dict, the official
    format) with non-zero adaLN/final weights so it predicts something, and the pruned student
    keeping `kept_indices` (pruning metadata attached)."""
    from tinyfusion.io.checkpoints import save_checkpoint, save_pruned_model
    from models import DiT_models, prune_to_kept_blocks
    generator = torch.Generator().manual_seed(seed)
    teacher = DiT_models[MODEL](input_size=IMAGE_SIZE, in_channels=3, num_classes=10)
    with torch.no_grad():  # leave adaLN-Zero's identity init: give every block and the output some weight
        for name, param in teacher.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    teacher_path = os.path.join(folder, "teacher.pt")
    save_checkpoint(teacher.state_dict(), teacher_path)
    student = prune_to_kept_blocks(teacher, list(kept_indices))
    student_path = os.path.join(folder, "student.pt")
    save_pruned_model(student, student_path, {"kept_indices": list(kept_indices), "source_depth": teacher.depth,
                                              "source_model": MODEL, "method": "test"})
    return teacher_path, student_path


def torchrun(script, args, nproc=2, timeout=900):
    """Run `script` under torchrun on CPU (gloo); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--standalone", os.path.join(ROOT, script), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def loss_task(compute_losses):
    """A TrainingTask whose loss of a batch is `compute_losses(forward, x, y, epoch)`, for tests
    that run tinyfusion.training.loop.TrainingLoop on a run they prepared."""
    from tinyfusion.training.task import TrainingTask

    class LossTask(TrainingTask):
        def losses(self, forward, x, y, epoch):
            return compute_losses(forward, x, y, epoch)
    return LossTask()


def run_interrupted_in_step(monkeypatch, family_class, loss_name, step, run):
    """Call run() with the family's loss raising KeyboardInterrupt in optimizer step `step` (as a
    killed job), expect the interruption, then restore the loss."""
    import pytest
    real_losses, calls = getattr(family_class, loss_name), []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real_losses(*args, **kwargs)
    monkeypatch.setattr(family_class, loss_name, dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(family_class, loss_name, real_losses)

"""--tensorboard and --wandb with the real packages: the TensorBoard event files and the wandb
offline run hold exactly the metrics the run wrote to metrics.jsonl, and a resume continues the
same wandb run."""
import glob
import json
import os
import struct

import pytest

import train
from training_helpers import COMMON_FLAGS, MODEL, make_digits_store, make_teacher_and_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trackers")
    features = make_digits_store(str(folder), limit=32)
    _, student = make_teacher_and_student(str(folder))
    return {"features": features, "student": student}


def run_train(workspace, results, *extra):
    train.main(train.build_parser().parse_args(
        ["--model", MODEL, "--data-path", workspace["features"], "--results-dir", str(results),
         "--global-batch-size", "8", "--load-weight", workspace["student"], "--log-every", "1", *COMMON_FLAGS,
         *extra]))
    return results / f"run-{MODEL.replace('/', '-')}"


def logged(run_dir, name):
    return [(record["step"], record[name]) for record in map(json.loads, open(run_dir / "metrics.jsonl"))]


def read_tensorboard_scalars(folder):
    """{tag: [(step, value)]} from the event files in `folder`, read as TFRecords (length, CRC,
    Event proto, CRC) with tensorboard's protobuf classes only: an independent reader, and one
    that does not load TensorFlow into the test process."""
    from tensorboard.compat.proto import event_pb2
    scalars = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else \
                    struct.unpack("<f", value.tensor.tensor_content)[0] if value.tensor.tensor_content else \
                    value.tensor.float_val[0]
                scalars.setdefault(value.tag, []).append((event.step, number))
    return scalars


def test_tensorboard_event_files_hold_every_logged_scalar(workspace, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = run_train(workspace, tmp_path, "--max-steps", "3", "--tensorboard")
    scalars = read_tensorboard_scalars(str(run_dir / "tensorboard"))
    for name in ("loss", "lr", "mse"):
        expected = logged(run_dir, name)
        assert [step for step, _ in scalars[name]] == [1, 2, 3] == [step for step, _ in expected]
        assert [value for _, value in scalars[name]] == pytest.approx([value for _, value in expected], rel=1e-6)


def test_wandb_offline_run_is_written_and_resumed_under_the_same_id(workspace, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run_train(workspace, tmp_path, "--max-steps", "2", "--ckpt-every", "2", "--wandb",
                        "--wandb-project", "tinyfusion-test")
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    first = glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))
    assert len(first) == 1 and glob.glob(os.path.join(first[0], f"run-{run_id}.wandb"))
    run_train(workspace, tmp_path, "--max-steps", "4", "--ckpt-every", "2", "--wandb", "--wandb-project",
              "tinyfusion-test", "--resume", "auto")
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id  # the resumed run continues it
    assert len(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}"))) >= 1
    assert [step for step, _ in logged(run_dir, "loss")] == [1, 2, 3, 4]

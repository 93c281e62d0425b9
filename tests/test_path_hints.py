"""tinyfusion/io/path_hints.py: the hint names the run folder and checkpoint a user most likely meant,
and load_checkpoint_file (behind --ckpt, --load-weight, --load-teacher) says it in its one line."""
import pytest
import torch

from tinyfusion.io.checkpoints import load_checkpoint_file
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.path_hints import closest_existing_path


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """Two run folders of train.py / train_masked_kd.py, each with two checkpoints, as cwd."""
    monkeypatch.chdir(tmp_path)
    for run in ("D14-Learned-Finetuning-DiT-D14-2", "D14-Learned-MaskedKD-DiT-D14-2"):
        folder = tmp_path / "outputs" / run / "checkpoints"
        folder.mkdir(parents=True)
        for step in (100000, 120000):  # by spelling 0100000.pt is closer to 0500000.pt, but 0120000.pt is newer
            torch.save({"w": torch.zeros(1)}, folder / f"{step:07d}.pt")
    return tmp_path


def test_the_readme_path_without_the_model_suffix_names_the_newest_checkpoint_of_that_run(runs):
    assert (closest_existing_path("outputs/D14-Learned-Finetuning/checkpoints/0500000.pt")
            == "outputs/D14-Learned-Finetuning-DiT-D14-2/checkpoints/0120000.pt")
    assert (closest_existing_path("outputs/D14-Learned-MaskedKD/checkpoints/0500000.pt")
            == "outputs/D14-Learned-MaskedKD-DiT-D14-2/checkpoints/0120000.pt")
    absolute = str(runs / "outputs/D14-Learned-MaskedKD-DiT-D14-2/checkpoints/0500000.pt")
    assert closest_existing_path(absolute) == str(runs / "outputs/D14-Learned-MaskedKD-DiT-D14-2/checkpoints/0120000.pt")


def test_a_misspelt_file_or_folder_stops_at_what_exists(runs):
    # a misspelt checkpoints folder, then no file name close to "final.pt": the run's folder is offered
    assert (closest_existing_path("outputs/D14-Learned-MaskedKD-DiT-D14-2/checkpoint/final.pt")
            == "outputs/D14-Learned-MaskedKD-DiT-D14-2/checkpoints")
    assert closest_existing_path("somewhere/else/model.pt") is None  # nothing close: no hint
    assert closest_existing_path("outputs/unrelated-name/x.pt") is None


def test_load_checkpoint_file_names_the_closest_checkpoint_in_one_line(runs):
    with pytest.raises(TinyFusionError) as error:
        load_checkpoint_file("outputs/D14-Learned-Finetuning/checkpoints/0500000.pt")
    message = str(error.value)
    assert "\n" not in message and "does not exist" in message
    assert message.endswith("the closest existing path is outputs/D14-Learned-Finetuning-DiT-D14-2/checkpoints/0120000.pt")

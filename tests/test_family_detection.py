"""A bare state dict (no metadata, no training args, not a released file name) says whether it is a
DiT or a SiT through its final layer: both keep p*p*2C outputs, but only DiT's diffusion loss trains
the sigma half; a SiT drops it, so after any training it is exactly zero while the rest is not. A
SiT saved as `model.pt` used to sample as a DiT with exit code 0."""
import os

import pytest
import torch

import sample
from diffusion import create_diffusion
from models import DiT_models, SiT_models
from tinyfusion.families.build import build_model, family_from_weights
from tinyfusion.errors import TinyFusionError
from transport.loss import training_losses
from transport.settings import create_transport

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PIXEL = ["--image-size", "8", "--vae", "none", "--num-classes", "10", "--num-sampling-steps", "2"]


def trained_state_dict(family, steps=2):
    """A full-depth XS/4 trained `steps` AdamW steps on its own family's loss (random data): the
    layout a trained checkpoint of that family has."""
    torch.manual_seed(0)
    registry = SiT_models if family == "SiT" else DiT_models
    model = registry[f"{family}-XS/4"](input_size=8, in_channels=3, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(steps):
        if family == "SiT":
            loss = training_losses(model, x, create_transport(), dict(y=y))["loss"].mean()
        else:
            diffusion = create_diffusion(timestep_respacing="")
            loss = diffusion.training_losses(model, x, torch.randint(0, 1000, (4,)), dict(y=y))["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def test_a_trained_sit_saved_as_model_pt_is_not_sampled_as_a_dit(tmp_path):
    path = str(tmp_path / "model.pt")
    torch.save(trained_state_dict("SiT"), path)
    assert family_from_weights(torch.load(path))[0] == "SiT"
    out = tmp_path / "grid.png"
    with pytest.raises(TinyFusionError, match=r"model.pt holds SiT weights \(the sigma half of its final layer is "
                                              r"exactly zero.*pass --model SiT-XS/4"):
        sample.main(sample.parse_args(["--model", "DiT-XS/4", *PIXEL, "--ckpt", path, "--out", str(out),
                                       "--class-labels", "1", "2"]))
    assert not out.exists()
    model, _ = build_model("SiT-XS/4", 8, 10, "none", ckpt=path)  # the right flag loads
    assert model.model_family == "SiT"


def test_a_trained_dit_is_not_loaded_as_a_sit(tmp_path):
    path = str(tmp_path / "weights.pt")
    torch.save(trained_state_dict("DiT"), path)
    assert family_from_weights(torch.load(path))[0] == "DiT"
    with pytest.raises(TinyFusionError, match=r"holds DiT weights \(the sigma half of its final layer is trained.*"
                                              r"pass --model DiT-XS/4"):
        build_model("SiT-XS/4", 8, 10, "none", ckpt=path)
    assert build_model("DiT-XS/4", 8, 10, "none", ckpt=path)[0].model_family == "DiT"


def test_where_the_weights_cannot_tell_the_flag_to_pass_is_named(tmp_path, capsys):
    path = str(tmp_path / "fresh.pt")  # untrained: the whole final layer is zero in both families
    torch.save(SiT_models["SiT-XS/4"](input_size=8, in_channels=3, num_classes=10).state_dict(), path)
    assert family_from_weights(torch.load(path)) == (None, None)
    build_model("DiT-XS/4", 8, 10, "none", ckpt=path)
    note = capsys.readouterr().out
    assert note.count("\n") == 1 and "fresh.pt does not say whether it holds DiT or SiT weights" in note
    assert "loaded as a DiT (--model DiT-XS/4); if it is a SiT, pass --model SiT-XS/4" in note
    assert os.path.exists(path)

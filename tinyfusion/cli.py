"""Command-line flags that several scripts share, defined once so that every script
accepts the original flags with the same meaning (SPEC section 13)."""
import argparse
import ast
import re

# every name of models.DiT_models, listed here so that `--help` needs neither models.py nor torch
# (tests/test_cli.py checks the two lists agree)
MODEL_NAMES = ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-L/4", "DiT-L/8", "DiT-B/2", "DiT-B/4", "DiT-B/8",
               "DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2", "DiT-XS/1", "DiT-XS/2",
               "DiT-XS/4", "DiT-XL-1-2", "DiT-XL-2-4", "DiT-XL-7-14", "DiT-XL-1-4", "DiT-D14-1-2", "DiT-D14-2-4"]


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

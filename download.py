"""Find or download the released weights: DiT-XL/2 (256x256, 512x512) and TinyDiT-D14.

    python download.py                               # DiT-XL/2 256, 512 and TinyDiT-D14, into pretrained/
    python download.py DiT-XL-2-256x256.pt           # only the named ones (also SiT-XL-2-256x256.pt and
                                                     # the evaluator's classify_image_graph_def.pb)

A file already in pretrained/ (or the original's pretrained_models/) is not fetched again; an
interrupted download resumes where it stopped. A download is kept only after its size and sha256
passed: the published ones, or the ones pinned in pretrained/MANIFEST.json at the first download
(trust on first use, said in one line). A server silent for --timeout seconds ends the attempt.
In Python, as in the original:

    from download import find_model
    state_dict = find_model("DiT-XL-2-256x256.pt")   # a released name downloads; a path loads
"""
import argparse

from tinyfusion.flags import positive_float
from tinyfusion.io.downloads import (DEFAULT_NAMES, DEFAULT_TIMEOUT, DOWNLOAD_FOLDER, RELEASED, SEARCH_FOLDERS, download,
                                  find_local, resolve_released)
from tinyfusion.errors import TinyFusionError, run_main

pretrained_models = set(DEFAULT_NAMES)  # the original's name for the released files


def find_model(name_or_path, no_ema=False):
    """The state dict of a released file name (found locally or downloaded) or of a checkpoint
    path: a training checkpoint gives its `ema` weights unless no_ema, then `model`."""
    from tinyfusion.io.checkpoints import load_state_dict
    state_dict, _ = load_state_dict(resolve_released(name_or_path), use_ema=not no_ema)
    return state_dict


def download_model(model_name):
    """The original's helper: the state dict of a released file, downloaded if needed."""
    if model_name not in RELEASED:
        raise TinyFusionError(f"{model_name} is not a released file; choose one of {', '.join(RELEASED)}")
    return find_model(model_name)


def main(args):
    names = args.names or list(DEFAULT_NAMES)
    unknown = [name for name in names if name not in RELEASED]
    if unknown:
        raise TinyFusionError(f"unknown released file {', '.join(unknown)}; choose from {', '.join(RELEASED)}")
    for name in names:
        existing = find_local(name, (args.folder,) + SEARCH_FOLDERS)
        if existing:
            print(f"{name}: already at {existing}")
            continue
        print(f"{name}: {RELEASED[name]['about']}")
        print(f"{name}: saved to {download(name, folder=args.folder, timeout=args.timeout)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"released files (default: {', '.join(DEFAULT_NAMES)}); any of {', '.join(RELEASED)}")
    parser.add_argument("--folder", default=DOWNLOAD_FOLDER, help="where downloads go (default: pretrained)")
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                        help=f"seconds without a byte from the server before giving up (default {DEFAULT_TIMEOUT:g})")
    run_main(main, parser.parse_args())

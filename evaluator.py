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
The metric maths lives in metrics.py.
"""
import argparse
import os
import warnings
import zipfile
from contextlib import contextmanager

from tinyfusion.flags import positive_int
from tinyfusion.errors import TinyFusionError, run_main

INCEPTION_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb"
INCEPTION_FILENAME = "classify_image_graph_def.pb"
INCEPTION_ENV = "TINYFUSION_INCEPTION"
POOL_TENSOR = "pool_3:0"             # (B, 1, 1, 2048) average pool
SPATIAL_TENSOR = "mixed_6/conv:0"    # (B, 17, 17, 768); sFID keeps the first 7 channels
SOFTMAX_MATMUL = "softmax/logits/MatMul"  # its second input is the 2048 x 1008 weight matrix
SFID_CHANNELS = 7
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
REF_CACHE_VERSION = 1


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

import numpy as np
import torch
from tqdm import tqdm

from tinyfusion.evaluation import metrics
from tinyfusion.io.atomic_files import atomic_path, atomic_write_json
from tinyfusion.io.downloads import file_sha256, resolve_released


# ----------------------------------------------------------------------------------------
# Reading .npz batches without loading 50k images at once
# ----------------------------------------------------------------------------------------

@contextmanager
def open_npz_array(path, key="arr_0"):
    """Yield (shape, dtype, read_batch) for one array of an .npz; read_batch(n) returns the
    next n rows (fewer at the end, None when done). Plain (uncompressed or deflated) .npy
    members are streamed from the zip; anything unusual falls back to np.load."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; pass an .npz written by sample_ddp.py or save_npz.py")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz archive; pack image folders with save_npz.py")
    with archive:
        member = f"{key}.npy"
        if member not in archive.namelist():
            keys = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
            raise ValueError(f"{path} has no '{key}' array (it holds {keys}); expected images in '{key}'")
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                fortran_order, dtype, shape = True, None, None
            if fortran_order or dtype is None or dtype.hasobject:
                array = np.load(path)[key]
                position = [0]

                def read_batch(count):
                    if position[0] >= len(array):
                        return None
                    batch = array[position[0]:position[0] + count]
                    position[0] += len(batch)
                    return batch

                yield array.shape, array.dtype, read_batch
                return

            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            remaining = [shape[0]]

            def read_batch(count):
                count = min(count, remaining[0])
                if count <= 0:
                    return None
                data = stream.read(count * row_bytes)
                while len(data) < count * row_bytes:  # zip streams may return short reads
                    more = stream.read(count * row_bytes - len(data))
                    if not more:
                        raise ValueError(f"{path}: '{key}' is truncated; re-create the .npz")
                    data += more
                remaining[0] -= count
                return np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])

            yield tuple(shape), dtype, read_batch


def iterate_image_batches(path, batch_size, key="arr_0"):
    """Yield float32 NHWC batches in [0, 255] of an .npz image array; first yields its length."""
    with open_npz_array(path, key) as (shape, dtype, read_batch):
        check_image_array(path, key, shape, dtype)
        yield shape[0]
        while True:
            batch = read_batch(batch_size)
            if batch is None:
                return
            yield batch.astype(np.float32)


def check_image_array(path, key, shape, dtype):
    """Only uint8 (N, H, W, 3) RGB images are a batch: a float [0, 1] or int16 array would be fed
    to the network as if in [0, 255] and give a plausible-looking but meaningless FID."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: '{key}' has shape {shape}, expected (N, H, W, 3) RGB images (NHWC)")
    if dtype != np.uint8:
        raise ValueError(f"{path}: '{key}' is {dtype}, expected uint8 images in [0, 255]; convert with "
                         f"np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for [0, 1] floats, or re-pack with save_npz.py")
    if shape[0] == 0:
        raise ValueError(f"{path}: '{key}' holds no images")


def check_batch_file(path, key="arr_0"):
    """Validate an .npz batch from its headers before any activation is computed: its images
    (check_image_array) and, if present, all four reference statistics with matching, finite
    shapes, and `labels` (one integer per image) when present. Returns the images' shape."""
    with open_npz_array(path, key) as (shape, dtype, _):
        check_image_array(path, key, shape, dtype)
    labels = read_npz_labels(path)
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (shape[0],)):
        raise ValueError(f"{path}: 'labels' is {labels.dtype} {labels.shape}, expected one integer class per image "
                         f"({shape[0]},)")
    stored = read_npz_statistics(path)
    if stored is not None:
        for mean_key, cov_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
            mean, cov = np.asarray(stored[mean_key]), np.asarray(stored[cov_key])
            if mean.ndim != 1 or cov.shape != (len(mean), len(mean)) or mean.dtype.kind != "f" or cov.dtype.kind != "f":
                raise ValueError(f"{path}: '{mean_key}' {mean.shape} {mean.dtype} / '{cov_key}' {cov.shape} {cov.dtype} "
                                 f"are not a float mean vector and its square covariance")
            if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
                raise ValueError(f"{path}: '{mean_key}' / '{cov_key}' hold NaN or inf")
    return tuple(shape)


def check_batches_match(ref_path, ref_shape, sample_path, sample_shape, allow_resolution_mismatch=False):
    """Refuse batches of different image sizes unless explicitly allowed: the feature network
    resizes both, so FID/sFID would compare resampling artefacts as much as models."""
    if tuple(ref_shape[1:3]) != tuple(sample_shape[1:3]) and not allow_resolution_mismatch:
        raise ValueError(f"{ref_path} holds {ref_shape[1]}x{ref_shape[2]} images but {sample_path} holds "
                         f"{sample_shape[1]}x{sample_shape[2]}: metrics across resolutions are not comparable; use "
                         f"the reference batch of the samples' resolution, or pass --allow-resolution-mismatch")


def _read_npz(path, read):
    """read(np.load(path)), any failure of a damaged archive named with the file."""
    try:
        with np.load(path) as data:
            return read(data)
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} cannot be read as an .npz ({type(error).__name__}: {error}); re-create it") from None


def read_npz_statistics(path):
    """mu, sigma, mu_s, sigma_s stored in an .npz (ADM reference batches), or None."""
    def read(data):
        present = [key for key in STATISTICS_KEYS if key in data.files]
        if not present:
            return None
        if len(present) != len(STATISTICS_KEYS):
            raise ValueError(f"{path} holds {present} but not all of {list(STATISTICS_KEYS)}; "
                             f"store all four statistics or none")
        return {key: data[key] for key in STATISTICS_KEYS}
    return _read_npz(path, read)


def read_npz_labels(path):
    return _read_npz(path, lambda data: data["labels"] if "labels" in data.files else None)


# ----------------------------------------------------------------------------------------
# Feature networks
# ----------------------------------------------------------------------------------------

def resolve_inception_path(inception_path=None, timeout=60.0):
    """--inception-path, else $TINYFUSION_INCEPTION (either must exist), else a local copy
    (./, pretrained/, pretrained_models/), else the graph downloaded into pretrained/."""
    path = inception_path or os.environ.get(INCEPTION_ENV)
    if path is None:
        try:
            return resolve_released(INCEPTION_FILENAME, timeout=timeout)
        except TinyFusionError as error:
            raise TinyFusionError(f"the Inception graph is not here and {error}; or pass --inception-path FILE, "
                                  f"or use --feature-net for small data") from None
    if not os.path.isfile(path):
        raise ValueError(
            f"Inception graph not found at {path}; download it once (about 95 MB) from {INCEPTION_URL} "
            f"and pass --inception-path FILE or set {INCEPTION_ENV}=FILE (without either it is looked up "
            f"in pretrained/ and downloaded there), or use --feature-net for small data")
    return path


class InceptionFeatures:
    """ADM's Inception-v3 graph in TF1 graph mode: pool_3 (2048), sFID features (17*17*7 = 2023)
    and logits = pool_3 @ W with W the weights of softmax/logits/MatMul (no bias)."""

    uses_npz_statistics = True  # ADM reference batches store Inception statistics

    def __init__(self, graph_path):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import tensorflow as tf  # lazy: only this backend needs TensorFlow
        except ImportError:
            raise ValueError("the Inception backend needs TensorFlow (pip install tensorflow-cpu); "
                             "or use --feature-net")
        tf1 = tf.compat.v1
        self.path = graph_path
        self.name = "inception"
        graph_def = tf1.GraphDef()
        with open(graph_path, "rb") as f:
            graph_def.ParseFromString(f.read())
        graph = tf1.Graph()
        with graph.as_default():
            # Feeding ExpandDims:0 skips the graph's JPEG decoder; the graph still resizes to
            # 299 and rescales to [-1, 1] itself. The batch dimension is free here; shapes
            # inferred from this placeholder replace the graph's batch-1 shapes, and outputs
            # are reshaped to (B, -1) below, so no op shapes need editing.
            self.images = tf1.placeholder(tf.float32, shape=[None, None, None, 3], name="tinyfusion_images")
            pool, spatial, matmul = tf1.import_graph_def(
                graph_def, input_map={"ExpandDims:0": self.images},
                return_elements=[POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL], name="inception")
            self.pool = pool
            self.spatial = spatial[..., :SFID_CHANNELS]
            softmax_weights = matmul.inputs[1]
        config = tf1.ConfigProto(allow_soft_placement=True)
        config.gpu_options.allow_growth = True
        self.session = tf1.Session(graph=graph, config=config)
        # A frozen constant: read it once and do the logits matmul in NumPy.
        self.softmax_weights = np.asarray(self.session.run(softmax_weights), dtype=np.float32)

    def fingerprint(self):
        return f"inception:{file_sha256(self.path)}"

    def __call__(self, images):
        pool, spatial = self.session.run([self.pool, self.spatial], {self.images: images})
        pool = pool.reshape(len(images), -1)
        return pool, spatial.reshape(len(images), -1), pool @ self.softmax_weights


class TorchScriptFeatures:
    """A TorchScript feature network: float32 NHWC images in [0, 255] -> (pool, spatial, logits)."""

    uses_npz_statistics = False  # stored mu/sigma in an .npz are Inception statistics

    def __init__(self, path, device=None):
        if not os.path.isfile(path):
            raise ValueError(f"feature network {path} does not exist; train one with "
                             f"tools/train_digits_classifier.py --out {path}")
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.device = torch.device(device) if device is not None else metrics._default_device()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the portable format
                self.module = torch.jit.load(path, map_location=self.device).eval()
        except RuntimeError as exc:
            raise ValueError(f"{path} is not a TorchScript module ({str(exc).splitlines()[0]}); "
                             f"export it with torch.jit.script(...).save(path)")

    def fingerprint(self):
        return f"torchscript:{file_sha256(self.path)}"

    @torch.no_grad()
    def __call__(self, images):
        outputs = self.module(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            raise ValueError(f"{self.path} must return a tuple (pool, spatial, logits)")
        arrays = []
        for name, tensor in zip(("pool", "spatial", "logits"), outputs):
            if tensor.ndim != 2 or tensor.shape[0] != len(images):
                raise ValueError(f"{self.path} returned {name} of shape {tuple(tensor.shape)}; "
                                 f"expected ({len(images)}, features)")
            arrays.append(tensor.float().cpu().numpy())
        return tuple(arrays)


def load_feature_network(feature_net=None, inception_path=None, device=None):
    if feature_net is not None:
        return TorchScriptFeatures(feature_net, device)
    return InceptionFeatures(resolve_inception_path(inception_path))


def compute_activations(network, npz_path, batch_size=64, desc="activations"):
    """(pool, spatial, logits) float32 arrays of every image in npz_path, in batches."""
    batches = iterate_image_batches(npz_path, batch_size)
    num_images = next(batches)
    pools, spatials, logits = [], [], []
    for batch in tqdm(batches, total=-(-num_images // batch_size), desc=desc):
        pool, spatial, logit = network(batch)
        if not (np.isfinite(pool).all() and np.isfinite(spatial).all() and np.isfinite(logit).all()):
            raise ValueError(f"{npz_path}: the feature network {network.path} gave NaN or inf features; "
                             f"check the network file")
        pools.append(pool)
        spatials.append(spatial)
        logits.append(logit)
    return np.concatenate(pools), np.concatenate(spatials), np.concatenate(logits)


# ----------------------------------------------------------------------------------------
# Reference statistics cache (opt-in sidecar next to the reference batch)
# ----------------------------------------------------------------------------------------

def ref_cache_path(ref_path, network):
    base = ref_path[:-4] if ref_path.endswith(".npz") else ref_path
    return f"{base}.{network.name}_ref_stats.npz"


def _ref_cache_key(ref_path, network):
    stat = os.stat(ref_path)
    return {"cache_version": np.int64(REF_CACHE_VERSION), "source_size": np.int64(stat.st_size),
            "source_mtime_ns": np.int64(stat.st_mtime_ns), "network": np.str_(network.fingerprint())}


def load_ref_cache(cache_path, key):
    """The cached arrays when cache_path exists and matches key, else None (stale or absent)."""
    if not os.path.exists(cache_path):
        return None
    with np.load(cache_path) as data:
        if "cache_version" not in data.files:
            raise ValueError(f"{cache_path} exists but is not a reference statistics cache; move it away")
        if any(k not in data.files or data[k] != v for k, v in key.items()):
            return None
        return {k: data[k] for k in ("pool_features", *STATISTICS_KEYS)}


def reference_activations(ref_path, network, batch_size=64, cache=False, log=print):
    """Reference pool features and statistics computed from its images (or its cache)."""
    if cache:
        cache_path = ref_cache_path(ref_path, network)
        key = _ref_cache_key(ref_path, network)
        cached = load_ref_cache(cache_path, key)
        if cached is not None:
            log(f"using cached reference activations {cache_path}")
            return cached
        if os.path.exists(cache_path):
            log(f"reference cache {cache_path} is stale (reference or network changed); recomputing")
    log("computing reference batch activations...")
    pool, spatial, _ = compute_activations(network, ref_path, batch_size, desc="reference")
    mu, sigma = metrics.compute_statistics(pool)
    mu_s, sigma_s = metrics.compute_statistics(spatial)
    result = {"pool_features": pool, "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if cache:
        try:
            # Replacing only our own stale cache (checked above); the reference file is never touched.
            with atomic_path(cache_path, overwrite=True) as tmp_path:
                np.savez(tmp_path, **result, **key)
            log(f"saved reference activations cache {cache_path}")
        except OSError as exc:
            log(f"warning: could not write reference cache {cache_path}: {exc}")
    return result


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

def evaluate(ref_batch, sample_batch, network, batch_size=64, cache_ref_stats=False,
             distance_dtype=torch.float32, fid_method="fast", device=None, log=print,
             allow_resolution_mismatch=False):
    """All metrics of sample_batch against ref_batch as a dict (floats). Both files are
    validated (each, and against each other) before any activation is computed."""
    check_batches_match(ref_batch, check_batch_file(ref_batch), sample_batch, check_batch_file(sample_batch),
                        allow_resolution_mismatch)
    ref = reference_activations(ref_batch, network, batch_size, cache_ref_stats, log)
    ref_stored = read_npz_statistics(ref_batch) if network.uses_npz_statistics else None
    check_statistics_fit(ref_batch, ref_stored, ref["pool_features"].shape[1], len(ref["mu_s"]))
    if ref_stored is not None:
        log(f"using mu/sigma stored in {ref_batch} for FID/sFID")
        ref.update(ref_stored)

    log("computing sample batch activations...")
    sample_pool, sample_spatial, sample_logits = compute_activations(network, sample_batch, batch_size, desc="samples")
    sample_stored = read_npz_statistics(sample_batch) if network.uses_npz_statistics else None
    check_statistics_fit(sample_batch, sample_stored, sample_pool.shape[1], sample_spatial.shape[1])
    if (sample_pool.shape[1], sample_spatial.shape[1]) != (len(ref["mu"]), len(ref["mu_s"])):
        raise ValueError(f"{sample_batch} gives {sample_pool.shape[1]} + {sample_spatial.shape[1]} features, "
                         f"{ref_batch} {len(ref['mu'])} + {len(ref['mu_s'])}: this feature network's output depends on "
                         f"the image size, so these batches cannot be compared")
    if sample_stored is not None:
        log(f"using mu/sigma stored in {sample_batch} for FID/sFID")
        mu, sigma, mu_s, sigma_s = (sample_stored[key] for key in STATISTICS_KEYS)
    else:
        mu, sigma = metrics.compute_statistics(sample_pool)
        mu_s, sigma_s = metrics.compute_statistics(sample_spatial)

    log("computing evaluations...")
    results = {
        "inception_score": metrics.inception_score_from_logits(sample_logits),
        "fid": metrics.frechet_distance(mu, sigma, ref["mu"], ref["sigma"], method=fid_method),
        "sfid": metrics.frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"], method=fid_method),
    }
    results["precision"], results["recall"] = metrics.precision_recall(
        ref["pool_features"], sample_pool, dtype=distance_dtype, device=device)
    labels = read_npz_labels(sample_batch)
    if labels is not None and not isinstance(network, InceptionFeatures):
        # Inception's 1008 outputs are not ImageNet class ids, so accuracy only for feature nets.
        results["classifier_accuracy"] = metrics.classifier_accuracy(sample_logits, labels)
    results.update(num_reference=int(len(ref["pool_features"])), num_samples=int(len(sample_pool)))
    return results


def check_statistics_fit(path, stored, pool_dim, spatial_dim):
    """Stored mu / mu_s must have the feature sizes of the network in use (a 2048-d Inception
    statistic against a 64-d feature net would otherwise fail deep in the maths)."""
    if stored is None:
        return
    for key, dim in (("mu", pool_dim), ("mu_s", spatial_dim)):
        if len(stored[key]) != dim:
            raise ValueError(f"{path}: stored '{key}' has {len(stored[key])} features, the feature network gives "
                             f"{dim}; stored statistics must come from the same network")


def samples_classifier_accuracy(sample_batch, feature_net, batch_size=64, device=None):
    """Share of images in sample_batch whose feature-net argmax equals their stored `labels`."""
    labels = read_npz_labels(sample_batch)
    if labels is None:
        raise ValueError(f"{sample_batch} has no 'labels' array; sample_ddp.py stores the class labels there")
    network = TorchScriptFeatures(feature_net, device)
    _, _, logits = compute_activations(network, sample_batch, batch_size, desc="classify")
    return metrics.classifier_accuracy(logits, labels)


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

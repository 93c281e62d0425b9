"""The feature networks of the ADM evaluator: ADM's Inception-v3 graph (TensorFlow, imported only
for it) or a TorchScript module for small data (tools/train_digits_classifier.py). Either maps a
float32 NHWC batch of RGB images in [0, 255] to (pool (B, D), spatial (B, S), logits (B, K)).
"""
import os
import warnings

import numpy as np
import torch

from tinyfusion.errors import TinyFusionError
from tinyfusion.evaluation import metrics
from tinyfusion.flags import INCEPTION_ENV, INCEPTION_FILENAME
from tinyfusion.io.downloads import file_sha256, resolve_released

INCEPTION_URL = f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/{INCEPTION_FILENAME}"
POOL_TENSOR = "pool_3:0"             # (B, 1, 1, 2048) average pool
SPATIAL_TENSOR = "mixed_6/conv:0"    # (B, 17, 17, 768); sFID keeps the first 7 channels
SOFTMAX_MATMUL = "softmax/logits/MatMul"  # its second input is the 2048 x 1008 weight matrix
SFID_CHANNELS = 7


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

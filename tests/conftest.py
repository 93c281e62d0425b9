import os
import sys

# tests import the top-level modules (models, diffusion, checkpoints, ...) like the scripts do
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@contextmanager
def torch_threads(count):
    """Run a block with `count` intra-op threads, then restore the previous setting. The tests'
    models are tiny: one thread beats OpenMP's fork/join (by 10x on a shared CPU), and torchrun
    gives each rank one thread, so in-process references match multi-rank runs bit for bit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    with torch_threads(1):
        yield

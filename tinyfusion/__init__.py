"""The TinyFusion library: everything the scripts at the repository root share.

The scripts (`train.py`, `prune_by_learning.py`, `sample_ddp.py`, ...) parse flags and call in
here; these modules take explicit arguments and raise exceptions. The model (`models.py`) and the
Gaussian diffusion (`diffusion/`) stay at the root under the names the original code uses.
"""

import os
import sys

# tests import the top-level modules (models, diffusion, checkpoints, ...) like the scripts do
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

"""`ruff check .` with pyproject.toml's rules finds nothing, so the README's test command sees what
CI's lint step sees. Skipped where ruff is not installed (it is pinned in requirements-dev.txt;
.ci/run installs it and also runs it on its own)."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ruff_command():
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if shutil.which("ruff"):
        return [shutil.which("ruff")]
    pytest.skip("ruff is not installed (pip install the ruff line of requirements-dev.txt)")


def test_ruff_finds_nothing():
    result = subprocess.run([*ruff_command(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]

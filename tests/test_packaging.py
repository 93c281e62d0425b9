"""pyproject.toml: the wheel holds the library (tinyfusion, diffusion, transport, models, download,
export_diffusers) and nothing else, and the README's imports work from another folder with only
that wheel on the path; every declared dependency is imported by the code."""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ["tinyfusion", "diffusion", "transport", "models.py", "download.py", "export_diffusers.py", "pyproject.toml", "README.md"]
IMPORT_NAMES = {"pillow": "PIL", "scikit-learn": "sklearn", "tensorflow-cpu": "tensorflow"}


def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def distribution(requirement):
    return requirement.split(">")[0].split("=")[0].split("<")[0].strip()


def imported_modules():
    """Top-level module names imported anywhere in the repository's Python files."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if "/.venv/" in path:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


def test_every_declared_dependency_is_imported_and_no_dead_pins():
    imported = imported_modules()
    meta = project()
    declared = [distribution(r) for r in meta["dependencies"]]
    declared += [distribution(r) for extra in meta["optional-dependencies"].values() for r in extra]
    for name in declared:
        assert IMPORT_NAMES.get(name, name) in imported, f"{name} is declared but nothing imports it"
    pinned = [distribution(line) for line in open(os.path.join(ROOT, "requirements.txt"))
              if line.strip() and not line.startswith("#")]
    assert "timm" not in pinned + declared and "timm" not in imported
    assert "peft" not in pinned and "peft" in [distribution(r) for r in meta["optional-dependencies"]["dev"]]
    # the user ranges cover the pinned versions CI tests
    assert set(distribution(r) for r in meta["dependencies"]) <= set(pinned)


@pytest.mark.slow  # builds a wheel and starts a Python on it: about 35 s on the 2-core CI machine
def test_wheel_holds_the_library_and_readme_imports_work_elsewhere(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the repository
    source.mkdir()
    for entry in LIBRARY:
        if os.path.isdir(os.path.join(ROOT, entry)):
            shutil.copytree(os.path.join(ROOT, entry), source / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(ROOT, entry), source / entry)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = glob.glob(str(tmp_path / "dist" / "tinyfusion-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tinyfusion", "diffusion", "transport", "models.py", "download.py", "export_diffusers.py"}
    assert "tinyfusion/io/downloads.py" in names and "diffusion/gaussian_diffusion.py" in names
    # every module of every package, sub-packages included (pyproject lists each package)
    modules = {os.path.relpath(path, ROOT) for package in ("tinyfusion", "diffusion", "transport")
               for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)}
    assert modules - set(names) == set()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    snippet = ("from models import DiT_models\nfrom download import find_model\nimport export_diffusers\n"
               "from tinyfusion.families.build import build_model\nfrom diffusion import create_diffusion\n"
               "import models, download, tinyfusion\n"
               "print(models.__file__, download.__file__, tinyfusion.__file__)\n"
               "model, _ = build_model('DiT-XS/4', 8, 10, 'none')\n"
               "print(type(model).__name__, model.depth, create_diffusion('10').num_timesteps)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    files, described = run.stdout.strip().splitlines()
    assert all(path.startswith(str(tmp_path / "site")) for path in files.split())  # not the repository's copies
    assert described == "DiT 12 10"


def python_minimum(specifier):
    """(major, minor) of the lower bound of a Requires-Python specifier such as ">=3.11" or "~=3.6"."""
    bounds = re.findall(r"(?:>=|~=|==)\s*(\d+)\.(\d+)", specifier or "")
    return max((int(major), int(minor)) for major, minor in bounds) if bounds else (0, 0)


def test_requires_python_is_the_newest_minimum_of_the_pinned_versions():
    """pyproject's requires-python is what the pins need (diffusers 0.42.1, numpy 2.4.6 ... declare
    >= 3.11): not lower, or pip on an older Python fails on a pin instead of on ours; not higher."""
    from importlib.metadata import PackageNotFoundError, metadata, version
    needed = {}
    for line in open(os.path.join(ROOT, "requirements.txt")):
        if line.strip() and not line.startswith("#"):
            name, pinned = line.strip().split("==")
            try:
                if version(name) == pinned:  # the pinned release is the installed one: its metadata is at hand
                    needed[name] = python_minimum(metadata(name).get("Requires-Python"))
            except PackageNotFoundError:
                continue
    assert "diffusers" in needed and "numpy" in needed, needed
    ours = python_minimum(project()["requires-python"])
    assert ours == max(needed.values()), (ours, needed)
    assert sys.version_info[:2] >= ours


def test_torchdiffeq_ships_with_the_requirements():
    """SiT's default ODE solver (dopri5) needs torchdiffeq: pinned, declared and installed."""
    pinned = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "requirements.txt"))
                  if line.strip() and not line.startswith("#"))
    assert "torchdiffeq" in pinned
    assert "torchdiffeq" in [distribution(r) for r in project()["dependencies"]]
    from importlib.metadata import version
    assert version("torchdiffeq") == pinned["torchdiffeq"]

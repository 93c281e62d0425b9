"""Run a script with stand-in architectures, for tests/test_readme.py:

    python tests/readme_standins.py SCRIPT.py ARGS...      (also as the torchrun entry point)

Every published DiT config and its SiT twin keeps its name, depth and gating pattern (DiT-XL/2
still has 28 blocks, DiT-D14/2 14, DiT-XL-1-2 its 14 [1, 2] gates) but gets hidden size 64 and 2
heads, so the README's commands run verbatim on a CPU in seconds. Nothing else of the script
changes.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN_WIDTH = (64, 2)  # (hidden size, heads) of every family except our own XS


def install_standins():
    sys.path.insert(0, ROOT)
    import models
    for family, (depth, _, _) in list(models.FAMILIES.items()):
        if family != "XS":
            models.FAMILIES[family] = (depth, *STANDIN_WIDTH)
    for name, build in list(models.DiT_models.items()):
        models.DiT_models[name] = models._config(build.family, build.patch_size, build.default_groups)
    for name, build in list(models.SiT_models.items()):
        models.SiT_models[name] = models._config(build.family, build.patch_size, build.default_groups, models.SiT)


if __name__ == "__main__":
    install_standins()
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(script)  # as if the script had been started directly
    runpy.run_path(script, run_name="__main__")

"""Run a script with stand-in architectures, for tests/test_readme.py:

    python tests/readme_standins.py SCRIPT.py ARGS...      (also as the torchrun entry point)

Every published DiT config and its SiT twin keeps its name, depth and gating pattern (DiT-XL/2
still has 28 blocks, DiT-D14/2 14, DiT-XL-1-2 its 14 [1, 2] gates) but gets hidden size 64, 2
heads and patch size 8 (a 256 px image, 32x32 SD-VAE latents, is 16 tokens instead of 256), so the
README's commands run verbatim, at the README's image size, on a CPU in seconds (sample_ddp.py's
250 steps included). The SD-VAE stand-in (a tiny AutoencoderKL under the SD-VAE's names) is
accepted in place of the published weights, whose hash it cannot have; tests/test_vae_errors.py
checks that refusal on its own. Nothing else of the script changes.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN_WIDTH = (64, 2)  # (hidden size, heads) of every family except our own XS
STANDIN_PATCH = 8


def install_standins():
    sys.path.insert(0, ROOT)
    import models
    for family, (depth, _, _) in list(models.FAMILIES.items()):
        if family != "XS":
            models.FAMILIES[family] = (depth, *STANDIN_WIDTH)
    for registry, model_class in ((models.DiT_models, models.DiT), (models.SiT_models, models.SiT)):
        for name, build in list(registry.items()):
            patch = build.patch_size if build.family == "XS" else STANDIN_PATCH
            registry[name] = models._config(build.family, patch, build.default_groups, model_class)
            models.ALL_MODELS[name] = registry[name]  # the registry build_model reads
    import tinyfusion.io.vae
    tinyfusion.io.vae.check_sd_vae_weights = lambda source: None  # the stand-in VAE is not the published one


if __name__ == "__main__":
    install_standins()
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(script)  # as if the script had been started directly
    runpy.run_path(script, run_name="__main__")

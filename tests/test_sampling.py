"""Tests for sampling.py, sample.py and sample_ddp.py.

The models are tiny DiTs whose weights make sampling well behaved (see `tame_dit`), so the
images are mostly inside [-1, 1] and a wrong bit shows up in the uint8 output instead of
disappearing in saturated pixels."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from tinyfusion.errors import TinyFusionError
import sample
import sample_ddp
from tinyfusion.io.checkpoints import save_pruned_model
from tinyfusion.sampling import part_store
from diffusion import create_diffusion, per_sample_noise_fn
from models import DiT_models
from tinyfusion.flags import resolve_timestep_spacing
from tinyfusion.families import default_checkpoint
from tinyfusion.families.dit import sampling_process
from tinyfusion.sampling.generate import generate, padded_rows, run_name, sample_generator, sample_labels, sample_seed
from training_helpers import ROOT, torchrun
from tinyfusion.io.vae import to_uint8_nhwc

STEPS = 5
NUM_CLASSES = 10
PIXEL_FLAGS = ["--model", "DiT-XS/4", "--image-size", "8", "--vae", "none", "--num-classes", str(NUM_CLASSES),
               "--num-sampling-steps", str(STEPS)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tame_dit(model_name="DiT-XS/4", input_size=8, in_channels=3, depth=2, seed=0):
    """A random DiT that predicts roughly the noise of data near 0: patch embedding with
    orthonormal zero-mean columns Q, the final Linear maps back with Q^T (so after the final
    LayerNorm eps_pred ~ x_t rescaled to unit RMS per patch), no position embedding, and small
    random adaLN weights so that time and label still change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, global RNG untouched
        torch.manual_seed(seed)
        model = DiT_models[model_name](input_size=input_size, in_channels=in_channels, num_classes=NUM_CLASSES,
                                       depth=depth).eval()
    hidden, patch, channels = model.hidden_size, model.patch_size, model.in_channels
    dim = channels * patch * patch
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("blocks.") and "adaLN_modulation" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
        columns = torch.randn(hidden, dim, generator=generator)
        q, _ = torch.linalg.qr(columns - columns.mean(0, keepdim=True))  # zero-mean: LayerNorm keeps the scale
        model.x_embedder.proj.weight.copy_(q.reshape(hidden, channels, patch, patch))
        model.x_embedder.proj.bias.zero_()
        model.pos_embed.zero_()
        out = torch.zeros(patch * patch * model.out_channels, hidden)
        for c in range(channels):  # unpatchify reads rows in (row, col, channel) order; the conv is (channel, row, col)
            for i in range(patch):
                for j in range(patch):
                    out[(i * patch + j) * model.out_channels + c] = q[:, (c * patch + i) * patch + j] * (dim / hidden) ** 0.5
        model.final_layer.linear.weight.copy_(out)
        model.final_layer.linear.bias.zero_()
    return model


def save_tame_checkpoint(path, **kwargs):
    model = tame_dit(**kwargs)
    save_pruned_model(model, path, {"kept_indices": list(range(model.depth)), "method": "test"})
    return str(path)


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    return save_tame_checkpoint(tmp_path_factory.mktemp("ckpt") / "tame-xs4.pt")


def seeded(indices, seed=0):
    return [sample_generator(seed, i) for i in indices]


def ddp_main(*flags):
    return sample_ddp.main(sample_ddp.parse_args([*PIXEL_FLAGS, *flags]))


def load_npz(path):
    with np.load(path) as data:
        return data["arr_0"], data["labels"]


# ----------------------------------------------------------------------- sampling.py
def test_run_name_follows_the_original():
    assert run_name("DiT-XL/2", None, 256, "ema", 1.5, 0) == "DiT-XL-2-pretrained-size-256-vae-ema-cfg-1.5-seed-0"
    assert run_name("DiT-D14/2", "outputs/D14-Learned-Finetuning/checkpoints/0500000.pt", 256, "mse", 1.0, 3) == \
        "DiT-D14-2-0500000-size-256-vae-mse-cfg-1.0-seed-3"
    # settings the original lacked only appear when they differ from its fixed behaviour
    assert run_name("DiT-XS/4", "a/b.pt", 8, "none", 1.5, 0, 50, "ddim", "bf16") == \
        "DiT-XS-4-b-size-8-vae-none-cfg-1.5-seed-0-steps-50-ddim-bf16"


def test_missing_checkpoint_is_one_clear_error(tmp_path, monkeypatch):
    import socket
    from tinyfusion.errors import TinyFusionError
    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:  # a port nothing listens on: the download fails at once, as offline
        probe.bind(("127.0.0.1", 0))
        offline = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("TINYFUSION_DOWNLOAD_URL", offline)
    with pytest.raises(TinyFusionError, match=f"cannot download DiT-XL-2-512x512.pt from {offline}/DiT-XL-2-512x512.pt"):
        default_checkpoint("DiT-XL/2", 512)
    with pytest.raises(TinyFusionError, match="--ckpt is required for --model DiT-D14/2"):
        default_checkpoint("DiT-D14/2", 256)
    # the original downloads into pretrained_models/: a copy there is used as it would be
    os.makedirs("pretrained_models")
    open("pretrained_models/DiT-XL-2-256x256.pt", "wb").close()
    assert default_checkpoint("DiT-XL/2", 256) == os.path.join("pretrained_models", "DiT-XL-2-256x256.pt")
    # both scripts fail before building anything
    with pytest.raises(TinyFusionError, match=f"wget -c {offline}/DiT-XL-2-512x512.pt -P pretrained"):
        sample.main(sample.parse_args(["--image-size", "512"]))
    with pytest.raises(TinyFusionError, match="--ckpt is required"):
        ddp_main("--sample-dir", str(tmp_path / "samples"))
    assert not os.path.exists(tmp_path / "samples")


def test_per_sample_seeds_and_labels():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(s, i, k) for s in range(3) for i in range(50) for k in range(2)}) == 300
    labels = sample_labels(7, range(200), NUM_CLASSES)
    assert labels.dtype == torch.long and labels.min() >= 0 and labels.max() < NUM_CLASSES
    assert len(set(labels.tolist())) == NUM_CLASSES  # all classes show up in 200 draws
    assert sample_labels(7, [123], NUM_CLASSES).item() == labels[123].item()
    assert [padded_rows(n, pad) for n, pad in [(1, 0), (4, 0), (5, 0), (3, 6), (9, 2)]] == [4, 4, 8, 8, 12]


@pytest.mark.parametrize("sampler, eta, cfg_scale", [("ddpm", 0.0, 1.5), ("ddim", 1.0, 1.0), ("unipc", 0.0, 1.5)])
def test_images_do_not_depend_on_batch_composition(sampler, eta, cfg_scale):
    """Bit-exact where it holds by construction: every run below computes an 8-row batch (padded),
    so each sample goes through kernels of the same shape whatever else shares its batch and
    wherever it sits in it (this is the sample_ddp case: a fixed --per-proc-batch-size on any
    number of ranks). A fast solver's multistep history is per batch, and per row within it."""
    model = tame_dit()
    diffusion = sampling_process(sampler, STEPS, resolve_timestep_spacing(sampler, None))
    labels = sample_labels(0, range(6), NUM_CLASSES)

    def run(indices, pad_to=8):
        return generate(model, diffusion, labels[indices], seeded(indices), cfg_scale, sampler, eta, pad_to=pad_to)

    together = run(list(range(6)))
    in_halves = torch.cat([run([0, 1, 2]), run([3, 4, 5])])
    reversed_order = run([5, 4, 3, 2, 1, 0]).flip(0)
    assert torch.equal(together, in_halves) and torch.equal(together, reversed_order)
    # not a degenerate all-zero or exploded output (the ODE solvers' sigma = 0 endpoint of this tame model is
    # larger than DDPM's: median 2.7)
    assert 0.1 < together.abs().median() < (2 if sampler in ("ddpm", "ddim") else 5)
    assert not torch.equal(together[0], together[1])


@pytest.mark.parametrize("sampler, eta, cfg_scale", [("ddpm", 0.0, 1.5), ("ddim", 1.0, 1.0)])
def test_other_batch_sizes_agree_to_float_rounding(sampler, eta, cfg_scale):
    """Different batch shapes (4, 8, 12 rows) may pick different GEMM kernels, which round
    differently on different CPUs (AVX2 vs AVX-512): the same samples then agree to float
    rounding, amplified a little by guidance over the steps, not bit for bit."""
    model = tame_dit()
    diffusion = create_diffusion(str(STEPS))
    labels = sample_labels(0, range(6), NUM_CLASSES)

    def run(indices, pad_to):
        return generate(model, diffusion, labels[indices], seeded(indices), cfg_scale, sampler, eta, pad_to=pad_to)

    together = run(list(range(6)), pad_to=0)  # 8 rows
    in_halves = torch.cat([run([0, 1, 2], pad_to=0), run([3, 4, 5], pad_to=0)])  # 4 rows each
    wider = run(list(range(6)), pad_to=12)
    torch.testing.assert_close(in_halves, together, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wider, together, rtol=1e-4, atol=1e-4)
    # the other samples' noise does matter: a different seed for sample 1 changes it, not sample 0
    other = generate(model, diffusion, labels[[0, 1]], [sample_generator(0, 0), sample_generator(1, 1)], cfg_scale,
                     sampler, eta, pad_to=8)
    assert torch.equal(other[0], run([0, 1], pad_to=8)[0]) and (other[1] - together[1]).abs().max() > 1e-2


def reference_loop(model, labels, seed, cfg_scale, steps=STEPS):
    """DDPM through the diffusion package's own loop and per-sample noise helper, with
    classifier-free guidance computed by hand: one model call on [x; x] with labels [y; null]
    (the same batch shape as generate's, so the two agree to rounding on any CPU) whose halves
    are combined here, the first 3 channels guided."""
    diffusion = create_diffusion(str(steps))
    shape = (len(labels), model.in_channels, model.input_size, model.input_size)
    generators = seeded(range(len(labels)), seed)
    x_start = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])  # x_T is each stream's first draw
    null = torch.full_like(labels, NUM_CLASSES)

    def guided(x, t, y):
        if cfg_scale == 1.0:  # no guidance: the plain conditional model
            return model(x, t, y)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both[: len(x)], both[len(x):]
        eps = uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3])
        return torch.cat([eps, cond[:, 3:]], dim=1)

    with torch.no_grad():
        return diffusion.p_sample_loop(guided, shape, noise=x_start, clip_denoised=False, model_kwargs=dict(y=labels),
                                       noise_fn=per_sample_noise_fn(generators))


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_generate_matches_an_independent_guided_loop(cfg_scale):
    model = tame_dit(model_name="DiT-XS/2", input_size=4, in_channels=4)  # 4 channels: the 4th is not guided
    labels = torch.tensor([3, 1, 4, 1])
    ours = generate(model, create_diffusion(str(STEPS)), labels, seeded(range(4), seed=9), cfg_scale)
    expected = reference_loop(model, labels, seed=9, cfg_scale=cfg_scale)
    # the model sees the same 8-row batches (4 rows without guidance) in both; the DDPM update
    # runs on 8 vs 4 rows, whose vectorised exp/log may differ in the last bit
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_cfg_one_is_one_plain_forward_per_step():
    model = tame_dit()
    calls, forward = [], model.forward

    def counting_forward(x, t, y, **kwargs):  # forward_with_cfg calls self.forward, so hooks would miss it
        calls.append(y.clone())
        return forward(x, t, y, **kwargs)
    model.forward = counting_forward
    diffusion = create_diffusion(str(STEPS))
    labels = torch.tensor([2, 7, 7])
    generate(model, diffusion, labels, seeded(range(3)), cfg_scale=1.0)
    assert len(calls) == STEPS and all(y.tolist() == [2, 7, 7, 0] for y in calls)  # one padding row
    calls.clear()
    generate(model, diffusion, labels, seeded(range(3)), cfg_scale=1.5)
    assert len(calls) == STEPS and all(y.tolist() == [2, 7, 7, 0] + [NUM_CLASSES] * 4 for y in calls)


class StopAtGenerate(Exception):
    pass


def stop_at_generate(monkeypatch, script):
    """Make `script.generate` record its keyword arguments and stop the run: ({} filled on the
    call, the exception to expect)."""
    seen = {}

    def recording_generate(*args, **kwargs):
        seen.update(kwargs)
        raise StopAtGenerate
    monkeypatch.setattr(script, "generate", recording_generate)
    return seen, StopAtGenerate


def test_guide_all_channels_flag_reaches_generation_and_is_part_of_the_sample_identity(tmp_path, monkeypatch):
    from tiny_vae import make_tiny_vae
    vae_dir = make_tiny_vae(str(tmp_path / "vae"))
    ckpt = save_tame_checkpoint(tmp_path / "latent.pt", model_name="DiT-XS/2", input_size=4, in_channels=4)
    seen, Stop = stop_at_generate(monkeypatch, sample)
    for extra, expected in (([], False), (["--guide-all-channels"], True)):  # the original guides 3 channels
        with pytest.raises(Stop):
            sample.main(sample.parse_args(["--model", "DiT-XS/2", "--image-size", "32", "--vae", "ema",
                                           "--vae-path", vae_dir, "--num-classes", "10", "--ckpt", ckpt,
                                           "--num-sampling-steps", str(STEPS), "--class-labels", "1",
                                           "--out", str(tmp_path / "grid.png"), "--per-sample-seeds", *extra]))
        assert seen["guide_all_channels"] is expected
    assert "guide_all_channels" in part_store.IDENTITY_KEYS  # other images: a resume must not mix them


# ----------------------------------------------------------------------- sample_ddp.py
def test_part_files_and_streamed_npz(tmp_path):
    parts = str(tmp_path / "parts")
    os.makedirs(parts)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    for indices in ([4, 5, 6], [0, 2], [1, 3]):  # out of order and interleaved, as after a resume
        part_store.write_part(parts, indices, [10 * i for i in indices], images[indices])
    np.save(os.path.join(parts, "00000100.npy"), images[:2])  # killed before its json: not finished
    with open(os.path.join(parts, "00000200.json"), "w") as f:  # json of a cut-off images file
        json.dump({"indices": [7, 8], "labels": [0, 0]}, f)
    with open(os.path.join(parts, "00000200.npy"), "wb") as f:
        f.write(b"\x93NUMPY")
    finished = part_store.read_parts(parts, (8, 8, 3))
    assert sorted(finished) == list(range(7))
    out = str(tmp_path / "out.npz")
    part_store.write_npz(out, finished, 7, (8, 8, 3), chunk=3)
    arr, labels = load_npz(out)
    assert arr.dtype == np.uint8 and np.array_equal(arr, images) and labels.tolist() == [0, 10, 20, 30, 40, 50, 60]
    with pytest.raises(FileExistsError):
        part_store.write_npz(out, finished, 7, (8, 8, 3))


def test_sample_ddp_balanced_labels(tmp_path, pixel_ckpt):
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", "12", "--per-proc-batch-size", "5",
             "--sample-dir", str(tmp_path), "--balanced-labels")
    (final,) = glob.glob(os.path.join(str(tmp_path), "*.npz"))
    assert final.endswith(f"-steps-{STEPS}-balanced.npz")  # never mistaken for a random-label run
    assert load_npz(final)[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_sample_ddp_npz_resume_and_no_silent_overwrite(tmp_path, pixel_ckpt):
    num = 10
    reference_dir = str(tmp_path / "reference")
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--per-proc-batch-size", "4",
             "--sample-dir", reference_dir)
    (final,) = glob.glob(os.path.join(reference_dir, "*.npz"))
    assert os.path.basename(final) == f"DiT-XS-4-tame-xs4-size-8-vae-none-cfg-1.5-seed-0-steps-{STEPS}.npz"
    arr, labels = load_npz(final)
    assert arr.shape == (num, 8, 8, 3) and arr.dtype == np.uint8
    assert labels.tolist() == sample_labels(0, range(num), NUM_CLASSES).tolist()
    assert ((arr > 0) & (arr < 255)).mean() > 0.3  # mostly unsaturated: the comparisons below mean something
    run_dir = final[: -len(".npz")]
    assert not os.path.exists(os.path.join(run_dir, "parts"))  # the .npz holds everything
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert records[-1]["rank0_images"] == num and records[-1]["rank0_images_per_sec"] > 0

    # a finished run is never overwritten; --resume on it does nothing
    before = os.stat(final).st_mtime_ns
    with pytest.raises(TinyFusionError, match="already exists"):
        ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--sample-dir", reference_dir)
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--sample-dir", reference_dir, "--resume")
    assert os.stat(final).st_mtime_ns == before

    # an interrupted run: the final file and two parts are missing, one part lost its json
    other_dir = str(tmp_path / "interrupted")
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--per-proc-batch-size", "3",
             "--sample-dir", other_dir, "--keep-parts")
    other_final = glob.glob(os.path.join(other_dir, "*.npz"))[0]
    os.remove(other_final)
    part_files = sorted(glob.glob(os.path.join(other_final[:-4], "parts", "*.json")))
    os.remove(part_files[1])
    os.remove(part_files[3].replace(".json", ".npy"))
    with pytest.raises(TinyFusionError, match="pass --resume"):
        ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--sample-dir", other_dir)
    with pytest.raises(TinyFusionError, match="no_ema False -> True"):  # other weights, other images: never mixed
        ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--sample-dir", other_dir, "--resume", "--no-ema")
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", str(num), "--per-proc-batch-size", "2",
             "--sample-dir", other_dir, "--resume")
    resumed, resumed_labels = load_npz(other_final)
    assert np.array_equal(resumed, arr) and np.array_equal(resumed_labels, labels)


def test_runs_recorded_before_compile_was_an_identity_key_still_match(tmp_path):
    """A settings.json without "compile" was made uncompiled: it matches --compile off and not on."""
    settings = {key: f"value of {key}" for key in part_store.IDENTITY_KEYS}
    recorded = {key: value for key, value in settings.items() if key != "compile"}
    with open(tmp_path / "settings.json", "w") as f:
        json.dump(recorded, f)
    assert part_store.settings_mismatch(str(tmp_path), {**settings, "compile": False}) is None
    assert "compile False -> True" in part_store.settings_mismatch(str(tmp_path), {**settings, "compile": True})


@pytest.mark.slow
def test_sample_ddp_compiled_matches_eager_and_is_not_mixed_with_it(tmp_path, pixel_ckpt):
    """--compile (inductor): the same images up to rounding (uint8 values within 1), a separate
    identity: resuming an eager run with --compile is refused."""
    eager_dir, compiled_dir = str(tmp_path / "eager"), str(tmp_path / "compiled")
    common = ("--ckpt", pixel_ckpt, "--num-fid-samples", "6", "--per-proc-batch-size", "4")
    ddp_main(*common, "--sample-dir", eager_dir, "--keep-parts")
    ddp_main(*common, "--sample-dir", compiled_dir, "--compile")
    (eager,), (compiled,) = glob.glob(os.path.join(eager_dir, "*.npz")), glob.glob(os.path.join(compiled_dir, "*.npz"))
    eager_images, compiled_images = load_npz(eager)[0].astype(int), load_npz(compiled)[0].astype(int)
    assert np.abs(eager_images - compiled_images).max() <= 1 and (eager_images == compiled_images).mean() > 0.99
    os.remove(eager)
    with pytest.raises(TinyFusionError, match="compile False -> True"):
        ddp_main(*common, "--sample-dir", eager_dir, "--resume", "--compile")


def test_sample_ddp_two_ranks_match_one(tmp_path, pixel_ckpt):
    """Acceptance: 2 gloo ranks x 3 per process give the same arr_0 as 1 rank x 4."""
    common = [*PIXEL_FLAGS, "--ckpt", pixel_ckpt, "--num-fid-samples", "9"]
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", "9", "--per-proc-batch-size", "4",
             "--sample-dir", str(tmp_path / "one"))
    result = torchrun("sample_ddp.py", [*common, "--per-proc-batch-size", "3", "--sample-dir", str(tmp_path / "two"),
                                        "--save-png"])
    assert result.returncode == 0, result.stderr[-3000:]
    one, one_labels = load_npz(glob.glob(str(tmp_path / "one" / "*.npz"))[0])
    (two_path,) = glob.glob(str(tmp_path / "two" / "*.npz"))
    two, two_labels = load_npz(two_path)
    assert np.array_equal(one, two) and np.array_equal(one_labels, two_labels)
    # --save-png writes the same pixels as {index:06d}.png (the original layout, readable by save_npz.py)
    pngs = sorted(glob.glob(os.path.join(two_path[:-4], "*.png")))
    assert [os.path.basename(p) for p in pngs] == [f"{i:06d}.png" for i in range(9)]
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), one)


# ----------------------------------------------------------------------- sample.py
def original_sample_png(model, labels, seed, cfg_scale, steps, path):
    """The original DiT sample.py, written out from its formulas: one torch.manual_seed, z for
    the whole grid, [z; z] with the null label, p_sample_loop over forward_with_cfg in fp32, the
    first half, save_image(nrow=4, normalize=True, value_range=(-1, 1)). Pixel space: no VAE."""
    from torchvision.utils import save_image
    diffusion = create_diffusion(str(steps))
    torch.manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, model.in_channels, model.input_size, model.input_size)
    y = torch.tensor(labels)
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([model.num_classes] * n)], 0)
    with torch.no_grad():
        samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                          model_kwargs=dict(y=y, cfg_scale=cfg_scale), progress=True)
    samples, _ = samples.chunk(2, dim=0)
    save_image(samples, path, nrow=4, normalize=True, value_range=(-1, 1))


def test_sample_py_writes_the_png_of_the_original_procedure(tmp_path, pixel_ckpt):
    labels = [3, 1, 4, 1, 5, 9]
    out, reference = tmp_path / "sample.png", tmp_path / "original.png"
    sample.main(sample.parse_args([*PIXEL_FLAGS, "--ckpt", pixel_ckpt, "--seed", "5464", "--class-labels",
                                   *map(str, labels), "--out", str(out)]))
    model = tame_dit()  # the weights saved in pixel_ckpt, built independently of sample.py
    original_sample_png(model, labels, seed=5464, cfg_scale=4.0, steps=STEPS, path=str(reference))
    assert out.read_bytes() == reference.read_bytes()  # bit for bit on the CPU
    assert len(np.unique(np.asarray(Image.open(reference)))) > 50  # a real image, not a constant
    # per-sample seeds are another procedure (another image)
    sample.main(sample.parse_args([*PIXEL_FLAGS, "--ckpt", pixel_ckpt, "--seed", "5464", "--class-labels",
                                   *map(str, labels), "--out", str(out), "--per-sample-seeds"]))
    assert out.read_bytes() != reference.read_bytes()
    assert sample.parse_args([]).precision == "fp32" and not sample.parse_args([]).per_sample_seeds


def test_sample_py_grid_with_a_latent_model(tmp_path):
    from tiny_vae import make_tiny_vae
    vae_dir = make_tiny_vae(str(tmp_path / "vae"))
    ckpt = save_tame_checkpoint(tmp_path / "latent.pt", model_name="DiT-XS/2", input_size=4, in_channels=4)
    out = str(tmp_path / "grid.png")
    labels = [3, 1, 4, 1, 5]
    sample.main(sample.parse_args(["--model", "DiT-XS/2", "--image-size", "32", "--vae", "ema", "--vae-path", vae_dir,
                                   "--num-classes", "10", "--ckpt", ckpt, "--num-sampling-steps", str(STEPS),
                                   "--seed", "5", "--class-labels", *map(str, labels), "--out", out,
                                   "--per-sample-seeds"]))
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 3)  # torchvision grid: 4 columns, 2-pixel padding
    # the tiles are the images of seeds (5, i), decoded by the VAE: same pixels as sample_ddp's uint8 conversion
    from tinyfusion.families.build import build_model
    from tinyfusion.io.vae import load_vae
    model, _ = build_model("DiT-XS/2", 32, 10, "ema", vae_dir, ckpt=ckpt)
    images = generate(model.eval(), create_diffusion(str(STEPS)), labels, seeded(range(5), seed=5), 4.0,
                      vae=load_vae("ema", vae_dir))
    expected = to_uint8_nhwc(images).numpy().astype(int)
    for i in range(5):
        row, col = divmod(i, 4)
        tile = grid[2 + 34 * row: 34 + 34 * row, 2 + 34 * col: 34 + 34 * col].astype(int)
        assert np.abs(tile - expected[i]).max() <= 1 and (tile == expected[i]).mean() > 0.99
    assert grid[2 + 34: 34 + 34, 2 + 34: 34 + 34].max() == 0  # tile 6 is empty padding
    assert len(np.unique(expected)) > 50


@pytest.mark.slow
def test_sample_ddp_killed_and_resumed_gives_the_same_file(tmp_path, pixel_ckpt):
    """A real SIGKILL in the middle of a run, then --resume on 2 ranks with another batch size."""
    num, flags = 48, [*PIXEL_FLAGS, "--ckpt", pixel_ckpt, "--num-sampling-steps", "20"]
    ddp_main("--ckpt", pixel_ckpt, "--num-sampling-steps", "20", "--num-fid-samples", str(num),
             "--per-proc-batch-size", "8", "--sample-dir", str(tmp_path / "reference"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, os.path.join(ROOT, "sample_ddp.py"), *flags, "--num-fid-samples", str(num),
               "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "killed")]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(glob.glob(str(tmp_path / "killed" / "*" / "parts" / "*.json"))) < 3 and time.time() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not glob.glob(str(tmp_path / "killed" / "*.npz"))
    result = torchrun("sample_ddp.py", [*flags, "--num-fid-samples", str(num), "--per-proc-batch-size", "5",
                                        "--sample-dir", str(tmp_path / "killed"), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samples already done" in result.stdout
    reference = load_npz(glob.glob(str(tmp_path / "reference" / "*.npz"))[0])
    resumed = load_npz(glob.glob(str(tmp_path / "killed" / "*.npz"))[0])
    assert np.array_equal(reference[0], resumed[0]) and np.array_equal(reference[1], resumed[1])


@pytest.mark.slow
def test_sample_ddp_latent_model_two_ranks_match_one(tmp_path):
    """The VAE decoder's kernels also depend on the batch size: with padding, 2 ranks x 3 still
    give the images of 1 rank x 4."""
    from tiny_vae import make_tiny_vae
    vae_dir = make_tiny_vae(str(tmp_path / "vae"))
    ckpt = save_tame_checkpoint(tmp_path / "latent.pt", model_name="DiT-XS/2", input_size=4, in_channels=4)
    flags = ["--model", "DiT-XS/2", "--image-size", "32", "--vae", "ema", "--vae-path", vae_dir, "--num-classes",
             str(NUM_CLASSES), "--num-sampling-steps", str(STEPS), "--ckpt", ckpt, "--num-fid-samples", "7"]
    sample_ddp.main(sample_ddp.parse_args([*flags, "--per-proc-batch-size", "4", "--sample-dir", str(tmp_path / "one")]))
    result = torchrun("sample_ddp.py", [*flags, "--per-proc-batch-size", "3", "--sample-dir", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    one = load_npz(glob.glob(str(tmp_path / "one" / "*.npz"))[0])
    two = load_npz(glob.glob(str(tmp_path / "two" / "*.npz"))[0])
    assert one[0].shape == (7, 32, 32, 3) and len(np.unique(one[0])) > 50
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_compile_on_an_avx512_cpu_generates_avx2_kernels(monkeypatch):
    """--compile on CPU: inductor's AVX-512 code is avoided (reported heap corruption, see
    tinyfusion/sampling/cpu_compile.py); the decision follows the ISA inductor would pick, said in one line."""
    from torch._inductor import cpu_vec_isa
    from tinyfusion.sampling import cpu_compile
    said = []
    monkeypatch.setattr(cpu_compile, "_announced", set())
    for isa, expected in ((cpu_vec_isa.VecAVX512(), {"cpp.simdlen": 256}), (cpu_vec_isa.VecAVX2(), {})):
        monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda isa=isa: isa)
        assert cpu_compile.compile_options("cpu", said.append) == expected
        assert cpu_compile.compile_options("cuda", said.append) == {}
    assert len(said) == 1 and "compiled kernels use AVX2" in said[0]
    # the options reach torch.compile, and inductor then picks AVX2 (or nothing narrower than the CPU has)
    import torch._inductor.config as inductor_config
    monkeypatch.undo()
    with inductor_config.patch(cpu_compile.compile_options("cpu", said.append) or {}):
        assert "avx512" not in str(cpu_vec_isa.pick_vec_isa())
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    monkeypatch.setattr(cpu_compile, "compile_options", lambda device, log=print: {"cpp.simdlen": 256})
    from tinyfusion.sampling.generate import compile_forward
    compile_forward(tame_dit())
    assert calls == [{"options": {"cpp.simdlen": 256}}]

"""Image generation shared by sample.py and sample_ddp.py.

Sample i is a function of (seed, i) alone: its class label, its initial noise x_T and every
per-step DDPM/DDIM noise draw come from generators seeded by (seed, i), drawn on the CPU and
moved to the device. So the images do not depend on the batch they are generated in, on the
number of ranks, or on where an interrupted run resumed.

The rows of a batch do not interact in a DiT or the VAE, but the BLAS/conv kernels that compute
them are chosen by the batch shape, and different kernels round differently (and differently
again on AVX2 and AVX-512 CPUs). `generate` therefore pads every batch to `pad_to` rows rounded up
to a multiple of ROW_MULTIPLE: with a fixed per-process batch every sample goes through kernels of
the same shape whatever else shares its batch, so the images are bit-identical on any number of
ranks and after a resume. Runs with a different batch size give the same images to float
rounding (about 1e-5 here), not bit for bit.
"""
import os

import numpy as np
import torch

from tinyfusion.families import entry_named, family_class
from tinyfusion.flags import autocast, resolve_timestep_spacing
from tinyfusion.io.vae import decode

ROW_MULTIPLE = 4
NOISE_STREAM, LABEL_STREAM = 0, 1  # independent random streams of one sample


# ----------------------------------------------------------------------- per-sample seeds
def sample_seed(global_seed, index, stream=NOISE_STREAM):
    """A 63-bit seed for sample `index` of a run seeded with `global_seed`. SeedSequence hashes
    the tuple, so neighbouring (seed, index) pairs give unrelated streams."""
    if global_seed < 0 or index < 0:
        raise ValueError(f"seeds and sample indices must be >= 0, got seed {global_seed} index {index}")
    low, high = np.random.SeedSequence([global_seed, index, stream]).generate_state(2, dtype=np.uint32)
    return int((int(high) << 32 | int(low)) & (2 ** 63 - 1))


def sample_generator(global_seed, index, stream=NOISE_STREAM):
    """CPU generator of sample `index` (noise is drawn on the CPU so a GPU run draws the same)."""
    return torch.Generator(device="cpu").manual_seed(sample_seed(global_seed, index, stream))


def sample_labels(global_seed, indices, num_classes):
    """Random class labels, the one of sample i drawn from its own label stream (sample_ddp)."""
    labels = [torch.randint(num_classes, (1,), generator=sample_generator(global_seed, int(i), LABEL_STREAM))
              for i in indices]
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


def balanced_labels(indices, num_classes):
    """Labels i mod num_classes (ours, sample_ddp --balanced-labels): every class equally often
    over any num_classes consecutive samples, so FID against a class-balanced reference does
    not move with the label draw."""
    return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)


def draw_rows(generators, row_shape, pad_rows=0):
    """(len(generators) + pad_rows, *row_shape) float32 CPU tensor: row i from generators[i],
    padding rows zero (they are thrown away)."""
    rows = [torch.randn(row_shape, generator=g) for g in generators]
    rows += [torch.zeros(row_shape)] * pad_rows
    return torch.stack(rows)


def padded_rows(rows, pad_to=0):
    """Rows a batch of `rows` samples is computed with: at least pad_to, a multiple of ROW_MULTIPLE."""
    target = max(rows, pad_to)
    return -(-target // ROW_MULTIPLE) * ROW_MULTIPLE


# ----------------------------------------------------------------------- generation
def compile_forward(model, log=print):
    """torch.compile the model's forward in place (sample.py / sample_ddp.py --compile): both
    model(x, t, y) and forward_with_cfg go through it. Sampling calls it with one batch shape and a
    new timestep tensor per step, so it compiles once per run (a last, smaller batch adds one).
    On an AVX-512 CPU the kernels are AVX2 ones (tinyfusion.sampling.cpu_compile)."""
    from tinyfusion.sampling.cpu_compile import compile_options
    model.forward = torch.compile(model.forward, options=compile_options(next(model.parameters()).device, log))
    return model


@torch.no_grad()
def generate(model, diffusion, labels, generators, cfg_scale=1.0, sampler="ddpm", eta=0.0, vae=None,
             amp_dtype=torch.float32, pad_to=0, progress=False, guide_all_channels=False, flow_options=None):
    """Sample one image per label and return them decoded: float (B, 3, H, W) in about [-1, 1]
    on the model's device (clamp / convert with vae.to_uint8_nhwc).

    generators[i] (one per label, e.g. sample_generator(seed, i)) draws x_T of row i and then
    its noise of every step. cfg_scale > 1 runs model.forward_with_cfg on [x; x] with labels
    [y; null class]; cfg_scale == 1 is the plain conditional model, one forward per step.
    clip_denoised=False as in DiT. The batch is padded to padded_rows(len(labels), pad_to)
    rows (see the module docstring); padding rows are dropped from the result.
    `diffusion` is the model family's sampling process for `sampler` (its sampling_process: a DiT's
    respaced diffusion or fast solver, a SiT's transport.Transport) and flow_options a SiT's
    keyword arguments of transport.sample_ode / sample_sde."""
    entry = entry_named(model.model_family)
    if sampler not in entry.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit a {entry.name} model (use one of "
                         f"{', '.join(entry.samplers)})")
    if len(generators) != len(labels):
        raise ValueError(f"need one generator per label, got {len(generators)} generators for {len(labels)} labels")
    if cfg_scale < 0:
        raise ValueError(f"cfg scale must be >= 0 (1.0 = no guidance), got {cfg_scale}")
    if len(labels) == 0:
        raise ValueError("generate needs at least one label")
    device = next(model.parameters()).device
    rows = len(labels)
    pad = padded_rows(rows, pad_to) - rows
    shape = (model.in_channels, model.input_size, model.input_size)
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if rows and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise ValueError(f"class labels must lie in [0, {model.num_classes}), got {labels.tolist()}")
    y = torch.cat([labels, torch.zeros(pad, dtype=torch.long)]).to(device)
    x_start = draw_rows(generators, shape, pad)
    guided = cfg_scale != 1.0
    copies = 2 if guided else 1
    if guided:
        # the unconditional half only feeds forward_with_cfg's second pass: it reads x[:B] for
        # both halves, so the second half of the state (and of its noise) is never used
        y = torch.cat([y, torch.full_like(y, model.num_classes)])

    def noise_fn(like):
        return draw_rows(generators, shape, pad).repeat(copies, 1, 1, 1).to(like.device, like.dtype)

    def model_fn(x, t, y):
        with autocast(amp_dtype, device):
            if guided:
                out = model.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels=guide_all_channels)
            else:
                out = model(x, t, y)
        return out.float()

    loop_kwargs = dict(noise=x_start.repeat(copies, 1, 1, 1).to(device), clip_denoised=False,
                       model_kwargs=dict(y=y), device=device, progress=progress, noise_fn=noise_fn)
    # a family whose loop is more than a denoiser of x (MAR) reads the model, the generators and
    # the guidance from here; DiT and SiT use model_fn and the noise
    context = dict(model=model, generators=generators, cfg_scale=cfg_scale, amp=(amp_dtype, device))
    latents = family_class(entry).run_sampler(diffusion, sampler, model_fn, (len(y), *shape), loop_kwargs, eta,
                                              flow_options, context)
    latents = latents[: rows + pad]
    images = decode(vae, latents.float()) if vae is not None else latents
    return images[:rows]


# ----------------------------------------------------------------------- naming
def run_name(model_name, ckpt, image_size, vae, cfg_scale, global_seed, num_sampling_steps=250,
             sampler="ddpm", precision="fp32", timestep_spacing=None):
    """The original sample_ddp.py folder name `{model}-{ckpt}-size-{size}-vae-{vae}-cfg-{cfg}-seed-{seed}`
    (ckpt "pretrained" without --ckpt); settings the original did not have are appended only
    when they differ from its behaviour, so two different sample sets never share a name."""
    ckpt_name = os.path.basename(ckpt).replace(".pt", "") if ckpt else "pretrained"
    vae_name = vae if vae in ("ema", "mse", "none") else os.path.basename(os.path.normpath(str(vae)))
    name = f"{model_name.replace('/', '-')}-{ckpt_name}-size-{image_size}-vae-{vae_name}-cfg-{cfg_scale}-seed-{global_seed}"
    if num_sampling_steps != 250:
        name += f"-steps-{num_sampling_steps}"
    if sampler != "ddpm":
        name += f"-{sampler}"
    if spacing_identity(sampler, timestep_spacing) is not None:
        name += f"-{timestep_spacing}"
    if precision != "fp32":
        name += f"-{precision}"
    return name


def spacing_identity(sampler, timestep_spacing):
    """A run's timestep spacing as it names and identifies the run: None for the sampler's default
    (also for SiT, which has none), else the spacing."""
    return None if timestep_spacing in (None, resolve_timestep_spacing(sampler, None)) else timestep_spacing

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

# FLOW_SAMPLERS: SiT's (transport/), run by flow_sample
from tinyfusion.flags import FLOW_SAMPLERS, SOLVER_NAMES, autocast, resolve_timestep_spacing
from tinyfusion.io.downloads import resolve_released
from tinyfusion.errors import TinyFusionError
from tinyfusion.io.vae import decode

ROW_MULTIPLE = 4
NOISE_STREAM, LABEL_STREAM = 0, 1  # independent random streams of one sample
# the sampler registry: name -> fn(diffusion, model_fn, shape, eta, loop keywords) -> final latents.
# A new sampler is one entry here and its name in tinyfusion.flags.SAMPLER_NAMES (the --sampler choices,
# listed there so that --help needs no torch); unknown names are refused.
# The fast solvers' `diffusion` is a tinyfusion.sampling.solvers.FastSolver (see sampling_process).
def _solver_loop(solver, model_fn, shape, eta, kwargs):
    return solver.sample_loop(model_fn, kwargs["noise"], kwargs["model_kwargs"], progress=kwargs["progress"])


SAMPLERS = {
    "ddpm": lambda diffusion, model_fn, shape, eta, kwargs: diffusion.p_sample_loop(model_fn, shape, **kwargs),
    "ddim": lambda diffusion, model_fn, shape, eta, kwargs: diffusion.ddim_sample_loop(model_fn, shape, eta=eta,
                                                                                       **kwargs),
    "dpm-solver++": _solver_loop,
    "unipc": _solver_loop,
}
# ----------------------------------------------------------------------- checkpoints
def resolve_checkpoint(ckpt, model_name, image_size):
    """The checkpoint to load. Without --ckpt the original uses the released DiT-XL-2-{size}x{size}.pt:
    a copy in pretrained/ (or the original's pretrained_models/), else it is downloaded."""
    if ckpt:
        return ckpt
    if model_name.startswith("SiT-"):
        return _resolve_sit_checkpoint(model_name, image_size)
    if model_name == "DiT-XL/2" and image_size in (256, 512):
        return resolve_released(f"DiT-XL-2-{image_size}x{image_size}.pt")
    tiny = " (the released TinyDiT: --ckpt TinyDiT-D14-MaskedKD-500K.pt)" if (model_name, image_size) == ("DiT-D14/2", 256) else ""
    raise TinyFusionError(f"--ckpt is required for --model {model_name} at --image-size {image_size}: only DiT-XL/2 "
                          f"at 256/512 has a default checkpoint; pass your trained or pruned checkpoint{tiny}")


def _resolve_sit_checkpoint(model_name, image_size):
    """SiT released SiT-XL-2-256x256.pt only (the name SiT's download.py saves it under): a local
    copy, else downloaded and verified like the DiT weights (tinyfusion.io.downloads)."""
    if model_name == "SiT-XL/2" and image_size == 256:
        return resolve_released("SiT-XL-2-256x256.pt")
    raise TinyFusionError(f"no --ckpt given for --model {model_name} at --image-size {image_size}; the only released "
                          f"SiT is SiT-XL/2 at 256 (--model SiT-XL/2 --image-size 256 downloads it): pass --ckpt "
                          f"with your own SiT checkpoint")


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
def sampling_process(sampler, num_steps, timestep_spacing):
    """What `generate` samples a DiT with: the respaced diffusion of ddpm / ddim ("dit" spacing:
    DiT's, "leading": diffusers' DiTPipeline's) or the FastSolver of dpm-solver++ / unipc."""
    if sampler in SOLVER_NAMES:
        from tinyfusion.sampling.solvers import FastSolver
        return FastSolver(sampler, num_steps, timestep_spacing)
    from diffusion import create_diffusion
    return create_diffusion(("leading" if timestep_spacing == "leading" else "") + str(num_steps))


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
    A SiT samples with sampler "ode" or "sde": `diffusion` is then its transport.Transport and
    flow_options the keyword arguments of transport.sample_ode / sample_sde."""
    if sampler not in (*SAMPLERS, *FLOW_SAMPLERS):
        raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join((*SAMPLERS, *FLOW_SAMPLERS))}")
    if (sampler in FLOW_SAMPLERS) != (getattr(model, "model_family", "DiT") == "SiT"):
        raise ValueError(f"sampler {sampler!r} does not fit a {getattr(model, 'model_family', 'DiT')} model "
                         f"(SiT: ode, sde; DiT: ddpm, ddim, {', '.join(SOLVER_NAMES)})")
    solver_name = getattr(diffusion, "name", None)  # a FastSolver's; diffusions and transports have none
    if (sampler in SOLVER_NAMES or solver_name in SOLVER_NAMES) and solver_name != sampler:
        raise ValueError(f"sampler {sampler!r} needs its own sampling process: sampling_process({sampler!r}, ...)")
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
    if sampler in FLOW_SAMPLERS:
        latents = flow_sample(diffusion, sampler, lambda x, t: model_fn(x, t, y), loop_kwargs["noise"], noise_fn,
                              progress, flow_options or {})
    else:
        latents = SAMPLERS[sampler](diffusion, model_fn, (len(y), *shape), eta, loop_kwargs)
    latents = latents[: rows + pad]
    images = decode(vae, latents.float()) if vae is not None else latents
    return images[:rows]


def flow_sample(transport, sampler, model_fn, noise, noise_fn, progress, options):
    """A SiT's ODE or SDE sample from `noise` (the SDE's per-step noise from noise_fn)."""
    from transport import sample_ode, sample_sde
    if sampler == "ode":
        return sample_ode(model_fn, noise, transport, progress=progress, **options)
    return sample_sde(model_fn, noise, transport, noise_fn=noise_fn, progress=progress, **options)


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

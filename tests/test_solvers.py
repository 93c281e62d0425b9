"""The fast DiT solvers (tinyfusion/sampling/solvers.py, --sampler dpm-solver++ | unipc) against
computations that share no code with them:

- DPM-Solver++(2M) written out here from its published update (Lu et al. 2022, "DPM-Solver++",
  Algorithm 2, data-prediction form) on DiT's float64 schedule, with classifier-free guidance
  combined by hand;
- for a model whose noise prediction is exact for Gaussian data N(m, s^2 I), the probability-flow
  ODE maps x_T to m + s (x_T - alpha_T m) / sqrt(alpha_T^2 s^2 + sigma_T^2) (the standardised
  variable is constant along the flow); guided noise predictions of such models are again exact
  for a Gaussian, with mean m_null + g (m_y - m_null). Both solvers must converge to it.

Tolerances: diffusers' schedulers compute their coefficients and the update in float32 (they
upcast the sample to float32), so agreement with a float64 reference is to float32 rounding
amplified over the steps: the solver on a float64 model measured <= 1.1e-6 of the output's largest
value (bound 1e-5), the whole float32 path through generate <= 1.6e-5 (bound 1e-4); the first-order
foil differs by 0.54-0.63 of it (bound: more than 0.1).
"""
import glob
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import sample
from models import DiT
from test_sampling import NUM_CLASSES, PIXEL_FLAGS, STEPS, ddp_main, load_npz, pixel_ckpt, seeded, tame_dit  # noqa: F401
from tinyfusion.errors import TinyFusionError
from training_helpers import torchrun
from tinyfusion.flags import SOLVER_NAMES
from tinyfusion.sampling import part_store
from tinyfusion.sampling.generate import generate
from tinyfusion.families.dit import sampling_process
from tinyfusion.sampling.solvers import FastSolver

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------- independent references
def dit_alpha_sigma(t):
    """alpha_t, sigma_t of DiT's schedule, from its definition (linear betas 1e-4..0.02, 1000 steps)."""
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    return float(np.sqrt(alphas_cumprod[t])), float(np.sqrt(1.0 - alphas_cumprod[t]))


def reference_timesteps(steps, spacing):
    """diffusers' timestep_spacing rules, written out: linspace rounds linspace(0, 999, N + 1) and
    drops its 0; trailing steps back 1000/N from 1000 and subtracts 1."""
    if spacing == "linspace":
        return [int(t) for t in np.round(np.linspace(0, 999, steps + 1))[::-1][:-1]]
    assert spacing == "trailing"
    return [int(t) - 1 for t in np.round(np.arange(1000, 0, -1000 / steps))]


def reference_dpm_solver_pp_2m(eps_fn, x, timesteps, order=2):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022, in float64: data prediction
    x0_i = (x - sigma_i eps) / alpha_i, lambda = log(alpha / sigma), h_i = lambda_i - lambda_{i-1};
    step 1 first order, then D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2} with
    r_i = h_{i-1} / h_i and x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i.
    The last step goes to sigma = 0 (lambda = inf), where the first-order update is the data
    prediction itself (the second-order one has r = 0 there). order=1: D_i = x0_{i-1} throughout,
    DPM-Solver++ of order 1 (= DDIM), the foil of the test below."""
    previous_x0, previous_h = None, None
    for i, t in enumerate(timesteps):
        alpha, sigma = dit_alpha_sigma(t)
        x0 = (x - sigma * eps_fn(x, t)) / alpha
        if i == len(timesteps) - 1:
            return x0
        alpha_next, sigma_next = dit_alpha_sigma(timesteps[i + 1])
        h = np.log(alpha_next / sigma_next) - np.log(alpha / sigma)
        if previous_x0 is None or order == 1:
            direction = x0
        else:
            r = previous_h / h
            direction = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous_x0
        x = (sigma_next / sigma) * x - alpha_next * np.expm1(-h) * direction
        previous_x0, previous_h = x0, h


def guided_eps_by_hand(model, labels, cfg_scale, guided_channels=3):
    """eps(x, t) of the original's classifier-free guidance, combined here: one model call on
    [x; x] with labels [y; null], the first `guided_channels` channels guided, the other noise
    channels the conditional prediction (the learned-variance channels dropped)."""
    null = torch.full_like(labels, NUM_CLASSES)
    channels = model.in_channels

    def eps_fn(x, t):  # t: one training step, or one per row (as FastSolver.sample_loop passes it)
        t_rows = torch.full((2 * len(x),), int(torch.as_tensor(t).reshape(-1)[0]), dtype=torch.long)
        with torch.no_grad():
            both = model(torch.cat([x, x]), t_rows, torch.cat([labels, null]))[:, :channels]
        cond, uncond = both[: len(x)], both[len(x):]
        guided = uncond[:, :guided_channels] + cfg_scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
        return torch.cat([guided, cond[:, guided_channels:]], dim=1)
    return eps_fn


def initial_noise(rows, shape, seed):
    return torch.stack([torch.randn(shape, generator=g) for g in seeded(range(rows), seed)])


# ----------------------------------------------------------------------- DPM-Solver++ written out
@pytest.mark.parametrize("spacing, steps", [("linspace", 8), ("trailing", 6)])
def test_dpm_solver_pp_is_algorithm_2_on_dits_schedule(spacing, steps):
    model32 = tame_dit(model_name="DiT-XS/2", input_size=4, in_channels=4)  # 4 channels: the 4th is not guided
    model64 = tame_dit(model_name="DiT-XS/2", input_size=4, in_channels=4).double()
    labels, cfg_scale = torch.tensor([3, 1, 4, 1]), 4.0
    solver = sampling_process("dpm-solver++", steps, spacing)
    assert solver.timesteps() == reference_timesteps(steps, spacing)
    x_T = initial_noise(4, (4, 4, 4), seed=9)
    expected = reference_dpm_solver_pp_2m(guided_eps_by_hand(model64, labels, cfg_scale), x_T.double(),
                                          reference_timesteps(steps, spacing))
    # the solver alone on the float64 model (diffusers' float32 arithmetic inside)
    alone = solver.sample_loop(guided_eps_by_hand(model64, labels, cfg_scale), x_T.double())
    # and the whole sampling path: generate on the float32 model with forward_with_cfg
    ours = generate(model32, solver, labels, seeded(range(4), seed=9), cfg_scale, "dpm-solver++")
    scale = expected.abs().max()
    assert scale > 1  # a real output, not a collapsed one
    assert (alone - expected).abs().max() < 1e-5 * scale
    assert (ours.double() - expected).abs().max() < 1e-4 * scale
    # the test tells second order from first: DDIM's update (D_i = x0_i) lands far off
    first_order = reference_dpm_solver_pp_2m(guided_eps_by_hand(model64, labels, cfg_scale), x_T.double(),
                                             reference_timesteps(steps, spacing), order=1)
    assert (first_order - expected).abs().max() > 0.1 * scale


# ----------------------------------------------------------------------- the Gaussian closed form
class GaussianDataModel(nn.Module):
    """A stand-in DiT whose noise prediction is exact for class-conditional Gaussian data
    N(means[y], s^2 I) under DiT's schedule: eps(x_t) = sigma_t (x_t - alpha_t m_y) / (alpha_t^2 s^2
    + sigma_t^2), followed by C zero 'variance' channels, as a learned-variance DiT's output.
    forward_with_cfg is DiT's own."""
    forward_with_cfg = DiT.forward_with_cfg
    model_family = "DiT"

    def __init__(self, means, std, input_size=2):
        super().__init__()
        self.means = nn.Parameter(means, requires_grad=False)  # (num_classes + 1, C): the last is the null class
        self.std = std
        self.num_classes, self.in_channels = means.shape[0] - 1, means.shape[1]
        self.input_size = input_size
        alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
        self.register_buffer("alphas_cumprod", torch.tensor(alphas_cumprod, dtype=torch.float64))

    def forward(self, x, t, y):
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        mean = self.means[y].view(len(y), -1, 1, 1).double()
        eps = sigma * (x.double() - alpha * mean) / (alpha ** 2 * self.std ** 2 + sigma ** 2)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1).to(x.dtype)


def gaussian_ode_endpoint(model, x_T, labels, cfg_scale, guided_channels):
    """The probability-flow ODE's x_0 (sigma = 0) from x_T at t = 999, in closed form."""
    alpha, sigma = dit_alpha_sigma(999)
    cond, null = model.means[labels].double(), model.means[model.num_classes].double()
    mean = cond.clone()
    mean[:, :guided_channels] = null[:guided_channels] + cfg_scale * (cond[:, :guided_channels] - null[:guided_channels])
    mean = mean.view(len(labels), -1, 1, 1)
    std = model.std
    return mean + std * (x_T.double() - alpha * mean) / np.sqrt(alpha ** 2 * std ** 2 + sigma ** 2)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("guide_all_channels", [False, True])
def test_solvers_converge_to_the_gaussian_ode_solution(solver, guide_all_channels):
    """Largest error at 5/10/20/40 steps, measured: dpm-solver++ 0.59/0.25/0.060/0.0046, unipc
    0.59/0.24/0.056/0.0082, of an endpoint whose largest value is 5.2 (bound at 40 steps: 0.0104).
    Evaluating the model one training step off (t - 1) leaves 0.012-0.014 at 40 steps."""
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(NUM_CLASSES + 1, 4, generator=generator, dtype=torch.float64)
    model = GaussianDataModel(means, std=0.5)
    labels, cfg_scale = torch.tensor([0, 3, 7, 7]), 2.0
    x_T = initial_noise(4, (4, 2, 2), seed=1)
    exact = gaussian_ode_endpoint(model, x_T, labels, cfg_scale, 4 if guide_all_channels else 3)
    errors = []
    for steps in (5, 10, 20, 40):
        out = generate(model, sampling_process(solver, steps, "linspace"), labels, seeded(range(4), seed=1),
                       cfg_scale, solver, guide_all_channels=guide_all_channels)
        errors.append(float((out.double() - exact).abs().max()))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 2e-3 * float(exact.abs().max())


def test_fast_solver_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit unipc"):
        FastSolver("unipc", 10, "dit")
    with pytest.raises(ValueError, match="unknown solver"):
        FastSolver("heun", 10)
    model = tame_dit()
    with pytest.raises(ValueError, match="needs its own sampling process"):
        generate(model, sampling_process("ddpm", 5, "dit"), [1], seeded([0]), 1.0, "unipc")
    with pytest.raises(ValueError, match="needs its own sampling process"):
        generate(model, sampling_process("unipc", 5, "linspace"), [1], seeded([0]), 1.0, "ddpm")


# ----------------------------------------------------------------------- sample_ddp.py and sample.py
def test_sample_ddp_fast_solver_two_ranks_match_one_and_resume(tmp_path, pixel_ckpt):  # noqa: F811 (the fixture)
    """dpm-solver++ keeps a multistep history per batch: a fresh scheduler per batch keeps sample i a
    function of (seed, i): 2 gloo ranks x 3 give the .npz of 1 rank x 4, and a resumed run with
    another batch size completes it to the same file."""
    solver = ["--sampler", "dpm-solver++", "--num-fid-samples", "9"]
    ddp_main("--ckpt", pixel_ckpt, *solver, "--per-proc-batch-size", "4", "--sample-dir", str(tmp_path / "one"))
    (one_path,) = glob.glob(str(tmp_path / "one" / "*.npz"))
    assert os.path.basename(one_path) == f"DiT-XS-4-tame-xs4-size-8-vae-none-cfg-1.5-seed-0-steps-{STEPS}-dpm-solver++.npz"
    result = torchrun("sample_ddp.py", [*PIXEL_FLAGS, "--ckpt", pixel_ckpt, *solver, "--per-proc-batch-size", "3",
                                        "--sample-dir", str(tmp_path / "two"), "--keep-parts"])
    assert result.returncode == 0, result.stderr[-3000:]
    one, (two_path,) = load_npz(one_path), glob.glob(str(tmp_path / "two" / "*.npz"))
    two = load_npz(two_path)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    assert ((one[0] > 0) & (one[0] < 255)).mean() > 0.2  # 29% unsaturated values: a wrong bit would show
    # not the DDPM images of the same seeds
    ddp_main("--ckpt", pixel_ckpt, "--num-fid-samples", "9", "--per-proc-batch-size", "4",
             "--sample-dir", str(tmp_path / "ddpm"))
    assert not np.array_equal(load_npz(glob.glob(str(tmp_path / "ddpm" / "*.npz"))[0])[0], one[0])

    # interrupted: the .npz and one part are gone; resuming with another batch size completes it
    os.remove(two_path)
    os.remove(sorted(glob.glob(os.path.join(two_path[:-4], "parts", "*.json")))[1])
    with pytest.raises(TinyFusionError, match="timestep_spacing None -> 'trailing'"):
        settings = json.load(open(os.path.join(two_path[:-4], "settings.json")))
        mismatch = part_store.settings_mismatch(two_path[:-4], {**settings, "timestep_spacing": "trailing"})
        raise TinyFusionError(mismatch)
    ddp_main("--ckpt", pixel_ckpt, *solver, "--per-proc-batch-size", "2", "--sample-dir", str(tmp_path / "two"),
             "--resume")
    resumed = load_npz(two_path)
    assert np.array_equal(resumed[0], one[0]) and np.array_equal(resumed[1], one[1])


def test_solver_runs_are_named_apart_and_misfit_spacings_refused(tmp_path):
    from tinyfusion.sampling.generate import run_name
    names = {run_name("DiT-XS/4", "a/b.pt", 8, "none", 1.5, 0, 20, sampler, "fp32", spacing)
             for sampler, spacing in [("ddpm", "dit"), ("ddpm", "leading"), ("ddim", "dit"), ("dpm-solver++", "linspace"),
                                      ("dpm-solver++", "trailing"), ("unipc", "linspace"), ("unipc", "leading")]}
    assert len(names) == 7
    assert run_name("DiT-XS/4", "a/b.pt", 8, "none", 1.5, 0, 20, "unipc", "fp32", "trailing") == \
        "DiT-XS-4-b-size-8-vae-none-cfg-1.5-seed-0-steps-20-unipc-trailing"
    samples = str(tmp_path / "samples")
    for sampler, spacing in [("ddpm", "linspace"), ("unipc", "dit")]:
        with pytest.raises(TinyFusionError, match=f"--timestep-spacing {spacing} does not fit --sampler {sampler}"):
            ddp_main("--ckpt", "missing.pt", "--sampler", sampler, "--timestep-spacing", spacing, "--sample-dir", samples)
        with pytest.raises(TinyFusionError, match=f"--timestep-spacing {spacing} does not fit --sampler {sampler}"):
            sample.main(sample.parse_args([*PIXEL_FLAGS, "--ckpt", "missing.pt", "--sampler", sampler,
                                           "--timestep-spacing", spacing]))
    assert not os.path.exists(samples)


def test_sample_py_grid_with_a_fast_solver_is_the_written_out_solver(tmp_path, pixel_ckpt):  # noqa: F811 (the fixture)
    """sample.py --sampler dpm-solver++ keeps the original's grid procedure (one torch.manual_seed,
    z for the grid, [z; z] with the null label) and integrates it with DPM-Solver++(2M)."""
    from torchvision.utils import save_image
    labels, seed, steps = [3, 1, 4, 1, 5, 9], 5464, 6
    out, reference = tmp_path / "sample.png", tmp_path / "reference.png"
    sample.main(sample.parse_args([*PIXEL_FLAGS, "--ckpt", pixel_ckpt, "--seed", str(seed), "--class-labels",
                                   *map(str, labels), "--out", str(out), "--sampler", "dpm-solver++",
                                   "--num-sampling-steps", str(steps)]))
    torch.manual_seed(seed)
    z = torch.randn(len(labels), 3, 8, 8)
    model64 = tame_dit().double()
    x0 = reference_dpm_solver_pp_2m(guided_eps_by_hand(model64, torch.tensor(labels), 4.0), z.double(),
                                    reference_timesteps(steps, "linspace"))
    save_image(x0.float(), str(reference), nrow=4, normalize=True, value_range=(-1, 1))
    ours, theirs = (np.asarray(Image.open(path)).astype(int) for path in (out, reference))
    assert np.abs(ours - theirs).max() <= 1 and (ours == theirs).mean() > 0.99
    assert len(np.unique(theirs)) > 50

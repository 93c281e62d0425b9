"""Fast ODE solvers for DiT sampling: DPM-Solver++(2M) and UniPC, run by diffusers' schedulers on
DiT's own noise schedule.

Both integrate the probability-flow ODE of DiT's diffusion (linear betas 1e-4..0.02 over 1000 steps,
handed over as diffusion/'s float64 table; diffusers holds it, its coefficients and the update in
float32) with the DiT's noise prediction: the first C channels of its
learned-variance output (C = the input channels; the variance channels are not used by an ODE
solver). Classifier-free guidance is the original's, applied by the caller's model function
(forward_with_cfg: the first 3 channels guided unless --guide-all-channels), so the solver sees
exactly the eps the original's DDPM sampler would see at the same x_t and t.

    dpm-solver++  DPM-Solver++ (Lu et al. 2022), 2nd order multistep, data-prediction form
                  (diffusers DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)
    unipc         UniPC (Zhao et al. 2023), 2nd order predictor-corrector, bh2, data prediction
                  (diffusers UniPCMultistepScheduler, solver_order=2)

One model evaluation per step (NFE = --num-sampling-steps); the last step goes to noise level 0
(the clean-data estimate) and is first order, as diffusers does for final_sigmas_type="zero".
Timesteps: "linspace" (diffusers' default for both: N steps rounded from linspace(999, 0, N + 1)
without its last point), "trailing" (1000/N apart ending at 1000/N - 1, recommended for few steps by
Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed") or "leading".

The schedulers hold the multistep history of the batch they integrate: `sample_loop` makes a new
one per call, so a batch is always integrated alone and from its first step (what keeps sample i a
function of (seed, i) for any world size and after a resume).
"""
import torch

from tinyfusion.flags import DIFFUSION_STEPS, SOLVER_NAMES, SOLVER_SPACINGS

DEFAULT_SPACING = "linspace"  # diffusers' default timestep_spacing for both schedulers


def dit_betas():
    """DiT's training betas (float64): the schedule the solvers integrate."""
    from diffusion import get_named_beta_schedule
    return get_named_beta_schedule("linear", DIFFUSION_STEPS)


class FastSolver:
    """A fast solver of DiT's probability-flow ODE: `name` (one of SOLVER_NAMES), `num_steps`
    model evaluations, `timestep_spacing` one of SOLVER_SPACINGS."""

    def __init__(self, name, num_steps, timestep_spacing=DEFAULT_SPACING):
        if name not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {name!r}; use one of {', '.join(SOLVER_NAMES)}")
        if timestep_spacing not in SOLVER_SPACINGS:
            raise ValueError(f"timestep spacing {timestep_spacing!r} does not fit {name}; use one of "
                             f"{', '.join(SOLVER_SPACINGS)}")
        if not 1 <= num_steps <= DIFFUSION_STEPS:
            raise ValueError(f"a solver takes 1 to {DIFFUSION_STEPS} steps, got {num_steps}")
        self.name, self.num_steps, self.timestep_spacing = name, int(num_steps), timestep_spacing
        self.new_scheduler()  # imports diffusers now (seconds), not inside a timed sampling loop

    def new_scheduler(self):
        """A fresh diffusers scheduler, its timesteps set."""
        from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
        from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
        # variance_type stays None: diffusers would cut a learned-variance output to 3 channels
        # (an RGB model's), wrong for a 4-channel latent DiT; sample_loop hands it the eps alone
        common = dict(num_train_timesteps=DIFFUSION_STEPS, trained_betas=dit_betas(), prediction_type="epsilon",
                      solver_order=2, lower_order_final=True, final_sigmas_type="zero",
                      timestep_spacing=self.timestep_spacing, thresholding=False)
        if self.name == "dpm-solver++":
            scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
        else:
            scheduler = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)
        scheduler.set_timesteps(self.num_steps)
        return scheduler

    def timesteps(self):
        """The training-step indices the model is evaluated at, first to last."""
        return [int(t) for t in self.new_scheduler().timesteps]

    @torch.no_grad()
    def sample_loop(self, model_fn, noise, model_kwargs=None, progress=False):
        """Integrate from x_T = `noise` to the data: model_fn(x, t, **model_kwargs) is a DiT output
        (eps in its first noise.shape[1] channels) at training-step indices t (long, one per row)."""
        from tqdm import tqdm
        scheduler = self.new_scheduler()  # one per batch: it keeps this batch's multistep history
        x = noise
        channels = noise.shape[1]
        for t in tqdm(scheduler.timesteps, desc=self.name, disable=not progress):
            t_rows = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
            eps = model_fn(x, t_rows, **(model_kwargs or {}))[:, :channels]
            x = scheduler.step(eps, t, x).prev_sample
        return x


"""Flow-matching transport for SiT (Scalable Interpolant Transformers), beside `diffusion/`:
the interpolant paths (paths.py), the training loss (loss.py), the ODE and SDE samplers
(samplers.py), and the settings with SiT's defaults (settings.py)."""
from .loss import losses_from_output, sample_time_and_noise, training_losses
from .paths import (PATHS, PREDICTIONS, alpha_sigma, interpolate, noise_from_velocity, score_coefficients,
                    score_from_noise, score_from_velocity, velocity_and_score, velocity_from_score)
from .samplers import (DIFFUSION_FORMS, FIXED_ODE_METHODS, LAST_STEPS, SDE_METHODS, diffusion_coefficient,
                       sample_ode, sample_sde)
from .settings import LOSS_WEIGHTS, Transport, create_transport, time_interval

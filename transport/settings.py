"""Which interpolant a SiT is trained with, and the time intervals training and sampling use.

SiT's defaults: Linear path, velocity prediction, no loss weighting. Time is kept away from
the ends where the conversion between predictions divides by zero:
  - VP path: train on [0, 1 - train_eps] (train_eps = 1e-5), sample up to 1 - sample_eps (1e-3);
  - Linear / GVP with score or noise prediction: [eps, 1 - eps], both eps 1e-3;
  - Linear / GVP with velocity prediction: the full [0, 1] (both eps 0), except that an SDE
    ends at 1 - last_step_size and then takes its last step.
One difference from SiT's create_transport: an eps you pass is used as given (SiT ignores a
sample_eps given without a train_eps, and both eps for velocity on Linear / GVP).
"""
from dataclasses import dataclass

from transport.paths import PATHS, PREDICTIONS

LOSS_WEIGHTS = (None, "velocity", "likelihood")  # tinyfusion/flags.py repeats them, torch-free, for --help


@dataclass(frozen=True)
class Transport:
    path: str = "Linear"
    prediction: str = "velocity"
    loss_weight: object = None
    train_eps: float = 0.0
    sample_eps: float = 0.0


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None):
    """A Transport with SiT's eps defaults for this path and prediction (see the module docstring)."""
    if path_type not in PATHS:
        raise ValueError(f"unknown --path-type {path_type}; choose one of {', '.join(PATHS)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown --prediction {prediction}; choose one of {', '.join(PREDICTIONS)}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"unknown --loss-weight {loss_weight}; choose None, velocity or likelihood")
    if path_type == "VP":
        default_train, default_sample = 1e-5, 1e-3
    elif prediction != "velocity":
        default_train, default_sample = 1e-3, 1e-3
    else:
        default_train, default_sample = 0.0, 0.0
    train_eps = default_train if train_eps is None else float(train_eps)
    sample_eps = default_sample if sample_eps is None else float(sample_eps)
    for name, value in (("--train-eps", train_eps), ("--sample-eps", sample_eps)):
        if not 0 <= value < 0.5:
            raise ValueError(f"{name} must lie in [0, 0.5), got {value}")
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)


def time_interval(transport, *, sampling, sde=False, diffusion_form="SBDM", last_step_size=0.0, reverse=False):
    """(t0, t1) of training (sampling=False) or of an ODE / SDE sampler, SiT's rules: on the VP
    path only the data end is cut; on Linear / GVP the ends are cut for score / noise models, and
    for an SDE (its start only with the SBDM diffusion). An SDE stops last_step_size before 1
    when it takes a last step. reverse runs from data to noise (ODE only)."""
    eps = transport.sample_eps if sampling else transport.train_eps
    t0, t1 = 0.0, 1.0
    end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if transport.path == "VP":
        t1 = end
    elif transport.prediction != "velocity" or sde:
        t0 = eps if (diffusion_form == "SBDM" and sde) or transport.prediction != "velocity" else 0.0
        t1 = end
    if reverse:
        t0, t1 = 1 - t0, 1 - t1
    return t0, t1

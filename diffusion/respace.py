"""Timestep respacing: run a T-step diffusion on a subset of its steps.

A network trained on T = 1000 steps can sample with, say, 250 of them. Keeping steps
k_0 < k_1 < ... defines a shorter Markov chain with the same marginals
q(x_{k_j} | x_0): its betas are 1 - abar_{k_j} / abar_{k_{j-1}} (abar_{k_{-1}} = 1).
The network, however, only knows the original step indices, so every model call
translates the new index j back to k_j.
"""

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original steps to keep.

    section_counts:
      - "ddimN": the integer stride s for which range(0, T, s) has exactly N steps
        (the DDIM paper's uniform skipping); ValueError if no stride gives N.
      - "leadingN": the N steps 0, s, 2s, ... with s = T // N (diffusers' schedulers with
        timestep_spacing="leading", as DiTPipeline's DDIMScheduler).
      - "N" or "N1,N2,...": split [0, T) into len(counts) near-equal sections (the first
        T % len sections get one extra step) and take N_i steps evenly spread over
        section i, first and last step of the section included, positions rounded to
        the nearest integer (the ADM rule, fractional stride). A list of ints works too.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("leading"):
            try:
                desired = int(section_counts[len("leading"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}; expected 'leadingN' with an integer N") from None
            if not 0 < desired <= num_timesteps:
                raise ValueError(f"cannot take {desired} of {num_timesteps} steps for {section_counts!r}")
            stride = num_timesteps // desired
            return set(range(0, desired * stride, stride))
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}; expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"no integer stride gives exactly {desired} of {num_timesteps} steps for {section_counts!r}; "
                "pick another N or use plain 'N' respacing"
            )
        try:
            section_counts = [int(part) for part in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}; expected '', 'N', 'N1,N2,...', 'ddimN' or 'leadingN'"
            ) from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]

    section_counts = list(section_counts)
    if not section_counts:
        raise ValueError("respacing needs at least one section count")
    base_size, extra = divmod(num_timesteps, len(section_counts))
    kept = []
    section_start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise ValueError(
                f"cannot take {count} steps from a section of {size} steps "
                f"(respacing {section_counts} of {num_timesteps} steps); use fewer steps per section"
            )
        # count points evenly spaced from the section's first to its last step.
        frac_stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(section_start + round(position))
            position += frac_stride
        section_start += size
    return set(kept)


class _TimestepMappedModel:
    """Calls `model(x, timestep_map[t], ...)`: respaced step index -> original index.

    Extra positional and keyword arguments (labels, cfg_scale, ...) pass through.
    """

    def __init__(self, model, timestep_map):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x, t, *args, **kwargs):
        mapping = torch.as_tensor(self.timestep_map, device=t.device, dtype=torch.long)
        return self.model(x, mapping[t.long()], *args, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion restricted to `use_timesteps` of the base process.

    kwargs are those of GaussianDiffusion for the ORIGINAL process (its full betas).
    num_timesteps is len(use_timesteps); timestep_map[j] is the original index of
    respaced step j.
    """

    def __init__(self, use_timesteps, **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        self.use_timesteps = set(int(step) for step in use_timesteps)
        if not self.use_timesteps:
            raise ValueError("use_timesteps is empty; keep at least one step")
        if min(self.use_timesteps) < 0 or max(self.use_timesteps) >= base.num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {base.num_timesteps}), got "
                f"min {min(self.use_timesteps)} max {max(self.use_timesteps)}"
            )
        self.timestep_map = sorted(self.use_timesteps)
        kept_alphas_cumprod = base.alphas_cumprod[self.timestep_map]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1.0 - kept_alphas_cumprod / previous
        super().__init__(**kwargs)

    def wrap_model(self, model):
        if isinstance(model, _TimestepMappedModel):  # already wrapped by an outer call
            return model
        return _TimestepMappedModel(model, self.timestep_map)

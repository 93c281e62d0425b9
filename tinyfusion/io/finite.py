"""The one check that keeps non-finite or impossible numbers out of what we write and load.

Model output (samples, decoded images, grids, .npz batches) is refused when it holds NaN or inf:
converted to uint8 a NaN becomes pixel 0, so a broken model would otherwise give black images
with exit code 0. Weights are refused when they are NaN / inf, or larger in magnitude than
MAX_TRAINED_WEIGHT, which no trained DiT or SiT has (a flipped exponent bit in a file without
our checksum turns 0.01 into 3e38, a finite number that samples NaN).
"""
import torch

from tinyfusion.errors import TinyFusionError

# Why 1e4: AdamW moves a weight by at most lr * (1 - beta1) / sqrt(1 - beta2) = 3.16 lr per step
# (betas 0.9 / 0.999), so a weight initialised within +-1 ends within 1 + 3.16 * lr * steps:
# about 2.2e3 for DiT-XL/2's 7M steps at lr 1e-4, 3.2e2 for TinyDiT-D14's 500K steps at 2e-4 (the
# weights of trained transformers are in practice below ~1e2). 1e4 leaves a margin of 4x over that
# worst case and is 34 orders of magnitude below what an exponent bit flip produces.
MAX_TRAINED_WEIGHT = 1e4


def weights_problem(state_dict):
    """None when every floating tensor of `state_dict` is finite with |w| <= MAX_TRAINED_WEIGHT,
    else one phrase naming the first offending tensor, its largest |w| and the bound."""
    for key, value in state_dict.items():
        if not (torch.is_tensor(value) and value.is_floating_point() and value.numel()):
            continue
        largest = float(value.detach().abs().amax())  # NaN propagates through amax
        if largest != largest or largest == float("inf"):
            bad = int((~torch.isfinite(value)).sum())
            return f"non-finite weights ({bad} NaN/inf values in {key})"
        if largest > MAX_TRAINED_WEIGHT:
            return (f"a weight no trained model has: {key} holds |w| = {largest:.4e}, above {MAX_TRAINED_WEIGHT:.0e} "
                    f"(the bound of tinyfusion/io/finite.py: AdamW training cannot move a weight that far)")
    return None


def check_finite_output(values, what):
    """Refuse model output (a tensor or an array) holding NaN or inf before it becomes pixels, an
    array or a file: `what` names it ("samples 0..7")."""
    bad = count_non_finite(values)
    if bad:
        raise NonFiniteOutput(non_finite_output_message(bad, what))
    return values


class NonFiniteOutput(TinyFusionError):
    """Model output holding NaN / inf: nothing was written."""


def count_non_finite(values):
    """Number of NaN / inf entries of a tensor or array (0 for integer types)."""
    tensor = values if torch.is_tensor(values) else torch.as_tensor(values)
    return int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0


def non_finite_output_message(bad, what):
    return (f"the model produced {bad} NaN/inf values in {what}; nothing was written (its weights are broken "
            f"or the sampler diverged: try --precision fp32)")

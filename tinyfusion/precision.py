"""Low-precision inference for frozen models (sampling, the KD teacher) without re-casting weights.

Under `torch.autocast`, a frozen model's fp32 weights are cast to bf16/fp16 again on every call
(autocast caches casts only for leaf tensors that require grad). A frozen model can instead keep
one low-precision copy of exactly the weights autocast would cast (nn.Linear and nn.Conv2d
weights and biases) and still run under autocast: autocast then casts only the activations that
enter a matmul, and leaves already-cast weights alone. Everything else stays fp32: the
embedding tables, the positional table (so the residual stream, whose hidden states reach
several hundred in DiT, stays fp32), LayerNorm (its input is the fp32 residual stream), the
timestep frequencies and the gate logits. The outputs are then bit-identical to plain autocast
with fp32 weights (same casts, same kernels), only cheaper.

Whether low precision is faster depends on the hardware: GPUs and CPUs with native bf16 matmul
(AVX-512 BF16 / AMX) run it several times faster than fp32; CPUs without it (AVX2 only) emulate
it and are many times slower (`native_low_precision` tells which).
"""
import torch
import torch.nn as nn

from tinyfusion.cli import PRECISIONS, autocast
from tinyfusion.errors import TinyFusionError

CAST_ONCE_MODULES = (nn.Linear, nn.Conv2d)  # what autocast runs in low precision in a DiT
DTYPE_NAMES = {getattr(torch, dtype): name for name, dtype in PRECISIONS.items()}  # torch dtype -> flag


def native_low_precision(dtype, device):
    """True when `device` has hardware matmuls in `dtype` (fp32 always counts as native)."""
    if dtype == torch.float32:
        return True
    if torch.device(device).type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def low_precision_warning(dtype, device):
    """One line to print when `dtype` would be emulated (slow) on this device, else None."""
    if native_low_precision(dtype, device):
        return None
    return (f"warning: this {torch.device(device).type} has no native {DTYPE_NAMES[dtype]} matmul (e.g. an AVX2-only "
            f"CPU); {DTYPE_NAMES[dtype]} is emulated and typically several times slower than fp32 here")


def cast_weights_once(model, dtype):
    """In place: the weights and biases of `model`'s Linear and Conv2d layers to `dtype`, so that
    running it under autocast(dtype) no longer re-casts them per call. The model must be frozen
    (no parameter requiring grad): a low-precision copy cannot be trained. Returns the model."""
    if any(param.requires_grad for param in model.parameters()):
        raise TinyFusionError("cast_weights_once needs a frozen model (call model.requires_grad_(False) first); "
                              "trainable weights must stay fp32")
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, CAST_ONCE_MODULES):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    return model


class FrozenForward:
    """Calls a frozen model (the KD teacher) under torch.inference_mode and autocast(dtype) with
    its weights cast once, and returns fp32 outputs (and hidden states) that are ordinary tensors,
    so the losses can use them next to the student's autograd graph."""

    def __init__(self, model, dtype, device):
        self.model = cast_weights_once(model.eval(), dtype)
        self.dtype, self.device = dtype, device

    def __call__(self, *args, **kwargs):
        with torch.inference_mode(), autocast(self.dtype, self.device):
            result = self.model(*args, **kwargs)
        # outside inference mode: .float() / .clone() turn inference tensors into ordinary ones
        if isinstance(result, tuple):
            output, hiddens = result
            return _ordinary_fp32(output), [_ordinary_fp32(h) for h in hiddens]
        return _ordinary_fp32(result)


def _ordinary_fp32(tensor):
    return tensor.float() if tensor.dtype != torch.float32 else tensor.clone()


def resolve_teacher_precision(choice, training_dtype, device):
    """--teacher-precision: auto = the training precision on a GPU, fp32 on the CPU (the
    original's numerics there); otherwise the named dtype."""
    if choice == "auto":
        return training_dtype if torch.device(device).type == "cuda" else torch.float32
    if choice not in PRECISIONS:
        raise TinyFusionError(f"--teacher-precision must be one of auto, {', '.join(PRECISIONS)}; got {choice!r}")
    return getattr(torch, PRECISIONS[choice])

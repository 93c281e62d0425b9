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

from tinyfusion.flags import PRECISIONS, autocast
from tinyfusion.errors import TinyFusionError

CAST_ONCE_MODULES = (nn.Linear, nn.Conv2d)  # what autocast runs in low precision in a DiT
DTYPE_NAMES = {getattr(torch, dtype): name for name, dtype in PRECISIONS.items()}  # torch dtype -> flag


# CPU feature flags (as /proc/cpuinfo names them) of hardware low-precision matmul. oneDNN's own
# "bf16 supported" answer is also True on AVX-512 CPUs without BF16, where it emulates bf16.
NATIVE_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
# measured on this project's CPUs without native bf16 (bench/bench_precision.py, sampling images/s
# in bf16 / fp32, weights cast once): what a user asking for emulated bf16 is told
EMULATED_BF16_SPEED = ("0.71x fp32's images/s on an AVX2 CPU, 3.1x slower than fp32 on an AVX-512 CPU "
                       "without BF16 (bench/bench_precision.py)")


def cpu_flags():
    """The CPU's feature flags: from /proc/cpuinfo, else from torch's own queries (other systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    queries = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported",
               "amx_fp16": "_is_amx_fp16_supported"}
    return {flag for flag, query in queries.items() if getattr(torch.cpu, query, lambda: False)()}


def native_low_precision(dtype, device, flags=None):
    """True when `device` has hardware matmuls in `dtype` (fp32 always counts as native); on a CPU,
    `flags` are its feature flags (default: this CPU's)."""
    if dtype == torch.float32:
        return True
    if torch.device(device).type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_CPU_FLAGS[dtype])


def low_precision_warning(dtype, device, flags=None):
    """One line to print when `dtype` would be emulated (slow) on this device, else None."""
    if native_low_precision(dtype, device, flags):
        return None
    measured = f": measured {EMULATED_BF16_SPEED}" if dtype == torch.bfloat16 else ""
    native = " or ".join(NATIVE_CPU_FLAGS.get(dtype, ()))
    return (f"warning: this {torch.device(device).type} has no native {DTYPE_NAMES[dtype]} matmul ({native}); "
            f"{DTYPE_NAMES[dtype]} is emulated and slower than fp32 here{measured}; --precision fp32 is faster")


def resolve_sampling_precision(choice, device, flags=None):
    """(autocast dtype, one line saying what was chosen and why) for sample.py / sample_ddp.py
    --precision: auto = bf16 on a GPU and on a CPU with native bf16 matmul (AMX or AVX-512-BF16),
    fp32 on other CPUs; a named precision is used as asked (the line, else None, warns when it is
    emulated)."""
    if choice != "auto":
        dtype = getattr(torch, PRECISIONS[choice])
        return dtype, low_precision_warning(dtype, device, flags)
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "precision auto: bf16 (GPU)"
    if native_low_precision(torch.bfloat16, device, flags):
        return torch.bfloat16, "precision auto: bf16 (this CPU has native bf16 matmul: AMX or AVX-512-BF16)"
    return torch.float32, ("precision auto: fp32 (this CPU has no native bf16 matmul, AMX or AVX-512-BF16; bf16 "
                           f"would be slower: measured {EMULATED_BF16_SPEED})")


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

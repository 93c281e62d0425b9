"""torch.compile on CPU without inductor's AVX-512 kernels.

With torch 2.14.1 on an AVX-512 CPU, `sample_ddp.py --compile` was reported to abort on its first
batch with "malloc(): unaligned tcache chunk detected" (heap corruption), and to run with
ATEN_CPU_CAPABILITY=avx2, which among other things makes inductor generate AVX2 instead of
AVX-512 code. Heap corruption can also change numbers without crashing, so until a torch release
is known to be free of it, code compiled for the CPU on such machines is generated for 256-bit
vectors (inductor's `cpp.simdlen=256`, i.e. AVX2); eager kernels are unchanged (the eager path
never showed the fault). On CPU, compiling is measured no faster than eager anyway.
`tools/compile_crash_repro.py` runs the reported path in a child process to check a torch build.
"""
import torch

SAFE_SIMDLEN = 256
_announced = set()


def compile_options(device, log=print):
    """inductor options for torch.compile of a model on `device`: {"cpp.simdlen": 256} when inductor
    would generate AVX-512 code for this CPU (said once per process in one line), else {}."""
    if torch.device(device).type != "cpu" or not _inductor_picks_avx512():
        return {}
    if "simdlen" not in _announced:
        _announced.add("simdlen")
        log(f"--compile on this AVX-512 CPU: compiled kernels use AVX2 (inductor cpp.simdlen={SAFE_SIMDLEN}); "
            f"torch {torch.__version__}'s AVX-512 kernels were reported to corrupt the heap here")
    return {"cpp.simdlen": SAFE_SIMDLEN}


def _inductor_picks_avx512():
    from torch._inductor import cpu_vec_isa
    return "avx512" in str(cpu_vec_isa.pick_vec_isa())

"""Reproducer for `--compile` heap corruption on AVX-512 CPUs (issue: "malloc(): unaligned tcache
chunk detected", SIGABRT, on sample_ddp.py's first compiled batch).

The compiled part runs in a child process (a crash there must not take this one down), with
glibc's malloc checks preloaded when available (a write past a buffer's end then aborts at the
next free instead of passing silently), and its output is compared with the eager model's.

    python tools/compile_crash_repro.py                      # sample_ddp's compiled forward_with_cfg
    python tools/compile_crash_repro.py --part attn          # only the attention of each block
    python tools/compile_crash_repro.py --isa avx2           # the reported workaround
    python tools/compile_crash_repro.py --simdlen 256        # inductor's vector width only

Exit code 0: no crash and compiled == eager (to 1e-4); 1: mismatch; 2: the child crashed (its
signal is printed). Compiling takes minutes of CPU.
"""
import argparse
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALLOC_DEBUG = "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"
PARTS = ("whole", "block", "attn", "mlp", "adaln", "final", "embed")


def child(args):
    sys.path.insert(0, ROOT)
    import torch
    from models import DiT_models
    if args.simdlen:
        import torch._inductor.config as inductor_config
        inductor_config.cpp.simdlen = args.simdlen
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=args.num_classes).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero: give every layer weights so that each one computes
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    compiled = compile_part(model, args.part)
    worst = 0.0
    with torch.no_grad():
        for call in range(args.calls):
            x = torch.randn(2 * args.batch, 3, 8, 8)
            t = torch.full((2 * args.batch,), 999 - call, dtype=torch.long)
            y = torch.randint(args.num_classes, (2 * args.batch,))
            y[args.batch:] = args.num_classes  # the null class of classifier-free guidance
            eager = model.forward_with_cfg(x, t, y, 1.5)
            got = compiled(x, t, y)
            worst = max(worst, (got - eager).abs().max().item())
    print(json.dumps({"max_abs_difference": worst, "isa": str(torch.backends.cpu.get_cpu_capability())}))


def compile_part(model, part):
    """A function computing model.forward_with_cfg with `part` compiled, the rest eager."""
    import copy
    import torch
    twin = copy.deepcopy(model)
    if part == "whole":
        twin.forward = torch.compile(twin.forward)
    elif part == "embed":
        twin.x_embedder = torch.compile(twin.x_embedder)
        twin.t_embedder = torch.compile(twin.t_embedder)
    elif part == "final":
        twin.final_layer = torch.compile(twin.final_layer)
    else:
        for block in twin.blocks:
            if part == "block":
                block.forward = torch.compile(block.forward)
            elif part == "adaln":
                block.adaLN_modulation = torch.compile(block.adaLN_modulation)
            else:
                setattr(block, part, torch.compile(getattr(block, part)))
    return lambda x, t, y: twin.forward_with_cfg(x, t, y, 1.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=PARTS, default="whole")
    parser.add_argument("--isa", choices=["default", "avx2", "avx512"], default="default",
                        help="ATEN_CPU_CAPABILITY of the child (ATen kernels and inductor's vector ISA)")
    parser.add_argument("--simdlen", type=int, default=0, help="torch._inductor.config.cpp.simdlen (0: inductor's)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch (doubled for guidance)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    env = dict(os.environ)
    if args.isa != "default":
        env["ATEN_CPU_CAPABILITY"] = args.isa
    if os.path.exists(MALLOC_DEBUG):  # glibc >= 2.34 checks heap consistency only with this preloaded
        env.update(LD_PRELOAD=MALLOC_DEBUG, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    command = [sys.executable, os.path.abspath(__file__), "--child", *sys.argv[1:]]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        name = signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit {done.returncode}"
        print(f"CRASH ({name}) with {' '.join(sys.argv[1:]) or 'defaults'}:\n{done.stderr[-1500:]}")
        return 2
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"no crash with {' '.join(sys.argv[1:]) or 'defaults'}: {result}")
    return 0 if result["max_abs_difference"] < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())

"""How long `python SCRIPT --help` takes for every script (a benchmark, not a test).

    python bench/bench_help.py                       # this checkout, 3 runs per script
    python bench/bench_help.py --against /tmp/old    # ABBA against another checkout (e.g. git archive of main)

Prints, per script, the median wall time and the median CPU time (user + sys of the child: less
sensitive to other jobs on a shared machine than the wall time) of each variant, and with
--against every A/B pair and the ratio of the medians. `--help` must not import torch, diffusers
or TensorFlow where the flags can be parsed without them.
"""
import argparse
import glob
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts(root):
    found = sorted(os.path.basename(path) for path in glob.glob(os.path.join(root, "*.py")) if "models.py" not in path)
    return found + sorted(os.path.relpath(path, root) for path in glob.glob(os.path.join(root, "tools", "*.py")))


def time_help(root, script):
    """(wall seconds, CPU seconds) of one `python script --help` run in `root`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(root, script), "--help"], cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"error: {script} --help failed in {root}:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(args):
    roots = [os.path.abspath(args.root)] + ([os.path.abspath(args.against)] if args.against else [])
    names = scripts(roots[0])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeat} runs per script"
          + (f"; A = {roots[0]}, B = {roots[1]} (ABBA)" if args.against else ""))
    for script in names:
        if not all(os.path.isfile(os.path.join(root, script)) for root in roots):
            continue
        runs = {root: [] for root in roots}
        for repeat in range(args.repeat):
            order = roots if repeat % 2 == 0 else roots[::-1]  # ABBA: drift hits both variants alike
            for root in order:
                runs[root].append(time_help(root, script))
        cells = []
        for label, root in zip("AB", roots):
            wall = statistics.median(w for w, _ in runs[root])
            cpu = statistics.median(c for _, c in runs[root])
            cells.append(f"{label}: wall {wall:5.2f}s cpu {cpu:5.2f}s")
        line = f"{script:32s} " + "   ".join(cells)
        if args.against:
            a, b = (statistics.median(c for _, c in runs[root]) for root in roots)
            pairs = " ".join(f"{ca:.2f}/{cb:.2f}" for (_, ca), (_, cb) in zip(runs[roots[0]], runs[roots[1]]))
            line += f"   A/B cpu {a / b:4.2f}x  pairs(cpu) {pairs}"
        print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=ROOT, help="checkout whose scripts are timed (A)")
    parser.add_argument("--against", default=None, help="a second checkout to compare with (B)")
    parser.add_argument("--repeat", type=int, default=3)
    main(parser.parse_args())

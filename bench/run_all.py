"""Run every benchmark of bench/ in one process and write one JSON file: the machine (CPU model,
cores, torch version, native bf16), the load average before and after each benchmark, and each
benchmark's figures and printed output. `python bench/report.py <json>` turns it into the
README's "Our measurements" table.

    python bench/run_all.py --quick --out bench/results.json
    python bench/run_all.py --only forward precision --out /tmp/some.json
    python bench/run_all.py --quick --only prune --update bench/results.json   # rerun one, keep the others

With --update, the named benchmarks are rerun and replace their records in an existing JSON;
each replaced record carries its own machine and date, which the report prints on its rows.

--quick uses small configurations (minutes, not hours, on a 2-core CPU); the figures are ratios
of variants alternated in the same run, so they stay comparable on a loaded machine.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.harness import load_average, machine_info  # noqa: E402

# name: (module, arguments with --quick, arguments without)
BENCHES = {
    "forward": ("bench.bench_forward", ["--quick", "--threads", "1"], ["--threads", "1"]),
    "forward_2_threads": ("bench.bench_forward", ["--quick", "--threads", "2"], ["--threads", "2"]),
    "precision": ("bench.bench_precision", ["--model", "DiT-S/2", "--input-size", "8", "--images", "2", "--steps", "2",
                                            "--rounds", "4"], []),
    "precision_256": ("bench.bench_precision", ["--model", "DiT-XL/2", "--input-size", "32", "--images", "2",
                                                "--steps", "2", "--rounds", "3"], []),  # DiT-XL/2 at 256 px
    "train": ("bench.bench_train", ["--quick", "--threads", "1"], ["--threads", "1"]),
    "model": ("bench.bench_model", ["--quick"], []),
    "prune": ("bench.bench_prune", ["--threads", "1", "--latent-size", "16", "--steps", "4", "--batch-size", "8",
                                    "--train", "lora"], []),
    "eval": ("bench.bench_eval", ["--num", "2000", "--threads", "1", "--repeats", "2"], ["--threads", "1"]),
    "features": ("bench.bench_features", ["--num-images", "200"], []),
    "lora": ("bench.bench_lora", ["--pairs", "4"], []),
    "compile": ("bench.bench_compile", ["--quick", "--threads", "1"], ["--threads", "1"]),  # minutes of compiling
}
DEFAULT = [name for name in BENCHES if name != "compile"]  # --only compile to include it


class Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.stream.write(text)
        self.parts.append(text)
        return len(text)

    def flush(self):
        self.stream.flush()


def run_bench(name, quick):
    import importlib
    module_name, quick_args, full_args = BENCHES[name]
    module = importlib.import_module(module_name)
    argv = quick_args if quick else full_args
    threads = torch.get_num_threads()
    tee = Tee(sys.stdout)
    record = dict(command=f"python {module_name.replace('.', '/')}.py {' '.join(argv)}".strip(),
                  load_before=load_average())
    start = time.time()
    try:
        with contextlib.redirect_stdout(tee):
            args = module.build_parser().parse_args(argv) if hasattr(module, "build_parser") else None
            record["result"] = module.main(args)
    except Exception:  # one failing benchmark must not lose the others' figures
        record["error"] = traceback.format_exc()
        print(record["error"])
    finally:
        torch.set_num_threads(threads)
    record.update(seconds=time.time() - start, load_after=load_average(), output="".join(tee.parts))
    return record


def update(args, names):
    """Rerun `names` and replace their records in the JSON file args.update."""
    with open(args.update) as handle:
        report = json.load(handle)
    if report["quick"] != args.quick:
        raise SystemExit(f"error: {args.update} holds {'--quick' if report['quick'] else 'full'} configurations; "
                         f"rerun with the same setting")
    for name in names:
        print(f"\n===== {name} =====", flush=True)
        record = run_bench(name, args.quick)
        record.update(machine=machine_info(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
        report["benches"][name] = record
    with open(args.update + ".part", "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    os.replace(args.update + ".part", args.update)
    print(f"\nupdated {args.update}")


def main(args):
    names = args.only or DEFAULT
    unknown = [name for name in names if name not in BENCHES]
    if unknown:
        raise SystemExit(f"error: unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    if args.update:
        return update(args, names)
    report = dict(machine=machine_info(), quick=args.quick, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  load_before=load_average(), benches={})
    for name in names:
        print(f"\n===== {name} =====", flush=True)
        report["benches"][name] = run_bench(name, args.quick)
        with open(args.out + ".part", "w") as handle:  # partial results survive an interrupted run
            json.dump(report, handle, indent=1, default=str)
    report["load_after"] = load_average()
    with open(args.out + ".part", "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    os.replace(args.out + ".part", args.out)
    print(f"\nwrote {args.out}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small configurations")
    parser.add_argument("--only", nargs="+", default=None, help=f"some of: {', '.join(BENCHES)}")
    parser.add_argument("--out", default="bench/results.json")
    parser.add_argument("--update", default=None, metavar="JSON",
                        help="rerun the --only benchmarks and replace their records in this JSON")
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

"""Timing that a loaded, shared machine cannot fool: variants alternate within one run.

`alternate(variants, rounds)` times every variant once per round, in ABBA order (round r runs
the variants forwards when r is even, backwards when odd), so a load change during the run hits
every variant alike. Each result keeps every time, so a report can show the median and every
pair; comparisons are ratios of per-round pairs (variant / baseline in the same round), whose
median is robust to a round that ran under a load spike.
"""
import os
import platform
import statistics
import time

import torch

from tinyfusion.sampling.precision import native_low_precision


def timed_call(fn, device="cpu"):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(variants, rounds, warmup=1, device="cpu", cpu_times=None):
    """{name: [seconds per round]} for {name: fn}, variants alternated ABBA, after `warmup`
    untimed calls of each. A dict passed as `cpu_times` receives {name: [process CPU seconds per
    round]} (user + system over all threads): on one thread this is the work done, which other
    jobs' load does not stretch the way it stretches wall time."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for name in names if cpu_times is not None else ():
        cpu_times[name] = []
    for round_index in range(rounds):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            cpu_start = time.process_time()
            times[name].append(timed_call(variants[name], device))
            if cpu_times is not None:
                cpu_times[name].append(time.process_time() - cpu_start)
    return times


def pair_ratios(times, variant, baseline):
    """Per-round ratios time[variant] / time[baseline]."""
    return [v / b for v, b in zip(times[variant], times[baseline])]


def summary(times, variant, baseline):
    """A JSON-ready record of one comparison: medians, every time, every per-round ratio and
    their median (the figure to quote)."""
    ratios = pair_ratios(times, variant, baseline)
    return dict(variant=variant, baseline=baseline, variant_s=times[variant], baseline_s=times[baseline],
                variant_median_s=statistics.median(times[variant]),
                baseline_median_s=statistics.median(times[baseline]),
                ratios=ratios, ratio_median=statistics.median(ratios))


def print_comparison(record, label, goal=None, unit_ms=True):
    """Median of each variant, every pair and the median per-pair ratio in one block."""
    scale, unit = (1000, "ms") if unit_ms else (1, "s")
    print(f"{label}: {record['variant']} {record['variant_median_s'] * scale:.1f} {unit}, "
          f"{record['baseline']} {record['baseline_median_s'] * scale:.1f} {unit} (medians) -> "
          f"{record['variant']}/{record['baseline']} = {record['ratio_median']:.3f}x (median of per-round pairs)"
          + (f"; goal {goal}" if goal else ""))
    pairs = ", ".join(f"{v * scale:.0f}/{b * scale:.0f}={r:.2f}" for v, b, r in
                      zip(record["variant_s"], record["baseline_s"], record["ratios"]))
    print(f"    pairs ({unit}): {pairs}")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """What the figures were measured on."""
    info = dict(cpu=cpu_model(), cores=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                native_bf16_cpu=native_low_precision(torch.bfloat16, "cpu"),
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    return info


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def write_json(path, result):
    """A benchmark's result as JSON at `path` (nothing without a path); returns the result."""
    if path:
        import json
        with open(path, "w") as handle:
            json.dump(result, handle, indent=1)
    return result

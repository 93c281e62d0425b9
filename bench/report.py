"""The measurements table of docs/measurements.md from a bench/run_all.py JSON file.

    python bench/report.py bench/results.json                               # markdown on stdout
    python bench/report.py bench/results.json --write docs/measurements.md  # replace the page's table

With --write, the text between the page's BEGIN/END markers is replaced, so no bench figure in
the page is typed by hand (tests/test_bench_harness.py checks that the page holds exactly this).
"""
import argparse
import json
import os


def _pct(value):
    return f"{100 * value:.0f}%"


def _x(value):
    return f"{value:.2f}x"


def rows_of(name, result):
    """(what, measured, goal) rows of one benchmark's figures."""
    if name.startswith("forward"):
        threads = result["config"]["threads"]
        eff = result["efficiency"]
        return [(f"fp32 forward FLOP rate / GEMM rate, {result['config']['model']} batch "
                 f"{result['config']['batch_size']}, {threads} thread(s): now (before)",
                 f"{_pct(eff['current']['median'])} ({_pct(eff['legacy']['median'])})", ">= 70%"),
                (f"fp32 forward time now / before, {threads} thread(s)", _x(result["current_vs_legacy"]["ratio_median"]),
                 "< 1x, outputs within 1e-6")]
    if name.startswith("precision"):
        config, cmp = result["config"], result["comparisons"]
        native = "native" if config["native_low_precision"] else "emulated (no native bf16 on this CPU)"
        return [(f"sampling images/s, {config['dtype']} weights cast once / fp32, {config['model']} ({native})",
                 _x(1 / cmp["cast-once vs fp32"]["ratio_median"]), ">= 2.5x"),
                (f"sampling time, cast once / autocast re-casting ({config['dtype']})",
                 _x(cmp["cast-once vs autocast"]["ratio_median"]),
                 "< 1x, identical output" + (" (yes)" if result["identical_to_autocast"] else " (NO)"))]
    if name == "train":
        rows = []
        for label, record in result["comparisons"].items():
            if label.endswith("vs plain"):
                teacher = label.split()[0].replace("kd-", "").replace("before", "as before (no_grad, autocast)")
                rows.append((f"Masked KD step / plain fine-tuning step, teacher {teacher}",
                             _x(record["ratio_median"]), "<= 1.3x"))
        terms = result["loss_terms"]
        for teacher, values in terms.items():
            if teacher not in ("fp32", "before"):
                change = max(abs(values[k] - terms["fp32"][k]) / max(abs(terms["fp32"][k]), 1e-12)
                             for k in ("kd", "feat"))
                rows.append((f"loss terms kd/feat, teacher {teacher} vs fp32: largest relative change",
                             f"{change:.1e}", "report"))
        return rows
    if name == "model":
        rows = []
        if result.get("depth"):
            rows.append(("DiT-D14/2 forward speed-up over DiT-XL/2", _x(result["depth"]["d14_speedup"]), ">= 1.95x"))
        for label, row in (result.get("gated") or {}).items():
            rows.append((f"gated step sparse / dense ({label}): time, peak memory",
                         f"{_x(row['time_ratio'])}, {_x(row['peak_ratio'])}", "<= 0.75x, <= 0.7x"))
        return rows
    if name == "prune":
        return [(f"learnable-pruning step ours / original, batch {row['batch_size']}, {row['threads']} thread(s), "
                 f"{row['train']}: time, peak memory (with --recompute-elementwise)",
                 f"{_x(row['time_ratio'])}, {_x(row['memory_ratio'])} ({_x(row['recompute_time_ratio'])}, "
                 f"{_x(row['recompute_memory_ratio'])})", "<= 0.70x, <= 0.5x") for row in result["configs"]]
    if name == "eval":
        return [(f"evaluator {label}: speed-up over NumPy float64", _x(row["speedup"]), "> 1x")
                for label, row in result.items()]
    if name == "features":
        return [("feature extraction speed-up over the original", _x(result["extraction_speedup"]), ">= 3x"),
                ("files written ours (original)", f"{result['files_ours']} ({result['files_original']})",
                 "<= 2 + shards"),
                ("feature read speed-up", _x(result["read_speedup"]), "> 1x")]
    if name == "compile":
        return [("sampling forward, torch.compile / eager (after compiling)", _x(result["comparison"]["ratio_median"]),
                 f"report (compiled {result['graphs_compiled']} graph(s) in {result['compile_seconds']:.0f} s)")]
    if name == "lora":
        return [("LoRA forward+backward time, ours / peft", _x(result["ratio_ours_over_peft"]), "~1x")]
    return []


def render(report):
    machine = report["machine"]
    lines = [f"Measured {report['started']} on {machine['cpu']} ({machine['cores']} cores, {machine['cpu_capability']}, "
             f"native bf16 matmul: {machine['native_bf16_cpu']}), torch {machine['torch']}, "
             f"{'--quick' if report['quick'] else 'full'} configurations; load average (1/5/15 min) "
             f"{_load(report['load_before'])} before, {_load(report.get('load_after'))} after. Every ratio is the "
             f"median of per-round ratios of variants alternated ABBA in the same run.", "",
             "| benchmark | measurement | result | goal | command |", "|---|---|---|---|---|"]
    for name, bench in report["benches"].items():
        if "error" in bench or bench.get("result") is None:
            lines.append(f"| {name} | failed (see the JSON) | | | `{bench['command']}` |")
            continue
        when = _rerun_note(bench, machine)
        for what, measured, goal in rows_of(name, bench["result"]):
            lines.append(f"| {name} | {what}{when} | {measured} | {goal} | `{bench['command']}` |")
    return "\n".join(lines)


def _rerun_note(bench, machine):
    """Where a record was rerun alone (run_all.py --update): its date, and its CPU if another."""
    if "started" not in bench:
        return ""
    other = bench["machine"]
    cpu = "" if (other["cpu"], other["cpu_capability"]) == (machine["cpu"], machine["cpu_capability"]) else \
        f" on {other['cpu']} ({other['cpu_capability']}, native bf16 matmul: {other['native_bf16_cpu']})"
    return f" (rerun {bench['started']}{cpu})"


def _load(values):
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


BEGIN = "<!-- BEGIN bench/report.py: generated, do not edit -->"
END = "<!-- END bench/report.py -->"


def replace_generated(page, table):
    """`page` with the text between its BEGIN and END markers replaced by `table`."""
    start, end = page.find(BEGIN), page.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"error: the page has no {BEGIN} ... {END} section to replace")
    return page[:start + len(BEGIN)] + "\n" + table + "\n" + page[end:]


def write_generated(path, table):
    """Replace the generated section of the page at `path` with `table` (atomically)."""
    with open(path) as handle:
        page = replace_generated(handle.read(), table)
    with open(path + ".tmp", "w") as handle:
        handle.write(page)
    os.replace(path + ".tmp", path)


def main(args):
    with open(args.results) as handle:
        table = render(json.load(handle))
    if args.write is None:
        print(table)
        return
    write_generated(args.write, table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a bench/run_all.py JSON file")
    parser.add_argument("--write", default=None, metavar="PAGE", help="replace the generated section of this page")
    main(parser.parse_args())

"""bench/harness.py alternates variants ABBA and quotes the median of per-round ratios;
bench/report.py renders a run_all JSON into the README table."""
import bench.report as report
from bench import harness


def test_alternation_is_abba_and_ratios_are_per_round():
    calls = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.alternate(variants, rounds=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(times["a"]) == len(times["b"]) == 4
    record = harness.summary({"a": [2.0, 3.0, 9.0], "b": [1.0, 2.0, 3.0]}, "a", "b")
    assert record["ratios"] == [2.0, 1.5, 3.0] and record["ratio_median"] == 2.0
    assert record["variant_median_s"] == 3.0 and record["baseline_median_s"] == 2.0


def test_report_renders_each_goal_row():
    forward = dict(config=dict(threads=1, model="DiT-B/2", batch_size=2),
                   efficiency=dict(current=dict(median=0.86), legacy=dict(median=0.74)),
                   current_vs_legacy=dict(ratio_median=0.84))
    data = dict(machine=dict(cpu="cpu", cores=2, cpu_capability="AVX2", native_bf16_cpu=False, torch="2"),
                started="now", quick=True, load_before=[1.0, 2.0, 3.0], load_after=None,
                benches=dict(forward=dict(command="python bench/bench_forward.py", result=forward),
                             lora=dict(command="python bench/bench_lora.py", error="Traceback"),
                             prune=dict(command="python bench/bench_prune.py", result=dict(configs=[dict(
                                 batch_size=16, threads=2, train="lora", time_ratio=0.72, memory_ratio=0.54,
                                 recompute_time_ratio=0.86, recompute_memory_ratio=0.44)]))))
    table = report.render(data)
    assert ("| learnable-pruning step ours / original, batch 16, 2 thread(s), lora: time, peak memory (with "
            "--recompute-elementwise) | 0.72x, 0.54x (0.86x, 0.44x) | <= 0.70x, <= 0.5x |") in table
    assert "| 86% (74%) | >= 70% |" in table and "| 0.84x |" in table
    assert "| lora | failed (see the JSON) |" in table


def test_a_rerun_record_names_its_date_and_its_other_cpu():
    machine = dict(cpu="cpu A", cores=2, cpu_capability="AVX2", native_bf16_cpu=False, torch="2")
    other = dict(machine, cpu="cpu B", cpu_capability="AVX512", native_bf16_cpu=True)
    lora = dict(command="python bench/bench_lora.py", result=dict(ratio_median=0.9))
    assert report._rerun_note(lora, machine) == ""
    assert report._rerun_note(dict(lora, started="d1", machine=machine), machine) == " (rerun d1)"
    assert report._rerun_note(dict(lora, started="d1", machine=other), machine) == \
        " (rerun d1 on cpu B (AVX512, native bf16 matmul: True))"


def test_the_measurements_page_holds_exactly_the_generated_table():
    """docs/measurements.md's table is bench/report.py's rendering of bench/results.json, untouched
    (regenerate: python bench/report.py bench/results.json --write docs/measurements.md)."""
    import json
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "bench", "results.json")) as handle:
        table = report.render(json.load(handle))
    with open(os.path.join(root, "docs", "measurements.md")) as handle:
        page = handle.read()
    assert report.replace_generated(page, table) == page

"""Time and peak memory of one learnable-pruning step: ours (prune_by_learning.py's step: the
sparse gated forward, LoRA, EMA of the trainable parameters only), also with
--recompute-elementwise, against the original algorithm written out here (every block run with
autograd on every sample and mixed as m*block(x) + (1-m)*x, LoRA, EMA of the full model updated
by a per-tensor loop), same config, same optimizer, same loss. Goals: time <= 0.70x, memory <= 0.5x, at batch 8 and 16, with 1 and
2 threads, LoRA and all-weights training.

    python bench/bench_prune.py                       # the goal's matrix: batch 8 16 x threads 1 2 x lora weights
    python bench/bench_prune.py --batch-size 8 --threads 1 --train lora   # one configuration
    python bench/bench_prune.py --latent-size 16 --train logits           # smaller tokens, only the gates train
    python bench/bench_prune.py --crossover --batch-size 8 --threads 1 --train lora   # one block: split or not
    python bench/bench_prune.py --compile-gain --batch-size 8 --threads 1 --train lora  # --compile vs eager

The model is DiT-S/2's width with 28 blocks in [[1,2]]*14 groups, on 32x32x4 latents (256 tokens
per sample, as DiT-XL/2 at 256 px), fp32 on CPU. Time: the two steps alternate ABBA in one process
(a busy machine slows both alike), median of the per-round ratios over --steps rounds after a
warm-up step each; every pair is printed, with the load average before and after each
configuration. Memory: each variant runs alone in a fresh subprocess, and its peak resident set
(VmHWM, the kernel's high-water mark, which sees every allocation torch makes) minus the resident
set after imports is reported: model, EMA, optimizer state and the step's activations.
"""
import argparse
import copy
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.harness import alternate, load_average, machine_info, print_comparison, summary, write_json  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from tinyfusion.training.ema import ParameterEMA  # noqa: E402
from tinyfusion.pruning.lora import apply_lora  # noqa: E402
from models import DiT_models, StraightThroughGate  # noqa: E402
from tinyfusion.pruning.gate_search import pruning_loss  # noqa: E402
from tinyfusion.training.gradients import clip_grad_norm  # noqa: E402
from tinyfusion.training.loop import AutocastForward  # noqa: E402


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mb():
    """This process's resident-set high-water mark (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that over from the parent across fork + exec, so a subprocess of a bench that already holds
    several GB would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(args, seed=0):
    torch.manual_seed(seed)
    model = DiT_models[args.model](input_size=args.latent_size, in_channels=4, num_classes=1000, depth=args.depth,
                                   groups=[[1, 2]] * (args.depth // 2))
    for block in model.blocks:  # trained-like adaLN, so blocks are not identities
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    if args.train == "lora":
        apply_lora(model, rank=8)
    else:  # "weights": every weight trains (--delta-w alone); "logits": only the gates (no --delta-w)
        for name, param in model.named_parameters():
            param.requires_grad_(args.train == "weights" and name != "pos_embed")
    for logits in model.gate_logits:
        logits.requires_grad_(True)
    model.tau, model.scaling = 1.0, 100.0
    return model.train()


def make_optimizer(model):
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("gate_logits")]
    return torch.optim.AdamW([{"params": weights, "lr": 1e-4},
                              {"params": list(model.gate_logits), "lr": 1e-3}], weight_decay=0)


class OursStep:
    """prune_by_learning.py's step (one rank): sparse gated forward inside the model, EMA of the
    trainable parameters only."""

    def __init__(self, args):
        self.model = build(args)
        self.model.gate_forward = "sparse"
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model)
        self.ema = ParameterEMA([(n, p) for n, p in self.model.named_parameters() if p.requires_grad], 0.999)
        self.forward = AutocastForward(self.model, torch.float32, torch.device("cpu"))
        self.diffusion = create_diffusion("")

    def __call__(self, x, y):
        loss = pruning_loss(self.forward, self.diffusion, x, y)
        loss.backward()
        clip_grad_norm(self.trainable, 1.0)
        self.optimizer.step()
        self.ema.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class OriginalStep:
    """The original algorithm: all blocks run with autograd for every sample, each output mixed
    as m*block(x) + (1-m)*x, and an EMA copy of the whole model updated tensor by tensor."""

    def __init__(self, args):
        self.model = build(args)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.model)
        self.diffusion = create_diffusion("")

    def gated_forward(self, x, t, y):
        model = self.model
        masks = model.block_masks_from_onehots(model.sample_gate_onehots(x.shape[0]))
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, model.training)
        for index, block in enumerate(model.blocks):
            m = masks[:, index].view(-1, 1, 1)
            h = m * block(h, c) + (1 - m) * h
        return model.unpatchify(model.final_layer(h, c))

    @torch.no_grad()
    def update_ema(self, decay=0.999):
        ema_params = dict(self.ema_model.named_parameters())
        for name, param in self.model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def __call__(self, x, y):
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],))
        loss = self.diffusion.training_losses(self.gated_forward, x, t, dict(y=y))["loss"].mean()
        loss.backward()
        clip_grad_norm(self.trainable, 1.0)
        self.optimizer.step()
        self.update_ema()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class OursRecomputeStep(OursStep):
    """Our step with --recompute-elementwise (selective recomputation in the gated blocks)."""

    def __init__(self, args):
        super().__init__(args)
        self.model.gate_recompute_elementwise = True


VARIANTS = {"ours": OursStep, "ours-recompute": OursRecomputeStep, "original": OriginalStep}
TIME_GOAL, MEMORY_GOAL = 0.70, 0.5


def batch(args, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=generator)
    y = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    return x, y


def memory_of(variant, args):
    """Run one variant alone in this process: peak RSS above the post-import RSS."""
    baseline = rss_mb()
    step = VARIANTS[variant](args)
    x, y = batch(args, 0)
    for _ in range(2):  # the second step has the optimizer state allocated
        step(x, y)
    return {"variant": variant, "peak_mb": peak_rss_mb() - baseline}


def measure_memory(config):
    """{variant: peak MB}, each variant alone in a fresh subprocess."""
    memory = {}
    for variant in VARIANTS:
        command = [sys.executable, os.path.abspath(__file__), "--memory-only", variant, "--model", config.model,
                   "--depth", str(config.depth), "--batch-size", str(config.batch_size), "--latent-size",
                   str(config.latent_size), "--threads", str(config.threads), "--train", config.train]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        memory[variant] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
    return memory


def measure_config(config):
    """One configuration: peak memory of each variant, then the steps alternated ABBA (ABC CBA)."""
    torch.set_num_threads(config.threads)
    load_before = load_average()
    trains = {"lora": "LoRA rank 8 + logits", "weights": "all weights + logits", "logits": "logits only"}[config.train]
    print(f"\n== batch {config.batch_size}, {config.threads} thread(s), {trains} train "
          f"(load average {_load(load_before)})")
    memory = measure_memory(config)
    print("  peak memory: " + ", ".join(f"{variant} {mb:.1f} MB" for variant, mb in memory.items()))
    steps = {variant: cls(config) for variant, cls in VARIANTS.items()}
    batches = {variant: iter(range(10 ** 6)) for variant in VARIANTS}  # each variant sees batch 0, 1, 2, ...
    calls = {variant: (lambda variant=variant: steps[variant](*batch(config, next(batches[variant]))))
             for variant in VARIANTS}
    cpu_times = {}
    times = alternate(calls, rounds=config.steps, cpu_times=cpu_times)
    result = dict(batch_size=config.batch_size, threads=config.threads, train=config.train, peak_mb=memory,
                  load_before=load_before)
    for variant, key in (("ours", ""), ("ours-recompute", "recompute_")):
        record, cpu_record = summary(times, variant, "original"), summary(cpu_times, variant, "original")
        print_comparison(record, f"  wall time per step, {variant}")
        print_comparison(cpu_record, f"  CPU time per step, {variant}")
        result.update({f"{key}time_ratio": record["ratio_median"], f"{key}cpu_time_ratio": cpu_record["ratio_median"],
                       f"{key}memory_ratio": memory[variant] / memory["original"], f"{key}time": record,
                       f"{key}cpu_time": cpu_record})
        print(f"  {variant} / original: wall time {record['ratio_median']:.3f}x (goal <= {TIME_GOAL}x), CPU time "
              f"{cpu_record['ratio_median']:.3f}x, memory {memory[variant] / memory['original']:.3f}x "
              f"(goal <= {MEMORY_GOAL}x)")
    result["load_after"] = load_average()
    print(f"  load average after {_load(result['load_after'])}")
    return result


def _load(values):
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def print_table(results):
    print("\n| batch | threads | trains | time ours/original (median; every pair) | peak memory ours/original "
          "| with --recompute-elementwise: time, memory | load before -> after |\n|---|---|---|---|---|---|---|")
    for row in results:
        pairs = ", ".join(f"{ratio:.2f}" for ratio in row["time"]["ratios"])
        print(f"| {row['batch_size']} | {row['threads']} | {row['train']} | {row['time_ratio']:.3f}x ({pairs}) | "
              f"{row['memory_ratio']:.3f}x ({row['peak_mb']['ours']:.0f}/{row['peak_mb']['original']:.0f} MB) | "
              f"{row['recompute_time_ratio']:.3f}x, {row['recompute_memory_ratio']:.3f}x | "
              f"{_load(row['load_before'])} -> {_load(row['load_after'])} |")


def one_block_step(model, block, x, c, on, min_dropped_rows):
    """One gated block's forward and backward as the sparse forward runs it, with the split rule
    `min_dropped_rows` (0: always split off the dropped samples, huge: never)."""
    model.gate_split_min_dropped_rows = min_dropped_rows
    mask = on.to(x.dtype).requires_grad_(True)
    kept, delta = model._kept_and_delta(block, x, c, on)
    out = StraightThroughGate.apply(kept, mask, delta)
    out.backward(torch.ones_like(out))


def measure_crossover(args):
    """Per block: for every number of dropped samples, the split (kept samples with autograd, the
    dropped ones in a second call without) against one autograd pass over the whole batch,
    alternated ABBA. Prints the time ratio split / one pass against the dropped token rows."""
    torch.set_num_threads(args.threads[0])
    config = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size[0], "train": args.train[0]})
    model = build(config)
    block, batch_size, tokens = model.blocks[0], config.batch_size, model.pos_embed.shape[1]
    x = torch.randn(batch_size, tokens, model.pos_embed.shape[2], requires_grad=True)
    c = torch.randn(batch_size, x.shape[-1])
    print(f"{machine_info()}\none block of {config.model} width, {tokens} tokens per sample, batch {batch_size}, "
          f"{config.train} trains, {torch.get_num_threads()} thread(s); load average {_load(load_average())}")
    rows = []
    for dropped in range(1, batch_size):
        on = torch.arange(batch_size) >= dropped
        calls = {"split": lambda: one_block_step(model, block, x, c, on, 0),
                 "one pass": lambda: one_block_step(model, block, x, c, on, 10 ** 12)}
        record = summary(alternate(calls, rounds=args.steps), "split", "one pass")
        print_comparison(record, f"  {dropped} of {batch_size} dropped ({dropped * tokens} token rows)")
        rows.append(dict(dropped=dropped, dropped_rows=dropped * tokens, ratio=record["ratio_median"], time=record))
    cheaper = [row["dropped_rows"] for row in rows if row["ratio"] < 1]
    print(f"split cheaper from {min(cheaper) if cheaper else 'never'} dropped token rows "
          f"(load average {_load(load_average())})")
    return write_json(args.json, dict(crossover=rows, machine=machine_info()))


def measure_compile_gain(args):
    """prune_by_learning.py --compile: our step with every block compiled (inductor) against the
    eager step, alternated ABBA after --compile-warmup untimed steps each (they compile every
    variant the random masks bring); the graphs compiled during the timed steps are counted."""
    import time

    import torch._dynamo
    from torch._dynamo.utils import counters
    torch.set_num_threads(args.threads[0])
    config = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size[0], "train": args.train[0]})
    steps = {"compiled": OursStep(config), "eager": OursStep(config)}
    steps["compiled"].model.compile_gated_blocks()
    batches = {variant: iter(range(10 ** 6)) for variant in steps}
    calls = {variant: (lambda variant=variant: steps[variant](*batch(config, next(batches[variant]))))
             for variant in steps}
    print(f"{machine_info()}\nour pruning step, {config.model} width, depth {config.depth}, batch {config.batch_size}, "
          f"4x{config.latent_size}x{config.latent_size} latents, {config.train} trains, {torch.get_num_threads()} "
          f"thread(s); load average {_load(load_average())}")
    start = time.perf_counter()
    for _ in range(args.compile_warmup):
        calls["compiled"]()
    warmup_seconds, graphs_before = time.perf_counter() - start, counters["stats"]["unique_graphs"]
    record = summary(alternate(calls, rounds=args.steps), "compiled", "eager")
    graphs_after = counters["stats"]["unique_graphs"]
    print(f"  {args.compile_warmup} warm-up steps (compiling) {warmup_seconds:.0f} s, {graphs_before} graphs; "
          f"graphs compiled during the timed steps: {graphs_after - graphs_before}")
    print_comparison(record, "  step time")
    print(f"  compiled / eager: {record['ratio_median']:.3f}x (load average {_load(load_average())})")
    return write_json(args.json, dict(compile=dict(time=record, ratio=record["ratio_median"],
                                                   warmup_seconds=warmup_seconds, graphs=graphs_before,
                                                   graphs_during_timed_steps=graphs_after - graphs_before),
                                      machine=machine_info()))


def main(args):
    if args.crossover:
        return measure_crossover(args)
    if args.compile_gain:
        return measure_compile_gain(args)
    if args.memory_only:
        torch.set_num_threads(args.threads[0])
        config = argparse.Namespace(**{**vars(args), "threads": args.threads[0], "batch_size": args.batch_size[0],
                                       "train": args.train[0]})
        print(json.dumps(memory_of(args.memory_only, config)))
        return
    print(f"{machine_info()}\nconfig: {args.model} width, depth {args.depth}, groups [[1,2]]*{args.depth // 2}, "
          f"4x{args.latent_size}x{args.latent_size} latents, fp32 on CPU, {args.steps} ABBA rounds per configuration")
    results = []
    for train in args.train:
        for threads in args.threads:
            for batch_size in args.batch_size:
                config = argparse.Namespace(**{**vars(args), "threads": threads, "batch_size": batch_size,
                                               "train": train})
                results.append(measure_config(config))
    print_table(results)
    worst = {key: max(row[key] for row in results)
             for key in ("time_ratio", "memory_ratio", "recompute_time_ratio", "recompute_memory_ratio")}
    print(f"worst over the {len(results)} configuration(s): time {worst['time_ratio']:.3f}x, memory "
          f"{worst['memory_ratio']:.3f}x; with --recompute-elementwise time {worst['recompute_time_ratio']:.3f}x, "
          f"memory {worst['recompute_memory_ratio']:.3f}x")
    return write_json(args.json, dict(configs=results, **worst, machine=machine_info()))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-S/2", help="width/heads/patch of this DiT config")
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--train", choices=["lora", "weights", "logits"], nargs="+", default=["lora", "weights"],
                        help="what trains: --delta-w --lora, --delta-w alone (weights), or the logits only")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--crossover", action="store_true",
                        help="time one block's split against one autograd pass for every number of dropped samples")
    parser.add_argument("--compile-gain", action="store_true",
                        help="time our step with compiled blocks (prune_by_learning.py --compile) against eager")
    parser.add_argument("--compile-warmup", type=int, default=4, help="untimed compiled steps before timing")
    parser.add_argument("--memory-only", choices=list(VARIANTS), default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())

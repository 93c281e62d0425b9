"""
Sample a large batch of images from a DiT with any number of ranks and write the `.npz` that
evaluator.py reads (ADM format: `arr_0` (N, H, W, 3) uint8, plus `labels`).

Sample i is generated from seeds derived from (--global-seed, i): its random label, its initial
noise and every per-step noise. The images therefore do not depend on the world size or
--per-proc-batch-size. Each rank writes its finished batches as atomic part files in
`{sample-dir}/{run name}/parts/`; `--resume` keeps them and samples only what is missing (with any
world size and batch size); rank 0 finally streams the parts in index order into
`{sample-dir}/{run name}.npz` (no PNG round trip; `--save-png` also writes `{index:06d}.png`).
Across nodes, --sample-dir must be on a filesystem every node sees (as in the original).

    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --model DiT-D14/2 \
        --ckpt outputs/D14-Learned-MaskedKD-DiT-D14-2/checkpoints/0500000.pt --num-fid-samples 50000
"""
import os
import shutil
import time

from tinyfusion.flags import ArgumentParser, add_sample_batch_args
from tinyfusion.errors import TinyFusionError, run_main, unwritable_message


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    add_sample_batch_args(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    # the flags are parsed before the imports below: torch alone takes seconds to import, and
    # --help or a bad flag should answer at once
    ARGS = parse_args()

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from tinyfusion.io.atomic_files import atomic_write_json
from tinyfusion.families.build import build_model
from tinyfusion.distributed import barrier, broadcast_object, cleanup_distributed, setup_distributed
from tinyfusion.io.finite import NonFiniteOutput, count_non_finite, non_finite_output_message
from tinyfusion.sampling.precision import cast_weights_once, resolve_sampling_precision
from tinyfusion.io.run_lock import release_folder
from tinyfusion.io.run_folder import MetricsLog, create_logger
from tinyfusion.sampling.batch_settings import batch_name, check_batch_args
from tinyfusion.sampling.part_store import IDENTITY_KEYS, assemble, plan_run, weights_sha256, write_part
from tinyfusion.sampling.generate import (compile_forward, generate, sample_generator, sample_labels, spacing_identity,
                                          balanced_labels)
from tinyfusion.io.vae import load_vae, to_uint8_nhwc


def main(args):
    """Sample --num-fid-samples images over all ranks and write them as one .npz."""
    family, options = check_batch_args(args)
    ckpt = args.ckpt or family.default_checkpoint(args.model, args.image_size)
    ctx = setup_distributed()
    if ctx.device.type == "cuda":  # TF32 (the original's default) is fast on A100+; --no-tf32 for full fp32
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    else:  # CPU kernels round differently with other thread counts: a fixed count keeps images world-size free
        torch.set_num_threads(args.cpu_threads)
    amp_dtype, _ = resolve_sampling_precision(args.precision, ctx.device)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    run_dir = os.path.join(args.sample_dir, batch_name(args, family, options, precision))
    final_path = f"{run_dir}.npz"
    image_shape = (args.image_size, args.image_size, 3)
    settings = {key: getattr(args, key) for key in IDENTITY_KEYS if hasattr(args, key)}
    settings.update(ckpt=os.path.abspath(ckpt), precision=precision, tf32=bool(args.tf32),
                    compile=bool(args.compile), timestep_spacing=spacing_identity(args.sampler, args.timestep_spacing))
    settings.update(family.sample_identity(args, options))

    sampler = build_sampler(args, ckpt, ctx, amp_dtype, family, options)  # refuses a mismatch before any folder exists
    # rank 0 locks the run folder and decides (and creates folders); every rank gets the same
    # plan or the same error. The lock is held until the .npz is written (or the run fails).
    plan = None
    if ctx.is_main:
        try:
            settings["weights_sha256"] = weights_sha256(ckpt, family, use_ema=not args.no_ema)
            plan = plan_run(run_dir, final_path, settings, image_shape, num_samples=args.num_fid_samples,
                            resume=args.resume)
        except (TinyFusionError, OSError) as error:
            plan = ("error", unwritable_message(error) or str(error))
    try:
        status, todo = broadcast_object(plan, ctx)
        if status == "error":
            cleanup_distributed()
            raise TinyFusionError(todo)
        sample_and_assemble(args, ctx, run_dir, final_path, status, todo, sampler, amp_dtype, image_shape, options)
    except NonFiniteOutput:
        if ctx.is_main and len(todo) == args.num_fid_samples:  # a fresh run: nothing in its folder is worth keeping
            shutil.rmtree(run_dir, ignore_errors=True)
        cleanup_distributed()
        raise
    finally:
        release_folder(run_dir)


def refuse_non_finite_batch(images, ctx, indices):
    """Every rank stops together (same message, no hang at a barrier) when any rank's batch holds
    NaN / inf: converted to uint8 it would be stored as black pixels."""
    bad = torch.tensor([count_non_finite(images) if images is not None else 0], dtype=torch.int64,
                       device=ctx.device)
    if ctx.is_distributed:  # one collective per batch on every rank, also one without samples (images None)
        dist.all_reduce(bad)
    if bad.item():
        what = "a batch of samples" + (f" from {indices[0]}" if indices else "") + (
            " (summed over the ranks)" if ctx.is_distributed else "")
        raise NonFiniteOutput(non_finite_output_message(bad.item(), what))


def build_sampler(args, ckpt, ctx, amp_dtype, family, options=None):
    """(model, vae, the family's sampling process) of the run, built on every rank before the run folder
    exists: a checkpoint of another family or size is refused without leaving a folder behind."""
    model, _ = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path, ckpt=ckpt,
                           use_ema=not args.no_ema, groups=args.groups)
    model = model.to(ctx.device).eval().requires_grad_(False)
    model = cast_weights_once(model, amp_dtype)  # bf16/fp16: weights cast once, not on every call
    if args.compile:
        model = compile_forward(model)
    vae = load_vae(args.vae, args.vae_path, ctx.device)
    process = family.sampling_process(args.sampler, args.num_sampling_steps, args.timestep_spacing, options)
    return model, vae, process


def sample_and_assemble(args, ctx, run_dir, final_path, status, todo, sampler, amp_dtype, image_shape, options=None):
    """Every rank samples its share of `todo` with `sampler` (build_sampler's) into part files;
    rank 0 writes the .npz (`options`: a SiT's flow sampler keywords, None for DiT)."""
    logger = create_logger(run_dir if status == "todo" else None, ctx.is_main, name="sample_ddp")
    if status == "done":
        logger.info(f"{final_path} is already complete; nothing to do")
        cleanup_distributed()
        return
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), ctx.is_main)
    if ctx.is_main:
        atomic_write_json(os.path.join(run_dir, "args.json" if len(todo) == args.num_fid_samples else
                                       f"args-resume-{time.strftime('%Y%m%d-%H%M%S')}.json"), vars(args))
    logger.info(f"{args.num_fid_samples - len(todo)} of {args.num_fid_samples} samples already done; sampling "
                f"{len(todo)} on {ctx.world_size} rank(s) x {args.per_proc_batch_size} ({ctx.backend}) into {run_dir}")

    model, vae, diffusion = sampler
    precision_note = resolve_sampling_precision(args.precision, ctx.device)[1]
    if precision_note:  # what auto chose, or that the precision asked for is emulated here
        logger.info(precision_note)

    # global batch k covers todo[k*G:(k+1)*G], G = world size x per-proc batch; rank r takes its slice
    batch = args.per_proc_batch_size
    global_batch = batch * ctx.world_size
    parts_dir = os.path.join(run_dir, "parts")
    steps = range(0, len(todo), global_batch)
    start_time, made = time.time(), 0
    for step in tqdm(steps, desc="sampling batches", disable=not ctx.is_main):
        indices = todo[step + ctx.rank * batch: step + (ctx.rank + 1) * batch]
        if not indices:  # the last global batch may leave this rank without samples: it still joins the check
            refuse_non_finite_batch(None, ctx, indices)
            continue
        labels = (balanced_labels(indices, args.num_classes) if args.balanced_labels
                  else sample_labels(args.global_seed, indices, args.num_classes))
        generators = [sample_generator(args.global_seed, i) for i in indices]
        images = generate(model, diffusion, labels, generators, args.cfg_scale, args.sampler, args.ddim_eta, vae,
                          amp_dtype=amp_dtype, pad_to=batch, guide_all_channels=args.guide_all_channels,
                          flow_options=options)
        refuse_non_finite_batch(images, ctx, indices)
        images = to_uint8_nhwc(images).numpy()
        if args.save_png:  # before the part: a finished part implies its PNGs are complete
            for index, image in zip(indices, images):
                Image.fromarray(image).save(os.path.join(run_dir, f"{index:06d}.png"))
        write_part(parts_dir, indices, labels.tolist(), images)
        made += len(indices)
        rate = made / (time.time() - start_time)
        metrics.write(step=step // global_batch, rank0_images=made, rank0_images_per_sec=rate)

    barrier()
    elapsed = time.time() - start_time
    logger.info(f"sampled {len(todo)} images in {elapsed:.1f}s: {len(todo) / max(elapsed, 1e-9):.2f} images/s "
                f"on {ctx.world_size} rank(s)")
    error, failure = None, None
    if ctx.is_main:  # the other ranks wait for the outcome, so an error never leaves them hanging
        try:
            assemble(parts_dir, final_path, args.num_fid_samples, image_shape, args.keep_parts)
            logger.info(f"saved {final_path}: arr_0 ({args.num_fid_samples}, {', '.join(map(str, image_shape))}) "
                        f"uint8 and labels")
        except BaseException as caught:
            failure = caught
            error = str(caught) if isinstance(caught, TinyFusionError) else f"error: rank 0 could not write {final_path}"
    error = broadcast_object(error, ctx)
    cleanup_distributed()
    if failure is not None:
        raise failure
    if error:
        raise TinyFusionError(error)


if __name__ == "__main__":
    run_main(main, ARGS)

"""What the training and pruning scripts do before their loop starts: the translation of the
shared flags (tinyfusion/flags.py add_training_args) into the loop's LoopConfig, and the checks
and loading that happen before the process group starts and before anything is written, so
that bad input is one line printed once (by rank 0) and leaves no run folder behind.
"""
from dataclasses import dataclass

from tinyfusion.io.checkpoints import (check_data_fits, check_finite_weights, extract_state_dict, load_into_model,
                                       newest_loadable_checkpoint, read_metadata)
from tinyfusion.families import family_from_args
from tinyfusion.families.build import build_model, pruned_depths
from tinyfusion.distributed import check_global_batch, distributed_context
from tinyfusion.errors import TinyFusionError
from tinyfusion.training.resume import (check_resume_compatible, load_training_checkpoint, resolve_resume, saved_args,
                               seed_everything)
from tinyfusion.io.run_folder import latest_checkpoint, run_folder_name
from tinyfusion.training.loop import LoopConfig
from tinyfusion.training.trackers import tracker_hooks


def loop_config(args):
    """The training loop's LoopConfig from the shared flags (the one place that reads them for the loop)."""
    return LoopConfig(epochs=args.epochs, max_steps=args.max_steps, global_batch_size=args.global_batch_size,
                      global_seed=args.global_seed, lr=args.lr, lr_schedule=args.lr_schedule, min_lr=args.min_lr,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
                      log_every=args.log_every, ckpt_every=args.ckpt_every, precision=args.precision,
                      grad_checkpointing=args.grad_checkpointing, compile_model=args.compile,
                      num_workers=args.num_workers, max_skipped_in_a_row=args.max_skipped_in_a_row,
                      run_args=vars(args))


def device_flag(args):
    """distributed_context's `device` argument from --device."""
    return None if getattr(args, "device", "auto") == "auto" else args.device


# ------------------------------------------------------------------------------ data and model
def open_training_data(data_path, seed):
    """The feature dataset of --data-path (one-line TinyFusionError when there is none)."""
    from tinyfusion.io.feature_store import open_feature_dataset
    return open_feature_dataset(data_path, flip_prob=0.5, seed=seed)


def load_training_model(args, resume_checkpoint=None, resume_path=None):
    """(model, metadata) of the model to train: the "model" weights of the resume checkpoint,
    else --load-weight (a pruned checkpoint's metadata sets the depth), else a fresh init."""
    if resume_checkpoint is None:
        return build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path,
                           ckpt=args.load_weight)
    metadata = read_metadata(resume_checkpoint)
    kwargs = {}
    if metadata and metadata.get("kept_indices") is not None:
        kwargs = pruned_depths(args.model, metadata, resume_path)
    model, _ = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path,
                           **kwargs)
    load_into_model(model, extract_state_dict(resume_checkpoint, use_ema=False), args.model, resume_path)
    return model, metadata


def build_training_model(args, run):
    """prepare_training's default model: load_training_model's, whose record must fit the
    family's flags (a SiT's recorded transport)."""
    model, metadata = load_training_model(args, run.resume, run.resume_path)
    run.family.check_record(metadata, run.resume_path or args.load_weight)
    return model, metadata


@dataclass
class PreparedRun:
    ctx: object                # DistributedContext (process group not started yet)
    dataset: object
    run_dir: str
    resume_path: str = None
    resume: dict = None        # the loaded training checkpoint, or None for a fresh run
    model: object = None
    metadata: dict = None
    trackers: list = None      # TrackerHooks of --wandb / --tensorboard
    family: object = None      # the ModelFamily of --model, configured by its flags


def resolve_run(args, ctx, family):
    """(run_dir, resume path or None, loaded resume checkpoint or None), checked against the
    flags; a folder that already holds checkpoints is only reused with --resume."""
    run_dir = run_folder_name(args.results_dir, args.prefix, args.model)
    if args.resume == "auto":  # the newest checkpoint that loads intact (checksum verified)
        resume_path, resume = newest_loadable_checkpoint(run_dir, fall_back=getattr(args, "resume_fallback", False),
                                                         load=load_training_checkpoint)
    else:
        resume_path = resolve_resume(args.resume, run_dir)
        if resume_path is None and latest_checkpoint(run_dir) is not None:
            raise TinyFusionError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                                  f"or choose another --prefix/--results-dir")
        resume = load_training_checkpoint(resume_path) if resume_path else None
    if resume is not None:
        check_finite_weights(resume["ema"], resume_path)  # a diverged EMA is no state to go on from
        check_resume_compatible(resume, resume_path, model=args.model, global_batch_size=args.global_batch_size,
                                image_size=args.image_size, num_classes=args.num_classes,
                                global_seed=args.global_seed, **family.resume_identity())  # the seed orders the data
    return run_dir, resume_path, resume


def prepare_training(args, build_model_fn=build_training_model):
    """Everything the training scripts check and load before the process group starts: flags,
    the global batch, seeds, data, run folder name, `--resume`, and the model checked against
    the data. `build_model_fn(args, run)` returns (model, metadata) from the run prepared so far
    (the fine-tunes' model: resumed, from --load-weight, or fresh; the gate search's gated
    model). Returns a PreparedRun."""
    family = family_from_args(args)  # --model's family with its flags (another family's flags are refused)
    ctx = distributed_context(device_flag(args))
    check_global_batch(args.global_batch_size, ctx)
    seed_everything(args.global_seed, ctx)
    dataset = open_training_data(args.data_path, args.global_seed)
    run_dir, resume_path, resume = resolve_run(args, ctx, family)
    run = PreparedRun(ctx, dataset, run_dir, resume_path, resume, family=family)
    run.model, run.metadata = build_model_fn(args, run)
    check_data_fits(run.model, dataset.sample_shape, dataset.num_classes, data=f"the features in {args.data_path}",
                    model_flags=f"--model {args.model} with --vae {args.vae} --image-size {args.image_size}")
    run.trackers = tracker_hooks(args)
    return run


def training_metadata(metadata, model, family):
    """What every checkpoint of a training run records besides the weights: the loaded weights'
    metadata (e.g. a pruned student's kept indices), the model family (so that later scripts
    build the right class and refuse the other family), and what the family records of its
    process (a SiT's training transport)."""
    return dict(metadata or {}, model_family=model.model_family, **family.record())


def resumed_flag(resume, name):
    """A flag's value in the checkpoint being resumed (None without one)."""
    return saved_args(resume).get(name) if resume is not None else None

"""Command-line flags that several scripts share, defined once so that every script
accepts the original flags with the same meaning.

Nothing here imports torch at module level: every script builds its parser from this module
alone and parses the flags before importing torch, the models or the samplers, so that `--help`
and a bad flag answer in a fraction of a second (tests/test_cli.py checks every script)."""
import argparse
import ast
import os
import re
import sys

from tinyfusion.families import DIFFUSION_SAMPLERS, MAR_SAMPLERS, REGISTRY, SOLVER_NAMES, entry_for_model
from tinyfusion.errors import TinyFusionError

# every name of models.DiT_models, listed here so that `--help` needs neither models.py nor torch
# (tests/test_cli.py checks the two lists agree)
MODEL_NAMES = ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8", "DiT-L/2", "DiT-L/4", "DiT-L/8", "DiT-B/2", "DiT-B/4", "DiT-B/8",
               "DiT-S/2", "DiT-S/4", "DiT-S/8", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2", "DiT-XS/1", "DiT-XS/2",
               "DiT-XS/4", "DiT-XL-1-2", "DiT-XL-2-4", "DiT-XL-7-14", "DiT-XL-1-4", "DiT-D14-1-2", "DiT-D14-2-4"]
# every name of models.MAR_models (checked by tests/test_cli.py as well)
MAR_MODEL_NAMES = ["MAR-B", "MAR-L", "MAR-H", "MAR-B-1-2", "MAR-L-1-2", "MAR-H-1-2", "MAR-XS/1", "MAR-XS/2", "MAR-XS/4"]


# choice lists of flags whose values are names defined by torch code: listed here so that `--help`
# needs no torch. Each repeats a registry (tests/test_cli.py checks each against it).
LR_SCHEDULES = ("cosine", "constant")           # tinyfusion/training/lr_schedules.py
CALIBRATIONS = ("clean", "noised")              # tinyfusion/pruning.bi_scores
SAMPLER_NAMES = (*DIFFUSION_SAMPLERS, *SOLVER_NAMES)  # the keys of tinyfusion.families.dit.SAMPLERS
ALL_SAMPLERS = tuple(sampler for entry in REGISTRY for sampler in entry.samplers)  # every family's
DIFFUSION_SPACINGS = ("dit", "leading")         # ddpm / ddim: diffusion.respace.space_timesteps
SOLVER_SPACINGS = ("linspace", "trailing", "leading")  # the fast solvers: diffusers' timestep_spacing
STORE_DTYPE_NAMES = ("fp16", "fp32")            # the keys of tinyfusion.io.feature_store.STORE_DTYPES
SIT_PATHS = ("Linear", "GVP", "VP")             # transport.paths.PATHS
SIT_PREDICTIONS = ("velocity", "score", "noise")  # transport.paths.PREDICTIONS
SIT_LOSS_WEIGHTS = (None, "velocity", "likelihood")  # transport.settings.LOSS_WEIGHTS
SIT_DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")  # transport.samplers
SIT_LAST_STEPS = ("Mean", "Tweedie", "Euler", None)  # transport.samplers.LAST_STEPS
# evaluator.py --inception-path's default: the file named by this environment variable, else this
# file in pretrained/ (tinyfusion/evaluation/feature_networks.py reads both from here)
INCEPTION_ENV = "TINYFUSION_INCEPTION"
INCEPTION_FILENAME = "classify_image_graph_def.pb"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are printed once under torchrun (by rank 0): every rank parses
    the same command line, and eight copies of one message bury it. Rules that relate several flags
    (--min-lr <= --lr, ...) are registered with `add_check(fn)`: fn(args) returns an error message
    or None, and runs as part of parsing, so a bad combination stops the script like a bad value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks = []

    def add_check(self, check):
        self.checks.append(check)
        return check

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            message = check(parsed)
            if message:
                self.error(message)
        return parsed, extras

    def error(self, message):
        if int(os.environ.get("RANK", "0")) == 0:
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_groups(text):
    """`--groups "[[2,4],[2,4],[3,4]]"` -> [[2, 4], [2, 4], [3, 4]] (keep N of each M blocks);
    `"[[1,2]]*6"` repeats a pattern."""
    if text is None:
        return None
    repeated = re.fullmatch(r"\s*(\[.*\])\s*\*\s*(\d+)\s*", text)  # "[[1,2]]*14", as in the paper's notation
    try:
        groups = ast.literal_eval(repeated.group(1)) * int(repeated.group(2)) if repeated else ast.literal_eval(text)
        if not all(len(group) == 2 and all(isinstance(v, int) for v in group) for group in groups):
            raise ValueError
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(f"--groups must be a list of [keep, of] pairs such as "
                                         f"\"[[1,2],[2,4]]\", got {text!r}") from None
    if not groups or not all(1 <= keep <= of for keep, of in groups):
        raise argparse.ArgumentTypeError(f"--groups: each [keep, of] pair keeps 1 to `of` blocks of its group, "
                                         f"got {text!r}")
    return [list(group) for group in groups]


# ----------------------------------------------------------------- numeric validators
# argparse `type=` functions: a bad value stops the script at parsing (exit 2, one line naming the
# flag), before any work or any folder is created.
def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and value != value:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def positive_int(text):
    """An integer >= 1 (batch sizes, --ckpt-every, --log-every, --nsamples, ...)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text):
    """An integer >= 0 (--num-workers, seeds, ...)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text):
    """A finite number > 0 (--lr, ...)."""
    value = _number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def nonnegative_float(text):
    """A finite number >= 0 (--cfg-scale, --weight-decay, --grad-clip, ...)."""
    value = _number(text, float)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def unit_interval(text):
    """A number in [0, 1] (--ema-decay, probabilities)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def time_margin(text):
    """A number in [0, 0.5): SiT's --train-eps / --sample-eps / --last-step-size, cut off an end of
    the time interval [0, 1]."""
    value = _number(text, float)
    if not 0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"must lie in [0, 0.5), got {value}")
    return value


DIFFUSION_STEPS = 1000  # the training diffusion's steps: sampling can respace to at most these


def diffusion_timestep(text):
    """One timestep of the training diffusion: 0 .. 999."""
    value = _number(text, int)
    if not 0 <= value < DIFFUSION_STEPS:
        raise argparse.ArgumentTypeError(f"must be a timestep in [0, {DIFFUSION_STEPS}), got {value}")
    return value


def sampling_steps(text):
    """--num-sampling-steps: any positive count. A DiT's respaced sampler picks that many of the 1000
    training steps, so a DiT takes at most 1000 (add_sampling_steps_check); a SiT's ODE / SDE grid
    has no such limit."""
    return positive_int(text)


def add_sampling_steps_check(parser):
    """--num-sampling-steps without a value becomes the family's default (250; MAR's head: 100);
    at most 1000 for a DiT (--model DiT-...) or a MAR's head; a SiT's time grid takes any count
    (the registry entry's max_sampling_steps)."""
    def check(args):
        try:
            entry = entry_for_model(args.model)
        except TinyFusionError:
            entry = None  # an unknown --model is refused when the model is built
        if args.num_sampling_steps is None:
            args.num_sampling_steps = entry.default_sampling_steps if entry else 250
        if entry and entry.max_sampling_steps is not None and args.num_sampling_steps > entry.max_sampling_steps:
            unlimited = "; ".join(f"a {other.name}'s --sampler {' / '.join(other.samplers)}" for other in REGISTRY
                                  if other.max_sampling_steps is None)
            return (f"argument --num-sampling-steps: must be at most the diffusion's {entry.max_sampling_steps} steps "
                    f"for a {entry.name}, got {args.num_sampling_steps} ({unlimited} takes any number)")
        return None
    return parser.add_check(check)


SAMPLING_STEPS_HELP = "default: 250 (DiT, SiT); for a MAR its head's diffusion steps, default 100 (MAR's)"


# marks the validated numeric `type=` functions (tests/test_flag_table.py finds every flag using one)
NUMERIC_TYPES = (positive_int, nonnegative_int, positive_float, nonnegative_float, unit_interval, time_margin,
                 diffusion_timestep, sampling_steps)


def add_sampler_arg(parser):
    """--sampler of sample.py and sample_ddp.py."""
    parser.add_argument("--sampler", choices=ALL_SAMPLERS, default=None,
                        help="DiT: ddpm (default, the original), ddim, or the fast ODE solvers dpm-solver++ "
                             "(2nd order multistep) and unipc (one model evaluation per step: pass e.g. "
                             "--num-sampling-steps 20); SiT: ode or sde (required)")
    return parser


def add_timestep_spacing_arg(parser):
    """--timestep-spacing: which of the 1000 training steps a sampler evaluates the model at."""
    choices = sorted(set(DIFFUSION_SPACINGS + SOLVER_SPACINGS))
    parser.add_argument("--timestep-spacing", choices=choices, default=None,
                        help="ddpm/ddim and MAR's head (mar): dit (default: steps spread evenly over [0, 999], as DiT "
                             "and MAR) or leading (0, s, 2s, ...: diffusers' DiTPipeline; for MAR ours, see "
                             "docs/mar.md); dpm-solver++/unipc: linspace (default, "
                             "diffusers' default for them), trailing (recommended for few steps by Lin et al. 2023) "
                             "or leading")
    return parser


def resolve_timestep_spacing(sampler, spacing):
    """The spacing a run uses (the sampler's default when None); ValueError when it does not fit.
    DiT's ddpm / ddim and MAR's head take the diffusion spacings, DiT's fast solvers diffusers'
    ones; SiT's samplers have none."""
    if sampler in SOLVER_NAMES:
        allowed = SOLVER_SPACINGS
    elif sampler in DIFFUSION_SAMPLERS or sampler in MAR_SAMPLERS:
        allowed = DIFFUSION_SPACINGS
    else:
        if spacing is not None:
            raise ValueError(f"--timestep-spacing is for DiT's and MAR's samplers "
                             f"({', '.join((*SAMPLER_NAMES, *MAR_SAMPLERS))}), not --sampler {sampler}")
        return None
    if spacing is None:
        return allowed[0]
    if spacing not in allowed:
        raise ValueError(f"--timestep-spacing {spacing} does not fit --sampler {sampler}; use one of "
                         f"{', '.join(allowed)}")
    return spacing


def parse_index_list(text):
    """`"[0, 2, 4]"` or `"0,2,4"` -> [0, 2, 4]."""
    try:
        value = ast.literal_eval(text if text.strip().startswith("[") else f"[{text}]")
        if not all(isinstance(v, int) for v in value):
            raise ValueError
    except (ValueError, SyntaxError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a list of block indices such as \"[0, 2, 4]\", got {text!r}") from None
    if any(v < 0 for v in value):
        raise argparse.ArgumentTypeError(f"block indices count from 0, got {text!r}")
    return list(value)


def add_model_args(parser, default_model="DiT-XL/2"):
    """--model, --image-size, --num-classes, --vae, --vae-path, --groups."""
    parser.add_argument("--model", type=str, default=default_model,
                        help=f"one of: {', '.join(MODEL_NAMES)}, their SiT- twins (SiT-XL/2, ...), or "
                             f"{', '.join(MAR_MODEL_NAMES)}")
    parser.add_argument("--image-size", type=positive_int, default=256,
                        help="256 or 512 for the SD-VAE; any size with --vae none (pixel space)")
    parser.add_argument("--num-classes", type=positive_int, default=1000)
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema | mse (SD-VAE from the hub or --vae-path), none (pixel space), or a local folder")
    parser.add_argument("--vae-path", type=str, default=None,
                        help="local diffusers AutoencoderKL folder (for offline use)")
    parser.add_argument("--groups", type=parse_groups, default=None,
                        help="custom gating pattern for learnable pruning, e.g. \"[[2,4],[2,4],[3,4]]\" (keep N of M)")
    return parser


def add_checkpoint_args(parser, *, help="plain, training or pruned checkpoint", required=False):
    """--ckpt, the checkpoint a script reads (`help`: what it is for and what omitting it does),
    and --no-ema."""
    parser.add_argument("--ckpt", type=str, default=None, required=required, help=help)
    parser.add_argument("--no-ema", action="store_true",
                        help="a training checkpoint's raw 'model' weights instead of its 'ema'")
    return parser


PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # flag -> torch dtype name


def add_precision_arg(parser, help="autocast dtype; auto = bf16 on GPU, fp32 on CPU"):
    parser.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto", help=help)
    return parser


SAMPLING_PRECISION_HELP = ("autocast dtype (default fp32, the original's); auto = bf16 on a GPU and on a CPU with native "
                           "bf16 matmul (AMX or AVX-512-BF16), fp32 on other CPUs, where bf16 is emulated and slower")


def add_sampling_compile_arg(parser):
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model's forward (one graph for the run: the batch shape is "
                             "fixed); measured no faster on CPU, meant for GPUs")
    return parser


def resolve_precision(precision, device):
    """The autocast dtype for a run: bf16 on GPU and fp32 on CPU unless asked otherwise."""
    import torch
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, PRECISIONS[precision])


def autocast(dtype, device):
    """An autocast context (a no-op for fp32)."""
    import torch
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)


def add_compatibility_flags(parser, flags):
    """Flags of the original scripts that do nothing here, accepted so that a copied command runs:
    `flags` is [(name, argparse kwargs)], listed in --help under their own heading."""
    group = parser.add_argument_group("accepted for compatibility with the original, no effect")
    for name, kwargs in flags:
        group.add_argument(name, **kwargs)
    return group


def add_guidance_args(parser, cfg_scale):
    """--cfg-scale and --guide-all-channels (the original guides only the first 3 noise channels)."""
    parser.add_argument("--cfg-scale", type=nonnegative_float, default=cfg_scale, help="1.0 = no guidance (one model pass per step)")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="apply classifier-free guidance to every noise channel (the original, the default, "
                             "guides only the first 3 of the SD-VAE's 4)")
    return parser


# ------------------------------------------------------------------ training
def add_training_args(parser, lr=2e-4, lr_schedule="cosine", min_lr=1e-4, min_lr_aliases=(), epochs=1400,
                      global_batch_size=256, log_every=100, ckpt_every=10_000, results_dir="outputs",
                      ema_decay=0.9999):
    """The flags every training / pruning script shares (the original's plus ours). Defaults are
    the original TinyFusion train.py / train_masked_kd.py ones (AdamW lr 2e-4, CosineAnnealingLR
    to 1e-4 over all steps, run folders under outputs/, a checkpoint every 10,000 steps); scripts
    pass their own where the original differs."""
    parser.add_argument("--data-path", type=str, required=True,
                        help="feature store written by extract_features.py (or the original "
                             "imagenet256_features/ + imagenet256_labels/ layout)")
    parser.add_argument("--results-dir", type=str, default=results_dir)
    parser.add_argument("--prefix", type=str, default="run",
                        help="run folder is {results-dir}/{prefix}-{model with / as -}")
    parser.add_argument("--epochs", type=positive_int, default=epochs)
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps (also the length of the LR schedule)")
    parser.add_argument("--global-batch-size", type=positive_int, default=global_batch_size)
    parser.add_argument("--global-seed", type=nonnegative_int, default=0)
    parser.add_argument("--num-workers", type=nonnegative_int, default=4)
    parser.add_argument("--log-every", type=positive_int, default=log_every)
    parser.add_argument("--ckpt-every", type=positive_int, default=ckpt_every)
    parser.add_argument("--resume", type=str, default=None,
                        help="a training checkpoint to continue from, or 'auto' for the latest one in the run folder")
    parser.add_argument("--resume-fallback", action="store_true",
                        help="with --resume auto: if the newest checkpoint is corrupt, continue from the newest one "
                             "that loads intact (without it such a run stops and names that checkpoint)")
    parser.add_argument("--load-weight", type=str, default=None,
                        help="initial weights (e.g. a pruned model); ignored when resuming")
    parser.add_argument("--lr", type=positive_float, default=lr)
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=lr_schedule,
                        help="cosine: torch's CosineAnnealingLR from --lr to --min-lr over all steps, stepped "
                             "every iteration; constant: --lr throughout")
    parser.add_argument("--min-lr", *min_lr_aliases, dest="min_lr", type=nonnegative_float, default=min_lr,
                        help="where the cosine schedule ends (its eta_min)")
    parser.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    parser.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="max global grad norm (0 disables clipping)")
    parser.add_argument("--ema-decay", type=unit_interval, default=ema_decay)
    parser.add_argument("--max-skipped-in-a-row", type=positive_int, default=20,
                        help="end the run after this many consecutive non-finite losses")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_tracker_args(parser)
    parser.add_check(check_min_lr)
    return parser


def check_min_lr(args):
    """The cosine schedule goes from --lr down to --min-lr: a larger --min-lr would raise the lr."""
    if args.lr_schedule == "cosine" and args.min_lr > args.lr:
        return (f"argument --min-lr: {args.min_lr:g} is above --lr {args.lr:g}, so the cosine schedule would raise "
                f"the lr; pass --min-lr <= --lr (or --lr-schedule constant)")
    return None


def add_eval_args(parser):
    """--eval-every and its settings (tinyfusion/evaluation/quality.py): FID of EMA samples while training."""
    group = parser.add_argument_group("sample quality while training (ours; rank 0, the training is unchanged)")
    group.add_argument("--eval-every", type=positive_int, default=None,
                       help="every N steps (a multiple of --log-every) and at the last step: sample --eval-samples "
                            "images from the EMA weights and log their FID (off by default)")
    group.add_argument("--eval-ref", type=str, default=None,
                       help="reference batch .npz for the FID (evaluator.py's ref_batch); required with --eval-every")
    group.add_argument("--eval-feature-net", type=str, default=None,
                       help="TorchScript feature network (evaluator.py --feature-net; also logs its accuracy on the "
                            "samples' labels); default the Inception graph")
    group.add_argument("--eval-samples", type=positive_int, default=1000)
    group.add_argument("--eval-sampler", choices=SAMPLER_NAMES, default="dpm-solver++")
    group.add_argument("--eval-steps", type=sampling_steps, default=20)
    group.add_argument("--eval-cfg-scale", type=nonnegative_float, default=1.5)
    group.add_argument("--eval-seed", type=nonnegative_int, default=0, help="sample i from seeds (this, i)")
    group.add_argument("--eval-batch-size", type=positive_int, default=50)
    parser.add_check(check_eval_steps)
    return parser


def check_eval_steps(args):
    """--eval-steps picks DiT timesteps (its samplers are DiT's): at most the diffusion's 1000."""
    if args.eval_steps > DIFFUSION_STEPS:
        return f"argument --eval-steps: must be at most the diffusion's {DIFFUSION_STEPS} steps, got {args.eval_steps}"
    return None


def add_tracker_args(parser):
    """--wandb / --tensorboard (tinyfusion/training/trackers.py)."""
    parser.add_argument("--wandb", action="store_true", help="also log every metrics record to Weights & Biases")
    parser.add_argument("--wandb-project", type=str, default="tinyfusion")
    parser.add_argument("--wandb-run-name", type=str, default=None, help="default: the run folder's name")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write the metrics as TensorBoard scalars (run folder/tensorboard)")
    return parser


def add_teacher_precision_arg(parser):
    parser.add_argument("--teacher-precision", choices=["auto", *PRECISIONS], default="auto",
                        help="precision of the frozen teacher's forward (weights cast once, LayerNorm and the "
                             "residual stream fp32); auto = the training precision on GPU, fp32 on CPU")
    return parser


def default_calibration(model_name):
    """prune_by_score.py's --calibration when none is given: the family's (a DiT: clean, the original's)."""
    try:
        return entry_for_model(model_name).calibration
    except TinyFusionError:
        return "clean"  # an unknown --model is refused when the model is built


# ------------------------------------------------------------------ SiT (transport/)
def none_or_str(value):
    """SiT's `--last-step None` / `--loss-weight None`."""
    return None if value == "None" else value


def add_interpolant_args(group):
    """The interpolant flags of SiT's train.py and sample.py (defaults: Linear, velocity, SiT's eps)."""
    group.add_argument("--path-type", default="Linear", choices=SIT_PATHS, help="the interpolant the SiT is trained on")
    group.add_argument("--prediction", default="velocity", choices=SIT_PREDICTIONS, help="what the SiT outputs")
    group.add_argument("--sample-eps", type=time_margin, default=None, help="default: SiT's for the path and prediction")
    group.add_argument("--train-eps", type=time_margin, default=None, help="default: SiT's for the path and prediction")


def add_transport_training_args(parser):
    """The transport flags of the training and pruning scripts (for --model SiT-...), as SiT's
    train.py (tinyfusion/families/sit.py turns them into a transport)."""
    group = parser.add_argument_group("SiT (--model SiT-...): the transport, as SiT's train.py")
    add_interpolant_args(group)
    group.add_argument("--loss-weight", type=none_or_str, default=None, choices=SIT_LOSS_WEIGHTS,
                       help="score / noise losses: none (default), velocity or likelihood weighting")


def add_transport_args(parser):
    """SiT's sampling flags, with the names and defaults of SiT's sample.py (tinyfusion/families/sit.py
    turns them into a transport and the solver's keywords)."""
    group = parser.add_argument_group("SiT (--sampler ode | sde)")
    add_interpolant_args(group)
    group.add_argument("--sampling-method", default=None,
                       help="ODE: dopri5 (default; torchdiffeq), euler, heun2; SDE: Euler (default), Heun")
    group.add_argument("--atol", type=positive_float, default=1e-6, help="ODE absolute tolerance (adaptive solvers)")
    group.add_argument("--rtol", type=positive_float, default=1e-3, help="ODE relative tolerance (adaptive solvers)")
    group.add_argument("--diffusion-form", default="sigma", choices=SIT_DIFFUSION_FORMS, help="SDE diffusion D(t)")
    group.add_argument("--diffusion-norm", type=nonnegative_float, default=1.0)
    group.add_argument("--last-step", type=none_or_str, default="Mean", choices=SIT_LAST_STEPS)
    group.add_argument("--last-step-size", type=time_margin, default=0.04)


def add_mar_training_args(parser):
    """MAR's training flags (for --model MAR-...), with the defaults of MAR's README training command."""
    group = parser.add_argument_group("MAR (--model MAR-...): its masking and head batch, as MAR's main_mar.py")
    group.add_argument("--mask-ratio-min", type=unit_interval, default=0.7,
                       help="the mask ratio is N(1, 0.25^2) truncated to [this, 1]")
    group.add_argument("--diffusion-batch-mul", type=positive_int, default=4,
                       help="each token's head loss is taken on this many (t, noise) draws (MAR's README: 4)")


def add_mar_sampling_args(parser):
    """MAR's generation flags (--model MAR-...), with MAR's names and defaults."""
    group = parser.add_argument_group("MAR (--model MAR-...): its generation loop, as MAR's main_mar.py")
    group.add_argument("--num-iter", type=positive_int, default=64,
                       help="autoregressive steps (MAR's default 64; its README's FID runs use 256)")
    group.add_argument("--cfg-schedule", choices=("linear", "constant"), default="linear",
                       help="linear: the guidance scale rises from 1 with the share of generated tokens (MAR's)")
    group.add_argument("--temperature", type=positive_float, default=1.0,
                       help="scales the head's per-step noise (MAR's README: 0.95 without guidance)")


def add_family_training_args(parser):
    """The training flags only one family reads: SiT's transport and MAR's masking."""
    add_transport_training_args(parser)
    add_mar_training_args(parser)


def add_family_sampling_args(parser):
    """The sampling flags only one family reads: SiT's transport and solver, MAR's loop."""
    add_transport_args(parser)
    add_mar_sampling_args(parser)


# ------------------------------------------------------------------ sample_ddp.py
def add_sample_batch_args(parser):
    """Every flag of sample_ddp.py (also parsed by the drivers that name its output, see
    tinyfusion/sampling/batch_settings.py)."""
    add_model_args(parser)
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=32)
    parser.add_argument("--num-fid-samples", type=positive_int, default=50_000)
    add_guidance_args(parser, cfg_scale=1.5)
    parser.add_argument("--num-sampling-steps", type=sampling_steps, default=None, help=SAMPLING_STEPS_HELP)
    parser.add_argument("--global-seed", type=nonnegative_int, default=0, help="sample i uses seeds derived from (this, i)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on Ampere+ GPUs: faster, as the original; --no-tf32 for full fp32")
    add_checkpoint_args(parser, help="checkpoint (plain / training / pruned); default: the released file of --model's "
                        "family (DiT-XL/2: DiT-XL-2-{256x256,512x512}.pt, SiT-XL/2: SiT-XL-2-256x256.pt)")
    add_sampler_arg(parser)
    parser.add_argument("--ddim-eta", type=unit_interval, default=0.0)
    add_timestep_spacing_arg(parser)
    add_precision_arg(parser, help=SAMPLING_PRECISION_HELP)
    add_sampling_compile_arg(parser)
    parser.set_defaults(precision="fp32")  # FID numbers are comparable to the original's fp32 sampling
    parser.add_argument("--balanced-labels", action="store_true",
                        help="label of sample i = i mod --num-classes (ours; the original draws each label at random)")
    parser.add_argument("--save-png", action="store_true", help="also write {index:06d}.png into the run folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run (keep its finished parts)")
    parser.add_argument("--cpu-threads", type=positive_int, default=1,
                        help="intra-op threads per rank on CPU (use one rank per core instead: images are bit-identical "
                             "for any world size only at a fixed thread count)")
    parser.add_argument("--keep-parts", action="store_true", help="keep the part files after the .npz is written")
    add_family_sampling_args(parser)
    add_sampling_steps_check(parser)
    return parser

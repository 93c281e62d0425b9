"""Masked knowledge distillation (TinyFusion's recovery step).

Per step, one noise draw gives x_t; the student and the teacher (eval mode, no grad) see the
same x_t, t, labels and classifier-free label drops, and

    kd   = mean((eps_s - eps_t)^2)  (+ KL(teacher posterior || student posterior) in bits,
                                      mean detached, when the variance is learned; at t == 0
                                      the student's decoder NLL, as in the original)
    gt   = the usual diffusion loss of the student, mse + vb
    feat = mean over aligned block pairs (i, j) of mean((m_s * h_s_i - m_t * h_t_j)^2)
    loss = alpha * kd + (1 - alpha) * gt + beta * feat

Masks (the "masked" in Masked KD): DiT hidden states carry a few massive activations (hundreds,
versus order one elsewhere). Matching them dominates a plain feature loss and destabilises
training, so each hidden state h (B, T, D) keeps only the entries within k standard deviations
of its own mean: mu, var per sample over (T, D) (population variance), mask = |h - mu| < k*std,
computed separately for the student and the teacher. k = mask_sigma (2 by default); k = 0
disables masking (plain RepKD). The teacher's features are detached. beta goes linearly from
beta0 at epoch 0 to 0 at the last epoch (`feature_beta`).

Student/teacher alignment (which teacher block each student block imitates), `--kd-layer-map`:
- "original" (the default, the original TinyFusion code): student block i against teacher block
  2i + 1 for D14 from a 28-block teacher and D7 from a 14-block one, and the fixed pairs
  [2,5,7,10,12,15,18] <-> [3,7,11,15,19,23,27] for D19 from 28, whatever blocks were kept. For
  any other depth pair the original has no map: the span-end rule is used (and logged).
- "span-end" (ours): with the student's kept indices k_0 < ... < k_{K-1} numbered as in the
  teacher's D blocks, student block i replaces the teacher span [k_i, k_{i+1}) (the last span
  ends at D), so it is aligned with the LAST block of that span, k_{i+1} - 1 (the last student
  block: D - 1). Kept [0, 2, ..., 26] of 28 gives 2i + 1. The kept indices must be in the frame
  of the teacher actually loaded (tinyfusion.pruning.pruned_models.kept_indices_in_frame).
- explicit pairs "0:1,1:3,...".
"""
import ast
import itertools

import torch

from models import validate_kept_indices

from .diffusion_utils import mean_flat

LAYER_MAP_RULES = ("original", "span-end")
# the original's hard-coded (student block, teacher block) pairs per (student depth, teacher depth)
ORIGINAL_LAYER_MAPS = {
    (14, 28): [(i, 2 * i + 1) for i in range(14)],
    (7, 14): [(i, 2 * i + 1) for i in range(7)],
    (19, 28): list(zip([2, 5, 7, 10, 12, 15, 18], [3, 7, 11, 15, 19, 23, 27])),
}


# ------------------------------------------------------------------------------ layer maps
def span_end_layer_map(kept_indices, teacher_depth, list_sizes=None):
    """[(i, k_{i+1} - 1), ..., (K-1, D-1)]: each student block aligned with the last teacher block
    of the span it replaces (see the module docstring). With block lists (`list_sizes`, e.g. a
    MAR's encoder and decoder) a span also ends where its list ends."""
    try:
        kept = validate_kept_indices([int(k) for k in kept_indices], teacher_depth)
    except ValueError as error:
        raise ValueError(f"kept_indices {list(kept_indices)} do not fit a teacher with {teacher_depth} blocks "
                         f"({error}); was the student pruned from another model? pass --kd-layer-map") from None
    list_ends = list(itertools.accumulate(list_sizes or [teacher_depth]))
    span_ends = [min(end, next(edge for edge in list_ends if edge > start))
                 for start, end in zip(kept, kept[1:] + [teacher_depth])]
    return [(i, end - 1) for i, end in enumerate(span_ends)]


def parse_layer_map(text):
    """`"0:1,1:3,2:5"` (or a Python list of pairs `"[(0,1),(1,3)]"`) -> [(0, 1), (1, 3), ...]."""
    text = text.strip()
    try:
        if text.startswith("["):
            pairs = [tuple(int(v) for v in pair) for pair in ast.literal_eval(text)]
        else:
            pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
        if not pairs or not all(len(pair) == 2 for pair in pairs):
            raise ValueError
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"--kd-layer-map must be student:teacher pairs such as \"0:1,1:3,2:5\", got {text!r}") from None
    return pairs


def validate_layer_map(pairs, student_depth, teacher_depth):
    """ValueError (one line) for a pair naming a block that does not exist."""
    for student_block, teacher_block in pairs:
        if not 0 <= student_block < student_depth:
            raise ValueError(f"layer map pair {student_block}:{teacher_block} refers to student block {student_block}, "
                             f"but the student has {student_depth} blocks (0..{student_depth - 1})")
        if not 0 <= teacher_block < teacher_depth:
            raise ValueError(f"layer map pair {student_block}:{teacher_block} refers to teacher block {teacher_block}, "
                             f"but the teacher has {teacher_depth} blocks (0..{teacher_depth - 1})")
    return [(int(s), int(t)) for s, t in pairs]


def rule_layer_map(rule, student_depth, teacher_depth, teacher_frame_kept, list_sizes=None):
    """(pairs, how they were chosen) for `rule` "original" or "span-end" (module docstring).
    `teacher_frame_kept()` returns (the student's kept indices in the teacher's frame, a
    description of that frame); it is called only when the span-end rule is needed. `list_sizes`:
    the teacher's block lists (spans end at a list's end)."""
    if rule not in LAYER_MAP_RULES:
        raise ValueError(f"unknown layer map rule {rule!r}; use one of {', '.join(LAYER_MAP_RULES)} or explicit pairs")
    if rule == "original" and (student_depth, teacher_depth) in ORIGINAL_LAYER_MAPS:
        return list(ORIGINAL_LAYER_MAPS[(student_depth, teacher_depth)]), \
            f"the original's fixed map for a {student_depth}-block student and a {teacher_depth}-block teacher"
    kept, frame = teacher_frame_kept()
    if len(kept) != student_depth:
        raise ValueError(f"the student has {student_depth} blocks but its metadata keeps {len(kept)}; "
                         f"pass --kd-layer-map \"0:1,1:3,...\"")
    how = f"span ends of kept indices {list(kept)} ({frame})"
    if rule == "original":
        how += f"; the original has no map for a {student_depth}-block student and a {teacher_depth}-block teacher"
    return span_end_layer_map(kept, teacher_depth, list_sizes), how


# ------------------------------------------------------------------------------ losses
def outlier_mask(hidden, k):
    """1 where |h - mu| < k * std (mu, std per sample over tokens and channels), else 0; all ones
    when k <= 0. Same shape and dtype as `hidden` (float32 math)."""
    hidden = hidden.float()
    if k <= 0:
        return torch.ones_like(hidden)
    dims = tuple(range(1, hidden.ndim))
    mu = hidden.mean(dim=dims, keepdim=True)
    var = hidden.var(dim=dims, unbiased=False, keepdim=True)
    return ((hidden - mu).abs() < k * var.sqrt()).to(hidden.dtype)


def masked_feature_loss(student_hiddens, teacher_hiddens, k):
    """mean over pairs of mean((m_s * h_s - m_t * h_t)^2), teacher detached; fp32."""
    if len(student_hiddens) != len(teacher_hiddens):
        raise ValueError(f"{len(student_hiddens)} student hidden states but {len(teacher_hiddens)} teacher ones")
    if not student_hiddens:
        raise ValueError("masked_feature_loss needs at least one (student, teacher) pair")
    total = 0.0
    for h_s, h_t in zip(student_hiddens, teacher_hiddens):
        h_s, h_t = h_s.float(), h_t.detach().float()
        if h_s.shape != h_t.shape:
            raise ValueError(f"student hidden {tuple(h_s.shape)} and teacher hidden {tuple(h_t.shape)} differ; the "
                             f"feature loss needs the same hidden size (or --beta-feat 0)")
        total = total + ((outlier_mask(h_s, k) * h_s - outlier_mask(h_t, k) * h_t) ** 2).mean()
    return total / len(student_hiddens)


KD_T0_TERMS = ("decoder-nll", "kl")


def output_kd_loss(diffusion, student_output, teacher_output, x_t, t, x_start=None, t0_term="decoder-nll"):
    """mean((eps_s - eps_t)^2) plus, when the diffusion learns the variance, the mean over samples
    of a variance term in bits with the student's mean detached (the eps term trains the mean, as
    in the training vb): KL(teacher posterior || student posterior) for t > 0; at t == 0 the
    original's student decoder NLL of `x_start` (t0_term "decoder-nll", as the plain loss) or
    the KL to the teacher there too (t0_term "kl"). fp32."""
    if t0_term not in KD_T0_TERMS:
        raise ValueError(f"unknown t0_term {t0_term!r}; use one of {', '.join(KD_T0_TERMS)}")
    channels = x_t.shape[1]
    student_output, teacher_output = student_output.float(), teacher_output.detach().float()
    kd = mean_flat((student_output[:, :channels] - teacher_output[:, :channels]) ** 2).mean()
    if student_output.shape[1] == 2 * channels and diffusion._learns_variance:
        vb = diffusion.output_kl_bpd(teacher_output, student_output, x_t.float(), t, detach_mean=True)
        if t0_term == "decoder-nll":  # computed for every row (no host sync to ask whether some t == 0)
            if x_start is None:
                raise ValueError("the t == 0 decoder NLL needs x_start")
            frozen = torch.cat([student_output[:, :channels].detach(), student_output[:, channels:]], dim=1)
            decoder_nll = diffusion.vb_terms_bpd_from_output(frozen, x_start.float(), x_t.float(), t,
                                                             clip_denoised=False)["output"]  # the NLL where t == 0
            vb = torch.where(t == 0, decoder_nll, vb)
        kd = kd + vb.mean()
    return kd


def feature_beta(epoch, epochs, beta0):
    """beta0 at epoch 0, linearly down to 0 at the last epoch (epochs - 1); beta0 for a 1-epoch run."""
    if epochs <= 1:
        return beta0
    return beta0 * max(0.0, 1.0 - epoch / (epochs - 1))


def draw_label_drops(batch_size, dropout_prob, device):
    """The classifier-free label drops of a step (1 = null label), drawn once and given to both
    the student and the teacher; None when the student has no null class."""
    if dropout_prob <= 0:
        return None
    return (torch.rand(batch_size, device=device) < dropout_prob).long()


def student_and_teacher_outputs(student, teacher, x_t, t, y, force_drop_ids, *, layer_pairs, mask_sigma):
    """(student output, teacher output, feat) on the same x_t, t, labels and label drops; the
    teacher runs under no_grad. With `layer_pairs` both also return the hidden states of their
    paired blocks and feat is the masked feature loss over them; without, feat is 0."""
    student_kwargs = dict(y=y, force_drop_ids=force_drop_ids)
    teacher_kwargs = dict(y=y, force_drop_ids=force_drop_ids)
    if layer_pairs:
        student_kwargs["hidden_indices"] = [s for s, _ in layer_pairs]
        teacher_kwargs["hidden_indices"] = [t_block for _, t_block in layer_pairs]
    with torch.no_grad():
        teacher_result = teacher(x_t, t, **teacher_kwargs)
    student_result = student(x_t, t, **student_kwargs)
    if not layer_pairs:
        return student_result, teacher_result, torch.zeros((), device=x_t.device)
    (student_output, student_hiddens), (teacher_output, teacher_hiddens) = student_result, teacher_result
    return student_output, teacher_output, masked_feature_loss(student_hiddens, teacher_hiddens, mask_sigma)


def masked_kd_losses(student, teacher, diffusion, x_start, y, *, alpha, beta, mask_sigma, layer_pairs,
                     class_dropout_prob, t=None, noise=None, force_drop_ids=None, kd_t0_term="decoder-nll"):
    """The Masked-KD losses of one batch: dict of fp32 scalars loss / gt / kd / feat.

    `student` and `teacher` are called as model(x_t, t, y, force_drop_ids=, hidden_indices=)
    (the student possibly DDP-wrapped); t, noise and the label drops are drawn here unless given
    (in that order: t, noise, drops). The teacher runs under no_grad. `kd_t0_term`: the
    variance term of kd at t == 0 (output_kd_loss; "decoder-nll" is the original's)."""
    batch = x_start.shape[0]
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=x_start.device)
    if noise is None:
        noise = torch.randn_like(x_start)
    if force_drop_ids is None:
        force_drop_ids = draw_label_drops(batch, class_dropout_prob, x_start.device)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    student_output, teacher_output, feat = student_and_teacher_outputs(
        diffusion.wrap_model(student), diffusion.wrap_model(teacher), x_t, t, y, force_drop_ids,
        layer_pairs=layer_pairs if beta > 0 else None, mask_sigma=mask_sigma)
    student_output = student_output.float()
    kd = output_kd_loss(diffusion, student_output, teacher_output, x_t, t, x_start=x_start, t0_term=kd_t0_term)
    gt = diffusion.losses_from_output(student_output, x_start.float(), x_t.float(), t, noise.float())["loss"].mean()
    loss = alpha * kd + (1.0 - alpha) * gt + beta * feat
    return {"loss": loss, "gt": gt, "kd": kd, "feat": feat}

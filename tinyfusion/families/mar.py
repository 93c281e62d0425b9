"""MAR: masked autoregressive generation with a per-token diffusion head (Li et al. 2024).

Training (MAR's): each sample's tokens get a random order; one mask ratio per batch is drawn from
a Gaussian centred at 1 with std 0.25, truncated to [--mask-ratio-min, 1]; the first
ceil(L * ratio) tokens of each order are hidden. The encoder sees the rest, the decoder gives z
for every token, and the head's diffusion loss (the cosine-schedule, learned-sigma Gaussian
diffusion of `diffusion/`, mse + vb) is averaged over the hidden tokens, each token repeated
--diffusion-batch-mul times with its own t and noise. Labels drop to the null class (MAR's
fake latent) with the model's label_drop_prob.

Sampling (MAR's `sample_tokens`): --num-iter steps over a cosine schedule of how many tokens stay
hidden, each step predicting the tokens that leave the mask with the head's respaced diffusion
(--num-sampling-steps, MAR's 100 by default), the guidance scale rising linearly with the share
of tokens already generated (--cfg-schedule linear; constant keeps --cfg-scale), the head's
per-step noise times --temperature. Every draw of sample i (its order, the head's noise) comes
from its own generator, so the images do not depend on the batch or the number of ranks.

Masked KD: the student and the teacher see the same order, mask, label drops, t and noise;
kd = mean over hidden tokens of (z_student - z_teacher)^2 (the decoder output that conditions the
head), gt = the student's MAR loss, feat = the masked feature loss over aligned blocks.
"""
import math

import torch

from diffusion import create_diffusion
from diffusion.distillation import masked_feature_loss
from tinyfusion.errors import TinyFusionError
from tinyfusion.families import entry_named
from tinyfusion.families.base import ModelFamily, one_line_errors

MASK_RATIO_STD = 0.25  # MAR's truncated Gaussian of the mask ratio: centred at 1.0, this std
CFG_SCHEDULES = ("linear", "constant")


def core(model):
    """The MAR inside the training loop's wrappers (autocast: .model, DistributedDataParallel:
    .module), for its attributes (seq_len, patchify); calls go through the wrappers."""
    while not hasattr(model, "seq_len"):
        model = getattr(model, "module", None) or model.model
    return model


# ---------------------------------------------------------------------- masking
def draw_mask_ratio(mask_ratio_min, generator=None):
    """One draw of MAR's mask ratio: N(1, 0.25^2) truncated to [mask_ratio_min, 1] (inverse CDF)."""
    low = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / MASK_RATIO_STD, dtype=torch.float64))
    high = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return float(1.0 + MASK_RATIO_STD * torch.special.ndtri(low + u * (high - low)))


def random_orders(batch_size, seq_len, device, generator=None):
    """(B, L) random generation orders, one permutation per sample."""
    return torch.argsort(torch.rand(batch_size, seq_len, generator=generator, device=device), dim=1)


def mask_first(orders, count):
    """(B, L) float mask with 1 on the first `count` positions of each order (hidden tokens)."""
    mask = torch.zeros(orders.shape, device=orders.device)
    return mask.scatter_(1, orders[:, :count], 1.0)


def training_mask(batch_size, seq_len, mask_ratio_min, device, generator=None):
    """MAR's training mask: random orders, one truncated-Gaussian ratio, ceil(L * ratio) hidden."""
    orders = random_orders(batch_size, seq_len, device, generator)
    ratio = draw_mask_ratio(mask_ratio_min, generator)
    return mask_first(orders, int(math.ceil(seq_len * ratio)))


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


# ---------------------------------------------------------------------- generation
def tokens_still_hidden(step, num_iter, seq_len, hidden_now):
    """How many tokens stay hidden after `step` (MAR's cosine schedule, MaskGIT's): floor(L *
    cos(pi/2 * (step + 1) / num_iter)), at least 1 and at most one fewer than are hidden now."""
    scheduled = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
    return max(1, min(hidden_now - 1, scheduled))


def guidance_at(cfg_scale, cfg_schedule, seq_len, still_hidden):
    """The step's guidance scale: linear (Muse's) rises from 1 with the share of generated tokens."""
    if cfg_schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (seq_len - still_hidden) / seq_len
    return cfg_scale


def per_sample_rows(generators, rows_each, channels, pad):
    """(B * rows_each, C) Gaussian rows, sample i's from generators[i] (padding rows zero)."""
    from tinyfusion.sampling.generate import draw_rows
    return draw_rows(generators, (rows_each, channels), pad).reshape(-1, channels)


def sample_head(model, process, z, generators, pad, *, guided, cfg_scale, temperature, device):
    """Token latents for the condition rows z (sample-major; [conditional; unconditional] when
    guided: MAR guides whenever its --cfg is not 1, whatever the step's scale) with the head's
    ancestral sampler: x_T and every step's noise per sample (the step noise times
    `temperature`, as MAR's)."""
    rows = len(z) // (2 if guided else 1)
    rows_each = rows // (len(generators) + pad)
    copies = 2 if guided else 1
    channels = model.head.in_channels
    start = per_sample_rows(generators, rows_each, channels, pad).repeat(copies, 1).to(device)

    def noise_fn(like):
        draw = per_sample_rows(generators, rows_each, channels, pad).repeat(copies, 1)
        return (draw * temperature).to(like.device, like.dtype)

    head = model.head.forward_with_cfg if guided else model.head.forward
    kwargs = dict(c=z, cfg_scale=cfg_scale) if guided else dict(c=z)
    sampled = process.p_sample_loop(head, start.shape, noise=start, clip_denoised=False, model_kwargs=kwargs,
                                    device=device, noise_fn=noise_fn)
    return sampled[:rows]


@torch.no_grad()
def sample_tokens(model, process, y, generators, *, cfg_scale, amp, num_iter, cfg_schedule, temperature,
                  progress=False):
    """MAR's sample_tokens: latents (N, C, H, W) for labels y (N, or [y; null] when guided).
    generators: one per real sample (the rest of the rows are padding)."""
    from tinyfusion.flags import autocast
    guided = cfg_scale != 1.0
    batch = len(y) // (2 if guided else 1)
    pad = batch - len(generators)
    device, seq_len = y.device, model.seq_len
    orders = torch.stack([torch.randperm(seq_len, generator=g) for g in generators] +
                         [torch.arange(seq_len)] * pad).to(device)
    mask = torch.ones(batch, seq_len, device=device)
    tokens = torch.zeros(batch, seq_len, model.token_channels, device=device)
    for step in tqdm_steps(num_iter, progress):
        copies = 2 if guided else 1
        with autocast(*amp):
            z = model(tokens.repeat(copies, 1, 1), y, mask.repeat(copies, 1)).float()
        still_hidden = tokens_still_hidden(step, num_iter, seq_len, int(mask[0].sum()))
        mask_next = mask_first(orders, still_hidden)
        to_predict = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
        mask = mask_next
        if int(to_predict[0].sum()) == 0:  # more steps than tokens: nothing leaves the mask this step
            continue
        rows = z[to_predict.repeat(copies, 1).nonzero(as_tuple=True)]
        scale = guidance_at(cfg_scale, cfg_schedule, seq_len, still_hidden)
        with autocast(*amp):
            sampled = sample_head(model, process, rows, generators, pad, guided=guided, cfg_scale=scale,
                                  temperature=temperature, device=device)
        tokens = tokens.clone()
        tokens[to_predict.nonzero(as_tuple=True)] = sampled.float()
    return model.unpatchify(tokens)


def tqdm_steps(num_iter, progress):
    if not progress:
        return range(num_iter)
    from tqdm import tqdm
    return tqdm(range(num_iter), desc="MAR steps")


class Family(ModelFamily):
    entry = entry_named("MAR")
    record_keys = ("mar",)

    def __init__(self, mask_ratio_min=0.7, diffusion_batch_mul=4):
        if not 0.0 < mask_ratio_min <= 1.0:
            raise TinyFusionError(f"--mask-ratio-min must be in (0, 1], got {mask_ratio_min}")
        if diffusion_batch_mul < 1:
            raise TinyFusionError(f"--diffusion-batch-mul must be >= 1, got {diffusion_batch_mul}")
        self.mask_ratio_min, self.diffusion_batch_mul = mask_ratio_min, diffusion_batch_mul
        # the head's training diffusion: 1000 steps, cosine schedule, learned sigma (MAR's DiffLoss)
        self.diffusion = create_diffusion("", noise_schedule="cosine")

    @classmethod
    def from_args(cls, args):
        defaults = dict(cls.entry.flag_defaults)
        return cls(getattr(args, "mask_ratio_min", defaults["mask_ratio_min"]),
                   getattr(args, "diffusion_batch_mul", defaults["diffusion_batch_mul"]))

    def describe(self):
        return f"mask ratio in [{self.mask_ratio_min}, 1], head batch x{self.diffusion_batch_mul}"

    # ------------------------------------------------------------------ checkpoints
    def record(self):
        return {"mar": dict(mask_ratio_min=self.mask_ratio_min, diffusion_batch_mul=self.diffusion_batch_mul)}

    def resume_identity(self):
        return dict(mask_ratio_min=self.mask_ratio_min, diffusion_batch_mul=self.diffusion_batch_mul)

    # ------------------------------------------------------------------ training
    def head_batch(self, tokens):
        """(target, t, noise, x_t) of the head: every token repeated diffusion_batch_mul times."""
        target = tokens.reshape(-1, tokens.shape[-1]).repeat(self.diffusion_batch_mul, 1)
        t = torch.randint(0, self.diffusion.num_timesteps, (len(target),), device=target.device)
        noise = torch.randn_like(target)
        return target, t, noise, self.diffusion.q_sample(target, t, noise=noise)

    def head_losses(self, head_output, target, x_t, t, noise, mask):
        """The head's diffusion losses averaged over the hidden tokens (their repeats included)."""
        terms = self.diffusion.losses_from_output(head_output.float(), target.float(), x_t.float(), t, noise.float())
        weights = mask.reshape(-1).repeat(self.diffusion_batch_mul)
        return {name: masked_mean(terms[name], weights) for name in ("loss", "mse", "vb")}

    def draw_batch(self, model, x):
        """(tokens, mask, label drops) of a training batch, from the global generator."""
        tokens = core(model).patchify(x)
        mask = training_mask(len(x), core(model).seq_len, self.mask_ratio_min, x.device)
        drop = torch.rand(len(x), device=x.device) < core(model).label_drop_prob
        return tokens, mask, drop

    def training_losses(self, model, x, y):
        """MAR's loss of a batch (x: latents (N, C, H, W)), as fp32 scalars."""
        tokens, mask, drop = self.draw_batch(model, x)
        target, t, noise, x_t = self.head_batch(tokens)
        head_output = model(tokens, y, mask, drop=drop, head_x=x_t, head_t=t)[0]
        terms = self.head_losses(head_output, target, x_t, t, noise, mask)
        return {"loss": terms["loss"], "gt": terms["loss"].detach(), "mse": terms["mse"].detach(),
                "vb": terms["vb"].detach()}

    def kd_losses(self, student, teacher, x, y, *, alpha, beta, mask_sigma, layer_pairs, **_):
        """Masked KD of a batch on one shared draw (see the module docstring)."""
        tokens, mask, drop = self.draw_batch(student, x)
        target, t, noise, x_t = self.head_batch(tokens)
        pairs = layer_pairs if beta > 0 else None
        with torch.no_grad():
            teacher_out = teacher(tokens, y, mask, drop=drop, hidden_indices=[j for _, j in pairs] if pairs else None)
        student_out = student(tokens, y, mask, drop=drop, head_x=x_t, head_t=t,
                              hidden_indices=[i for i, _ in pairs] if pairs else None)
        head_output, student_z = student_out[0], student_out[1]
        teacher_z = teacher_out[0] if pairs else teacher_out
        kd = masked_mean(((student_z.float() - teacher_z.float()) ** 2).mean(dim=-1), mask)
        gt = self.head_losses(head_output, target, x_t, t, noise, mask)["loss"]
        feat = masked_feature_loss(student_out[2], teacher_out[1], mask_sigma) if pairs else torch.zeros((), device=x.device)
        return {"loss": alpha * kd + (1.0 - alpha) * gt + beta * feat, "gt": gt, "kd": kd, "feat": feat}

    # ------------------------------------------------------------------ calibration (BI) and activations
    def check_calibration(self, calibration):
        if calibration != "clean":
            raise TinyFusionError("a MAR is calibrated on its clean tokens with training masks (--calibration clean); "
                                  "it has no noised input")

    def calibration_forward(self, model, x, y, generator, *, calibration, num_timesteps):
        """The model on the clean tokens of x with a training mask drawn from `generator`."""
        self.check_calibration(calibration)
        mask = training_mask(len(x), model.seq_len, self.mask_ratio_min, "cpu", generator)
        device = next(model.parameters()).device
        return model(model.patchify(x).to(device), y.to(device), mask.to(device))

    def calibration_record(self, calibration, num_timesteps):
        return dict(timesteps=None, **self.record()), f"clean tokens, training masks (ratio >= {self.mask_ratio_min})"

    def activation_inputs(self, latents, generator, *, when=None, model=None):
        """(latents, mask): training masks, or `when` a fixed mask ratio in (0, 1], of `model`'s tokens."""
        if when is None:
            mask = training_mask(len(latents), model.seq_len, self.mask_ratio_min, "cpu", generator)
        else:
            orders = random_orders(len(latents), model.seq_len, "cpu", generator)
            mask = mask_first(orders, int(math.ceil(model.seq_len * when)))
        return latents, mask

    @staticmethod
    def activation_forward(model, latents, mask, y):
        return model(model.patchify(latents), y, mask, hidden_indices=list(range(model.depth)))[1]

    def check_noising_flags(self, model_name, *, timestep, time):
        if timestep is not None:
            raise TinyFusionError(f"--timestep is a DiT timestep; {model_name} is a MAR: pass --time in (0, 1] "
                                  f"(the mask ratio)")

    def noising_record(self, when):
        return dict(mask_ratio=when if when is not None else f"training draws (>= {self.mask_ratio_min})")

    # ------------------------------------------------------------------ sampling
    def check_sampler(self, model_name, sampler):
        if sampler != "mar":
            raise TinyFusionError(f"{model_name} is a MAR: it samples with MAR's loop (--sampler mar, the default)")

    def sampling_options(self, args):
        defaults = dict(self.entry.flag_defaults)
        options = {key: getattr(args, key, defaults[key]) for key in ("num_iter", "cfg_schedule", "temperature")}
        if options["cfg_schedule"] not in CFG_SCHEDULES:
            raise TinyFusionError(f"--cfg-schedule must be one of {', '.join(CFG_SCHEDULES)}")
        return options

    def sampling_process(self, sampler, num_steps, timestep_spacing, options):
        """The head's respaced diffusion (MAR's gen_diffusion): num_steps of the cosine schedule,
        spread over [0, 999] as MAR's ("dit", the default) or leading (0, s, 2s, ...: ours).

        Why leading exists: MAR's spacing starts at t = 999, where the cosine schedule's alpha_bar
        is 2.4e-9, and its first step (to t = 989 with 100 steps, 979 with 50) multiplies the head's
        error in the noise by 316 (100 steps) or 632 (50 steps) in the step's mean. A head trained
        for long predicts that noise almost exactly; an undertrained one (the digits quick start's)
        makes the tokens explode. Leading spacing starts at t = 1000 - s, where the factor is 1.6."""
        spacing = "leading" if timestep_spacing == "leading" else ""
        with one_line_errors():
            return create_diffusion(f"{spacing}{num_steps}", noise_schedule="cosine")

    @staticmethod
    def run_sampler(process, sampler, model_fn, shape, loop_kwargs, eta, options, context=None):
        """MAR's generation loop (sample_tokens) for the labels and generators `generate` hands over."""
        return sample_tokens(context["model"], process, loop_kwargs["model_kwargs"]["y"], context["generators"],
                             cfg_scale=context["cfg_scale"], amp=context["amp"], progress=loop_kwargs["progress"],
                             **options)

    def sample_name_suffix(self, args, options):
        suffix = f"-iter-{options['num_iter']}"
        if options["cfg_schedule"] != "linear":
            suffix += f"-{options['cfg_schedule']}"
        if options["temperature"] != 1.0:
            suffix += f"-temp-{options['temperature']}"
        return suffix

    def sample_identity(self, args, options):
        return dict(options)

    def preview_samples(self, model, labels, *, seed, cfg_scale, num_steps, vae, device):
        """MAR's loop at the default settings from per-sample generators."""
        from tinyfusion.sampling.generate import generate, sample_generator
        process = self.sampling_process("mar", num_steps, None, None)
        return generate(model, process, labels, [sample_generator(seed, i) for i in range(len(labels))], cfg_scale,
                        "mar", vae=vae, flow_options=self.sampling_options(None))

    @classmethod
    def default_checkpoint(cls, model_name, image_size):
        raise TinyFusionError(f"--ckpt is required for --model {model_name}: MAR's released checkpoints "
                              f"(checkpoint-last.pth of MAR-B/L/H, linked from MAR's README) are not downloaded "
                              f"automatically; pass the file")

"""models.MAR against tests/mar_reference.py, an independent reference of the released MAR written
from its published structure: checkpoint key names and shapes, parameter counts, strict loads both
ways, encoder / decoder / head outputs with the same weights, patch order, the head's diffusion loss,
one step of the generation loop on a hand-computed example, and the gated / pruned MAR.

Float32 comparisons use ATOL = RTOL = 1e-5: the two paths compute the same formulas with
different kernels (SDPA vs explicit softmax attention, addcmul vs multiply-add)."""
import math

import numpy as np
import pytest
import torch

import diffusion
import models
from mar_reference import (ReferenceMAR, mar_reference_for, next_mask_length, reference_generation_step)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = RTOL = 1e-5
NUM_CLASSES = 10
# MAR-XS/2 at reduced, unequal widths and depths, so that a swapped encoder / decoder setting shows
TINY = dict(input_size=8, in_channels=4, num_classes=NUM_CLASSES, encoder_hidden_size=32, encoder_depth=2,
            encoder_num_heads=4, decoder_hidden_size=48, decoder_depth=3, decoder_num_heads=6,
            head_depth=2, head_width=40)
HIDDEN = 10  # tokens every sample hides (of seq_len 16)


def tiny_mar(**overrides):
    return models.MAR_models["MAR-XS/2"](**{**TINY, **overrides}).eval()


def randomize(module, seed=0):
    """Random values in every parameter (our init zeroes the head's modulation and output, which
    would make any head compare equal): weights ~ N(0, 1/fan_in), LayerNorm gains 1 + N(0, 0.1),
    everything else N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 2 and "class_emb" not in name and "fake_latent" not in name:
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif name.endswith("weight") and param.dim() == 1:  # LayerNorm gains
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return module


def tiny_pair(seed=0, **overrides):
    """(ours, reference) of the tiny config, holding the same random weights, in eval mode."""
    ours = tiny_mar(**overrides)
    ref = randomize(mar_reference_for(ours.config()), seed)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def fixed_inputs(seq_len=16, channels=16, batch=4, seed=1):
    """Tokens, labels (the last one the null class = fake_latent) and a mask hiding HIDDEN tokens
    per sample, at a different random set of positions in each sample."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, seq_len, channels, generator=generator)
    labels = torch.tensor([3, 0, 9, NUM_CLASSES])[:batch]
    mask = torch.zeros(batch, seq_len)
    for row in range(batch):
        mask[row, torch.randperm(seq_len, generator=generator)[:HIDDEN]] = 1.0
    return tokens, labels, mask


def reference_class_embedding(ref, labels):
    """class_emb(label), or fake_latent for the null class (written out, row by row)."""
    rows = [ref.fake_latent[0] if int(label) == NUM_CLASSES else ref.class_emb.weight[int(label)]
            for label in labels]
    return torch.stack(rows)


def shapes(state_dict):
    return {key: tuple(value.shape) for key, value in state_dict.items()}


# --------------------------------------------------------------------------- layout and size
MAR_B_ORIGINAL = dict(img_size=256, vae_stride=16, patch_size=1, encoder_embed_dim=768, encoder_depth=12,
                      encoder_num_heads=12, decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                      vae_embed_dim=16, class_num=1000, buffer_size=64, diffloss_d=6, diffloss_w=1024)


def test_mar_b_state_dict_has_the_released_key_names_and_shapes():
    with torch.device("meta"):
        ours, ref = models.MAR_models["MAR-B"](), ReferenceMAR(**MAR_B_ORIGINAL)
    assert shapes(ours.state_dict()) == shapes(ref.state_dict())
    # spot checks of the layout by hand: 256 tokens + 64 buffer slots, 16-channel KL-16 tokens
    expected = {"encoder_pos_embed_learned": (1, 320, 768), "diffusion_pos_embed_learned": (1, 256, 768),
                "z_proj.weight": (768, 16), "diffloss.net.final_layer.linear.weight": (32, 1024),
                "diffloss.net.cond_embed.weight": (1024, 768), "encoder_blocks.11.attn.qkv.weight": (2304, 768),
                "decoder_blocks.11.mlp.fc2.weight": (768, 3072), "diffloss.net.res_blocks.5.adaLN_modulation.1.bias":
                (3072,), "class_emb.weight": (1000, 768), "fake_latent": (1, 768), "mask_token": (1, 1, 768)}
    assert {key: shapes(ours.state_dict())[key] for key in expected} == expected


README_PARAMS_M = {"MAR-B": 208, "MAR-L": 479, "MAR-H": 943}
ORIGINAL_SIZES = {"MAR-B": (768, 12, 12, 6, 1024), "MAR-L": (1024, 16, 16, 8, 1280), "MAR-H": (1280, 20, 16, 12, 1536)}


@pytest.mark.parametrize("name", sorted(README_PARAMS_M))
def test_parameter_counts_match_the_reference_and_mars_readme(name):
    width, depth, heads, head_depth, head_width = ORIGINAL_SIZES[name]
    with torch.device("meta"):
        ours = models.MAR_models[name]()
        ref = ReferenceMAR(**{**MAR_B_ORIGINAL, "encoder_embed_dim": width, "encoder_depth": depth,
                              "encoder_num_heads": heads, "decoder_embed_dim": width, "decoder_depth": depth,
                              "decoder_num_heads": heads, "diffloss_d": head_depth, "diffloss_w": head_width})
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    # the README's #params column is the count rounded UP to millions (207.9M, 478.3M, 942.4M)
    assert math.ceil(count / 1e6) == README_PARAMS_M[name]


def layer_norms(module):
    return {name: (sub.eps, sub.elementwise_affine) for name, sub in module.named_modules()
            if isinstance(sub, torch.nn.LayerNorm)}


def test_every_layer_norm_has_the_originals_eps_and_affinity():
    """An eps of 1e-5 instead of 1e-6 moves outputs by less than the forward tolerance: checked here."""
    ours, ref = tiny_pair()
    assert layer_norms(ours) == layer_norms(ref)
    assert {eps for eps, _ in layer_norms(ours).values()} == {1e-6}
    assert layer_norms(ours)["diffloss.net.final_layer.norm_final"] == (1e-6, False)


def test_state_dicts_load_strictly_both_ways():
    ours, ref = tiny_mar(), randomize(mar_reference_for(tiny_mar().config()), seed=3)
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert all(torch.equal(value, ref.state_dict()[key]) for key, value in ours.state_dict().items())
    randomize(ours, seed=4)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(value, ours.state_dict()[key]) for key, value in ref.state_dict().items())


# --------------------------------------------------------------------------- forward parity
def test_encoder_decoder_and_full_forward_match_the_reference():
    ours, ref = tiny_pair()
    tokens, labels, mask = fixed_inputs()
    with torch.no_grad():
        ref_encoded = ref.forward_mae_encoder(tokens, mask, reference_class_embedding(ref, labels))
        ref_z = ref.forward_mae_decoder(ref_encoded, mask)
        encoded, visible = ours.forward_encoder(tokens, mask, ours.class_embedding(labels))
        z = ours.forward_decoder(encoded, visible)
        full = ours(tokens, labels, mask)
    assert encoded.shape == (4, ours.buffer_size + 16 - HIDDEN, 32) and z.shape == (4, 16, 48)
    torch.testing.assert_close(encoded, ref_encoded, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(z, ref_z, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(full, ref_z, atol=ATOL, rtol=RTOL)
    # the null-class row really is fake_latent's (not a class row): it differs from label 0's
    with torch.no_grad():
        as_class_zero = ours(tokens, torch.tensor([3, 0, 9, 0]), mask)
    assert not torch.allclose(as_class_zero[3], full[3], atol=1e-3)


def test_hidden_tokens_are_never_read():
    ours, _ = tiny_pair()
    tokens, labels, mask = fixed_inputs()
    changed = tokens + 100.0 * mask.unsqueeze(-1)
    with torch.no_grad():
        assert torch.equal(ours(tokens, labels, mask), ours(changed, labels, mask))


def head_inputs(ours, rows=6, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(rows, ours.token_channels, generator=generator)
    t = torch.tensor([0, 999, 17, 500, 250, 3])[:rows]
    z = torch.randn(rows, ours.decoder_hidden_size, generator=generator)
    return x_t, t, z


def test_head_and_its_guided_forward_match_the_reference():
    ours, ref = tiny_pair()
    x_t, t, z = head_inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours.head(x_t, t, z), ref.diffloss.net(x_t, t, z), atol=ATOL, rtol=RTOL)
        guided = ours.head.forward_with_cfg(x_t, t, z, 2.5)
        torch.testing.assert_close(guided, ref.diffloss.net.forward_with_cfg(x_t, t, z, 2.5), atol=ATOL, rtol=RTOL)
    # guidance mixes the noise channels only: both halves equal, the variance values per row
    channels = ours.token_channels
    assert torch.equal(guided[:3, :channels], guided[3:, :channels])
    with torch.no_grad():
        plain = ours.head(torch.cat([x_t[:3], x_t[:3]]), t, z)
    torch.testing.assert_close(guided[:, channels:], plain[:, channels:], atol=ATOL, rtol=RTOL)


def test_patchify_is_channel_major_within_a_token():
    ours, ref = tiny_pair(input_size=4, in_channels=2, num_classes=NUM_CLASSES)
    # value 100 c + 10 row + column at (channel c, row, column) of a 2 x 4 x 4 latent, patch 2
    latent = torch.tensor([[[[100.0 * c + 10 * h + w for w in range(4)] for h in range(4)] for c in range(2)]])
    expected = torch.tensor([[[100.0 * c + 10 * (2 * i + a) + (2 * j + b) for c in range(2) for a in range(2)
                               for b in range(2)] for i in range(2) for j in range(2)]])
    assert torch.equal(ours.patchify(latent), expected)
    assert torch.equal(ref.patchify(latent), expected)
    assert torch.equal(ours.unpatchify(expected), latent)
    assert torch.equal(ref.unpatchify(expected), latent)


# --------------------------------------------------------------------------- diffusion loss
def cosine_alphas_cumprod(steps=1000, s=0.008):
    """improved-DDPM's cosine schedule: betas 1 - f(i+1)/f(i), at most 0.999, f(u) = cos^2(pi/2 (u/T + s)/(1 + s))."""
    f = [math.cos((i / steps + s) / (1 + s) * math.pi / 2) ** 2 for i in range(steps + 1)]
    betas = np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(steps)])
    return np.cumprod(1.0 - betas)


def test_head_diffusion_loss_matches_the_reference_and_the_mse_by_hand():
    ours, ref = tiny_pair()
    target, t, z = head_inputs(ours, seed=5)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(6))
    train_diffusion = diffusion.create_diffusion("", noise_schedule="cosine")
    with torch.no_grad():
        got = train_diffusion.training_losses(ours.head, target, t, dict(c=z), noise=noise)
        want = train_diffusion.training_losses(ref.diffloss.net, target, t, dict(c=z), noise=noise)
    for term in ("loss", "mse", "vb"):
        torch.testing.assert_close(got[term], want[term], atol=ATOL, rtol=RTOL)
    alpha_bar = torch.tensor(cosine_alphas_cumprod()[t.numpy()], dtype=torch.float32).unsqueeze(1)
    x_t = alpha_bar.sqrt() * target + (1 - alpha_bar).sqrt() * noise
    with torch.no_grad():
        eps_pred = ref.diffloss.net(x_t, t, z)[:, :ours.token_channels]
    torch.testing.assert_close(got["mse"], ((eps_pred - noise) ** 2).mean(dim=1), atol=ATOL, rtol=1e-4)


# --------------------------------------------------------------------------- one generation step
# seq_len 16, num_iter 4: floor(16 cos(pi/2 k/4)) for k = 1..4 is 14, 11, 6, 0 -> at least 1
HAND_MASK_LENGTHS = [14, 11, 6, 1]
HAND_PREDICTED = [16 - 14, 14 - 11, 11 - 6, 6]  # the last step predicts every token left
HAND_CFG_ITER = [1 + 2 * (16 - 14) / 16, 1 + 2 * (16 - 11) / 16, 1 + 2 * (16 - 6) / 16, 1 + 2 * (16 - 1) / 16]


def test_next_mask_length_by_hand():
    hidden = 16
    for step, expected in enumerate(HAND_MASK_LENGTHS):
        assert next_mask_length(16, hidden, step, 4) == expected
        hidden = expected
    assert next_mask_length(16, 3, 0, 4) == 2  # never more than one fewer than hidden now ...
    assert next_mask_length(16, 1, 0, 4) == 1  # ... and never below one


def test_generation_loop_follows_the_hand_computed_schedule_with_guidance():
    _, ref = tiny_pair()
    batch = 2
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(row)) for row in range(batch)])
    labels = torch.tensor([1, 7])
    tokens, mask = torch.zeros(batch, 16, 16), torch.ones(batch, 16)
    calls = []

    def head_sample(z, temperature, cfg_iter):  # rows numbered by step, so the writes can be traced
        calls.append((z.shape[0], temperature, cfg_iter))
        return torch.full((z.shape[0], 16), float(len(calls)))

    for step in range(4):
        before = tokens.clone()
        with torch.no_grad():
            cond_z = ref.forward_mae_decoder(ref.forward_mae_encoder(before, mask, ref.class_emb(labels)), mask)
            uncond_z = ref.forward_mae_decoder(
                ref.forward_mae_encoder(before, mask, ref.fake_latent.expand(batch, -1)), mask)
        z, cfg_iter, mask_next, to_pred = reference_generation_step(
            ref, tokens, mask, orders, step, 4, labels, 3.0, "linear", 0.9, head_sample)
        assert cfg_iter == pytest.approx(HAND_CFG_ITER[step])
        assert to_pred.sum(dim=1).tolist() == [HAND_PREDICTED[step]] * batch
        for row in range(batch):  # hidden next = the first mask_len positions of the row's order
            assert sorted(mask_next[row].nonzero().flatten().tolist()) == sorted(
                orders[row, :HAND_MASK_LENGTHS[step]].tolist())
        torch.testing.assert_close(z, torch.cat([cond_z[to_pred], uncond_z[to_pred]]), atol=0, rtol=0)
        assert torch.equal(tokens[to_pred], torch.full((int(to_pred.sum()), 16), float(step + 1)))
        assert torch.equal(tokens[~to_pred], before[~to_pred])
        mask = mask_next.float()
    assert [call[0] for call in calls] == [2 * batch * count for count in HAND_PREDICTED]
    assert all(call[1] == 0.9 for call in calls)
    # every token written exactly once; a row's order is hidden longest first (mask_by_order keeps
    # its head hidden), so the step of writing falls along the order
    written_at = tokens[:, :, 0]
    for row in range(batch):
        steps_in_order = written_at[row, orders[row]].tolist()
        assert steps_in_order == sorted(steps_in_order, reverse=True) and 0 not in steps_in_order


def test_generation_step_without_guidance_conditions_on_the_labels_or_fake_latent():
    _, ref = tiny_pair()
    orders = torch.arange(16).repeat(2, 1)
    tokens, mask = torch.zeros(2, 16, 16), torch.ones(2, 16)
    with torch.no_grad():
        unconditional = ref.forward_mae_decoder(
            ref.forward_mae_encoder(tokens, mask, ref.fake_latent.expand(2, -1)), mask)
    z, cfg_iter, _, to_pred = reference_generation_step(ref, tokens, mask, orders, 0, 4, None, 1.0, "linear", 1.0,
                                                        None)
    assert cfg_iter == 1.0 and z.shape == (2 * 2, 48)
    assert to_pred[:, 14:].all() and not to_pred[:, :14].any()  # orders 0..15: positions 14, 15 go first
    torch.testing.assert_close(z, unconditional[to_pred], atol=0, rtol=0)
    assert torch.equal(tokens, torch.zeros(2, 16, 16))  # no head: tokens untouched


# --------------------------------------------------------------------------- gates and pruning
def test_a_group_across_the_encoder_decoder_boundary_is_refused():
    with pytest.raises(ValueError, match="boundary"):
        tiny_mar(encoder_depth=2, decoder_depth=3, groups=[[1, 1], [1, 2], [1, 2]])  # blocks 1..2 span it
    tiny_mar(encoder_depth=2, decoder_depth=3, groups=[[1, 2], [1, 1], [1, 2]])  # the same sizes, aligned


def copy_kept_blocks(source, target, kept_encoder, kept_decoder):
    """target's blocks <- source's blocks kept_encoder / kept_decoder; every other weight by name."""
    with torch.no_grad():
        for key, value in target.state_dict().items():
            prefix, _, rest = key.partition(".")
            if prefix in ("encoder_blocks", "decoder_blocks"):
                index, _, rest = rest.partition(".")
                kept = kept_encoder if prefix == "encoder_blocks" else kept_decoder
                key = f"{prefix}.{kept[int(index)]}.{rest}"
            value.copy_(source.state_dict()[key])


def test_gated_and_pruned_mar_match_the_reference_of_the_kept_blocks():
    gated = tiny_mar(encoder_depth=4, decoder_depth=4, groups=[[1, 2]] * 4)
    randomize(gated, seed=7)
    with torch.no_grad():  # decide blocks 0 and 3 of the encoder, 1 and 2 of the decoder (global 5, 6)
        for logits, choice in zip(gated.gate_logits, [0, 1, 1, 0]):
            logits.copy_(torch.tensor([1.0, 0.0]) if choice == 0 else torch.tensor([0.0, 1.0]))
    assert gated.kept_indices() == [0, 3, 5, 6]
    pruned = models.prune_to_kept_blocks(gated, gated.kept_indices()).eval()
    assert (pruned.encoder_depth, pruned.decoder_depth, pruned.groups) == (2, 2, None)
    ref = mar_reference_for(pruned.config())
    copy_kept_blocks(gated, ref, kept_encoder=[0, 3], kept_decoder=[1, 2])
    tokens, labels, mask = fixed_inputs()
    with torch.no_grad():
        want = ref.forward_mae_decoder(
            ref.forward_mae_encoder(tokens, mask, reference_class_embedding(ref, labels)), mask)
        torch.testing.assert_close(pruned(tokens, labels, mask), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(gated.eval()(tokens, labels, mask), want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_our_generation_loop_takes_the_reference_steps(monkeypatch, cfg):
    """tinyfusion.families.mar.sample_tokens against reference_generation_step, step by step: the
    same orders (each sample's first draw), the decoder rows handed to the head, the guidance of
    the step and the positions written, with the head's samples shared (ours are fed to the
    reference, so the two token grids must stay equal)."""
    from tinyfusion.families import mar
    from tinyfusion.sampling.generate import sample_generator
    ours, ref = tiny_pair(seed=3)
    labels, num_iter, temperature = torch.tensor([2, 7, 0]), 5, 0.9
    steps = []
    real_sample_head = mar.sample_head

    def recording(model, process, z, generators, pad, **kwargs):
        sampled = real_sample_head(model, process, z, generators, pad, **kwargs)
        steps.append(dict(z=z.clone(), cfg=kwargs["cfg_scale"], sampled=sampled.clone()))
        return sampled
    monkeypatch.setattr(mar, "sample_head", recording)
    y = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]) if cfg != 1.0 else labels
    process = mar.Family().sampling_process("mar", 3, None, None)
    ours_out = mar.sample_tokens(ours, process, y, [sample_generator(4, i) for i in range(3)], cfg_scale=cfg,
                                 amp=(torch.float32, "cpu"), num_iter=num_iter, cfg_schedule="linear",
                                 temperature=temperature)
    orders = torch.stack([torch.randperm(16, generator=sample_generator(4, i)) for i in range(3)])
    tokens, mask = torch.zeros(3, 16, ours.token_channels), torch.ones(3, 16)
    for step, recorded in enumerate(steps):
        def head_sample(z, temp, cfg_iter):
            assert temp == temperature
            return recorded["sampled"].repeat(2 if cfg != 1.0 else 1, 1)
        with torch.no_grad():
            z, cfg_iter, mask_next, _ = reference_generation_step(ref, tokens, mask, orders, step, num_iter, labels,
                                                                  cfg, "linear", temperature, head_sample)
        torch.testing.assert_close(recorded["z"], z, atol=ATOL, rtol=RTOL)
        assert recorded["cfg"] == pytest.approx(cfg_iter)
        mask = mask_next.float()
    assert len(steps) == num_iter and bool((mask.sum(dim=1) == 1).all())
    torch.testing.assert_close(ours_out, ours.unpatchify(tokens), atol=0, rtol=0)

"""models.py against the original's configurations, numerics and gates: every expected value is computed here from the
formulas, not by calling the code under test."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import (DiT, DiT_models, DiTBlock, TimestepEmbedder, candidate_masks, get_2d_sincos_pos_embed,
                    modulate, prune_to_kept_blocks, straight_through_gumbel_onehot)
from tinyfusion.pruning.pruned_models import plain_name


def randomize(model, std=0.05, seed=0):
    """Our init zeroes every adaLN and the final layer (the model would output 0): give every
    trainable weight a random value so that the tests can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)
    return model


def small(name, **kw):
    """A published config at reduced width (same depth, patch and gating pattern)."""
    settings = dict(input_size=16, num_classes=10, hidden_size=32, num_heads=4)
    settings.update(kw)
    return DiT_models[name](**settings)


# --------------------------------------------------------------------------- configs
ORIGINAL_BLOCK_KEYS = {
    "attn.qkv.weight": (3456, 1152), "attn.qkv.bias": (3456,), "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,), "mlp.fc1.weight": (4608, 1152), "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (1152, 4608), "mlp.fc2.bias": (1152,), "adaLN_modulation.1.weight": (6912, 1152),
    "adaLN_modulation.1.bias": (6912,),
}
ORIGINAL_OTHER_KEYS = {
    "pos_embed": (1, 256, 1152), "x_embedder.proj.weight": (1152, 4, 2, 2), "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256), "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152), "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152), "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,), "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}


def test_xl2_state_dict_keys_and_shapes_match_the_official_checkpoint():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    expected = dict(ORIGINAL_OTHER_KEYS)
    for block in range(28):
        expected.update({f"blocks.{block}.{key}": shape for key, shape in ORIGINAL_BLOCK_KEYS.items()})
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert len(expected) == 292
    assert actual == expected


def test_parameter_counts_of_xl_and_d14():
    with torch.device("meta"):
        xl, d14 = DiT_models["DiT-XL/2"](), DiT_models["DiT-D14/2"]()
    assert sum(p.numel() for p in xl.parameters()) == 675_129_632
    assert sum(p.numel() for p in d14.parameters()) == 340_457_504


ORIGINAL_CONFIGS = {  # name: (depth, hidden, patch, heads, groups)
    **{f"DiT-{family}/{patch}": (depth, hidden, patch, heads, None)
       for family, (depth, hidden, heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16),
                                              "B": (12, 768, 12), "S": (12, 384, 6)}.items()
       for patch in (2, 4, 8)},
    "DiT-D19/2": (19, 1152, 2, 16, None), "DiT-D14/2": (14, 1152, 2, 16, None), "DiT-D7/2": (7, 1152, 2, 16, None),
    "DiT-XL-1-2": (28, 1152, 2, 16, [[1, 2]] * 14), "DiT-XL-2-4": (28, 1152, 2, 16, [[2, 4]] * 7),
    "DiT-XL-7-14": (28, 1152, 2, 16, [[7, 14]] * 2), "DiT-XL-1-4": (28, 1152, 2, 16, [[1, 4]] * 7),
    "DiT-D14-1-2": (14, 1152, 2, 16, [[1, 2]] * 7), "DiT-D14-2-4": (14, 1152, 2, 16, [[2, 4]] * 3 + [[1, 2]]),
    # ours: CPU-sized configs for small data
    "DiT-XS/1": (12, 128, 1, 4, None), "DiT-XS/2": (12, 128, 2, 4, None), "DiT-XS/4": (12, 128, 4, 4, None),
}


def test_every_published_name_has_the_spec_architecture():
    assert set(DiT_models) == set(ORIGINAL_CONFIGS)
    for name, (depth, hidden, patch, heads, groups) in ORIGINAL_CONFIGS.items():
        with torch.device("meta"):
            model = DiT_models[name]()
        assert (model.depth, model.hidden_size, model.patch_size, model.num_heads, model.groups) == \
            (depth, hidden, patch, heads, groups), name
        kept = sum(keep for keep, _ in groups) if groups else depth
        assert {"DiT-XL-1-2": 14, "DiT-XL-2-4": 14, "DiT-XL-7-14": 14, "DiT-XL-1-4": 7,
                "DiT-D14-1-2": 7, "DiT-D14-2-4": 7}.get(name, depth) == kept


@pytest.mark.parametrize("name", sorted(ORIGINAL_CONFIGS))
def test_every_config_runs_forward_at_reduced_width(name):
    model = small(name).eval()
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([1, 500]), torch.tensor([3, 7]))
    assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ORIGINAL_CONFIGS))
def test_every_config_runs_forward_at_full_width(name):
    model = DiT_models[name](input_size=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([1]))
    assert out.shape == (1, 8, 8, 8) and torch.isfinite(out).all()


def test_custom_groups_and_their_errors():
    pattern = [[2, 4], [2, 4], [3, 4], [2, 4], [3, 4], [2, 4], [2, 4]]
    model = small("DiT-XL/2", groups=pattern)
    assert len(model.kept_indices()) == 16
    with pytest.raises(ValueError, match="must add up to 28"):
        small("DiT-XL/2", groups=[[1, 2]] * 13)
    with pytest.raises(ValueError, match="keep between 1 and 2"):
        small("DiT-XL/2", groups=[[3, 2]] * 14)
    assert plain_name("DiT-XL-1-2") == "DiT-XL/2" and plain_name("DiT-D14-2-4") == "DiT-D14/2"


# --------------------------------------------------------------------------- numerics
def test_pos_embed_matches_the_sincos_formula():
    hidden, grid = 16, 3
    table = get_2d_sincos_pos_embed(hidden, grid)
    quarter = hidden // 4
    for i in range(grid):          # row
        for j in range(grid):      # column
            expected = []
            for position in (j, i):  # first half encodes the column, second the row
                freqs = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
                expected += [math.sin(position * w) for w in freqs] + [math.cos(position * w) for w in freqs]
            np.testing.assert_allclose(table[i * grid + j], expected, rtol=0, atol=1e-12)
    model = DiT(input_size=6, patch_size=2, hidden_size=hidden, depth=1, num_heads=2, num_classes=3)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), table, atol=1e-7)
    assert not model.pos_embed.requires_grad


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    for row, step in enumerate(t.tolist()):
        freqs = [math.exp(-math.log(10000) * k / 128) for k in range(128)]
        expected = [math.cos(step * f) for f in freqs] + [math.sin(step * f) for f in freqs]
        np.testing.assert_allclose(emb[row].numpy(), expected, atol=2e-4)  # float32 arguments up to ~1000 rad


def test_modulate():
    x = torch.arange(6.0).view(1, 2, 3)
    shift, scale = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, -1.0, 2.0]])
    expected = [[0 * 1.5 + 1, 1 * 0 + 2, 2 * 3 + 3], [3 * 1.5 + 1, 4 * 0 + 2, 5 * 3 + 3]]
    assert modulate(x, shift, scale).tolist() == [expected]


def test_unpatchify_inverts_row_major_patches():
    model = DiT(input_size=4, patch_size=2, in_channels=3, hidden_size=8, depth=1, num_heads=2, learn_sigma=False)
    image = torch.randn(2, 3, 4, 4)
    tokens = []
    for row in range(2):
        for col in range(2):
            patch = image[:, :, row * 2:(row + 1) * 2, col * 2:(col + 1) * 2]  # (N, C, p, q)
            tokens.append(patch.permute(0, 2, 3, 1).reshape(2, -1))            # (p, q, C) order
    assert torch.equal(model.unpatchify(torch.stack(tokens, dim=1)), image)


def test_block_matches_hand_written_adaln_attention_and_mlp():
    torch.manual_seed(0)
    hidden, heads = 8, 2
    block = randomize(DiTBlock(hidden, heads)).double()
    x, c = torch.randn(2, 5, hidden, dtype=torch.float64), torch.randn(2, hidden, dtype=torch.float64)

    def layer_norm(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + 1e-6)

    def linear(layer, v):
        return v @ layer.weight.T + layer.bias

    mod = linear(block.adaLN_modulation[1], c * torch.sigmoid(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = [mod[:, k * hidden:(k + 1) * hidden] for k in range(6)]
    h = layer_norm(x) * (1 + scale1[:, None]) + shift1[:, None]
    q, k, v = linear(block.attn.qkv, h).view(2, 5, 3, heads, hidden // heads).unbind(2)
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hidden // heads), dim=-1)
    attn = linear(block.attn.proj, torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, hidden))
    x1 = x + gate1[:, None] * attn
    h = layer_norm(x1) * (1 + scale2[:, None]) + shift2[:, None]
    u = linear(block.mlp.fc1, h)
    gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    expected = x1 + gate2[:, None] * linear(block.mlp.fc2, gelu)
    torch.testing.assert_close(block(x, c), expected, rtol=0, atol=1e-12)


def test_forward_with_cfg_guides_three_channels_by_default():
    torch.manual_seed(0)
    model = randomize(small("DiT-S/2")).eval()
    half = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([5, 9, 5, 9]), torch.tensor([1, 2, 10, 10])  # second half: null class
    raw = model(torch.cat([half, half]), t, y)
    scale = 4.0
    for guide_all, guided in ((False, 3), (True, 4)):
        out = model.forward_with_cfg(torch.cat([half, torch.randn_like(half)]), t, y, scale,
                                     guide_all_channels=guide_all)
        cond, uncond = raw[:2], raw[2:]
        expected_half = uncond[:, :guided] + scale * (cond[:, :guided] - uncond[:, :guided])
        torch.testing.assert_close(out[:2, :guided], expected_half)
        torch.testing.assert_close(out[2:, :guided], expected_half)
        torch.testing.assert_close(out[:, guided:], raw[:, guided:])  # passes through unguided


def test_label_drop_forced_and_random():
    model = randomize(small("DiT-S/2"))
    table = model.y_embedder.embedding_table.weight
    labels = torch.tensor([1, 2, 3])
    dropped = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(dropped, table[[10, 2, 10]])
    torch.manual_seed(0)
    drops = model.y_embedder.token_drop(torch.zeros(20000, dtype=torch.long))
    assert abs((drops == 10).float().mean().item() - 0.1) < 0.01


def test_hidden_indices_return_the_states_after_those_blocks():
    torch.manual_seed(0)
    model = randomize(small("DiT-S/2", depth=4)).eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 4]), torch.tensor([1, 2])
    out, (h1, h3) = model(x, t, y, hidden_indices=[1, 3])
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    states = []
    for block in model.blocks:
        h = block(h, c)
        states.append(h)
    assert torch.equal(h1, states[1]) and torch.equal(h3, states[3])
    assert torch.equal(out, model(x, t, y))


# --------------------------------------------------------------------------- gates
def test_candidates_follow_itertools_combinations():
    for keep, size in ((1, 2), (2, 4), (7, 14), (1, 4)):
        table = candidate_masks(keep, size)
        combos = list(itertools.combinations(range(size), keep))
        assert table.shape == (len(combos), size)
        for row, combo in zip(table, combos):
            assert [j for j in range(size) if row[j] == 1] == list(combo)
    with torch.device("meta"):
        xl12 = DiT_models["DiT-XL-1-2"]()
    assert len(xl12.gate_logits) == 14 and all(logits.shape == (2,) for logits in xl12.gate_logits)
    model = small("DiT-XL-2-4")
    assert all(torch.all(logits == 0.02) for logits in model.gate_logits)
    assert len(model.gate_logits[0]) == 6  # C(4, 2)


def test_decisions_confidences_and_kept_indices():
    model = small("DiT-XL/2", groups=[[1, 2]] * 12 + [[2, 4]])
    with torch.no_grad():
        for logits in model.gate_logits[:12]:
            logits.copy_(torch.tensor([0.0, 1.0]))
        model.gate_logits[12].copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 3.0, 0.0]))  # combos[4] = (1, 3)
    model.scaling = 2.0
    assert model.gate_decisions() == [1] * 12 + [4]
    assert model.kept_indices() == [2 * g + 1 for g in range(12)] + [25, 27]
    expected_pair = math.exp(2.0) / (1 + math.exp(2.0))
    expected_last = math.exp(6.0) / (math.exp(6.0) + 5)
    np.testing.assert_allclose(model.gate_confidences(), [expected_pair] * 12 + [expected_last], rtol=1e-6)


def test_straight_through_onehot_is_exact_and_has_softmax_gradient():
    logits = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    onehot = straight_through_gumbel_onehot(logits, 0.5, 4096, generator)
    assert set(onehot.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(onehot.detach().sum(1), torch.ones(4096))
    # with tau = 1 the hard draws follow softmax(logits)
    counts = straight_through_gumbel_onehot(logits.detach(), 1.0, 200000, generator).mean(0)
    torch.testing.assert_close(counts, torch.softmax(logits.detach(), 0), atol=5e-3, rtol=0)
    # gradient of sum(w * onehot) is the gradient of the soft sample: check against autograd on
    # the soft formula with the same Gumbel noise
    generator = torch.Generator().manual_seed(1)
    onehot = straight_through_gumbel_onehot(logits, 0.5, 3, generator)
    weights = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [2.0, 2.0, 0.0]])
    (onehot * weights).sum().backward()
    uniform = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))
    gumbels = -torch.log(-torch.log(uniform))
    soft_logits = logits.detach().clone().requires_grad_(True)
    (torch.softmax((soft_logits + gumbels) / 0.5, dim=-1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, soft_logits.grad)


def gated_pair(groups, depth, seed=0):
    torch.manual_seed(seed)
    model = randomize(small("DiT-S/2", depth=depth, groups=groups, input_size=8), seed=seed).double()
    return model


def forced_onehots(model, choices, draw_seed):
    """Straight-through one-hots whose values are the given candidates (per group, one per
    sample) and whose gradient is that of a seeded Gumbel-softmax draw."""
    drawn = model.sample_gate_onehots(len(choices[0]), generator=torch.Generator().manual_seed(draw_seed))
    return [F.one_hot(torch.tensor(group_choices), onehot.shape[1]).to(onehot.dtype) + (onehot - onehot.detach())
            for group_choices, onehot in zip(choices, drawn)]


def run_gated_step(model, mode, x, t, y, draw_seed, weights_train=True, choices=None):
    model.gate_forward = mode
    model.train()
    for name, param in model.named_parameters():
        if not name.startswith("gate_logits") and name != "pos_embed":
            param.requires_grad_(weights_train)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if choices is None:
        onehots = model.sample_gate_onehots(len(x), generator=torch.Generator().manual_seed(draw_seed))
    else:
        onehots = forced_onehots(model, choices, draw_seed)
    out = model(x, t, y, force_drop_ids=torch.zeros_like(y), gate_onehots=onehots)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return out.detach(), grads, x.grad


@pytest.mark.parametrize("weights_train", [True, False])
def test_sparse_gated_forward_matches_the_dense_formula_in_every_gradient(weights_train):
    model = gated_pair([[1, 2]] * 3 + [[2, 4]], depth=10)
    model.tau, model.scaling = 0.7, 3.0
    x = torch.randn(7, 4, 8, 8, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (7,)), torch.randint(0, 10, (7,))
    sparse = run_gated_step(model, "sparse", x, t, y, draw_seed=5, weights_train=weights_train)
    dense = run_gated_step(model, "dense", x, t, y, draw_seed=5, weights_train=weights_train)
    masks = model.block_masks_from_onehots(model.sample_gate_onehots(7, torch.Generator().manual_seed(5)))
    assert 0 < masks.sum() < masks.numel() and (masks.sum(0) > 0).any() and (masks.sum(0) < 7).any()
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=1e-10)
    assert set(sparse[1]) == set(dense[1])
    assert any(name.startswith("gate_logits") for name in dense[1])
    assert weights_train == any(name.startswith("blocks") for name in dense[1])
    for name in dense[1]:
        torch.testing.assert_close(sparse[1][name], dense[1][name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(sparse[2], dense[2], rtol=0, atol=1e-6)


# groups [[1,2]]*3 + [[2,4]] over 10 blocks, 7 samples: block 0 is kept by every sample and
# block 1 by none; block 2 by 6 (one sample of 16 tokens dropped) and block 3 by 1; blocks 4/5
# by 3/4; the [2,4] group's candidates (0,1) (0,2) (0,3) (1,2) (1,3) (2,3) keep blocks 6-9 by 4, 4, 3, 3
FORCED_CHOICES = [[0] * 7, [0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 1, 0, 1, 1], [0, 0, 1, 2, 3, 4, 5]]


def expected_block_calls(masks, tokens, min_dropped_rows):
    """The block calls the sparse forward should make, as (batch, autograd on): the whole batch with
    autograd when every sample keeps the block or the dropped samples hold fewer than
    `min_dropped_rows` token rows, without autograd when none keeps it; otherwise the kept
    samples with autograd, then the dropped ones without."""
    calls = []
    for kept in masks.sum(0).long().tolist():
        batch, dropped = len(masks), len(masks) - kept
        if kept == 0:
            calls.append((batch, False))
        elif dropped == 0 or dropped * tokens < min_dropped_rows:
            calls.append((batch, True))
        else:
            calls += [(kept, True), (dropped, False)]
    return calls


def record_block_calls(model):
    """[(batch, autograd on)] of the gated forward's block calls, filled as the model runs."""
    calls, run_block, run_gated_block = [], model._run_block, model._run_gated_block

    def no_grad_call(block, h, c):  # _run_gated_block's own _run_block call is not counted twice
        if not torch.is_grad_enabled():
            calls.append((len(h), False))
        return run_block(block, h, c)

    def autograd_call(block, h, c):
        calls.append((len(h), torch.is_grad_enabled()))
        return run_gated_block(block, h, c)
    model._run_block, model._run_gated_block = no_grad_call, autograd_call
    return calls


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("min_dropped_rows", [0, 17, 10 ** 9])
@pytest.mark.parametrize("weights_train", [True, False])
def test_every_path_of_the_sparse_forward_gives_the_dense_formulas_gradients(weights_train, min_dropped_rows,
                                                                              recompute):
    """Float64: blocks kept by all, by none, by some with the batch split (kept samples with
    autograd, dropped ones without) and by some in one autograd pass (the crossover for few
    dropped samples), with and without the selective recomputation of elementwise activations,
    give the dense formula's output and every gradient."""
    model = gated_pair([[1, 2]] * 3 + [[2, 4]], depth=10)
    model.tau, model.scaling = 0.7, 3.0
    model.gate_split_min_dropped_rows = min_dropped_rows
    model.gate_recompute_elementwise = recompute
    x = torch.randn(7, 4, 8, 8, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (7,)), torch.randint(0, 10, (7,))
    calls = record_block_calls(model)
    sparse = run_gated_step(model, "sparse", x, t, y, draw_seed=5, weights_train=weights_train, choices=FORCED_CHOICES)
    masks = model.block_masks_from_onehots(forced_onehots(model, FORCED_CHOICES, 5)).detach()
    assert masks.sum(0).tolist() == [7, 0, 6, 1, 3, 4, 4, 4, 3, 3]
    assert calls == expected_block_calls(masks, tokens=16, min_dropped_rows=min_dropped_rows)
    assert ((7, True) in calls[2:]) == (min_dropped_rows > 16)  # a mixed block in one autograd pass, or not
    dense = run_gated_step(model, "dense", x, t, y, draw_seed=5, weights_train=weights_train, choices=FORCED_CHOICES)
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=1e-10)
    # block 1, which no sample keeps, gets no gradient at all (the dense formula's is all zeros)
    assert {name.split(".")[1] for name in set(dense[1]) - set(sparse[1])} == ({"1"} if weights_train else set())
    for name, dense_grad in dense[1].items():
        assert dense_grad.abs().sum() > 0 or name.startswith("blocks.1."), f"{name}: a vacuous comparison"
        torch.testing.assert_close(sparse[1].get(name, torch.zeros_like(dense_grad)), dense_grad, rtol=0, atol=1e-6,
                                   msg=name)
    torch.testing.assert_close(sparse[2], dense[2], rtol=0, atol=1e-6)


def gated_step_outputs(model, onehots, x, t, y):
    """Output and every gradient of one gated forward/backward with the given one-hots."""
    model.zero_grad(set_to_none=True)
    out = model(x, t, y, force_drop_ids=torch.zeros_like(y), gate_onehots=[o.detach().clone().requires_grad_(True)
                                                                             for o in onehots])
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_compiled_gated_blocks_give_eager_results_and_stop_compiling_after_the_first_steps():
    """prune_by_learning.py --compile: every block compiled (here on dynamo's "eager" backend,
    which runs the captured graphs as they are) gives the uncompiled model's output and
    gradients, and once two forced steps have shown every variant (blocks kept by all samples,
    by none, by one, by all but one, LoRA folded or not; then other sub-batch sizes), eight
    steps of fresh random masks, with sub-batch sizes never seen, compile nothing."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from tinyfusion.pruning.lora import apply_lora
    model = gated_pair([[1, 2]] * 3 + [[2, 4]], depth=10)
    apply_lora(model, rank=4)
    with torch.no_grad():  # LoRA B starts at zero: make the update count
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.05)
    for logits in model.gate_logits:
        logits.requires_grad_(True)
    eager = copy.deepcopy(model).train()
    torch._dynamo.reset()
    model.train().compile_gated_blocks(backend="eager")
    x, t, y = torch.randn(7, 4, 8, 8, dtype=torch.float64), torch.randint(0, 1000, (7,)), torch.randint(0, 10, (7,))
    second = [[1, 1, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1], [5, 5, 4, 1, 0, 3, 2]]
    draws = [forced_onehots(model, FORCED_CHOICES, 1), forced_onehots(model, second, 2)]
    draws += [model.sample_gate_onehots(7, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
    graphs = []
    for onehots in draws:
        compiled_out, compiled_grads = gated_step_outputs(model, onehots, x, t, y)
        eager_out, eager_grads = gated_step_outputs(eager, onehots, x, t, y)
        torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=1e-12)
        assert compiled_grads.keys() == eager_grads.keys()
        for name in eager_grads:
            torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=0, atol=1e-12, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert model.gate_recompute_elementwise is False
    assert graphs[1] >= 4 and graphs[2:] == [graphs[1]] * 8, graphs


def test_sparse_forward_skips_backward_of_blocks_that_a_sample_drops():
    model = gated_pair([[1, 2]] * 2, depth=4)
    model.gate_split_min_dropped_rows = 0  # split off even one dropped sample of 16 token rows
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_full_backward_hook(lambda module, gin, gout, index=index: calls.append(index))
    # sample 0 keeps blocks 0 and 2, sample 1 keeps 1 and 3: no block is on for both
    onehots = [torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
               for _ in range(2)]
    model.train()
    out = model(torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2]), torch.tensor([0, 1]),
                force_drop_ids=torch.zeros(2, dtype=torch.long), gate_onehots=onehots)
    out.sum().backward()
    # each block ran backward once, on its single "on" sample (the off sample had no graph)
    assert sorted(calls) == [0, 1, 2, 3]
    assert all(onehot.grad is not None and onehot.grad.abs().sum() > 0 for onehot in onehots)


def test_forced_choices_prune_to_the_plain_shallow_model_bit_for_bit():
    torch.manual_seed(0)
    gated = randomize(small("DiT-XL-1-2"))
    choices = [g % 2 for g in range(14)]  # keep block 2g for even g, 2g+1 for odd g
    kept = [2 * g + choice for g, choice in enumerate(choices)]
    with torch.no_grad():
        for logits, choice in zip(gated.gate_logits, choices):
            logits.copy_(torch.tensor([1.0, 0.0]) if choice == 0 else torch.tensor([0.0, 1.0]))
    assert gated.kept_indices() == kept
    pruned = prune_to_kept_blocks(gated, kept)
    d14 = small("DiT-D14/2")
    assert set(pruned.state_dict()) == set(d14.state_dict())
    source = gated.state_dict()
    for key, value in pruned.state_dict().items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            key = f"blocks.{kept[int(index)]}.{rest}"
        assert torch.equal(value, source[key]), key
    gated.eval(), pruned.eval()
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([1, 50, 999]), torch.tensor([1, 2, 3])
    onehots = [F.one_hot(torch.full((3,), choice), 2).float() for choice in choices]
    assert torch.equal(gated(x, t, y, gate_onehots=onehots), pruned(x, t, y))
    assert torch.equal(gated(x, t, y), pruned(x, t, y))  # eval mode runs the decided blocks


def test_prune_to_kept_blocks_rejects_bad_indices():
    model = small("DiT-S/2", depth=4)
    for bad, message in (([], "empty"), ([0, 0], "repeat"), ([2, 1], "sorted"), ([0, 4], "out of range")):
        with pytest.raises(ValueError, match=message):
            prune_to_kept_blocks(model, bad)

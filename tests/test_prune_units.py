"""Unit tests of the pruning building blocks: LoRA, the sparse gated forward with LoRA, gate
decisions, schedules, index validation, the BI score, the decision plot's data."""
import math

import pytest
import torch
import torch.nn as nn

from tinyfusion.pruning.lora import LoRALinear, apply_lora, lora_parameters
from models import DiT_models, gate_decision
from tinyfusion.pruning.pruned_models import linear_schedule, validate_kept_indices
from tinyfusion.pruning.block_importance import block_input_output_similarity, bi_scores, select_by_bi_score
from tests.prune_helpers import set_block_gates, xs_model


def strip_lora_keys(state_dict):
    """A state dict without the LoRA factors (what the plain model loads)."""
    return {key: value for key, value in state_dict.items() if not key.endswith((".lora_A", ".lora_B"))}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- LoRA
def test_lora_linear_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    expected_weight = base.weight.detach().clone()
    layer = LoRALinear(base, rank=3, generator=torch.Generator().manual_seed(1))
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters: keys and values stay
    assert layer.scaling == 2.0  # alpha = 2 x rank
    x = torch.randn(4, 7, 6)
    assert torch.equal(layer(x), base(x))  # B starts at zero: the output is unchanged
    with torch.no_grad():
        layer.lora_B.normal_()
    by_hand = x @ expected_weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-5)
    # a sub-batch gives the rows of the full batch (the gated forward runs sub-batches)
    torch.testing.assert_close(layer(x[[0, 2]]), layer(x)[[0, 2]])
    # without autograd, on enough rows (28 x (6 + 5) >= 6 x 5) the update is folded into the
    # weight: the same up to rounding; on 2 rows (22 < 30) it is applied to the rows as with autograd
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x[0, :2]), by_hand[0, :2], rtol=1e-5, atol=1e-5)


def test_apply_lora_wraps_every_linear_keeps_keys_and_freezes_the_rest():
    model = xs_model(depth=2)
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    keys_before = list(model.state_dict())
    named = apply_lora(model, rank=4, seed=3)
    assert [name for name, _ in named] == [f"{n}.{f}" for n in linear_names for f in ("lora_A", "lora_B")]
    assert keys_before == list(strip_lora_keys(model.state_dict()))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {name for name, _ in named}
    # the same seed gives the same adapters (every rank of a run starts identical)
    again = xs_model(depth=2)
    apply_lora(again, rank=4, seed=3)
    for (_, a), (_, b) in zip(lora_parameters(model), lora_parameters(again)):
        assert torch.equal(a, b)


def test_trainable_share_of_xl_1_2_with_rank_8():
    with torch.device("meta"):
        model = DiT_models["DiT-XL-1-2"]()
        base_params = sum(p.numel() for p in model.parameters())
        apply_lora(model, rank=8)
    for logits in model.gate_logits:
        logits.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    # hand count: per block r * (in + out) of qkv, proj, fc1, fc2, adaLN; plus t-embedder, final layer
    per_block = 8 * ((1152 + 3456) + (1152 + 1152) + (1152 + 4608) + (4608 + 1152) + (1152 + 6912))
    outside = 8 * ((256 + 1152) + (1152 + 1152) + (1152 + 32) + (1152 + 2304))
    assert trainable == 28 * per_block + outside + 14 * 2
    assert base_params == 675_129_632 + 28
    share = 100.0 * trainable / total
    print(f"DiT-XL-1-2, LoRA rank 8: {trainable:,} of {total:,} parameters train ({share:.3f}%)")
    assert 0.85 <= share <= 0.95


def _gated_lora_model():
    torch.manual_seed(0)
    model = xs_model(depth=4, patch=2, groups=[[1, 2], [1, 2]]).double()
    apply_lora(model, rank=2, seed=0)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            if param.shape[1] == 2:  # B: non-zero so that A gets gradients too
                param.normal_(std=0.1)
    for logits in model.gate_logits:
        logits.requires_grad_(True)
    return model


def test_sparse_gated_forward_matches_dense_formula_in_every_lora_gradient():
    model = _gated_lora_model()
    model.train()
    model.tau, model.scaling = 0.7, 3.0
    batch = 6
    x = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 10, (batch,))
    keep_labels = torch.zeros(batch, dtype=torch.long)
    grads, outputs = {}, {}
    for mode in ("dense", "sparse"):
        model.zero_grad(set_to_none=True)
        model.gate_forward = mode
        onehots = model.sample_gate_onehots(batch, generator=torch.Generator().manual_seed(5))
        masks = model.block_masks_from_onehots(onehots).detach()
        assert ((masks == 0).any(dim=0) & (masks == 1).any(dim=0)).all(), "every block must be on for some samples only"
        out = model(x, t, y, force_drop_ids=keep_labels, gate_onehots=onehots)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs[mode] = out.detach()
        grads[mode] = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                       for name, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outputs["sparse"], outputs["dense"], rtol=0, atol=1e-10)
    assert any(name.endswith("lora_A") for name in grads["dense"])
    for name, dense_grad in grads["dense"].items():
        assert dense_grad.abs().sum() > 0, f"{name} got no gradient: the comparison would be vacuous"
        torch.testing.assert_close(grads["sparse"][name], dense_grad, rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- decisions, schedules
def test_gate_decision_by_hand_and_equal_to_the_models_readout():
    groups = [[2, 4], [1, 2], [3, 4]]
    logits = [torch.tensor([0.0, 0.1, 0.0, 0.2, 0.5, 0.1]), torch.tensor([0.3, -0.3]), torch.tensor([0.0, 0.0, 0.4, 0.1])]
    kept, choices, confidences = gate_decision(groups, logits, scaling=2.0)
    # [2,4]: candidate 4 of combinations(range(4), 2) is (1, 3); [1,2]: candidate 0 = block 4 + 0;
    # [3,4]: candidate 2 of combinations(range(4), 3) is (0, 2, 3) -> blocks 6, 8, 9
    assert choices == [4, 0, 2]
    assert kept == [1, 3, 4, 6, 8, 9]
    first = math.exp(1.0) / sum(math.exp(2 * v) for v in [0.0, 0.1, 0.0, 0.2, 0.5, 0.1])
    second = math.exp(0.6) / (math.exp(0.6) + math.exp(-0.6))
    assert confidences[0] == pytest.approx(first, rel=1e-6) and confidences[1] == pytest.approx(second, rel=1e-6)

    model = DiT_models["DiT-XS/4"](input_size=8, in_channels=3, num_classes=10, depth=10, groups=groups)
    with torch.no_grad():
        for param, values in zip(model.gate_logits, logits):
            param.copy_(values)
    model.scaling = 2.0
    assert model.kept_indices() == kept
    assert model.gate_decisions() == choices
    assert model.gate_confidences() == pytest.approx(confidences, rel=1e-6)


def test_linear_schedules_at_start_middle_and_end():
    total = 101
    assert linear_schedule(4.0, 0.1, 0, total) == 4.0
    assert linear_schedule(4.0, 0.1, 50, total) == pytest.approx(2.05)
    assert linear_schedule(4.0, 0.1, 100, total) == pytest.approx(0.1)
    assert linear_schedule(100, 100, 37, total) == 100.0
    assert linear_schedule(4.0, 0.1, 0, 1) == 4.0  # a one-step run stays at the start value


def test_kept_index_validation_messages():
    assert validate_kept_indices([0, 2, 5], 6) == [0, 2, 5]
    for bad, word in (([], "empty"), ([0, 6], "out of range"), ([-1, 2], "out of range"), ([1, 1, 2], "repeat"),
                      ([2, 0], "not sorted")):
        with pytest.raises(ValueError, match=word) as info:
            validate_kept_indices(bad, 6)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- BI score
def _known_similarity_model():
    """6 blocks: gate values chosen so the similarity order is known; block 1 and the last block
    are exact identities (similarity 1)."""
    model = xs_model(depth=6, patch=2)
    for block, value in zip(model.blocks, [1.0, 0.0, 10.0, 0.01, 0.3, 0.0]):
        set_block_gates(block, value)
    return model.eval()


def test_bi_score_hooks_match_a_manual_block_loop():
    model = _known_similarity_model()
    x = torch.randn(5, 3, 8, 8)
    t = torch.randint(0, 1000, (5,))
    y = torch.randint(0, 10, (5,))
    by_hooks = block_input_output_similarity(model, lambda: model(x, t, y)) / 5
    with torch.no_grad():
        hidden = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        manual = []
        for block in model.blocks:
            out = block(hidden, c)
            manual.append(float(nn.functional.cosine_similarity(hidden, out, dim=-1).mean()))
            hidden = out
    torch.testing.assert_close(by_hooks, torch.tensor(manual, dtype=torch.float64), rtol=0, atol=1e-6)


def test_bi_score_removes_the_most_similar_blocks_never_the_last():
    from tinyfusion.families import dit
    model = _known_similarity_model()
    latents, labels = torch.randn(12, 3, 8, 8), torch.randint(0, 10, (12,))
    for calibration in ("clean", "noised"):
        scores = bi_scores(model, latents, labels, family=dit.Family(), calibration=calibration, batch_size=5, seed=0)
        assert scores[1] == pytest.approx(1.0, abs=1e-6) and scores[5] == pytest.approx(1.0, abs=1e-6)
        assert scores[3] > scores[4] > scores[2] and scores[3] > scores[0] > scores[2]
    assert select_by_bi_score(scores, 2) == [0, 2, 4, 5]  # blocks 1 and 3; block 5 is as similar but last
    assert select_by_bi_score(scores, 5) == [5]
    assert select_by_bi_score(scores, 0) == list(range(6))
    with pytest.raises(ValueError, match="between 0 and 5"):
        select_by_bi_score(scores, 6)


# ----------------------------------------------------------------------------- decision plot
def test_decision_series_and_png(tmp_path):
    from draw_decision import decision_series, draw
    groups = [[1, 2], [2, 4]]
    records = [{"step": 10, "loss": 1.0},  # a record without a decision is skipped
               {"step": 20, "kept_indices": [0, 2, 3], "confidences": [0.6, 0.2], "groups": groups},
               {"step": 40, "kept_indices": [1, 2, 5], "confidences": [0.9, 0.7], "groups": groups}]
    steps, kept, alpha = decision_series(records)
    assert steps.tolist() == [20, 40]
    assert kept.tolist() == [[0, 2, 3], [1, 2, 5]]
    assert alpha.tolist() == [[0.6, 0.2, 0.2], [0.9, 0.7, 0.7]]
    out = draw(records, tmp_path / "decision.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        draw(records, tmp_path / "decision.png")
    with pytest.raises(ValueError, match="no decision records"):
        decision_series([{"step": 1}])

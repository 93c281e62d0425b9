"""Low-precision inference of frozen models (tinyfusion/sampling/precision.py): weights cast once give
exactly autocast's result, stay within a stated tolerance of fp32, and keep the residual stream
fp32; the teacher wrapper returns ordinary fp32 tensors a loss can backpropagate through.

Tolerances (relative L2 error of the model output vs fp32, random weights, DiT-XS/2): bf16 has
an 8-bit significand (unit roundoff 2^-9 ~ 2e-3 per rounding), measured ~4e-3 -> bound 2e-2;
fp16 has 11 bits (~5e-4 per rounding), measured ~5e-4 -> bound 4e-3.
"""
import copy

import pytest
import torch

from diffusion import create_diffusion
from models import DiT_models
from tinyfusion.flags import autocast
from tinyfusion.errors import TinyFusionError
from tinyfusion.sampling.precision import FrozenForward, cast_weights_once, resolve_teacher_precision
from tinyfusion.sampling.generate import generate, sample_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def random_dit(seed=0, **kwargs):
    """A DiT-XS/2 with every weight random (the default init zeroes adaLN, making blocks identities)."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-XS/2"](input_size=8, num_classes=10, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    return model.eval().requires_grad_(False)


def batch(rows=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 8, 8, generator=generator), torch.randint(0, 1000, (rows,), generator=generator),
            torch.randint(0, 10, (rows,), generator=generator))


def relative_error(value, reference):
    return float((value.float() - reference).norm() / reference.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_once_is_autocast_bit_for_bit_and_close_to_fp32(dtype):
    model = random_dit()
    low = cast_weights_once(copy.deepcopy(model), dtype)
    assert low.blocks[0].attn.qkv.weight.dtype == dtype and low.x_embedder.proj.bias.dtype == dtype
    assert low.y_embedder.embedding_table.weight.dtype == torch.float32 and low.pos_embed.dtype == torch.float32
    x, t, y = batch()
    with torch.no_grad():
        reference = model(x, t, y)
        with autocast(dtype, "cpu"):
            recast = model(x, t, y)
            once = low(x, t, y)
    assert torch.equal(once, recast)  # same casts, same kernels, same shapes
    error = relative_error(once, reference)
    assert 0 < error < TOLERANCE[dtype]


def test_residual_stream_stays_fp32_with_massive_activations():
    """DiT's hidden states reach several hundred; rounding them to bf16 (8 bits) loses ~1 unit.
    Cast-once keeps them fp32, so its hidden states are far closer to fp32 than a model cast
    wholesale to bf16."""
    model = random_dit()
    with torch.no_grad():
        model.pos_embed.add_(300.0)  # a massive activation in every token, as in trained DiTs
    low = cast_weights_once(copy.deepcopy(model), torch.bfloat16)
    wholesale = copy.deepcopy(model).to(torch.bfloat16)
    x, t, y = batch()
    with torch.no_grad():
        _, (reference,) = model(x, t, y, hidden_indices=[11])
        with autocast(torch.bfloat16, "cpu"):
            _, (ours,) = low(x, t, y, hidden_indices=[11])
            _, (naive,) = wholesale(x.bfloat16(), t, y, hidden_indices=[11])
    assert reference.abs().max() > 250
    assert ours.dtype == torch.float32 and naive.dtype == torch.bfloat16
    assert relative_error(ours, reference) * 10 < relative_error(naive, reference)


def test_trainable_models_are_refused():
    model = random_dit().requires_grad_(True)
    with pytest.raises(TinyFusionError, match="frozen"):
        cast_weights_once(model, torch.bfloat16)


def test_frozen_forward_gives_ordinary_fp32_tensors_for_the_loss():
    teacher, student = random_dit(seed=0), random_dit(seed=1).requires_grad_(True)
    x, t, y = batch()
    with torch.no_grad():
        expected_out, expected_hiddens = teacher(x, t, y, hidden_indices=[3, 7])
    forward = FrozenForward(copy.deepcopy(teacher), torch.float32, "cpu")
    out, hiddens = forward(x, t, y, hidden_indices=[3, 7])
    assert torch.equal(out, expected_out) and all(torch.equal(a, b) for a, b in zip(hiddens, expected_hiddens))
    assert not out.is_inference() and not hiddens[0].is_inference()
    student_out, student_hiddens = student(x, t, y, hidden_indices=[3, 7])
    loss = (student_out - out).pow(2).mean() + (student_hiddens[0] * hiddens[0]).mean()
    loss.backward()  # an inference tensor saved for backward would raise here
    assert student.blocks[0].attn.qkv.weight.grad is not None

    low_out = FrozenForward(copy.deepcopy(teacher), torch.bfloat16, "cpu")(x, t, y)
    assert low_out.dtype == torch.float32 and 0 < relative_error(low_out, expected_out) < TOLERANCE[torch.bfloat16]


def test_teacher_precision_defaults():
    assert resolve_teacher_precision("auto", torch.bfloat16, "cpu") == torch.float32
    assert resolve_teacher_precision("auto", torch.bfloat16, "cuda") == torch.bfloat16
    assert resolve_teacher_precision("fp16", torch.float32, "cpu") == torch.float16
    with pytest.raises(TinyFusionError, match="teacher-precision"):
        resolve_teacher_precision("int8", torch.float32, "cpu")


def test_sampling_with_cast_once_weights_matches_autocast_sampling():
    model = random_dit()
    low = cast_weights_once(copy.deepcopy(model), torch.bfloat16)
    diffusion = create_diffusion("2")
    labels = [1, 2, 3]

    def run(net, dtype):
        return generate(net, diffusion, labels, [sample_generator(0, i) for i in range(3)], cfg_scale=4.0,
                        amp_dtype=dtype)
    reference, recast, once = run(model, torch.float32), run(model, torch.bfloat16), run(low, torch.bfloat16)
    assert torch.equal(once, recast)
    assert 0 < relative_error(once, reference) < TOLERANCE[torch.bfloat16]


# the flags of real CPUs (from /proc/cpuinfo, abridged): which have native bf16 matmul
AVX2_CPU = {"sse4_2", "avx", "avx2", "fma"}
AVX512_CPU = AVX2_CPU | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # Skylake / Cascade Lake: no BF16
AVX512_BF16_CPU = AVX512_CPU | {"avx512_bf16"}                                 # Cooper Lake, Zen 4
AMX_CPU = AVX512_BF16_CPU | {"amx_tile", "amx_bf16", "amx_int8"}              # Sapphire Rapids


@pytest.mark.parametrize("flags, native", [(AVX2_CPU, False), (AVX512_CPU, False), (AVX512_BF16_CPU, True),
                                           (AMX_CPU | {"avx512_fp16"} - {"avx512_bf16"}, True)])
def test_sampling_precision_auto_picks_bf16_only_where_the_cpu_has_it(flags, native):
    from tinyfusion.sampling.precision import resolve_sampling_precision
    dtype, note = resolve_sampling_precision("auto", "cpu", flags=flags)
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert note.startswith(f"precision auto: {'bf16' if native else 'fp32'} (") and "\n" not in note
    # asking for bf16 explicitly: used as asked, with a warning naming the measured slowdown where it is emulated
    dtype, note = resolve_sampling_precision("bf16", "cpu", flags=flags)
    assert dtype == torch.bfloat16
    if native:
        assert note is None
    else:
        assert note.startswith("warning: this cpu has no native bf16 matmul") and "0.71x" in note and "3.1x" in note
    assert resolve_sampling_precision("fp32", "cpu", flags=flags) == (torch.float32, None)


def test_fp16_needs_its_own_cpu_flags_and_this_cpu_is_read():
    from tinyfusion.sampling.precision import cpu_flags, native_low_precision
    assert not native_low_precision(torch.float16, "cpu", flags=AMX_CPU)
    assert native_low_precision(torch.float16, "cpu", flags=AMX_CPU | {"amx_fp16"})
    with open("/proc/cpuinfo") as f:  # this machine's own answer follows its flags line
        has_bf16 = any(flag in f.read().split() for flag in ("avx512_bf16", "amx_bf16"))
    assert native_low_precision(torch.bfloat16, "cpu") == has_bf16 == ("avx512_bf16" in cpu_flags() or
                                                                          "amx_bf16" in cpu_flags())


def test_sample_scripts_say_what_auto_chose(tmp_path, monkeypatch, capsys):
    """sample.py --precision auto on a CPU without native bf16: fp32, said in one line."""
    import sample
    import tinyfusion.sampling.precision as precision
    from test_sampling import PIXEL_FLAGS, save_tame_checkpoint, stop_at_generate
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(AVX512_CPU))
    ckpt = save_tame_checkpoint(tmp_path / "tame.pt")
    seen, Stop = stop_at_generate(monkeypatch, sample)
    flags = [*PIXEL_FLAGS, "--ckpt", ckpt, "--precision", "auto", "--per-sample-seeds", "--class-labels", "1",
             "--out", str(tmp_path / "grid.png")]
    with pytest.raises(Stop):
        sample.main(sample.parse_args(flags))
    assert seen["amp_dtype"] == torch.float32
    said = [line for line in capsys.readouterr().out.splitlines() if "precision" in line]
    assert len(said) == 1 and said[0].startswith("precision auto: fp32 (this CPU has no native bf16 matmul")
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(AMX_CPU))
    with pytest.raises(Stop):
        sample.main(sample.parse_args(flags))
    assert seen["amp_dtype"] == torch.bfloat16
    assert "precision auto: bf16 (this CPU has native bf16 matmul" in capsys.readouterr().out

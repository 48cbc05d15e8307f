"""``QuEPTConfig(zero_point="float")``: a real-valued zero point, GGUF Q4_1 / Q5_1's free block minimum.

The spec's grid ``s (c - z)`` has an integer ``z``, so its minimum ``-s z`` is a multiple of the step; a Q4_1 block
``d q + m`` has any ``m``. A weight that IS a Q4_1 grid (SmolLM2's are) is therefore out of the integer grid's
reach and held exactly by the float one; the GGUF export of a float width stays exact, the compressed-tensors
export refuses it, and every other path (save/load, freeze, GPTQ, packed, kernels) carries the float ``z``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import QuEPTConfig
from quept_hf.calibration.gptq import compensated_weight_codes
from quept_hf.nn.functional import fake_quantize_weight, quantize_weight_codes, weight_qparams
from quept_hf.packing.gguf import export_gguf
from quept_hf.packing.interop import export_compressed_tensors
from quept_hf.packing.kernels import kernel_support, prepare_kernel
from quept_hf.packing.working import dequantize_codes
from tests.test_gguf import fp16_error, gguf_name, per_element, quept_weights, tensors, unpermute
from tests.test_packing_export import elastic_model, ids, logits

pytestmark = pytest.mark.usefixtures("one_thread")

FULL = float("inf")  # sigmoid(inf) = 1: clipping logits of the whole min/max range


def q4_1_weight(rows: int = 6, groups: int = 4, bits: int = 4, seed: int = 0) -> torch.Tensor:
    """Rows of groups of 32 that ARE Q4_1-style blocks ``d q + m``: random ``d``, free ``m``, codes 0..2^b-1 with
    both ends present (so the group's min/max is the grid's)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, groups, 32), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 2**bits - 1
    d = 0.01 + 0.05 * torch.rand(rows, groups, 1, generator=gen)
    m = -d * (2**bits - 1) * torch.rand(rows, groups, 1, generator=gen)  # not a multiple of d
    return (d * codes + m).reshape(rows, groups * 32)


def full_logits(weight: torch.Tensor, group: int = 32) -> torch.Tensor:
    return torch.full((weight.shape[0], weight.shape[1] // group), FULL)


@pytest.mark.parametrize("bits", [4, 5])
def test_float_zero_holds_a_q_1_grid_the_integer_zero_cannot(bits):
    weight = q4_1_weight(bits=bits)
    logit = full_logits(weight)
    as_float = fake_quantize_weight(weight, bits, logit, logit, 32, float_zero=True)
    as_integer = fake_quantize_weight(weight, bits, logit, logit, 32)
    step = (weight.reshape(6, 4, 32).amax(-1) - weight.reshape(6, 4, 32).amin(-1)).max() / (2**bits - 1)
    assert (as_float - weight).abs().max() < 1e-5 * step * 2**bits
    assert (as_integer - weight).abs().max() > 0.1 * step  # an integer z shifts the grid off the weights


@pytest.mark.parametrize("float_zero", [False, True])
def test_codes_dequantize_to_the_fake_quantizer_bit_for_bit(float_zero):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 100, generator=gen)
    upper, lower = 1 + 3 * torch.rand(8, 4, generator=gen), 1 + 3 * torch.rand(8, 4, generator=gen)
    codes, scales, zeros = quantize_weight_codes(weight, 4, upper, lower, 32, float_zero)
    assert torch.equal(dequantize_codes(codes, scales, zeros, 32), fake_quantize_weight(weight, 4, upper, lower, 32,
                                                                                        float_zero))  # fmt: skip
    assert torch.equal(zeros, zeros.round()) is not float_zero  # float zeros really are fractional here
    if not float_zero:  # the integer grid is the spec's formula, spelled out
        scale, zero = weight_qparams(weight, 4, upper, lower, 32)
        padded = torch.cat([weight, weight[:, -1:].expand(8, 28)], 1).reshape(8, 4, 32)
        expected = torch.clamp(torch.round(padded / scale) + zero, 0, 15).reshape(8, -1)[:, :100]
        assert torch.equal(codes, expected.to(torch.uint8))


def test_float_zero_learns_through_the_lower_logit():
    """The minimum's clipping logit moves the grid's offset itself, not only its step."""
    weight = q4_1_weight()
    upper = full_logits(weight).clamp(max=4.0).requires_grad_()
    lower = full_logits(weight).clamp(max=4.0).requires_grad_()
    fake_quantize_weight(weight, 4, upper, lower, 32, float_zero=True).sum().backward()
    assert lower.grad.abs().sum() > 0 and upper.grad.abs().sum() > 0


def test_gptq_with_a_diagonal_hessian_is_plain_rounding_on_the_float_grid():
    """No input correlation, no error to spread: GPTQ's codes are the float-zero grid's plain rounding."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 64, generator=gen)
    upper, lower = 1 + 3 * torch.rand(8, 2, generator=gen), 1 + 3 * torch.rand(8, 2, generator=gen)
    hessian = torch.diag(0.5 + torch.rand(64, generator=gen))
    got = compensated_weight_codes(weight, hessian, 4, upper, lower, 32, True)
    expected = quantize_weight_codes(weight, 4, upper, lower, 32, True)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ config


def test_config_forms_and_round_trip():
    assert QuEPTConfig().zero_point == dict.fromkeys(range(2, 9), "integer")
    assert QuEPTConfig(zero_point="float").zero_point == dict.fromkeys(range(2, 9), "float")
    config = QuEPTConfig(zero_point={4: "float", "5": "float"})
    assert config.zero_point == {b: "float" if b in (4, 5) else "integer" for b in range(2, 9)}
    again = QuEPTConfig.from_dict(config.to_dict())
    assert again.zero_point == config.zero_point and again.to_dict()["zero_point"]["4"] == "float"


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("half", "each kind must be one of"), ({9: "float"}, "keys must be bit-widths"), (4, "expected one of"),
     ({4: True}, "each kind must be one of"), ({"x": "float"}, "keys must be bit-widths")],
)  # fmt: skip
def test_bad_zero_points_are_refused_by_name(value, allowed):
    with pytest.raises(ValueError, match=f"zero_point=.*{allowed}"):
        QuEPTConfig(zero_point=value).post_init()


# ------------------------------------------------------------------------------------------- a model


@pytest.fixture(scope="module")
def floating(tiny_llama_dir):
    """The tiny elastic model with float zero points at 4 and 5 bits (group 32 at 5 bits, channel at 4)."""
    return elastic_model(tiny_llama_dir, zero_point={4: "float", 5: "float"}, num_samples=4, seq_len=16)


def test_layers_carry_the_kind_per_width(floating):
    layer = next(m for m in floating.modules() if isinstance(m, quept_hf.QuEPTLinear))
    assert layer.float_zero == {b: b in (4, 5) for b in range(2, 9)}
    grids = quept_weights(floating, 4)
    assert any(not torch.equal(q.zeros, q.zeros.round()) for _, q in grids.values())
    assert all(torch.equal(q.zeros, q.zeros.round()) for _, q in quept_weights(floating, 3).values())


def test_save_and_reload_keep_the_float_grid(floating, tmp_path):
    floating.save_pretrained(tmp_path / "elastic")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "elastic").eval()
    assert again.config.quantization_config.zero_point == floating.config.quantization_config.zero_point
    data = ids(seed=3)
    for bits in (4, 5, 3):
        quept_hf.set_bits(floating, bits)
        quept_hf.set_bits(again, bits)
        with torch.no_grad():
            assert torch.equal(logits(again, data), logits(floating, data)), bits


@pytest.mark.parametrize("bits", [4, 5])
def test_gguf_q_1_holds_the_float_grid_within_fp16_of_d_and_m(floating, tmp_path, bits):
    stored = tensors(export_gguf(floating, bits, tmp_path / f"w{bits}.gguf"))
    for module, (weight, q) in quept_weights(floating, bits).items():
        x, qtype = stored[gguf_name(module)]
        assert qtype == {4: "Q4_1", 5: "Q5_1"}[bits]
        x = unpermute(module, x, floating.config)
        s, z = per_element(q, q.scales), per_element(q, q.zeros)
        bound = q.codes.float().numpy() * fp16_error(s) + fp16_error(-s * z) + 4 * np.spacing(np.abs(s * z) + 1)
        assert (np.abs(x - weight.numpy()) <= bound).all(), module


def test_frozen_and_packed_models_compute_the_elastic_model(floating, tmp_path):
    data = ids(seed=4)
    quept_hf.set_bits(floating, 4)
    with torch.no_grad():
        expected = logits(floating, data)
    frozen = quept_hf.freeze(floating, bits=[3, 4], plans=[])
    frozen.set_adapter("w4")
    packed_dir = quept_hf.export(floating, 4, tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(packed_dir).eval()
    with torch.no_grad():
        assert torch.allclose(logits(frozen, data), expected, atol=1e-5)
        assert torch.allclose(logits(packed, data), expected, atol=1e-5)


def test_compensated_freeze_keeps_float_zero_points(floating):
    compensated = quept_hf.freeze(floating, bits=[4], plans=[], error_compensation=ids(seed=5, batch=4, length=16))
    zeros = [m.zeros["4"] for m in compensated.modules() if hasattr(m, "zeros") and "4" in getattr(m, "zeros", {})]
    assert zeros and any(not torch.equal(z, z.round()) for z in zeros)


def test_integer_kernels_decline_float_zero_points():
    """The int4/int8 CPU kernels shift codes by an integer zero: a fractional one must take the dense path."""
    weight = q4_1_weight(rows=64, groups=4)
    logit = full_logits(weight)
    codes, scales, zeros = quantize_weight_codes(weight, 4, logit, logit, 32, float_zero=True)
    assert kernel_support(64, 128, 4, 32)[0] is not None  # the shape itself is supported
    assert prepare_kernel(codes, scales, zeros, 4, 32) is None
    assert prepare_kernel(codes, scales, zeros.round(), 4, 32) is not None


def test_compressed_tensors_refuses_a_float_width_by_name(floating, tmp_path):
    with pytest.raises(ValueError, match=r"W4 has float zero points.*zero_point.*format='gguf'"):
        export_compressed_tensors(floating, 4, tmp_path / "ct4")
    assert not (tmp_path / "ct4").exists()
    export_compressed_tensors(floating, 3, tmp_path / "ct3")  # an integer width of the same model still exports


def test_cli_zero_point_forms():
    from quept_hf.cli import CliError, parse_zero_point

    assert parse_zero_point("float") == "float"
    assert parse_zero_point("4:float,5:float") == {4: "float", 5: "float"}
    with pytest.raises(CliError, match="--zero-point 'four:float'"):
        parse_zero_point("four:float")


def test_model_card_and_hub_metadata_name_the_float_widths(floating):
    from quept_hf.hub import model_card

    card = model_card(floating, "me/tiny", lookup_hub=False)
    assert "Float zero points (GGUF Q4_1/Q5_1's free\n  minimum) at 4 bits, 5 bits" in card.text
    assert card.data.to_dict()["quept"]["zero_point"]["4"] == "float"

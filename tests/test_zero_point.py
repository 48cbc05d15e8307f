"""``QuEPTConfig(zero_point="float")``: a real-valued zero point, GGUF Q4_1 / Q5_1's free block minimum.

The spec's grid ``s (c - z)`` has an integer ``z``, so its minimum ``-s z`` is a multiple of the step; a Q4_1 block
``d q + m`` has any ``m``. A weight that IS a Q4_1 grid (SmolLM2's are) is therefore out of the integer grid's
reach and held exactly by the float one; the GGUF export of a float width stays exact, the compressed-tensors
export refuses it, and every other path (save/load, freeze, GPTQ, packed, kernels) carries the float ``z``.
"""

from __future__ import annotations

import os

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
from quept_hf.packing.plan import regridded
from quept_hf.packing.working import dequantize_codes
from tests.test_gguf import assert_engine_agrees, fp16_error, gguf_name, per_element, quept_weights, tensors, unpermute
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
    as_float = fake_quantize_weight(weight, bits, logit, logit, 32, "float")
    as_integer = fake_quantize_weight(weight, bits, logit, logit, 32)
    step = (weight.reshape(6, 4, 32).amax(-1) - weight.reshape(6, 4, 32).amin(-1)).max() / (2**bits - 1)
    assert (as_float - weight).abs().max() < 1e-5 * step * 2**bits
    assert (as_integer - weight).abs().max() > 0.1 * step  # an integer z shifts the grid off the weights


@pytest.mark.parametrize("kind", ["integer", "float", "symmetric"])
def test_codes_dequantize_to_the_fake_quantizer_bit_for_bit(kind):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 100, generator=gen)
    upper, lower = 1 + 3 * torch.rand(8, 4, generator=gen), 1 + 3 * torch.rand(8, 4, generator=gen)
    codes, scales, zeros = quantize_weight_codes(weight, 4, upper, lower, 32, kind)
    assert torch.equal(dequantize_codes(codes, scales, zeros, 32), fake_quantize_weight(weight, 4, upper, lower, 32,
                                                                                        kind))  # fmt: skip
    assert torch.equal(zeros, zeros.round()) is (kind != "float")  # float zeros really are fractional here
    if kind != "float":  # the integer grids are the spec's formula, spelled out
        scale, zero = weight_qparams(weight, 4, upper, lower, 32, kind)
        padded = torch.cat([weight, weight[:, -1:].expand(8, 28)], 1).reshape(8, 4, 32)
        expected = torch.clamp(torch.round(padded / scale) + zero, 0, 15).reshape(8, -1)[:, :100]
        assert torch.equal(codes, expected.to(torch.uint8))


def test_float_zero_learns_through_the_lower_logit():
    """The minimum's clipping logit moves the grid's offset itself, not only its step."""
    weight = q4_1_weight()
    upper = full_logits(weight).clamp(max=4.0).requires_grad_()
    lower = full_logits(weight).clamp(max=4.0).requires_grad_()
    fake_quantize_weight(weight, 4, upper, lower, 32, "float").sum().backward()
    assert lower.grad.abs().sum() > 0 and upper.grad.abs().sum() > 0


def test_gptq_with_a_diagonal_hessian_is_plain_rounding_on_the_float_grid():
    """No input correlation, no error to spread: GPTQ's codes are the float-zero grid's plain rounding."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 64, generator=gen)
    upper, lower = 1 + 3 * torch.rand(8, 2, generator=gen), 1 + 3 * torch.rand(8, 2, generator=gen)
    hessian = torch.diag(0.5 + torch.rand(64, generator=gen))
    got = compensated_weight_codes(weight, hessian, 4, upper, lower, 32, "float")
    expected = quantize_weight_codes(weight, 4, upper, lower, 32, "float")
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
    assert layer.zero_point == {b: "float" if b in (4, 5) else "integer" for b in range(2, 9)}
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
    codes, scales, zeros = quantize_weight_codes(weight, 4, logit, logit, 32, "float")
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


# ------------------------------------------------------------------- symmetric: llama.cpp's Q4_0 / Q5_0 / Q8_0


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_symmetric_grid_is_llama_cpps_block_with_the_larger_extreme_on_it(bits):
    """``s (c - z)`` with ``z`` 2^(b-1) (or 2^(b-1) - 1, mirrored): integers ``k`` of the type's range, and at full
    range each group's largest-magnitude weight reproduced exactly (llama.cpp's Q4_0 scale choice)."""
    gen = torch.Generator().manual_seed(bits)
    weight = torch.randn(16, 96, generator=gen)
    logit = full_logits(weight)
    codes, scales, zeros = quantize_weight_codes(weight, bits, logit, logit, 32, "symmetric")
    half = 2 ** (bits - 1)
    assert set(zeros.unique().tolist()) == {half - 1.0, float(half)}  # both sides occur in random groups
    grouped = weight.reshape(16, 3, 32)
    extreme = grouped.gather(-1, grouped.abs().argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(zeros == half - 1, extreme > 0)  # the mirrored grid is the one for a positive extreme
    assert torch.allclose(scales, extreme.abs() / half)
    dequant = fake_quantize_weight(weight, bits, logit, logit, 32, "symmetric").reshape(16, 3, 32)
    assert torch.allclose(dequant.gather(-1, grouped.abs().argmax(-1, keepdim=True))[..., 0], extreme)
    k = (codes.float().reshape(16, 3, 32) - zeros.unsqueeze(-1)) * torch.where(zeros == half, 1.0, -1.0).unsqueeze(-1)
    assert k.min() >= -half and k.max() <= half - 1  # d = s or -s: the type's own integers


@pytest.fixture(scope="module")
def symmetric(tiny_llama_dir):
    """The tiny elastic model calibrated with a symmetric W4 and W8 (per channel at 4, group 32 at 8)."""
    return elastic_model(
        tiny_llama_dir, zero_point={4: "symmetric", 8: "symmetric"}, group_size={**{b: 32 for b in range(2, 9)}, 4: -1},
        num_samples=4, seq_len=16,
    )  # fmt: skip


def assert_exact_symmetric_file(model, path, bits: int, qtype: str) -> None:
    """Every linear of the file is ``qtype`` and equals QuEPT's dequantized weight up to fp16 of ``d``."""
    stored = tensors(path)
    grids = quept_weights(model, bits) if not quept_hf.inspection.frozen_linears(model) else None
    for module, (x, found) in ((m, stored[gguf_name(m)]) for m in _linear_names(model)):
        assert found == qtype, module
        if grids is not None:
            weight, q = grids[module]
            bound = 2.0 ** (bits - 1) * fp16_error(per_element(q, q.scales)) + 1e-6
            assert (np.abs(unpermute(module, x, model.config) - weight.numpy()) <= bound).all(), module


def _linear_names(model) -> list[str]:
    found = quept_hf.inspection.frozen_linears(model) or quept_hf.inspection.quept_linears(model)
    return [name.replace(".base_layer", "") for name in found]


@pytest.mark.parametrize(("bits", "qtype"), [(4, "Q4_0"), (8, "Q8_0")])
def test_gguf_export_of_a_symmetric_width_is_its_exact_symmetric_type(symmetric, tmp_path, bits, qtype):
    path = export_gguf(symmetric, bits, tmp_path / f"w{bits}.gguf")
    assert_exact_symmetric_file(symmetric, path, bits, qtype)
    assert_engine_agrees(symmetric, bits, path, ids(seed=bits)[0].tolist())  # llama.cpp runs it (when installed)
    if bits == 4:  # Q4_0 is half a bit per weight below the Q4_1 an asymmetric W4 takes
        asymmetric = export_gguf(symmetric, 4, tmp_path / "w4-q4_1.gguf", weight_types={4: "Q4_1"})
        assert os.path.getsize(path) < os.path.getsize(asymmetric)


def test_freeze_regrids_a_width_and_leaves_the_model_as_it_was(floating, tmp_path):
    """``freeze(zero_point={4: "symmetric"})``: the float-zero W4's calibrated clipping on Q4_0's grid, exported
    exactly; the elastic model keeps its own grid; the streamed `save_frozen` writes the same tensors."""
    data = ids(seed=6)
    quept_hf.set_bits(floating, 4)
    with torch.no_grad():
        before = logits(floating, data)
    frozen = quept_hf.freeze(floating, bits=[4], plans=[], zero_point={4: "symmetric"})
    assert frozen.config.quantization_config.zero_point == {4: "symmetric"}
    assert next(m for m in floating.modules() if isinstance(m, quept_hf.QuEPTLinear)).zero_point[4] == "float"
    with torch.no_grad():
        assert torch.equal(logits(floating, data), before)  # the elastic model is untouched (cache included)
        regridded_logits = logits(frozen, data)
    assert not torch.allclose(regridded_logits, before, atol=1e-4)  # it IS another grid
    with torch.no_grad(), regridded(floating, {4: "symmetric"}):  # the elastic model on that grid: the same model
        assert torch.allclose(logits(floating, data), regridded_logits, atol=1e-5)
    for layer in quept_hf.inspection.frozen_linears(frozen).values():
        assert set(layer.zeros["4"].unique().tolist()) <= {7.0, 8.0}
    path = export_gguf(frozen, 4, tmp_path / "w4.gguf")
    assert {t for _, t in tensors(path).values() if t.startswith("Q")} <= {"Q4_0", "Q8_0"}
    assert_engine_agrees(frozen, 4, path, data[0].tolist())
    streamed = quept_hf.packing.stream.save_frozen(floating, tmp_path / "streamed", bits=[4], plans=[],
                                                   zero_point={4: "symmetric"})  # fmt: skip
    again = AutoModelForCausalLM.from_pretrained(streamed).eval()
    with torch.no_grad():
        assert torch.equal(logits(again, data), regridded_logits)


@pytest.mark.parametrize("zero_point", ["half", {9: "symmetric"}, {4: "round"}, 4])
def test_freeze_refuses_a_bad_zero_point_by_name(floating, zero_point):
    with pytest.raises(ValueError, match=r"freeze: zero_point=.*allowed.*symmetric"):
        quept_hf.freeze(floating, bits=[4], plans=[], zero_point=zero_point)


def test_model_card_names_the_symmetric_widths(symmetric):
    from quept_hf.hub import model_card

    card = model_card(symmetric, "me/tiny", lookup_hub=False)
    assert "Symmetric grids (GGUF\n  Q4_0/Q5_0/Q8_0's `d k`) at 4 bits, 8 bits." in card.text
    assert card.data.to_dict()["quept"]["zero_point"]["4"] == "symmetric"

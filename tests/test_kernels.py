"""Low-bit CPU kernels (`quept_hf.packing.kernels`) against the float64 reference ``x @ (s * (q - z)).T``.

Tolerance: max abs error / max abs reference < 2e-2. The kernels round the input, the scales, the zero terms and
the output to bf16 once each (unit roundoff 2^-9 ~ 0.2%), accumulating in fp32. Over these cases the worst seen
is 0.75% (int4; int8 0.4%), against 0.55% for plain bf16 ``F.linear`` on the bf16-rounded dequantized weight, so
the kernels cost about what bf16 itself costs; 2e-2 leaves room for another CPU's accumulation order. A wrong
offset, zero convention, nibble layout or group mapping gives errors of 10-100% (each was tried: the tests fail).
"""

from __future__ import annotations

import math

import pytest
import torch

from quept_hf.nn.functional import num_groups, quantize_weight_codes
from quept_hf.packing import kernels
from quept_hf.packing.kernels import MAX_TOKENS, kernel_support, prepare_kernel
from quept_hf.packing.linear import dequantize_codes

pytestmark = pytest.mark.skipif(not kernels._ops_available(), reason="torch lacks the int4/int8 CPU ops")

TOLERANCE = 2e-2
ALL_BITS = range(2, 9)
GROUP_SIZES = (-1, 32, 64, 128)
SHAPES = ((64, 256), (48, 192))  # (out, in); 192 in groups of 128: a partial last group of 64


def _random_layer(out_features: int, in_features: int, bits: int, group_size: int, seed: int = 0, spread: int = 3):
    """Codes, scales and integer zero points, ``spread`` levels beyond the code range on either side."""
    gen = torch.Generator().manual_seed(seed + 97 * bits + in_features)
    groups = num_groups(in_features, group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scales = torch.rand(out_features, groups, generator=gen) * 0.05 + 0.005
    zeros = torch.randint(-spread, 2**bits + spread, (out_features, groups), generator=gen).float()
    return codes, scales, zeros


def _reference(x: torch.Tensor, codes, scales, zeros, group_size: int) -> torch.Tensor:
    return x.double() @ dequantize_codes(codes, scales.double(), zeros.double(), group_size).T


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _expected_kernel(out_features: int, in_features: int, bits: int, group_size: int) -> str | None:
    """What the module docstring promises, written out independently of `kernel_support`."""
    if group_size == -1:
        if bits <= 4 and out_features % 16 == 0 and any(in_features % g == 0 for g in (32, 64, 128, 256)):
            return "int4pack"
        return "int8pack" if in_features % 16 == 0 else None
    if math.gcd(group_size, in_features) % 32 or out_features % 16:  # kernel groups of 32..256 tile every group
        return None
    return "int4pack" if bits <= 4 else "int4x2pack"


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_float64_reference(bits: int, group_size: int, shape: tuple[int, int]) -> None:
    codes, scales, zeros = _random_layer(*shape, bits, group_size)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)
    expected = _expected_kernel(*shape, bits, group_size)
    assert (kernel.name if kernel is not None else None) == expected
    if kernel is None:
        return
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(1))
    out = kernel(x)
    assert out.dtype == x.dtype and out.shape == (5, shape[0])
    assert _relative_error(out, _reference(x, codes, scales, zeros, group_size)) < TOLERANCE


@pytest.mark.parametrize("bits", (2, 4, 5, 8))
@pytest.mark.parametrize("group_size", (-1, 64))
def test_dense_prefill_path_matches_reference(bits: int, group_size: int) -> None:
    """Above ``max_tokens`` rows the kernel decodes its own layout to bf16: same weight, same tolerance."""
    codes, scales, zeros = _random_layer(64, 256, bits, group_size)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=2)
    x = torch.randn(2, 6, 256, generator=torch.Generator().manual_seed(2))
    out = kernel(x)
    assert out.shape == (2, 6, 64)
    ref = _reference(x.reshape(-1, 256), codes, scales, zeros, group_size).reshape(2, 6, 64)
    assert _relative_error(out, ref) < TOLERANCE
    low_bit = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)(x)
    assert _relative_error(out, low_bit.double()) < TOLERANCE


def test_default_max_tokens_is_the_measured_crossover() -> None:
    codes, scales, zeros = _random_layer(64, 256, 3, 64)
    kernel = prepare_kernel(codes, scales, zeros, 3, 64)
    assert kernel.max_tokens == MAX_TOKENS["int4pack"]
    assert kernels._int4_layout() is not None  # the packed layout was recognised (else no dense path)


@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, -1), (6, -1), (8, -1), (7, 64)])
def test_three_d_input_and_output_dtype(bits: int, group_size: int) -> None:
    codes, scales, zeros = _random_layer(48, 192, bits, group_size)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)
    x = torch.randn(3, 4, 192, generator=torch.Generator().manual_seed(3))
    ref = _reference(x.reshape(-1, 192), codes, scales, zeros, group_size).reshape(3, 4, 48)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        out = kernel(x.to(dtype))
        assert out.dtype == dtype and out.shape == (3, 4, 48)
        assert _relative_error(out, ref) < TOLERANCE


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", (-1, 64))
def test_zeros_far_outside_the_code_range(bits: int, group_size: int) -> None:
    """One-signed groups put z outside [0, 2^b - 1] (QuEPT's round(-xmin / s)); 8-bit int8 needs its rank-1 term."""
    codes, scales, zeros = _random_layer(64, 256, bits, group_size, spread=40)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    assert _relative_error(kernel(x), _reference(x, codes, scales, zeros, group_size)) < TOLERANCE
    if kernel.name == "int8pack":
        assert (kernel.correction is not None) == (
            bits == 8 or bool((zeros > 128).any() or (zeros < 2**bits - 128).any())
        )


def test_int8_below_8_bits_needs_no_correction() -> None:
    codes, scales, zeros = _random_layer(64, 256, 6, -1)
    assert prepare_kernel(codes, scales, zeros, 6, -1).correction is None


@pytest.mark.parametrize(
    "shape,bits,group_size,reason",
    [
        ((64, 100), 4, 64, "multiple of 32"),  # last group of 36
        ((64, 200), 6, 64, "multiple of 32"),  # last group of 8
        ((64, 256), 3, 16, "multiple of 32"),
        ((40, 256), 4, 64, "multiple of 16"),
        ((64, 256), 9, -1, "outside"),
        ((64, 100), 3, -1, "multiple of 16"),  # per-channel: int4 has no group dividing 100, int8 needs K % 16
        ((64, 200), 6, -1, "multiple of 16"),
    ],
)
def test_none_exactly_where_documented(shape, bits: int, group_size: int, reason: str) -> None:
    name, why = kernel_support(*shape, bits, group_size)
    assert name is None and reason in why
    if 2 <= bits <= 8:
        codes, scales, zeros = _random_layer(*shape, bits, group_size)
        assert prepare_kernel(codes, scales, zeros, bits, group_size) is None


def test_per_channel_shapes_int4_rejects_fall_to_int8() -> None:
    """Per-channel 2..4 bits with out % 16 != 0 or no int4 group dividing ``in``: int8 serves them (in % 16 == 0)."""
    for shape in ((40, 256), (64, 48)):
        codes, scales, zeros = _random_layer(*shape, 3, -1)
        kernel = prepare_kernel(codes, scales, zeros, 3, -1)
        assert kernel.name == "int8pack"
        x = torch.randn(2, shape[1], generator=torch.Generator().manual_seed(5))
        assert _relative_error(kernel(x), _reference(x, codes, scales, zeros, -1)) < TOLERANCE


def test_no_kernel_off_cpu_and_a_clear_shape_error() -> None:
    assert kernel_support(64, 256, 4, 64, device="meta")[0] is None
    codes, scales, zeros = _random_layer(64, 256, 4, 64)
    with pytest.raises(ValueError, match="expected"):
        prepare_kernel(codes, scales[:, :2], zeros[:, :2], 4, 64)
    with pytest.raises(ValueError, match="features"):
        prepare_kernel(codes, scales, zeros, 4, 64)(torch.randn(2, 128))


def test_nbytes_counts_the_low_bit_weight() -> None:
    codes, scales, zeros = _random_layer(64, 256, 4, 64)
    int4 = prepare_kernel(codes, scales, zeros, 4, 64)
    assert int4.nbytes() == 64 * 256 // 2 + (256 // 64) * 64 * 2 * 2  # nibbles + bf16 (scale, zero) per group
    codes, scales, zeros = _random_layer(64, 256, 6, -1)
    assert prepare_kernel(codes, scales, zeros, 6, -1).nbytes() == 64 * 256 + 64 * 2  # int8 + bf16 scales


def test_empty_input() -> None:
    codes, scales, zeros = _random_layer(64, 256, 4, 64)
    out = prepare_kernel(codes, scales, zeros, 4, 64)(torch.randn(0, 256))
    assert out.shape == (0, 64)


@pytest.mark.parametrize("bits,group_size", [(6, -1), (8, -1), (4, 64), (6, 64)])
def test_unaligned_bf16_input_view(bits: int, group_size: int) -> None:
    """A bf16 input that is an offset view (not 64-byte aligned) must not reach the op's aligned loads."""
    codes, scales, zeros = _random_layer(64, 256, bits, group_size)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)
    flat = torch.randn(3 * 256 + 1, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    x = flat[1 : 1 + 3 * 256].view(3, 256)
    assert x.data_ptr() % 64
    assert _relative_error(kernel(x), _reference(x, codes, scales, zeros, group_size)) < TOLERANCE


@pytest.mark.parametrize("bits", (3, 6))
def test_partial_last_group_of_smollm2_shape(bits: int) -> None:
    """QuEPT's default group 128 on SmolLM2's 576 columns leaves a last group of 64: kernel groups of 64."""
    codes, scales, zeros = _random_layer(64, 576, bits, 128)
    assert scales.shape[1] == 5
    kernel = prepare_kernel(codes, scales, zeros, bits, 128, max_tokens=None)
    assert kernel.group == 64
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(7))
    assert _relative_error(kernel(x), _reference(x, codes, scales, zeros, 128)) < TOLERANCE


@pytest.mark.parametrize("shape", [(64, 64), (192, 96), (48, 64), (80, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_own_int4_packing_equals_the_op(shape: tuple[int, int]) -> None:
    """The uint8 packer (whole blocks) and the unpacker must reproduce the op's CPU layout byte for byte."""
    codes = torch.randint(0, 16, shape, generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    packed = kernels._pack_int4(codes)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2))
    assert torch.equal(kernels._unpack_int4(packed, kernels._int4_layout()), codes)


@pytest.mark.parametrize("bits,group_size", [(2, 128), (3, 64), (4, -1), (5, 64), (8, -1), (8, 128)])
def test_quantizer_output_of_a_weight_with_one_signed_rows(bits: int, group_size: int) -> None:
    """Codes from the real quantizer: rows shifted to one sign put zero points outside the code range; the kernel
    must match the fake-quant weight it stands for (`dequantize_codes` of the same codes)."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(64, 576, generator=gen) * 0.02
    weight[:8] += 0.15  # all-positive rows: z < 0
    weight[8:16] -= 0.15  # all-negative rows: z > 2^b - 1
    logits = torch.full((64, num_groups(576, group_size)), 4.0)
    codes, scales, zeros = quantize_weight_codes(weight, bits, logits, logits, group_size)
    assert float(zeros.min()) < 0 and float(zeros.max()) > 2**bits - 1
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)
    x = torch.randn(3, 576, generator=gen)
    assert _relative_error(kernel(x), _reference(x, codes, scales, zeros, group_size)) < TOLERANCE


@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, -1), (6, -1), (8, -1), (7, 128)])
def test_dense_path_in_row_slabs(bits: int, group_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense path decodes slabs of 64 rows here (208 = 3 whole int4 blocks + a 16-row tail): same result."""
    monkeypatch.setattr(kernels, "_DENSE_SLAB", 64 * 256)
    codes, scales, zeros = _random_layer(208, 256, bits, group_size)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=1)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(10))
    ref = _reference(x, codes, scales, zeros, group_size)
    assert _relative_error(kernel(x), ref) < TOLERANCE
    assert _relative_error(kernel.dense_weight(64, 208).double() @ x.double().T, ref[:, 64:].T) < TOLERANCE


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, -1), (6, 64)])
def test_wider_integer_codes_and_half_precision_qparams(bits: int, group_size: int) -> None:
    """int64 codes (e.g. straight from a quantizer) and bf16 scales / zeros (a bf16 model) give the same kernel."""
    codes, scales, zeros = _random_layer(64, 256, bits, group_size)
    scales, zeros = scales.to(torch.bfloat16), zeros.to(torch.bfloat16)
    kernel = prepare_kernel(codes.long(), scales, zeros, bits, group_size, max_tokens=None)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(11), dtype=torch.bfloat16)
    out = kernel(x)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, _reference(x, codes, scales.float(), zeros.float(), group_size)) < TOLERANCE

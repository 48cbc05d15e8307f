"""Numerics of quept_hf.nn.functional against a plain reference written with Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from quept_hf.nn.functional import (
    CLIP_INIT,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight_codes,
    round_ste,
)

BITS = range(2, 9)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def groups_of(in_features: int, group_size: int) -> list[range]:
    """Column ranges of each group (the last one is shorter when group_size does not divide in_features)."""
    if group_size == -1 or group_size >= in_features:
        return [range(in_features)]
    return [range(s, min(s + group_size, in_features)) for s in range(0, in_features, group_size)]


def reference_weight(weight, bits, upper, lower, group_size):
    """Spec section 1, one (row, group) at a time over the REAL columns only.

    Returns (dequantized weight, codes, scales, zeros) as nested Python lists / tensors.
    """
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    codes = torch.empty(rows, cols, dtype=torch.int64)
    scales, zeros = [], []
    qmax = 2**bits - 1
    for r in range(rows):
        row_scales, row_zeros = [], []
        for g, cols_g in enumerate(groups_of(cols, group_size)):
            values = [float(weight[r, c]) for c in cols_g]
            xmax = sigmoid(float(upper[r, g])) * max(values)
            xmin = sigmoid(float(lower[r, g])) * min(values)
            s = max((xmax - xmin) / qmax, 1e-8)
            z = round(-xmin / s)
            row_scales.append(s)
            row_zeros.append(z)
            for c in cols_g:
                q = min(max(round(float(weight[r, c]) / s) + z, 0), qmax)
                codes[r, c] = q
                out[r, c] = s * (q - z)
        scales.append(row_scales)
        zeros.append(row_zeros)
    return out, codes, torch.tensor(scales, dtype=torch.float64), torch.tensor(zeros, dtype=torch.float64)


def clip_logits(rows: int, n_groups: int, value: float = CLIP_INIT, dtype=torch.float64):
    return torch.full((rows, n_groups), value, dtype=dtype), torch.full((rows, n_groups), value, dtype=dtype)


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64)


def assert_close_to_reference(got, ref, scales):
    """Equal up to float64 noise; a value rounding the other way at an exact .5 tie moves by one step."""
    diff = (got.double() - ref).abs()
    assert float(diff.max()) <= float(scales.max()) * (1 + 1e-9)
    assert float((diff > 1e-9).double().mean()) < 0.01


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 16])
def test_fake_quantize_weight_matches_reference(bits, group_size):
    weight = random_weight(6, 48, seed=bits)
    n_groups = len(groups_of(48, group_size))
    gen = torch.Generator().manual_seed(100 + bits)
    upper = 2.0 + 3.0 * torch.rand(6, n_groups, generator=gen, dtype=torch.float64)
    lower = 2.0 + 3.0 * torch.rand(6, n_groups, generator=gen, dtype=torch.float64)

    got = fake_quantize_weight(weight, bits, upper, lower, group_size)
    ref, ref_codes, ref_scales, ref_zeros = reference_weight(weight, bits, upper, lower, group_size)

    assert got.shape == weight.shape
    assert_close_to_reference(got, ref, ref_scales)
    codes, scales, zeros = quantize_weight_codes(weight, bits, upper, lower, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-12, atol=0)
    torch.testing.assert_close(zeros.double(), ref_zeros, rtol=0, atol=0)
    assert float((codes.long() != ref_codes).double().mean()) < 0.01
    # Codes and fake-quantized values agree: dequantizing the codes gives the fake-quantized weight.
    expanded = [g for g, cols in enumerate(groups_of(48, group_size)) for _ in cols]
    dequant = scales[:, expanded] * (codes.double() - zeros[:, expanded])
    torch.testing.assert_close(dequant, got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_uses_at_most_2_pow_bits_levels(bits):
    weight = random_weight(4, 256, seed=1)
    upper, lower = clip_logits(4, 1)
    got = fake_quantize_weight(weight, bits, upper, lower, -1)
    for row in got:
        assert len(torch.unique(row)) <= 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_padded_last_group_uses_real_columns_only(bits):
    """in_features=40, group_size=16: groups of 16, 16 and 8 real columns; the padding must not move
    the last group's scale or zero point."""
    weight = random_weight(5, 40, seed=7)
    # Make the last group's extremes lie strictly inside (not at) its last column, so padding with
    # anything but a real value of the group would change min/max.
    weight[:, -1] = 0.0
    upper, lower = clip_logits(5, 3)
    _, scales, zeros = quantize_weight_codes(weight, bits, upper, lower, 16)
    ref, _, ref_scales, ref_zeros = reference_weight(weight, bits, upper, lower, 16)
    assert scales.shape == (5, 3)
    torch.testing.assert_close(scales[:, 2].double(), ref_scales[:, 2], rtol=1e-12, atol=0)
    torch.testing.assert_close(zeros[:, 2].double(), ref_zeros[:, 2], rtol=0, atol=0)
    # The last group's scale is set by its own 8 columns, not by the whole row.
    last = weight[:, 32:]
    expected = (sigmoid(CLIP_INIT) * (last.amax(1) - last.amin(1))) / (2**bits - 1)
    torch.testing.assert_close(scales[:, 2].double(), expected, rtol=1e-12, atol=0)
    got = fake_quantize_weight(weight, bits, upper, lower, 16)
    assert got.shape == (5, 40)
    assert_close_to_reference(got, ref, ref_scales)


def test_group_size_at_least_in_features_is_per_channel():
    weight = random_weight(3, 32, seed=2)
    upper, lower = clip_logits(3, 1)
    per_channel = fake_quantize_weight(weight, 3, upper, lower, -1)
    torch.testing.assert_close(fake_quantize_weight(weight, 3, upper, lower, 32), per_channel, rtol=0, atol=0)
    torch.testing.assert_close(fake_quantize_weight(weight, 3, upper, lower, 64), per_channel, rtol=0, atol=0)


def test_groups_beat_per_channel_at_low_bits():
    weight = random_weight(16, 256, seed=3)
    err = {}
    for group_size in (-1, 32):
        n_groups = len(groups_of(256, group_size))
        upper, lower = clip_logits(16, n_groups)
        err[group_size] = float((fake_quantize_weight(weight, 2, upper, lower, group_size) - weight).abs().mean())
    assert err[32] < err[-1]


def test_group_scales_differ_per_group():
    """Per-group quantization gives each group its own range: scaling one group changes only its scale."""
    weight = random_weight(2, 32, seed=4)
    weight[:, 16:] *= 10.0
    upper, lower = clip_logits(2, 2)
    _, scales, _ = quantize_weight_codes(weight, 4, upper, lower, 16)
    ratio = scales[:, 1] / scales[:, 0]
    assert bool((ratio > 3).all())
    _, scales_pc, _ = quantize_weight_codes(weight, 4, upper[:, :1], lower[:, :1], -1)
    torch.testing.assert_close(scales_pc[:, 0], torch.maximum(scales[:, 0], scales[:, 1]), rtol=0.5, atol=0)


@pytest.mark.parametrize("logit", [0.0, 1.0, 2.0])
def test_clipping_shrinks_range_and_clamps(logit):
    bits = 4
    weight = random_weight(4, 64, seed=5)
    upper, lower = clip_logits(4, 1, value=logit)
    got = fake_quantize_weight(weight, bits, upper, lower, -1)
    ref, _, scales, _ = reference_weight(weight, bits, upper, lower, -1)
    assert_close_to_reference(got, ref, scales)
    # The representable range is about [sigmoid(l)*min, sigmoid(u)*max]: values beyond it are clamped.
    hi = sigmoid(logit) * weight.amax(1, keepdim=True) + scales / 2 + 1e-12
    lo = sigmoid(logit) * weight.amin(1, keepdim=True) - scales / 2 - 1e-12
    assert bool((got <= hi).all()) and bool((got >= lo).all())
    outside = (weight > hi) | (weight < lo)
    assert bool(outside.any())
    assert float(got.abs().max()) < float(weight.abs().max()) * (sigmoid(logit) + 0.1)
    full = fake_quantize_weight(weight, bits, *clip_logits(4, 1, value=CLIP_INIT), -1)
    assert float(got.abs().max()) < float(full.abs().max())


def test_round_ste_forward_and_gradient():
    x = torch.tensor([-1.6, -0.4, 0.2, 0.5, 1.5, 2.7], requires_grad=True)
    y = round_ste(x)
    torch.testing.assert_close(y, torch.round(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("logit", [CLIP_INIT, 1.0])
def test_weight_gradient_is_straight_through_inside_the_range(logit):
    """d sum(Q(W)) / dW = 1 where W/s + z lies strictly inside [0, 2^b-1] (STE), minus the min/max path.

    The scale depends on the row's max/min, so their entries also get the scale's gradient; every other
    entry inside the clipping range gets exactly 1 and every clamped entry exactly 0.
    """
    bits = 3
    weight = random_weight(4, 32, seed=6).requires_grad_(True)
    upper, lower = clip_logits(4, 1, value=logit)
    fake_quantize_weight(weight, bits, upper, lower, -1).sum().backward()
    grad = weight.grad

    scale = ((sigmoid(logit) * weight.amax(1, keepdim=True)) - sigmoid(logit) * weight.amin(1, keepdim=True)) / (
        2**bits - 1
    )
    zero = torch.round(-sigmoid(logit) * weight.amin(1, keepdim=True) / scale)
    level = torch.round(weight / scale) + zero
    inside = ((level > 0) & (level < 2**bits - 1)).detach()
    clamped = ((level < 0) | (level > 2**bits - 1)).detach()
    extremes = (weight == weight.amax(1, keepdim=True)) | (weight == weight.amin(1, keepdim=True))
    assert bool(inside.any()) and (logit == CLIP_INIT or bool(clamped.any()))
    torch.testing.assert_close(grad[inside & ~extremes], torch.ones_like(grad[inside & ~extremes]))
    torch.testing.assert_close(grad[clamped & ~extremes], torch.zeros_like(grad[clamped & ~extremes]))


def test_gradients_reach_clipping_logits():
    weight = random_weight(8, 64, seed=8)
    upper = torch.full((8, 4), 2.0, dtype=torch.float64, requires_grad=True)
    lower = torch.full((8, 4), 2.0, dtype=torch.float64, requires_grad=True)
    target = weight.clone()
    loss = (fake_quantize_weight(weight, 3, upper, lower, 16) - target).pow(2).sum()
    loss.backward()
    for grad in (upper.grad, lower.grad):
        assert grad is not None and grad.shape == (8, 4)
        assert bool(torch.isfinite(grad).all())
        assert float(grad.abs().sum()) > 0
    # A plain sum also reaches both logits (through the scale, the zero point and the clamp).
    upper.grad = lower.grad = None
    fake_quantize_weight(weight, 3, upper, lower, 16).sum().backward()
    assert bool(torch.isfinite(upper.grad).all()) and float(upper.grad.abs().sum()) > 0
    assert bool(torch.isfinite(lower.grad).all()) and float(lower.grad.abs().sum()) > 0


def test_float32_and_float64_agree():
    weight = random_weight(4, 64, seed=9)
    upper, lower = clip_logits(4, 4)
    q64 = fake_quantize_weight(weight, 4, upper, lower, 16)
    q32 = fake_quantize_weight(weight.float(), 4, upper.float(), lower.float(), 16)
    _, _, scales, _ = reference_weight(weight, 4, upper, lower, 16)
    assert float((q32.double() - q64).abs().max()) <= float(scales.max()) * (1 + 1e-6)


# ------------------------------------------------------------------------------------------- activations


def reference_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric absmax: one scale per row of the flattened (tokens, hidden) input."""
    qmax = 2 ** (bits - 1) - 1
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat, dtype=torch.float64)
    for t in range(flat.shape[0]):
        absmax = max(max(abs(float(v)) for v in flat[t]), 1e-5)
        s = absmax / qmax
        for h in range(flat.shape[1]):
            out[t, h] = min(max(round(float(flat[t, h]) / s), -qmax - 1), qmax) * s
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_activation_matches_reference(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 5, 24, generator=gen, dtype=torch.float64)
    x[0, 1] *= 50.0  # an outlier token keeps its own scale
    got = fake_quantize_activation(x, bits)
    ref = reference_activation(x, bits)
    qmax = 2 ** (bits - 1) - 1
    step = x.abs().amax(-1, keepdim=True) / qmax
    diff = (got - ref).abs()
    assert bool((diff <= step * (1 + 1e-9)).all())
    assert float((diff > 1e-9).double().mean()) < 0.01
    # Symmetric: the largest magnitude of each token is represented exactly, levels lie on a grid of
    # at most 2^(b-1) - 1 steps either side of zero.
    torch.testing.assert_close(got.abs().amax(-1), x.abs().amax(-1))
    levels = got / step
    torch.testing.assert_close(levels, torch.round(levels))
    assert float(levels.abs().max()) <= qmax + 1e-9
    torch.testing.assert_close(fake_quantize_activation(-x, bits), -got)


def test_activation_quantization_is_per_token():
    x = torch.randn(3, 16, dtype=torch.float64)
    got = fake_quantize_activation(x, 4)
    x2 = x.clone()
    x2[0] *= 100.0
    got2 = fake_quantize_activation(x2, 4)
    torch.testing.assert_close(got2[1:], got[1:], rtol=0, atol=0)
    torch.testing.assert_close(got2[0], got[0] * 100.0)


def test_activation_all_zero_token_is_finite():
    x = torch.zeros(2, 8)
    assert bool(torch.isfinite(fake_quantize_activation(x, 4)).all())
    assert float(fake_quantize_activation(x, 4).abs().max()) == 0.0


def test_activation_gradient_is_straight_through():
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    fake_quantize_activation(x, 4).sum().backward()
    # The scale is computed from a detached absmax and nothing is clamped (absmax maps to qmax): d/dx = 1.
    torch.testing.assert_close(x.grad, torch.ones_like(x))

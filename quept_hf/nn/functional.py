"""Fake-quantization math of QuEPT (spec section 1), as small differentiable tensor ops.

Rounding uses a straight-through estimator (STE): the forward pass rounds, the backward pass lets the
gradient through unchanged, so clipping logits and weight deltas can be learned through quantization.
"""

from __future__ import annotations

import torch

CLIP_INIT = 4.0  # sigmoid(4) ~= 0.982: start from (almost) the full min/max range.
_EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def num_groups(in_features: int, group_size: int) -> int:
    """Number of quantization groups per row (``group_size=-1``: one group, per output channel)."""
    if group_size == -1 or group_size >= in_features:
        return 1
    return -(-in_features // group_size)


def group_width(in_features: int, group_size: int) -> int:
    """Input columns per quantization group: column ``j`` lies in group ``j // group_width`` (one place for it)."""
    return in_features if num_groups(in_features, group_size) == 1 else group_size


def _group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, size). The last group is padded by repeating the last column,
    which leaves that group's min/max (and thus its scale) unchanged."""
    out_features, in_features = weight.shape
    groups, size = num_groups(in_features, group_size), group_width(in_features, group_size)
    pad = groups * size - in_features
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(out_features, pad)], dim=1)
    return weight.reshape(out_features, groups, size)


def weight_qparams(
    weight: torch.Tensor,
    bits: int,
    upper_logit: torch.Tensor,
    lower_logit: torch.Tensor,
    group_size: int,
    zero_point: str = "integer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each (row, group), shape (out, groups, 1), for the grid ``s (c - z)``.

    ``zero_point`` (`QuEPTConfig.zero_point`'s kinds) says what ``z`` may be:

    * ``"integer"``: ``-xmin / s`` STE-rounded to an integer (the spec's grid, which integer kernels and
      compressed-tensors store);
    * ``"float"``: ``-xmin / s`` as it is, so the grid's minimum is exactly the clipped ``xmin``: GGUF's ``Q4_1``
      / ``Q5_1`` block ``d * q + m`` with a free ``m``;
    * ``"symmetric"``: ``2^(b-1)``, or ``2^(b-1) - 1`` where the clipped maximum is the larger side, with
      ``s = max(xmax, -xmin) / 2^(b-1)``: the levels ``s * k``, ``k`` in ``[-2^(b-1), 2^(b-1) - 1]`` (or mirrored),
      with the group's larger extreme ON the grid. That is GGUF's ``Q4_0`` / ``Q5_0`` / ``Q8_0`` block ``d * k``
      (``d = -s`` for the mirrored one), as llama.cpp's own quantizer picks it; no zero point to store or add.
    """
    grouped = _group_view(weight, group_size)
    xmax = torch.sigmoid(upper_logit).unsqueeze(-1) * grouped.amax(dim=-1, keepdim=True)
    xmin = torch.sigmoid(lower_logit).unsqueeze(-1) * grouped.amin(dim=-1, keepdim=True)
    if zero_point == "symmetric":
        half = 2 ** (bits - 1)
        upper_wins = xmax > -xmin
        scale = (torch.where(upper_wins, xmax, -xmin) / half).clamp(min=_EPS)
        return scale, torch.where(upper_wins, half - 1.0, float(half)).detach()
    scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=_EPS)
    zero = -xmin / scale if zero_point == "float" else round_ste(-xmin / scale)
    return scale, zero


def grid_codes(
    scaled: torch.Tensor, zero: torch.Tensor, bits: int, float_zero: bool = False, rounding=torch.round
) -> torch.Tensor:
    """``clamp(round(W / s + z), 0, 2^b - 1)`` from ``scaled = W / s``, as float: spelled ``round(W / s) + z`` for
    an integer ``z`` (the spec's form, bit for bit), ``round(W / s + z)`` for a ``float_zero`` one."""
    shifted = rounding(scaled + zero) if float_zero else rounding(scaled) + zero
    return torch.clamp(shifted, 0, 2**bits - 1)


def quantize_weight_codes(
    weight: torch.Tensor,
    bits: int,
    upper_logit: torch.Tensor,
    lower_logit: torch.Tensor,
    group_size: int,
    zero_point: str = "integer",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes in [0, 2^bits - 1] (out, in), with the scale and zero point (out, groups)."""
    scale, zero = weight_qparams(weight, bits, upper_logit, lower_logit, group_size, zero_point)
    grouped = _group_view(weight, group_size)
    codes = grid_codes(grouped / scale, zero, bits, zero_point == "float")
    codes = codes.reshape(weight.shape[0], -1)[:, : weight.shape[1]]
    return codes.to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1)


def fake_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    upper_logit: torch.Tensor,
    lower_logit: torch.Tensor,
    group_size: int,
    zero_point: str = "integer",
) -> torch.Tensor:
    """Q_b(W) = s * (clamp(round(W/s) + z, 0, 2^b - 1) - z) with learnable clipping (spec section 1);
    ``zero_point``: the grid's kind (`weight_qparams`; a real-valued ``z`` is rounded together with ``W/s``)."""
    scale, zero = weight_qparams(weight, bits, upper_logit, lower_logit, group_size, zero_point)
    grouped = _group_view(weight, group_size)
    codes = grid_codes(grouped / scale, zero, bits, zero_point == "float", round_ste)
    dequant = scale * (codes - zero)
    return dequant.reshape(weight.shape[0], -1)[:, : weight.shape[1]]


def fake_quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic per-token symmetric absmax quantization of the last dimension (spec section 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / qmax
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


def fake_quantize_activation_per_tensor(x: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric quantization with a learnable scale (ViT activations, spec section 1)."""
    qmax = 2 ** (bits - 1) - 1
    scale = scale.abs().clamp(min=_EPS)
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale


def fake_quantize_activation_static(x: torch.Tensor, bits: int, log_scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor quantization with a learnable LOG step size; NaN (not calibrated yet) means dynamic absmax.

    The log parameterisation makes one AdamW learning rate mean the same relative step for tiny and large
    scales; the NaN fallback keeps an uncalibrated model usable (round-to-nearest) without a data pass.
    """
    qmax = 2 ** (bits - 1) - 1
    dynamic = x.detach().abs().amax().clamp(min=1e-5) / qmax
    scale = torch.where(torch.isnan(log_scale), dynamic, log_scale.exp())
    return fake_quantize_activation_per_tensor(x, bits, scale)


@torch.no_grad()
def search_activation_scale(x: torch.Tensor, bits: int, grid: int = 20) -> torch.Tensor:
    """Per-tensor step size minimising the quantization MSE of ``x`` over clipping ratios 1.0 .. 0.2 of absmax.

    Plain absmax wastes most levels on the rare outliers of post-GELU activations at 4-5 bits; this is the usual
    MSE initialisation (RepQ-ViT, PTQ4ViT) before the scale is learned. (Measuring the error on the layer's
    output, or greedily on the block's output, was tried on DINOv2-small and clipped its massive post-GELU
    activations harder: 7-bit CLS features fell from 0.957 to 0.938 / 0.89 cosine similarity.)
    """
    qmax = 2 ** (bits - 1) - 1
    x = x.float()
    absmax = x.abs().amax().clamp(min=1e-5)
    best, best_err = absmax / qmax, float("inf")
    for ratio in torch.linspace(1.0, 0.2, grid).tolist():
        scale = absmax * ratio / qmax
        err = (torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale - x).pow(2).mean().item()
        if err < best_err:
            best, best_err = scale, err
    return best


def fake_quantize_per_sample(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric absmax quantization with one scale per sample (dim 0): batch-independent outputs."""
    qmax = 2 ** (bits - 1) - 1
    dims = tuple(range(1, x.dim())) or (0,)
    scale = x.detach().abs().amax(dim=dims, keepdim=True).clamp(min=1e-5) / qmax
    return torch.clamp(round_ste(x / scale), -qmax - 1, qmax) * scale

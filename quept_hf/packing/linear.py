"""`PackedLinear`: a linear layer frozen at one bit-width, holding densely packed integer codes.

Storage per layer (all of it loaded from the checkpoint, nothing float of the weight's shape):

* ``qweight``: uint8 ``(out, ceil(in * bits / 8))`` — the codes of ``quantize_weight_codes``, packed row by row
  with `quept_hf.packing.codec.pack` (every width 2..8, rows independent so sharding by row needs no repacking);
* ``scales``, ``zeros``: ``(out, groups)`` in the model's float dtype. Zero points are kept as float because the
  QuEPT quantizer's zero point ``round(-xmin / s)`` is an integer that may leave ``[0, 2^b - 1]`` for a group whose
  weights all share one sign; float storage represents it exactly, and per-channel or group-128 rows make the
  overhead small (two floats per group);
* ``bias`` (optional, float).

The forward pass unpacks, dequantizes ``W = s * (q - z)`` with the arithmetic of
`quept_hf.nn.functional.fake_quantize_weight` (a bitwise-identical weight) and runs ``F.linear``, so a packed
model reproduces the fake-quant model's logits. Nothing large is kept by default (weight form ``"none"``), so the
resident size stays the packed size; the transient float weight of ONE layer exists during its matmul.
`quept_hf.set_weight_form` picks another working form (`quept_hf.packing.working`): ``"kernel"`` runs low-bit
CPU kernels on a 4- or 8-bit copy of the codes (faster than float for decoding, near the packed size),
``"dequantized"`` keeps the float weight (float-model speed and memory).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.functional import fake_quantize_activation, fake_quantize_activation_static, num_groups
from .codec import MAX_BITS, MIN_BITS, pack, packed_cols, unpack
from .working import WEIGHT_FORMS, WorkingWeight, dequantize_codes, versions

__all__ = ["PackedLinear", "dequantize_codes", "set_weight_cache"]


class PackedLinear(nn.Module):
    """Inference linear layer at one weight bit-width (2..8) with packed storage (see the module docstring).

    Args:
        bits: weight bit-width.
        group_size: input columns per quantization group, ``-1`` for one group per output row.
        activation_bits: weight+activation mode: symmetric quantization of the input at this width (the QuEPT
            activation quantizer); ``None`` for weight-only.
        activation_granularity: ``"per_token"`` (dynamic absmax, LLMs) or ``"per_tensor"`` (ViTs: the calibrated
            log step size ``act_log_step``, loaded from the checkpoint; NaN means dynamic absmax).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int,
        group_size: int,
        activation_bits: int | None = None,
        activation_granularity: str = "per_token",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"PackedLinear supports bits {MIN_BITS}..{MAX_BITS}, got {bits!r}")
        if activation_bits is not None and not MIN_BITS <= activation_bits <= MAX_BITS:
            raise ValueError(f"activation_bits must be None or in {MIN_BITS}..{MAX_BITS}, got {activation_bits!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.activation_bits = bits, int(group_size), activation_bits
        groups = num_groups(in_features, self.group_size)
        dtype = dtype or torch.get_default_dtype()
        packed_shape = (out_features, packed_cols(in_features, bits))
        self.qweight = nn.Parameter(torch.empty(packed_shape, dtype=torch.uint8, device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(out_features, groups, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        if activation_granularity not in ("per_token", "per_tensor"):
            raise ValueError(f"activation_granularity={activation_granularity!r}: 'per_token' or 'per_tensor'")
        self.activation_granularity = activation_granularity
        self.act_log_step = None
        if activation_bits is not None and activation_granularity == "per_tensor":
            self.act_log_step = nn.Parameter(torch.empty((), dtype=dtype, device=device), requires_grad=False)
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.weight_form = "none"
        self.working = WorkingWeight()

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
        activation_bits: int | None = None,
        act_log_step: torch.Tensor | None = None,
    ) -> PackedLinear:
        """Pack the output of `quept_hf.nn.functional.quantize_weight_codes` into a new layer.

        ``act_log_step`` (a scalar) selects per-tensor activation quantization with that calibrated step.
        """
        out_features, in_features = codes.shape
        module = cls(
            in_features,
            out_features,
            bias is not None,
            bits=bits,
            group_size=group_size,
            activation_bits=activation_bits,
            activation_granularity="per_tensor" if act_log_step is not None else "per_token",
            device=codes.device,
            dtype=scales.dtype,
        )
        if tuple(scales.shape) != tuple(module.scales.shape) or scales.shape != zeros.shape:
            raise ValueError(
                f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match "
                f"{tuple(module.scales.shape)} for in_features={in_features}, group_size={group_size}"
            )
        module.qweight.data = pack(codes, bits)
        module.scales.data = scales.detach().clone()
        module.zeros.data = zeros.detach().to(scales.dtype).clone()
        if bias is not None:
            module.bias.data = bias.detach().to(scales.dtype).clone()
        if module.act_log_step is not None:
            module.act_log_step.data = act_log_step.detach().to(scales.dtype).clone()
        return module

    # --------------------------------------------------------------------------------------------- compute
    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, uint8 ``(out, in)``."""
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``s * (q - z)`` (equal to the fake-quant weight it was exported from)."""
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.group_size)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Optional input transform (e.g. an online rotation), then the per-token activation quantizer."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.activation_bits is None:
            return x
        if self.act_log_step is not None:
            return fake_quantize_activation_static(x, self.activation_bits, self.act_log_step)
        return fake_quantize_activation(x, self.activation_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        self.working.ensure(self._working_key(), self.weight_form, self._active)
        if self.working.kernel is not None:
            out = self.working.kernel(x)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        weight = self.working.weight if self.working.weight is not None else self.dequantized_weight()
        return F.linear(x, weight.to(x.dtype), self.bias)

    def set_weight_form(self, form: str) -> None:
        """Working form of the codes (`quept_hf.packing.working.WEIGHT_FORMS`), derived on the next forward."""
        if form not in WEIGHT_FORMS:
            raise ValueError(f"weight_form={form!r} is unknown; allowed: {list(WEIGHT_FORMS)}")
        self.weight_form = form
        self.working.clear()

    def _working_key(self) -> tuple:
        return (self.weight_form, *versions(self.qweight, self.scales, self.zeros))

    def _active(self) -> tuple:
        return self.codes(), self.scales, self.zeros, self.bits, self.group_size

    # ---------------------------------------------------------------------------------------------- sizes
    def storage_bytes(self) -> int:
        """Bytes held by the layer's tensors (packed codes, scales, zeros, bias), cache excluded."""
        tensors = [self.qweight, self.scales, self.zeros, *([self.bias] if self.bias is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        mode = f"W{self.bits}A{self.activation_bits}" if self.activation_bits else f"W{self.bits}"
        mode += " per-tensor" if self.act_log_step is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{mode}, group_size={self.group_size}"
        )


def set_weight_cache(model: nn.Module, enabled: bool) -> int:
    """Keep (``True``: weight form ``"dequantized"``) or drop (``False``: ``"none"``) each `PackedLinear`'s float
    weight between calls; `quept_hf.set_weight_form` offers ``"kernel"`` too. Returns the number of layers changed.
    """
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for layer in layers:
        layer.set_weight_form("dequantized" if enabled else "none")
    return len(layers)

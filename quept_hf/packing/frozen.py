"""`FrozenLinear`: the deployable form of an elastic layer — packed integer codes of every KEPT bit-width.

An elastic `QuEPTLinear` re-runs its quantizer (``Q_b(W + B·A)`` with clipping and rounding) at every switch and
keeps the float weight, MB-CLoRA factors and clipping logits in memory. Freezing computes, once per kept width
``b``, the codes of ``Q_b(W + ΔW_b)`` with their scales and zero points (the fake quantizer's own
`quept_hf.nn.functional.quantize_weight_codes`) and keeps only those:

* ``qweight[b]``: uint8 ``(out, ceil(in * b / 8))``, rows packed densely by `quept_hf.packing.codec`;
* ``scales[b]``, ``zeros[b]``: ``(out, groups_b)`` in the model's float dtype (zero points are integer-valued but
  may leave ``[0, 2^b - 1]``, which float holds exactly: see `quept_hf.packing.linear`; real-valued for a width
  calibrated with ``QuEPTConfig(zero_point="float")``, rounded to that dtype like the scales);
* ``act_log_step[b]``: per-tensor activation quantization only (ViTs), the calibrated log step of width ``b``;
* ``bias``.

Switching (`set_bits`) never touches a quantizer or a low-rank product: it derives the active width's WORKING
FORM from its stored codes, once, and every forward uses it until the next switch (`quept_hf.packing.working`):
``"dequantized"`` (default: bitwise the elastic model's fake-quant weight, so logits equal the elastic model's),
``"kernel"`` (low-bit CPU kernels, bf16 arithmetic), ``"kernel-all"`` (every kept width's kernel prepared once:
a switch selects one and derives nothing, for the memory of all of them) or ``"none"`` (no copy), set by
`quept_hf.set_weight_form`. Resident: the kept codes plus one working copy of one width (``"kernel-all"``: of each).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.functional import fake_quantize_activation, fake_quantize_activation_static, num_groups
from .codec import MAX_BITS, MIN_BITS, packed_cols, unpack
from .linear import PackedLinear
from .working import WEIGHT_FORMS, WorkingWeight, dequantize_codes, versions

__all__ = ["FrozenLinear", "set_weight_form"]


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class FrozenLinear(nn.Module):
    """Inference linear layer holding packed codes of several bit-widths; runs the active one (module docstring).

    Args:
        bits: the kept bit-widths (2..8).
        group_size: ``{bits: input columns per group}``, ``-1`` for one group per output row.
        quantize_activations: weight+activation mode: inputs are quantized at the active width (the elastic
            layer's activation quantizer), per token or (``activation_granularity="per_tensor"``) with the
            calibrated step ``act_log_step[b]`` (NaN: dynamic absmax).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: list[int],
        group_size: dict[int, int],
        quantize_activations: bool = False,
        activation_granularity: str = "per_token",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS]
        if not bits or bad:
            raise ValueError(f"FrozenLinear bits={bits!r}: expected bit-widths in {MIN_BITS}..{MAX_BITS}")
        if activation_granularity not in ("per_token", "per_tensor"):
            raise ValueError(f"activation_granularity={activation_granularity!r}: 'per_token' or 'per_tensor'")
        self.in_features, self.out_features = in_features, out_features
        self.bits = sorted(bits)
        self.group_size = {b: int(group_size[b]) for b in self.bits}
        self.quantize_activations = quantize_activations
        self.activation_granularity = activation_granularity
        dtype = dtype or torch.get_default_dtype()
        self.qweight, self.scales, self.zeros = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.act_log_step = nn.ParameterDict()
        for b in self.bits:
            groups = num_groups(in_features, self.group_size[b])
            packed = (out_features, packed_cols(in_features, b))
            self.qweight[str(b)] = _frozen(torch.empty(packed, dtype=torch.uint8, device=device))
            self.scales[str(b)] = _frozen(torch.empty(out_features, groups, dtype=dtype, device=device))
            self.zeros[str(b)] = _frozen(torch.empty(out_features, groups, dtype=dtype, device=device))
            if quantize_activations and activation_granularity == "per_tensor":
                self.act_log_step[str(b)] = _frozen(torch.full((), float("nan"), dtype=dtype, device=device))
        self.bias = _frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.active_bits = max(self.bits)
        self.activation_bits: int | None = None  # None: activations follow active_bits (as in QuEPTLinear)
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.weight_form = "dequantized"
        self.workings = {b: WorkingWeight() for b in self.bits}  # filled: the active width's (all: "kernel-all")

    # --------------------------------------------------------------------------------------- switching
    def set_bits(self, bits: int) -> None:
        """Make ``bits`` the active width and derive its working form from the stored codes (no quantizer)."""
        if isinstance(bits, bool) or bits not in self.bits:
            raise ValueError(
                f"bit-width {bits!r} is not kept by this frozen layer; it keeps {self.bits} (a frozen model has no "
                "float weights: freeze again with the width you need)"
            )
        self.active_bits = int(bits)
        if self.weight_form != "kernel-all":  # at most one working copy resident
            for other, working in self.workings.items():
                if other != bits:
                    working.clear()
        if self.qweight[str(bits)].device.type != "meta":
            self._ensure_working()

    def set_weight_form(self, form: str) -> None:
        """Working form of the codes (`quept_hf.packing.working.WEIGHT_FORMS`); ``"kernel-all"`` prepares every
        kept width's kernel now, so that a switch only selects one."""
        if form not in WEIGHT_FORMS:
            raise ValueError(f"weight_form={form!r} is unknown; allowed: {list(WEIGHT_FORMS)}")
        self.weight_form = form
        for working in self.workings.values():
            working.clear()
        if self.qweight[str(self.active_bits)].device.type == "meta":
            return
        for bits in self.bits if form == "kernel-all" else [self.active_bits]:
            self._ensure_working(bits)

    @property
    def working(self) -> WorkingWeight:
        """The active width's working form."""
        return self.workings[self.active_bits]

    @property
    def is_float(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------------ compute
    def codes(self, bits: int | None = None) -> torch.Tensor:
        """The unpacked integer codes of ``bits`` (default: the active width), uint8 ``(out, in)``."""
        bits = self.active_bits if bits is None else bits
        return unpack(self.qweight[str(bits)], bits, self.in_features)

    def dequantized_weight(self, bits: int | None = None) -> torch.Tensor:
        """``s * (q - z)`` of ``bits``: bitwise the elastic layer's fake-quant weight it was frozen from."""
        bits = self.active_bits if bits is None else bits
        key = str(bits)
        return dequantize_codes(self.codes(bits), self.scales[key], self.zeros[key], self.group_size[bits])

    def _ensure_working(self, bits: int | None = None) -> None:
        """Derive width ``bits``'s (default: the active width's) working form if it is stale (another form, or
        tensors loaded or replaced since). Runs before every forward, so it reads the tensors straight from the
        parameter dicts' storage (``ParameterDict[...]`` costs microseconds, times every layer and token)."""
        bits = self.active_bits if bits is None else bits
        key = str(bits)
        tensors = (self.qweight._parameters[key], self.scales._parameters[key], self.zeros._parameters[key])
        self.workings[bits].ensure(
            (bits, self.weight_form, *versions(*tensors)),
            self.weight_form,
            lambda: (self.codes(bits), self.scales[key], self.zeros[key], bits, self.group_size[bits]),
        )

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The elastic layer's input path: optional online transform, then the activation quantizer."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        if not self.quantize_activations:
            return x
        act_bits = self.activation_bits if self.activation_bits is not None else self.active_bits
        if self.activation_granularity == "per_tensor":
            return fake_quantize_activation_static(x, act_bits, self.act_log_step[str(act_bits)])
        return fake_quantize_activation(x, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        self._ensure_working()
        if self.working.kernel is not None:
            out = self.working.kernel(x)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        weight = self.working.weight if self.working.weight is not None else self.dequantized_weight()
        return F.linear(x, weight.to(x.dtype), self.bias)

    # -------------------------------------------------------------------------------------------- sizes
    def storage_bytes(self) -> int:
        """Bytes of the stored tensors (every kept width's codes, scales, zeros; bias), working form excluded."""
        tensors = [*self.qweight.values(), *self.scales.values(), *self.zeros.values(), *self.act_log_step.values()]
        tensors += [self.bias] if self.bias is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        mode = "W+A" if self.quantize_activations else "W"
        mode += " per-tensor" if self.quantize_activations and self.activation_granularity == "per_tensor" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kept bits={self.bits}, active_bits={self.active_bits}, mode={mode}, weight_form={self.weight_form}"
        )


def set_weight_form(model: nn.Module, form: str) -> int:
    """Run every `FrozenLinear` (and `PackedLinear`) of ``model`` with working form ``form`` (`WEIGHT_FORMS`).

    ``"dequantized"``: exact (the elastic model's logits); ``"kernel"``: low-bit matmul kernels where a layer's
    shape and width allow one (smaller and faster on CPU for decoding, bf16 arithmetic); ``"none"``: no working
    copy (smallest). Returns the number of layers set.
    """
    if form not in WEIGHT_FORMS:
        raise ValueError(f"set_weight_form: form={form!r} is unknown; allowed: {list(WEIGHT_FORMS)}")
    layers = [m for m in model.modules() if isinstance(m, (FrozenLinear, PackedLinear))]
    for layer in layers:
        layer.set_weight_form(form)
    return len(layers)

"""The working form of a frozen or packed layer's active codes: what its forward multiplies by.

`quept_hf.packing.frozen.FrozenLinear` (codes of several bit-widths) and `quept_hf.packing.linear.PackedLinear`
(one) both hold packed codes, scales and zero points, and neither keeps a float weight on disk. At run time each
derives ONE working form of its active codes, on a switch or after loading, and keeps it until the next switch.
`WEIGHT_FORMS` (set per model by `quept_hf.packing.frozen.set_weight_form`):

* ``"dequantized"``: ``s * (q - z)`` in the layer's float dtype, bitwise the elastic model's fake-quant weight
  (exact logits); resident: one float copy of the active width;
* ``"kernel"``: the codes in a low-bit CPU kernel's layout (`quept_hf.packing.kernels`, bf16 activations: int4
  for 2..4 bits, int8 for per-channel 5..8 bits, two int4 nibbles for grouped 5..8 bits; above a measured token
  count the kernel decodes its weight to bf16 for that call); resident: a 4- or 8-bit copy. Layers no kernel
  supports (`quept_hf.packing.kernels.kernel_support` says why) fall back to ``"dequantized"``;
* ``"kernel-all"``: a frozen layer prepares the kernel of EVERY kept width once, so a switch selects one and
  derives nothing (resident: one 4- or 8-bit copy per kept width); for a one-width layer, ``"kernel"``;
* ``"none"``: nothing kept; every forward unpacks and dequantizes (smallest, slowest).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["WEIGHT_FORMS", "WorkingWeight", "dequantize_codes", "versions"]

WEIGHT_FORMS = ("dequantized", "kernel", "kernel-all", "none")


class WorkingWeight:
    """What a forward multiplies by: derived from one width's codes on a switch, dropped on the next one.

    Shared by `FrozenLinear` (many widths) and `quept_hf.packing.linear.PackedLinear` (one): both hold codes,
    scales and zero points, and both pick the form by ``weight_form``.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None  # "dequantized"
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None  # "kernel"

    def clear(self) -> None:
        self.key, self.weight, self.kernel = None, None, None

    def ensure(self, key: tuple, form: str, codes: Callable[[], tuple]) -> None:
        """(Re)derive the working form when ``key`` (width, tensor versions, form) changed since the last call."""
        if self.key == key:
            return
        self.clear()
        if form == "none":
            self.key = key
            return
        with torch.no_grad():
            q, scales, zeros, bits, group_size = codes()
            if form in ("kernel", "kernel-all"):
                from .kernels import prepare_kernel

                self.kernel = prepare_kernel(q, scales, zeros, bits, group_size)
            if self.kernel is None:
                self.weight = dequantize_codes(q, scales, zeros, group_size)
        self.key = key

    def nbytes(self) -> int:
        """Resident bytes of the working form (0 for ``"none"``)."""
        if self.kernel is not None:
            return int(self.kernel.nbytes())
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()


def versions(*tensors: torch.Tensor) -> tuple:
    """In-place version counters and storage addresses: they change whenever a tensor's values may have (loading)."""
    return tuple(v for t in tensors for v in (t._version, t.data_ptr()))


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``s * (q - z)`` per (row, group): the fake quantizer's arithmetic, so the result is bitwise identical.

    The last group may be shorter than ``group_size`` (``in_features`` not a multiple of it): the fake
    quantizer pads it to a whole group before dequantizing and slices afterwards, so this does too, which
    keeps the result bitwise identical.
    """
    out_features, in_features = codes.shape
    groups = scales.shape[1]
    size = in_features if groups == 1 else group_size
    pad = groups * size - in_features
    values = F.pad(codes, (0, pad)).to(scales.dtype) if pad else codes.to(scales.dtype)
    grouped = values.view(out_features, groups, size)
    # In place, to touch the (layer-sized) buffer as few times as possible; (c - z) is exact in float, and
    # ``x * s`` rounds exactly like the fake quantizer's ``s * x``.
    grouped.sub_(zeros.unsqueeze(-1)).mul_(scales.unsqueeze(-1))
    return grouped.view(out_features, -1)[:, :in_features]

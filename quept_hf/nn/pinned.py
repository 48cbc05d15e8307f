"""Layers pinned at one bit-width: the ViT patch embedding and classifier head run at 8 bits (spec section 1).

They are not elastic: no clipping logits, no MB-CLoRA adapter, no entry in the bit switch. Weights are
quantized per output channel (min/max), inputs per sample (dynamic absmax). A pinned layer follows ONE
elastic layer of its model only to know whether the model runs its float reference (``set_bits(model, 16)``),
so "16 bits" stays the exact float model without any extra switching code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fake_quantize_per_sample, fake_quantize_weight
from .linear import QuEPTLinear

PINNED_BITS = 8
_FULL_RANGE = 30.0  # sigmoid(30) == 1.0 in float32: plain min/max range, no clipping


def pinned_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel min/max fake quantization of a linear or convolution weight."""
    flat = weight.flatten(1)
    logit = torch.full((flat.shape[0], 1), _FULL_RANGE, device=weight.device, dtype=weight.dtype)
    return fake_quantize_weight(flat, bits, logit, logit, -1).view_as(weight)


class _Pinned:
    """Mixin of `PinnedLinear` / `PinnedConv2d`: quantize weight and input, unless the model runs in float."""

    pinned_bits: int = PINNED_BITS

    def follow(self, layer: QuEPTLinear | None) -> None:
        """Run in float exactly when ``layer`` does (stored outside ``_modules``: not a child, not saved)."""
        self.__dict__["_follows"] = layer

    @property
    def is_float(self) -> bool:
        follows = self.__dict__.get("_follows")
        return follows is not None and follows.is_float

    def _quantized(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight._version, self.weight.data_ptr())
        cache = self.__dict__.get("_cache")
        if cache is None or cache[0] != key or torch.is_grad_enabled():
            cache = (key, pinned_weight(self.weight, self.pinned_bits))
            self.__dict__["_cache"] = cache
        return fake_quantize_per_sample(x, self.pinned_bits), cache[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pinned_bits={self.pinned_bits}"


class PinnedLinear(_Pinned, nn.Linear):
    """``nn.Linear`` at a fixed bit-width (classifier heads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_float:
            return super().forward(x)
        x, weight = self._quantized(x)
        return F.linear(x, weight, self.bias)


class PinnedConv2d(_Pinned, nn.Conv2d):
    """``nn.Conv2d`` at a fixed bit-width (patch embeddings)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_float:
            return super().forward(x)
        x, weight = self._quantized(x)
        return self._conv_forward(x, weight, self.bias)


_PINNED = {nn.Linear: PinnedLinear, nn.Conv2d: PinnedConv2d}


def pin_module(module: nn.Module, bits: int = PINNED_BITS) -> nn.Module:
    """The pinned version of a plain ``nn.Linear`` / ``nn.Conv2d``, sharing its parameters (same state-dict keys).

    Built by copying the module's attributes into the subclass (like ``torch.ao``'s ``from_float``), so it
    works on the meta device before weight loading and keeps every constructor setting of the original.
    """
    cls = _PINNED.get(type(module))
    if cls is None:
        raise TypeError(f"cannot pin {type(module).__name__} at {bits} bits: only nn.Linear and nn.Conv2d")
    pinned = cls.__new__(cls)
    pinned.__dict__.update(module.__dict__)
    pinned.pinned_bits = bits
    return pinned


def pin_modules(model: nn.Module, names: list[str] | tuple[str, ...], bits: int = PINNED_BITS) -> list[str]:
    """Pin the named Linear/Conv2d modules of ``model`` at ``bits``; they follow the model's first elastic layer
    into float mode. Call after the elastic layers are in place. Returns the pinned names."""
    follows = next((m for m in model.modules() if isinstance(m, QuEPTLinear)), None)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        pinned = pin_module(getattr(parent, child), bits)
        pinned.follow(follows)
        setattr(parent, child, pinned)
    return list(names)

"""Fake-quantization building blocks: the quantizer math and `QuEPTLinear`."""

from .functional import (
    CLIP_INIT,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight_codes,
    round_ste,
)
from .linear import FLOAT_BITS, QuEPTLinear, WeightDelta, float_reference
from .pinned import PINNED_BITS, PinnedConv2d, PinnedLinear, pin_module, pin_modules

__all__ = [
    "CLIP_INIT",
    "FLOAT_BITS",
    "PINNED_BITS",
    "PinnedConv2d",
    "PinnedLinear",
    "QuEPTLinear",
    "WeightDelta",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "float_reference",
    "pin_module",
    "pin_modules",
    "quantize_weight_codes",
    "round_ste",
]

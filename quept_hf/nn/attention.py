"""Optional quantization of the attention probabilities: ``QuEPTConfig(quantize_attention_probs=True)``.

QuEPT's spec quantizes the inputs of every linear layer and leaves the attention matmuls in float, so this is
off by default. When on, the model's attention runs through ``"quept_eager"``: transformers' eager attention
with the softmax output fake-quantized to unsigned ``b`` bits on the fixed range [0, 1], ``b`` being the
active bit-width of the attention module's own projections (so it follows ``set_bits`` / ``set_adapter``).
"""

from __future__ import annotations

import torch
from torch import nn

from .functional import round_ste
from .linear import QuEPTLinear

ATTENTION_IMPLEMENTATION = "quept_eager"


def quantize_probs(probs: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform unsigned quantization on [0, 1] with ``2^bits - 1`` steps (probabilities need no scale)."""
    levels = 2**bits - 1
    return round_ste(probs * levels) / levels


def _active_bits(module: nn.Module) -> int | None:
    """Bit-width of the first elastic projection of an attention module (``None``: it has none)."""
    for child in module.modules():
        if isinstance(child, QuEPTLinear):
            return None if child.is_float else (child.activation_bits or child.active_bits)
        if hasattr(child, "qweight"):  # PackedLinear (quept_hf.packing): frozen at one bit-width
            return child.activation_bits or child.bits
    return None


def quept_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (transformers' reference path) with quantized probabilities."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat key/value heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    bits = _active_bits(module)
    if bits is not None:
        probs = quantize_probs(probs, bits)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_attention() -> None:
    """Make ``"quept_eager"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, quept_eager_attention)
    # Without a registered mask function transformers passes NO causal mask to a custom implementation.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, eager_mask)

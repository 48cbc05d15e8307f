"""KV-cache quantization (``QuEPTConfig(kv_bits=...)``) and the online Q/K Hadamard of QuaRot.

Approach: a thin wrapper around the model's attention function (transformers' ``AttentionInterface``). The
wrapper receives the keys (after RoPE) and values exactly as the cache hands them to attention, and
fake-quantizes them per (token, head) group before calling the model's own attention (``sdpa``, ``eager``
or ``quept_eager``). Because every group is one token of one head, quantizing the whole cache on read gives
bit-for-bit what quantizing each token once on write would, so the same code serves ``generate`` with
transformers' ordinary ``DynamicCache``, cache-less perplexity runs and calibration (the block's loss sees
the quantized cache) — no Cache subclass, no hooks on k_proj/v_proj (which would see keys BEFORE RoPE, not
what the cache stores). Cost: one quantize of the cached keys/values per step, the same order as attention.

With rotation on, queries and keys also go through a Hadamard transform over the head dimension after RoPE:
``(q H^T)(k H^T)^T = q k^T`` leaves the scores unchanged while spreading key outliers over the head, so the
4-bit key cache loses far less.

The quantizer follows QuaRot's: asymmetric, one scale and zero point per group, range ``[0.95 min, 0.95 max]``
extended to contain 0. It runs only while the attention's projections are quantized: ``set_bits(model, 16)``
stays the float reference. ``kv_bits="follow"`` uses the projections' active (activation) bit-width.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..compat import mask_function
from ..naming import FLOAT_BITS
from .functional import round_ste
from .hadamard import hadamard_transform

KV_CLIP_RATIO = 0.95
KV_ATTRIBUTE = "_quept_kv"  # the `KVQuantization` of one attention module
KV_PREFIX = "quept_kv_"  # attention implementation names: "quept_kv_sdpa", "quept_kv_eager", ...


def fake_quantize_kv(
    x: torch.Tensor, bits: int, clip_ratio: float = KV_CLIP_RATIO, group_size: int | None = None
) -> torch.Tensor:
    """Asymmetric fake quantization of ``(..., head_dim)`` in groups of ``group_size`` (default: the whole head).

    Per group: ``xmax = clip * max(x, 0)``, ``xmin = clip * min(x, 0)``, ``s = (xmax - xmin) / (2^b - 1)``,
    ``z = round(-xmin / s)``, ``x' = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)``. Rounding uses the
    straight-through estimator so calibration gradients reach the projections.
    """
    dim = x.shape[-1]
    size = group_size or dim
    if dim % size:
        raise ValueError(f"KV group size {size} does not divide the head dimension {dim}")
    grouped = x.reshape(*x.shape[:-1], dim // size, size)
    stats = grouped.detach()
    xmax = stats.amax(-1, keepdim=True).clamp(min=0) * clip_ratio
    xmin = stats.amin(-1, keepdim=True).clamp(max=0) * clip_ratio
    levels = 2**bits - 1
    scale = ((xmax - xmin) / levels).clamp(min=1e-8)
    zero = torch.round(-xmin / scale)
    codes = torch.clamp(round_ste(grouped / scale) + zero, 0, levels)
    return ((codes - zero) * scale).reshape(x.shape)


def projection_bits(attention: nn.Module) -> int | None:
    """Bit-width the attention module's projections run at (activation bits first); ``None``: float."""
    for child in attention.modules():
        if hasattr(child, "active_bits"):  # QuEPTLinear
            return None if child.active_bits >= FLOAT_BITS else child.activation_bits or child.active_bits
        if hasattr(child, "qweight"):  # PackedLinear: frozen at one bit-width
            return child.activation_bits or child.bits
    return None


@dataclass(frozen=True)
class KVQuantization:
    """What one attention module does to its queries, keys and values before attention.

    Attributes:
        bits: KV-cache bit-width, or ``"follow"`` the projections' active bit-width; ``None``: no quantization.
        rotate: Hadamard transform of queries and keys over the head dimension (after RoPE).
    """

    bits: int | str | None
    rotate: bool = False

    def kv_bits(self, attention: nn.Module) -> int | None:
        active = projection_bits(attention)
        if self.bits is None or active is None:
            return None
        return active if self.bits == "follow" else int(self.bits)

    def __call__(
        self, attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.rotate:
            query, key = hadamard_transform(query), hadamard_transform(key)
        bits = self.kv_bits(attention)
        if bits is not None:
            key, value = fake_quantize_kv(key, bits), fake_quantize_kv(value, bits)
        return query, key, value


def _inner_attention(name: str, module: nn.Module) -> Callable:
    """The attention function being wrapped: a registered one, or the module's own ``eager_attention_forward``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name != "eager" and name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"cannot wrap attention implementation {name!r} of {type(module).__name__}")
    return eager


def _wrapped(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        spec = getattr(module, KV_ATTRIBUTE, None)
        if spec is not None:
            query, key, value = spec(module, query, key, value)
        return _inner_attention(inner, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{KV_PREFIX}{inner}"
    return attention


def register_kv_attention(inner: str) -> str:
    """Register ``"quept_kv_<inner>"`` (attention + the mask format ``inner`` expects); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    name = f"{KV_PREFIX}{inner}"
    AttentionInterface.register(name, _wrapped(inner))
    # quept_eager (and any eager-style function without its own mask) adds a float mask like eager.
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_function(inner, eager_mask))
    return name


def inner_implementation(current: str | None) -> str:
    """The implementation a wrapper should call, given the model's current one (re-installing is idempotent)."""
    current = current or "sdpa"
    return current.removeprefix(KV_PREFIX)

"""`QuEPTLinear`: a linear layer that runs at any bit-width of its set, with per-bit learnable clipping."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..naming import FLOAT_BITS
from .functional import (
    CLIP_INIT,
    fake_quantize_activation,
    fake_quantize_activation_static,
    fake_quantize_weight,
    num_groups,
    search_activation_scale,
)

ACTIVATION_GRANULARITIES = ("per_token", "per_tensor")


class WeightDelta(Protocol):
    """A weight update added before quantization (implemented by the MB-CLoRA adapter layer)."""

    requires_grad: bool

    def __call__(self) -> torch.Tensor: ...

    def cache_key(self) -> tuple:
        """What identifies the current delta (adapter, tensor versions), for the weight cache."""
        ...


def _versions(tensor: torch.Tensor) -> tuple[int, int]:
    """In-place version counter and storage address: changes whenever the tensor's values may have."""
    return tensor._version, tensor.data_ptr()


class QuEPTLinear(nn.Module):
    """Fake-quantized linear layer of an elastic-precision model.

    The float weight stays frozen; each bit-width ``b`` owns a pair of clipping logits (``clip_upper[b]``,
    ``clip_lower[b]``, one per output row and group). ``forward(x, weight_delta)`` computes
    ``Q_b(W + delta) x`` — the MB-CLoRA delta enters BEFORE quantization (weight-space LoRA, spec section 3).
    ``active_bits >= 16`` runs the float weights.

    Activations (``quantize_activations``) are quantized per token, dynamically (LLMs), or — with
    ``activation_granularity="per_tensor"`` (ViTs, spec section 1) — per tensor with a static step size per
    bit-width, ``clip_act[b]`` (its log), set from calibration data and learned with the clipping logits.

    When nothing needs a gradient, the quantized weight is cached per (bits, delta source) and re-used,
    so inference after a switch costs about one float matmul. The cache key includes the tensors'
    in-place version counters, so loading weights or an optimiser step invalidates it automatically.

    With ``gradient_checkpointing`` (set by calibration, `QuEPTConfig(gradient_checkpointing=True)`), a forward
    that needs gradients keeps only its input: ``W + delta``, its grouped, clipped and rounded copies and the
    quantized weight are recomputed in the backward pass instead of living in the autograd graph, so a block's
    training peak holds about one layer's weight copies instead of every layer's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: list[int],
        group_size: dict[int, int],
        zero_point: dict[int, str] | None = None,
        quantize_activations: bool = False,
        activation_granularity: str = "per_token",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = sorted(bits)
        self.group_size = {int(b): int(group_size[b]) for b in self.bits}
        # `QuEPTConfig.zero_point`: each width's grid kind (`quept_hf.nn.functional.weight_qparams`)
        self.zero_point = {b: (zero_point or {}).get(b, "integer") for b in self.bits}
        self.quantize_activations = quantize_activations
        if activation_granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(f"activation_granularity={activation_granularity!r}; allowed: {ACTIVATION_GRANULARITIES}")
        self.activation_granularity = activation_granularity
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype), False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), False) if bias else None
        self.clip_upper = nn.ParameterDict()
        self.clip_lower = nn.ParameterDict()
        for b in self.bits:
            shape = (out_features, num_groups(in_features, self.group_size[b]))
            self.clip_upper[str(b)] = nn.Parameter(torch.full(shape, CLIP_INIT, device=device, dtype=dtype))
            self.clip_lower[str(b)] = nn.Parameter(torch.full(shape, CLIP_INIT, device=device, dtype=dtype))
        self.clip_act = nn.ParameterDict()  # per-tensor activations only: log step size per bit, NaN = dynamic
        if quantize_activations and activation_granularity == "per_tensor":
            for b in self.bits:
                self.clip_act[str(b)] = nn.Parameter(torch.full((), float("nan"), device=device, dtype=dtype), False)
        self.active_bits = max(self.bits)
        self.activation_bits: int | None = None  # None: follow active_bits when quantize_activations
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.gradient_checkpointing = False
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> QuEPTLinear:
        """Wrap an existing float ``nn.Linear`` (weights are shared, not copied)."""
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **kwargs,
        )
        module.weight = nn.Parameter(linear.weight.data, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return module

    # ----------------------------------------------------------------- state
    def reset_clipping(self) -> None:
        """(Re)initialise every per-bit clipping logit to the spec's 4.0, on the weight's device."""
        for params in (self.clip_upper, self.clip_lower):
            for key, param in params.items():
                params[key] = nn.Parameter(
                    torch.full(param.shape, CLIP_INIT, device=self.weight.device, dtype=self.weight.dtype),
                    requires_grad=param.requires_grad,
                )
        for key in list(self.clip_act):
            self.clip_act[key] = nn.Parameter(
                torch.full((), float("nan"), device=self.weight.device, dtype=self.weight.dtype), False
            )
        self._cache = None

    @torch.no_grad()
    def init_activation_scales(self, inputs: torch.Tensor) -> None:
        """Set every bit-width's per-tensor step size from sample inputs (MSE-optimal clipping ratio)."""
        for key, param in self.clip_act.items():
            param.copy_(search_activation_scale(inputs, int(key)).log().to(param.dtype))

    def set_bits(self, bits: int) -> None:
        if bits not in self.bits and bits < FLOAT_BITS:
            raise ValueError(f"bit-width {bits} is not available for this layer; available: {self.bits}")
        self.active_bits = int(bits)

    def restrict_to(self, bits: int) -> None:
        """Keep one bit-width only (after merging an adapter): switching is disabled from then on."""
        self.set_bits(bits)
        self.bits = [bits]
        for params in (self.clip_upper, self.clip_lower, self.clip_act):
            for key in [k for k in params if k != str(bits)]:
                del params[key]

    @property
    def input_bits(self) -> int:
        """The width the input is quantized at (when ``quantize_activations``): ``activation_bits`` or the active."""
        return self.activation_bits if self.activation_bits is not None else self.active_bits

    @property
    def is_float(self) -> bool:
        return self.active_bits >= FLOAT_BITS

    # --------------------------------------------------------------- compute
    def quantized_weight(self, weight_delta: torch.Tensor | None = None, bits: int | None = None) -> torch.Tensor:
        """``Q_b(W + delta)`` at ``bits`` (default: the active bit-width)."""
        bits = self.active_bits if bits is None else bits
        weight = self.weight if weight_delta is None else self.weight + weight_delta.to(self.weight.dtype)
        if bits >= FLOAT_BITS:
            return weight
        return fake_quantize_weight(weight, bits, *self.grid(bits))

    def grid(self, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        """Width ``bits``'s grid arguments of `quept_hf.nn.functional`'s weight quantizers: clipping logits, group
        size, zero-point kind (one place, so every caller quantizes as the layer does)."""
        key = str(bits)
        return self.clip_upper[key], self.clip_lower[key], self.group_size[bits], self.zero_point[bits]

    def quantize_input(self, x: torch.Tensor, act_bits: int | None = None) -> torch.Tensor:
        """The layer's input as it enters the matmul at ``act_bits`` (default: the active activation width)."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        act_bits = self.input_bits if act_bits is None else act_bits
        if self.quantize_activations and act_bits < FLOAT_BITS:
            if self.activation_granularity == "per_tensor":
                return fake_quantize_activation_static(x, act_bits, self.clip_act[str(act_bits)])
            x = fake_quantize_activation(x, act_bits)
        return x

    def forward(self, x: torch.Tensor, delta: WeightDelta | None = None) -> torch.Tensor:
        """``delta``: the MB-CLoRA weight update of the active bit-width, if any."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and self._needs_grad(delta):
            # the widths are fixed now: the recompute runs in backward, possibly after a switch
            return checkpoint(self._recomputable, x, delta, self.active_bits, self.input_bits, use_reentrant=False)
        weight = self._cached_weight(delta)
        return F.linear(self.quantize_input(x), weight.to(x.dtype), self.bias)

    def _recomputable(self, x: torch.Tensor, delta: WeightDelta | None, bits: int, act_bits: int) -> torch.Tensor:
        self._cache = None
        weight = self.quantized_weight(delta() if delta is not None else None, bits)
        return F.linear(self.quantize_input(x, act_bits), weight.to(x.dtype), self.bias)

    def _cached_weight(self, delta: WeightDelta | None) -> torch.Tensor:
        if torch.is_grad_enabled() and self._needs_grad(delta):
            self._cache = None
            return self.quantized_weight(delta() if delta is not None else None)
        key = (self.active_bits, self.zero_point.get(self.active_bits), *_versions(self.weight), *self._clip_versions())
        key += delta.cache_key() if delta is not None else ()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.quantized_weight(delta() if delta is not None else None))
        return self._cache[1]

    def _clip_params(self) -> tuple[torch.Tensor, ...]:
        if self.is_float:
            return ()
        key = str(self.active_bits)
        return self.clip_upper[key], self.clip_lower[key]

    def _clip_versions(self) -> tuple:
        return tuple(v for p in self._clip_params() for v in _versions(p))

    def _needs_grad(self, delta: WeightDelta | None) -> bool:
        params = (self.weight, *self._clip_params())
        return any(p.requires_grad for p in params) or (delta is not None and delta.requires_grad)

    def extra_repr(self) -> str:
        mode = "W+A" if self.quantize_activations else "W"
        mode += " per-tensor" if self.quantize_activations and self.activation_granularity == "per_tensor" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, active_bits={self.active_bits}, mode={mode}"
        )


@contextlib.contextmanager
def float_reference(model: nn.Module) -> Iterator[None]:
    """Run every elastic layer (and, following them, every pinned one) in float; restore the bit-widths after."""
    layers = [m for m in model.modules() if isinstance(m, QuEPTLinear)]
    saved = [layer.active_bits for layer in layers]
    for layer in layers:
        layer.set_bits(FLOAT_BITS)
    try:
        yield
    finally:
        for layer, bits in zip(layers, saved, strict=True):
            layer.active_bits = bits

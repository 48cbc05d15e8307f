"""Float-equivalent weight rewrites shared by rotation and smoothing.

Both transforms change the basis of one activation space: a linear that READS the space gets its input
columns transformed (``W -> f(W)``, row by row), a module that WRITES it gets its output rows transformed
(``W -> g(W)``, column by column, bias included), and the model computes the same function. Rewrites that mix
channels (rotations) run in float64 and are cast back; per-channel scalings multiply in place (one rounding).
A float32 model's logits move by rounding noise only.

Any MB-CLoRA factors already attached follow their layer (``A`` lives in the input space, ``B`` in the output
space), so an adapter keeps its meaning — rotation normally runs before adapters exist, smoothing after.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Rewrite = Callable[[torch.Tensor], torch.Tensor]  # float64 (rows, cols) -> (rows, cols)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _slices(module: nn.Module, name: str) -> list[torch.Tensor]:
    return [p for slices in getattr(module, name, {}).values() for p in slices]


@torch.no_grad()
def _apply(tensor: torch.Tensor, rewrite: Rewrite) -> None:
    tensor.copy_(rewrite(tensor.double()).to(tensor.dtype))


@torch.no_grad()
def rewrite_inputs(module: nn.Module, rewrite: Rewrite) -> None:
    """Transform the input columns of a linear (its weight and MB-CLoRA ``A`` slices), or of an embedding's rows."""
    for tensor in (_base(module).weight, *_slices(module, "mbclora_A")):
        _apply(tensor, rewrite)


@torch.no_grad()
def rewrite_outputs(module: nn.Module, rewrite: Rewrite) -> None:
    """Transform the output rows of a linear: weight, bias (as a column) and MB-CLoRA ``B`` slices."""
    base = _base(module)
    for tensor in (base.weight, *_slices(module, "mbclora_B")):
        _apply(tensor, rewrite)
    if getattr(base, "bias", None) is not None:
        _apply(base.bias.unsqueeze(1), rewrite)


@torch.no_grad()
def scale_inputs(module: nn.Module, factor: torch.Tensor) -> None:
    """``W diag(factor)`` (and MB-CLoRA ``A``), in place in the weight's dtype: one rounding, like storing it."""
    for tensor in (_base(module).weight, *_slices(module, "mbclora_A")):
        tensor.mul_(factor.to(tensor))


@torch.no_grad()
def scale_outputs(module: nn.Module, factor: torch.Tensor) -> None:
    """``diag(factor) W`` (bias and MB-CLoRA ``B`` too), in place."""
    base = _base(module)
    for tensor in (base.weight, *_slices(module, "mbclora_B")):
        tensor.mul_(factor.to(tensor).unsqueeze(1))
    if getattr(base, "bias", None) is not None:
        base.bias.mul_(factor.to(base.bias))


@torch.no_grad()
def scale_norm(norm: nn.Module, factor: torch.Tensor, offset: float = 0.0) -> None:
    """Multiply a norm's effective scale ``offset + weight`` (and bias) by ``factor`` per channel."""
    factor = factor.double().to(norm.weight.device)
    effective = (norm.weight.double() + offset) * factor
    norm.weight.copy_((effective - offset).to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.double() * factor).to(norm.bias.dtype))


def norm_scale(norm: nn.Module, offset: float = 0.0) -> torch.Tensor:
    """The per-channel scale a norm applies after normalising (``offset + weight``), in float64."""
    return norm.weight.detach().double() + offset

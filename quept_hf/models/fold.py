"""RepQ-ViT-style LayerNorm reparameterisation: equalise post-LayerNorm channel ranges, float model unchanged.

Post-LayerNorm activations of ViTs have a few channels with ranges tens of times larger than the rest, which
ruins per-tensor activation quantization. For a LayerNorm ``y = g * xhat + b`` feeding linears ``W y``, pick
per-channel factors ``r_c = range_c / mean(range)`` (ranges measured on calibration data) and rewrite

    g' = g / r,  b' = b / r,  W' = W diag(r)      so that  W' y' = W y  exactly (up to float rounding),

moving the channel variation from the activations (quantized per tensor) into the weight columns (quantized
per output channel, which absorbs it far better). MB-CLoRA ``A`` factors, whose columns live in the same input
space, are rescaled the same way so an already calibrated delta keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layout import find_module

_MIN_RATIO = 1e-3  # a dead channel must not blow up the LayerNorm's rescaled affine


def _linear_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights whose input columns follow the norm: the (base) weight and any MB-CLoRA ``A`` slices."""
    base = getattr(module, "base_layer", module)
    weights = [base.weight]
    for slices in getattr(module, "mbclora_A", {}).values():
        weights.extend(slices)
    return weights


@torch.no_grad()
def fold_norm(norm: nn.Module, linears: list[nn.Module], ratio: torch.Tensor) -> None:
    """Divide the norm's affine by ``ratio`` and multiply the linears' input columns by it (in place)."""
    ratio = ratio.to(norm.weight.dtype)
    norm.weight.div_(ratio)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(ratio)
    for linear in linears:
        for weight in _linear_weights(linear):
            weight.mul_(ratio.to(weight.dtype))


def channel_ratio(ranges: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``(range_c / mean(range)) ** strength``: 1 equalises the ranges fully (RepQ-ViT), 0 leaves them."""
    ratio = ranges / ranges.mean().clamp(min=1e-12)
    return ratio.clamp(min=_MIN_RATIO).pow(strength)


@torch.no_grad()
def fold_block_norms(
    block: nn.Module, folds: tuple[tuple[str, tuple[str, ...]], ...], run: Callable[[], None], strength: float = 1.0
) -> int:
    """Measure every folded norm's output range with ``run()`` (float forwards of the block), then fold.

    Returns the number of norms folded; norms without an affine weight or absent from the block are skipped.
    """
    plans = []
    for norm_path, linear_paths in folds:
        norm = find_module(block, norm_path)
        linears = [m for m in (find_module(block, p) for p in linear_paths) if m is not None]
        if norm is not None and getattr(norm, "weight", None) is not None and linears:
            plans.append((norm, linears))
    if not plans:
        return 0
    ranges: dict[int, torch.Tensor] = {}

    def record(index: int):
        def hook(module, args, output):
            dims = tuple(range(output.dim() - 1))
            current = output.detach().abs().float().amax(dim=dims)
            ranges[index] = current if index not in ranges else torch.maximum(ranges[index], current)

        return hook

    handles = [norm.register_forward_hook(record(i)) for i, (norm, _) in enumerate(plans)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    for index, (norm, linears) in enumerate(plans):
        if index in ranges:
            fold_norm(norm, linears, channel_ratio(ranges[index], strength).to(norm.weight.device))
    return len(plans)

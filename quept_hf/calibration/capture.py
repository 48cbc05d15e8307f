"""Capture what the Transformer blocks receive: the first block's hidden states and every block's kwargs."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Every argument of a block call but the hidden states, by name (Swin passes ``input_dimensions``
    positionally; naming it lets the engine call the block with keywords only)."""
    if len(args) <= 1:
        return {k: v for k, v in kwargs.items() if k != "hidden_states"}
    signature = inspect.signature(module.forward)
    bound = signature.bind_partial(*args, **kwargs).arguments
    hidden_name = next(iter(signature.parameters))
    named = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"cannot calibrate {type(module).__name__}: its blocks take *args ({name})")
        elif name != hidden_name:
            named[name] = value
    return named


def _first_sample(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v[:1] for k, v in batch.items()}


@torch.no_grad()
def capture_block_kwargs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batch: dict[str, torch.Tensor],
    forward_kwargs: dict,
    first_sample: Callable[[dict], dict] = _first_sample,
) -> list[dict]:
    """Keyword arguments of every block (masks, position embeddings) from one full forward of one sample.

    Captured with batch size 1, they broadcast over any calibration batch; per-block capture serves models
    whose blocks get different masks or rotary tables (Gemma 3's sliding/global layers).
    """
    captured: list[dict] = [{} for _ in blocks]

    def hook(index):
        def fn(module, args, kwargs):
            captured[index] = _detach(_named_arguments(module, args, kwargs))

        return fn

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(**first_sample(batch), **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def capture_first_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[dict], forward_kwargs: dict, unbatched: bool = False
) -> torch.Tensor:
    """Hidden states entering the first block for every calibration sample, on the CPU.

    ``unbatched``: the blocks take ``(tokens, hidden)`` (one packed sequence per batch): each batch's input is
    stacked as one sample.
    """
    inputs: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach().cpu().unsqueeze(0) if unbatched else hidden.detach().cpu())
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(**batch, **forward_kwargs)
    finally:
        handle.remove()
    return torch.cat(inputs)

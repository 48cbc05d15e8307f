"""The input Hessians error-compensated freezing needs: one pass of calibration data per kept bit-width.

`quept_hf.freeze(model, error_compensation=data)` picks each layer's codes on the calibrated grid of ``W + ΔW_b``
with GPTQ (`quept_hf.calibration.gptq`) instead of rounding to nearest. GPTQ weighs a layer's rounding errors by
what the layer receives, so this module runs the ELASTIC model at each width ``b`` over the calibration windows
and accumulates, for every layer that keeps ``b``, the Hessian of its (transformed, activation-quantized) input:
the inputs the deployed width-``b`` model gives the layer, quantization of the layers before it included.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compat import unwrap
from ..inspection import quept_linears
from ..switch import get_bits, set_bits
from .data import text_windows
from .gptq import InputHessians

logger = logging.getLogger(__name__)

__all__ = ["HESSIAN_BUDGET_BYTES", "input_hessians"]

HESSIAN_BUDGET_BYTES = 2 * 2**30  # Hessians held at once; beyond it the layers are covered in several passes
BATCH_SIZE = 4


@torch.no_grad()
def input_hessians(
    model: nn.Module,
    widths: Mapping[str, list[int]],
    data: Any,
    *,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    budget_bytes: int = HESSIAN_BUDGET_BYTES,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(bits, {module: H})`` for every width in ``widths`` (``{module: kept widths}``), one chunk of layers
    at a time (a layer's Hessian is ``in_features²`` floats; chunks stay within ``budget_bytes``).

    ``data``: what `quept_hf.calibration.data.text_windows` accepts (texts with ``tokenizer``, or token ids), or
    a list of model-input dicts (``model(**batch)``: images, multimodal inputs). The model's active bit-width
    is restored afterwards.
    """
    base = unwrap(model)
    layers = quept_linears(base)
    batches = _batches(base, data, tokenizer, num_samples, seq_len, seed)
    active = get_bits(model)
    try:
        for bits in sorted({b for kept in widths.values() for b in kept}):
            modules = [m for m, kept in widths.items() if bits in kept]
            for chunk in _chunks(modules, layers, budget_bytes):
                set_bits(model, bits)
                with InputHessians({m: layers[m] for m in chunk}, inputs=lambda layer, x: layer.quantize_input(x)) as h:
                    for batch in tqdm(batches, desc=f"QuEPT: input Hessians at W{bits}", leave=False):
                        base(**batch)
                yield bits, h.hessians
    finally:
        set_bits(model, active)


def _batches(base: nn.Module, data: Any, tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> list[dict]:
    if isinstance(data, list) and data and all(isinstance(item, Mapping) for item in data):
        return [dict(item) for item in data]
    vocab = getattr(base.config, "vocab_size", None)
    ids = text_windows(data, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed, vocab_size=vocab)
    device = next(base.parameters()).device
    return [{"input_ids": ids[i : i + BATCH_SIZE].to(device)} for i in range(0, len(ids), BATCH_SIZE)]


def _chunks(modules: list[str], layers: Mapping[str, nn.Module], budget_bytes: int) -> Iterator[list[str]]:
    chunk, used = [], 0
    for module in modules:
        size = 4 * layers[module].in_features ** 2
        if chunk and used + size > budget_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(module)
        used += size
    if chunk:
        yield chunk

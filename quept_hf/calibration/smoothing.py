"""AWQ-style activation-aware scaling before each block's calibration (``QuEPTConfig(smoothing=True)``).

A few input channels of every linear carry much larger activations than the rest; their weight columns
matter most, yet low-bit weight quantization gives them the same grid as every other column. Scaling column
``c`` by ``s_c > 1`` (and the activation by ``1 / s_c``) gives it relatively finer steps. With
``s = act_absmean ** alpha`` (normalised so ``max(s) * min(s) = 1``) and ``alpha`` on a grid in [0, 1), the
scale is searched per reader group, and folded so the float model is unchanged:

=================  ==================================  ==========================================
pair               readers (columns ``W diag(s)``)      writer (outputs divided by ``s``)
=================  ==================================  ==========================================
attention input    q_proj, k_proj, v_proj               the attention norm's scale
value -> output    o_proj                               v_proj rows (per KV head, shared by its
                                                        query heads under grouped-query attention)
MLP input          gate_proj, up_proj                   the MLP norm's scale
up -> down         down_proj                            up_proj rows (the SwiGLU product is linear
                                                        in up's output)
=================  ==================================  ==========================================

A pair is skipped when its readers are not quantized, or when the reader has an online input transform
(down_proj under rotation: ``x / s`` would have to pass through the Hadamard transform).

Objective: the error of the BLOCK's output against the float block output (mean squared error, as AWQ), with
only the pair's readers quantized, at the lowest bit-width of each quantization granularity and at the highest
(`search_bits`: W2 in groups of 128, W4 and W8 per channel by default). An ``alpha`` scores the WORST ratio of
its error to the unscaled error over those widths: scaling columns refines grouped low-bit grids but coarsens
per-channel ones (a scaled-up column widens its whole row); scored at W2 alone the chosen scales made 4..8 bits
worse than no smoothing on SmolLM2, and scored at W2 + W4 they still cost W8. ``alpha = 0`` (score 1) is on
the grid, so a scale is applied only where it lowers the error of every scored width on the search data; the
per-bit clipping and MB-CLoRA trained right after adapt each width to the chosen scales.

Only weights are quantized during the search (AWQ is a weight-only method): in weight_activation mode the
scales are searched for the weights' sake alone. Activation statistics come from every calibration sample;
the search error from the first ``search_tokens`` tokens' worth of samples (cost per site: about
``grid / 2 + 2`` alphas (`coarse_to_fine`) x scored widths block forwards).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models import DecoderLayout
from ..nn import QuEPTLinear, fake_quantize_weight, float_reference
from .reparam import scale_inputs, scale_norm, scale_outputs

logger = logging.getLogger(__name__)

GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as AWQ (searched coarse to fine)
SEARCH_TOKENS = 1024  # tokens whose block output error scores each alpha (whole samples, at least one)
_MIN_SCALE = 1e-4

BlockRun = Callable[[torch.Tensor], torch.Tensor]  # one batch of block inputs -> block outputs (on device)


@dataclass
class _Pair:
    """One smoothing site: readers whose input columns get ``s``, and the writer that absorbs ``1 / s``."""

    name: str
    readers: list[nn.Module]
    norm: nn.Module | None = None  # the writer is a norm ...
    writer: nn.Module | None = None  # ... or a linear
    groups: int = 1  # query heads per KV head (value -> output pair): reader channels = groups x writer channels
    head_dim: int = 1

    def to_reader(self, s: torch.Tensor) -> torch.Tensor:
        """Writer-space scale -> reader-space scale (a KV head's scale is shared by its query heads)."""
        if self.groups == 1:
            return s
        return s.reshape(-1, 1, self.head_dim).expand(-1, self.groups, -1).reshape(-1)

    def to_writer(self, stats: torch.Tensor) -> torch.Tensor:
        """Reader-space statistics -> writer space (mean over the query heads sharing a KV head)."""
        if self.groups == 1:
            return stats
        return stats.reshape(-1, self.groups, self.head_dim).mean(1).reshape(-1)


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _pairs(block: nn.Module, layout: DecoderLayout) -> list[_Pair]:
    """The four smoothing sites of a block, minus those that cannot or need not be smoothed."""
    attention = layout.get(block, layout.attention)
    v_proj, o_proj = layout.get(block, layout.v_proj), layout.get(block, layout.o_proj)
    head_dim = int(attention.head_dim)
    groups = _base(o_proj).in_features // _base(v_proj).out_features
    pairs = [
        _Pair("attention input", [layout.get(block, p) for p in layout.qkv], norm=layout.get(block, layout.attn_norm)),
        _Pair("value -> output", [o_proj], writer=v_proj, groups=groups, head_dim=head_dim),
        _Pair("MLP input", [layout.get(block, p) for p in layout.gate_up], norm=layout.get(block, layout.mlp_norm)),
        _Pair("up -> down", [layout.get(block, layout.down_proj)], writer=layout.get(block, layout.up_proj)),
    ]
    return [p for p in pairs if _quantized(p) and not any(_base(r).input_transform for r in _quantized(p))]


def _quantized(pair: _Pair) -> list[QuEPTLinear]:
    return [_base(r) for r in pair.readers if isinstance(_base(r), QuEPTLinear)]


# ------------------------------------------------------------------------------------------------ statistics
@torch.no_grad()
def _input_absmean(pairs: list[_Pair], run: BlockRun, x: torch.Tensor, batch_size: int, device) -> list[torch.Tensor]:
    """Mean |activation| per input channel of each pair's readers, over all float block inputs ``x``."""
    sums = [None] * len(pairs)
    count = 0

    def hook(index: int):
        def fn(module, args):
            flat = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).sum(0)
            sums[index] = flat if sums[index] is None else sums[index] + flat

        return fn

    handles = [_base(p.readers[0]).register_forward_pre_hook(hook(i)) for i, p in enumerate(pairs)]
    try:
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size].to(device)
            run(batch)
            count += batch.shape[:-1].numel()
    finally:
        for handle in handles:
            handle.remove()
    return [p.to_writer(s / count) for p, s in zip(pairs, sums, strict=True)]


def _scale(stats: torch.Tensor, alpha: float) -> torch.Tensor:
    s = stats.clamp(min=_MIN_SCALE).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


# ------------------------------------------------------------------------------------------------ the search
@contextmanager
def _weights(layers: list[QuEPTLinear], weights: list[torch.Tensor]) -> Iterator[None]:
    saved = [layer.weight.data for layer in layers]
    for layer, weight in zip(layers, weights, strict=True):
        layer.weight.data = weight
    try:
        yield
    finally:
        for layer, weight in zip(layers, saved, strict=True):
            layer.weight.data = weight


def _quantized_weight(layer: QuEPTLinear, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(W diag(s)) diag(s)^-1``: what the smoothed layer computes on the unsmoothed input."""
    scaled = layer.weight * s.to(layer.weight)
    q = fake_quantize_weight(scaled, bits, *layer.grid(bits))
    return q / s.to(layer.weight)


@torch.no_grad()
def _error(run: BlockRun, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    total = 0.0
    for start in range(0, len(x), batch_size):
        out = run(x[start : start + batch_size].to(device))
        total += (out.float() - y[start : start + batch_size].to(device).float()).pow(2).sum().item()
    return total / y.numel()


def coarse_to_fine(score: Callable[[int], float], grid: int) -> int:
    """Index ``i`` (alpha ``i / grid``) of the lowest score: every other grid point, then the best one's two
    neighbours. About half of an exhaustive search's block forwards (11-12 of 20), and the same optimum
    wherever the score is unimodal in alpha at the coarse resolution."""
    coarse = min(range(0, grid, 2), key=score)
    return min((i for i in (coarse - 1, coarse, coarse + 1) if 0 <= i < grid), key=score)


@torch.no_grad()
def _search(pair: _Pair, stats: torch.Tensor, run: BlockRun, x, y, bits: list[int], batch_size: int, device, grid: int):
    """Best ``alpha``, its writer-space scale (``None`` when no scaling wins) and its score.

    Score of an ``alpha``: the WORST ratio, over ``bits``, of the block error with that scale to the error with
    none, so a scale is kept only where it helps every scored bit-width (``alpha = 0`` scores 1).
    """
    layers = _quantized(pair)
    errors: dict[int, list[float]] = {}

    def block_errors(index: int) -> list[float]:
        if index not in errors:
            reader_s = pair.to_reader(_scale(stats, index / grid))
            errors[index] = []
            for b in bits:
                with _weights(layers, [_quantized_weight(layer, reader_s, b) for layer in layers]):
                    errors[index].append(_error(run, x, y, batch_size, device))
        return errors[index]

    def score(index: int) -> float:
        return max(e / max(e0, 1e-30) for e, e0 in zip(block_errors(index), block_errors(0), strict=True))

    best = coarse_to_fine(score, grid)
    alpha = best / grid
    return alpha, (_scale(stats, alpha) if best > 0 else None), score(best)


def search_bits(bits: list[int], group_size: dict[int, int]) -> list[int]:
    """The lowest bit-width of each quantization granularity, and the highest (default: W2 in groups of 128,
    W4 and W8 per channel).

    Scaling columns helps grouped low-bit weights but can coarsen a per-channel grid (a scaled-up column raises
    the whole row's range), so a scale must not hurt the hardest width of either kind, nor the finest width,
    whose round-to-nearest error is so small that training cannot win back what smoothing costs it.
    """
    lowest: dict[int, int] = {}
    for b in sorted(bits):
        lowest.setdefault(group_size[b], b)
    return sorted({*lowest.values(), max(bits)})


@torch.no_grad()
def _apply(pair: _Pair, s: torch.Tensor, offset: float) -> None:
    """Fold for real: readers ``W diag(s)``, writer ``/ s`` (float model unchanged)."""
    for reader in pair.readers:
        scale_inputs(reader, pair.to_reader(s))
    if pair.norm is not None:
        scale_norm(pair.norm, 1.0 / s.double(), offset)
    else:
        scale_outputs(pair.writer, 1.0 / s.double())


def smooth_block(
    block: nn.Module,
    run: BlockRun,
    inputs: torch.Tensor,
    layout: DecoderLayout,
    bits: list[int],
    batch_size: int,
    device: torch.device,
    grid: int = GRID,
    search_tokens: int = SEARCH_TOKENS,
) -> dict[str, float]:
    """Search and fold the scales of every smoothing site of one block; returns ``{site: alpha}``.

    Args:
        block: the decoder block (its weights on ``device``).
        run: the block's forward on one batch of hidden states (the engine supplies masks and rotary tables).
        inputs: the block's float inputs (CPU), ``(samples, tokens, hidden)``.
        bits: the bit-widths the search scores (`search_bits`: the lowest of each granularity, and the highest).
    """
    pairs = _pairs(block, layout)
    if not pairs:
        return {}
    x = inputs[: max(1, search_tokens // max(1, inputs.shape[1]))]
    chosen = {}
    with float_reference(block):
        y = torch.cat([run(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
        all_stats = _input_absmean(pairs, run, inputs, batch_size, device)
        for pair, stats in zip(pairs, all_stats, strict=True):
            alpha, s, score = _search(pair, stats, run, x, y, bits, batch_size, device, grid)
            if s is not None:
                _apply(pair, s, layout.norm_offset)
            chosen[pair.name] = alpha
            logger.debug("smoothing %s: alpha %.2f, worst block MSE ratio over W%s %.3f", pair.name, alpha, bits, score)
    return chosen

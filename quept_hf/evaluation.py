"""Perplexity of a causal LM, as defined in transformers' perplexity guide (fixed-length models).

The texts are joined by ``"\\n\\n"`` and tokenized once. ``stride=None`` scores non-overlapping windows of
``seq_len`` tokens; a ``stride`` slides windows of ``seq_len`` tokens by ``stride`` and scores only the
tokens not scored by the previous window (the guide's target masking), giving every token more context.
Token counts are exact: the guide's ``num_valid_tokens - batch_size`` correction is replaced by counting
the targets that really enter the loss after the one-token shift.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, target_len)`` of every window, as in the guide's loop."""
    windows, prev_end = [], 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == total:
            break
    return windows


def _pick(windows: list, max_windows: int | None) -> list:
    """At most ``max_windows`` windows, evenly spread over the text (not just its beginning)."""
    if max_windows is None or len(windows) <= max_windows:
        return windows
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be positive")
    step = len(windows) / max_windows
    return [windows[int(i * step)] for i in range(max_windows)]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    texts: list[str],
    tokenizer,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity of ``model`` (a transformers causal LM or a ``peft.PeftModel``) on ``texts``.

    Args:
        seq_len: tokens per window (the model's context for each scored token is at most this).
        stride: ``None`` for non-overlapping windows, else the sliding-window step (``<= seq_len``).
        max_windows: score at most this many windows, evenly spread over the text (``None``: all).
        batch_size: windows of equal length run together.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must lie in 1..seq_len={seq_len}")
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    windows = _pick(_windows(ids.numel(), seq_len, stride), max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in tqdm(batches, desc="perplexity", unit="batch", leave=False):
            # A batch holds windows of one length; the last (shorter) window of the text runs alone.
            for group in _same_length(batch):
                inputs = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
                labels = inputs.clone()
                for row, (b, e, target_len) in enumerate(group):
                    labels[row, : (e - b) - target_len] = IGNORE_INDEX
                logits = model(input_ids=inputs).logits[:, :-1].float()
                targets = labels[:, 1:]
                nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the texts yield no token to score (need at least 2 tokens)")
    result = math.exp(nll / count)
    logger.info("perplexity %.4f over %d tokens in %d windows of <= %d", result, count, len(windows), seq_len)
    return result


def _same_length(batch: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    groups: dict[int, list] = {}
    for window in batch:
        groups.setdefault(window[1] - window[0], []).append(window)
    return list(groups.values())

"""MB-ToMe, multi-bit token merging (spec section 4): builds the quantized input of the next block."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_tokens(outputs: list[torch.Tensor], top_p: float, weights: list[float], mode: str = "mbtome") -> torch.Tensor:
    """Merge one block's outputs at one bit-width per group (``outputs`` ordered low to high groups).

    ``mbtome``: per sequence, the ``top_p`` share of tokens whose lowest- and highest-bit outputs agree most
    (cosine similarity) take the highest-bit output; every other token takes the ``weights``-mix of all groups.
    ``uniform``: the weighted mix everywhere. ``none``: the highest-bit output (ablations).
    """
    high = outputs[-1]
    if mode == "none" or len(outputs) == 1:
        return high.clone()
    total = float(sum(weights))
    mixed = sum(w / total * out for w, out in zip(weights, outputs, strict=True))
    if mode == "uniform":
        return mixed
    if mode != "mbtome":
        raise ValueError(f"token_merge={mode!r} is unknown; allowed: ['mbtome', 'uniform', 'none']")
    keep = int(top_p * high.shape[-2])
    if keep == 0:
        return mixed
    similarity = F.cosine_similarity(outputs[0].float(), high.float(), dim=-1)  # (..., tokens)
    top = similarity.topk(keep, dim=-1).indices
    take_high = torch.zeros_like(similarity, dtype=torch.bool).scatter_(-1, top, True)
    return torch.where(take_high.unsqueeze(-1), high, mixed)

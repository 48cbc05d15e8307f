"""GGML block encoders that carry QuEPT's grid into llama.cpp's quant types.

Why a module of its own: gguf-py (llama.cpp's Python package) quantizes float tensors blindly (min/max or
absmax per block) and cannot quantize the K-types at all, while a QuEPT layer already HAS its grid: codes ``c``,
scale ``s`` and zero ``z`` per (row, group), ``W = s * (c - z)`` (``z`` an integer, or real-valued for a width
calibrated with ``QuEPTConfig(zero_point="float")``). Each encoder here takes that grid and
writes the bytes gguf-py's own ``gguf.quants.dequantize`` (and llama.cpp) decode, so that:

* ``Q4_1`` / ``Q5_1`` (``x = d * q + m``, blocks of 32) hold QuEPT's 4/5-bit grid EXACTLY where every 32-block
  lies in one QuEPT group: ``q = c``, ``d = s``, ``m = -s * z`` (any ``z``, integer or float). The only error is
  the fp16 rounding of ``d`` and ``m``: ``|x - W| <= c * |fp16(s) - s| + |fp16(-s z) + s z|`` (plus float32
  round-off), i.e. at most ``2^-11 * (|s| * (2^b - 1) + |s z|)`` for normal fp16 numbers;
* the symmetric types (``Q4_0``, ``Q5_0``, ``Q8_0``: ``x = d * k``) and the K-types (``Q2_K``, ``Q3_K``,
  ``Q6_K``: sub-block scales on a 256-superblock) are SEARCHED against QuEPT's dequantized weight ``y``: per block
  the candidate scales include QuEPT's own ``s`` (exact whenever ``c - z`` fits the type's integer range, e.g.
  W2/W3 in ``Q4_0``), and the candidate with the smallest squared error against ``y`` wins. The float weight is
  never looked at: the file reproduces what QuEPT calibrated, not a fresh rounding of the float model.

All functions are numpy, vectorised over blocks; shapes are ``(n_blocks, block_size)``. Layouts follow
``gguf/quants.py`` (the dequantizers are the specification; tests round-trip every encoder through them).
"""

from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256
SUB = 16  # K-type sub-block length
CHUNK = 1 << 14  # blocks per search step: bounds the (blocks, candidates, block_size) temporaries

__all__ = [
    "encode_q4_1",
    "encode_q5_1",
    "quantize_k_asymmetric",
    "quantize_k_symmetric",
    "quantize_symmetric",
]


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 and back: what a stored ``d`` / ``m`` really is."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).reshape(-1, 1).astype(np.float16).view(np.uint8)


def _nibbles(values: np.ndarray) -> np.ndarray:
    """32 values 0..15 per block -> 16 bytes: element i in the low nibble of byte i, i + 16 in the high one."""
    v = values.astype(np.uint8).reshape(values.shape[0], 2, QK // 2)
    return v[:, 0] | (v[:, 1] << np.uint8(4))


def _high_bits(values: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values per block, little-endian in 4 bytes (``qh`` of Q5_0 / Q5_1)."""
    bits = (values.astype(np.uint8) >> np.uint8(4)) & np.uint8(1)
    return np.packbits(bits.reshape(values.shape[0], 1, QK), axis=-1, bitorder="little").reshape(-1, 4)


# --------------------------------------------------------------------------- exact: QuEPT codes as they are


def encode_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``Q4_1`` blocks (20 bytes) from codes 0..15 and per-block ``d = s``, ``m = -s * z``."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(codes)], axis=1)


def encode_q5_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``Q5_1`` blocks (24 bytes) from codes 0..31 and per-block ``d = s``, ``m = -s * z``."""
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _high_bits(codes), _nibbles(codes & 0x0F)], axis=1)


# ------------------------------------------------------------------------------ symmetric blocks of 32

SYMMETRIC = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127)}


def _round_clip(y: np.ndarray, scale: np.ndarray, low: int, high: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(scale == 0, 0.0, np.round(y / scale))
    return np.clip(k, low, high)


def _best_scale(y: np.ndarray, candidates: np.ndarray, low: int, high: int) -> np.ndarray:
    """Per block, the candidate scale ``a`` (``(n, C)``) minimising ``sum (y - a * clip(round(y / a)))^2``."""
    best = np.empty(y.shape[0], dtype=np.float32)
    for start in range(0, y.shape[0], CHUNK):
        yy = y[start : start + CHUNK, None, :]
        cc = candidates[start : start + CHUNK, :, None]
        err = ((yy - cc * _round_clip(yy, cc, low, high)) ** 2).sum(-1)
        best[start : start + CHUNK] = np.take_along_axis(candidates[start : start + CHUNK], err.argmin(1)[:, None], 1)[
            :, 0
        ]
    return best


def _fits(y: np.ndarray, d: np.ndarray, low: int, high: int) -> np.ndarray:
    """Blocks that ARE integer multiples ``k`` of ``d`` (up to fp16 rounding of ``d``) with ``k`` in range."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = y / d[:, None]
    near = np.abs(k - np.round(k)) <= np.abs(np.round(k)) * 2.0**-10 + 1e-3  # fp16(s) is s within 2^-11
    return (d != 0) & (near & (np.round(k) >= low) & (np.round(k) <= high)).all(axis=1)


def _absmax_candidates(y: np.ndarray, low: int, high: int, steps: int = 12) -> np.ndarray:
    """llama.cpp-style scales: the signed absmax on the long side of the range, shrunk by up to 30 %."""
    idx = np.abs(y).argmax(axis=1)[:, None]
    signed = np.take_along_axis(y, idx, axis=1)
    shrink = np.linspace(1.0, 0.7, steps, dtype=np.float32)[None, :]
    return np.concatenate([signed / low * shrink, np.abs(signed) / high * shrink], axis=1)


def quantize_symmetric(qtype: str, y: np.ndarray, quept_scale: np.ndarray | None) -> np.ndarray:
    """``Q4_0`` / ``Q5_0`` / ``Q8_0`` blocks of ``y`` (QuEPT's dequantized weight), searched scale per block.

    ``quept_scale`` (``(n,)``, the QuEPT scale of each block or None) is a candidate: with it (or its mirror
    ``-s``) the block is exact (up to fp16 of ``d``) whenever ``c - z`` fits the type's integers ([-8, 7],
    [-16, 15], [-128, 127]): always for a ``zero_point="symmetric"`` grid, often for W2/W3.
    """
    low, high = SYMMETRIC[qtype]
    d = np.zeros(y.shape[0], dtype=np.float32)
    todo = np.ones(y.shape[0], dtype=bool)
    if quept_scale is not None:  # blocks whose c - z fit take d = s (or the mirrored -s) at once; the search is slow
        for own in (_f16(quept_scale), _f16(-quept_scale)):
            fit = todo & _fits(y, own, low, high)
            d[fit], todo = own[fit], todo & ~fit
    if todo.any():
        rest = y[todo]
        candidates = _absmax_candidates(rest, low, high)
        if quept_scale is not None:  # +s and -s: a negative d mirrors c - z into the type's lopsided range
            own = quept_scale[todo, None]
            candidates = np.concatenate([own, -own, candidates], axis=1)
        d[todo] = _best_scale(rest, _f16(candidates), low, high)
    k = _round_clip(y, d[:, None], low, high)
    if qtype == "Q8_0":
        return np.concatenate([_f16_bytes(d), k.astype(np.int8).view(np.uint8)], axis=1)
    u = (k - low).astype(np.uint8)
    parts = [_f16_bytes(d)] + ([_high_bits(u)] if qtype == "Q5_0" else []) + [_nibbles(u & 0x0F)]
    return np.concatenate(parts, axis=1)


# ------------------------------------------------------------------------------------ K-types (256 blocks)

K_SYMMETRIC = {"Q3_K": ((-4, 3), (-32, 31)), "Q6_K": ((-32, 31), (-128, 127))}


def _super_scale(sub: np.ndarray, y: np.ndarray, value_range: tuple[int, int], scale_range: tuple[int, int]):
    """Super-block ``d`` and integer sub-scales for float sub-scales ``sub`` ``(n, 16)``: searched divisor.

    ``d = fp16(max |sub| / n)`` for ``n`` from the scale range's top down to its half, keeping the one whose
    rounded sub-scales give the smallest error on ``y`` ``(n, 16, 16)``: the exact ``d`` of a constant QuEPT
    scale (``n`` = top) is one candidate, and a smaller divisor often rounds the fp16 ``d`` more kindly.
    """
    low, high = value_range
    s_low, s_high = scale_range
    amax = np.abs(sub).max(axis=1, keepdims=True)
    divisors = np.arange(s_high, s_high // 2 - 1, -1, dtype=np.float32)
    best_err = np.full(sub.shape[0], np.inf, dtype=np.float32)
    best_d = np.zeros(sub.shape[0], dtype=np.float32)
    for n in divisors:
        d = _f16(amax / n)
        sc = _round_clip(sub, d, s_low, s_high)
        eff = (d * sc)[:, :, None]
        err = ((y - eff * _round_clip(y, eff, low, high)) ** 2).sum(axis=(1, 2))
        better = err < best_err
        best_err[better], best_d[better] = err[better], d[better, 0]
    sc = _round_clip(sub, best_d[:, None], s_low, s_high)
    return best_d, sc


def _sub_candidates(y: np.ndarray, quept_scale: np.ndarray | None, low: int, high: int) -> np.ndarray:
    candidates = _absmax_candidates(y, low, high)
    if quept_scale is not None:
        candidates = np.concatenate([quept_scale[:, None], -quept_scale[:, None], candidates], axis=1)
    return candidates


def quantize_k_symmetric(qtype: str, y: np.ndarray, quept_scale: np.ndarray | None) -> np.ndarray:
    """``Q3_K`` (110 bytes) or ``Q6_K`` (210 bytes) superblocks of ``y`` ``(n, 256)``.

    ``quept_scale`` ``(n, 16)``: QuEPT's scale of each 16-element sub-block (a candidate), or None.
    """
    (low, high), scale_range = K_SYMMETRIC[qtype]
    n = y.shape[0]
    ys = y.reshape(n * SUB, SUB)
    qs = None if quept_scale is None else quept_scale.reshape(-1)
    sub = _best_scale(ys, _sub_candidates(ys, qs, low, high), low, high).reshape(n, SUB)
    y3 = y.reshape(n, SUB, SUB)
    d, sc = _super_scale(sub, y3, (low, high), scale_range)
    k = _round_clip(y3, (d[:, None] * sc)[:, :, None], low, high).reshape(n, QK_K)
    return _pack_q3_k(k, sc, d) if qtype == "Q3_K" else _pack_q6_k(k, sc, d)


def _crumbs(values: np.ndarray, groups: int) -> np.ndarray:
    """2-bit values ``(n, 256)`` -> bytes: per 128-half, byte j holds elements j, j+32, j+64, j+96 (shifts 0..6)."""
    v = values.astype(np.uint8).reshape(values.shape[0], groups, 4, 32)
    out = v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)
    return out.reshape(values.shape[0], -1)


def _pack_q3_k(k: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """hmask[32] | qs[64] | scales[12] | d: ``u = k + 4``; low 2 bits in qs, bit 2 in hmask; 6-bit scales + 32."""
    u = (k + 4).astype(np.uint8)
    high = (u >> 2).reshape(-1, 8, 32)
    hmask = np.zeros((k.shape[0], 32), dtype=np.uint8)
    for t in range(8):
        hmask |= high[:, t] << np.uint8(t)
    s = (sc + 32).astype(np.uint8)
    low4 = s & np.uint8(0x0F)
    lscales = low4[:, :8] | (low4[:, 8:] << np.uint8(4))
    top2 = (s >> np.uint8(4)).reshape(-1, 4, 4)
    hscales = top2[:, 0] | (top2[:, 1] << 2) | (top2[:, 2] << 4) | (top2[:, 3] << 6)
    return np.concatenate([hmask, _crumbs(u & 3, 2), lscales, hscales, _f16_bytes(d)], axis=1)


def _pack_q6_k(k: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ql[128] | qh[64] | scales[16] int8 | d: ``u = k + 32``, low nibbles per 64-run, high 2 bits per 32-run."""
    u = (k + 32).astype(np.uint8)
    low = (u & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << np.uint8(4))).reshape(k.shape[0], -1)
    qh = _crumbs(u >> 4, 2)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def quantize_k_asymmetric(y: np.ndarray, quept_scale: np.ndarray | None, quept_min: np.ndarray | None) -> np.ndarray:
    """``Q2_K`` superblocks (84 bytes) of ``y`` ``(n, 256)``: ``x = d * sc * q - dmin * m``, q in 0..3.

    Per 16-element sub-block the affine pair ``(a, b)`` is searched (QuEPT's ``(s, s * z)`` from ``quept_scale``
    / ``quept_min`` ``(n, 16)`` is a candidate, exact when the codes fit), then ``a`` and ``b`` are rounded onto
    4-bit multiples of the fp16 super scales ``d`` and ``dmin``.
    """
    n = y.shape[0]
    ys = y.reshape(n * SUB, SUB)
    a_cand, b_cand = _affine_candidates(ys, quept_scale, quept_min)
    a, b = _best_affine(ys, a_cand, b_cand)
    a, b = a.reshape(n, SUB), b.reshape(n, SUB)
    y3 = y.reshape(n, SUB, SUB)
    d, dmin = _q2k_super_scales(y3, a, b)
    sc, m, q = _q2k_round(y3, a, b, d, dmin)
    q = q.reshape(n, QK_K)
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << np.uint8(4))).reshape(n, SUB)
    return np.concatenate([scales, _crumbs(q, 2), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q2k_round(y3: np.ndarray, a: np.ndarray, b: np.ndarray, d: np.ndarray, dmin: np.ndarray):
    """4-bit sub-scales and mins on the super scales ``d``/``dmin`` ``(n,)``, then the 2-bit codes of ``y3``."""
    sc = _round_clip(a, d[:, None], 0, 15)
    m = _round_clip(b, dmin[:, None], 0, 15)
    eff_a = (d[:, None] * sc)[:, :, None]
    eff_b = (dmin[:, None] * m)[:, :, None]
    return sc, m, _round_clip(y3 + eff_b, eff_a, 0, 3)


def _q2k_error(y3, a, b, d, dmin) -> np.ndarray:
    sc, m, q = _q2k_round(y3, a, b, d, dmin)
    x = (d[:, None] * sc)[:, :, None] * q - (dmin[:, None] * m)[:, :, None]
    return ((y3 - x) ** 2).sum(axis=(1, 2))


def _q2k_super_scales(y3: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Super scales ``d`` (for the sub-scales ``a``) and ``dmin`` (for the mins ``b``), searched on ``y3``'s error.

    Two QuEPT groups per superblock rarely have scales in a 4-bit ratio, so the step that puts the LARGEST on 15
    is often not the best: candidates are ``max / n`` (n = 15..8) and ``smallest / n`` (n = 1..15, where the
    largest still fits 4 bits), each scale searched with the other held, in that order.
    """
    d, dmin = _f16(a.max(axis=1) / 15), _f16(b.max(axis=1) / 15)
    err = _q2k_error(y3, a, b, d, dmin)
    for which, values, anchor in (("d", a, "max"), ("dmin", b, "max"), ("d", a, "min"), ("dmin", b, "min")):
        for trial in _step_candidates(values, anchor):
            trial_d, trial_m = (trial, dmin) if which == "d" else (d, trial)
            trial_err = _q2k_error(y3, a, b, trial_d, trial_m)
            better = trial_err < err
            err = np.where(better, trial_err, err)
            d, dmin = np.where(better, trial_d, d), np.where(better, trial_m, dmin)
    return d, dmin


def _step_candidates(values: np.ndarray, anchor: str):
    """fp16 steps for 4-bit multiples of ``values`` ``(n, 16)``: ``max / n`` or ``smallest positive / n``."""
    vmax = values.max(axis=1)
    smallest = np.where(values > 0, values, np.inf).min(axis=1)
    if anchor == "max":
        for n in range(14, 7, -1):
            yield _f16(vmax / n)
        return
    for n in range(1, 16):
        step = _f16(np.where(np.isfinite(smallest), smallest / n, vmax / 15))
        with np.errstate(divide="ignore", invalid="ignore"):
            fits = vmax / step <= 15.5
        yield np.where(fits, step, _f16(vmax / 15))


def _affine_candidates(ys: np.ndarray, scale: np.ndarray | None, minimum: np.ndarray | None):
    """``(a, b)`` candidates ``(n, C)``: min/max with shrink factors (ggml's form, ``b >= 0``), plus QuEPT's."""
    b0 = np.maximum(-ys.min(axis=1, keepdims=True), 0)
    span = ys.max(axis=1, keepdims=True) + b0
    shrink = np.linspace(1.0, 0.7, 12, dtype=np.float32)[None, :]
    a = span / 3 * shrink
    b = np.broadcast_to(b0, a.shape)
    if scale is not None:
        a = np.concatenate([scale.reshape(-1, 1), a], axis=1)
        b = np.concatenate([np.maximum(minimum.reshape(-1, 1), 0), b], axis=1)
    return a.astype(np.float32), np.ascontiguousarray(b, dtype=np.float32)


def _best_affine(ys: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    yy, aa, bb = ys[:, None, :], a[:, :, None], b[:, :, None]
    err = ((yy - (aa * _round_clip(yy + bb, aa, 0, 3) - bb)) ** 2).sum(-1)
    pick = err.argmin(1)[:, None]
    return np.take_along_axis(a, pick, 1)[:, 0], np.take_along_axis(b, pick, 1)[:, 0]

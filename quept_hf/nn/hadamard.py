"""Hadamard matrices and fast Hadamard transforms for QuaRot-style rotations.

QuEPT rotates the residual stream (and the inputs of some linears) by a normalized Hadamard matrix before
W4A4 quantization: the rotation is orthogonal, so it can be folded into the weights, and it spreads outlier
channels over all channels, which shrinks per-token activation scales. Hidden sizes are often not powers of
two (SmolLM2: 576 = 36 * 16 and 1536 = 12 * 128; LLaMA-2-7B MLP: 11008 = 172 * 64), so orders
``n = m * 2^k`` are supported, where the *base order* ``m`` comes from a classical construction:

* ``m = 1``: Sylvester, ``S[i, j] = (-1)^popcount(i & j)`` (the ``scipy.linalg.hadamard`` order);
* ``m = q + 1`` for a prime power ``q = 3 (mod 4)``: Paley I (12, 20, 28, 44, 60, 108, 140, ...);
* ``m = 2(q + 1)`` for a prime power ``q = 1 (mod 4)``: Paley II (36, 52, 76, 148, ...);
* ``m = 156, 172``: Williamson matrices (the ones QuaRot ships as ``had156`` / ``had172``).

For each odd part ``o`` of ``n`` the smallest constructible ``m = o * 2^j`` (``j >= 2``, ``m <= 4096``) is
used, so that as much as possible of the transform is the O(n log n) Sylvester butterfly.

Ordering convention, shared by :func:`hadamard_matrix`, :func:`hadamard_transform` and the CUDA path::

    H_n = kron(H_m, S_{2^k}),   index i = a * 2^k + b   (a < m: base index, b < 2^k: Sylvester index)

so ``x.view(..., m, 2^k)`` exposes both factors: the butterfly (or the ``fast_hadamard_transform`` kernel)
runs along the last axis and a small ``H_m @`` matmul along the other, exactly as in QuaRot.

Every Paley and Sylvester matrix here is symmetric (Paley I is built in a symmetrized form), so for those
orders the normalized transform is its own inverse. The Williamson orders (``n = 156 * 2^k, 172 * 2^k``)
are not symmetric: invert with ``hadamard_transform(y, transpose=True)``, which works for every order.
"""

from __future__ import annotations

import functools
import itertools
import math
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "MAX_BASE_ORDER",
    "base_order",
    "hadamard_matrix",
    "hadamard_transform",
    "has_hadamard",
    "random_hadamard_matrix",
    "random_signs",
]

MAX_BASE_ORDER = 4096  # the m x m factor costs m multiply-adds per element; beyond this, refuse.
_KERNEL_MAX_DIM = 32768  # fast_hadamard_transform supports power-of-two dims up to 2^15.
_RADIX_BITS = 6  # butterfly stages of radix up to 2^6, each one batched matmul (see _fwht).
_SHOWN_BASES = 256  # base orders listed in the "unsupported order" error message.

# First rows of the four symmetric circulant blocks A, B, C, D of Williamson matrices of orders 39 and 43
# (N. J. A. Sloane's library; QuaRot's had156 / had172 are exactly the Williamson arrays built from them).
_WILLIAMSON = {
    156: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    172: (
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++---++++-+--+--++--------++--+--+-++++---+",
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Finite fields (for Paley constructions over prime powers q = p^e, e.g. 9, 25, 27, 243, 343)
# ---------------------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q, e = q // p, e + 1
    return (p, e) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """``a mod f`` over GF(p); coefficient lists, lowest degree first, ``f`` monic."""
    a, deg = list(a), len(f) - 1
    for top in range(len(a) - 1, deg - 1, -1):
        c = a[top]
        for i, fi in enumerate(f):
            a[top - deg + i] = (a[top - deg + i] - c * fi) % p
    return a[:deg]


def _monic(p: int, degree: int) -> list[list[int]]:
    """All monic polynomials of the given degree over GF(p)."""
    return [[*low, 1] for low in itertools.product(range(p), repeat=degree)]


def _irreducible(p: int, e: int) -> list[int]:
    """A monic irreducible polynomial of degree e over GF(p): GF(p^e) = GF(p)[x] / (f)."""
    for f in _monic(p, e):
        divisors = (g for d in range(1, e // 2 + 1) for g in _monic(p, d))
        if all(any(_poly_mod(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # cannot happen


def _digits(p: int, e: int) -> np.ndarray:
    """Element ``i`` of GF(p^e) as its e base-p digits = polynomial coefficients, shape (q, e)."""
    return np.arange(p**e)[:, None] // p ** np.arange(e)[None, :] % p


def _is_square(p: int, e: int) -> np.ndarray:
    """Boolean mask over GF(p^e) of the nonzero squares (the quadratic residues)."""
    f, digits = np.array(_irreducible(p, e)), _digits(p, e)
    square = np.zeros((p**e, 2 * e - 1), dtype=np.int64)
    for i, j in itertools.product(range(e), repeat=2):
        square[:, i + j] += digits[:, i] * digits[:, j]
    for top in range(2 * e - 2, e - 1, -1):  # reduce modulo the monic f, from the top degree down
        square[:, top - e : top + 1] -= (square[:, top] % p)[:, None] * f
    mask = np.zeros(p**e, dtype=bool)
    mask[(square[:, :e] % p) @ p ** np.arange(e)] = True
    mask[0] = False
    return mask


def _jacobsthal_sum(q: int) -> tuple[np.ndarray, np.ndarray]:
    """``K[i, j] = chi(x_i + x_j)`` (quadratic character of a sum, 0 for zero) and the mask ``x_i + x_j = 0``.

    Indexing by sums instead of the textbook differences makes both Paley constructions symmetric."""
    p, e = _prime_power(q)
    digits = _digits(p, e).astype(np.int32)
    total = np.zeros((q, q), dtype=np.int32)
    for d in range(e):
        total += np.add.outer(digits[:, d], digits[:, d]) % p * p**d
    chi = np.where(_is_square(p, e), 1, -1).astype(np.int8)
    chi[0] = 0
    return chi[total], total == 0


# ---------------------------------------------------------------------------------------------------------
# Base matrices
# ---------------------------------------------------------------------------------------------------------


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q = 3 (mod 4): the skew Paley matrix times signed permutations, made symmetric."""
    k, zero = _jacobsthal_sum(q)
    h = np.ones((q + 1, q + 1), dtype=np.int8)
    h[1:, 1:] = -k - zero
    return h


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q = 1 (mod 4): ``kron(C, [[1, 1], [1, -1]]) + kron(Z, [[1, -1], [-1, -1]])`` with
    the symmetric conference matrix C = [[0, 1], [1, K]] and Z the (permutation) pattern of its zeros."""
    k, zero = _jacobsthal_sum(q)
    c = np.ones((q + 1, q + 1), dtype=np.int8)
    c[0, 0] = 0
    c[1:, 1:] = k
    z = np.zeros((q + 1, q + 1), dtype=np.int8)
    z[0, 0] = 1
    z[1:, 1:] = zero
    plus, minus = np.array([[1, 1], [1, -1]], np.int8), np.array([[1, -1], [-1, -1]], np.int8)
    return np.kron(c, plus) + np.kron(z, minus)


def _circulant(first: np.ndarray) -> np.ndarray:
    """Circulant matrix whose row i is ``first`` rotated right by i."""
    n = len(first)
    return first[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def _williamson(m: int) -> np.ndarray:
    """Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]] (QuaRot's layout)."""
    rows = (np.array([1 if s == "+" else -1 for s in row], np.int8) for row in _WILLIAMSON[m])
    a, b, c, d = (_circulant(row) for row in rows)
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _construction(m: int) -> str | None:
    """Name of the construction giving a Hadamard matrix of base order m, or None."""
    if m in _WILLIAMSON:
        return "williamson"
    if m % 4 or m > MAX_BASE_ORDER:
        return None
    if _prime_power(m - 1):
        return "paley1"
    if m % 8 == 4 and _prime_power(m // 2 - 1):
        return "paley2"
    return None


@functools.cache
def _base_matrix(m: int) -> torch.Tensor:
    """The m x m base factor as a float32 CPU tensor (cached; never handed out without a copy)."""
    kind = _construction(m)
    if m == 1:
        h = np.ones((1, 1), np.int8)
    elif kind == "paley1":
        h = _paley1(m - 1)
    elif kind == "paley2":
        h = _paley2(m // 2 - 1)
    elif kind == "williamson":
        h = _williamson(m)
    else:
        raise ValueError(f"no construction for base order {m}")
    with torch.inference_mode(False):
        return torch.from_numpy(h.astype(np.float32))


def _sylvester(p: int) -> torch.Tensor:
    """Sylvester matrix of order p = 2^k: H_2p = [[H_p, H_p], [H_p, -H_p]] (large ones as one Kronecker)."""
    if p > 64:
        return torch.kron(_sylvester(64), _sylvester(p // 64))
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _find_base(n: int) -> int | None:
    """Smallest constructible base order m with n = m * 2^k, or None."""
    if n < 1:
        return None
    twos = (n & -n).bit_length() - 1
    odd = n >> twos
    if odd == 1:
        return 1
    return next((odd << j for j in range(2, twos + 1) if _construction(odd << j)), None)


def has_hadamard(n: int) -> bool:
    """Whether :func:`hadamard_matrix` and :func:`hadamard_transform` support order n."""
    return _find_base(n) is not None


def base_order(n: int) -> int:
    """Base order m of n = m * 2^k (1 for powers of two); ValueError naming n if none is known."""
    m = _find_base(n)
    if m is not None:
        return m
    if n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n}")
    twos = (n & -n).bit_length() - 1
    shown = [1] + [b for b in range(4, _SHOWN_BASES + 1, 4) if _find_base(b) == b]
    raise ValueError(
        f"no Hadamard matrix of order {n} is known to quept_hf: {n} = 2^{twos} * {n >> twos}; "
        f"supported orders are 2^k * m for m in {shown} (shown up to {_SHOWN_BASES}; in general m = q + 1 "
        f"or 2(q + 1) for a prime power q (Paley), or a Williamson order {sorted(_WILLIAMSON)}, "
        f"with m <= {MAX_BASE_ORDER})"
    )


# ---------------------------------------------------------------------------------------------------------
# Public matrices
# ---------------------------------------------------------------------------------------------------------


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Unnormalized n x n Hadamard matrix ``kron(H_m, S_{2^k})``: entries +-1, ``H @ H.T == n * I``."""
    m = base_order(n)
    factors = (f.to(dtype=dtype, device=device) for f in (_base_matrix(m), _sylvester(n // m)))
    return torch.kron(*factors)  # entries are +-1: exact in every dtype, built where it is needed


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    """Seeded random +-1 vector (float32, CPU; same on every device), the diagonal of QuaRot's sign flips."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def random_hadamard_matrix(
    n: int, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthogonal ``Q = H @ diag(s) / sqrt(n)`` with seeded random signs s, as QuaRot rotates the residual.

    Random signs decorrelate the rotation from the data while keeping it cheap to apply:
    ``x @ Q.T == hadamard_transform(x * random_signs(n, seed))``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q = hadamard_matrix(n, dtype=work) * random_signs(n, seed).to(work) / math.sqrt(n)
    return q.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _factor(m: int, device: torch.device, dtype: torch.dtype, transpose: bool) -> torch.Tensor:
    """The m x m base factor on a device (cached; a normal tensor even if first built in inference mode)."""
    with torch.inference_mode(False):
        h = _base_matrix(m)
        return (h.T if transpose else h).to(device=device, dtype=dtype).contiguous()


@functools.lru_cache(maxsize=64)
def _sylvester_factor(r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The r x r Sylvester butterfly block on a device (cached like :func:`_factor`)."""
    with torch.inference_mode(False):
        return _sylvester(r).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=1)
def _kernel() -> ModuleType | None:
    """The optional ``fast_hadamard_transform`` CUDA kernel module, or None if it does not import."""
    try:
        import fast_hadamard_transform
    except (ImportError, OSError):
        return None
    return fast_hadamard_transform


def _stage_bits(k: int) -> list[int]:
    """Split k Sylvester bits into as few near-equal butterfly stages of <= _RADIX_BITS bits as possible."""
    stages = -(-k // _RADIX_BITS)
    return [k // stages + (i < k % stages) for i in range(stages)]


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Sylvester-ordered Walsh-Hadamard transform along the last axis (p = 2^k).

    A radix-<=64 butterfly: ``S_p = S_r1 kron S_r2 kron ...``, and each stage applies one small ``S_r`` along
    its own axis of a reshaped view as a single batched matmul. That is ceil(k / 6) memory passes instead of
    the k elementwise passes of radix 2 (6-15x faster on CPU) at the same O(p log p) cost class.
    """
    shape, p = x.shape, x.shape[-1]
    after = p  # size of the axes to the right of the current stage's axis
    for bits in _stage_bits(p.bit_length() - 1):
        r = 1 << bits
        after //= r
        s = _sylvester_factor(r, x.device, x.dtype)
        if after == 1:
            x = x.reshape(*shape[:-1], p // r, r) @ s  # S is symmetric: right-multiplying applies it too
        else:
            x = s @ x.reshape(*shape[:-1], p // (r * after), r, after)
    return x.reshape(shape)


def _torch_transform(x: torch.Tensor, m: int, scale: float, transpose: bool) -> torch.Tensor:
    """Pure-PyTorch path: butterfly on the 2^k axis, then the m x m factor on the m axis."""
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    n = x.shape[-1]
    y = _fwht(x.to(work).reshape(*x.shape[:-1], m, n // m))
    if m > 1:
        y = _factor(m, y.device, work, transpose) @ y
    return (y * scale).reshape(x.shape).to(x.dtype)


def _kernel_transform(x: torch.Tensor, m: int, scale: float, transpose: bool) -> torch.Tensor:
    """CUDA path (QuaRot's): kernel on the 2^k axis (fp32 math, output rounded to x.dtype), then the m x m
    factor in float32."""
    n = x.shape[-1]
    y = _kernel().hadamard_transform(x.reshape(*x.shape[:-1], m, n // m).contiguous(), scale)
    if m > 1:
        y = (_factor(m, y.device, torch.float32, transpose) @ y.float()).to(x.dtype)
    return y.reshape(x.shape)


def _use_kernel(x: torch.Tensor, p: int) -> bool:
    """The kernel handles fp32/fp16/bf16 CUDA tensors with a power-of-two part 2 <= p <= 2^15."""
    supported = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return x.is_cuda and supported and 1 < p <= _KERNEL_MAX_DIM and _kernel() is not None


def hadamard_transform(x: torch.Tensor, scale: float | None = None, *, transpose: bool = False) -> torch.Tensor:
    """``x @ H.T * scale`` along the last axis, ``H = hadamard_matrix(x.shape[-1])``, in O(n log n + n m).

    ``scale`` defaults to ``1 / sqrt(n)`` (orthogonal). ``transpose=True`` applies ``x @ H * scale`` instead,
    the inverse of the normalized transform for every order (H is symmetric except for Williamson bases).
    Uses the ``fast_hadamard_transform`` CUDA kernel when it imports and x is on CUDA, else pure PyTorch;
    half-precision inputs are computed in float32 and cast back.
    """
    if not x.is_floating_point():
        raise TypeError(f"hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    m = base_order(n)
    scale = 1.0 / math.sqrt(n) if scale is None else float(scale)
    if _use_kernel(x, n // m):
        return _kernel_transform(x, m, scale, transpose)
    return _torch_transform(x, m, scale, transpose)

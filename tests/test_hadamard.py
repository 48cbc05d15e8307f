"""Hadamard matrices and transforms (quept_hf.nn.hadamard): orthogonality, ordering, dtypes, errors."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from quept_hf.nn import hadamard as had
from quept_hf.nn.hadamard import (
    base_order,
    hadamard_matrix,
    hadamard_transform,
    has_hadamard,
    random_hadamard_matrix,
    random_signs,
)

BASES = [12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172]
WILLIAMSON = (156, 172)  # the only non-symmetric bases
COMPOSITE = [12, 24, 36, 40, 44 * 8, 576, 1536, 156 * 2, 172 * 4, 108 * 2]
POW2 = [1, 2, 4, 8, 64, 1024]


def _assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n))  # integer sums < 2^24: exact in float32


def _symmetric(n: int) -> bool:
    return base_order(n) not in WILLIAMSON


# ------------------------------------------------------------------------------------------------ matrices


@pytest.mark.parametrize("n", [2**k for k in range(11)])
def test_powers_of_two_are_hadamard(n: int) -> None:
    h = hadamard_matrix(n)
    _assert_hadamard(h)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("n", [1, 2, 8, 256])
def test_powers_of_two_are_sylvester(n: int) -> None:
    h = hadamard_matrix(n)
    i = torch.arange(n)
    popcount = sum(((i[:, None] & i[None, :]) >> b) & 1 for b in range(max(n.bit_length(), 1)))
    assert torch.equal(h, 1.0 - 2.0 * (popcount % 2))  # scipy.linalg.hadamard / fast_hadamard_transform order


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("m", BASES)
def test_supported_bases_are_hadamard(m: int, k: int) -> None:
    h = hadamard_matrix(m << k)
    _assert_hadamard(h)
    assert torch.equal(h, h.T) == _symmetric(m << k)


@pytest.mark.parametrize(("n", "m"), [(576, 36), (1536, 12), (40, 20), (11008, 172), (4096, 1), (368, 368)])
def test_base_order(n: int, m: int) -> None:
    assert base_order(n) == m
    assert has_hadamard(n)


def test_every_constructible_base_up_to_256() -> None:
    bases = [m for m in range(4, 257, 4) if had._construction(m)]
    assert {had._construction(m) for m in bases} == {"paley1", "paley2", "williamson"}
    for m in bases:
        h = had._base_matrix(m)
        _assert_hadamard(h)
        assert torch.equal(h, h.T) == (m not in WILLIAMSON)


@pytest.mark.parametrize(
    ("build", "q"),
    [(had._paley1, q) for q in (27, 243, 343)] + [(had._paley2, q) for q in (9, 25, 81, 121, 125)],
)
def test_paley_over_prime_powers(build: Callable[[int], np.ndarray], q: int) -> None:
    """GF(p^e) arithmetic (irreducible polynomials of degree 2, 3, 4, 5) gives symmetric Hadamard matrices."""
    h = torch.from_numpy(build(q)).float()
    _assert_hadamard(h)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("n", [576, 1536])
def test_model_sizes_are_hadamard(n: int) -> None:
    _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", [4096, 11008])
def test_large_model_sizes_rows(n: int) -> None:
    """4096 and 11008 = 172 * 64 (LLaMA-2-7B): full Gram matrices are too slow, so check 16 spread-out rows
    (hitting every Williamson block) against all rows."""
    h = hadamard_matrix(n)
    rows = torch.linspace(0, n - 1, 16).long()
    expected = torch.zeros(len(rows), n)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(h[rows].abs(), torch.ones(len(rows), n))
    assert torch.equal(h[rows] @ h.T, expected)


def test_williamson_matches_quarot_rows() -> None:
    """QuaRot's had172 starts with the Williamson blocks' first rows and ends with [-D, -C, B, A]."""
    h = hadamard_matrix(172)
    first = torch.tensor([1.0 if s == "+" else -1.0 for s in "".join(had._WILLIAMSON[172])])
    assert torch.equal(h[0], first)
    a, b, c, d = first.split(43)
    assert torch.equal(h[-1], torch.cat([-d, -c, b, a]).view(4, 43).roll(-1, dims=1).flatten())


def test_matrix_dtype_device_and_copy() -> None:
    h = hadamard_matrix(12, dtype=torch.float16, device="cpu")
    assert h.dtype == torch.float16
    h.fill_(0)  # callers may mutate their copy without touching the cache
    _assert_hadamard(hadamard_matrix(12))


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(("n", "factored"), [(184, "184 = 2^3 * 23"), (6, "6 = 2^1 * 3"), (3, "3 = 2^0 * 3")])
def test_unknown_order_error(n: int, factored: str) -> None:
    assert not has_hadamard(n)
    with pytest.raises(ValueError, match=f"no Hadamard matrix of order {n} is known") as info:
        hadamard_matrix(n)
    assert factored in str(info.value)
    assert "[1, 12, 20, 28, 36, 44, 52, 60," in str(info.value)
    with pytest.raises(ValueError, match=f"order {n}"):
        hadamard_transform(torch.zeros(2, n))


def test_nonpositive_order_error() -> None:
    with pytest.raises(ValueError, match="positive"):
        hadamard_matrix(0)


def test_integer_input_rejected() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        hadamard_transform(torch.ones(4, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------ transform


@pytest.mark.parametrize("n", POW2 + COMPOSITE)
def test_transform_matches_matrix(n: int) -> None:
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ h.T / math.sqrt(n), rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, scale=1.0), x @ h.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(hadamard_transform(x, transpose=True), x @ h / math.sqrt(n), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", POW2 + COMPOSITE + [4096, 11008])
def test_transform_inverse(n: int) -> None:
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthogonal
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, rtol=1e-5, atol=1e-5)
    if _symmetric(n):  # H = H^T: the normalized transform is an involution
        torch.testing.assert_close(hadamard_transform(y), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 576, 172 * 8])
def test_half_precision(dtype: torch.dtype, n: int) -> None:
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    y = hadamard_transform(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    # computed in float32, one rounding on the way in and one on the way out
    torch.testing.assert_close(y.float(), hadamard_transform(x.to(dtype).float()), rtol=1e-2, atol=2e-2)
    back = hadamard_transform(y, transpose=True)
    torch.testing.assert_close(back.float(), x, rtol=5e-2, atol=5e-2)


def test_transform_shapes_and_gradient() -> None:
    assert hadamard_transform(torch.zeros(0, 3, 24)).shape == (0, 3, 24)
    x = torch.randn(2, 36, requires_grad=True)
    g = torch.randn(2, 36)
    (hadamard_transform(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, hadamard_transform(g, transpose=True))


def test_transform_inside_inference_mode_then_autograd() -> None:
    with torch.inference_mode():
        hadamard_transform(torch.randn(2, 5 * 8))  # fills the device-factor caches in inference mode
    x = torch.randn(2, 5 * 8, requires_grad=True)
    hadamard_transform(x).sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------------------ random


@pytest.mark.parametrize("n", [64, 576, 172])
def test_random_hadamard(n: int) -> None:
    q = random_hadamard_matrix(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n), rtol=0, atol=1e-5)
    assert torch.equal(q, random_hadamard_matrix(n, seed=3))
    assert not torch.equal(q, random_hadamard_matrix(n, seed=4))
    signs = random_signs(n, seed=3)
    torch.testing.assert_close(q, hadamard_matrix(n) * signs / math.sqrt(n))
    x = torch.randn(3, n)
    torch.testing.assert_close(x @ q.T, hadamard_transform(x * signs), rtol=1e-5, atol=1e-5)


def test_random_hadamard_dtype() -> None:
    q = random_hadamard_matrix(48, seed=0, dtype=torch.float64)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ CUDA


def _reference_kernel(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Stand-in for fast_hadamard_transform.hadamard_transform: F.linear(x, scipy's hadamard) * scale."""
    return (x.float() @ had._sylvester(x.shape[-1]).T * scale).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 12 * 16, 172 * 4])
def test_kernel_path_layout_on_cpu(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, n: int) -> None:
    """The CUDA path's reshape / factor order, run on CPU with a reference kernel."""
    monkeypatch.setattr(had, "_kernel", lambda: SimpleNamespace(hadamard_transform=_reference_kernel))
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    for transpose in (False, True):
        got = had._kernel_transform(x, base_order(n), 1 / math.sqrt(n), transpose)
        assert got.dtype == dtype and got.shape == x.shape
        expected = hadamard_transform(x, transpose=transpose)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


_HAS_KERNEL = importlib.util.find_spec("fast_hadamard_transform") is not None


@pytest.mark.skipif(
    not (torch.cuda.is_available() and _HAS_KERNEL),
    reason="the fast_hadamard_transform CUDA path needs a GPU and the fast-hadamard-transform package",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 4096, 12, 576, 1536, 11008])
def test_cuda_kernel_matches_torch_path(dtype: torch.dtype, n: int) -> None:
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert had._use_kernel(x.cuda(), n // base_order(n))
    for transpose in (False, True):
        expected = hadamard_transform(x, transpose=transpose).float()  # CPU: the pure-PyTorch path
        got = hadamard_transform(x.cuda(), transpose=transpose)
        assert got.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got.float().cpu(), expected, rtol=tol, atol=tol)

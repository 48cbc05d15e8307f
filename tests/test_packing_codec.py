"""Tests for the dense row-wise integer codec in ``quept_hf.packing.codec``."""

from __future__ import annotations

import pytest
import torch

from quept_hf.packing.codec import pack, packed_cols, unpack

ALL_BITS = range(2, 9)
SHAPES = [(r, c) for r in (1, 3, 64) for c in (1, 7, 13, 576, 1537)]


def _reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Obviously-correct per-row bit stream: code j at bits [j*bits, (j+1)*bits), little-endian."""
    rows, cols = codes.shape
    n_bytes = (cols * bits + 7) // 8
    out = torch.empty(rows, n_bytes, dtype=torch.uint8)
    for r, row in enumerate(codes.tolist()):
        stream = 0
        for j, code in enumerate(row):
            stream |= code << (j * bits)
        out[r] = torch.tensor(list(stream.to_bytes(n_bytes, "little")), dtype=torch.uint8)
    return out


def _random_codes(rows: int, cols: int, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(bits * 100_000 + rows * 10_000 + cols)
    return torch.randint(0, 1 << bits, (rows, cols), generator=gen).to(dtype)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_matches_reference_and_round_trips(bits: int, shape: tuple[int, int]) -> None:
    rows, cols = shape
    codes = _random_codes(rows, cols, bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_cols(cols, bits))
    # The reference is a slow Python loop, so check byte-exactness on a few rows of big inputs.
    sample = codes[:3]
    assert torch.equal(packed[:3], _reference_pack(sample, bits))
    restored = unpack(packed, bits, cols)
    assert restored.dtype == torch.uint8
    assert restored.shape == (rows, cols)
    assert torch.equal(restored, codes)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_extreme_codes_round_trip(bits: int) -> None:
    """All-ones codes exercise every bit of every block (sign bits of the int32/int64 words included)."""
    max_code = (1 << bits) - 1
    for cols in (1, 8, 9, 17):
        codes = torch.full((2, cols), max_code, dtype=torch.uint8)
        codes[1, ::2] = 0
        packed = pack(codes, bits)
        assert torch.equal(packed, _reference_pack(codes, bits))
        assert torch.equal(unpack(packed, bits, cols), codes)


@pytest.mark.parametrize(
    ("cols", "bits", "expected"),
    [
        (8, 3, 3),
        (8, 5, 5),
        (8, 7, 7),
        (4, 6, 3),
        (1, 3, 1),
        (3, 3, 2),
        (9, 3, 4),
        (576, 2, 144),
        (576, 3, 216),
        (576, 5, 360),
        (1537, 7, 1345),
        (13, 8, 13),
        (0, 4, 0),
    ],
)
def test_packed_byte_counts(cols: int, bits: int, expected: int) -> None:
    assert packed_cols(cols, bits) == expected
    assert pack(torch.zeros(2, cols, dtype=torch.uint8), bits).shape == (2, expected)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_accepted_and_input_untouched(dtype: torch.dtype) -> None:
    for bits in (2, 3, 7):
        codes = _random_codes(5, 11, bits, dtype=dtype)
        before = codes.clone()
        packed = pack(codes, bits)
        assert torch.equal(codes, before)
        assert torch.equal(unpack(packed, bits, 11), codes.to(torch.uint8))


def test_rows_are_independent() -> None:
    """Slicing packed rows equals packing the sliced rows: needed for sharding by output channel."""
    codes = _random_codes(6, 13, 5)
    assert torch.equal(pack(codes, 5)[2:4], pack(codes[2:4], 5))


def test_non_contiguous_inputs() -> None:
    codes = _random_codes(16, 24, 3).t()  # (24, 16), non-contiguous
    packed = pack(codes, 3)
    assert torch.equal(packed, _reference_pack(codes.contiguous(), 3))
    wide = torch.zeros(24, 2 * packed.shape[1], dtype=torch.uint8)
    wide[:, ::2] = packed
    assert torch.equal(unpack(wide[:, ::2], 3, 16), codes)


def test_empty_inputs() -> None:
    assert pack(torch.zeros(0, 5, dtype=torch.uint8), 3).shape == (0, 2)
    assert pack(torch.zeros(3, 0, dtype=torch.uint8), 3).shape == (3, 0)
    assert unpack(torch.zeros(3, 0, dtype=torch.uint8), 3, 0).shape == (3, 0)


@pytest.mark.parametrize("bits", [1, 9, 0, -2, 3.0, True, "4"])
def test_invalid_bits(bits: object) -> None:
    codes = torch.zeros(2, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        pack(codes, bits)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        unpack(codes, bits, 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        packed_cols(8, bits)  # type: ignore[arg-type]


def test_codes_out_of_range() -> None:
    codes = torch.tensor([[0, 1, 9, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"found max value 9, allowed max is 7"):
        pack(codes, 3)
    with pytest.raises(ValueError, match=r"found min value -1"):
        pack(torch.tensor([[0, -1]], dtype=torch.int64), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_codes_wrong_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=r"codes must have an integer dtype"):
        pack(torch.zeros(2, 4, dtype=dtype), 4)


@pytest.mark.parametrize("shape", [(8,), (2, 2, 2)])
def test_codes_wrong_ndim(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"codes must be 2-D"):
        pack(torch.zeros(shape, dtype=torch.uint8), 4)


def test_codes_not_a_tensor() -> None:
    with pytest.raises(ValueError, match=r"codes must be a torch.Tensor"):
        pack([[1, 2]], 4)  # type: ignore[arg-type]


def test_unpack_validation() -> None:
    packed = pack(_random_codes(2, 8, 3), 3)  # (2, 3)
    with pytest.raises(ValueError, match=r"packed has 3 bytes per row but cols=9 at bits=3 requires 4"):
        unpack(packed, 3, 9)
    with pytest.raises(ValueError, match=r"requires 5"):
        unpack(packed, 5, 8)
    with pytest.raises(ValueError, match=r"packed must have dtype torch.uint8"):
        unpack(packed.to(torch.int32), 3, 8)
    with pytest.raises(ValueError, match=r"packed must be 2-D"):
        unpack(packed.reshape(-1), 3, 8)
    with pytest.raises(ValueError, match=r"cols must be a non-negative integer"):
        unpack(packed, 3, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("bits", ALL_BITS)
def test_cuda_matches_cpu(bits: int) -> None:
    codes = _random_codes(33, 1537, bits)
    packed_gpu = pack(codes.cuda(), bits)
    assert packed_gpu.is_cuda
    assert torch.equal(packed_gpu.cpu(), pack(codes, bits))
    assert torch.equal(unpack(packed_gpu, bits, 1537).cpu(), codes)

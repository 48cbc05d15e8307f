"""Low-bit CPU matmul kernels for frozen QuEPT layers: the integer codes in the layout of PyTorch's own kernels.

A frozen layer's reference forward is ``F.linear(x, s * (q - z))``: it reads a float weight, 4 bytes per weight
per token. PyTorch ships CPU kernels that read 4- or 8-bit weights and dequantize in registers, so decoding (a
few tokens, memory bound) reads 4-8x fewer bytes. They are fast with bf16 activations only (with fp32 or fp16
activations the same ops were 8-35x SLOWER than fp32 ``F.linear`` here), so every kernel converts the input to
bf16 and the result back to ``x.dtype``. Measured (``benchmarks/lowbit_kernels.py``, weights out of cache as in
a model, against fp32 ``F.linear`` on the cached dequantized weight): one token decodes 3.2-3.7x faster with int4
on SmolLM2's MLP shapes (2.8x at 576x576, 1.8x at 576->192, 3.3-5x at 4096x4096), 1.3-1.6x with int8 (2.5x at
4096x4096) and 1.4-1.9x with int4x2; the smallest layers gain least, a call's fixed ~15 us dominating.

Which kernel (`kernel_support` says why none):

* ``"int4pack"`` (2..4 bits; grouped, or per-channel split into groups of the largest of 256/128/64/32 dividing
  ``in_features``): ``torch.ops.aten._weight_int4pack_mm_for_cpu``, whose per-group weight is
  ``(u - 8) * scale + zero`` for a nibble ``u``. QuEPT's ``s * (q - z)`` maps to ``u = q + c``, ``zero = s * (8 -
  c - z)`` with a per-group shift ``c = clamp(8 - z, 0, 16 - 2^b)``: below 4 bits that makes ``zero`` exactly 0
  (no bf16 rounding of a zero term that cancels most of the weight). Needs ``out_features % 16 == 0`` and
  QuEPT groups that split into kernel groups: ``gcd(group_size, in_features)`` a multiple of 32, so a partial
  last group works when it is one (SmolLM2's 576 columns in groups of 128: kernel groups of 64).
* ``"int8pack"`` (per-channel, any width, ``in_features % 16 == 0``; 5..8 bits, and 2..4-bit shapes int4
  rejects): ``torch.ops.aten._weight_int8pack_mm`` (``x @ (w * scale).T``) on ``w = q - c`` (int8) with a per-row
  shift ``c = clamp(z, 2^b - 128, 128)``. Below 8 bits that is ``z`` itself (unless ``z`` lies ~100 levels off
  the code range), so ``s * (q - z)`` needs no correction; otherwise (8 bits, ``z != 128``) a rank-1 term
  ``sum(x) * s * (c - z)`` is added in fp32.
* ``"int4x2pack"`` (grouped 5..8 bits, which int8 cannot scale per group): the shifted code ``u = q - c + 136``
  in [0, 255] is split into two nibbles, ``q - z = 16 (hi - 8) + (lo - 8) + (c - z)``, and ONE int4 matmul runs
  on the input repeated twice along K (``[x, x] @ [hi part | lo part].T``): twice the int4 work, still a quarter
  of fp32's bytes, and one fp32 accumulation.

Prefill (many tokens) is compute bound: at 64 tokens the int4 op runs at 0.6-0.8x fp32 ``F.linear`` and bf16
``F.linear`` (AMX, oneDNN) is 3-5x faster than it. So above ``max_tokens`` rows a kernel decodes its own weight
to bf16 for that call, a slab of rows at a time (`LowBitKernel.dense_weight`; ``"int8pack"`` and per-channel
``"int4pack"`` only cast their codes and scale the output) and runs bf16 ``F.linear``; the defaults
(`MAX_TOKENS`) are the crossovers measured on this project's 2-core AVX512 machine (the same at 1 and 2 threads).
The decode costs about one fp32 pass over the weight, so from a few hundred tokens on this path beats even fp32
``F.linear`` on a cached weight.

Numerics: bf16 activations, bf16 scales and zero terms, fp32 accumulation, a bf16 result. Each is one rounding
of relative size 2^-9, so outputs match the float64 reference to under 1% of their largest magnitude, about what
bf16 ``F.linear`` on the dequantized weight gives (``tests/test_kernels.py`` asserts 2e-2). Inference only: the ops
have no autograd formula.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..nn.functional import num_groups
from .codec import MAX_BITS, MIN_BITS

__all__ = [
    "INT4_GROUP_SIZES",
    "MAX_TOKENS",
    "Int4Kernel",
    "Int8Kernel",
    "LowBitKernel",
    "kernel_support",
    "prepare_kernel",
]

# Group sizes the int4 kernel accepts, largest first: fewer scale loads per row is faster.
INT4_GROUP_SIZES = (256, 128, 64, 32)
# Rows of x above which decoding the weight to bf16 + bf16 F.linear beats the low-bit kernel (measured crossovers,
# benchmarks/lowbit_kernels.py): int8's dense form is a cast, int4's an unpack + dequantize, so theirs differ.
MAX_TOKENS = {"int4pack": 80, "int4x2pack": 64, "int8pack": 16}
_DENSE_SLAB = 1 << 20  # weights decoded per step of the dense path: 2 MiB of bf16, about one core's L2
_OFFSET = 136  # 16 * 8 + 8: the two-nibble split's offset, so that 16 (hi - 8) + (lo - 8) = u - 136


def _ops_available() -> bool:
    """The CPU ops exist in this torch build (2.5 and later)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_weight_int8pack_mm")


def _kernel_group(span: int) -> int | None:
    """Largest int4 group size dividing ``span`` (a QuEPT group, or the whole row for per-channel)."""
    return next((g for g in INT4_GROUP_SIZES if span % g == 0), None)


def kernel_support(
    out_features: int, in_features: int, bits: int, group_size: int, device: torch.device | str = "cpu"
) -> tuple[str | None, str]:
    """``(kernel name, reason)``: the kernel `prepare_kernel` builds, or ``None`` and why (for logging)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        return None, f"bits={bits!r} is outside {MIN_BITS}..{MAX_BITS}"
    if torch.device(device).type != "cpu":
        return None, f"only CPU kernels are wired (device {device})"
    if not _ops_available():
        return None, f"torch {torch.__version__} lacks the int4/int8 CPU matmul ops"
    if num_groups(in_features, group_size) == 1:
        if bits <= 4 and out_features % 16 == 0 and _kernel_group(in_features) is not None:
            return "int4pack", "per-channel, int4"
        if in_features % 16:  # the AVX512 int8 kernel steps K by 16 with aligned loads: other K read past rows
            return None, f"in_features={in_features} is not a multiple of 16 (int8 kernel)"
        return "int8pack", "per-channel, int8"
    if _kernel_group(math.gcd(group_size, in_features)) is None:
        last = in_features % group_size or group_size
        return None, (
            f"group_size={group_size} (last group {last} of in_features={in_features}) is not a multiple of 32: "
            f"int4 kernel groups are {INT4_GROUP_SIZES}"
        )
    if out_features % 16:
        return None, f"out_features={out_features} is not a multiple of 16 (int4 kernel)"
    return ("int4pack", "grouped, int4") if bits <= 4 else ("int4x2pack", "grouped 5..8 bits, two int4 nibbles")


# ------------------------------------------------------------------------------------------------ kernels


class LowBitKernel:
    """``x (..., in) -> x @ W.T (..., out)`` in ``x.dtype``, bias not included; ``W`` is held in a low-bit layout.

    Subclasses implement `_kernel` (bf16 2-D input, the low-bit op) and `dense_weight` (bf16 ``W``, decoded for
    inputs of more than ``max_tokens`` rows, where bf16 ``F.linear`` is faster; ``None``: never).
    """

    name = "lowbit"

    def __init__(self, bits: int, out_features: int, in_features: int, max_tokens: int | None) -> None:
        self.bits, self.out_features, self.in_features = bits, out_features, in_features
        self.max_tokens = max_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding a small layer takes ~15 us in the op itself, so this wrapper keeps to a few cheap calls.
        *lead, features = x.shape
        if features != self.in_features:
            raise ValueError(f"{self.name}: input has {features} features, the weight {self.in_features}")
        rows = x.reshape(-1, features)
        count = rows.shape[0]
        if count == 0:
            return x.new_zeros(*lead, self.out_features)
        if self.max_tokens is not None and count > self.max_tokens:
            out = self._dense(rows)
        else:
            out = self._kernel(rows.to(torch.bfloat16).contiguous(), rows)
        return out.to(x.dtype).view(*lead, self.out_features)

    def _kernel(self, x_bf16: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """bf16 ``F.linear`` on the weight decoded a slab of output rows at a time: each slab is consumed while it
        is still in cache, and no layer-sized temporary is allocated (above 32 MiB glibc maps fresh pages for
        every allocation, and faulting them in cost 4-5x the matmul on a 4096x4096 layer here)."""
        x_bf16, x_sum = x.to(torch.bfloat16), x.float().sum(-1)
        step = max(64, _DENSE_SLAB // self.in_features // 64 * 64)  # whole int4 row blocks
        if step >= self.out_features:
            return self._dense_rows(x_bf16, x_sum, 0, self.out_features)
        slabs = range(0, self.out_features, step)
        return torch.cat([self._dense_rows(x_bf16, x_sum, a, min(a + step, self.out_features)) for a in slabs], -1)

    def _dense_rows(self, x_bf16: torch.Tensor, x_sum: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Output columns ``start:stop`` of the dense path (``x_sum``: the fp32 row sums of x, for zero terms)."""
        return F.linear(x_bf16, self.dense_weight(start, stop))

    def dense_weight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of the weight as bf16 ``(out, in)``, decoded from the low-bit layout (transient)."""
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        """The prepared tensors (what stays resident)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Resident bytes of the prepared weight (codes, scales, zero terms, corrections)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name}, bits={self.bits}, out={self.out_features}, in={self.in_features}, "
            f"max_tokens={self.max_tokens})"
        )


class Int8Kernel(LowBitKernel):
    """Per-channel codes as ``int8 = q - c`` for `torch.ops.aten._weight_int8pack_mm` (module docstring)."""

    name = "int8pack"

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        correction: torch.Tensor | None,
        bits: int,
        max_tokens: int | None,
    ) -> None:
        super().__init__(bits, weight.shape[0], weight.shape[1], max_tokens)
        self.weight, self.scales, self.correction = weight, scales, correction

    def _kernel(self, x_bf16: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x_bf16.data_ptr() % 64:  # the op's aligned 256-bit loads fault on an offset view (x[1:] etc.)
            x_bf16 = x_bf16.clone()
        out = torch.ops.aten._weight_int8pack_mm.default(x_bf16, self.weight, self.scales)
        return out if self.correction is None else self._corrected(out, x)

    def _dense_rows(self, x_bf16: torch.Tensor, x_sum: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # Per-channel: the scale factors out of the K sum, and int8 codes are exact in bf16, so only a cast.
        out = F.linear(x_bf16, self.weight[start:stop].to(torch.bfloat16)).float()
        out.mul_(self.scales[start:stop].float())
        return out if self.correction is None else torch.addr(out, x_sum, self.correction[start:stop])

    def _corrected(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + sum(x) (x) s * (c - z)`` in fp32: the zero point the int8 shift could not absorb."""
        return torch.addr(out.float(), x.float().sum(-1), self.correction)

    def dense_weight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        weight = self.weight[start:stop].float().mul_(self.scales[start:stop].float().unsqueeze(-1))
        if self.correction is not None:
            weight.add_(self.correction[start:stop].unsqueeze(-1))
        return weight.to(torch.bfloat16)

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scales] + ([] if self.correction is None else [self.correction])


class Int4Kernel(LowBitKernel):
    """Nibbles in `torch.ops.aten._convert_weight_to_int4pack_for_cpu`'s layout with bf16 ``(groups, out, 2)``
    scales and zero terms. ``repeat = 2``: the two-nibble form of 5..8-bit codes (the input runs twice along K)."""

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group: int,
        bits: int,
        max_tokens: int | None,
        repeat: int = 1,
        per_channel: bool = False,
    ) -> None:
        super().__init__(bits, packed.shape[0], packed.shape[1] * 2 // repeat, max_tokens)
        self.packed, self.scales_and_zeros, self.group, self.repeat = packed, scales_and_zeros, group, repeat
        self.per_channel = per_channel  # one scale and zero term per row: the dense path factors them out
        self.name = "int4pack" if repeat == 1 else "int4x2pack"
        if _int4_layout() is None:  # unknown packed layout: no dense decode, so never leave the kernel
            self.max_tokens = None

    def _kernel(self, x_bf16: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.repeat > 1:
            x_bf16 = x_bf16.repeat(1, self.repeat)
        return torch.ops.aten._weight_int4pack_mm_for_cpu.default(
            x_bf16, self.packed, self.group, self.scales_and_zeros
        )

    def _dense_rows(self, x_bf16: torch.Tensor, x_sum: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if not self.per_channel:
            return super()._dense_rows(x_bf16, x_sum, start, stop)
        # x @ (s (u - 8) + zero).T = s * (x @ (u - 8).T) + sum(x) * zero: the codes only need a cast (exact in bf16).
        signed = _unpack_int4(self.packed[start:stop], _int4_layout()).sub_(8).view(torch.int8)  # uint8 wrap-around
        out = F.linear(x_bf16, signed.to(torch.bfloat16)).float()
        scales, zero_terms = self.scales_and_zeros[0, start:stop].float().unbind(-1)
        return torch.addr(out.mul_(scales), x_sum, zero_terms)

    def dense_weight(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        packed, scales_and_zeros = self.packed[start:stop], self.scales_and_zeros[:, start:stop]
        out_features, cols = packed.shape[0], self.in_features
        nibbles, offset = _unpack_int4(packed, _int4_layout()), 8
        if self.repeat > 1:  # the two nibbles back into u = 16 hi + lo: 16 s (hi - 8) + s (lo - 8) = s (u - 136)
            nibbles = (nibbles[:, :cols] << 4).bitwise_or_(nibbles[:, cols:])
            scales_and_zeros, offset = scales_and_zeros[scales_and_zeros.shape[0] // 2 :], _OFFSET
        scales, zero_terms = scales_and_zeros.transpose(0, 1).float().unsqueeze(-1).unbind(-2)
        zero_terms = zero_terms - offset * scales  # (u - offset) s + zero = u s + (zero - offset s): one pass less
        weight = nibbles.reshape(out_features, cols // self.group, self.group).float()
        return weight.mul_(scales).add_(zero_terms).view(out_features, cols).to(torch.bfloat16)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_and_zeros]


# ------------------------------------------------------------------------------------- int4 packed layout


def _unpack_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Codes uint8 ``(N, K)`` from the op's packed ``(N, K / 2)``, as ``aten/src/ATen/native/cpu/int4mm_kernel.cpp``
    lays them out: per block of ``block`` rows, k-major bytes whose low nibbles hold the block's first half of the
    rows and high nibbles the second half; a shorter last block (and ``block == 0``: every block) pairs rows
    (low nibble row ``2j``, high ``2j + 1``)."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    flat, full = packed.reshape(-1), rows // block * block if block else 0
    parts = []
    if full:
        split = flat[: full * cols // 2].view(full // block, cols, block // 2)
        parts.append(torch.cat([split & 15, split >> 4], dim=2).transpose(1, 2).reshape(full, cols))
    if rows > full:
        paired = flat[full * cols // 2 :].view(cols, (rows - full) // 2)
        parts.append(torch.stack([paired & 15, paired >> 4], dim=2).reshape(cols, rows - full).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles ``(N, K)`` -> the op's packed ``(N, K / 2)``. Where `_int4_layout` recognised the layout and
    ``N`` fills whole blocks, in uint8 (the inverse of `_unpack_int4`): it skips the op's int32 input, a copy 4x the
    codes' size, and takes about a third of the op's time; otherwise the op itself."""
    rows, cols = nibbles.shape
    block = _int4_layout()
    if block and rows % block == 0:
        halves = nibbles.view(rows // block, 2, block // 2, cols)
        packed = (halves[:, 1] << 4).bitwise_or_(halves[:, 0])  # (blocks, block / 2, K): low nibble first half
        return packed.transpose(1, 2).contiguous().view(rows, cols // 2)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32), 2)


@functools.cache
def _int4_layout() -> int | None:
    """The row block of this build's int4 packing (64 on AVX512, 32 on AVX2, 0: plain row pairs), found by packing
    a probe once; ``None`` if no known layout reproduces it (the dense prefill path is then off)."""
    probe = torch.randint(0, 16, (64 * 2 + 48, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (probe.shape[0], probe.shape[1] // 2):
        return None
    return next((b for b in (64, 32, 0) if torch.equal(_unpack_int4(packed, b).to(torch.int32), probe)), None)


# ------------------------------------------------------------------------------------------------ prepare


def prepare_kernel(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    max_tokens: int | None = -1,
) -> LowBitKernel | None:
    """A kernel computing ``x @ (s * (q - z)).T`` from `quept_hf.nn.functional.quantize_weight_codes` output.

    ``codes`` uint8 ``(out, in)``; ``scales``/``zeros`` float ``(out, groups)``. ``None`` when no kernel supports
    the shape, width or device (`kernel_support` says why): the caller keeps its dequantize + ``F.linear`` path.
    ``max_tokens``: inputs with more rows run bf16 ``F.linear`` on the decoded weight; ``-1``: the measured
    crossover `MAX_TOKENS`; ``None``: always the low-bit kernel. Runs at every bit-width switch, so it is a few
    elementwise passes over the codes plus the op's own packing.
    """
    out_features, in_features = codes.shape
    name, _ = kernel_support(out_features, in_features, bits, group_size, codes.device)
    if name is None:
        return None
    groups = num_groups(in_features, group_size)
    if tuple(scales.shape) != (out_features, groups) or scales.shape != zeros.shape:
        raise ValueError(
            f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}: expected ({out_features}, {groups})"
        )
    if not torch.equal(zeros, zeros.round()):
        return None  # a float zero point (`QuEPTConfig(zero_point="float")`): the integer kernels' shift cannot hold it
    max_tokens = MAX_TOKENS[name] if max_tokens == -1 else max_tokens
    prepare = {"int8pack": _prepare_int8, "int4pack": _prepare_int4, "int4x2pack": _prepare_int4x2}[name]
    with torch.no_grad():  # uint8 codes: the int8 path reinterprets their bytes, so wider integers must narrow first
        return prepare(codes.to(torch.uint8), scales.float(), zeros.float(), bits, group_size, max_tokens)


def _shift_codes(codes: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``codes + shift`` per (row, equal group) in uint8 arithmetic (wraps mod 256: callers keep results in range)."""
    out_features, in_features = codes.shape
    groups = shift.shape[1]
    shift = shift.to(torch.int16).remainder(256).to(torch.uint8).unsqueeze(-1)
    return codes.reshape(out_features, groups, in_features // groups).add(shift).reshape(codes.shape)


def _prepare_int8(codes, scales, zeros, bits: int, group_size: int, max_tokens: int | None) -> Int8Kernel:
    shift = zeros.clamp(2**bits - 128, 128)
    # uint8 wrap-around then a bit reinterpretation: int8(q - c) in one pass, no wider temporary.
    weight = _shift_codes(codes, -shift).view(torch.int8)
    correction = (scales * (shift - zeros)).squeeze(1)
    correction = correction if bool(correction.any()) else None
    return Int8Kernel(weight, scales.squeeze(1).to(torch.bfloat16), correction, bits, max_tokens)


def _scales_and_zeros(scales: torch.Tensor, zero_terms: torch.Tensor) -> torch.Tensor:
    """``(out, kernel groups)`` fp32 scales and zero terms -> the op's bf16 ``(kernel groups, out, 2)``."""
    return torch.stack([scales, zero_terms], dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()


def _int4_groups(scales: torch.Tensor, zeros: torch.Tensor, in_features: int, group_size: int):
    """The kernel group and the QuEPT ``(out, groups)`` scales and zeros repeated per kernel group: a QuEPT group
    of ``group_size`` (or the whole row) spans several kernel groups, the shorter last one fewer."""
    groups = scales.shape[1]
    span = in_features if groups == 1 else group_size
    group = _kernel_group(math.gcd(span, in_features))
    spans = [span // group] * (groups - 1) + [(in_features - span * (groups - 1)) // group]
    repeats = torch.tensor(spans, device=scales.device)
    return group, scales.repeat_interleave(repeats, dim=1), zeros.repeat_interleave(repeats, dim=1)


def _prepare_int4(codes, scales, zeros, bits: int, group_size: int, max_tokens: int | None) -> Int4Kernel:
    per_channel = scales.shape[1] == 1
    group, scales, zeros = _int4_groups(scales, zeros, codes.shape[1], group_size)
    shift = (8 - zeros).clamp(0, 16 - 2**bits)
    scales = scales.to(torch.bfloat16).float()  # the zero term from the scale the kernel will use
    packed = _pack_int4(_shift_codes(codes, shift) if bits < 4 else codes)
    scales_and_zeros = _scales_and_zeros(scales, scales * (8 - shift - zeros))
    return Int4Kernel(packed, scales_and_zeros, group, bits, max_tokens, per_channel=per_channel)


def _prepare_int4x2(codes, scales, zeros, bits: int, group_size: int, max_tokens: int | None) -> Int4Kernel:
    group, scales, zeros = _int4_groups(scales, zeros, codes.shape[1], group_size)
    shift = zeros.clamp(2**bits - 1 - (255 - _OFFSET), _OFFSET)
    shifted = _shift_codes(codes, _OFFSET - shift)  # u = q - c + 136, in [0, 255]
    packed = _pack_int4(torch.cat([shifted >> 4, shifted & 15], dim=1))
    scales = scales.to(torch.bfloat16).float()
    high = _scales_and_zeros(scales * 16, torch.zeros_like(scales))
    low = _scales_and_zeros(scales, scales * (shift - zeros))
    return Int4Kernel(packed, torch.cat([high, low]), group, bits, max_tokens, repeat=2)

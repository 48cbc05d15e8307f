"""Low-bit CPU matmul kernels (`quept_hf.packing.kernels`) against F.linear on the dequantized weight.

    python benchmarks/lowbit_kernels.py --quick     # SmolLM2 shapes + 4096x4096, fewer widths and repetitions
    python benchmarks/lowbit_kernels.py             # every width config, more repetitions
    python benchmarks/lowbit_kernels.py --sweep     # token-count sweep: where the dense bf16 path overtakes
    python benchmarks/lowbit_kernels.py --threads 1 # on a machine others load: 2 threads then wait for a core

(With 2 threads on a loaded 2-core machine every parallel op can wait a scheduler slice for its second thread,
which swamps sub-millisecond timings; 1 thread gives the same ratios without that noise.)

For each layer shape (SmolLM2-135M's four, ``out x in``, plus 4096x4096), width config and token count: the time
of fp32 ``F.linear`` on a cached dequantized weight (the ``"dequantized"`` working form), bf16 ``F.linear`` on a
cached bf16 weight, the reference path without a cache (``dequantize_codes`` + fp32 ``F.linear``, the ``"none"``
form), the low-bit op alone (``lowbit``, ``max_tokens=None``) and the kernel as `prepare_kernel` builds it
(``kernel``: above ``MAX_TOKENS`` rows it decodes to bf16 and runs bf16 ``F.linear``). Two cache regimes:

* ``hot``: one weight, called repeatedly (it stays in L2/L3: a best case for the float weights);
* ``cold``: the call rotates over as many copies of the layer as make the fp32 weights exceed ``--cold-mb``
  (default 256 MiB, as a model's layers do), so every call reads its weight from memory. This is decoding.

Also ``prepare_kernel``'s cost (it runs at every bit-width switch). Prints tables and writes
``benchmarks/results/lowbit_kernels.csv`` (``--sweep``: ``lowbit_kernels_sweep.csv``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import _common as common
import torch
import torch.nn.functional as F

from quept_hf.nn.functional import num_groups
from quept_hf.packing.kernels import prepare_kernel
from quept_hf.packing.linear import dequantize_codes

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096)]  # (out, in)
# (bits, group_size): int4 grouped (QuEPT's default group 128 at <= 3 bits) and per-channel, int8 per-channel,
# the two-nibble int4x2 for grouped 5..8 bits. Speed depends on the kernel, not on the width within it.
CONFIGS = [(3, 128), (4, 64), (4, -1), (6, -1), (8, -1), (8, 128)]
QUICK_CONFIGS = [(3, 128), (4, -1), (8, -1), (8, 128)]


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__, quick="fewer configs and repetitions (about a minute)", threads=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64], help="rows of x (default 1 64)")
    parser.add_argument("--cold-mb", type=int, default=256, help="fp32 bytes the cold regime rotates over (MiB)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions (the minimum is reported)")
    parser.add_argument("--sweep", action="store_true", help="token sweep 1..256 on SmolLM2's MLP shapes instead")
    return parser.parse_args()


def best_ms(fn: Callable[[], object], repeats: int, calls: int = 1) -> float:
    """Minimum over ``repeats`` of the mean time of one call (``fn`` makes ``calls`` calls): the least disturbed
    measurement on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times) * 1e3


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeats: int, calls: int = 1, warm: bool = True
) -> dict[str, float]:
    """`best_ms` of several functions, timed round-robin: a load spike from other processes then hits every
    variant alike instead of one block of repetitions, which keeps the speed-up ratios honest. ``warm``: each
    timed call follows an untimed one of the same function, so its weight is back in cache (the other variants'
    weights evicted it); the cold regime passes ``False`` (its rotation defeats the cache by design)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            if warm:
                fn()
            start = time.perf_counter()
            fn()
            times[label].append((time.perf_counter() - start) / calls)
    return {label: min(values) * 1e3 for label, values in times.items()}


def random_layer(out_features: int, in_features: int, bits: int, group_size: int, seed: int = 0):
    """Codes, scales and zero points shaped like `quantize_weight_codes` output (values do not affect speed)."""
    gen = torch.Generator().manual_seed(seed)
    groups = num_groups(in_features, group_size)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scales = torch.rand(out_features, groups, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(0, 2**bits, (out_features, groups), generator=gen).float()
    return codes, scales, zeros


def reference(x: torch.Tensor, codes, scales, zeros, group_size: int) -> torch.Tensor:
    """The ``"none"`` working form: dequantize on every call, then fp32 F.linear."""
    return F.linear(x, dequantize_codes(codes, scales, zeros, group_size))


def rotating(fn: Callable[[object, torch.Tensor], object], objects: list, x: torch.Tensor) -> Callable[[], None]:
    """One pass calling ``fn(obj, x)`` for every copy: each call finds its weight out of cache."""

    def run() -> None:
        for obj in objects:
            fn(obj, x)

    return run


def measure(shape, config, tokens: list[int], args) -> list[dict]:
    """Every regime and token count for one (shape, width config)."""
    out_features, in_features = shape
    bits, group_size = config
    codes, scales, zeros = random_layer(out_features, in_features, bits, group_size)
    kernel = prepare_kernel(codes, scales, zeros, bits, group_size)
    if kernel is None:
        return []
    prepare_ms = best_ms(lambda: prepare_kernel(codes, scales, zeros, bits, group_size), max(3, args.repeats // 3))
    weight = dequantize_codes(codes, scales, zeros, group_size).contiguous()
    copies = max(1, args.cold_mb * 2**20 // weight.nbytes)
    variants: dict[str, tuple[list, Callable]] = {
        "fp32": ([weight.clone() for _ in range(copies)], lambda w, x: F.linear(x, w)),
        "bf16": ([weight.to(torch.bfloat16) for _ in range(copies)], lambda w, x: F.linear(x.to(torch.bfloat16), w)),
        "lowbit": (
            [prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None) for _ in range(copies)],
            lambda k, x: k(x),
        ),
        "kernel": ([prepare_kernel(codes, scales, zeros, bits, group_size) for _ in range(copies)], lambda k, x: k(x)),
    }
    rows = []
    for n in tokens:
        x = torch.randn(n, in_features)
        row = dict(shape=f"{out_features}x{in_features}", bits=bits, group=group_size, name=kernel.name, tokens=n)
        row["dequant+fp32_ms"] = best_ms(partial(reference, x, codes, scales, zeros, group_size), 5)
        for regime, count in (("hot", 1), ("cold", copies)):
            fns = {label: rotating(fn, objects[:count], x) for label, (objects, fn) in variants.items()}
            hot = count == 1
            times = interleaved_ms(fns, args.repeats if hot else max(3, args.repeats // 3), count, warm=hot)
            rows.append(dict(row, regime=regime, **{f"{k}_ms": v for k, v in times.items()}))
            rows[-1].update(
                kernel_vs_fp32=times["fp32"] / times["kernel"],
                kernel_vs_bf16=times["bf16"] / times["kernel"],
                prepare_ms=prepare_ms,
                kernel_mib=kernel.nbytes() / 2**20,
                fp32_mib=weight.nbytes / 2**20,
            )
    return rows


def sweep(args) -> list[dict]:
    """Low-bit op vs decode-to-bf16 + bf16 F.linear over token counts (hot): the crossover behind ``MAX_TOKENS``."""
    rows = []
    for shape in [(1536, 576), (576, 1536)]:
        for bits, group_size in [(4, -1), (3, 128), (8, -1), (8, 128)]:
            codes, scales, zeros = random_layer(*shape, bits, group_size)
            lowbit = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=None)
            dense = prepare_kernel(codes, scales, zeros, bits, group_size, max_tokens=0)
            weight = dequantize_codes(codes, scales, zeros, group_size)
            for n in [1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512]:
                x = torch.randn(n, shape[1])
                row = dict(shape=f"{shape[0]}x{shape[1]}", bits=bits, group=group_size, name=lowbit.name, tokens=n)
                fns = dict(lowbit=partial(lowbit, x), dense_bf16=partial(dense, x), fp32=partial(F.linear, x, weight))
                row.update({f"{k}_ms": v for k, v in interleaved_ms(fns, args.repeats).items()})
                rows.append(row)
                print(format_row(row, SWEEP_COLUMNS), flush=True)
    return rows


COLUMNS = [
    ("shape", 10, "s"),
    ("bits", 4, "d"),
    ("group", 5, "d"),
    ("name", 10, "s"),
    ("tokens", 6, "d"),
    ("regime", 6, "s"),
    ("fp32_ms", 8, ".3f"),
    ("bf16_ms", 8, ".3f"),
    ("dequant+fp32_ms", 15, ".3f"),
    ("lowbit_ms", 9, ".3f"),
    ("kernel_ms", 9, ".3f"),
    ("kernel_vs_fp32", 14, ".2f"),
    ("kernel_vs_bf16", 14, ".2f"),
    ("prepare_ms", 10, ".2f"),
]
SWEEP_COLUMNS = [*COLUMNS[:5], ("fp32_ms", 8, ".3f"), ("lowbit_ms", 9, ".3f"), ("dense_bf16_ms", 13, ".3f")]


def format_row(row: dict, columns=COLUMNS) -> str:
    return " ".join(f"{row[name]:>{width}{fmt}}" for name, width, fmt in columns)


def header(columns=COLUMNS) -> str:
    return " ".join(f"{name:>{width}}" for name, width, _ in columns)


def main() -> None:
    args = parse_args()
    common.setup(args, dict(repeats=7, cold_mb=128))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    if args.sweep:
        print(header(SWEEP_COLUMNS))
        common.write_results("lowbit_kernels_sweep", sweep(args))
        return
    rows = []
    print(header())
    for shape in SHAPES:
        for config in QUICK_CONFIGS if args.quick else CONFIGS:
            for row in measure(shape, config, args.tokens, args):
                rows.append(row)
                print(format_row(row), flush=True)
    for regime in ("hot", "cold"):
        for n in args.tokens:
            picked = [r for r in rows if r["regime"] == regime and r["tokens"] == n]
            fp32 = statistics.geometric_mean(r["kernel_vs_fp32"] for r in picked)
            bf16 = statistics.geometric_mean(r["kernel_vs_bf16"] for r in picked)
            print(
                f"{regime:>4} {n:>3} tokens: kernel speed-up, geometric mean: x{fp32:.2f} vs fp32, x{bf16:.2f} vs bf16"
            )
    common.write_results("lowbit_kernels", rows)


if __name__ == "__main__":
    main()

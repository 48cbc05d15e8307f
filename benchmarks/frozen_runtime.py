"""The frozen elastic model on SmolLM2-135M, CPU (issue 15): switch latency, size, resident memory, decode speed.

One run prints the four targets, each with its comparison:

1. switch: ``set_adapter`` alone and ``set_adapter`` + the first forward of 1 x 64 tokens, for every step of a
   sequence that visits every ordered pair of widths' neighbours, against a plain forward of those 64 tokens at
   the target width (target: <= 1.5x) and against ``from_pretrained`` of a single-bit packed checkpoint plus its
   first forward (target: >= 5x faster);
2. checkpoint size: linear-layer bytes against their fp16 bytes, (sum of kept bits) / 16 plus scales and zeros,
   and the whole file, for several kept sets;
3. resident memory (RSS of a fresh process that loads the frozen folder and runs a forward) against the kept
   codes plus the working copies, per weight form (``"kernel-all"``: one per kept width);
4. steady-state decode tokens/s (greedy ``generate``, one token at a time) at every width with the low-bit
   kernels, against the float32 model (target: >= 2x), also with the output head frozen at 8 bits
   (``freeze(head_bits=8)``), and the single-bit packed model (`PackedLinear`).

The model is the uncalibrated elastic SmolLM2 with small random MB-CLoRA deltas (as after calibration): speed and
size do not depend on calibration quality. Writes ``benchmarks/results/frozen_runtime.csv``.

    python benchmarks/frozen_runtime.py --quick    # ~5 min on 2 cores
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import MBCLoRAConfig, QuEPTConfig, assets, freeze, set_weight_form

logger = logging.getLogger("frozen_runtime")
ALL_BITS = [2, 3, 4, 5, 6, 7, 8]
KEPT_SETS = [[4], [3, 4, 8], [2, 3, 4, 8], ALL_BITS]


def parse_args():
    parser = common.parser(__doc__, quick="fewer repetitions and decode tokens", threads=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the forward after a switch")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens per generate() call")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "frozen_runtime.csv")
    return parser.parse_args()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def elastic_smollm2() -> torch.nn.Module:
    """SmolLM2 elastic at every width, with seeded small MB-CLoRA deltas (every width's delta non-zero)."""
    model = AutoModelForCausalLM.from_pretrained(
        assets.smollm2_float_dir(), dtype=torch.float32, quantization_config=QuEPTConfig()
    ).eval()
    model.add_adapter(MBCLoRAConfig())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mbclora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
    return model


# ---------------------------------------------------------------------------------------------- 1. switch


@torch.no_grad()
def switch_rows(frozen, ids, form: str, repeats: int) -> list[dict]:
    """Every step of a walk through all widths: switch alone, switch + first forward, plain forward, ratio."""
    set_weight_form(frozen, form)
    order = [b for pair in itertools.permutations(ALL_BITS, 2) for b in pair][: 2 * len(ALL_BITS) * repeats]
    rows = []
    frozen.set_adapter(f"w{order[-1]}")
    frozen(ids)
    for previous, bits in itertools.pairwise([order[-1], *order]):
        if previous == bits:
            continue
        switch = timed(lambda b=bits: frozen.set_adapter(f"w{b}"))
        first = timed(lambda: frozen(ids))
        plain = statistics.median(timed(lambda: frozen(ids)) for _ in range(3))
        rows.append(dict(form=form, step=f"w{previous}->w{bits}", switch_ms=switch, switch_forward_ms=switch + first,
                         plain_forward_ms=plain, ratio=(switch + first) / plain))  # fmt: skip
    return rows


def single_bit_load_ms(elastic, ids, tmp: Path) -> float:
    """``from_pretrained`` of the packed single-bit w4 checkpoint plus its first forward (the alternative)."""
    folder = quept_hf.export(elastic, 4, tmp / "single-w4")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            model(ids)
        times.append((time.perf_counter() - start) * 1000.0)
        del model
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ 2. size


def size_rows(frozen_dir: Path, elastic) -> list[dict]:
    """Bytes per kept set, from the saved all-width file's tensors: codes, scales+zeros, the rest, and ratios."""
    with safe_open(frozen_dir / "model.safetensors", "pt") as handle:
        tensors = {k: handle.get_slice(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no iterator)
        nbytes = {k: _slice_bytes(s) for k, s in tensors.items()}
    file_bytes = os.path.getsize(frozen_dir / "model.safetensors")
    linears = {n: m for n, m in elastic.named_modules() if isinstance(m, quept_hf.QuEPTLinear)}
    linears = {n.removeprefix("base_model.model.").replace(".base_layer", ""): m for n, m in linears.items()}
    fp16 = sum(m.in_features * m.out_features * 2 for m in linears.values())
    other = sum(v for k, v in nbytes.items() if not any(f".{kind}." in k for kind in ("qweight", "scales", "zeros")))
    header = file_bytes - sum(nbytes.values())
    rows = []
    for kept in KEPT_SETS:
        codes = sum(v for k, v in nbytes.items() if ".qweight." in k and int(k.rsplit(".", 1)[1]) in kept)
        meta = sum(
            v for k, v in nbytes.items() if (".scales." in k or ".zeros." in k) and int(k.rsplit(".", 1)[1]) in kept
        )
        rows.append(dict(kept=",".join(map(str, kept)), linear_mb=(codes + meta) / 2**20, fp16_linear_mb=fp16 / 2**20,
                         ratio_vs_fp16=(codes + meta) / fp16, target=sum(kept) / 16, scales_overhead=meta / codes,
                         file_mb=(codes + meta + other + header) / 2**20))  # fmt: skip
    return rows


def _width(key: str) -> int | None:
    """``...qweight.4`` -> 4 (None for a key of no width)."""
    tail = key.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _slice_bytes(tensor_slice) -> int:
    shape = tensor_slice.get_shape()
    element = {"U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I64": 8}[tensor_slice.get_dtype()]
    return element * math.prod(shape)


# ------------------------------------------------------------------------------------------------- 3. RSS

_RSS_PROBE = """
import json, sys, torch, transformers, quept_hf
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
before = rss()
model = AutoModelForCausalLM.from_pretrained({folder!r}).eval()
if {form!r} != "float":
    quept_hf.set_weight_form(model, {form!r})
    model.set_adapter("w{bits}")
with torch.no_grad():
    model(torch.randint(0, 1000, (1, 64)))
layers = [m for m in model.modules() if isinstance(m, quept_hf.FrozenLinear)]
print(json.dumps(dict(rss=rss() - before, kept=sum(m.storage_bytes() for m in layers),
                      working=sum(w.nbytes() for m in layers for w in m.workings.values()))))
"""


def rss_row(folder: Path, form: str, bits: int, threads: int) -> dict:
    """Resident-memory growth of a fresh process: load ``folder``, switch to ``bits`` in ``form``, one forward."""
    code = _RSS_PROBE.format(folder=str(folder), form=form, bits=bits, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    mb = {f"{k}_mb": v / 2**20 for k, v in found.items()}
    return dict(model=folder.name, form=form, bits=bits, rss_mb=mb["rss_mb"], kept_codes_mb=mb["kept_mb"],
                working_mb=mb["working_mb"])  # fmt: skip


# ---------------------------------------------------------------------------------------------- 4. decode


@torch.no_grad()
def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode speed after the prompt, one token per step (the median of two runs after a warm-up)."""
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    model.generate(prompt, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})
    prefill = timed(lambda: model.generate(prompt, **{**generate, "max_new_tokens": 1, "min_new_tokens": 1}))
    runs = [timed(lambda: model.generate(prompt, **generate)) for _ in range(2)]
    return (new_tokens - 1) / ((statistics.median(runs) - prefill) / 1000.0)


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    args = common.setup(parse_args())
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    new_tokens = 16 if args.quick else args.new_tokens
    repeats = 1 if args.quick else 3
    ids = torch.randint(0, 49152, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    load_avg = os.getloadavg()[0]
    elastic = elastic_smollm2()
    start = time.perf_counter()
    frozen = freeze(elastic)
    freeze_s = time.perf_counter() - start
    print(f"freeze(every width 2..8) took {freeze_s:.1f} s; load average {load_avg:.1f} on {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="quept-frozen-") as tmp:
        tmp = Path(tmp)
        frozen.save_pretrained(tmp / "frozen-2..8")
        freeze(elastic, bits=[3, 4, 8]).save_pretrained(tmp / "frozen-3,4,8")
        single_ms = single_bit_load_ms(elastic, ids, tmp)
        sizes = size_rows(tmp / "frozen-2..8", elastic)
        sizes.append(
            dict(kept="3,4,8 (saved)", file_mb=os.path.getsize(tmp / "frozen-3,4,8/model.safetensors") / 2**20)
        )
        elastic.save_pretrained(tmp / "elastic")
        forms = ("dequantized", "kernel", "kernel-all", "none")
        memory = [rss_row(tmp / "frozen-2..8", form, 4, args.threads) for form in forms]
        memory += [rss_row(tmp / "frozen-3,4,8", form, 4, args.threads) for form in ("kernel", "kernel-all")]
        memory.append(rss_row(Path(assets.smollm2_float_dir()), "float", 4, args.threads))

    switches = [r for form in ("dequantized", "kernel", "kernel-all") for r in switch_rows(frozen, ids, form, repeats)]

    float_model = AutoModelForCausalLM.from_pretrained(assets.smollm2_float_dir(), dtype=torch.float32).eval()
    prompt = ids[:, :16]
    float_tps = tokens_per_second(float_model, prompt, new_tokens)
    decode = [dict(model="float32", bits=16, tokens_per_s=float_tps, ratio_vs_float=1.0)]
    for form in ("kernel", "dequantized"):
        set_weight_form(frozen, form)
        for bits in ALL_BITS:
            frozen.set_adapter(f"w{bits}")
            tps = tokens_per_second(frozen, prompt, new_tokens)
            decode.append(dict(model=f"frozen ({form})", bits=bits, tokens_per_s=tps, ratio_vs_float=tps / float_tps))
    del frozen
    with_head = freeze(elastic, head_bits=8)  # the output head as 8-bit codes too (the kernel runs it)
    set_weight_form(with_head, "kernel")
    for bits in ALL_BITS:
        with_head.set_adapter(f"w{bits}")
        tps = tokens_per_second(with_head, prompt, new_tokens)
        decode.append(dict(model="frozen+head8 (kernel)", bits=bits, tokens_per_s=tps, ratio_vs_float=tps / float_tps))
    del with_head
    for bits in (3, 4, 8):
        packed = quept_hf.pack_model(elastic, bits)
        for form in ("kernel", "none"):
            set_weight_form(packed, form)
            tps = tokens_per_second(packed, prompt, new_tokens)
            decode.append(dict(model=f"packed ({form})", bits=bits, tokens_per_s=tps, ratio_vs_float=tps / float_tps))
        del packed

    report(switches, single_ms, sizes, memory, decode)
    rows = [{"table": "switch", **r} for r in switches] + [{"table": "size", **r} for r in sizes]
    rows += [{"table": "rss", **r} for r in memory] + [{"table": "decode", **r} for r in decode]
    rows.append({"table": "load", "model": "single-bit w4 packed: from_pretrained + first forward", "ms": single_ms})
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "table", k))
    common.write_results(args.out, [{k: _fmt(r.get(k)) for k in fields} for r in rows], fields=fields)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)


def report(switches, single_ms, sizes, memory, decode) -> None:
    print("\n1. switch (SmolLM2-135M, 1 x 64 tokens; ratio = (set_adapter + first forward) / plain forward)")
    for form in ("dequantized", "kernel", "kernel-all"):
        rows = [r for r in switches if r["form"] == form]
        worst = max(rows, key=lambda r: r["ratio"])
        print(f"  {form:<12} switch alone median {statistics.median(r['switch_ms'] for r in rows):7.1f} ms; switch + "
              f"first forward median {statistics.median(r['switch_forward_ms'] for r in rows):7.1f} ms; plain forward "
              f"median {statistics.median(r['plain_forward_ms'] for r in rows):7.1f} ms; ratio median "
              f"{statistics.median(r['ratio'] for r in rows):.2f}x, worst {worst['ratio']:.2f}x ({worst['step']}); "
              f"target <= 1.5x")  # fmt: skip
        speedup = single_ms / statistics.median(r["switch_forward_ms"] for r in rows)
        print(f"  {'':<12} vs from_pretrained(single-bit w4) + first forward {single_ms:.0f} ms: {speedup:.1f}x faster "
              "(target >= 5x)")  # fmt: skip
    print("\n2. size (linear layers vs their fp16 bytes; target (sum of kept bits)/16 + <= 5% for scales and zeros)")
    for r in sizes:
        if "ratio_vs_fp16" in r:
            print(f"  kept {r['kept']:<14} linears {r['linear_mb']:7.1f} MB = {r['ratio_vs_fp16']:.3f}x fp16 "
                  f"(target {r['target']:.3f}x, scales+zeros {100 * r['scales_overhead']:.1f}% of codes); whole file "
                  f"{r['file_mb']:.1f} MB (embeddings/lm_head float32)")  # fmt: skip
        else:
            print(f"  kept {r['kept']:<14} whole file {r['file_mb']:.1f} MB")
    print("\n3. resident memory growth of a fresh process (load + set_adapter('w4') + one forward)")
    for r in memory:
        print(f"  {r['model']:<14} {r['form']:<12} RSS +{r['rss_mb']:7.1f} MB; kept codes "
              f"{r['kept_codes_mb']:6.1f} MB, working copies {r['working_mb']:6.1f} MB")  # fmt: skip
    print("\n4. decode tokens/s (greedy, 1 token per step; target >= 2x float32)")
    for r in decode:
        print(f"  {r['model']:<22} w{r['bits']:<3} {r['tokens_per_s']:7.1f} tok/s  {r['ratio_vs_float']:.2f}x float32")


if __name__ == "__main__":
    main()

"""Packed low-bit SmolLM2-135M: file size, resident memory, perplexity and CPU speed per bit-width (issue 9).

    python benchmarks/packed_inference.py --quick    # short calibration, 4 held-out windows
    python benchmarks/packed_inference.py            # longer calibration, more windows

One elastic model is calibrated once (QuEPT, weight-only, bits 2..8; ``--rtn`` skips calibration: clipping at its
initial value and no MB-CLoRA delta), one mixed plan is allocated (block sensitivity, ``mixed-3.25``), then each
bit-width and the plan is exported with ``quept_hf.export`` and re-loaded with ``from_pretrained``. For every row:
the exported file size; the resident bytes of the packed linear weights (codes + scales + zeros) and of the whole
model (parameters and buffers, shared tensors once); held-out perplexity of the fake-quant model AND of the
loaded packed model (they must agree: same dequantized weights); the max |logit| difference between the two;
CPU tokens/s for a 1x256 prefill and for 32 greedy new tokens (``generate``), and their ratio to the float
model timed just before (same machine load). Also: the
elastic checkpoint (float weights + per-bit clipping + adapters: every bit-width) against one packed checkpoint
per bit-width. Writes benchmarks/results/packed_inference.csv (and .png).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common as common
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf.packing import PackedLinear, set_weight_cache

BITS = [2, 3, 4, 5, 6, 7, 8]
MIXED_TARGET = 3.25


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__, quick="short calibration and evaluation", threads=None)
    parser.add_argument("--rtn", action="store_true", help="no calibration (round-to-nearest, clip init 4.0)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=20, help="512-token held-out windows")
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens of the prefill timing")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens of the decode timing")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the median is reported)")
    parser.add_argument("--keep", default=None, help="keep the exported folders here (default: a temp folder)")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------- sizes


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix == ".safetensors")


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied embeddings)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def linear_stats(model: nn.Module) -> tuple[int, int]:
    """(packed bytes of every PackedLinear, number of weights they hold)."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    return sum(m.storage_bytes() for m in layers), sum(m.in_features * m.out_features for m in layers)


# ------------------------------------------------------------------------------------------------- speed


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # allocator and first-call overheads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def speeds(model: nn.Module, prompt: torch.Tensor, args: argparse.Namespace) -> tuple[float, float]:
    """(prefill tokens/s for the whole prompt, decode tokens/s for ``new_tokens`` greedy tokens)."""
    prefill = median_seconds(lambda: model(input_ids=prompt), args.repeats)
    short = prompt[:, :16]
    decode = median_seconds(
        lambda: model.generate(
            input_ids=short,
            attention_mask=torch.ones_like(short),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        ),
        max(1, args.repeats - 2),
        warmup=False,  # the prefill runs just before warmed the same kernels up
    )
    return prompt.shape[1] / prefill, args.new_tokens / decode


# ------------------------------------------------------------------------------------------------ the run


def elastic_model(smol: common.SmolLM2, args: argparse.Namespace) -> nn.Module:
    model = smol.load(quept_hf.QuEPTConfig(mode="weight_only", ranks=[args.rank] * 4))
    if not args.rtn:
        start = time.perf_counter()
        quept_hf.calibrate(
            model,
            smol.calib_texts,
            tokenizer=smol.tokenizer,
            epochs=args.epochs,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
        )
        print(f"calibration: {time.perf_counter() - start:.0f}s", flush=True)
    return model.eval()


def mixed_plan(model: nn.Module, tokenizer, calib_texts: list[str], args: argparse.Namespace) -> str | None:
    """``mixed-3.25`` from a block-granularity sensitivity table (None when the feature is unavailable).

    ``--quick`` measures bit-widths 2..5 only (enough for a 3.25 budget) on 2 windows of 64 tokens.
    """
    try:
        from quept_hf.mixed_precision import plan_mixed_precision
    except ImportError:
        return None
    start = time.perf_counter()
    measure = {"bits": [2, 3, 4, 5], "num_samples": 2, "seq_len": 64} if args.quick else {"num_samples": 8}
    plans = plan_mixed_precision(
        model, calib_texts, tokenizer=tokenizer, avg_bits=MIXED_TARGET, granularity="block", **measure
    )
    print(f"mixed plan: {time.perf_counter() - start:.0f}s", flush=True)
    return next(iter(plans))


@torch.no_grad()
def logits_diff(a: nn.Module, b: nn.Module, prompt: torch.Tensor) -> float:
    return (a(input_ids=prompt).logits - b(input_ids=prompt).logits).abs().max().item()


def row_for(target, model, reference, smol: common.SmolLM2, prompt, workdir: Path, args) -> dict:
    """Export ``target``, load it back, and measure it against the fake-quant model at ``target``.

    The float ``reference`` is timed right before the packed model, so the speed ratios compare runs made
    under the same machine load (on a shared machine, absolute tokens/s drift over a long run).
    """
    ppl = lambda m: smol.perplexity(m, args.eval_windows)  # noqa: E731
    quept_hf.set_bits(model, target)
    fake_ppl = ppl(model)
    name = target if isinstance(target, str) else f"w{target}"
    out = workdir / name
    quept_hf.export(model, target, out, overwrite=True)
    packed = AutoModelForCausalLM.from_pretrained(out).eval()
    linear_bytes, linear_weights = linear_stats(packed)
    float_prefill, float_decode = speeds(reference, prompt, args)
    prefill, decode = speeds(packed, prompt, args)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    avg_bits = sum(m.bits * m.in_features * m.out_features for m in layers) / linear_weights  # per weight
    row = {
        "model": name,
        "avg_bits": round(avg_bits, 3),
        "file_MB": folder_bytes(out) / 1e6,
        "linear_MB": linear_bytes / 1e6,
        "linear_vs_fp16": linear_bytes / (2 * linear_weights),
        "model_MB": tensor_bytes(packed) / 1e6,
        "ppl_fake": fake_ppl,
        "ppl_packed": ppl(packed),
        "max_logit_diff": logits_diff(model, packed, prompt),
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "prefill_vs_float": prefill / float_prefill,
        "decode_vs_float": decode / float_decode,
    }
    if target == 4:  # the memory/speed trade-off of the opt-in weight cache, once
        set_weight_cache(packed, True)
        row["decode_vs_float_cached"] = speeds(packed, prompt, args)[1] / float_decode
    del packed
    return row


def import_everything() -> None:
    """Import every quept_hf module now, so a broken import fails the run at once, not an hour into it."""
    for module in pkgutil.walk_packages(quept_hf.__path__, "quept_hf."):
        importlib.import_module(module.name)


def main() -> None:
    args = parse_args()
    import_everything()
    quick = dict(epochs=1, num_samples=8, seq_len=128, rank=8, eval_windows=4, new_tokens=16, repeats=2)
    common.setup(args, quick)
    smol = common.smollm2()
    prompt = smol.tokenizer("\n\n".join(smol.eval_texts), return_tensors="pt").input_ids[:, : args.prefill]
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="quept-packed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        reference = smol.load()
        rows = [float_row(reference, smol, prompt, args)]
        model = elastic_model(smol, args)
        model.save_pretrained(workdir / "elastic")
        elastic_mb = folder_bytes(workdir / "elastic") / 1e6
        plan = mixed_plan(model, smol.tokenizer, smol.calib_texts, args)
        for target in [*BITS, *([plan] if plan else [])]:
            rows.append(row_for(target, model, reference, smol, prompt, workdir, args))
            print(format_row(rows[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(rows, elastic_mb, args)


def float_row(model: nn.Module, smol: common.SmolLM2, prompt, args) -> dict:
    linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("lm_head")]
    weights = sum(m.weight.numel() for m in linears)
    prefill, decode = speeds(model, prompt, args)
    ppl = smol.perplexity(model, args.eval_windows)
    row = {
        "model": "float32",
        "avg_bits": 32,
        "file_MB": folder_bytes(Path(smol.folder)) / 1e6,
        "linear_MB": weights * 4 / 1e6,
        "linear_vs_fp16": 2.0,
        "model_MB": tensor_bytes(model) / 1e6,
        "ppl_fake": ppl,
        "ppl_packed": ppl,
        "max_logit_diff": 0.0,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "prefill_vs_float": 1.0,
        "decode_vs_float": 1.0,
    }
    print(format_row(row), flush=True)
    return row


# ---------------------------------------------------------------------------------------------- reporting

COLUMNS = [
    ("model", "{}"),
    ("avg_bits", "{}"),
    ("file_MB", "{:.1f}"),
    ("linear_MB", "{:.1f}"),
    ("linear_vs_fp16", "{:.3f}"),
    ("model_MB", "{:.1f}"),
    ("ppl_fake", "{:.3f}"),
    ("ppl_packed", "{:.3f}"),
    ("max_logit_diff", "{:.1e}"),
    ("prefill_tok_s", "{:.0f}"),
    ("decode_tok_s", "{:.2f}"),
    ("prefill_vs_float", "{:.2f}"),
    ("decode_vs_float", "{:.3f}"),
]


def format_row(row: dict) -> str:
    return " | ".join(fmt.format(row[key]) for key, fmt in COLUMNS)


def report(rows: list[dict], elastic_mb: float, args: argparse.Namespace) -> None:
    print("\n| " + " | ".join(key for key, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + format_row(row) + " |")
    packed_total = sum(r["file_MB"] for r in rows if r["model"] in {f"w{b}" for b in BITS})
    print(
        f"\nelastic checkpoint (every bit-width 2..8 + plans): {elastic_mb:.1f} MB; one packed checkpoint per "
        f"bit-width 2..8: {packed_total:.1f} MB in all"
    )
    cached = [r for r in rows if "decode_vs_float_cached" in r]
    if cached:
        print(f"w4 decode with the opt-in weight cache: {cached[0]['decode_vs_float_cached']:.2f}x the float model")
    setting = "RTN (no calibration)" if args.rtn else f"QuEPT calibration epochs={args.epochs}"
    print(
        f"setting: {setting}, num_samples={args.num_samples}, seq_len={args.seq_len}, rank={args.rank}; "
        f"{args.eval_windows} x 512-token held-out windows; {torch.get_num_threads()} threads"
    )
    fields = [key for key, _ in COLUMNS] + ["decode_vs_float_cached"]
    plot = common.Plot(
        "avg_bits", ["ppl_fake", "ppl_packed"], log=True, ylabel="held-out perplexity",
        title=f"packed SmolLM2-135M, {setting}", reference={"float32": rows[0]["ppl_fake"]},
        where=lambda row: row["model"] not in ("float32", "elastic (all bits)"),
    )  # fmt: skip
    elastic = {"model": "elastic (all bits)", "file_MB": elastic_mb}
    common.write_results("packed_inference", [*rows, elastic], plot, fields)


if __name__ == "__main__":
    main()

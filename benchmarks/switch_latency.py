"""Bit-switch latency of an elastic QuEPT model on SmolLM2-135M (issue 3 benchmark).

Measures, on CPU:

1. ``model.set_adapter("w{b}")`` between bit-widths INCLUDING the first forward after it (1 x 64 tokens: that
   forward pays for the new delta and the re-quantization of every layer), versus loading a separately saved
   single-bit checkpoint of the same model (the merged ``w4`` model) from disk with ``from_pretrained`` (alone,
   and followed by its own first forward);
2. the steady-state forward at a switched bit-width (quantized weights cached) versus the float model
   (1 x 256 tokens).

Prints a table with both ratios and writes ``benchmarks/results/switch_latency.csv`` (and .png).

    python benchmarks/switch_latency.py            # full run
    python benchmarks/switch_latency.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import MBCLoRAConfig, QuEPTConfig, assets

RESULTS = common.RESULTS / "switch_latency.csv"
# Every step changes the bit-width (and, mostly, the bit group), low and high widths alternating.
SWITCH_ORDER = [8, 2, 7, 3, 6, 4, 5]


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__, quick="fewer repetitions (a smoke run)", threads=2)
    parser.add_argument("--switch-tokens", type=int, default=64, help="tokens of the first forward after a switch")
    parser.add_argument("--forward-tokens", type=int, default=256, help="tokens of the steady-state forward")
    parser.add_argument("--bits", type=int, default=4, help="bit-width of the single-bit checkpoint and forward")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"CSV file (default {RESULTS})")
    return parser.parse_args()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def perturb_adapters(model: torch.nn.Module, std: float = 1e-3, seed: int = 0) -> None:
    """B starts at 0; small seeded values make every bit-width's delta non-zero (as after calibration)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mbclora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def load(folder: str | Path, **kwargs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def main() -> None:
    args = common.setup(parse_args())
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cycles, loads, forwards = (1, 2, 3) if args.quick else (3, 5, 10)
    quant = QuEPTConfig(mode="weight_only")

    float_dir = assets.smollm2_float_dir()
    print(f"SmolLM2-135M float checkpoint: {float_dir}  (torch {torch.__version__}, {args.threads} threads)")
    load_before = os.getloadavg()[0]
    model = load(float_dir, quantization_config=quant)
    model.add_adapter(MBCLoRAConfig())
    perturb_adapters(model)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    switch_ids = torch.randint(0, vocab, (1, args.switch_tokens), generator=gen)
    forward_ids = torch.randint(0, vocab, (1, args.forward_tokens), generator=gen)

    with tempfile.TemporaryDirectory(prefix="quept-switch-") as tmp:
        elastic_dir, single_dir = Path(tmp, "elastic"), Path(tmp, "single")
        model.save_pretrained(elastic_dir)  # base + elastic adapter, one folder
        # The single-bit checkpoint: the same base and adapter, merged at `bits` and saved on its own.
        peft_model = PeftModel.from_pretrained(load(float_dir, quantization_config=quant), elastic_dir)
        peft_model.set_adapter(f"w{args.bits}")
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(single_dir)
        with torch.no_grad():
            model.set_adapter(f"w{args.bits}")
            check = (merged(switch_ids).logits - model(switch_ids).logits).abs().max().item()
        del peft_model, merged
        print(f"single-bit w{args.bits} checkpoint vs elastic model at w{args.bits}: max |logit diff| = {check:.2e}")

        # 1. switch (set_adapter + first forward) vs loading the single-bit checkpoint.
        switch_ms = []
        with torch.no_grad():
            model.set_adapter(f"w{SWITCH_ORDER[-1]}")
            model(switch_ids)
            for _ in range(cycles):
                for bits in SWITCH_ORDER:
                    switch_ms.append(timed(lambda b=bits: (model.set_adapter(f"w{b}"), model(switch_ids))))
        load_ms, load_forward_ms = [], []
        for _ in range(loads):
            start = time.perf_counter()
            single = load(single_dir)
            load_ms.append((time.perf_counter() - start) * 1000.0)
            with torch.no_grad():
                single(switch_ids)
            load_forward_ms.append((time.perf_counter() - start) * 1000.0)
            del single

    # 2. steady-state forward at a switched bit-width (cached) vs the float model.
    float_model = load(float_dir)
    with torch.no_grad():
        model.set_adapter(f"w{args.bits}")
        for candidate in (model, float_model):
            candidate(forward_ids)  # warm-up (fills the quantized-weight cache)
        switched_ms = [timed(lambda: model(forward_ids)) for _ in range(forwards)]
        float_ms = [timed(lambda: float_model(forward_ids)) for _ in range(forwards)]

    rows = [
        ("switch_set_adapter_plus_first_forward", statistics.median(switch_ms), "ms", len(switch_ms)),
        ("load_single_bit_from_pretrained", statistics.median(load_ms), "ms", len(load_ms)),
        ("load_single_bit_plus_first_forward", statistics.median(load_forward_ms), "ms", len(load_forward_ms)),
        (f"forward_switched_w{args.bits}_cached", statistics.median(switched_ms), "ms", len(switched_ms)),
        ("forward_float", statistics.median(float_ms), "ms", len(float_ms)),
    ]
    values = {name: value for name, value, _, _ in rows}
    rows += [
        (
            "ratio_switch_vs_load",
            values["switch_set_adapter_plus_first_forward"] / values["load_single_bit_from_pretrained"],
            "x",
            "",
        ),
        (
            "ratio_switch_vs_load_plus_first_forward",
            values["switch_set_adapter_plus_first_forward"] / values["load_single_bit_plus_first_forward"],
            "x",
            "",
        ),
        (
            "ratio_forward_switched_vs_float",
            values[f"forward_switched_w{args.bits}_cached"] / values["forward_float"],
            "x",
            "",
        ),
    ]
    load_avg = (load_before + os.getloadavg()[0]) / 2
    print(f"\nCPU load average (1 min) around the run: {load_avg:.1f} on {os.cpu_count()} CPUs")
    print(f"{'measurement':<42} {'median':>10}  n")
    for name, value, unit, samples in rows:
        print(f"{name:<42} {value:>9.3f}{unit:<2} {samples}")
    run = {"threads": args.threads, "load_avg": f"{load_avg:.1f}", "quept_hf": quept_hf.__version__}
    table = [{"metric": name, "value": f"{v:.4f}", "unit": unit, "samples": n, **run} for name, v, unit, n in rows]
    plot = common.Plot("metric", "value", bar=True, ylabel="ms (median)", where=lambda row: row["unit"] == "ms",
                       title=f"SmolLM2-135M bit switching, {args.threads} thread(s)")  # fmt: skip
    print()
    common.write_results(args.out, table, plot)


if __name__ == "__main__":
    main()

"""Mixed precision on SmolLM2-135M (weight-only): sensitivity-driven DP plans vs uniform and random plans.

    python benchmarks/mixed_precision.py --quick      # short calibration, small sensitivity and eval sets
    python benchmarks/mixed_precision.py              # the fuller setting
    python benchmarks/mixed_precision.py --calibrated DIR   # reuse a saved calibrated elastic model

Calibrates once (or loads a calibrated model), measures the layer sensitivity table (timed), then reports
held-out perplexity (other Wikipedia articles than the calibration ones) of uniform 2/3/4 bits, the DP plans
at 2.25/2.5/3.25 average bits per weight, and the best of 10 random plans at the same budgets. Prints the table
and writes benchmarks/results/mixed_precision.csv (and .png).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from fractions import Fraction

import _common as common
import torch
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf.inspection import quept_linears
from quept_hf.mixed_precision import (
    SensitivityTable,
    add_plan,
    allocate,
    attach_sensitivity,
    load_sensitivity,
    sensitivity,
)

UNIFORM = (2, 3, 4)
TARGETS = (2.25, 2.5, 3.25)


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__, quick="small setting (about 2 h on 2 busy shared CPU cores)")
    parser.add_argument("--calibrated", default=None, help="load this saved calibrated model instead of calibrating")
    parser.add_argument(
        "--save", default=None, help="save the calibrated model here (again at the end, with plans and table)"
    )
    parser.add_argument(
        "--reuse-table", action="store_true", help="with --calibrated: use the sensitivity table saved with it"
    )
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32, help="rank each bit group adds to the cascade")
    parser.add_argument("--sens-samples", type=int, default=8, help="sensitivity windows")
    parser.add_argument("--sens-seq-len", type=int, default=128, help="sensitivity window length")
    parser.add_argument("--eval-windows", type=int, default=40, help="512-token held-out windows")
    parser.add_argument("--random-plans", type=int, default=10)
    return parser.parse_args()


def random_plan(table: SensitivityTable, target: float, rng: random.Random) -> dict[str, int]:
    """A random plan filling the same budget: from all-lowest, upgrade a random unit by one bit level while any
    upgrade still fits (so its average ends as close to the target as the DP's)."""
    total = sum(table.params)
    budget = math.floor(Fraction(repr(target)) * total)
    level = dict.fromkeys(table.units, 0)
    spent = table.bits[0] * total
    while True:
        fits = [
            (u, cost)
            for u, p in zip(table.units, table.params, strict=True)
            if level[u] + 1 < len(table.bits)
            and spent + (cost := p * (table.bits[level[u] + 1] - table.bits[level[u]])) <= budget
        ]
        if not fits:
            break
        unit, cost = rng.choice(fits)
        level[unit] += 1
        spent += cost
    return {m: table.bits[level[u]] for u in table.units for m in table.members[u]}


def weighted_average(bits: dict[str, int], model: torch.nn.Module) -> float:
    layers = quept_linears(model)
    sizes = {name: layer.in_features * layer.out_features for name, layer in layers.items()}
    return sum(sizes[n] * b for n, b in bits.items()) / sum(sizes[n] for n in bits)


def load_model(args: argparse.Namespace, smol: common.SmolLM2) -> tuple[torch.nn.Module, float]:
    if args.calibrated:
        return AutoModelForCausalLM.from_pretrained(args.calibrated, dtype=torch.float32).eval(), 0.0
    config = quept_hf.QuEPTConfig(mode="weight_only", num_samples=args.num_samples, seq_len=args.seq_len)
    config.ranks = [args.rank] * len(config.bit_groups)
    model = smol.load(config)
    start = time.perf_counter()
    quept_hf.calibrate(model, smol.calib_texts, tokenizer=smol.tokenizer, epochs=args.epochs)
    return model.eval(), time.perf_counter() - start


def main() -> None:
    quick = dict(num_samples=16, seq_len=256, epochs=2, rank=16, sens_samples=2, sens_seq_len=128, eval_windows=6)
    args = common.setup(parse_args(), quick)
    smol = common.smollm2()
    model, calib_seconds = load_model(args, smol)
    if args.save and not args.calibrated:
        model.save_pretrained(args.save)

    def ppl() -> float:
        return smol.perplexity(model, args.eval_windows)

    start = time.perf_counter()
    if args.reuse_table:
        table = load_sensitivity(model)
        args.sens_samples, args.sens_seq_len = table.info["num_samples"], table.info["seq_len"]
        sens_seconds = table.info["seconds"]
    else:
        table = sensitivity(
            model, smol.calib_texts, tokenizer=smol.tokenizer, num_samples=args.sens_samples, seq_len=args.sens_seq_len
        )
        sens_seconds = time.perf_counter() - start
    attach_sensitivity(model, table)

    rows = []
    quept_hf.set_bits(model, 16)
    rows.append({"kind": "float", "plan": "float", "target": "", "avg_bits": 16, "ppl": ppl()})
    for bits in UNIFORM:
        quept_hf.set_bits(model, bits)
        rows.append({"kind": "uniform", "plan": f"w{bits}", "target": bits, "avg_bits": bits, "ppl": ppl()})
    for target in TARGETS:
        plan = allocate(table, target)
        add_plan(model, plan)
        quept_hf.set_bits(model, plan.name)
        rows.append({"kind": "dp", "plan": plan.name, "target": target, "avg_bits": plan.avg_bits, "ppl": ppl()})
        rows.append(best_random(model, table, target, args.random_plans, ppl))
    report(args, rows, table, calib_seconds, sens_seconds)
    if args.save:
        model.save_pretrained(args.save)


def best_random(model, table: SensitivityTable, target: float, count: int, ppl) -> dict:
    """The best (lowest held-out perplexity) of ``count`` random plans at the budget: the strongest baseline."""
    rng = random.Random(int(target * 1000))
    tried = []
    for _ in range(count):
        bits = random_plan(table, target, rng)
        quept_hf.set_bits(model, bits)
        tried.append((ppl(), weighted_average(bits, model)))
    scores = sorted(p for p, _ in tried)
    best, average = min(tried)
    return {
        "kind": f"random (best of {count}; median {scores[len(scores) // 2]:.2f})",
        "plan": f"random-{target:g}",
        "target": target,
        "avg_bits": average,
        "ppl": best,
    }


def verdicts(rows: list[dict]) -> list[str]:
    """Does each DP plan beat the best random plan at its budget and the uniform bit-width below it?"""
    uniform = {row["target"]: row["ppl"] for row in rows if row["kind"] == "uniform"}
    randoms = {row["target"]: row["ppl"] for row in rows if row["plan"].startswith("random-")}
    lines = []
    for row in (r for r in rows if r["kind"] == "dp"):
        below = max(b for b in uniform if b <= row["target"])
        ok = row["ppl"] < randoms[row["target"]] and row["ppl"] < uniform[below]
        lines.append(
            f"{row['plan']}: {row['ppl']:.2f} vs best random {randoms[row['target']]:.2f}, uniform w{below} "
            f"{uniform[below]:.2f} -> {'beats both' if ok else 'does NOT beat both'}"
        )
    return lines


def report(args, rows: list[dict], table: SensitivityTable, calib_seconds: float, sens_seconds: float) -> None:
    print(f"\nSmolLM2-135M weight-only, calibration {args.num_samples} x {args.seq_len} tokens, {args.epochs} epochs,")
    print(f"rank {args.rank} per group ({calib_seconds / 60:.1f} min; 0 = loaded), {args.threads} torch thread(s)")
    units, bits = len(table.units), len(table.bits)
    print(
        f"sensitivity: {units} layers x {bits} bit-widths ({units * (bits - 1)} suffix runs) on "
        f"{args.sens_samples} x {args.sens_seq_len} tokens: {sens_seconds / 60:.1f} min"
    )
    print(f"held-out perplexity on {args.eval_windows} x 512 tokens of other articles\n")
    print(f"{'plan':>14} | {'target':>6} | {'avg bits':>8} | {'ppl':>9} | kind")
    for row in rows:
        target, bits = row["target"], row["avg_bits"]
        print(f"{row['plan']:>14} | {target!s:>6} | {bits:>8.3f} | {row['ppl']:>9.2f} | {row['kind']}")
    print()
    for line in verdicts(rows):
        print(line)
    plot = common.Plot(
        "avg_bits", "ppl", series=lambda row: row["kind"].split(" (")[0], log=True, ylabel="held-out perplexity",
        title="SmolLM2-135M mixed precision", where=lambda row: row["kind"] not in ("float", "sensitivity_seconds"),
        reference={"float": rows[0]["ppl"]},
    )  # fmt: skip
    sens = {"kind": "sensitivity_seconds", "plan": "", "target": "", "avg_bits": "", "ppl": sens_seconds}
    common.write_results("mixed_precision", [*rows, sens], plot)


if __name__ == "__main__":
    main()

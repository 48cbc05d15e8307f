"""Mixed precision without retraining: a bit-width per Transformer block under an average-bits budget.

    python examples/mixed_precision.py --quick                       # tiny calibration + sensitivity (minutes)
    python examples/mixed_precision.py --calibrated smollm2-quept    # reuse: llm_bit_switching.py --out smollm2-quept
    python examples/mixed_precision.py --granularity layer           # one bit-width per linear layer (much slower)

One calibrated elastic model already holds every bit-width of every layer, so a mixed plan is only a CHOICE of
bit-width per unit. ``quept_hf.plan_mixed_precision`` measures how much each unit's output distribution moves
at each bit-width (the sensitivity table: KL from the float model, one unit switched at a time), picks the
cheapest choice per budget by exact dynamic programming (parameter-weighted average bits), and stores each plan
as an adapter: ``model.set_adapter("mixed-3.25")``. Plans and table travel with ``save_pretrained``.
The table compares held-out perplexity of the plans with the uniform bit-widths around them.
"""

from __future__ import annotations

import _common
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quept_hf  # registers quantization method "quept": import it BEFORE from_pretrained
from quept_hf.evaluation import perplexity


def main() -> None:
    cli = _common.parser(__doc__)
    cli.add_argument("--calibrated", default=None, help="a saved elastic SmolLM2 folder (else: calibrate here)")
    cli.add_argument("--avg-bits", type=float, nargs="+", default=[2.5, 3.25], help="budgets (default 2.5 3.25)")
    cli.add_argument("--granularity", choices=["block", "layer"], default="block", help="unit of a plan")
    cli.add_argument("--candidates", type=int, nargs="+", default=None, help="bit-widths a plan may use (all)")
    cli.add_argument("--sens-samples", type=int, default=2, help="sensitivity windows (default 2)")
    cli.add_argument("--sens-seq-len", type=int, default=128, help="sensitivity window length (default 128)")
    cli.add_argument("--num-samples", type=int, default=32, help="calibration windows, without --calibrated")
    cli.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    cli.add_argument("--epochs", type=int, default=2, help="calibration epochs")
    cli.add_argument("--windows", type=int, default=8, help="held-out 512-token windows per row (default 8)")
    quick = {
        "num_samples": 4, "seq_len": 128, "epochs": 1, "windows": 2,
        "sens_samples": 1, "sens_seq_len": 64, "candidates": [2, 3, 4],
    }  # fmt: skip
    args = _common.setup(cli, quick)
    calib_texts, eval_texts = _common.wikipedia()
    folder = _common.smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    if args.calibrated:
        model = AutoModelForCausalLM.from_pretrained(args.calibrated, dtype=torch.float32).eval()
    else:
        config = quept_hf.QuEPTConfig(
            mode="weight_only", ranks=[16] * 4, dataset=calib_texts, tokenizer=tokenizer,
            num_samples=args.num_samples, seq_len=args.seq_len, epochs=args.epochs,
            smoothing=not args.quick,  # --quick: skip the per-block scale search (most of a tiny run's time)
            seed=args.seed,
        )  # fmt: skip
        with _common.timed(f"from_pretrained + calibration ({args.num_samples} x {args.seq_len} tokens)"):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config)
        model.eval()

    # Sensitivity (measured once, on calibration text) + one DP allocation per budget, stored as adapters.
    with _common.timed(f"sensitivity ({args.granularity}s, {args.sens_samples} x {args.sens_seq_len} tokens) + plans"):
        plans = quept_hf.plan_mixed_precision(
            model, calib_texts, tokenizer=tokenizer, avg_bits=args.avg_bits, granularity=args.granularity,
            bits=args.candidates, num_samples=args.sens_samples, seq_len=args.sens_seq_len,
        )  # fmt: skip

    def ppl() -> float:
        return perplexity(model, eval_texts, tokenizer, seq_len=512, max_windows=args.windows)

    # Plans and uniform widths side by side, by average bits; set_adapter takes a plan name like a bit-width.
    uniform = sorted({int(t) for t in args.avg_bits} | {int(t) + 1 for t in args.avg_bits})
    rows = [(f"w{b}", float(b), "uniform") for b in uniform]
    rows += [(name, plan.avg_bits, "DP plan") for name, plan in plans.items()]
    rows.sort(key=lambda row: row[1])
    quept_hf.set_bits(model, _common.FLOAT_BITS)
    results = [["float32", "16", "reference", f"{ppl():.2f}"]]
    with _common.timed("perplexity of every row"):
        for name, avg, kind in rows:
            model.set_adapter(name)
            results.append([name, f"{avg:.3f}", kind, f"{ppl():.2f}"])
    _common.table(
        f"SmolLM2-135M weight-only: mixed-precision plans ({args.granularity} granularity) vs uniform bit-widths, "
        f"held-out Wikipedia perplexity ({args.windows} x 512 tokens)",
        ["adapter", "avg bits per weight", "kind", "perplexity"],
        results,
    )
    # What each plan chose, unit by unit (blocks in order; for "layer" plans, the first 40 linears).
    for name, plan in plans.items():
        print(f"{name}: {' '.join(str(b) for b in list(plan.unit_bits.values())[:40])}")


if __name__ == "__main__":
    main()

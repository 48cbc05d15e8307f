"""QuEPT one-shot elastic calibration of SmolLM2-135M vs round-to-nearest, held-out perplexity per bit-width.

    python benchmarks/calibrate_smollm2.py            # the full setting of docs/RESULTS.md
    python benchmarks/calibrate_smollm2.py --quick    # a few minutes on 2 CPU cores

Calibrates on Wikipedia articles and evaluates on OTHER articles (quept_hf.assets.wikipedia_split).
Prints the table and writes benchmarks/results/calibrate_smollm2.csv.
"""

from __future__ import annotations

import argparse
import csv
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quept_hf
from quept_hf.assets import smollm2_float_dir, wikipedia_split
from quept_hf.evaluation import perplexity

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small setting (minutes on a laptop CPU)")
    parser.add_argument("--mode", default="weight_only", choices=["weight_only", "weight_activation"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32, help="rank each bit group adds to the cascade")
    parser.add_argument("--eval-windows", type=int, default=40, help="512-token held-out windows")
    parser.add_argument("--token-merge", default="mbtome", choices=["mbtome", "uniform", "none"])
    parser.add_argument("--cascade-training", default="owned", choices=["owned", "joint"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr-lora", type=float, default=None, help="default: the spec's (QuEPTConfig)")
    parser.add_argument("--lr-clip", type=float, default=None, help="default: the spec's (QuEPTConfig)")
    parser.add_argument("--tag", default="", help="suffix of the CSV name (keeps ablation runs apart)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="save the calibrated model to this folder")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.num_samples, args.seq_len, args.epochs, args.rank, args.eval_windows = 16, 256, 2, 16, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = smollm2_float_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib_texts, eval_texts = wikipedia_split()
    config = quept_hf.QuEPTConfig(mode=args.mode, num_samples=args.num_samples, seq_len=args.seq_len)
    config.ranks = [args.rank] * len(config.bit_groups)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32)
    model.eval()

    def ppl() -> float:
        return perplexity(model, eval_texts, tokenizer, seq_len=512, max_windows=args.eval_windows)

    rows = {"float": {"bits": "float", "rtn": None}}
    quept_hf.set_bits(model, 16)
    rows["float"]["rtn"] = rows["float"]["quept"] = ppl()
    for bits in config.bits:
        quept_hf.set_bits(model, bits)
        rows[bits] = {"bits": bits, "rtn": ppl()}

    start = time.perf_counter()
    quept_hf.calibrate(
        model,
        calib_texts,
        tokenizer=tokenizer,
        epochs=args.epochs,
        token_merge=args.token_merge,
        cascade_training=args.cascade_training,
        batch_size=args.batch_size,
        **{k: v for k, v in (("lr_lora", args.lr_lora), ("lr_clip", args.lr_clip)) if v is not None},
    )
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    for bits in config.bits:
        model.set_adapter(f"w{bits}")
        rows[bits]["quept"] = ppl()

    print(f"\nSmolLM2-135M {args.mode}: {args.num_samples} x {args.seq_len} calibration tokens, {args.epochs} epochs,")
    print(f"rank {args.rank} per group; held-out perplexity on {args.eval_windows} x 512 tokens of other articles")
    print(f"calibration wall time {seconds / 60:.1f} min, peak RSS {peak_gib:.2f} GiB (whole process)\n")
    print(f"{'bits':>6} | {'RTN':>10} | {'QuEPT':>10}")
    for row in rows.values():
        print(f"{row['bits']!s:>6} | {row['rtn']:>10.2f} | {row['quept']:>10.2f}")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"calibrate_smollm2_{args.mode}{args.tag}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["bits", "rtn", "quept"])
        writer.writeheader()
        writer.writerows(rows.values())
    if args.out:
        model.save_pretrained(args.out)


if __name__ == "__main__":
    main()

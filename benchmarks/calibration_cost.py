"""Calibration cost: ONE elastic calibration (every bit-width 2..8) versus one single-bit calibration per bit-width.

    python benchmarks/calibration_cost.py            # 4 blocks, 16 x 256 tokens, 2 epochs, batch 1
    python benchmarks/calibration_cost.py --quick    # 2 blocks, 8 x 128 tokens, 1 epoch

Calibrates the first ``--blocks`` blocks of SmolLM2-135M (every block has the same shape and the same number of
steps, so the cost of the whole 30-block model is this cost x 30 / blocks, for every run alike) with the same
data, schedule and rank per group for each run, each run in a fresh subprocess (peak RSS per run). Reports process
CPU time (robust on a shared machine, where wall time depends on the other jobs) and wall time. Prints the table
and writes benchmarks/results/calibration_cost.csv (and .png).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import _common as common
from torch import nn

import quept_hf

BITS = [2, 3, 4, 5, 6, 7, 8]


def parse_args():
    parser = common.parser(__doc__)
    parser.add_argument("--blocks", type=int, default=4, help="calibrate the first N blocks only")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16, help="rank each bit group adds to the cascade")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run, in a subprocess
    return parser.parse_args()


def one_run(args) -> dict:
    """Calibrate once (elastic, or single-bit at ``args.run`` bits); returns its cost."""
    smol = common.smollm2()
    single = {} if args.run == "elastic" else {"bits": [int(args.run)], "bit_groups": [[int(args.run)]]}
    config = quept_hf.QuEPTConfig(num_samples=args.num_samples, seq_len=args.seq_len, **single)
    config.ranks = [args.rank] * len(config.bit_groups)
    model = smol.load(config)
    model.model.layers = nn.ModuleList(model.model.layers[: args.blocks])
    model.config.num_hidden_layers = args.blocks
    cpu, wall = time.process_time(), time.perf_counter()
    settings = {"epochs": args.epochs, "batch_size": args.batch_size}
    quept_hf.calibrate(model, smol.calib_texts, tokenizer=smol.tokenizer, **settings)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"run": args.run, "cpu_s": cpu, "wall_s": wall, "peak_rss_gib": peak}


def spawn(run: str, args) -> dict:
    command = [sys.executable, __file__, "--run", run, "--threads", str(args.threads or 1)]
    for name in ("blocks", "num_samples", "seq_len", "epochs", "batch_size", "rank"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"run {run} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = common.setup(parse_args(), dict(blocks=2, num_samples=8, seq_len=128, epochs=1))
    if args.run:
        print(json.dumps(one_run(args)))
        return
    rows = []
    for run in ["elastic", *map(str, BITS)]:
        rows.append(spawn(run, args))
        print(f"{run:>8}: cpu {rows[-1]['cpu_s']:.0f} s, wall {rows[-1]['wall_s']:.0f} s", flush=True)
    singles = rows[1:]
    total = {
        "run": "sum of single-bit",
        "cpu_s": sum(r["cpu_s"] for r in singles),
        "wall_s": sum(r["wall_s"] for r in singles),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in singles),
    }
    rows.append(total)
    scale = 30 / args.blocks
    print(f"\nSmolLM2-135M, first {args.blocks} blocks: {args.num_samples} x {args.seq_len} tokens, ", end="")
    print(f"{args.epochs} epochs, batch {args.batch_size}, rank {args.rank} per group; x{scale:.1f} = 30 blocks")
    print(f"{'run':>18} | {'CPU s':>8} | {'wall s':>8} | {'30-block CPU min':>16} | {'peak RSS GiB':>12}")
    for row in rows:
        row["cpu_min_30_blocks"] = row["cpu_s"] * scale / 60
        print(
            f"{row['run']:>18} | {row['cpu_s']:>8.0f} | {row['wall_s']:>8.0f} | {row['cpu_min_30_blocks']:>16.1f} | "
            f"{row['peak_rss_gib']:>12.2f}"
        )
    print(f"\nelastic / sum of single-bit (CPU): {rows[0]['cpu_s'] / total['cpu_s']:.2f}")
    plot = common.Plot("run", "cpu_s", bar=True, title="calibration CPU time", ylabel="CPU seconds")
    common.write_results("calibration_cost", rows, plot)


if __name__ == "__main__":
    main()

"""Error-compensated freezing on SmolLM2-135M: GPTQ rounding on QuEPT's calibrated grid, in and out of domain.

    python benchmarks/calibrate_smollm2.py --num-samples 32 --seq-len 256 --epochs 2 --out CALIBRATED
    python benchmarks/error_compensation.py --calibrated CALIBRATED [--bits 2,3,4,8] [--windows 16]

For each bit-width, held-out perplexity on Wikipedia articles not used for calibration and on news articles
(another domain, `quept_hf.assets.news_articles`) of:
  rtn           round-to-nearest, the uncalibrated QuEPT grid (the spec's initial clipping);
  gptq          GPTQ on that same grid (`quept_hf.freeze(uncalibrated, error_compensation=texts)`: act-order,
                static groups; group 128 at 2-3 bits, per channel above, as QuEPT's defaults; 2 bits keep plain
                rounding, `quept_hf.packing.freeze.COMPENSATED_MIN_BITS`);
  quept         the calibrated elastic model (MB-CLoRA deltas + per-bit clipping, rounding to nearest);
  quept+gptq    the same model frozen with error compensation, GPTQ on its calibrated grid only;
  quept+search  the default compensated freeze: each row keeps the calibrated grid, the float weight's min/max
                grid, its importance-searched clipping or the min/max grid at the step of one bit less, whichever
                GPTQ reproduces the row's outputs best with (`quept_hf.packing.plan.GRID_SEARCH`).
The same calibration windows (the calibrated model's ``num_samples`` x ``seq_len`` draws) feed GPTQ, and each
row reports the CPU seconds of freezing. Writes benchmarks/results/error_compensation.csv (and .png).
"""

from __future__ import annotations

import logging
import time

import _common as common
import torch
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf.packing import plan

CORPORA = ("wiki", "news")


def parse_args():
    parser = common.parser(__doc__, quick="bits 3,4 and 4 windows", threads=2)
    parser.add_argument("--calibrated", required=True, help="folder of a calibrated elastic SmolLM2 (save_pretrained)")
    parser.add_argument("--bits", default="2,3,4,5,6,8", help="bit-widths to evaluate, comma-separated")
    parser.add_argument("--windows", type=int, default=16, help="512-token evaluation windows per corpus")
    parser.add_argument("--quept-only", action="store_true", help="leave rtn and gptq out (e.g. single-bit models)")
    parser.add_argument("--search-only", action="store_true", help="leave quept+gptq out (the default freeze only)")
    parser.add_argument("--tag", default="", help="suffix of the CSV name (keeps runs apart)")
    return parser.parse_args()


def evaluate(smol, model, bits: int, windows: int) -> dict[str, float]:
    quept_hf.set_bits(model, bits)
    return {corpus: smol.perplexity(model, windows, corpus) for corpus in CORPORA}


def frozen_with_compensation(model, smol, bits: list[int], grid_search: bool) -> tuple[torch.nn.Module, float]:
    start, default = time.process_time(), plan.GRID_SEARCH
    plan.GRID_SEARCH = grid_search
    try:
        texts = smol.calib_texts
        frozen = quept_hf.freeze(model, bits=bits, plans=[], error_compensation=texts, tokenizer=smol.tokenizer)
    finally:
        plan.GRID_SEARCH = default
    return frozen, time.process_time() - start


def main() -> None:
    args = common.setup(parse_args(), dict(bits="3,4", windows=4))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bits = [int(b) for b in args.bits.split(",")]
    smol = common.smollm2()
    calibrated = AutoModelForCausalLM.from_pretrained(args.calibrated, dtype=torch.float32).eval()
    settings = quept_hf.quept_config(calibrated)
    same_grid = quept_hf.QuEPTConfig(  # the uncalibrated model on the calibrated one's grid and windows
        mode=settings.mode, bits=settings.bits, bit_groups=settings.bit_groups, group_size=settings.group_size,
        num_samples=settings.num_samples, seq_len=settings.seq_len, smoothing=False,
    )  # fmt: skip
    models, seconds = {}, {}
    if not args.quept_only:
        models["rtn"] = smol.load(same_grid)
        models["gptq"], seconds["gptq"] = frozen_with_compensation(models["rtn"], smol, bits, grid_search=False)
    models["quept"] = calibrated
    if not args.search_only:
        models["quept+gptq"], seconds["quept+gptq"] = frozen_with_compensation(calibrated, smol, bits, False)
    models["quept+search"], seconds["quept+search"] = frozen_with_compensation(calibrated, smol, bits, True)

    rows = []
    for b in bits:
        row = {"bits": b}
        for name, model in models.items():
            for corpus, value in evaluate(smol, model, b, args.windows).items():
                row[f"{name} {corpus}"] = round(value, 2)
        rows.append(row)
        logging.info("%s", row)
    header = [f"{name} {corpus}" for name in models for corpus in CORPORA]
    print(f"\nSmolLM2-135M, {settings.num_samples} x {settings.seq_len} calibration tokens; perplexity on "
          f"{args.windows} x 512 tokens of held-out Wikipedia / news")  # fmt: skip
    print("freeze with error compensation, CPU-s: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
    print("bits | " + " | ".join(f"{h:>16}" for h in header))
    for row in rows:
        print(f"{row['bits']:>4} | " + " | ".join(f"{row[h]:>16.2f}" for h in header))
    for row in rows:
        row.update({f"{name} cpu_s": round(value) for name, value in seconds.items()})
    plot = common.Plot("bits", header, log=True, title="SmolLM2-135M: error-compensated freezing", ylabel="perplexity")
    common.write_results(f"error_compensation{args.tag}", rows, plot)


if __name__ == "__main__":
    main()

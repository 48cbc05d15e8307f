"""QuEPT one-shot elastic calibration of SmolLM2-135M vs round-to-nearest, held-out perplexity per bit-width.

    python benchmarks/calibrate_smollm2.py            # the full setting of docs/RESULTS.md
    python benchmarks/calibrate_smollm2.py --quick    # a few minutes on 2 CPU cores

Calibrates on Wikipedia articles and evaluates on OTHER articles (quept_hf.assets.wikipedia_split).
Prints the table and writes benchmarks/results/calibrate_smollm2_MODE[TAG].csv (and .png).
"""

from __future__ import annotations

import json
import resource
import time

import _common as common

import quept_hf
from quept_hf.atomic import atomic_write_text
from quept_hf.config import CASCADE_TRAINING, LR_SCALING, TOKEN_MERGE_MODES


def parse_args():
    parser = common.parser(__doc__, quick="small setting (minutes on a laptop CPU)", threads=2)
    parser.add_argument("--mode", default="weight_only", choices=["weight_only", "weight_activation"])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32, help="rank each bit group adds to the cascade")
    parser.add_argument("--eval-windows", type=int, default=40, help="512-token held-out windows")
    parser.add_argument("--token-merge", default=None, choices=TOKEN_MERGE_MODES, help="default: QuEPTConfig's")
    parser.add_argument("--cascade-training", default=None, choices=CASCADE_TRAINING, help="default: QuEPTConfig's")
    parser.add_argument("--lr-scaling", default=None, choices=LR_SCALING, help="default: QuEPTConfig's")
    parser.add_argument("--cascade", default=None, choices=["on", "off"], help="off: independent adapters per group")
    parser.add_argument("--smoothing", default=None, choices=["on", "off"], help="default: QuEPTConfig's (mode's)")
    parser.add_argument("--bits", type=int, default=None, help="single-bit calibration at this bit-width (ablation)")
    parser.add_argument("--skip-rtn", action="store_true", help="leave round-to-nearest out (NaN) unless cached")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr-lora", type=float, default=None, help="default: the spec's (QuEPTConfig)")
    parser.add_argument("--lr-clip", type=float, default=None, help="default: the spec's (QuEPTConfig)")
    parser.add_argument("--tag", default="", help="suffix of the CSV name (keeps ablation runs apart)")
    parser.add_argument("--group-size", default=None, help="group sizes over the defaults, BITS:SIZE comma-separated "
                        "(e.g. 3:64; -1: per channel)")  # fmt: skip
    parser.add_argument("--bit-groups", default=None, help="calibration groups low to high, '/' between groups, ',' "
                        "within (e.g. 2/3/4/5,6/7,8: W4 in a group of its own); default: QuEPTConfig's")  # fmt: skip
    parser.add_argument("--out", default=None, help="save the calibrated model to this folder")
    return parser.parse_args()


def rtn_perplexities(model, config, windows: int, ppl, skip: bool = False) -> dict[str, float]:
    """Float and round-to-nearest perplexity per bit-width, cached in benchmarks/results (they depend only on the
    quantizer settings and the evaluation windows, not on the calibration settings this script varies)."""
    key = {"mode": config.mode, "windows": windows}
    sizes = {str(b): g for b, g in config.group_size.items()}
    cache = common.RESULTS / f"rtn_smollm2_{config.mode}_{windows}.json"
    found = json.loads(cache.read_text()) if cache.exists() else {}
    same = found.get("key") == key and all(found["group_size"].get(b) == g for b, g in sizes.items())
    if same and all(b in found["ppl"] for b in sizes):
        return found["ppl"]
    if skip:
        return {"float": float("nan"), **{str(b): float("nan") for b in config.bits}}
    quept_hf.set_bits(model, 16)
    result = {"float": ppl()}
    for bits in config.bits:
        quept_hf.set_bits(model, bits)
        result[str(bits)] = ppl()
    if not same:  # keep the cache of the full bit range
        common.RESULTS.mkdir(exist_ok=True)
        atomic_write_text(cache, json.dumps({"key": key, "group_size": sizes, "ppl": result}, indent=1))
    return result


def main() -> None:
    args = common.setup(parse_args(), dict(num_samples=16, seq_len=256, epochs=2, rank=16, eval_windows=8))
    smol = common.smollm2()
    structure = {"bits": [args.bits], "bit_groups": [[args.bits]]} if args.bits else {}
    if args.cascade:
        structure["cascade"] = args.cascade == "on"
    if args.smoothing:
        structure["smoothing"] = args.smoothing == "on"
    if args.bit_groups:
        structure["bit_groups"] = [[int(b) for b in group.split(",")] for group in args.bit_groups.split("/")]
    config = quept_hf.QuEPTConfig(mode=args.mode, num_samples=args.num_samples, seq_len=args.seq_len, **structure)
    if args.group_size:
        sizes = {int(b): int(s) for b, s in (item.split(":") for item in args.group_size.split(","))}
        structure["group_size"] = {**config.group_size, **sizes}
        config = quept_hf.QuEPTConfig(mode=args.mode, num_samples=args.num_samples, seq_len=args.seq_len, **structure)
    config.ranks = [args.rank] * len(config.bit_groups)
    model = smol.load(config)

    def ppl() -> float:
        return smol.perplexity(model, args.eval_windows)

    rtn = rtn_perplexities(model, config, args.eval_windows, ppl, args.skip_rtn)  # before calibration: RTN
    rows = {"float": {"bits": "float", "rtn": rtn["float"], "quept": rtn["float"]}}
    rows.update({bits: {"bits": bits, "rtn": rtn[str(bits)]} for bits in config.bits})

    start = time.perf_counter()
    quept_hf.calibrate(
        model,
        smol.calib_texts,
        tokenizer=smol.tokenizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        **common.given_settings(args, "token_merge", "cascade_training", "lr_scaling", "lr_lora", "lr_clip"),
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
    reference = {"float": rows["float"]["rtn"]}
    title = f"SmolLM2-135M {args.mode}{args.tag}: held-out perplexity"
    plot = common.Plot("bits", ["rtn", "quept"], log=True, title=title, ylabel="perplexity", reference=reference)
    common.write_results(f"calibrate_smollm2_{args.mode}{args.tag}", rows.values(), plot)
    if args.out:
        model.save_pretrained(args.out)


if __name__ == "__main__":
    main()

"""The ``quept-hf`` command: calibrate, evaluate, plan, export and describe elastic QuEPT models.

Examples:
    quept-hf calibrate ./smollm2-float --mode weight_only --bits 2-8 --data wiki.txt --out ./smollm2-quept
    quept-hf calibrate ./SmolLM2.Q4_1.gguf --data wiki.txt --out ./smollm2-quept --epochs 2 --num-samples 32
    quept-hf eval ./smollm2-quept --bits all --data held_out.txt
    quept-hf plan ./smollm2-quept --avg-bits 2.25 3.25 --data wiki.txt
    quept-hf export ./smollm2-quept --bits 3 --out ./smollm2-w3
    quept-hf export ./smollm2-quept --format gguf --bits 2-8 --out ./smollm2-gguf
    quept-hf card ./smollm2-quept
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

logger = logging.getLogger("quept_hf.cli")


class CliError(ValueError):
    """A bad command-line argument: printed as one line, exit status 2."""


def parse_bits(text: str) -> list[int] | None:
    """``"2-8"`` -> [2..8], ``"2,3,4"`` -> [2, 3, 4], ``"all"`` -> None (every bit-width of the model)."""
    if text == "all":
        return None
    try:
        if "-" in text:
            low, high = (int(t) for t in text.split("-"))
            bits = list(range(low, high + 1))
        else:
            bits = [int(t) for t in text.split(",")]
    except ValueError as error:
        raise CliError(f"--bits {text!r}: expected a range like 2-8, a list like 2,3,4, or 'all'") from error
    if not bits or any(not 2 <= b <= 8 for b in bits):
        raise CliError(f"--bits {text!r}: bit-widths must lie in 2..8")
    return bits


def parse_zero_point(text: str) -> str | dict[int, str]:
    """``"float"`` -> every width; ``"4:float,5:float"`` -> those widths (`QuEPTConfig` / `freeze` check the
    kinds)."""
    if ":" not in text:
        return text
    try:
        return {int(b): kind for b, kind in (item.split(":") for item in text.split(","))}
    except ValueError as error:
        allowed = "expected integer, float, symmetric or BITS:KIND pairs like 4:float,5:float"
        raise CliError(f"--zero-point {text!r}: {allowed}") from error


def read_texts(path: str) -> list[str]:
    """A text file (paragraphs separated by blank lines) or a saved ``datasets`` folder with a text column."""
    if os.path.isdir(path):
        from datasets import load_from_disk

        dataset = load_from_disk(path)
        if "text" not in dataset.column_names:
            raise CliError(f"--data {path!r}: the dataset has no 'text' column ({dataset.column_names})")
        return [t for t in dataset["text"] if t]
    if not os.path.isfile(path):
        raise CliError(f"--data {path!r}: no such file or dataset folder")
    with open(path, encoding="utf-8") as handle:
        return [p for p in handle.read().split("\n\n") if p.strip()]


def load_source(model: str, quantization_config=None):
    """A model from a local folder, a Hub id, or a GGUF file (dequantized, then made elastic in place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quept_hf

    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise CliError(f"MODEL {model!r}: no such GGUF file")
        folder, name = os.path.split(os.path.abspath(model))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        if quantization_config is not None:
            quept_hf.quantize_model(loaded, quantization_config)
        return loaded, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    # An explicit quantization_config=None makes transformers (5.23) drop a saved one: a QuEPT folder would
    # load as a plain model, so pass it only when there is one.
    kwargs = {} if quantization_config is None else {"quantization_config": quantization_config}
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs)
    return loaded, tokenizer


def cmd_calibrate(args: argparse.Namespace) -> None:
    import quept_hf

    bits = parse_bits(args.bits)
    config = quept_hf.QuEPTConfig(
        mode=args.mode,
        bits=bits,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        epochs=args.epochs,
        zero_point=parse_zero_point(args.zero_point),
    )
    if args.rank:
        config.ranks = [args.rank] * len(config.bit_groups)
    texts = read_texts(args.data)
    model, tokenizer = load_source(args.model, config)
    quept_hf.calibrate(model, texts, tokenizer=tokenizer, checkpoint_dir=args.checkpoint_dir)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    logger.info("calibrated model saved to %s", args.out)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)


def cmd_eval(args: argparse.Namespace) -> None:
    import quept_hf
    from quept_hf.evaluation import per_bit, perplexity

    model, tokenizer = load_source(args.model)
    config = quept_hf.quept_config(model)
    bits = parse_bits(args.bits) or config.bits
    texts = read_texts(args.data)
    score = lambda m: perplexity(m, texts, tokenizer, seq_len=args.seq_len, max_windows=args.windows)  # noqa: E731
    scores = per_bit(model, score, bits)
    print(f"| bits | perplexity ({args.windows} x {args.seq_len} tokens) |")
    print("|---:|---:|")
    for b, score in scores.items():
        print(f"| {b} | {score:.2f} |")


def cmd_plan(args: argparse.Namespace) -> None:
    from quept_hf.mixed_precision import plan_mixed_precision

    model, tokenizer = load_source(args.model)
    plans = plan_mixed_precision(model, read_texts(args.data), tokenizer=tokenizer, avg_bits=args.avg_bits)
    for name, plan in plans.items():
        print(f"{name}: {plan}")
    model.save_pretrained(args.model)


def cmd_export(args: argparse.Namespace) -> None:
    import quept_hf

    model, tokenizer = load_source(args.model)
    if args.format == "gguf":  # one .gguf per bit-width (--bits 2-8) or plan, into --out (a folder or a file)
        targets = parse_bits(args.bits) if args.bits[:1].isdigit() and not args.bits.isdigit() else [args.bits]
        if len(targets) > 1 and args.out.endswith(".gguf"):
            raise CliError(f"--out {args.out!r}: several bit-widths need a folder, not one .gguf file")
        for target in targets:
            target = int(target) if str(target).isdigit() else target
            path = quept_hf.export(model, target, args.out, format="gguf", tokenizer=tokenizer)
            logger.info("GGUF written to %s", path)
        return
    target = int(args.bits) if args.bits.isdigit() else args.bits
    quept_hf.export(model, target, args.out)
    tokenizer.save_pretrained(args.out)
    logger.info("packed %s model written to %s", args.bits, args.out)


def cmd_freeze(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quept_hf
    from quept_hf.atomic import staged_folder

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise CliError(f"--out {args.out!r} exists and is not an empty folder")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    plans = None if args.plans == "all" else [p for p in args.plans.split(",") if p]
    compensation = {}
    if args.error_compensation:
        if not os.path.isfile(args.error_compensation):
            raise CliError(f"--error-compensation {args.error_compensation!r} is not a text file")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        compensation = {"error_compensation": args.error_compensation, "tokenizer": tokenizer}
        if args.error_compensation_bits:
            compensation["error_compensation_bits"] = parse_bits(args.error_compensation_bits)
    elif args.error_compensation_bits:
        raise CliError("--error-compensation-bits needs --error-compensation FILE (the calibration text)")
    if args.zero_point:
        compensation["zero_point"] = parse_zero_point(args.zero_point)
    frozen = quept_hf.freeze(model, bits=parse_bits(args.bits), plans=plans, **compensation)
    with staged_folder(args.out) as staging:
        frozen.save_pretrained(staging)
        quept_hf.hub.write_card_files(frozen, staging)  # the card: kept widths and plans, sizes, quality if measured
        try:
            AutoTokenizer.from_pretrained(args.model).save_pretrained(staging)
        except (OSError, ValueError):
            logger.info("no tokenizer in %s: the frozen folder has none either", args.model)
    logger.info("frozen model (bits %s) written to %s", quept_hf.quept_config(frozen).bits, args.out)


def cmd_card(args: argparse.Namespace) -> None:
    from quept_hf.hub import model_card

    model, _ = load_source(args.model)
    card = model_card(model)
    card.save(os.path.join(args.model, "README.md"))
    print(card.content)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quept-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    calibrate = commands.add_parser("calibrate", help="make a float model elastic and calibrate it once")
    calibrate.add_argument("model", help="local folder, Hub id, or .gguf file")
    calibrate.add_argument("--mode", default="weight_only", choices=["weight_only", "weight_activation"])
    calibrate.add_argument("--bits", default="2-8", help="bit-widths, e.g. 2-8 or 3,4 (default 2-8)")
    calibrate.add_argument("--data", required=True, help="text file or saved datasets folder (text column)")
    calibrate.add_argument("--out", required=True, help="folder for the calibrated elastic model")
    calibrate.add_argument("--num-samples", type=int, default=128)
    calibrate.add_argument("--seq-len", type=int, default=512)
    calibrate.add_argument("--epochs", type=int, default=5)
    calibrate.add_argument("--rank", type=int, default=None, help="MB-CLoRA rank each bit group adds")
    calibrate.add_argument(
        "--zero-point",
        default="integer",
        help="integer (default), float, or per width like "
        "4:float,5:float (GGUF Q4_1/Q5_1's free minimum: those exports hold the grid exactly)",
    )
    calibrate.add_argument("--checkpoint-dir", default=None, help="resumable per-block checkpoints")
    calibrate.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push to this Hub repo")
    calibrate.set_defaults(func=cmd_calibrate)

    evaluate = commands.add_parser("eval", help="held-out perplexity at each bit-width")
    evaluate.add_argument("model")
    evaluate.add_argument("--bits", default="all")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--windows", type=int, default=16)
    evaluate.add_argument("--seq-len", type=int, default=512)
    evaluate.set_defaults(func=cmd_eval)

    plan = commands.add_parser("plan", help="mixed-precision plans at average bit-widths (stored in the model)")
    plan.add_argument("model")
    plan.add_argument("--avg-bits", type=float, nargs="+", required=True)
    plan.add_argument("--data", required=True)
    plan.set_defaults(func=cmd_plan)

    export = commands.add_parser("export", help="packed low-bit checkpoint of one bit-width or plan")
    export.add_argument("model")
    export.add_argument("--bits", required=True, help="an int, w3, or a plan name such as mixed-3.25")
    export.add_argument("--out", required=True, help="folder (quept); .gguf file or folder (gguf)")
    export.add_argument("--format", default="quept", choices=["quept", "gguf"], help="quept (default) or gguf")
    export.set_defaults(func=cmd_export)

    freeze = commands.add_parser("freeze", help="deployable elastic model: codes of the kept bit-widths, switchable")
    freeze.add_argument("model", help="folder or Hub id of a saved elastic QuEPT model")
    freeze.add_argument("--bits", default="all", help="bit-widths to keep, e.g. 2,3,4,8 or 2-8 (default: all)")
    freeze.add_argument("--plans", default="all", help="stored plans to keep, comma-separated ('' for none)")
    freeze.add_argument(
        "--error-compensation", metavar="FILE", default=None,
        help="calibration text file: round with GPTQ error compensation on the calibrated grids (same size)",
    )  # fmt: skip
    freeze.add_argument(
        "--error-compensation-bits", metavar="BITS", default=None,
        help="the kept widths to compensate, e.g. 3 or 3,5 (default: every one from 3 bits)",
    )  # fmt: skip
    freeze.add_argument(
        "--zero-point", metavar="KINDS", default=None,
        help="freeze widths onto another grid kind, e.g. 4:symmetric (llama.cpp's Q4_0, exported exactly)",
    )  # fmt: skip
    freeze.add_argument("--out", required=True)
    freeze.set_defaults(func=cmd_freeze)

    card = commands.add_parser("card", help="(re)write the model card README.md of a saved model")
    card.add_argument("model")
    card.set_defaults(func=cmd_card)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, OSError) as error:
        parser.exit(2, f"quept-hf {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

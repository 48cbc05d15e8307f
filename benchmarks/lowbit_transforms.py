"""Low-bit pre-transforms on SmolLM2-135M: rotation for WbAb, smoothing for weight-only, a 4-bit KV cache.

    python benchmarks/lowbit_transforms.py            # the fuller setting
    python benchmarks/lowbit_transforms.py --quick    # short schedule for 2 busy CPU cores
    python benchmarks/lowbit_transforms.py --quick --part wa     # one part: wa (with kv), wo or kv

Every model is calibrated with QuEPT on Wikipedia articles and evaluated on OTHER articles
(quept_hf.assets.wikipedia_split), held-out perplexity on 512-token windows:
- wa: W4A4 / W6A6 / W8A8 without vs with QuaRot-style rotation (QuEPTConfig(rotation=False / True));
- wo: weight-only W2 / W3 without vs with AWQ-style smoothing (QuEPTConfig(smoothing=False / True));
- kv: the rotated W+A model with a 4-bit KV cache (perplexity at W8A8 and W4A4, and generate() text).
``--quick`` calibrates only the bit-widths it reports (one group each) and searches smoothing on a coarser grid.
Writes benchmarks/results/lowbit_transforms[_PART][_quick].csv (and .png).
"""

from __future__ import annotations

import argparse
import gc
import time

import _common as common
import torch

import quept_hf
from quept_hf.calibration import smoothing
from quept_hf.calibration.rotation import install_online_transforms

PROMPT = "What is the capital of France?"


def parse_args() -> argparse.Namespace:
    parser = common.parser(__doc__, quick="short schedule (tens of minutes on 2 busy CPU cores)")
    parser.add_argument("--part", choices=["wa", "wo", "kv", "all"], default="all")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32, help="rank each bit group adds to the cascade")
    parser.add_argument("--eval-windows", type=int, default=40, help="512-token held-out windows")
    return parser.parse_args()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smol = common.smollm2()
        self.tokenizer = self.smol.tokenizer
        self.rows: list[dict] = []

    def ppl(self, model) -> float:
        return self.smol.perplexity(model, self.args.eval_windows)

    def calibrated(self, mode: str, bits: list[int], **transforms) -> torch.nn.Module:
        """SmolLM2 loaded with QuEPT (rotation happens at load), then calibrated; prints the wall time."""
        groups = [[b] for b in bits] if self.args.quick else None
        config = quept_hf.QuEPTConfig(
            mode=mode,
            bits=None if groups is None else bits,
            bit_groups=groups,
            num_samples=self.args.num_samples,
            seq_len=self.args.seq_len,
            **transforms,
        )
        config.ranks = [self.args.rank] * len(config.bit_groups)
        model = self.smol.load(config)
        if mode == "weight_activation":  # round-to-nearest W4A4 first: the rotation alone, before calibration
            quept_hf.set_bits(model.eval(), 4)
            self.record("wa", f"RTN{' rotation' if transforms.get('rotation') else ''}", "W4A4", self.ppl(model))
        start = time.perf_counter()
        quept_hf.calibrate(model.eval(), self.smol.calib_texts, tokenizer=self.tokenizer, epochs=self.args.epochs)
        print(f"  calibrated {mode} {transforms} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        return model

    def record(self, part: str, setting: str, bits: str, value: float) -> None:
        self.rows.append({"part": part, "setting": setting, "bits": bits, "ppl": round(value, 3)})
        print(f"  {part:3} {setting:14} {bits:10} ppl {value:10.2f}", flush=True)

    def float_ppl(self) -> None:
        model = self.smol.load()
        self.record("-", "float", "16", self.ppl(model))

    def weight_activation(self, rotations: tuple[bool, ...] = (False, True)) -> None:
        for rotation in rotations:
            model = self.calibrated("weight_activation", [4, 6, 8], rotation=rotation)
            for bits in (4, 6, 8):
                quept_hf.set_bits(model, bits)
                self.record("wa", "rotation" if rotation else "no rotation", f"W{bits}A{bits}", self.ppl(model))
            if rotation:
                self.kv_cache(model)
            del model
            gc.collect()

    def weight_only(self) -> None:
        if self.args.quick:  # a coarser search: 10 exponents, 512 tokens per block
            smoothing.GRID, smoothing.SEARCH_TOKENS = 10, 512
        for smooth in (False, True):
            model = self.calibrated("weight_only", [2, 3], smoothing=smooth)
            for bits in (2, 3):
                quept_hf.set_bits(model, bits)
                self.record("wo", "smoothing" if smooth else "no smoothing", f"W{bits}", self.ppl(model))
            del model
            gc.collect()

    def kv_cache(self, model) -> None:
        """Switch the 4-bit KV cache on in the calibrated rotated model (config + re-installed transforms)."""
        config = quept_hf.quept_config(model)
        config.kv_bits = 4
        install_online_transforms(model, config)
        messages = [{"role": "user", "content": PROMPT}]
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        prompt = getattr(prompt, "input_ids", prompt)
        for bits in (8, 4):
            quept_hf.set_bits(model, bits)
            self.record("kv", "rotation+KV4", f"W{bits}A{bits}KV4", self.ppl(model))
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=24, do_sample=False)
            text = self.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
            print(f"  generate W{bits}A{bits}, 4-bit KV cache: {PROMPT!r} -> {text!r}", flush=True)

    def save(self) -> None:
        part = "" if self.args.part == "all" else f"_{self.args.part}"
        floats = {row["setting"]: row["ppl"] for row in self.rows if row["setting"] == "float"}
        plot = common.Plot(
            "bits", "ppl", series="setting", log=True, title="SmolLM2-135M low-bit transforms: held-out perplexity",
            where=lambda row: row["setting"] != "float", reference=floats,
        )  # fmt: skip
        common.write_results(f"lowbit_transforms{part}{'_quick' if self.args.quick else ''}", self.rows, plot)


def main() -> None:
    args = common.setup(parse_args(), dict(num_samples=16, seq_len=256, epochs=1, rank=16, eval_windows=8))
    bench = Bench(args)
    print(
        f"SmolLM2-135M: {args.num_samples} x {args.seq_len} calibration tokens, {args.epochs} epochs, "
        f"rank {args.rank}; held-out perplexity on {args.eval_windows} x 512 tokens",
        flush=True,
    )
    bench.float_ppl()
    if args.part in ("all", "wa", "kv"):
        bench.weight_activation((True,) if args.part == "kv" else (False, True))
    if args.part in ("all", "wo"):
        bench.weight_only()
    bench.save()


if __name__ == "__main__":
    main()

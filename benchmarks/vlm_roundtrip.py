"""Vision-language models end to end: calibrate, switch bits, generate, save and reload bit-identically.

    python benchmarks/vlm_roundtrip.py            # 4 epochs, language model + vision tower
    python benchmarks/vlm_roundtrip.py --quick    # 1 epoch

No vision-language weights install offline (../shared/ASSETS.md), so each real transformers class — LLaVA,
LLaVA-OneVision, Qwen2-VL — runs as a tiny randomly initialised model (tests/tiny_models.py) with a real
processor pipeline (image processor + tokenizer + image placeholders). Per class and bit-width: the
calibration loss proxy (mean |logits - float logits|), the greedy continuation, and whether the model saved with
``save_pretrained`` and reloaded with ``from_pretrained`` produces bit-identical logits and tokens.
Prints the table and writes benchmarks/results/vlm_roundtrip.csv (and .png).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch

import quept_hf  # noqa: F401  (registers quantization method "quept")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models

CLASSES = ("llava", "llava_onevision", "qwen2_vl")
BITS = [2, 3, 4, 5, 6, 7, 8]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--no-vision-tower", action="store_true", help="keep the vision towers in float")
    return parser.parse_args()


@torch.no_grad()
def run(model: torch.nn.Module, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return logits, tokens[:, inputs["input_ids"].shape[1] :]


def roundtrip(name: str, args: argparse.Namespace, folder: Path) -> list[list]:
    tiny = tiny_models.BUILDERS[name](folder)
    float_logits, _ = run(tiny.load(), tiny.inputs, args.new_tokens)
    start = time.time()
    model = tiny.load(
        mode="weight_only", ranks=[4] * 4, group_size=16, lr_lora=1e-5, lr_clip=0.1, epochs=args.epochs,
        num_samples=8, batch_size=1, dataset=tiny.calibration, quantize_vision_tower=not args.no_vision_tower,
    )  # fmt: skip
    seconds = time.time() - start
    before = {}
    for b in BITS:
        model.set_adapter(f"w{b}")
        before[b] = run(model, tiny.inputs, args.new_tokens)
    model.save_pretrained(folder / "saved")
    restored = tiny.auto_class.from_pretrained(folder / "saved").eval()
    rows = []
    for b in BITS:
        restored.set_adapter(f"w{b}")
        logits, tokens = run(restored, tiny.inputs, args.new_tokens)
        same = torch.equal(logits, before[b][0]) and torch.equal(tokens, before[b][1])
        error = (before[b][0] - float_logits).abs().mean().item()
        rows.append([type(model).__name__, b, f"{seconds:.1f}", f"{error:.5f}", tokens[0].tolist(), same])
    return rows


def main() -> None:
    args = common.setup(parse_args(), dict(epochs=1), threads=1, seed=None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CLASSES:
            rows += roundtrip(name, args, Path(tmp) / name)
    vision = "language model only" if args.no_vision_tower else "language model + vision tower"
    print(f"\nTiny random VLMs, weight-only 2..8 bits, {vision}, {args.epochs} epoch(s)")
    print(f"{'class':<42}{'bits':>5}{'calib s':>9}{'|logit err|':>13}  {'greedy tokens':<28}{'reload identical':>17}")
    for cls, b, seconds, error, tokens, same in rows:
        print(f"{cls:<42}{b:>5}{seconds:>9}{error:>13}  {tokens!s:<28}{same!s:>17}")
    header = ["class", "bits", "calibration_s", "mean_abs_logit_error", "greedy_tokens", "reload_identical"]
    plot = common.Plot("bits", "mean_abs_logit_error", series="class", log=True, title=f"tiny VLMs, {vision}")
    common.write_results("vlm_roundtrip", [dict(zip(header, row, strict=True)) for row in rows], plot)
    if not all(row[-1] for row in rows):
        raise SystemExit("a reloaded model differs from the saved one")


if __name__ == "__main__":
    main()

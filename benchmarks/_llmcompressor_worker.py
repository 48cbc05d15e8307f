"""One llm-compressor run for ``benchmarks/peers_llmcompressor.py``, in the llm-compressor venv.

    /work/llmc-venv/bin/python benchmarks/_llmcompressor_worker.py --model FLOAT_DIR --data DATA.json \\
        --method gptq --bits 4 [--group 64] [--down-group 128] --out RESULT.json

Not a benchmark by itself, and it imports nothing from quept_hf (llm-compressor 0.14 pins transformers <= 5.17,
older than the project's). It loads the float model (float32), applies ``llmcompressor.oneshot`` with a
GPTQModifier recipe (``--method gptq``) or an AWQModifier + QuantizationModifier recipe (``--method awq``) on
the calibration token windows of ``DATA.json`` (``--method float``: no quantization, the check of the
perplexity formula), then scores the fake-quantized model on the evaluation windows of each corpus with
quept_hf.evaluation.perplexity's formula: exp of the mean next-token NLL, batches of 4 windows of one length,
the first ``len - targets`` tokens of a window masked. Weights: asymmetric integers, ``--group`` columns per
scale (default: one scale per output channel), lm_head left float. Writes ``RESULT.json``: perplexity per
corpus, CPU seconds (``time.process_time``) and wall seconds of the quantization step, or the error.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

IGNORE_INDEX = -100
BATCH_SIZE = 4  # as quept_hf.evaluation.perplexity
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

logger = logging.getLogger("llmcompressor_worker")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="float model folder")
    parser.add_argument("--data", required=True, help="JSON with 'calibration' and 'evaluation' token windows")
    parser.add_argument("--method", choices=("float", "gptq", "awq"), required=True)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--group", type=int, default=None, help="columns per scale (default: per output channel)")
    parser.add_argument("--down-group", type=int, default=None, help="another group size for down_proj only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", required=True, help="result JSON")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------ recipe


def weight_args(bits: int, group: int | None) -> dict[str, Any]:
    """Asymmetric integer weights, per group of ``group`` columns or per output channel."""
    strategy = {"strategy": "group", "group_size": group} if group else {"strategy": "channel"}
    return {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False, **strategy}


def config_groups(bits: int, group: int | None, down_group: int | None) -> dict[str, dict]:
    """One scheme for every decoder projection, or two when down_proj (1536 columns) gets its own group size."""
    if down_group is None:
        return {"group_0": {"targets": ["Linear"], "weights": weight_args(bits, group)}}
    others = "|".join(p for p in PROJECTIONS if p != "down_proj")
    return {
        "group_0": {"targets": [f"re:.*({others})$"], "weights": weight_args(bits, group)},
        "group_1": {"targets": ["re:.*down_proj$"], "weights": weight_args(bits, down_group)},
    }


def recipe(method: str, bits: int, group: int | None, down_group: int | None) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    groups = config_groups(bits, group, down_group)
    if method == "gptq":  # llm-compressor's defaults: static act-order, block 128, dampening 0.01
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    # AWQ scales the input channels of each smoothed layer group (grid search, 20 points, duo scaling), then
    # QuantizationModifier rounds the scaled weights (min/max observer).
    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


def skip_pinning() -> str | None:
    """Without an accelerator, make llm-compressor's activation cache skip ``pin_memory``; what was done, or None.

    llm-compressor 0.14's AWQ pins its cached CPU activations before each grid search
    (``IntermediatesCache.pin_memory`` in ``AWQModifier._apply_smoothing``), and CPU-only torch refuses:
    "RuntimeError: Cannot access accelerator device when none is available." Pinned memory only speeds copies
    to an accelerator; with none the cached tensors are used where they are, so nothing else changes.
    """
    if torch.accelerator.is_available():
        return None
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return "IntermediatesCache.pin_memory skipped (CPU-only torch cannot pin memory)"


def calibration_loader(windows: list[list[int]]) -> torch.utils.data.DataLoader:
    """The given token windows, one per batch, in order (no shuffling, no padding: all the same length)."""
    samples = [{"input_ids": torch.tensor(w), "attention_mask": torch.ones(len(w), dtype=torch.long)} for w in windows]
    return torch.utils.data.DataLoader(samples, batch_size=1, shuffle=False)


def quantize(model: torch.nn.Module, args: argparse.Namespace, windows: list[list[int]]) -> dict[str, float]:
    """``oneshot`` in place; CPU and wall seconds of it (and the workaround applied, if any)."""
    from llmcompressor import oneshot

    note = skip_pinning() if args.method == "awq" else None
    cpu, wall = time.process_time(), time.perf_counter()
    oneshot(
        model=model,
        recipe=recipe(args.method, args.bits, args.group, args.down_group),
        dataset=calibration_loader(windows),
        num_calibration_samples=len(windows),
        max_seq_length=len(windows[0]),
    )
    seconds = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
    return {**seconds, "workaround": note} if note else seconds


# ------------------------------------------------------------------------------------------ perplexity


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[dict]) -> dict[str, float]:
    """quept_hf.evaluation.perplexity's formula on these windows (``ids`` + the ``targets`` scored at its end)."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(windows), BATCH_SIZE):
        for group in same_length(windows[start : start + BATCH_SIZE]):
            inputs = torch.tensor([w["ids"] for w in group])
            labels = inputs.clone()
            for row, window in enumerate(group):
                labels[row, : len(window["ids"]) - window["targets"]] = IGNORE_INDEX
            logits = model(input_ids=inputs).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return {"perplexity": math.exp(nll / count), "tokens": count}


def same_length(batch: list[dict]) -> list[list[dict]]:
    groups: dict[int, list[dict]] = {}
    for window in batch:
        groups.setdefault(len(window["ids"]), []).append(window)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = json.loads(Path(args.data).read_text())
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    result: dict[str, Any] = {"method": args.method, "bits": args.bits, "group": args.group}
    if args.method != "float":
        logger.info("oneshot %s W%d group %s on %d calibration windows", args.method, args.bits, args.group,
                    len(data["calibration"]))  # fmt: skip
        result.update(quantize(model, args, data["calibration"]))
    for corpus, windows in data["evaluation"].items():
        scored = perplexity(model, windows)
        result[corpus], result[f"{corpus} tokens"] = scored["perplexity"], scored["tokens"]
        logger.info("%s W%d %s perplexity %.4f", args.method, args.bits, corpus, scored["perplexity"])
    return result


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        result = run(args)
    except Exception as error:  # reported to the parent, which goes on with the next run
        traceback.print_exc()
        result = {"method": args.method, "bits": args.bits, "error": f"{type(error).__name__}: {error}"}
    Path(args.out).write_text(json.dumps(result))
    raise SystemExit(1 if "error" in result else 0)


if __name__ == "__main__":
    main()

"""Models larger than memory: peak RSS and time per block of calibration and freeze with the weights on disk.

Synthetic Llama configurations (~0.1B, ~0.4B, ~1.5B parameters, random weights, saved once in bf16 under
benchmarks/results/scaling-cache/) are loaded with ``device_map`` putting every decoder block on "disk"
(embeddings, final norm and head stay on the CPU) and ``offload_folder``; then one QuEPT calibration (1 epoch,
a tiny budget), a streamed freeze (`quept_hf.packing.stream.save_frozen`) and the streamed exports: GGUF
(`quept_hf.export(..., format="gguf")`), packed (`quept_hf.export`) and compressed-tensors
(`export_compressed_tensors`), all block by block. Each size runs in its own process,
so each peak is its own (``VmHWM``, reset after loading and between calibration and freeze through
``/proc/self/clear_refs``; loading's peak counts the checkpoint's file pages that transformers maps).

    python benchmarks/scaling.py            # 0.1B, 0.4B, 1.5B, every block (~12 min on 2 idle cores)
    python benchmarks/scaling.py --quick    # 0.1B with 4 blocks (~15 s idle, ~2 min busy)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch

CACHE = common.RESULTS / "scaling-cache"
VOCAB = 32000
# name: (hidden, intermediate, layers, heads, kv heads)
SIZES = {
    "0.1B": (768, 2048, 12, 12, 4),
    "0.4B": (1024, 4096, 24, 16, 8),
    "1.5B": (2048, 5632, 32, 16, 4),
}
QUICK = {"sizes": ["0.1B"], "layers": 4}


def _config(name: str, layers: int | None = None):
    from transformers import LlamaConfig

    hidden, inter, depth, heads, kv = SIZES[name]
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or depth,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip


def model_dir(name: str, layers: int | None = None) -> Path:
    """The float bf16 checkpoint of a size, created once (random weights, seeded) and cached."""
    from transformers import LlamaForCausalLM

    folder = CACHE / f"llama-{name}-{layers or SIZES[name][2]}L"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(_config(name, layers))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():  # N(0, 0.02) like Llama's init, norms at 1
            param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _BlockTimes(logging.Handler):
    """Wall time and RSS at each 'block N calibrated' debug line of the engine."""

    def __init__(self, progress: Path):
        super().__init__(logging.DEBUG)
        self.marks: list[tuple[float, int]] = []
        self.progress = progress

    def emit(self, record):
        if "calibrated: last losses" in record.getMessage():
            self.marks.append((time.perf_counter(), _rss()))
            # A run stopped early still tells its per-block times and memory.
            self.progress.write_text(json.dumps({"marks": self.marks, "peak_rss": _peak_rss()}))


def _limit_blocks(count: int | None) -> None:
    """Calibrate only the first ``count`` blocks of each chain (the model keeps all of them)."""
    if not count:
        return
    from quept_hf.calibration import engine

    run_chain = engine._run_chain

    def limited(base, arch, chain, *args, **kwargs):
        return run_chain(base, arch, dataclasses.replace(chain, blocks=chain.blocks[:count]), *args, **kwargs)

    engine._run_chain = limited


def run_one(name: str, layers: int | None, args) -> dict:
    """Calibrate and freeze one size in THIS process; returns its row."""
    from transformers import AutoModelForCausalLM

    import quept_hf
    from quept_hf.packing.interop import export_compressed_tensors
    from quept_hf.packing.stream import save_frozen

    folder = model_dir(name, layers)
    config = json.loads((folder / "config.json").read_text())
    depth = config["num_hidden_layers"]
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" for i in range(depth)}
    ids = torch.randint(0, VOCAB, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    times = _BlockTimes(common.RESULTS / f"scaling-progress-{name}.json")
    _limit_blocks(args.calibrate_blocks)
    logging.getLogger("quept_hf.calibration.engine").addHandler(times)
    logging.getLogger("quept_hf.calibration.engine").setLevel(logging.DEBUG)
    work = Path(tempfile.mkdtemp(prefix="quept-scaling-", dir=args.work))
    try:
        qconfig = quept_hf.QuEPTConfig(
            num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size, epochs=1,
            smoothing=args.smoothing, ranks=[4, 4, 4, 4], gradient_checkpointing=args.gradient_checkpointing,
        )  # fmt: skip
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qconfig, device_map=device_map, offload_folder=str(work / "offload"),
            dtype=torch.float32,
        )  # fmt: skip
        loaded = time.perf_counter()
        load_peak = _peak_rss()  # transformers maps the checkpoint's files while loading: file pages, evictable
        _reset_peak()
        before_calibration = _rss()  # interpreter, torch, resident weights: what the plan's block peak adds to
        plan = quept_hf.calibration.plan(model, qconfig)
        quept_hf.calibrate(model, ids, epochs=1)
        calibrated = time.perf_counter()
        calib_peak = _peak_rss()
        steps = {
            "freeze": lambda: save_frozen(model, work / "frozen", bits=args.freeze_bits),
            "gguf": lambda: quept_hf.export(model, args.export_bits, work / "model.gguf", format="gguf"),
            "packed": lambda: quept_hf.export(model, args.export_bits, work / "packed"),
            "ct": lambda: export_compressed_tensors(model, args.export_bits, work / "compressed-tensors"),
        }
        measured = {}
        for step, run in steps.items():
            if (args.freeze_bits != [0]) if step == "freeze" else args.export_bits:
                _reset_peak()
                began = time.perf_counter()
                run()
                measured[step] = (time.perf_counter() - began, _peak_rss())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_block = [b - a for (a, _), (b, _) in zip(times.marks, times.marks[1:], strict=False)]
    params = sum(int(v) for v in [config["vocab_size"] * config["hidden_size"]])
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    block_params = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    params += depth * block_params
    return {
        "size": name,
        "params_M": round(params / 1e6),
        "hidden": hidden,
        "blocks": depth,
        "calibrated_blocks": len(times.marks),
        "weights_fp32_GiB": round(params * 4 / 2**30, 2),
        "block_fp32_MiB": round(block_params * 4 / 2**20),
        "plan_block_peak_MiB": round(plan.block_peak / 2**20),
        "activations_MiB": round(plan.activations / 2**20, 1),
        "load_peak_rss_GiB": round(load_peak / 2**30, 2),
        "calib_peak_rss_GiB": round(calib_peak / 2**30, 2),
        "rss_before_calib_GiB": round(before_calibration / 2**30, 2),
        "calib_over_start_MiB": round((calib_peak - before_calibration) / 2**20),  # compare plan_block_peak_MiB
        "rss_first_block_GiB": round(times.marks[0][1] / 2**30, 2) if times.marks else None,
        "rss_last_block_GiB": round(times.marks[-1][1] / 2**30, 2) if times.marks else None,
        "calib_s_per_block": round(sorted(per_block)[len(per_block) // 2], 1) if per_block else None,
        "calib_total_s": round(calibrated - loaded, 1),
        "load_s": round(loaded - start, 1),
        "freeze_bits": " ".join(map(str, args.freeze_bits)),
        "samples_x_tokens": f"{args.samples}x{args.seq_len}",
        "gradient_checkpointing": args.gradient_checkpointing,
        "export_bits": args.export_bits,
        **{f"{step}_peak_rss_GiB": round(peak / 2**30, 2) for step, (_, peak) in measured.items()},
        **{f"{step}_s_per_block": round(seconds / depth, 2) for step, (seconds, _) in measured.items()},
    }


def main() -> None:
    parser = common.parser(__doc__, quick="0.1B with 4 blocks (~15 s idle, ~2 min busy)", threads=None)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--layers", type=int, default=None, help="blocks per model (default: the size's own)")
    parser.add_argument("--samples", type=int, default=2, help="calibration samples (default 2: one step per block)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--calibrate-blocks", type=int, default=None, help="calibrate the first N blocks only "
                        "(default: all; the rest have the same shapes, so the same cost and memory)")  # fmt: skip
    parser.add_argument("--freeze-bits", type=int, nargs="+", default=[4], help="kept widths (0: no freeze)")
    parser.add_argument("--export-bits", "--gguf-bits", type=int, default=4, help="the streamed exports (GGUF, "
                        "packed, compressed-tensors) at this width (0: none)")  # fmt: skip
    parser.add_argument("--smoothing", action="store_true", help="AWQ-style smoothing (off: it dominates the time)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="QuEPTConfig(gradient_checkpointing=True): weight copies recomputed in backward",
    )
    parser.add_argument("--work", default=None, help="folder for the offload folders (default: the temp dir)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one size in this process, print its row
    args = common.setup(parser.parse_args(), QUICK)
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.layers, args)), flush=True)
        return
    rows = []
    for name in args.sizes:
        model_dir(name, args.layers)  # in a process of its own: creating the weights is not measured
        command = [sys.executable, __file__, "--one", name, "--samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--batch-size", str(args.batch_size)]  # fmt: skip
        command += ["--layers", str(args.layers)] if args.layers else []
        command += ["--freeze-bits", *map(str, args.freeze_bits), "--export-bits", str(args.export_bits)]
        command += ["--calibrate-blocks", str(args.calibrate_blocks)] if args.calibrate_blocks else []
        command += ["--smoothing"] if args.smoothing else []
        command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        command += ["--threads", str(args.threads)] if args.threads else []
        command += ["--work", args.work] if args.work else []
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROW "))[4:])
        print(row, flush=True)
        rows.append(row)
    name = "scaling_quick" if args.quick else "scaling"
    common.write_results(name + ("_checkpointing" if args.gradient_checkpointing else ""), rows)


if __name__ == "__main__":
    main()

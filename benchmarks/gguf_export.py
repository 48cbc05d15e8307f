"""GGUF export of SmolLM2-135M per bit-width: types, true bits per weight, error against QuEPT, llama.cpp's logits.

    python benchmarks/gguf_export.py                      # uncalibrated (round-to-nearest) elastic SmolLM2
    python benchmarks/gguf_export.py --model DIR          # a saved (calibrated) elastic QuEPT folder
    python benchmarks/gguf_export.py --quick              # W4 and W2 only, one window

For each width: `export_gguf`, the file's tensor types and bits per weight, the relative RMS error of its linear
weights (gguf-py's dequantization) against QuEPT's dequantized weight, and, when llama_cpp imports, llama.cpp's
held-out perplexity on the same 512-token windows as quept_hf's model at that width (the engine check of
docs/RESULTS.md "GGUF export"; the ladder against llama.cpp's own quantization is a separate benchmark).
Writes benchmarks/results/gguf_export.csv.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as common
import gguf
import numpy as np
import torch

import quept_hf
from quept_hf.cli import parse_bits
from quept_hf.packing.gguf import export_gguf, gguf_summary, permute_rows
from quept_hf.packing.plan import quantize_layers, resolve_plan
from quept_hf.packing.working import dequantize_codes


def parse_args():
    parser = common.parser(__doc__)
    parser.add_argument("--model", default=None, help="saved elastic QuEPT folder (default: uncalibrated SmolLM2)")
    parser.add_argument("--bits", default="2-8", help="bit-widths, e.g. 2-8 or 2,4")
    parser.add_argument("--windows", type=int, default=4, help="held-out 512-token windows")
    parser.add_argument("--out", default=None, help="folder for the .gguf files (default: a temporary one)")
    return common.setup(parser.parse_args(), quick={"bits": "2,4", "windows": 1})


def weight_errors(model, bits: int, path: str) -> dict[str, float]:
    """``{type: relative RMS error}`` of the file's linears against QuEPT's dequantized weight (HF row order)."""
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    sums: dict[str, list[float]] = {}
    for module, q in quantize_layers(model, resolve_plan(model, bits)[1]).items():
        weight = dequantize_codes(q.codes, q.scales, q.zeros, q.group_size).float().numpy()
        tensor = stored[tmap.get_name(module + ".weight", try_suffixes=(".weight",))]
        x = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if ".q_proj" in module or ".k_proj" in module:
            order = permute_rows(x.shape[0], heads, heads if ".q_proj" in module else kv).numpy()
            x = x[np.argsort(order)]
        total = sums.setdefault(tensor.tensor_type.name, [0.0, 0.0])
        total[0] += float(((x - weight) ** 2).sum())
        total[1] += float((weight**2).sum())
    return {name: (err / ref) ** 0.5 for name, (err, ref) in sums.items()}


def windows(smol, count: int) -> list[list[int]]:
    ids = smol.tokenizer("\n\n".join(smol.eval_texts))["input_ids"]
    return [ids[i * 512 : (i + 1) * 512] for i in range(count)]


def nll(logits: np.ndarray, ids: list[int]) -> float:
    logp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), -1)
    return float(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())


def perplexities(model, bits: int, path: str, chunks: list[list[int]]) -> tuple[float, float]:
    """(llama.cpp, quept_hf) perplexity over the same windows; NaN for llama.cpp when it does not import."""
    quept_hf.set_bits(model, bits)
    tokens = sum(len(c) - 1 for c in chunks)
    with torch.no_grad():
        ours = sum(nll(model(input_ids=torch.tensor([c])).logits[0].numpy(), c) for c in chunks)
    try:
        import llama_cpp
    except (ImportError, OSError):
        return float("nan"), float(np.exp(ours / tokens))
    llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    engine = 0.0
    for chunk in chunks:
        llm.reset()
        llm.eval(chunk)
        engine += nll(np.array(llm.scores[: len(chunk)], dtype=np.float32), chunk)
    llm.close()
    return float(np.exp(engine / tokens)), float(np.exp(ours / tokens))


def main() -> None:
    args = parse_args()
    smol = common.smollm2()
    config = None if args.model else quept_hf.QuEPTConfig(mode="weight_only")
    model = smol.load(config) if args.model is None else common.SmolLM2(args.model, smol.tokenizer, [], []).load()
    out = Path(args.out or tempfile.mkdtemp(prefix="gguf_export_"))
    chunks = windows(smol, args.windows)
    rows = []
    for bits in parse_bits(args.bits):
        start = time.perf_counter()
        path = export_gguf(model, bits, out / f"smollm2-w{bits}.gguf", overwrite=True)
        seconds = time.perf_counter() - start
        summary = gguf_summary(path)
        linear = {k: v for k, v in summary["type_counts"].items() if k not in ("F32",)}
        engine, ours = perplexities(model, bits, path, chunks)
        errors = weight_errors(model, bits, path)
        rows.append(
            {
                "bits": bits,
                "types": " ".join(f"{k}:{v}" for k, v in linear.items()),
                "linear_bpw": round(summary["linear_bpw"], 3),
                "file_bpw": round(summary["file_bpw"], 3),
                "MB": round(summary["bytes"] / 1e6, 1),
                "rel_rms_vs_quept": " ".join(f"{k}:{v:.1e}" for k, v in errors.items()),
                "ppl_llama_cpp": round(engine, 3),
                "ppl_quept_hf": round(ours, 3),
                "export_s": round(seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    common.write_results("gguf_export", rows)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()

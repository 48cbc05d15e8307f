"""The GGUF ladder of SmolLM2-135M under llama.cpp's own evaluation: llama.cpp's quantizer (with and without an
importance matrix) against ONE QuEPT calibration exported at every width.

    python benchmarks/gguf_ladder.py            # 7 rungs; QuEPT 16 x 256 tokens, 1 epoch, smoothing off (cached)
    python benchmarks/gguf_ladder.py --quick    # Q2_K and Q4_1 rungs, QuEPT 4 x 128 tokens, 4 chunks: minutes

Every number comes from llama.cpp's own tools, built once from the vendored sources (`_llama_tools.py`):

* float files: the vendored `convert_hf_to_gguf.py` of the SmolLM2 float folder to F32 (tokenizer fields from
  the source GGUF, as QuEPT's export), `llama-quantize` F32 -> F16;
* llama.cpp's ladder: `llama-quantize` of the F32 file to each type, plain and with `--imatrix` from
  `llama-imatrix` on the SAME calibration windows QuEPT calibrates on (decoded to text, chunks of that length);
  token embedding (tied output) at Q8_0 in every file, as QuEPT's export, so the rungs differ in the linears only;
* QuEPT: one elastic calibration (`--num-samples` x `--calib-len` tokens, `--epochs`, rank `--rank` per bit group,
  group `--group-size` at every width: GGUF stores a scale per 32 weights anyway; `--zero-point`, by default a
  float zero point at 4 and 5 bits, the Q4_1/Q5_1 block's free minimum), cached in
  benchmarks/.gguf-ladder/ so reruns skip it, then `quept_hf.export(model, "wB", path, format="gguf")` per rung
  (the Q4_0 rung: W4's calibrated clipping frozen onto Q4_0's symmetric grid,
  `quept_hf.freeze(model, bits=[4], zero_point={4: "symmetric"})`, then exported exactly);
* QuEPT+comp: the same calibration frozen with error compensation on the same calibration windows
  (`quept_hf.freeze(model, error_compensation=texts)`: GPTQ rounding on the calibrated grid, each row's grid
  searched; 2 bits keep plain rounding; the Q4_0 rung's GPTQ runs on its symmetric grid), exported the same way
  (`--no-compensation` leaves it out);
* held-out perplexity: `llama-perplexity` on the held-out Wikipedia articles (`--chunks` x 512-token chunks,
  llama.cpp scores the second half of each chunk); decode speed: `llama-bench -p 0 -n N`;
* true bits per weight of each file (linear weights, and every tensor) from its tensor types.

NOTE: SmolLM2's float weights ARE a dequantized Q4_1 grid (blocks of 32): llama.cpp's own Q4_0/Q4_1 of them is
nearly lossless, a degenerate rung for this model; the 2-3-bit rungs and Q5+ are the informative ones.
Writes benchmarks/results/gguf_ladder.csv (one row per file) and prints the ladder and the ratios.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import _common as common  # before torch: sets OMP_WAIT_POLICY
import _llama_tools as llama_tools
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import assets
from quept_hf.calibration.data import text_windows
from quept_hf.cli import parse_zero_point
from quept_hf.packing.gguf import gguf_summary

WORK = Path(__file__).resolve().parent / ".gguf-ladder"
# llama.cpp's rung -> the QuEPT width exported for it; RUNG_TYPES: the GGUF type it takes where not the width's own
RUNGS = {"Q2_K": 2, "Q3_K_M": 3, "Q4_0": 4, "Q4_1": 4, "Q5_1": 5, "Q6_K": 6, "Q8_0": 8}
RUNG_TYPES = {"Q4_0": {4: "Q4_0"}}  # the GGUF type of a rung that is not its width's own
# rungs whose width is frozen onto the type's own grid (`freeze(zero_point=...)`), exported exactly
RUNG_GRIDS = {"Q4_0": {4: "symmetric"}}
QUICK_RUNGS = "Q2_K,Q4_1"


def parse_args():
    parser = common.parser(__doc__, threads=2)
    parser.add_argument("--rungs", default=",".join(RUNGS), help=f"llama.cpp types (default all: {','.join(RUNGS)})")
    parser.add_argument("--chunks", type=int, default=12, help="held-out 512-token chunks for llama-perplexity")
    parser.add_argument("--num-samples", type=int, default=16, help="QuEPT (and imatrix) calibration windows")
    parser.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--epochs", type=int, default=1, help="QuEPT calibration epochs")
    parser.add_argument("--rank", type=int, default=16, help="MB-CLoRA rank each bit group adds")
    parser.add_argument("--group-size", type=int, default=32, help="QuEPT group size at every width (-1: channel)")
    parser.add_argument("--gen-tokens", type=int, default=32, help="llama-bench decode tokens per repetition")
    parser.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs if llama.cpp's tools must be built")
    parser.add_argument("--fresh", action="store_true", help="redo the GGUF files (the calibration stays cached)")
    parser.add_argument("--no-compensation", action="store_true", help="leave the QuEPT+comp files out")
    parser.add_argument("--smoothing", default="off", choices=["on", "off"], help="QuEPT's smoothing (default "
                        "off: it keeps SmolLM2's own Q4_1 grid reachable, and won Q4_0/Q4_1/Q5_1 in docs/RESULTS.md; "
                        "on is QuEPTConfig's weight-only default)")  # fmt: skip
    parser.add_argument("--zero-point", default="4:float,5:float", help="QuEPT's zero point per width: 'integer', "
                        "'float' or BITS:KIND comma-separated (default: float at 4 and 5 bits, Q4_1/Q5_1's free "
                        "minimum, so those rungs hold the calibrated grid exactly)")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the CSV name (keeps runs apart)")
    quick = {"rungs": QUICK_RUNGS, "chunks": 4, "num_samples": 4, "calib_len": 128, "gen_tokens": 16, "reps": 1}
    return common.setup(parser.parse_args(), quick=quick)


# ----------------------------------------------------------------------------------------------- QuEPT


def calibration_settings(args) -> dict:
    keys = ("num_samples", "calib_len", "epochs", "rank", "group_size")
    settings = {k: getattr(args, k) for k in keys} | ({"smoothing": args.smoothing} if args.smoothing else {})
    return settings | ({"zero_point": args.zero_point} if args.zero_point != "integer" else {})  # old keys stay


def quept_model(smol: common.SmolLM2, args) -> tuple[torch.nn.Module, Path]:
    """The calibrated elastic model, from the cache folder of these settings when a previous run saved it."""
    settings = calibration_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = WORK / f"quept-{key}"
    if (folder / "config.json").is_file():
        print(f"QuEPT: cached calibration {folder} {settings}", flush=True)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), folder
    smoothing = {} if args.smoothing is None else {"smoothing": args.smoothing == "on"}
    config = quept_hf.QuEPTConfig(
        mode="weight_only", num_samples=args.num_samples, seq_len=args.calib_len, group_size=args.group_size,
        zero_point=parse_zero_point(args.zero_point), **smoothing,
    )  # fmt: skip
    config.ranks = [args.rank] * len(config.bit_groups)
    model = smol.load(config)
    print(f"QuEPT: calibrating once for bits {config.bits} {settings} ...", flush=True)
    start = time.perf_counter()
    quept_hf.calibrate(model, smol.calib_texts, tokenizer=smol.tokenizer, epochs=args.epochs)
    minutes = (time.perf_counter() - start) / 60
    print(f"QuEPT: calibrated in {minutes:.1f} min", flush=True)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    (staging / "ladder_settings.json").write_text(json.dumps({**settings, "minutes": minutes}))
    os.replace(staging, folder)
    return model, folder


def compensated(model, smol: common.SmolLM2, folder: Path, rungs: list[str], args) -> torch.nn.Module:
    """The calibration frozen with error compensation on its own calibration windows (skipped when cached)."""
    widths = sorted({RUNGS[rung] for rung in rungs if rung not in RUNG_GRIDS})
    if not widths or (not args.fresh and all(quept_path(folder, rung, "-comp").is_file() for rung in rungs)):
        return model  # unused: every file exists, or every rung freezes on a grid of its own (`rung_model`)
    start = time.process_time()
    texts = smol.calib_texts
    frozen = quept_hf.freeze(model, bits=widths, plans=[], error_compensation=texts, tokenizer=smol.tokenizer)
    print(f"QuEPT: frozen with error compensation in {time.process_time() - start:.0f} CPU-s", flush=True)
    return frozen


def rung_model(model, rung: str, compensation: dict) -> torch.nn.Module:
    """``model`` (elastic or frozen) for ``rung``: where the rung's type has a grid of its own (`RUNG_GRIDS`), the
    elastic model's width frozen onto it (with ``compensation``: GPTQ on that grid), else ``model`` itself."""
    if rung not in RUNG_GRIDS:
        return model
    start = time.process_time()
    frozen = quept_hf.freeze(model, bits=[RUNGS[rung]], plans=[], zero_point=RUNG_GRIDS[rung], **compensation)
    print(f"QuEPT: {rung} rung frozen on {RUNG_GRIDS[rung]} in {time.process_time() - start:.0f} CPU-s", flush=True)
    return frozen


# ------------------------------------------------------------------------------------------ the files


@dataclass
class Entry:
    """One GGUF file of the ladder: who made it (``kind``), for which rung, and where it is."""

    kind: str  # "float", "llama.cpp", "llama.cpp+imatrix", "QuEPT", "QuEPT+comp"
    rung: str
    path: Path
    width: int | None = None


def run(command: list, what: str) -> str:
    """A llama.cpp tool's combined output; on failure the tail of it is in the error."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode:
        tail = (result.stdout + result.stderr)[-3000:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(map(str, command))}\n{tail}")
    return result.stdout + result.stderr


def texts(smol: common.SmolLM2, args) -> tuple[Path, Path]:
    """calibration.txt: QuEPT's calibration windows (same seed), decoded; heldout.txt: the held-out articles."""
    ids = text_windows(smol.calib_texts, smol.tokenizer, args.num_samples, args.calib_len, seed=0)
    calib = WORK / f"calibration-{args.num_samples}x{args.calib_len}.txt"
    calib.write_text("\n\n".join(smol.tokenizer.decode(row) for row in ids.tolist()))
    heldout = WORK / "heldout.txt"
    heldout.write_text("\n\n".join(smol.eval_texts))
    return calib, heldout


def float_files(smol: common.SmolLM2, tools: dict, fresh: bool) -> tuple[Path, Path]:
    f32, f16 = WORK / "smollm2-F32.gguf", WORK / "smollm2-F16.gguf"
    if fresh or not f32.is_file():
        print("convert_hf_to_gguf.py: SmolLM2 float folder -> F32", flush=True)
        llama_tools.convert(smol.folder, f32, "f32", vocab_from=os.path.join(*assets.smollm2_gguf()))
    if fresh or not f16.is_file():
        run([tools["llama-quantize"], f32, f16, "F16"], "llama-quantize F16")
    return f32, f16


def imatrix(tools: dict, f32: Path, calib: Path, args) -> Path:
    out = WORK / f"imatrix-{args.num_samples}x{args.calib_len}.gguf"
    if args.fresh or not out.is_file():
        print(f"llama-imatrix on {calib.name} (chunks of {args.calib_len})", flush=True)
        command = [tools["llama-imatrix"], "-m", f32, "-f", calib, "-o", out, "-c", args.calib_len]
        run([*command, "-t", args.threads, "--no-ppl"], "llama-imatrix")
    return out


def llama_quantized(tools: dict, f32: Path, rung: str, matrix: Path | None, args) -> Path:
    """llama-quantize of the F32 file to ``rung`` (embedding/output at Q8_0 like QuEPT's export)."""
    out = WORK / f"llama-{rung}{'-' + matrix.stem if matrix else ''}.gguf"  # imatrix-NxL: its calibration
    if args.fresh or not out.is_file():
        extra = ["--imatrix", matrix] if matrix else []
        types = ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
        run([tools["llama-quantize"], *extra, *types, f32, out, rung, args.threads], f"llama-quantize {rung}")
    return out


def quept_path(folder: Path, rung: str, suffix: str = "") -> Path:
    """QuEPT's file for ``rung`` (named by width, by type where the rung sets one, and by the grid it froze on)."""
    types = "".join(f"-{t.lower()}" for t in RUNG_TYPES.get(rung, {}).values())
    grids = "".join(f"-{k}" for k in RUNG_GRIDS.get(rung, {}).values())
    return WORK / f"{folder.name}{suffix}-w{RUNGS[rung]}{types}{grids}.gguf"


def quept_file(source, folder: Path, rung: str, args, suffix: str = "") -> Path:
    """The QuEPT file of ``rung``; ``source()`` gives the model to export (only called when the file is made)."""
    out = quept_path(folder, rung, suffix)
    if args.fresh or not out.is_file():
        vocab = os.path.join(*assets.smollm2_gguf())  # the same tokenizer fields as llama.cpp's files
        quept_hf.export(source(), f"w{RUNGS[rung]}", out, format="gguf", tokenizer=vocab, overwrite=True,
                        weight_types=RUNG_TYPES.get(rung))  # fmt: skip
    return out


# -------------------------------------------------------------------------------------------- measuring


def perplexity(tools: dict, path: Path, heldout: Path, args) -> tuple[float, float]:
    command = [tools["llama-perplexity"], "-m", path, "-f", heldout, "-c", 512, "-b", 512]
    text = run([*command, "--chunks", args.chunks, "-t", args.threads], f"llama-perplexity {path.name}")
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if match is None:
        raise RuntimeError(f"llama-perplexity {path.name}: no final estimate in its output:\n{text[-2000:]}")
    return float(match.group(1)), float(match.group(2))


def decode_speed(tools: dict, path: Path, args) -> float:
    """llama-bench decode tokens/s (``-p 0 -n N``; mean over ``--reps``)."""
    command = [tools["llama-bench"], "-m", path, "-p", 0, "-n", args.gen_tokens, "-r", args.reps]
    text = run([*command, "-t", args.threads, "-o", "json"], f"llama-bench {path.name}")
    results = json.loads(text[text.index("[") : text.rindex("]") + 1])
    return float(next(r["avg_ts"] for r in results if r.get("n_gen")))


def measure(entry: Entry, tools: dict, heldout: Path, args) -> dict:
    summary = gguf_summary(entry.path)
    linear = {t for n, t in summary["types"].items() if n.startswith("blk.") and not n.endswith("norm.weight")}
    counts = {t: c for t, c in summary["type_counts"].items() if t in linear}
    ppl, err = perplexity(tools, entry.path, heldout, args)
    return {
        "kind": entry.kind,
        "rung": entry.rung,
        "quept_width": entry.width or "",
        "linear_types": " ".join(f"{t}:{c}" for t, c in counts.items()),
        "embedding": summary["types"].get("token_embd.weight", ""),
        "linear_bpw": round(summary["linear_bpw"], 3),
        "file_bpw": round(summary["file_bpw"], 3),
        "MiB": round(summary["bytes"] / 2**20, 1),
        "ppl": round(ppl, 4),
        "ppl_err": round(err, 4),
        "decode_tps": round(decode_speed(tools, entry.path, args), 1),
        "file": entry.path.name,
    }


# ------------------------------------------------------------------------------------------- reporting


def print_tables(rows: list[dict], args) -> None:
    print(f"\nEvery file ({args.chunks} x 512 held-out tokens, llama-perplexity; llama-bench, {args.threads} threads):")
    keys = ["kind", "rung", "linear_types", "linear_bpw", "file_bpw", "MiB", "ppl", "ppl_err", "decode_tps"]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    by = {(r["kind"], r["rung"]): r for r in rows}
    f32, f16 = by[("float", "F32")], by[("float", "F16")]
    print("\nThe ladder: QuEPT's export against llama.cpp's own quantization of the same float model")
    head = ["rung", "llama.cpp bpw", "ppl", "+imatrix ppl", "QuEPT", "QuEPT bpw", "QuEPT ppl"]
    head += ["QuEPT / imatrix", "QuEPT / plain", "QuEPT+comp ppl", "QuEPT+comp / imatrix"]
    head += ["decode vs F32 (llama / QuEPT)", "vs F16"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for rung in args.rungs.split(","):
        plain, imat, ours = by.get(("llama.cpp", rung)), by.get(("llama.cpp+imatrix", rung)), by.get(("QuEPT", rung))
        comp = by.get(("QuEPT+comp", rung))
        if plain is None:
            continue
        cells = [rung, plain["linear_bpw"], plain["ppl"], imat["ppl"]]
        if ours:
            cells += [f"W{ours['quept_width']}", ours["linear_bpw"], ours["ppl"]]
            cells += [f"{ours['ppl'] / imat['ppl']:.3f}", f"{ours['ppl'] / plain['ppl']:.3f}"]
            cells += [comp["ppl"], f"{comp['ppl'] / imat['ppl']:.3f}"] if comp else ["-", "-"]
            speeds = [imat["decode_tps"], ours["decode_tps"]]
        else:
            cells += ["-"] * 7
            speeds = [imat["decode_tps"]]
        cells.append(" / ".join(f"{s / f32['decode_tps']:.2f}x" for s in speeds))
        cells.append(" / ".join(f"{s / f16['decode_tps']:.2f}x" for s in speeds))
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"float: F32 ppl {f32['ppl']} ({f32['decode_tps']} tok/s), F16 ppl {f16['ppl']} ({f16['decode_tps']} tok/s)")


def main() -> None:
    args = parse_args()
    rungs = args.rungs.split(",")
    unknown = sorted(set(rungs) - set(RUNGS))
    if unknown:
        raise SystemExit(f"--rungs: unknown {unknown}; choose from {','.join(RUNGS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    tools = llama_tools.ensure(args.jobs)
    smol = common.smollm2()
    calib, heldout = texts(smol, args)
    f32, f16 = float_files(smol, tools, args.fresh)
    matrix = imatrix(tools, f32, calib, args)
    entries = [Entry("float", "F32", f32), Entry("float", "F16", f16)]
    for rung in rungs:
        entries.append(Entry("llama.cpp", rung, llama_quantized(tools, f32, rung, None, args)))
        entries.append(Entry("llama.cpp+imatrix", rung, llama_quantized(tools, f32, rung, matrix, args)))
    if rungs:
        model, folder = quept_model(smol, args)
        for rung in rungs:
            made = quept_file(lambda r=rung: rung_model(model, r, {}), folder, rung, args)
            entries.append(Entry("QuEPT", rung, made, RUNGS[rung]))
        if not args.no_compensation:
            frozen = compensated(model, smol, folder, rungs, args)
            comp = {"error_compensation": smol.calib_texts, "tokenizer": smol.tokenizer}
            for rung in rungs:
                source = (lambda r=rung: rung_model(model, r, comp)) if rung in RUNG_GRIDS else (lambda: frozen)
                entries.append(Entry("QuEPT+comp", rung, quept_file(source, folder, rung, args, "-comp"), RUNGS[rung]))
        del model
    rows = [measure(e, tools, heldout, args) for e in tqdm(entries, desc="llama-perplexity + llama-bench")]
    common.write_results("gguf_ladder" + ("_quick" if args.quick else "") + args.tag, rows)
    print_tables(rows, args)
    print(f"QuEPT calibration: {calibration_settings(args)}")


if __name__ == "__main__":
    main()

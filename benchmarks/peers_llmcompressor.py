"""llm-compressor's GPTQ and AWQ on SmolLM2-135M (issue 19), scored with quept_hf's own held-out perplexity.

    python3 -m venv /work/llmc-venv && /work/llmc-venv/bin/pip install torch==2.13.0   # the CPU wheel, first
    /work/llmc-venv/bin/pip install "llmcompressor==0.14.*"                            # pins transformers <= 5.17
    .venv/bin/python benchmarks/peers_llmcompressor.py --llmc-python /work/llmc-venv/bin/python [--windows 12]
    .venv/bin/python benchmarks/peers_llmcompressor.py --llmc-python /work/llmc-venv/bin/python --quick

Runs in the project venv; llm-compressor lives in its own venv (``--llmc-python``), driven by subprocess like
benchmarks/vllm_check.py drives vLLM's. This script writes to a temporary folder, as JSON token ids, the
calibration windows QuEPT itself draws (``QuEPTConfig(num_samples=32, seq_len=256)``, its seed:
quept_hf.calibration.data.text_windows on the calibration articles) and the evaluation windows that
quept_hf.evaluation.perplexity scores (``--windows`` 512-token windows per corpus, spread evenly over held-out
Wikipedia and over news articles, another domain). Then, per method and bit-width, a fresh worker process
(benchmarks/_llmcompressor_worker.py, no quept_hf import) loads the float model, applies
``llmcompressor.oneshot`` with the method's recipe and scores the fake-quantized model with the same formula:
  gptq           GPTQModifier (llm-compressor's defaults: static act-order, block 128, dampening 0.01);
  awq            AWQModifier (its grid search of input-channel scales, duo scaling) + QuantizationModifier
                 (min/max rounding of the scaled weights);
  gptq g128-down GPTQ with group 128 on down_proj (1536 columns) and 64 elsewhere (576 columns: llm-compressor
                 needs group sizes that divide a row; QuEPT pads its last group instead), at 2-3 bits.
Weights only, asymmetric integers, group 64 at 2-3 bits and one scale per output channel above; lm_head (tied
to the embeddings) stays float. ``cpu_s``: CPU seconds of the worker's ``oneshot`` (quantization only). The
``float`` row checks the worker's perplexity against ``_common.SmolLM2.perplexity`` on the float model. Compare
with benchmarks/error_compensation.py (RTN / GPTQ on QuEPT's grid / QuEPT elastic / QuEPT frozen + GPTQ).
On a CPU-only torch the worker makes llm-compressor's activation cache skip ``pin_memory`` (AWQ pins its cached
activations and CPU-only torch refuses: "Cannot access accelerator device when none is available"; the
``note`` column says so). A method that fails is reported with its error, and the others go on. Prints the
table and writes benchmarks/results/peers_llmcompressor[_quick].csv.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common

import quept_hf
from quept_hf import assets, evaluation
from quept_hf.calibration.data import text_windows

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_llmcompressor_worker.py"
CORPORA = ("wiki", "news")
EVAL_LEN = 512
FLOAT_TOLERANCE = 1e-4  # relative: the worker's perplexity formula against quept_hf.evaluation's
LOG_TAIL = 25  # lines of a failed worker's output shown

logger = logging.getLogger("peers_llmcompressor")


@dataclass(frozen=True)
class Run:
    method: str
    bits: int
    group: int | None = None
    down_group: int | None = None

    @property
    def label(self) -> str:
        return "gptq g128-down" if self.down_group else self.method

    @property
    def group_name(self) -> str:
        if self.down_group:
            return f"{self.group}/{self.down_group}"
        return str(self.group) if self.group else "channel"


def parse_args():
    parser = common.parser(__doc__, quick="bits 4, GPTQ only, 4 windows", threads=2)
    parser.add_argument("--llmc-python", required=True, help="python of the llm-compressor venv")
    parser.add_argument("--bits", default="2,3,4,8", help="GPTQ bit-widths, comma-separated")
    parser.add_argument("--awq-bits", default="2,3,4,8", help="AWQ bit-widths ('' for none)")
    parser.add_argument("--g128-bits", default="2,3", help="bit-widths of GPTQ g128-down ('' for none)")
    parser.add_argument("--windows", type=int, default=12, help="512-token evaluation windows per corpus")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (QuEPTConfig)")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length (QuEPTConfig)")
    parser.add_argument("--workdir", default=None, help="keep the data, worker logs and results here")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds allowed to one worker run")
    return parser.parse_args()


def widths(text: str) -> list[int]:
    return [int(b) for b in text.split(",") if b.strip()]


def planned_runs(args) -> list[Run]:
    """GPTQ and AWQ at each width (group 64 at <= 3 bits, per channel above), then GPTQ g128-down."""
    group = {b: 64 if b <= 3 else None for b in range(2, 9)}
    runs = [Run("gptq", b, group[b]) for b in widths(args.bits)]
    runs += [Run("awq", b, group[b]) for b in widths(args.awq_bits)]
    runs += [Run("gptq", b, 64, 128) for b in widths(args.g128_bits)]
    return sorted(runs, key=lambda r: (r.bits, r.label))


# ------------------------------------------------------------------------------------------------ data


def calibration_windows(smol: common.SmolLM2, num_samples: int, seq_len: int) -> list[list[int]]:
    """The token windows QuEPT's calibration (and its error-compensated freezing) draws from the same texts."""
    settings = quept_hf.QuEPTConfig(num_samples=num_samples, seq_len=seq_len)
    ids = text_windows(smol.calib_texts, smol.tokenizer, settings.num_samples, settings.seq_len, settings.seed)
    return ids.tolist()


def evaluation_windows(smol: common.SmolLM2, corpus: str, windows: int) -> list[dict[str, Any]]:
    """Exactly the windows quept_hf.evaluation.perplexity scores for ``SmolLM2.perplexity(model, windows, corpus)``:
    token ids and how many of their last tokens are targets."""
    texts = {"wiki": smol.eval_texts, "news": assets.news_articles()}[corpus]
    ids = smol.tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    picked = evaluation.perplexity_windows(ids.numel(), EVAL_LEN, max_windows=windows)
    return [{"ids": ids[b:e].tolist(), "targets": targets} for b, e, targets in picked]


def write_data(folder: Path, smol: common.SmolLM2, args) -> Path:
    data = {
        "calibration": calibration_windows(smol, args.num_samples, args.seq_len),
        "evaluation": {corpus: evaluation_windows(smol, corpus, args.windows) for corpus in CORPORA},
    }
    path = folder / "data.json"
    path.write_text(json.dumps(data))
    logger.info("data: %d x %d calibration tokens, %s evaluation windows -> %s", len(data["calibration"]),
                len(data["calibration"][0]), {c: len(w) for c, w in data["evaluation"].items()}, path)  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------------- worker


def run_worker(args, folder: Path, data: Path, run: Run) -> dict[str, Any]:
    """One worker process; its result JSON, or ``{"error": ...}`` with the reason it gave (or its last lines)."""
    name = f"{run.label.replace(' ', '_')}_w{run.bits}"
    out, log = folder / f"{name}.json", folder / f"{name}.log"
    command = [args.llmc_python, str(WORKER), "--model", smol_folder(), "--data", str(data), "--method", run.method,
               "--bits", str(run.bits), "--threads", str(args.threads or 2), "--out", str(out)]  # fmt: skip
    command += ["--group", str(run.group)] if run.group else []
    command += ["--down-group", str(run.down_group)] if run.down_group else []
    logger.info("%s W%d (group %s): worker running, log %s", run.label, run.bits, run.group_name, log)
    with open(log, "w") as handle:
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"worker ran past --timeout {args.timeout:.0f} s"}
    result = json.loads(out.read_text()) if out.exists() else {}
    if code != 0 or "error" in result:
        tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL:])
        logger.warning("%s W%d failed (exit %d):\n%s", run.label, run.bits, code, tail)
        result.setdefault("error", f"worker exit {code}: {tail.splitlines()[-1] if tail else 'no output'}")
    return result


def smol_folder() -> str:
    return str(assets.smollm2_float_dir())


def float_check(args, smol: common.SmolLM2, folder: Path, data: Path) -> dict[str, Any]:
    """The float model scored by the worker and by ``SmolLM2.perplexity``; raises when they differ."""
    theirs = run_worker(args, folder, data, Run("float", 16))
    if "error" in theirs:
        raise RuntimeError(f"the llm-compressor venv cannot score the float model: {theirs['error']}")
    model = smol.load()
    row: dict[str, Any] = {"method": "float", "bits": 16, "group": ""}
    for corpus in CORPORA:
        ours = smol.perplexity(model, args.windows, corpus)
        gap = abs(theirs[corpus] - ours) / ours
        print(f"float check {corpus}: worker {theirs[corpus]:.6f}, quept_hf.evaluation {ours:.6f}, "
              f"relative gap {gap:.2e}")  # fmt: skip
        if gap > FLOAT_TOLERANCE:
            raise RuntimeError(f"worker perplexity differs from quept_hf.evaluation's by {gap:.2e} on {corpus}")
        row.update({corpus: round(theirs[corpus], 4), f"{corpus} (quept_hf)": round(ours, 4)})
    return row


def result_row(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": run.label, "bits": run.bits, "group": run.group_name}
    if "error" in result:
        return {**row, "error": result["error"]}
    row.update({corpus: round(result[corpus], 2) for corpus in CORPORA})
    row.update({"cpu_s": round(result["cpu_s"], 1), "wall_s": round(result["wall_s"], 1)})
    return {**row, "note": result["workaround"]} if result.get("workaround") else row


# ---------------------------------------------------------------------------------------------- report


def print_table(rows: list[dict[str, Any]], args) -> None:
    print(f"\nSmolLM2-135M, llm-compressor 0.14, {args.num_samples} x {args.seq_len} calibration tokens (QuEPT's "
          f"windows); perplexity on {args.windows} x {EVAL_LEN} held-out tokens per corpus\n")  # fmt: skip
    print(f"{'method':>15} | {'bits':>4} | {'group':>7} | {'wiki':>8} | {'news':>8} | {'cpu_s':>7}")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:>15} | {row['bits']:>4} | {row['group']:>7} | failed: {row['error']}")
            continue
        cpu = f"{row['cpu_s']:>7.0f}" if "cpu_s" in row else f"{'':>7}"
        print(f"{row['method']:>15} | {row['bits']:>4} | {row['group']:>7} | {row['wiki']:>8.2f} | "
              f"{row['news']:>8.2f} | {cpu}")  # fmt: skip
    for note in dict.fromkeys(f"{row['method']}: {row['note']}" for row in rows if row.get("note")):
        print(f"workaround, {note}")


def main() -> None:
    args = common.setup(parse_args(), dict(bits="4", awq_bits="", g128_bits="", windows=4))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    smol = common.smollm2()
    with tempfile.TemporaryDirectory(prefix="peers_llmc_") as temporary:
        folder = Path(args.workdir or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        data = write_data(folder, smol, args)
        rows = [float_check(args, smol, folder, data)]
        for run in planned_runs(args):
            rows.append(result_row(run, run_worker(args, folder, data, run)))
            logger.info("%s", rows[-1])
    print_table(rows, args)
    fields = ["method", "bits", "group", "wiki", "news", "cpu_s", "wall_s", "wiki (quept_hf)", "news (quept_hf)"]
    fields += ["note", "error"]
    common.write_results(f"peers_llmcompressor{'_quick' if args.quick else ''}", rows, fields=fields)


if __name__ == "__main__":
    main()

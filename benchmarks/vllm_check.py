"""vLLM runs quept_hf's compressed-tensors exports (issue 16, part 4): tokens, top-5 log-probs and speed.

Run with the vLLM venv's python (vLLM 0.32 pins transformers 5.19, so it has its own venv; this script never
imports quept_hf)::

    /work/vllm-venv/bin/python benchmarks/vllm_check.py            # exports first (project venv), then checks

Steps:

1. unless ``--exports`` already holds a ``manifest.json``, run ``benchmarks/_vllm_export.py`` with the project
   venv (``--project-python``, default ``.venv/bin/python``): SmolLM2 exported with ``target="vllm"`` at W4 per
   channel, W4 group 128 (stored as group 64) and W8 (W8A8 int8), each with quept_hf's own greedy tokens and
   teacher-forced top-5 log-probs in ``reference.json``;
2. for the float model and each export, in a fresh process (vLLM's engine starts worker processes and holds
   them; one process per model frees them): vLLM's CPU engine generates greedily from the same prompt ids,
   returns the top-5 ``prompt_logprobs`` of prompt + quept_hf's continuation (teacher-forced, so a late
   divergence does not hide the earlier agreement), and times decoding against the float model;
3. print the table and write ``benchmarks/results/vllm_check.csv``.

Agreement columns: ``greedy`` = leading greedy tokens equal to quept_hf's, out of the generated count;
``argmax`` = teacher-forced positions whose vLLM top-1 is quept_hf's top-1; ``top5`` = mean overlap of the top-5
sets; ``max |dlogp|`` = largest log-prob difference over tokens in both top-5 sets. vLLM computes in float16
here: its CPU 4-bit kernel dispatches only 16-bit activations, and bfloat16 on this AMX CPU would switch to the
W4A8 path that needs rows that are multiples of 128 (see quept_hf/packing/interop.py). The float row is the
floor: vLLM float16 against transformers float32 on the unquantized model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TOLERANCE = 0.05  # how much less an exact export may agree with quept_hf than vLLM's float model with float32


def vllm_available() -> bool:
    """Whether this interpreter has vLLM (``make bench`` runs every script with the project venv, which has not)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------ one model (child)


def run_one(model: str, reference: dict, dtype: str, decode_tokens: int, batch: int) -> dict:
    """Load ``model`` in vLLM's CPU engine; greedy tokens, teacher-forced top-5 log-probs and decode speed."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=512, enforce_eager=True, max_num_seqs=max(batch, 1), seed=0)
    load_s = time.perf_counter() - start
    prompt = {"prompt_token_ids": reference["prompt_ids"]}
    new = len(reference["greedy_ids"])
    greedy = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    out = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0]
    forced_ids = reference["prompt_ids"] + reference["greedy_ids"]
    forced = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5)
    prompt_logprobs = llm.generate([{"prompt_token_ids": forced_ids}], forced, use_tqdm=False)[0].prompt_logprobs
    # prompt_logprobs[i] is the distribution of token i given tokens < i: step k (predicting continuation token
    # k) is entry len(prompt) + k.
    steps = []
    for k in range(new):
        entry = prompt_logprobs[len(reference["prompt_ids"]) + k]
        top = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank is not None and lp.rank <= 5))
        steps.append([[tok, logprob] for _, tok, logprob in top])
    speeds = {}
    for label, size in (("decode_1", 1), (f"decode_{batch}", batch)):
        params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
        llm.generate([prompt] * size, SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # warm-up
        begin = time.perf_counter()
        llm.generate([prompt] * size, params, use_tqdm=False)
        speeds[label] = size * decode_tokens / (time.perf_counter() - begin)
    return {"greedy_ids": list(out.token_ids), "steps": steps, "load_s": load_s, **speeds}


def child(args: argparse.Namespace) -> None:
    reference = json.loads((Path(args.reference) / "reference.json").read_text())
    result = run_one(args.model, reference, args.dtype, args.decode_tokens, args.batch)
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ compare (parent)


def compare(reference: dict, result: dict) -> dict:
    """Agreement of vLLM's answers with quept_hf's (column meanings: module docstring)."""
    ours, theirs = reference["greedy_ids"], result["greedy_ids"]
    leading = next(
        (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
    )
    argmax = overlap = 0
    max_diff = 0.0
    for ref_step, vllm_step in zip(reference["steps"], result["steps"], strict=True):
        ref_top = {int(t): v for t, v in ref_step["top"]}
        vllm_top = {int(t): v for t, v in vllm_step}
        argmax += int(ref_step["top"][0][0]) == int(vllm_step[0][0])
        shared = ref_top.keys() & vllm_top.keys()
        overlap += len(shared)
        max_diff = max([max_diff, *(abs(ref_top[t] - vllm_top[t]) for t in shared)])
    steps = len(reference["steps"])
    return {
        "greedy": f"{leading}/{len(ours)}",
        "greedy_leading": leading,
        "argmax_agree": argmax / steps,
        "top5_overlap": overlap / (5 * steps),
        "max_abs_dlogprob": max_diff,
    }


def plan_variants(manifest: dict, args: argparse.Namespace) -> list[dict]:
    """The runs: each export at its dtype (``--dtype auto``: the one its ``quept_export.json`` names, since the
    4-bit and the W8A8 kernels of vLLM's CPU build take different ones), and the float model at each such dtype
    (its throughput is what each export is compared with; float16 first: the floor of the agreement)."""
    runs, dtypes = [], []
    for variant in manifest["variants"][1:]:
        export = json.loads((Path(variant["reference"]) / "reference.json").read_text()).get("export", {})
        dtype = args.dtype if args.dtype != "auto" else export.get("vllm_dtype", "float16")
        runs.append({**variant, "dtype": dtype})
        dtypes += [dtype] if dtype not in dtypes else []
    float_variant = manifest["variants"][0]
    names = {d: "float" if i == 0 else f"float-{d}" for i, d in enumerate(sorted(dtypes, key=lambda d: d != "float16"))}
    floats = [{**float_variant, "name": names[d], "dtype": d} for d in names]
    return [r for r in floats + runs if not args.only or r["name"] in args.only]


def ensure_exports(args: argparse.Namespace) -> dict:
    """The manifest of the exports, running the project-venv half first when it is missing."""
    manifest = Path(args.exports) / "manifest.json"
    if args.re_export or not manifest.exists():
        command = [args.project_python, str(HERE / "_vllm_export.py"), "--out", args.exports]
        print("exporting with the project venv:", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(manifest.read_text())


def parent(args: argparse.Namespace) -> int:
    manifest = ensure_exports(args)
    rows, failures = [], []
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for variant in plan_variants(manifest, args):
        result_path = Path(args.exports) / f"vllm_{variant['name']}.json"
        result_path.unlink(missing_ok=True)
        command = [
            sys.executable, __file__, "--child", "--model", variant["model"], "--reference", variant["reference"],
            "--result", str(result_path), "--dtype", variant["dtype"], "--decode-tokens", str(args.decode_tokens),
            "--batch", str(args.batch),
        ]  # fmt: skip
        print(f"== vLLM: {variant['name']} ({variant['model']}, {variant['dtype']})", flush=True)
        log_path = Path(args.exports) / f"vllm_{variant['name']}.log"
        with open(log_path, "w") as log:
            code = subprocess.run(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            ).returncode
        reference = json.loads((Path(variant["reference"]) / "reference.json").read_text())
        export = reference.get("export", {})
        row = {"model": variant["name"], "dtype": variant["dtype"], "scheme": export.get("scheme", "float")}
        if code != 0 or not result_path.exists():
            tail = log_path.read_text().strip().splitlines()[-5:]
            failures.append(variant["name"])
            rows.append({**row, "loaded": "no", "error": " | ".join(tail)[-400:]})
            continue
        result = json.loads(result_path.read_text())
        row.update({"loaded": "yes", **compare(reference, result)})
        row.update({k: v for k, v in result.items() if k.startswith("decode_") or k == "load_s"})
        row["weight_rel_error"] = export.get("weight_relative_error", 0.0)
        row["exact"] = export.get("exact", True)
        rows.append(row)
    floats = {r["dtype"]: r for r in rows if r["scheme"] == "float" and r["loaded"] == "yes"}
    for row in rows:
        for key in [k for k in row if k.startswith("decode_")]:
            if key in floats.get(row["dtype"], {}):
                row[key.replace("decode_", "speedup_")] = row[key] / floats[row["dtype"]][key]
    print_table(rows, manifest, args)
    for row in rows:  # an exact export must agree with quept_hf as well as vLLM's float model agrees with float32
        floor = floats.get(row["dtype"])
        if row["loaded"] != "yes" or not row["exact"] or floor is None or row is floor:
            continue
        if min(row["argmax_agree"] - floor["argmax_agree"], row["top5_overlap"] - floor["top5_overlap"]) < -TOLERANCE:
            failures.append(row["model"])
            print(f"FAIL {row['model']}: exact export agrees less than float {row['dtype']} (> {TOLERANCE} below)")
    if failures:
        print(f"FAILED: {failures}")
    RESULTS.mkdir(exist_ok=True)
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("model", "scheme", "loaded"), k))
    with open(RESULTS / "vllm_check.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {RESULTS / 'vllm_check.csv'}")
    return 1 if failures else 0


def print_table(rows: list[dict], manifest: dict, args: argparse.Namespace) -> None:
    batch, speedup, nan = f"decode_{args.batch}", f"speedup_{args.batch}", float("nan")
    header = (
        f"{'model':<11} {'dtype':<8} {'loaded':<6} {'greedy':>6} {'argmax':>6} {'top5':>5} {'max|dlogp|':>10} "
        f"{'w.rel.err':>9} {'tok/s b1':>8} {'x float':>7} {f'tok/s b{args.batch}':>9} {'x float':>7}"
    )
    print(f"\nvLLM CPU vs quept_hf (float32), SmolLM2-135M, prompt {manifest['prompt']!r}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["loaded"] != "yes":
            print(f"{r['model']:<11} {r['dtype']:<8} {'no':<6} {r.get('error', '')}")
            continue
        print(
            f"{r['model']:<11} {r['dtype']:<8} {'yes':<6} {r['greedy']:>6} {r['argmax_agree']:>6.2f} "
            f"{r['top5_overlap']:>5.2f} {r['max_abs_dlogprob']:>10.3f} {r['weight_rel_error']:>9.1e} "
            f"{r['decode_1']:>8.1f} {r.get('speedup_1', nan):>7.2f} {r[batch]:>9.1f} {r.get(speedup, nan):>7.2f}"
        )
    for r in rows:
        print(f"  {r['model']}: {r['scheme']}")
    for name, reason in manifest.get("refused", {}).items():
        print(f"  {name}: refused by the exporter: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", default="/tmp/quept_vllm", help="export folder (default %(default)s)")
    parser.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--re-export", action="store_true", help="run the export step even if a manifest exists")
    parser.add_argument("--only", nargs="*", help="variant names to check (default: all)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (default auto: each export's own, see above)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens per timed decode (default 64)")
    parser.add_argument("--batch", type=int, default=4, help="batched decode size (default 4)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model (default 900)")
    parser.add_argument("--quick", action="store_true", help="(make bench) fewer decode tokens")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not vllm_available():
        print(f"SKIP vllm_check: vLLM is not installed in {sys.executable}; run it with the vLLM venv's python")
        return
    if args.quick:
        args.decode_tokens = min(args.decode_tokens, 16)
    sys.exit(parent(args))


if __name__ == "__main__":  # vLLM's engine starts worker processes: the guard keeps them from re-running this
    main()

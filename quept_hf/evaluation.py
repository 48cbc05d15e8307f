"""Perplexity of a causal LM, as defined in transformers' perplexity guide (fixed-length models).

The texts are joined by ``"\\n\\n"`` and tokenized once. ``stride=None`` scores non-overlapping windows of
``seq_len`` tokens; a ``stride`` slides windows of ``seq_len`` tokens by ``stride`` and scores only the
tokens not scored by the previous window (the guide's target masking), giving every token more context.
Token counts are exact: the guide's ``num_valid_tokens - batch_size`` correction is replaced by counting
the targets that really enter the loss after the one-token shift.

Also here: `top1_accuracy` (image classifiers, or a backbone plus a linear-probe ``head``), `per_bit` (any metric
at each bit-width of a QuEPT model, active bits restored afterwards) and `lm_eval_tasks` (lm-evaluation-harness
tasks at each bit-width; needs the ``eval`` extra).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.logging import tqdm  # honours transformers.logging.disable_progress_bar()

from .config import quept_config
from .inspection import mbclora_layers
from .nn import FLOAT_BITS
from .switch import get_bits, set_bits

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
T = TypeVar("T")


def _windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, target_len)`` of every window, as in the guide's loop."""
    windows, prev_end = [], 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == total:
            break
    return windows


def _pick(windows: list, max_windows: int | None) -> list:
    """At most ``max_windows`` windows, evenly spread over the text (not just its beginning)."""
    if max_windows is None or len(windows) <= max_windows:
        return windows
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows} must be positive")
    step = len(windows) / max_windows
    return [windows[int(i * step)] for i in range(max_windows)]


def perplexity_windows(
    total: int, seq_len: int = 512, stride: int | None = None, max_windows: int | None = None
) -> list[tuple[int, int, int]]:
    """``(begin, end, scored tokens)`` of every window `perplexity` scores in a text of ``total`` tokens, so that
    another tool (a peer quantizer's own venv) can score exactly the same tokens. Arguments as in `perplexity`."""
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must lie in 1..seq_len={seq_len}")
    return _pick(_windows(total, seq_len, stride), max_windows)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    texts: list[str],
    tokenizer,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """Perplexity of ``model`` (a transformers causal LM or a ``peft.PeftModel``) on ``texts``.

    Args:
        seq_len: tokens per window (the model's context for each scored token is at most this).
        stride: ``None`` for non-overlapping windows, else the sliding-window step (``<= seq_len``).
        max_windows: score at most this many windows, evenly spread over the text (``None``: all).
        batch_size: windows of equal length run together.
    """
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    windows = perplexity_windows(ids.numel(), seq_len, stride, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        for batch in tqdm(batches, desc="perplexity", unit="batch", leave=False):
            # A batch holds windows of one length; the last (shorter) window of the text runs alone.
            for group in _same_length(batch):
                inputs = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
                labels = inputs.clone()
                for row, (b, e, target_len) in enumerate(group):
                    labels[row, : (e - b) - target_len] = IGNORE_INDEX
                logits = model(input_ids=inputs).logits[:, :-1].float()
                targets = labels[:, 1:]
                nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the texts yield no token to score (need at least 2 tokens)")
    result = math.exp(nll / count)
    logger.info("perplexity %.4f over %d tokens in %d windows of <= %d", result, count, len(windows), seq_len)
    return result


def _same_length(batch: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    groups: dict[int, list] = {}
    for window in batch:
        groups.setdefault(window[1] - window[0], []).append(window)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------ top-1


@torch.no_grad()
def top1_accuracy(
    model: nn.Module,
    images_or_pixel_batches: Any,
    labels: Sequence[int] | torch.Tensor,
    image_processor: Any = None,
    batch_size: int = 32,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    features: Callable[[Any], torch.Tensor] | None = None,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of an image classifier, or of a backbone plus a classification head.

    ``images_or_pixel_batches`` is one of: a pixel tensor ``(N, C, H, W)``; a sequence of ``(C, H, W)`` tensors or of
    pixel batches ``(B, C, H, W)``; or, with ``image_processor``, raw images (PIL images, arrays, a ``datasets``
    image column) that the processor turns into pixels one batch at a time, so a large set never sits in memory
    as pixels. Without ``head`` the model must return ``logits`` (``AutoModelForImageClassification``); with
    ``head`` (a callable or ``nn.Module``, e.g. a linear probe) the head is applied to ``features(output)``,
    by default the CLS token ``last_hidden_state[:, 0]`` (DINOv2 / ViT linear probing), and may return logits
    ``(N, classes)`` or predicted class ids ``(N,)``. Works on a ``peft.PeftModel``; the model's (and the head's)
    training mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"top1_accuracy: batch_size={batch_size} must be positive")
    targets = _labels(labels)
    if features is not None and head is None:
        raise ValueError("top1_accuracy: features= only applies with a head= (the model's logits are used otherwise)")
    expected = _count(images_or_pixel_batches, image_processor)
    if expected is not None and expected != len(targets):
        raise ValueError(f"top1_accuracy: {expected} images but {len(targets)} labels")
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None:
        raise ValueError(f"top1_accuracy: {type(model).__name__} has no floating-point parameter")
    modules = [m for m in (model, head) if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    correct, seen = 0, 0
    try:
        for pixels in _pixel_batches(images_or_pixel_batches, image_processor, batch_size):
            batch = targets[seen : seen + len(pixels)]
            if len(batch) < len(pixels):
                raise ValueError(f"top1_accuracy: more images than the {len(targets)} labels")
            predicted, classes = _predict(model, pixels.to(first.device, first.dtype), head, features)
            if predicted.shape != batch.shape:
                raise ValueError(
                    f"top1_accuracy: {len(pixels)} images gave predictions of shape {tuple(predicted.shape)}"
                )
            if classes is not None and (batch.min() < 0 or batch.max() >= classes):
                raise ValueError(f"top1_accuracy: labels must lie in 0..{classes - 1} (the classifier's classes)")
            correct += int((predicted.cpu() == batch).sum())
            seen += len(pixels)
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
    if seen == 0:
        raise ValueError("top1_accuracy: no images to score")
    if seen != len(targets):
        raise ValueError(f"top1_accuracy: {seen} images but {len(targets)} labels")
    return correct / seen


def _labels(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    targets = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(list(labels))
    if targets.numel() == 0:
        raise ValueError("top1_accuracy: no labels (and so no images) to score")
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        shape = tuple(targets.shape)
        raise ValueError(f"top1_accuracy: labels must be one integer class id per image, got {targets.dtype} {shape}")
    return targets.long().cpu()


def _count(images: Any, image_processor: Any) -> int | None:
    """Number of images when it is known up front (so a mismatch fails before any forward pass)."""
    if isinstance(images, str):
        return None  # refused by _pixel_batches
    if isinstance(images, torch.Tensor):
        return {4: len(images), 3: 1}.get(images.dim())
    if image_processor is not None or not isinstance(images, Sequence):
        return len(images) if hasattr(images, "__len__") else None  # e.g. a datasets image column; not a generator
    return sum(len(x) if isinstance(x, torch.Tensor) and x.dim() == 4 else 1 for x in images)


def _pixel_batches(images: Any, image_processor: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """``(B, C, H, W)`` pixel batches of at most ``batch_size`` images (a given pixel batch is split if larger)."""
    if isinstance(images, str) or (isinstance(images, torch.Tensor) and images.dim() not in (3, 4)):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else ""
        raise ValueError(
            f"top1_accuracy: expected images, a (N, C, H, W) pixel tensor or pixel batches, got "
            f"{type(images).__name__}{shape}"
        )
    if image_processor is not None:
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        yield from (_process(image_processor, chunk) for chunk in _chunks(images, batch_size))
        return
    if isinstance(images, torch.Tensor):
        images = [images] if images.dim() == 4 else [images[None]]
    pending: list[torch.Tensor] = []  # single (C, H, W) images waiting to fill a batch
    for item in images:
        if not isinstance(item, torch.Tensor) or item.dim() not in (3, 4):
            raise ValueError(
                f"top1_accuracy: got a {type(item).__name__} without an image_processor; pass pixel tensors "
                "((N, C, H, W), (C, H, W) items or (B, C, H, W) batches) or give image_processor= for raw images"
            )
        if item.dim() == 3:
            pending.append(item)
            if len(pending) == batch_size:
                yield torch.stack(pending)
                pending = []
            continue
        if pending:
            yield torch.stack(pending)
            pending = []
        yield from item.split(batch_size)
    if pending:
        yield torch.stack(pending)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _process(image_processor: Any, images: list[Any]) -> torch.Tensor:
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    if pixels.dim() != 4 or len(pixels) != len(images):
        raise ValueError(
            f"top1_accuracy: the image processor turned {len(images)} images into pixels of shape "
            f"{tuple(pixels.shape)}; expected ({len(images)}, C, H, W)"
        )
    return pixels


def _predict(
    model: nn.Module, pixels: torch.Tensor, head: Callable | None, features: Callable | None
) -> tuple[torch.Tensor, int | None]:
    """Predicted class ids and the number of classes (None when the head predicts ids itself)."""
    output = model(pixel_values=pixels)
    if head is None:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ValueError(
                f"top1_accuracy: {type(model).__name__} returns no logits (a backbone?): pass head= (a classifier "
                "applied to its features, e.g. a linear probe on the CLS token)"
            )
        return logits.argmax(-1), logits.shape[-1]
    if features is None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None or hidden.dim() != 3:
            raise ValueError(
                f"top1_accuracy: {type(model).__name__} returns no (N, tokens, dim) last_hidden_state to take the "
                "CLS token from: pass features= (a function of the model output)"
            )
        feats = hidden[:, 0]
    else:
        feats = features(output)
    param = next(head.parameters(), None) if isinstance(head, nn.Module) else None
    if param is not None:
        feats = feats.to(param.device, param.dtype if feats.is_floating_point() else feats.dtype)
    scores = head(feats)
    if scores.dim() == 1 and not scores.is_floating_point():
        return scores, None  # the head already predicts class ids
    return scores.argmax(-1), scores.shape[-1]


# --------------------------------------------------------------------------------------------- per bit


def per_bit(
    model: nn.Module,
    metric_fn: Callable[[nn.Module], T],
    bits: Iterable[int | str] | None = None,
) -> dict[int | str, T]:
    """``{bits: metric_fn(model)}`` with the QuEPT ``model`` switched to each bit-width in turn.

    ``bits`` defaults to every bit-width of the model's `QuEPTConfig` plus ``16`` (the float reference, to compare
    against; not for a frozen model, which keeps no float weights); stored mixed-plan names (``"mixed-3.25"``) may
    be listed too. Everything is checked before the first (possibly long) evaluation, and the bit-width (or mixed
    plan) active before the call is restored afterwards, also when ``metric_fn`` raises.
    """
    wanted = _resolve_bits(model, bits)
    previous = _active_setting(model)
    results: dict[int | str, T] = {}
    try:
        for b in wanted:
            set_bits(model, b)
            results[b] = metric_fn(model)
            logger.info("per_bit: %s -> %s", b, results[b])
    finally:
        set_bits(model, previous)
    return results


def _resolve_bits(model: nn.Module, bits: Iterable[int | str] | None) -> list[int | str]:
    """The bit-widths / plan names to evaluate, all checked up front (a typo should not waste a long run)."""
    config = quept_config(model)
    available = [*config.bits] if config.is_frozen else [*config.bits, FLOAT_BITS]  # frozen: no float weights
    wanted = available if bits is None else list(bits)
    if not wanted:
        raise ValueError("per_bit: no bit-width to evaluate")
    bad = [b for b in wanted if not (b in config.plans if isinstance(b, str) else _is_int(b) and b in available)]
    if bad:
        raise ValueError(
            f"per_bit: {bad} not available; this model has bits {config.bits}, 16 (float) and plans "
            f"{sorted(config.plans)}"
        )
    return wanted


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _active_setting(model: nn.Module) -> int | str | dict[str, int]:
    """What `set_bits` needs to come back here: the bit-width, the active plan's name, or the layer mapping."""
    current = get_bits(model)
    if isinstance(current, int):
        return current
    names = {layer.active_adapters[0] for layer in mbclora_layers(model).values() if layer.active_adapters}
    if len(names) == 1 and next(iter(names)) in quept_config(model).plans:
        return next(iter(names))
    return current


# ------------------------------------------------------------------------------------ lm-evaluation-harness


def lm_eval_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str | Mapping[str, Any]],
    bits: Iterable[int | str] | None = None,
    *,
    include_path: str | Sequence[str] | None = None,
    include_defaults: bool = True,
    batch_size: int = 1,
    hflm_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[int | str, dict[str, Any]]:
    """lm-evaluation-harness ``simple_evaluate`` results of ``tasks`` at each bit-width: ``{bits: results}``.

    The model is wrapped once in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` (which may give the
    tokenizer a pad token) and switched with `per_bit` (``bits`` as there: default every bit-width plus 16 =
    float); the active bit-width is restored afterwards. ``include_path`` adds task YAML folders (local tasks,
    e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``); ``include_defaults=False`` skips
    indexing lm-eval's built-in tasks (seconds). The task index is built once for all bit-widths.

    Other ``kwargs`` go to ``simple_evaluate`` (``limit``, ``num_fewshot``, ``task_manager``, ...);
    ``log_samples`` defaults to False (per-sample logs of every bit-width add up), and a ``use_cache`` path
    gets a per-bit suffix so that one bit-width's answers are never served for another.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "lm_eval_tasks needs lm-evaluation-harness: pip install 'quept-hf[eval]' (or pip install lm-eval)"
        ) from error

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("lm_eval_tasks: no task given")
    if batch_size < 1:
        raise ValueError(f"lm_eval_tasks: batch_size={batch_size} must be positive")
    if kwargs.get("task_manager") is not None and (include_path is not None or not include_defaults):
        raise ValueError("lm_eval_tasks: give include_path= / include_defaults= or task_manager=, not both")
    bits = _resolve_bits(model, bits)  # fail before the (slow) task index is built
    if kwargs.get("task_manager") is None:
        kwargs["task_manager"] = TaskManager(include_path=include_path, include_defaults=include_defaults)
    kwargs.setdefault("log_samples", False)
    use_cache = kwargs.pop("use_cache", None)
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))

    def evaluate(_: nn.Module) -> dict[str, Any]:
        cache = None if use_cache is None else f"{use_cache}_{_bits_name(get_bits(model))}"
        return simple_evaluate(model=lm, tasks=tasks, use_cache=cache, **kwargs)

    try:
        return per_bit(model, evaluate, bits)
    finally:
        model.train(was_training)


def _bits_name(bits: int | dict[str, int]) -> str:
    if isinstance(bits, int):
        return "float" if bits == FLOAT_BITS else f"w{bits}"
    digest = hashlib.sha1(json.dumps(sorted(bits.items())).encode()).hexdigest()[:12]
    return f"mixed-{digest}"

"""What a published elastic QuEPT model tells: bit-switch metadata, model cards and metadata-only reads.

    quept_hf.hub.record_evaluation(model, ...)                 # measured quality: into config.json and the card
    quept_hf.hub.list_bit_widths("me/smollm2-quept")           # reads config.json only, no weights

Saving and pushing (``model.push_to_hub``, ``quept_hf.push_to_hub``) live in `quept_hf.saving`, which writes the
metadata and the card made here.

Why the metadata lives in ``config.json``
-----------------------------------------
Whoever meets a checkpoint (the Hub page, a serving stack, ``list_bit_widths``) should learn what it switches
between without downloading weights. The elastic model's own `QuEPTConfig` already sits in ``config.json`` under
``quantization_config``; on every save `stamp_metadata` adds what only the live model knows: each adapter's
bit-widths (weights, activations, KV cache), its MB-CLoRA rank and its packed size (``adapters``), the quept_hf
version and the float model it came from. Measured quality (`record_evaluation`) is kept there too. The model
card's YAML mirrors all of it under ``quept`` (`switch_metadata`), so the two never disagree.

Forgetting ``import quept_hf``
------------------------------
transformers has no plugin discovery. Without the import it warns "Unknown quantization type, got quept",
skips quantization and loads the float weights; for an elastic repo (MB-CLoRA adapter attached, as after
calibration) it then fails loudly in PEFT with ``KeyError: 'MBCLORA'``. We keep that behaviour rather than a
trick that would break loading (a custom ``model_type`` or renamed weights would make the repo unreadable for
every other tool) and document it in the card's usage section and the README.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.utils import is_jinja_available
from torch import nn

from ._version import __version__
from .compat import unwrap
from .config import CALIBRATION_SETTINGS, FORMAT_VERSION, QuEPTConfig, quept_config
from .evaluation import per_bit, perplexity
from .inspection import elastic_adapter, quept_linears
from .mbclora.config import MBCLORA, MBCLoRAConfig
from .mbclora.layer import MBCLoRALayer
from .mixed_precision import SENSITIVITY_NAME, attached_sensitivity
from .naming import FLOAT_BITS, adapter_name_for_bits, bits_of_adapter_name
from .packing.frozen import FrozenLinear
from .switch import switchable_layers

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "elastic_model_card.md"
CARD_NAME = "README.md"
PLOT_NAME = "quality_vs_bits.png"
FLOAT_NAME = "float"
CALIBRATION_FIELDS = tuple(name for name in CALIBRATION_SETTINGS if name != "checkpoint_dir")
LOWER_IS_BETTER = ("perplexity", "ppl", "loss", "error", "wer", "cer", "nll")
BASE_TAGS = ("quept", "quantization", "elastic-precision", "mbclora")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ------------------------------------------------------------------------------------------------ metadata


def packed_size_bytes(model: nn.Module, bits: int | str | Mapping[str, int]) -> int:
    """Bytes of the model packed at ``bits`` (a bit-width, ``16`` for float, a plan name or ``{module: bits}``).

    Each quantized linear stores ``bits/8`` bytes per weight plus a scale and a zero point (weight dtype) per
    group, and its bias; every other parameter stays in its own dtype. Clipping logits and MB-CLoRA slices are
    not counted: an export bakes the adapter delta into the weights.
    """
    base = unwrap(model)
    config = quept_config(base)
    layers = switchable_layers(base)  # elastic or frozen
    widths = _module_bits(config, layers, bits)
    covered = {id(p) for layer in layers.values() for p in layer.parameters()}
    covered |= {id(p) for m in base.modules() if isinstance(m, MBCLoRALayer) for p in _slices(m)}
    rest = sum(p.numel() * p.element_size() for p in base.parameters() if id(p) not in covered)
    return rest + sum(_linear_bytes(layer, widths[name], config) for name, layer in layers.items())


def _slices(layer: MBCLoRALayer) -> Iterable[nn.Parameter]:
    return (*layer.mbclora_A.parameters(), *layer.mbclora_B.parameters())


def _module_bits(config: QuEPTConfig, layers: Mapping[str, nn.Module], bits: Any) -> dict[str, int]:
    if isinstance(bits, str) and bits in config.plans:
        bits = config.plans[bits]["bits"]
    if isinstance(bits, Mapping):
        return {name: int(bits.get(name, config.default_bits)) for name in layers}
    return dict.fromkeys(layers, int(bits))


def _linear_bytes(layer: nn.Module, bits: int, config: QuEPTConfig) -> int:
    bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
    frozen = isinstance(layer, FrozenLinear)
    element = next(iter(layer.scales.values())).element_size() if frozen else layer.weight.element_size()
    if bits >= FLOAT_BITS:  # the float model it came from
        return layer.in_features * layer.out_features * element + bias
    if frozen:  # what it stores for that width
        stored = (layer.qweight[str(bits)], layer.scales[str(bits)], layer.zeros[str(bits)])
        return bias + sum(t.numel() * t.element_size() for t in stored)
    group_size = config.group_size[bits]
    groups = 1 if group_size == -1 else math.ceil(layer.in_features / group_size)
    codes = math.ceil(layer.out_features * layer.in_features * bits / 8)
    return codes + 2 * layer.out_features * groups * element + bias


def _average_bits(config: QuEPTConfig, layers: Mapping[str, nn.Module], plan: str) -> float:
    """Bits per weight of a plan, weighted by each layer's weight count (what the size follows)."""
    widths = _module_bits(config, layers, plan)
    total = sum(layer.weight.numel() for layer in layers.values())
    return sum(layer.weight.numel() * widths[name] for name, layer in layers.items()) / total


def _kv_bits(config: QuEPTConfig, bits: int | None) -> int | str | None:
    if config.kv_bits == "follow":
        return bits if bits is not None else "follow"
    return config.kv_bits


def _rank(adapter: MBCLoRAConfig | None, bits: int) -> int | None:
    """The MB-CLoRA rank a bit-width runs with: its group's and, in cascade, every higher group's."""
    if adapter is None or not adapter.bit_groups or not adapter.ranks:
        return None
    groups = list(reversed(adapter.bit_groups))
    ranks = list(reversed(adapter.ranks))
    k = next(i for i, group in enumerate(groups) if bits in group)
    return int(sum(ranks[: k + 1]) if adapter.cascade else ranks[k])


def adapter_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{adapter name: {...}}`` of every bit-width (``w2`` ...) and stored plan (``mixed-3.25``) of a model:
    weight, activation and KV-cache bits, MB-CLoRA rank (``None`` without an adapter) and packed size."""
    base = unwrap(model)
    config = quept_config(base)
    found = elastic_adapter(base)
    adapter = found[1] if found is not None else None
    layers = quept_linears(base)
    entries = {}
    for bits in config.bits:
        entries[adapter_name_for_bits(bits)] = {
            "weight_bits": bits,
            "activation_bits": config.activation_bits(bits),
            "kv_bits": _kv_bits(config, bits),
            "rank": _rank(adapter, bits),
            "size_bytes": packed_size_bytes(base, bits),
        }
    for name in sorted(config.plans, key=lambda n: _average_bits(config, layers, n)):
        used = sorted(set(_module_bits(config, layers, name).values()))
        entries[name] = {
            "plan": True,
            "avg_bits": round(_average_bits(config, layers, name), 4),
            "target": config.plans[name].get("target"),
            "weight_bits": used,
            "activation_bits": used if config.mode == "weight_activation" else None,
            "kv_bits": _kv_bits(config, None),
            "rank": None if adapter is None else "per layer",
            "size_bytes": packed_size_bytes(base, name),
        }
    return entries


def stamp_metadata(model: nn.Module) -> QuEPTConfig:
    """Record on the model's `QuEPTConfig` what config.json should tell without weights (see the module
    docstring): ``adapters``, ``quept_version`` and, for a model quantized from a float one, ``base_model``.
    Called on every save; returns the config."""
    base = unwrap(model)
    return _stamp(base, quept_config(base))


def _stamp(base: nn.Module, config: QuEPTConfig) -> QuEPTConfig:
    config.quept_version = __version__
    config.format_version = FORMAT_VERSION  # what this save writes, whatever version the model was loaded from
    if config.is_packed:
        return config
    config.adapters = adapter_entries(base)
    quantizer = getattr(base, "hf_quantizer", None)
    if config.base_model is None and quantizer is not None and not quantizer.pre_quantized:
        config.base_model = getattr(base.config, "name_or_path", None) or None
    return config


def switch_metadata(config: QuEPTConfig) -> dict[str, Any]:
    """The JSON-safe bit-switch summary of a config: what `list_bit_widths` returns and the card's ``quept`` YAML.

    Works from the config alone; adapter ranks and sizes are there once the checkpoint was saved by quept_hf.
    """
    adapters = copy.deepcopy(config.adapters) if config.adapters is not None else _derived_entries(config)
    adapters = dict(sorted(adapters.items(), key=_adapter_order))  # config.json sorts its keys alphabetically
    return {
        "quant_method": "quept",
        "format_version": config.format_version,
        "quept_version": config.quept_version,
        "mode": config.mode,
        "bits": list(config.bits),
        "bit_groups": [list(g) for g in config.bit_groups],
        "ranks": list(config.ranks),
        "default_adapter": adapter_name_for_bits(config.default_bits),
        "adapters": adapters,
        "plans": {name: entry.get("avg_bits") for name, entry in adapters.items() if entry.get("plan")},
        "group_size": {str(b): s for b, s in config.group_size.items()},
        "zero_point": {str(b): z for b, z in config.zero_point.items()},
        "kv_bits": config.kv_bits,
        "rotation": getattr(config, "rotation", None),
        "smoothing": getattr(config, "smoothing", None),
        "calibrated": config.calibrated,
        "calibration": _calibration(config),
        "evaluation": copy.deepcopy(config.evaluation) or {},
        "base_model": config.base_model,
        "packed": None if config.packed is None else config.packed.get("source"),
    }


def _adapter_order(item: tuple[str, dict[str, Any]]) -> tuple:
    """Bit-widths low to high, then plans by average bits."""
    name, entry = item
    if entry.get("plan"):
        return (1, entry.get("avg_bits") or 0.0, name)
    return (0, entry.get("weight_bits") or 0, name)


def _derived_entries(config: QuEPTConfig) -> dict[str, dict[str, Any]]:
    """Adapter entries of a config that was never stamped (no sizes; ranks from the config)."""
    adapter = MBCLoRAConfig(bit_groups=config.bit_groups, ranks=config.ranks, cascade=config.cascade)
    entries: dict[str, dict[str, Any]] = {
        adapter_name_for_bits(b): {
            "weight_bits": b,
            "activation_bits": config.activation_bits(b),
            "kv_bits": _kv_bits(config, b),
            "rank": _rank(adapter, b),
            "size_bytes": None,
        }
        for b in config.bits
    }
    for name, plan in config.plans.items():
        entries[name] = {"plan": True, "avg_bits": plan.get("avg_bits"), "target": plan.get("target")}
    return entries


def _calibration(config: QuEPTConfig) -> dict[str, Any]:
    settings = {name: copy.deepcopy(getattr(config, name, None)) for name in CALIBRATION_FIELDS}
    return {"dataset": config.dataset_description, "cascade": config.cascade, **settings}


def list_bit_widths(
    repo_id_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> dict[str, Any]:
    """What a QuEPT checkpoint switches between (`switch_metadata`), reading ONLY its ``config.json``.

    Works on a Hub repo id or a local folder; an adapter-only repository (``PeftModel.push_to_hub``) is read from
    its ``adapter_config.json``. A checkpoint of a newer format version fails with both version numbers.
    """
    source = os.fspath(repo_id_or_path)
    config = _read_json(source, "config.json", revision, token)
    if config is None:
        adapter = _read_json(source, "adapter_config.json", revision, token)
        if adapter is None or adapter.get("peft_type") != MBCLORA.value:
            raise ValueError(f"{source!r} holds neither a QuEPT config.json nor an MB-CLoRA adapter_config.json")
        return _adapter_only_metadata(adapter)
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "quept":
        raise ValueError(f"{source!r} is not a QuEPT model (quantization method {quantization.get('quant_method')!r})")
    return switch_metadata(QuEPTConfig.from_dict(quantization))


def _read_json(source: str, filename: str, revision: str | None, token: str | bool | None) -> dict | None:
    import json

    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return json.loads(Path(path).read_text()) if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, filename, revision=revision, token=token)
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text())


def _adapter_only_metadata(adapter: dict[str, Any]) -> dict[str, Any]:
    config = MBCLoRAConfig(**{k: adapter[k] for k in ("bit_groups", "ranks", "cascade") if k in adapter})
    default = adapter.get("default_bits") or max(config.bits)
    adapters = {adapter_name_for_bits(b): {"weight_bits": b, "rank": _rank(config, b)} for b in config.bits}
    adapters.update({name: {"plan": True} for name in adapter.get("plans") or {}})
    return {
        "quant_method": "quept",
        "adapter_only": True,
        "bits": config.bits,
        "bit_groups": config.bit_groups,
        "ranks": config.ranks,
        "default_adapter": adapter_name_for_bits(default),
        "adapters": adapters,
        "plans": dict.fromkeys(adapter.get("plans") or {}),
        "base_model": adapter.get("base_model_name_or_path"),
    }


# ---------------------------------------------------------------------------------------------- evaluation


def record_evaluation(
    model: nn.Module,
    results: Mapping[int | str, float],
    metric_name: str = "perplexity",
    *,
    dataset: str | None = None,
    lower_is_better: bool | None = None,
) -> dict[str, Any]:
    """Store measured quality per bit-width in the model's config, for config.json, the card table and plot.

    ``results`` maps bit-widths (``3``; ``16`` for float), adapter names (``"w3"``, ``"float"``) or plan names
    (``"mixed-3.25"``) to finite numbers; earlier results of the same metric are kept unless overwritten.
    ``lower_is_better`` defaults to True for perplexity/loss/error-like names. Returns the metric's entry.
    """
    config = quept_config(model)
    named = {_result_key(config, key): _finite(metric_name, key, value) for key, value in results.items()}
    previous = (config.evaluation or {}).get(metric_name, {})
    if lower_is_better is None:
        lower_is_better = previous.get("lower_is_better", any(w in metric_name.lower() for w in LOWER_IS_BETTER))
    entry = {
        "results": {**previous.get("results", {}), **named},
        "dataset": dataset if dataset is not None else previous.get("dataset"),
        "lower_is_better": bool(lower_is_better),
    }
    config.evaluation = {**(config.evaluation or {}), metric_name: entry}
    return copy.deepcopy(entry)


def _result_key(config: QuEPTConfig, key: int | str) -> str:
    names = [adapter_name_for_bits(b) for b in config.bits]
    if isinstance(key, int) and not isinstance(key, bool):
        key = FLOAT_NAME if key == FLOAT_BITS else adapter_name_for_bits(key)
    if key == FLOAT_NAME or key in names or key in config.plans:
        return key
    raise ValueError(f"no bit-width or plan named {key!r}; this model provides {[*names, *config.plans, FLOAT_NAME]}")


def _finite(metric: str, key: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{metric} result for {key!r} must be a finite number (config.json is JSON), got {value!r}")
    return float(value)


def measure_perplexity(
    model: nn.Module,
    texts: list[str],
    tokenizer: Any,
    adapters: Iterable[str] | None = None,
    *,
    dataset: str | None = None,
    **perplexity_kwargs: Any,
) -> dict[str, Any]:
    """Perplexity (`quept_hf.evaluation.perplexity`) at each bit-width, plan and float, recorded with
    `record_evaluation`; the model's bit-width is restored afterwards. Returns the recorded entry."""
    config = quept_config(model)
    names = list(adapters) if adapters is not None else [*(f"w{b}" for b in config.bits), *config.plans, FLOAT_NAME]
    keys = {n: FLOAT_BITS if n == FLOAT_NAME else bits_of_adapter_name(n) or n for n in names}
    scores = per_bit(model, lambda m: perplexity(m, texts, tokenizer, **perplexity_kwargs), list(keys.values()))
    results = {name: scores[key] for name, key in keys.items()}
    return record_evaluation(model, results, "perplexity", dataset=dataset, lower_is_better=True)


# ---------------------------------------------------------------------------------------------------- plot


def plot_quality(metadata: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Write a PNG of each recorded metric against (average) weight bits; False when nothing was measured or
    matplotlib is missing. Uses the Agg canvas directly: the caller's pyplot backend is left alone."""
    evaluation = metadata.get("evaluation") or {}
    if not evaluation:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: the model card has no quality plot (pip install matplotlib)")
        return False
    figure = Figure(figsize=(5.5, 3.2 * len(evaluation)), dpi=100)
    FigureCanvasAgg(figure)
    for index, (metric, entry) in enumerate(evaluation.items()):
        _plot_metric(figure.add_subplot(len(evaluation), 1, index + 1), metric, entry, metadata["adapters"])
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    return True


def _plot_metric(axes, metric: str, entry: Mapping[str, Any], adapters: Mapping[str, Any]) -> None:
    results = entry["results"]
    known = [(name, value, adapters[name]) for name, value in results.items() if name in adapters]
    uniform = [(info["weight_bits"], value) for _, value, info in known if _is_uniform(info)]
    plans = [(info["avg_bits"], value, name) for name, value, info in known if not _is_uniform(info)]
    if uniform:
        xs, ys = zip(*sorted(uniform), strict=True)
        axes.plot(xs, ys, "o-", label="uniform bit-width")
    for x, y, name in plans:
        axes.plot([x], [y], "s", label=name)
    if FLOAT_NAME in results:
        axes.axhline(results[FLOAT_NAME], linestyle="--", color="gray", label="float")
    values = [v for v in results.values() if v > 0]
    if entry.get("lower_is_better") and values and max(values) / min(values) > 10:
        axes.set_yscale("log")
    axes.set_xlabel("weight bits (average for mixed plans)")
    axes.set_ylabel(metric + (" (lower is better)" if entry.get("lower_is_better") else ""))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")


def _is_uniform(entry: Mapping[str, Any]) -> bool:
    return not entry.get("plan")


# ---------------------------------------------------------------------------------------------- model card


def model_card(
    model: nn.Module,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    license: str | None = None,
    tags: Iterable[str] = (),
    plot: str | None = None,
    existing: ModelCard | None = None,
    lookup_hub: bool = True,
) -> ModelCard:
    """The model card of an elastic QuEPT model, rendered from ``model_cards/elastic_model_card.md``.

    Args:
        repo_id: the name used in the usage snippet (default: the model's ``name_or_path``).
        base_model, license: override what is found (the recorded base model; the license of an existing card,
            of the model's own or its base model's card, or of its config).
        tags: extra tags.
        plot: file name of a quality plot next to the card (`plot_quality`), shown in the card.
        existing: a card already there (on the Hub or in the folder). One written by quept_hf is re-rendered,
            keeping its license and tags; a hand-written one keeps its text and gets the metadata in its YAML.
        lookup_hub: may ask the Hub for the base model's card (its license); local saves don't, pushes do.
    """
    base = unwrap(model)
    config = _stamp(base, QuEPTConfig.from_dict(quept_config(base).to_dict()))
    metadata = switch_metadata(config)
    ours = existing is None or "quept" in existing.data.to_dict()
    previous = {} if existing is None else existing.data.to_dict()
    base_model = base_model or config.base_model
    data = ModelCardData(
        library_name=previous.get("library_name") or "transformers",
        license=license or previous.get("license") or _find_license(base, base_model, lookup_hub),
        base_model=previous.get("base_model") or (base_model if _is_hub_id(base_model) else None),
        tags=_tags(metadata, [*(previous.get("tags") or []), *tags]),
        pipeline_tag=previous.get("pipeline_tag") or _pipeline_tag(base),
        quept=metadata,
    )
    if data.base_model:
        data.base_model_relation = "quantized"
    if not ours:
        extra = {k: v for k, v in previous.items() if k not in data.to_dict()}
        existing.data = ModelCardData(**{**extra, **data.to_dict()})
        return existing
    context = _card_context(base, config, metadata, repo_id, plot)
    return ModelCard.from_template(data, template_path=str(TEMPLATE_PATH), **context)


def _card_context(
    base: nn.Module, config: QuEPTConfig, metadata: dict[str, Any], repo_id: str | None, plot: str | None
) -> dict[str, Any]:
    """Everything the template shows besides the YAML (see ``model_cards/elastic_model_card.md``)."""
    repo_id = repo_id or getattr(base.config, "name_or_path", None) or "path/to/model"
    adapters = metadata["adapters"]
    uniform = [name for name, entry in adapters.items() if _is_uniform(entry)]
    plans = [name for name in adapters if name not in uniform]
    by_adapter = any(entry.get("rank") is not None for entry in adapters.values())
    example_bits = min(config.bits, key=lambda b: (b < 3, b))  # the lowest of >= 3 bits, if any
    base_model = config.base_model
    return {
        "title": f"{repo_id.rstrip('/').split('/')[-1]} (QuEPT elastic precision)",
        "summary": _summary(config, uniform, plans, base_model),
        "calibrated": config.calibrated,
        "auto_class": _auto_class(base),
        "repo_id": repo_id,
        "switch_by_adapter": by_adapter,
        "example_adapter": adapter_name_for_bits(example_bits),
        "example_bits": example_bits,
        "example_plan": plans[0] if plans and by_adapter else None,
        "default_adapter": metadata["default_adapter"],
        "metrics": list(metadata["evaluation"]),
        "rows": _rows(base, config, metadata),
        "evaluation_notes": _evaluation_notes(metadata["evaluation"]),
        "plot": plot,
        "mode_text": "weights only" if config.mode == "weight_only" else "weights and activations (WbAb)",
        "bit_groups": config.bit_groups,
        "ranks": config.ranks,
        "cascade": "on" if config.cascade else "off",
        "group_size": ", ".join(f"{b} bits: {'per channel' if s == -1 else s}" for b, s in config.group_size.items()),
        "float_zero": ", ".join(f"{b} bits" for b, z in config.zero_point.items() if z == "float"),
        "symmetric_zero": ", ".join(f"{b} bits" for b, z in config.zero_point.items() if z == "symmetric"),
        "rotation": _on_off(metadata["rotation"]),
        "smoothing": _on_off(metadata["smoothing"]),
        "kv_bits": "off" if config.kv_bits is None else config.kv_bits,
        "calibration": metadata["calibration"],
        "calibration_settings": [(k, v) for k, v in metadata["calibration"].items() if k != "dataset"],
        "base_model_text": _base_model_text(base_model),
        "files": _files(base, by_adapter),
        "quept_version": metadata["quept_version"],
    }


def _summary(config: QuEPTConfig, uniform: list[str], plans: list[str], base_model: str | None) -> str:
    source = f" of [{base_model}](https://huggingface.co/{base_model})" if _is_hub_id(base_model) else ""
    text = (
        f"An elastic-precision QuEPT quantization{source}: ONE checkpoint that runs at any of "
        f"{len(uniform)} bit-widths ({', '.join(f'`{n}`' for n in uniform)}), switched at run time without "
        "re-calibration"
    )
    if plans:
        text += f", plus {len(plans)} mixed-precision plan(s) ({', '.join(f'`{n}`' for n in plans)})"
    return text + "."


def _rows(base: nn.Module, config: QuEPTConfig, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    float_size = packed_size_bytes(base, FLOAT_BITS)
    evaluation = metadata["evaluation"]
    rows = []
    for name, entry in [*metadata["adapters"].items(), (FLOAT_NAME, None)]:
        size = float_size if entry is None else entry.get("size_bytes")
        rows.append(
            {
                "name": name,
                "weight_bits": _bits_text(entry, "weight_bits", FLOAT_BITS),
                "activation_bits": _bits_text(entry, "activation_bits", FLOAT_BITS),
                "metrics": [_metric_text(evaluation[m]["results"].get(name)) for m in evaluation],
                "size": _human_size(size),
                "ratio": "—" if size is None else f"{size / float_size:.2f}×",
            }
        )
    return rows


def _bits_text(entry: Mapping[str, Any] | None, key: str, float_bits: int) -> str:
    if entry is None:
        return f"{float_bits} (float)"
    value = entry.get(key)
    if value is None:
        return "float"
    if entry.get("plan") and key == "weight_bits":
        return f"{entry['avg_bits']:.3g} avg ({'/'.join(map(str, value))})"
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


def _metric_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _human_size(size: int | None) -> str:
    if size is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def _evaluation_notes(evaluation: Mapping[str, Any]) -> list[str]:
    notes = []
    for metric, entry in evaluation.items():
        where = f" on {entry['dataset']}" if entry.get("dataset") else ""
        direction = "lower" if entry.get("lower_is_better") else "higher"
        notes.append(f"{metric}{where} ({direction} is better).")
    return notes


def _on_off(value: bool | None) -> str:
    return "default for the mode" if value is None else ("on" if value else "off")


def _base_model_text(base_model: str | None) -> str | None:
    if not base_model:
        return None
    if _is_hub_id(base_model):
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return f"a local float checkpoint (`{Path(base_model).name}`)"


def _files(base: nn.Module, by_adapter: bool) -> list[str]:
    files = [
        "`config.json`: the model config; its `quantization_config` holds the bit-switch metadata mirrored in this "
        "card's `quept` YAML entry (`quept_hf.hub.list_bit_widths` reads only this file).",
        "`model.safetensors`: the float weights and the per-bit clipping parameters.",
    ]
    if by_adapter:
        files.append("`adapter_config.json`, `adapter_model.safetensors`: the MB-CLoRA adapter in PEFT format.")
    if attached_sensitivity(base) is not None:
        files.append(f"`{SENSITIVITY_NAME}`: the mixed-precision sensitivity table (new plans without re-measuring).")
    return files


def _tags(metadata: Mapping[str, Any], extra: Iterable[str]) -> list[str]:
    tags = [*BASE_TAGS, metadata["mode"].replace("_", "-")]
    if metadata["plans"]:
        tags.append("mixed-precision")
    return list(dict.fromkeys([*tags, *extra]))


def _auto_class(base: nn.Module) -> str:
    name = type(base).__name__
    for suffix, auto in (
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("ForImageClassification", "AutoModelForImageClassification"),
        ("ForConditionalGeneration", "AutoModelForImageTextToText"),
    ):
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def _pipeline_tag(base: nn.Module) -> str | None:
    return {
        "AutoModelForCausalLM": "text-generation",
        "AutoModelForImageClassification": "image-classification",
        "AutoModelForImageTextToText": "image-text-to-text",
    }.get(_auto_class(base))


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def _find_license(base: nn.Module, base_model: str | None, lookup_hub: bool) -> str | None:
    """The license of the card next to the model (its own checkpoint) or its base model's, else its config's.

    Local folders are read directly; with ``lookup_hub`` a Hub id is asked for its card (best effort)."""
    for source in dict.fromkeys(filter(None, [getattr(base.config, "name_or_path", None), base_model])):
        license = _card_license(source, lookup_hub)
        if license:
            return license
    return getattr(base.config, "license", None)


def _card_license(source: str, lookup_hub: bool) -> str | None:
    path = os.path.join(source, CARD_NAME)
    try:
        if os.path.isdir(source):
            return ModelCard.load(path).data.license if os.path.isfile(path) else None
        if lookup_hub and _is_hub_id(source):
            return ModelCard.load(source).data.license
    except Exception as exc:  # a license is a nicety: an unreachable Hub must not stop a save
        logger.info("no license found for %s: %s", source, exc)
    return None


def write_card_files(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    existing: ModelCard | None = None,
    tags: Iterable[str] = (),
    lookup_hub: bool = False,
) -> ModelCard | None:
    """``README.md`` (`model_card`) and, when quality was measured, ``quality_vs_bits.png`` into a saved folder.

    A card already in the folder counts as ``existing``. Packed exports (no switching) are left alone, and so is
    everything when Jinja2 (which ``ModelCard.from_template`` needs) is missing: a save must not fail for a card."""
    base = unwrap(model)
    config = quept_config(base)
    if config.is_packed:
        return None
    if not is_jinja_available():
        logger.warning("jinja2 is not installed: no model card written (pip install jinja2)")
        return None
    folder = os.fspath(save_directory)
    readme = os.path.join(folder, CARD_NAME)
    if existing is None and os.path.isfile(readme):
        existing = ModelCard.load(readme)
    has_plot = plot_quality(switch_metadata(config), os.path.join(folder, PLOT_NAME))
    plot = PLOT_NAME if has_plot else None
    card = model_card(base, repo_id or folder, tags=tags, plot=plot, existing=existing, lookup_hub=lookup_hub)
    card.save(readme)
    return card

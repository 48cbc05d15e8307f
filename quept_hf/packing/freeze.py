"""Freeze an elastic QuEPT model into its deployable form: integer codes per kept bit-width, still switchable.

``frozen = quept_hf.freeze(model, bits=[2, 3, 4, 8], plans=["mixed-3.25"])`` computes, for every `QuEPTLinear`
and every width it must keep (the uniform ``bits``, plus each kept plan's width for that layer), the codes of
``Q_b(W + ΔW_b)`` with the calibrated clipping of ``b`` (`quept_hf.packing.plan.quantize_layers`, the fake
quantizer's own math) and stores them in a `quept_hf.packing.frozen.FrozenLinear`. No float weight, MB-CLoRA
factor or clipping logit of a linear layer survives. The result is the model ``from_pretrained`` of the saved
folder gives: it is built through transformers' loading path (``from_pretrained(None, config=..., state_dict=...)``)
with ``quantization_config.frozen`` set, so ``frozen.save_pretrained(d)`` is transformers' own save and
``AutoModelForCausalLM.from_pretrained(d)`` (after ``import quept_hf``) gives the frozen model back.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..calibration.compensation import input_hessians
from ..compat import unwrap
from ..config import (
    FORMAT_VERSION,
    FROZEN_FORMAT,
    FROZEN_VERSION,
    MAX_BITS,
    MIN_BITS,
    QuEPTConfig,
    quept_config,
    zero_point_kinds,
)
from ..inspection import base_state_dict
from ..nn.functional import quantize_weight_codes
from .codec import pack
from .frozen import FrozenLinear
from .plan import (
    QuantizedLinear,
    quantize_layers,
    refuse_offloaded,
    regridded,
    resolve_plan,
    stored_plans,
)

logger = logging.getLogger(__name__)

__all__ = ["freeze", "frozen_config", "kept_widths"]


def kept_widths(
    model: nn.Module, bits: Iterable[int] | None = None, plans: Iterable[str] | None = None
) -> tuple[list[int], dict[str, dict[str, int]], dict[str, list[int]]]:
    """``(uniform bits, {plan: {module: bits}}, {module: kept widths})`` that `freeze` keeps (checked first).

    ``bits`` defaults to every bit-width of the model, ``plans`` to every stored plan; a plan's widths are kept
    only on the layers that use them, so a plan adds little beyond the uniform widths.
    """
    config = quept_config(model)
    uniform = _check_bits(config, config.bits if bits is None else bits)
    available = stored_plans(model, config)
    names = sorted(available) if plans is None else _check_plans(plans, available, config)
    plan_maps = {name: resolve_plan(model, name)[1] for name in names}
    for b in uniform:  # refuses a width some layer does not offer (a merged layer keeps one)
        modules = resolve_plan(model, b)[1]
    kept = {module: sorted({*uniform, *(plan[module] for plan in plan_maps.values())}) for module in modules}
    return uniform, plan_maps, kept


def _check_bits(config: QuEPTConfig, bits: Iterable[int]) -> list[int]:
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable):
        raise ValueError(f"freeze: bits={bits!r} must be a list of bit-widths from {config.bits}")
    chosen = list(bits)
    bad = [b for b in chosen if isinstance(b, bool) or not isinstance(b, int) or b not in config.bits]
    if not chosen or bad or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"freeze: bits={chosen!r} must be a non-empty list of distinct bit-widths of this model, {config.bits} "
            "(a frozen model keeps no float weights, so 16 cannot be kept)"
        )
    return sorted(chosen)


def _check_plans(plans: Iterable[str], available: dict, config: QuEPTConfig) -> list[str]:
    if isinstance(plans, (str, bytes)) or not isinstance(plans, Iterable):
        raise ValueError(f"freeze: plans={plans!r} must be a list of stored plan names, e.g. {sorted(available)}")
    names = list(plans)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"freeze: plans {unknown} are not stored on this model; it has {sorted(available)}")
    return names


def frozen_config(
    config: QuEPTConfig, uniform: list[int], plan_maps: dict[str, dict[str, int]], kept: dict[str, list[int]],
    per_tensor: list[str], regrid: dict[int, str] | None = None,
) -> QuEPTConfig:  # fmt: skip
    """The elastic config narrowed to the kept widths and plans, with the ``frozen`` description added;
    ``regrid``: the widths frozen onto another grid kind (`freeze`'s ``zero_point``)."""
    data = config.to_dict()
    data.pop("quant_method", None)
    used = sorted({b for widths in kept.values() for b in widths})
    data.update(
        bits=used,
        bit_groups=[used],
        default_bits=config.default_bits if config.default_bits in uniform else max(uniform),
        group_size={b: config.group_size[b] for b in used},
        zero_point={b: (regrid or {}).get(b, config.zero_point[b]) for b in used},
        ranks=[config.ranks[0]],
        merge_weights=[1.0],
        frozen={"format": FROZEN_FORMAT, "version": FROZEN_VERSION, "bits": kept, "per_tensor_activations": per_tensor},
        plans={name: {**config.plans.get(name, {}), "bits": plan} for name, plan in plan_maps.items()},
        checkpoint_dir=None,
        format_version=FORMAT_VERSION,
    )
    kept_names = {f"w{b}" for b in uniform} | set(plan_maps)
    if data.get("adapters"):  # the bit-switch metadata of the kept widths; no MB-CLoRA rank: the deltas are baked in
        data["adapters"] = {k: {**v, "rank": None} for k, v in data["adapters"].items() if k in kept_names}
    return QuEPTConfig.from_dict(data)


def _frozen_tensors(name: str, widths: dict[int, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """``{name}.qweight.{b}`` / ``.scales.{b}`` / ``.zeros.{b}`` (/ ``.act_log_step.{b}``) and the bias."""
    state = {}
    for b, q in widths.items():
        state[f"{name}.qweight.{b}"] = pack(q.codes, b)
        state[f"{name}.scales.{b}"] = q.scales.detach().clone()
        state[f"{name}.zeros.{b}"] = q.zeros.detach().to(q.scales.dtype).clone()
        if q.act_log_step is not None:
            state[f"{name}.act_log_step.{b}"] = q.act_log_step.detach().to(q.scales.dtype).clone()
    bias = next(iter(widths.values())).bias
    if bias is not None:
        state[f"{name}.bias"] = bias.detach().clone()
    return state


# Error compensation rounds widths from here up. At 2 bits GPTQ on the calibrated grid wrecked SmolLM2 (held-out
# perplexity 3.8e5 against 2859 with plain rounding; GPTQ on the round-to-nearest grid also 3.8e5): the
# compensation moves weights by whole 2-bit steps along directions the calibration data barely excites.
COMPENSATED_MIN_BITS = 3

HEAD_GROUP_SIZE = -1  # the output head's codes: one scale and zero point per vocabulary row


def _head_tensors(base: nn.Module, head_bits: int) -> tuple[str, dict[str, torch.Tensor]]:
    """The output head (``lm_head``) as round-to-nearest codes of ``head_bits`` per vocabulary row (full range).

    The head is not elastic (calibration leaves it float), so it gets one width and no switching: a
    `quept_hf.packing.linear.PackedLinear`. It is what a token's decode reads most of on small LLMs (SmolLM2: 28M of
    its 134M weights, read in float32 at every step)."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise ValueError(f"freeze: head_bits={head_bits} needs an nn.Linear output head; {type(base).__name__} has "
                         f"{type(head).__name__}")  # fmt: skip
    name = next(n for n, m in base.named_modules() if m is head)
    full_range = torch.full((head.out_features, 1), 30.0, dtype=head.weight.dtype)  # sigmoid(30) == 1.0
    codes, scales, zeros = quantize_weight_codes(head.weight, head_bits, full_range, full_range, HEAD_GROUP_SIZE)
    state = {f"{name}.qweight": pack(codes, head_bits), f"{name}.scales": scales, f"{name}.zeros": zeros}
    if head.bias is not None:
        state[f"{name}.bias"] = head.bias.detach().clone()
    return name, state


def _check_head_bits(head_bits: object) -> None:
    if head_bits is None:
        return
    if isinstance(head_bits, bool) or not isinstance(head_bits, int) or not MIN_BITS <= head_bits <= MAX_BITS:
        raise ValueError(f"freeze: head_bits={head_bits!r}; allowed: None (float head) or {MIN_BITS}..{MAX_BITS}")


@torch.no_grad()
def freeze(
    model: nn.Module,
    bits: Iterable[int] | None = None,
    plans: Iterable[str] | None = None,
    *,
    head_bits: int | None = None,
    error_compensation: Any = None,
    tokenizer: Any = None,
    error_compensation_bits: Iterable[int] | None = None,
    zero_point: str | Mapping[int, str] | None = None,
) -> nn.Module:
    """The frozen elastic model of ``model`` (left unchanged): codes of every kept width, no float master.

    Args:
        model: an elastic QuEPT model (transformers model with or without MB-CLoRA adapters, or a PeftModel).
        bits: uniform bit-widths to keep (default: all of the model's).
        plans: stored mixed plans to keep (default: all), e.g. ``["mixed-3.25"]``.
        head_bits: also store the output head (``lm_head``, float in the elastic model) as round-to-nearest codes
            of this width per vocabulary row (8 is near-lossless); ``None`` (default) keeps it float. A tied
            head is untied (the input embedding stays float). Logits then differ from the elastic model's by
            the head's quantization.
        error_compensation: calibration data (texts with ``tokenizer``, token ids, or a list of model-input
            dicts; the model's ``num_samples`` x ``seq_len`` windows are drawn from it): round every kept width
            with GPTQ error compensation on its calibrated grid instead of to nearest
            (`quept_hf.calibration.gptq`), so that each layer reproduces its float outputs: the same format and
            size. One forward pass over the data per kept width from 3 bits (2 bits keep plain rounding:
            `COMPENSATED_MIN_BITS`). ``None`` (default): plain rounding.
        tokenizer: the tokenizer of ``error_compensation`` texts.
        error_compensation_bits: the kept widths to compensate (default: every one from `COMPENSATED_MIN_BITS`);
            the others keep plain rounding, i.e. the elastic model's codes. Compensation re-rounds each layer
            towards its float outputs, which can undo what a width's own MB-CLoRA slice learned for the block
            (docs/RESULTS.md, "W4 in a bit group of its own": W4 worse with it, W3 better, before the grid search
            had the importance-searched clipping; with it both gained: "The importance-searched grid ...").
        zero_point: freeze some kept widths onto another grid kind than they were calibrated on (`QuEPTConfig`'s
            ``zero_point`` kinds): ``{4: "symmetric"}`` puts W4's calibrated clipping of ``W + ΔW_4`` on
            llama.cpp's ``Q4_0`` grid, whose GGUF export is then exact (with ``error_compensation`` GPTQ picks the
            codes on that grid). ``None`` (default): the calibrated grids.

    Returns a transformers model of the same class whose quantized linears are `FrozenLinear`: it answers
    ``set_adapter("w3")`` / ``set_adapter("mixed-3.25")``, `quept_hf.set_bits` and `quept_hf.get_bits`, saves with
    ``save_pretrained`` and reloads with ``from_pretrained``. At every kept width its logits equal the elastic
    model's bit for bit (weight form ``"dequantized"``, the default; see `quept_hf.set_weight_form`), unless
    ``error_compensation`` chose other codes on the same grid.
    """
    base = unwrap(model)
    config = quept_config(model)
    _check_head_bits(head_bits)
    refuse_offloaded(model, "freeze")
    uniform, plan_maps, kept = kept_widths(model, bits, plans)
    regrid = zero_point_kinds(zero_point, sorted({b for w in kept.values() for b in w}), "freeze: zero_point")
    by_width: dict[str, dict[int, QuantizedLinear]] = {module: {} for module in kept}
    compensation = (error_compensation, tokenizer, error_compensation_bits)
    with regridded(model, regrid):
        for b, hessians in _hessians_by_width(model, config, kept, *compensation):
            planned = {m: b for m, w in kept.items() if b in w and (hessians is None or m in hessians)}
            for module, q in quantize_layers(model, planned, hessians).items():
                by_width[module][b] = q
    prefixes = tuple(name + "." for name in kept)
    state = {k: v for k, v in base_state_dict(base).items() if not k.startswith(prefixes)}
    for module, widths in by_width.items():
        state.update(_frozen_tensors(module, widths))
    per_tensor = sorted(m for m, widths in by_width.items() if any(q.act_log_step is not None for q in widths.values()))
    hf_config = type(base.config).from_dict(base.config.to_dict())
    description = frozen_config(config, uniform, plan_maps, kept, per_tensor, regrid)
    if head_bits is not None:
        head, head_state = _head_tensors(base, head_bits)
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")} | head_state
        description.frozen["head"] = {"module": head, "bits": head_bits, "group_size": HEAD_GROUP_SIZE}
        hf_config.tie_word_embeddings = False
    hf_config.quantization_config = description.to_dict()
    frozen = type(base).from_pretrained(None, config=hf_config, state_dict=state, dtype=base.dtype).eval()
    if getattr(base, "generation_config", None) is not None:
        frozen.generation_config = copy.deepcopy(base.generation_config)
    _carry_input_transforms(frozen, by_width)
    logger.info("QuEPT: froze %d linear layers at bits %s and plans %s", len(kept), uniform, sorted(plan_maps))
    return frozen


def _hessians_by_width(
    model: nn.Module,
    config: QuEPTConfig,
    kept: dict[str, list[int]],
    data: Any,
    tokenizer: Any,
    compensated_bits: Iterable[int] | None = None,
) -> Iterator[tuple[int, dict[str, torch.Tensor] | None]]:
    """``(bits, hessians)`` chunks to round: ``None`` (plain rounding, every layer) without calibration data and
    for the widths not compensated (`_compensated_widths`)."""
    widths = sorted({b for w in kept.values() for b in w})
    chosen = _compensated_widths(widths, data, compensated_bits)
    plain = [b for b in widths if b not in chosen]
    yield from ((b, None) for b in plain)
    compensated = {m: [b for b in w if b not in plain] for m, w in kept.items()}
    if not any(compensated.values()):
        return
    logger.info("QuEPT: freezing with error compensation (GPTQ on the calibrated grids), one data pass per width")
    settings = {"num_samples": config.num_samples, "seq_len": config.seq_len, "seed": config.seed}
    yield from input_hessians(model, compensated, data, tokenizer=tokenizer, **settings)


def _compensated_widths(widths: list[int], data: Any, bits: Iterable[int] | None) -> list[int]:
    """``error_compensation_bits`` checked against the kept ``widths``: default every width from 3 bits."""
    if bits is None:
        return [] if data is None else [b for b in widths if b >= COMPENSATED_MIN_BITS]
    chosen = None if isinstance(bits, (str, bytes)) or not isinstance(bits, Iterable) else list(bits)
    if data is None or chosen is None or any(b not in widths for b in chosen):
        raise ValueError(
            f"freeze: error_compensation_bits={bits!r} must be a list of kept bit-widths, {widths}, given with "
            "error_compensation data"
        )
    return sorted(set(chosen))


def _carry_input_transforms(frozen: nn.Module, by_width: dict[str, dict[int, QuantizedLinear]]) -> None:
    """Online input transforms the config does not restore on load (rotation's are restored) stay in memory."""
    for module, widths in by_width.items():
        transform = next(iter(widths.values())).input_transform
        layer = frozen.get_submodule(module)
        if transform is not None and isinstance(layer, FrozenLinear) and layer.input_transform is None:
            layer.input_transform = transform

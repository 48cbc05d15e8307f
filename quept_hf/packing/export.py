"""Freeze an elastic QuEPT model at one bit-width or mixed plan and store it with real low-bit weights.

``quept_hf.export(model, "w3", out_dir)`` (or an int, ``"mixed-3.25"``, or a ``{module: bits}`` mapping), for
every `QuEPTLinear`:

1. ``W' = W + delta_b``: the MB-CLoRA cascade delta of that layer's bit-width (when adapters are attached and
   not merged or disabled), added in the weight's dtype exactly as the fake-quant forward adds it;
2. integer codes, scales and zero points of ``W'`` with the CALIBRATED clipping logits of that bit-width
   (`quept_hf.nn.functional.quantize_weight_codes`, the fake quantizer's own math);
3. codes packed densely (`quept_hf.packing.codec`), stored as a `PackedLinear`.

The result is a transformers folder written by ``save_pretrained`` (safetensors only): ``config.json`` carries
the SAME ``"quept"`` quantization method with ``packed = {"format": "quept-packed", "bits": {module: b}, ...}``,
so ``AutoModelForCausalLM.from_pretrained(out_dir)`` (after ``import quept_hf``) builds `PackedLinear` modules
on the meta device and loads only packed tensors. Its logits equal the fake-quant model's at that bit-width:
the dequantized weight is bitwise the fake-quant weight (same ops, same dtype), so on the same device and dtype
the outputs agree to float round-off of identical computations (0 on CPU in the tests).

The folder is staged next to ``out_dir`` and renamed into place, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..atomic import staged_folder
from ..config import FORMAT_VERSION, MAX_BITS, MIN_BITS, PACKED_FORMAT, PACKED_VERSION, QuEPTConfig
from ..mbclora.layer import MBCLoRALayer
from ..naming import bits_of_adapter_name
from ..nn import FLOAT_BITS, QuEPTLinear, quantize_weight_codes
from .linear import PackedLinear

logger = logging.getLogger(__name__)

__all__ = ["QuantizedLinear", "export", "pack_model", "quantize_layers", "resolve_plan"]

EXPORT_FORMATS = ("quept", "gguf")
BitsOrPlan = int | str | Mapping[str, int]


@dataclass
class QuantizedLinear:
    """One layer frozen at one bit-width: what every storage format (ours, compressed-tensors) is built from."""

    codes: torch.Tensor  # uint8 (out, in), values in [0, 2^bits - 1]
    scales: torch.Tensor  # (out, groups), the weight's float dtype
    zeros: torch.Tensor  # (out, groups), integer-valued, same dtype
    bias: torch.Tensor | None
    bits: int
    group_size: int
    activation_bits: int | None
    input_transform: object | None = None
    act_log_step: torch.Tensor | None = None  # per-tensor activation quantization (ViTs): calibrated log step


# ------------------------------------------------------------------------------------------ the plan


def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve_plan(model: nn.Module, bits_or_plan: BitsOrPlan) -> tuple[str, dict[str, int]]:
    """``(name, {module: bits})`` for every quantized linear of ``model``.

    Accepts an int (``3``), a bit-width name (``"w3"``), a stored mixed plan (``"mixed-3.25"``, from the
    QuEPTConfig's ``plans`` or the MB-CLoRA adapter's), or a mapping ``{module or block prefix: bits}``
    (modules it does not name keep the config's ``default_bits``). Raises a ValueError naming what exists.
    """
    from ..quantizer import quept_linears
    from ..switch import quept_config

    config = quept_config(model)
    layers = quept_linears(_unwrap(model))
    if not layers:
        raise ValueError("the model has no QuEPTLinear layer to export (already packed, or not a QuEPT model?)")
    name, mapping = _plan_mapping(model, config, bits_or_plan)
    plan = _expand(mapping, list(layers), config.default_bits)
    for module, bits in plan.items():
        if bits not in layers[module].bits:
            raise ValueError(
                f"bit-width {bits} is not available for {module}: it offers {layers[module].bits} "
                "(a merged model keeps only its merged bit-width)"
            )
    return name, plan


def _plan_mapping(model: nn.Module, config: QuEPTConfig, bits_or_plan: BitsOrPlan) -> tuple[str, dict]:
    """Name and raw ``{unit: bits}`` of the requested plan (an int plan maps every module: key ``""``)."""
    if isinstance(bits_or_plan, Mapping):
        return "custom", {str(k): _check_bits(v, config) for k, v in bits_or_plan.items()}
    if bits_of_adapter_name(bits_or_plan) is not None:
        bits_or_plan = bits_of_adapter_name(bits_or_plan)
    if isinstance(bits_or_plan, int) and not isinstance(bits_or_plan, bool):
        bits = _check_bits(bits_or_plan, config)
        return f"w{bits}", {"": bits}
    plans = stored_plans(model, config)
    if isinstance(bits_or_plan, str) and bits_or_plan in plans:
        return bits_or_plan, plans[bits_or_plan]
    available = [f"w{b}" for b in config.bits] + sorted(plans)
    raise ValueError(f"unknown bit-width or plan {bits_or_plan!r}; this model provides {available}")


def _check_bits(bits: object, config: QuEPTConfig) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"packed export supports bit-widths {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if bits not in config.bits:
        raise ValueError(f"bit-width {bits} is not available; this model was calibrated for bits {config.bits}")
    return bits


def stored_plans(model: nn.Module, config: QuEPTConfig) -> dict[str, dict[str, int]]:
    """Mixed plans ``{name: {unit: bits}}`` from the QuEPTConfig (``{"bits": {...}}`` entries) and MB-CLoRA."""
    from ..serialization import elastic_adapter

    plans: dict[str, dict[str, int]] = {}
    found = elastic_adapter(model)
    if found is not None:
        plans.update({k: dict(v) for k, v in (found[1].plans or {}).items()})
    for name, entry in (getattr(config, "plans", None) or {}).items():
        plans[name] = dict(entry.get("bits", entry) if isinstance(entry, Mapping) else entry)
    return plans


def _expand(mapping: dict[str, int], modules: list[str], default: int) -> dict[str, int]:
    """Give every module the bits of the longest mapping key that is the module or a prefix block of it."""
    used: set[str] = set()
    plan = {}
    for module in modules:
        keys = [k for k in mapping if k == "" or module == k or module.startswith(k + ".")]
        key = max(keys, key=len, default=None)
        plan[module] = mapping[key] if key is not None else default
        used.update(keys)
    unknown = sorted(set(mapping) - used)
    if unknown:
        raise ValueError(f"the plan names {unknown[:4]}, which match no quantized linear (e.g. {modules[:2]})")
    return plan


# ------------------------------------------------------------------------------------- quantization


@torch.no_grad()
def quantize_layers(model: nn.Module, plan: dict[str, int]) -> dict[str, QuantizedLinear]:
    """Codes, scales and zero points of every planned layer, exactly as its fake-quant forward would use."""
    from ..quantizer import quept_linears

    base = _unwrap(model)
    layers = quept_linears(base)
    adapters = {id(m.base_layer): m for m in base.modules() if isinstance(m, MBCLoRALayer)}
    return {name: _quantize(layers[name], adapters.get(id(layers[name])), bits) for name, bits in plan.items()}


def _quantize(layer: QuEPTLinear, adapter: MBCLoRALayer | None, bits: int) -> QuantizedLinear:
    weight = layer.weight
    if adapter is not None and not (adapter.disable_adapters or adapter.merged):
        weight = weight + adapter.delta_weight(bits).to(weight.dtype)  # as QuEPTLinear.quantized_weight does
    key, group_size = str(bits), layer.group_size[bits]
    codes, scales, zeros = quantize_weight_codes(weight, bits, layer.clip_upper[key], layer.clip_lower[key], group_size)
    act_bits, act_log_step = None, None
    if layer.quantize_activations:
        act_bits = layer.activation_bits if layer.activation_bits is not None else bits
        act_bits = None if act_bits >= FLOAT_BITS else act_bits
    if act_bits is not None and getattr(layer, "activation_granularity", "per_token") == "per_tensor":
        act_log_step = layer.clip_act[str(act_bits)].detach()
    bias = None if layer.bias is None else layer.bias.detach()
    return QuantizedLinear(codes, scales, zeros, bias, bits, group_size, act_bits, layer.input_transform, act_log_step)


# ------------------------------------------------------------------------------------ the packed model


def packed_config(config: QuEPTConfig, name: str, layers: dict[str, QuantizedLinear]) -> QuEPTConfig:
    """The elastic config narrowed to the exported bit-widths, with the ``packed`` description added.

    Plans are dropped (a packed model cannot switch); every other field (mode, calibration record, fields
    added by other features) is carried over unchanged.
    """
    data = config.to_dict()
    data.pop("quant_method", None)
    used = sorted({q.bits for q in layers.values()})
    data.update(
        format_version=FORMAT_VERSION,
        bits=used,
        bit_groups=[used],
        default_bits=max(used),
        group_size={b: config.group_size[b] for b in used},
        ranks=[config.ranks[0]],
        merge_weights=[1.0],
        packed={"format": PACKED_FORMAT, "version": PACKED_VERSION, "source": name},
    )
    data["packed"]["bits"] = {module: q.bits for module, q in layers.items()}
    activation = {module: q.activation_bits for module, q in layers.items() if q.activation_bits is not None}
    if activation:
        data["packed"]["activation_bits"] = activation
    per_tensor = sorted(module for module, q in layers.items() if q.act_log_step is not None)
    if per_tensor:
        data["packed"]["per_tensor_activations"] = per_tensor
    if "plans" in data:
        data["plans"] = {}
    return QuEPTConfig.from_dict(data)


def _packed_state_dict(base: nn.Module, layers: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """Every non-packed tensor of the model (adapters stripped) plus the packed layers' tensors."""
    from ..serialization import base_state_dict

    prefixes = tuple(name + "." for name in layers)
    state = {k: v for k, v in base_state_dict(base).items() if not k.startswith(prefixes)}
    for name, q in layers.items():
        module = PackedLinear.from_codes(
            q.codes,
            q.scales,
            q.zeros,
            q.bias,
            bits=q.bits,
            group_size=q.group_size,
            activation_bits=q.activation_bits,
            act_log_step=q.act_log_step,
        )
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def pack_model(model: nn.Module, bits_or_plan: BitsOrPlan) -> nn.Module:
    """An in-memory packed copy of ``model`` at ``bits_or_plan`` (see `export`); ``model`` is left unchanged.

    Built by transformers' own loading path (``from_pretrained(None, config=..., state_dict=...)``), so it is
    the very model ``from_pretrained`` of the exported folder gives. Input transforms (online rotations) are
    carried over in memory.
    """
    from ..switch import quept_config

    base = _unwrap(model)
    name, plan = resolve_plan(model, bits_or_plan)
    layers = quantize_layers(model, plan)
    hf_config = type(base.config).from_dict(base.config.to_dict())
    hf_config.quantization_config = packed_config(quept_config(model), name, layers).to_dict()
    state = _packed_state_dict(base, layers)
    packed = type(base).from_pretrained(None, config=hf_config, state_dict=state, dtype=base.dtype).eval()
    if getattr(base, "generation_config", None) is not None:
        packed.generation_config = copy.deepcopy(base.generation_config)
    for module_name, q in layers.items():
        packed.get_submodule(module_name).input_transform = q.input_transform
    return packed


# ------------------------------------------------------------------------------------------- export


def export(
    model: nn.Module,
    bits_or_plan: BitsOrPlan,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    format: str = "quept",
    **save_kwargs,
) -> str:
    """Write ``model`` frozen at ``bits_or_plan`` with packed integer weights to ``out_dir``; returns the path.

    Args:
        model: an elastic QuEPT model (transformers model, with or without MB-CLoRA adapters, or a PeftModel).
        bits_or_plan: ``3``, ``"w3"``, ``"mixed-3.25"`` (a stored plan) or ``{module or block: bits}``.
        out_dir: target folder; it must not exist (or be empty) unless ``overwrite=True``.
        tokenizer: optionally saved alongside, so the folder is self-contained.
        format: ``"quept"`` (this packed transformers folder) or ``"gguf"`` (one llama.cpp file: `out_dir` is
            the ``.gguf`` path or a folder for it; see `quept_hf.packing.gguf.export_gguf`, which also takes an
            elastic or frozen model and ``embedding_type=`` through ``save_kwargs``).
        save_kwargs: passed to ``save_pretrained`` (e.g. ``max_shard_size``).

    Load with ``AutoModelForCausalLM.from_pretrained(out_dir)`` after ``import quept_hf``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} is not supported; choose one of {list(EXPORT_FORMATS)}")
    if format == "gguf":
        from .gguf import export_gguf

        return export_gguf(model, bits_or_plan, out_dir, tokenizer=tokenizer, overwrite=overwrite, **save_kwargs)
    out_dir = os.fspath(out_dir)
    _check_target(out_dir, overwrite)
    packed = pack_model(model, bits_or_plan)
    from ..calibration.rotation import restored_on_load  # the rotation's online Hadamard comes back from the config

    config = packed.config.quantization_config
    transformed = [
        n
        for n, m in packed.named_modules()
        if isinstance(m, PackedLinear) and m.input_transform and not restored_on_load(m.input_transform, config)
    ]
    if transformed:
        raise ValueError(
            f"{len(transformed)} layers (e.g. {transformed[0]}) apply an online input transform, which the packed "
            "format cannot store yet; use pack_model() for an in-memory packed model instead"
        )
    with staged_folder(out_dir) as staging:
        packed.save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    logger.info("QuEPT: exported %s to %s", packed.config.quantization_config.packed["source"], out_dir)
    return out_dir


def _check_target(out_dir: str, overwrite: bool) -> None:
    if os.path.isfile(out_dir):
        raise ValueError(f"export target {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty: pass overwrite=True to replace it")

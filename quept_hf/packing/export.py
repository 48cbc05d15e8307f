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
A model whose weights accelerate offloads (``device_map``) is exported one block at a time
(`quept_hf.packing.stream.write_blockwise`: one shard per block): the same tensors, at a peak memory of one block.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from ..atomic import staged_folder
from ..calibration.offload import has_offloaded
from ..calibration.rotation import restored_on_load  # the rotation's online Hadamard comes back from the config
from ..compat import unwrap
from ..config import FORMAT_VERSION, PACKED_FORMAT, PACKED_VERSION, QuEPTConfig, quept_config
from ..inspection import base_state_dict
from .gguf import export_gguf
from .linear import PackedLinear
from .plan import BitsOrPlan, QuantizedLinear, check_target, quantize_layers, refuse_offloaded, resolve_plan
from .stream import write_blockwise

logger = logging.getLogger(__name__)

__all__ = ["export", "pack_model"]

EXPORT_FORMATS = ("quept", "gguf")


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
        zero_point={b: config.zero_point[b] for b in used},
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


def _packed_tensors(layers: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
    """The stored tensors of the packed layers (codes packed densely, scales, zero points, bias)."""
    state = {}
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


def _packed_hf_config(model: nn.Module, name: str, layers: dict[str, QuantizedLinear]):
    base = unwrap(model)
    hf_config = type(base.config).from_dict(base.config.to_dict())
    hf_config.quantization_config = packed_config(quept_config(model), name, layers).to_dict()
    return hf_config


def pack_model(model: nn.Module, bits_or_plan: BitsOrPlan) -> nn.Module:
    """An in-memory packed copy of ``model`` at ``bits_or_plan`` (see `export`); ``model`` is left unchanged.

    Built by transformers' own loading path (``from_pretrained(None, config=..., state_dict=...)``), so it is
    the very model ``from_pretrained`` of the exported folder gives. Input transforms (online rotations) are
    carried over in memory.
    """
    refuse_offloaded(model, "pack_model")
    name, plan = resolve_plan(model, bits_or_plan)
    return _packed_model(model, name, quantize_layers(model, plan))


def _packed_model(model: nn.Module, name: str, layers: dict[str, QuantizedLinear]) -> nn.Module:
    base = unwrap(model)
    prefixes = tuple(module + "." for module in layers)
    state = {k: v for k, v in base_state_dict(base).items() if not k.startswith(prefixes)} | _packed_tensors(layers)
    hf_config = _packed_hf_config(model, name, layers)
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
        return export_gguf(model, bits_or_plan, out_dir, tokenizer=tokenizer, overwrite=overwrite, **save_kwargs)
    out_dir = os.fspath(out_dir)
    check_target(out_dir, overwrite)
    name, plan = resolve_plan(model, bits_or_plan)
    layers = quantize_layers(model, plan)  # offloaded layers come as meta tensors: their format, no weight read
    _refuse_input_transforms(layers, quept_config(model))
    with staged_folder(out_dir) as staging:
        if has_offloaded(unwrap(model)):
            _save_streamed(model, name, plan, layers, staging, save_kwargs)
        else:
            _packed_model(model, name, layers).save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    logger.info("QuEPT: exported %s to %s", name, out_dir)
    return out_dir


def _refuse_input_transforms(layers: dict[str, QuantizedLinear], config: QuEPTConfig) -> None:
    """The packed format stores the rotation's online Hadamard (restored from the config), no other transform."""
    transformed = [
        n for n, q in layers.items() if q.input_transform and not restored_on_load(q.input_transform, config)
    ]
    if transformed:
        raise ValueError(
            f"{len(transformed)} layers (e.g. {transformed[0]}) apply an online input transform, which the packed "
            "format cannot store yet; use pack_model() for an in-memory packed model instead"
        )


def _save_streamed(
    model: nn.Module, name: str, plan: dict[str, int], layers: dict[str, QuantizedLinear], folder: str, save_kwargs
) -> None:
    """The packed folder of a model accelerate offloads, one block at a time (`write_blockwise`): the folder
    ``pack_model(model, plan).save_pretrained(folder)`` gives, at a peak memory of one block."""
    if save_kwargs:
        raise ValueError(
            f"export: {sorted(save_kwargs)} apply to save_pretrained of an in-memory model; the export of an "
            "offloaded model writes one safetensors shard per block"
        )
    base = unwrap(model)
    write_blockwise(model, folder, plan, lambda m: _packed_tensors(quantize_layers(model, {n: plan[n] for n in m})),
                    {"format": "pt"})  # fmt: skip
    hf_config = _packed_hf_config(model, name, layers)
    hf_config.dtype = base.dtype
    hf_config.save_pretrained(folder)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)

"""What an export or a freeze is made of: the plan (a bit-width per quantized linear) and each layer's codes.

Every storage format (`quept_hf.packing.export`'s packed folder, `freeze`, GGUF, compressed-tensors) starts from
`resolve_plan` and `quantize_layers`: the codes, scales and zero points the fake-quant forward uses at that width.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.gptq import compensated_weight_codes
from ..compat import unwrap
from ..config import MAX_BITS, MIN_BITS, QuEPTConfig, quept_config
from ..inspection import elastic_adapter, quept_linears
from ..mbclora.layer import MBCLoRALayer
from ..naming import FLOAT_BITS, bits_of_adapter_name
from ..nn import QuEPTLinear, quantize_weight_codes

__all__ = [
    "BitsOrPlan", "QuantizedLinear", "check_target", "quantize_layers", "regridded", "resolve_plan", "stored_plans",
]  # fmt: skip

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


def resolve_plan(model: nn.Module, bits_or_plan: BitsOrPlan) -> tuple[str, dict[str, int]]:
    """``(name, {module: bits})`` for every quantized linear of ``model``.

    Accepts an int (``3``), a bit-width name (``"w3"``), a stored mixed plan (``"mixed-3.25"``, from the
    QuEPTConfig's ``plans`` or the MB-CLoRA adapter's), or a mapping ``{module or block prefix: bits}``
    (modules it does not name keep the config's ``default_bits``). Raises a ValueError naming what exists.
    """
    config = quept_config(model)
    layers = quept_linears(unwrap(model))
    if not layers:
        raise ValueError("the model has no QuEPTLinear layer to export (already packed, or not a QuEPT model?)")
    name, mapping = plan_mapping(model, config, bits_or_plan)
    plan = expand_plan(mapping, list(layers), config.default_bits)
    for module, bits in plan.items():
        if bits not in layers[module].bits:
            raise ValueError(
                f"bit-width {bits} is not available for {module}: it offers {layers[module].bits} "
                "(a merged model keeps only its merged bit-width)"
            )
    return name, plan


def plan_mapping(model: nn.Module, config: QuEPTConfig, bits_or_plan: BitsOrPlan) -> tuple[str, dict]:
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
    plans: dict[str, dict[str, int]] = {}
    found = elastic_adapter(model)
    if found is not None:
        plans.update({k: dict(v) for k, v in (found[1].plans or {}).items()})
    for name, entry in (getattr(config, "plans", None) or {}).items():
        plans[name] = dict(entry.get("bits", entry) if isinstance(entry, Mapping) else entry)
    return plans


def expand_plan(mapping: dict[str, int], modules: list[str], default: int) -> dict[str, int]:
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
def quantize_layers(
    model: nn.Module, plan: dict[str, int], hessians: Mapping[str, torch.Tensor] | None = None
) -> dict[str, QuantizedLinear]:
    """Codes, scales and zero points of every planned layer, exactly as its fake-quant forward would use.

    With ``hessians`` (``{module: input Hessian}`` at the planned width), the layers named there are rounded with
    GPTQ error compensation on the same grid (`quept_hf.calibration.gptq`) instead of to nearest, so that they
    reproduce the float layer's outputs.
    """
    base = unwrap(model)
    layers = quept_linears(base)
    adapters = {id(m.base_layer): m for m in base.modules() if isinstance(m, MBCLoRALayer)}
    hessians = hessians or {}
    return {
        name: _quantize(layers[name], adapters.get(id(layers[name])), bits, hessians.get(name))
        for name, bits in plan.items()
    }


@contextlib.contextmanager
def regridded(model: nn.Module, kinds: Mapping[int, str]) -> Iterator[None]:
    """Within the block, width ``b``'s grid is ``kinds[b]`` (`QuEPTConfig.zero_point`'s kinds) on every quantized
    linear: the calibrated clipping of ``W + ΔW_b`` put on another grid, e.g. a float-zero W4 on llama.cpp's
    symmetric ``Q4_0`` blocks. Everything run inside (the fake-quant forward, the input Hessians, the codes)
    sees that grid; the model's own kinds come back afterwards."""
    layers = list(quept_linears(unwrap(model)).values()) if kinds else []
    saved = [dict(layer.zero_point) for layer in layers]
    try:
        for layer in layers:
            layer.zero_point.update({b: k for b, k in kinds.items() if b in layer.zero_point})
        yield
    finally:
        for layer, kinds_before in zip(layers, saved, strict=True):
            layer.zero_point = kinds_before


GRID_SEARCH = True  # compensated rows may take a grid of the float weight (calibration/gptq.py's search)


def _quantize(
    layer: QuEPTLinear, adapter: MBCLoRALayer | None, bits: int, hessian: torch.Tensor | None = None
) -> QuantizedLinear:
    weight = layer.weight
    if adapter is not None and not (adapter.disable_adapters or adapter.merged):
        weight = weight + adapter.delta_weight(bits).to(weight.dtype)  # as QuEPTLinear.quantized_weight does
    if hessian is None:
        codes, scales, zeros = quantize_weight_codes(weight, bits, *layer.grid(bits))
    else:
        # the grid of W + ΔW_b, the outputs of the FLOAT layer: GPTQ matching W + ΔW_b itself undoes what training
        # did for rounding (docs/RESULTS.md, "Error-compensated freezing": W4 26.20 against 23.89 for this target)
        target = layer.weight
        codes, scales, zeros = compensated_weight_codes(
            weight, hessian, bits, *layer.grid(bits), target=target, grid_search=GRID_SEARCH
        )
    act_bits, act_log_step = None, None
    if layer.quantize_activations:
        act_bits = layer.activation_bits if layer.activation_bits is not None else bits
        act_bits = None if act_bits >= FLOAT_BITS else act_bits
    if act_bits is not None and getattr(layer, "activation_granularity", "per_token") == "per_tensor":
        act_log_step = layer.clip_act[str(act_bits)].detach()
    bias = None if layer.bias is None else layer.bias.detach()
    group_size = layer.group_size[bits]
    return QuantizedLinear(codes, scales, zeros, bias, bits, group_size, act_bits, layer.input_transform, act_log_step)


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """``what`` builds its result in memory: refuse a model whose weights accelerate offloads (meta tensors)."""
    if any(p.device.type == "meta" for p in unwrap(model).parameters()):
        raise ValueError(
            f"{what}: the model's weights are offloaded (device_map), and {what} builds its result in memory; "
            "write it to disk block by block instead: the frozen model with quept_hf.packing.stream.save_frozen(model, "
            "folder, bits, plans), the packed one with quept_hf.export(model, bits, folder) (format='gguf' for "
            "llama.cpp), or export_compressed_tensors(model, bits, folder)"
        )


def check_target(out_dir: str, overwrite: bool) -> None:
    if os.path.isfile(out_dir):
        raise ValueError(f"export target {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty: pass overwrite=True to replace it")

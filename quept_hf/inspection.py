"""Looking things up on a QuEPT model: its quantized layers, its MB-CLoRA adapter, its tensors without adapters.

Read-only helpers every layer of the package needs (switching, calibration, export, saving, the Hub). They sit
at the bottom, above only the layer classes they look for, so nothing has to import a high-level module to find a
layer. The model's `QuEPTConfig` is looked up by `quept_hf.config.quept_config`.
"""

from __future__ import annotations

import torch
from torch import nn

from .compat import unwrap
from .mbclora.config import MBCLoRAConfig
from .mbclora.layer import MBCLoRALayer
from .nn import QuEPTLinear
from .packing.frozen import FrozenLinear

__all__ = [
    "adapter_configs",
    "base_state_dict",
    "elastic_adapter",
    "frozen_linears",
    "mbclora_layers",
    "quept_linears",
    "unwrap",
]


def quept_linears(model: nn.Module) -> dict[str, QuEPTLinear]:
    """Every `QuEPTLinear` of a model (through PEFT wrappers too), by module name without PEFT prefixes."""
    return {
        _strip_peft_prefix(name): module for name, module in model.named_modules() if isinstance(module, QuEPTLinear)
    }


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def frozen_linears(model: nn.Module) -> dict[str, FrozenLinear]:
    """Every `FrozenLinear` of a model, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, FrozenLinear)}


def mbclora_layers(model: nn.Module) -> dict[str, MBCLoRALayer]:
    """Every MB-CLoRA adapter layer by module name (empty when no adapters are attached or they were merged)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MBCLoRALayer)}


def elastic_adapter(model: nn.Module) -> tuple[str, MBCLoRAConfig] | None:
    """``(name, config)`` of the model's elastic MB-CLoRA adapter, or ``None`` when it carries none."""
    model = unwrap(model)
    if not mbclora_layers(model):
        return None
    configs = getattr(model, "peft_config", None) or {}
    roots = [(name, config) for name, config in dict.items(configs) if isinstance(config, MBCLoRAConfig)]
    if len(roots) != 1:
        raise ValueError(f"expected one elastic MB-CLoRA adapter on the model, found {[n for n, _ in roots]}")
    return roots[0]


def adapter_configs(model: nn.Module) -> list[MBCLoRAConfig]:
    """Every distinct MBCLoRAConfig object switching reads: the PEFT config dicts' (which ``set_adapter`` checks
    names against) and the adapter layers' (which resolve a plan to bit-widths)."""
    found: dict[int, MBCLoRAConfig] = {}
    for owner in (model, getattr(model, "base_model", None), unwrap(model)):
        for config in dict.values(getattr(owner, "peft_config", None) or {}):
            if isinstance(config, MBCLoRAConfig):
                found[id(config)] = config
    for layer in mbclora_layers(model).values():
        found.update({id(c): c for c in layer.elastic.values()})
    return list(found.values())


def base_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as if no adapter were attached: ``q_proj.base_layer.weight`` -> ``q_proj.weight``,
    ``mbclora_`` tensors dropped. ``state_dict`` defaults to ``model.state_dict()`` (same naming)."""
    model = unwrap(model)
    state_dict = model.state_dict() if state_dict is None else state_dict
    wrapped = set(mbclora_layers(model))
    out = {}
    for key, value in state_dict.items():
        owner, rest = _split_at_owner(key, wrapped)
        if owner is None:
            out[key] = value
        elif rest.startswith("base_layer."):
            out[f"{owner}.{rest.removeprefix('base_layer.')}"] = value
        elif not rest.startswith(MBCLoRALayer.adapter_layer_names):
            out[key] = value
    return out


def _split_at_owner(key: str, owners: set[str]) -> tuple[str | None, str]:
    """``("a.q_proj", "base_layer.weight")`` for key ``a.q_proj.base_layer.weight`` when ``a.q_proj`` is an owner."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in owners:
            return prefix, ".".join(parts[cut:])
    return None, key

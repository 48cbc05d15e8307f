"""`MBCLoRAModel`: the PEFT tuner that injects MB-CLoRA around every `QuEPTLinear`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import ClassVar

from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import PreTrainedModel

from ..config import quept_config
from ..nn import QuEPTLinear
from .config import MBCLoRAConfig
from .layer import MBCLoRALayer

# Called with the transformers model after MB-CLoRA is injected into it: `quept_hf.saving` registers the hook
# that makes its saves write the whole elastic model (this low-level tuner cannot import saving itself).
INJECTION_HOOKS: list[Callable[[nn.Module], None]] = []


class ElasticAdapters(dict):
    """PEFT's ``peft_config`` dict, plus the bit-width names (``w4``, ``mixed-3.25``) as aliases.

    Iterating it yields only the real (saved) elastic adapter, so ``save_pretrained`` writes ONE adapter that
    holds every bit-width, while ``"w4" in peft_config`` and ``peft_config["w4"]`` make PEFT's and transformers'
    ``set_adapter("w4")`` accept the bit-width names. A name that exists nowhere is simply not in it (an unknown
    name gets its message from `quept_hf.switch`'s ``set_adapter``, which lists the bit-widths that exist).
    """

    def _alias_root(self, key: object) -> str | None:
        for root, config in dict.items(self):
            if isinstance(config, MBCLoRAConfig) and key in config.adapter_names():
                return root
        return None

    def available(self) -> list[str]:
        """Every name ``set_adapter`` accepts: the adapters' own and their bit-widths and plans."""
        names = list(dict.keys(self))
        return names + [n for c in dict.values(self) if isinstance(c, MBCLoRAConfig) for n in c.adapter_names()]

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._alias_root(key) is not None

    def __getitem__(self, key: str):
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        root = self._alias_root(key)
        if root is None:
            raise KeyError(key)
        return dict.__getitem__(self, root)

    def get(self, key, default=None):
        return self[key] if self.__contains__(key) else default


class MBCLoRAModel(BaseTuner):
    """PEFT tuner of MB-CLoRA: one elastic adapter = one cascaded delta per bit-width, on every QuEPTLinear."""

    prefix: str = "mbclora_"
    tuner_layer_cls = MBCLoRALayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: MBCLoRAConfig, adapter_name: str) -> None:
        """Fill the defaults from the model's QuEPTConfig, and expose the bit-width adapter names."""
        quant = quept_config(model)
        config.bit_groups = config.bit_groups or [list(g) for g in quant.bit_groups]
        config.ranks = config.ranks or list(quant.ranks)
        config.default_bits = config.default_bits or quant.default_bits
        for name, plan in (getattr(quant, "plans", None) or {}).items():  # mixed plans made before attaching
            config.plans.setdefault(name, dict(plan["bits"]))
        if config.bits != quant.bits:
            raise ValueError(f"MBCLoRAConfig.bit_groups {config.bit_groups} do not cover the model's bits {quant.bits}")
        if len(config.ranks) != len(config.bit_groups):
            raise ValueError(f"MBCLoRAConfig.ranks={config.ranks} needs one rank per group of {config.bit_groups}")
        if config.target_modules is None:
            names = [name for name, m in model.named_modules() if isinstance(m, QuEPTLinear)]
            config.target_modules = "|".join(re.escape(name) for name in names) if names else None
        if not isinstance(self.peft_config, ElasticAdapters):
            self.peft_config = ElasticAdapters(self.peft_config)
        model.peft_config = self.peft_config

    def _post_injection_hook(self, model: nn.Module, config: MBCLoRAConfig, adapter_name: str) -> None:
        """A transformers model with adapters would save only the adapter: `INJECTION_HOOKS` make it save the
        elastic model."""
        if isinstance(model, PreTrainedModel):
            for hook in INJECTION_HOOKS:
                hook(model)

    def _check_new_adapter_config(self, config: MBCLoRAConfig) -> None:
        roots = [name for name, c in dict.items(self.peft_config) if isinstance(c, MBCLoRAConfig)]
        if len(roots) > 1:
            raise ValueError(
                f"a model holds one elastic MB-CLoRA adapter (it already covers every bit-width); found {roots}"
            )
        super()._check_new_adapter_config(config)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, MBCLoRALayer):
            target.update_layer(adapter_name, config)
            return
        module_name = current_key.removeprefix("base_model.model.")
        new_module = MBCLoRALayer(target, adapter_name, config, module_name=module_name)
        self._replace_module(parent, target_name, new_module, target)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        for module in self.model.modules():
            if isinstance(module, MBCLoRALayer):
                module.set_adapter(adapter_name)
        self.active_adapter = adapter_name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's loader only warns about missing adapter tensors, and the bit-widths they serve would then run with
        untrained (freshly initialised) slices: refuse such a checkpoint, naming the tensors and bit-widths."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_slices_loaded([key for key in model.state_dict() if key not in remapped], config, adapter_name)
        return remapped

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``q_proj.mbclora_A.<adapter>.0`` <-> ``q_proj.mbclora_A.0`` (the slice index follows the name)."""
        return re.sub(rf"(\.{cls.prefix}[AB])\.{re.escape(adapter_name)}(\.\d+)$", r"\1\2", key)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        bits = {layer.active_bits for layer in self.model.modules() if isinstance(layer, QuEPTLinear)}
        if merge and len(bits) > 1:
            raise ValueError(
                f"merge_and_unload keeps ONE bit-width, but the active plan mixes {sorted(bits)} bits across layers, "
                "which a merged checkpoint cannot describe: set_adapter('w<bits>') first, or keep the plan "
                "switchable and use quept_hf.export(model, '<plan name>', out_dir) for a packed mixed model"
            )
        model = super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)
        if not merge:
            return model
        quant = getattr(getattr(model, "config", None), "quantization_config", None)
        if quant is not None and len(bits) == 1:
            (only,) = bits
            quant.bits, quant.bit_groups, quant.default_bits = [only], [[only]], only
            quant.group_size = {only: quant.group_size[only]}
            quant.zero_point = {only: quant.zero_point[only]}
            quant.ranks = [quant.ranks[0]]
            quant.merge_weights = [1.0]
            quant.plans = {}  # one bit-width is left: no plan can switch any more
        return model


def slice_checkpoint_name(key: str, adapter_name: str) -> str | None:
    """The adapter file's name of the MB-CLoRA slice ``key`` in model naming (``m.mbclora_A.<adapter>.k`` ->
    ``base_model.model.m.mbclora_A.k``, PEFT's convention); None for any other key."""
    match = _slice_pattern(adapter_name).match(key)
    return None if match is None else f"base_model.model.{match.group(1)}.{match.group(2)}"


def _slice_pattern(adapter_name: str) -> re.Pattern:
    """An MB-CLoRA slice in model naming (a leading ``base_model.model.`` allowed): groups layer.factor, index."""
    return re.compile(rf"^(?:base_model\.model\.)?(.+\.mbclora_[AB])\.{re.escape(adapter_name)}\.(\d+)$")


def check_slices_loaded(missing_keys, config: MBCLoRAConfig, adapter_name: str) -> None:
    """Raise a ValueError naming every MB-CLoRA slice of ``adapter_name`` among ``missing_keys`` (model naming) in
    checkpoint naming, and the bit-widths that use them; other keys are ignored."""
    found = [match for key in missing_keys if (match := _slice_pattern(adapter_name).match(key))]
    if not found:
        return
    groups_high_first = list(reversed(config.bit_groups or []))
    bits = set()
    for match in found:
        k = int(match.group(2))
        users = groups_high_first[k:] if config.cascade else groups_high_first[k : k + 1]
        bits.update(b for group in users for b in group)
    names = sorted(f"base_model.model.{m.group(1)}.{m.group(2)}" for m in found)
    shown = ", ".join(names[:6]) + (f" ... ({len(names)} in all)" if len(names) > 6 else "")
    raise ValueError(
        f"The MB-CLoRA adapter checkpoint lacks tensors of bit-width(s) {sorted(bits)}: {shown}. Those bit-widths "
        "would run with untrained adapters; re-save or re-push the complete model."
    )

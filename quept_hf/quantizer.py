"""transformers hooks for quantization method ``"quept"``: swap modules, initialise or restore, serialise.

Glue only: the quantization math lives in `quept_hf.nn`, calibration in `quept_hf.calibration`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from .config import QuEPTConfig
from .nn import QuEPTLinear

logger = logging.getLogger(__name__)

CLIP_PATTERN = r"\.clip_(upper|lower)\.\d+$"


def _matches(name: str, patterns: list[str]) -> bool:
    """``name`` equals a pattern or ends with ``.pattern`` (``"lm_head"`` matches ``"model.lm_head"``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_linears(model: nn.Module, config: QuEPTConfig, skip: list[str]) -> list[str]:
    """Swap every ``nn.Linear`` not matched by ``skip`` for a `QuEPTLinear` (same device, shared weights).

    Works on the meta device (before weight loading) and on real weights alike; returns the swapped names.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _matches(name, skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = QuEPTLinear.from_linear(
            module,
            bits=config.bits,
            group_size=config.group_size,
            quantize_activations=config.mode == "weight_activation",
        )
        new.set_bits(config.default_bits)
        setattr(parent, child, new)
        swapped.append(name)
    return swapped


def quept_linears(model: nn.Module) -> dict[str, QuEPTLinear]:
    """Every `QuEPTLinear` of a model (through PEFT wrappers too), by module name without PEFT prefixes."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, QuEPTLinear):
            found[_strip_peft_prefix(name)] = module
    return found


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "")


class QuEPTHfQuantizer(HfQuantizer):
    """Quantizer of method ``"quept"``: elastic multi-bit fake quantization with learnable clipping."""

    requires_calibration = False
    quantization_config: QuEPTConfig

    def validate_environment(self, *args, **kwargs) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and {"disk"} & set(device_map.values()):
            raise ValueError("QuEPT does not support offloading layers to disk (device_map contains 'disk')")

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, keep_in_fp32_modules, add_default_skips=True
        )
        swapped = replace_linears(model, config, skip)
        if not swapped:
            raise ValueError(
                f"QuEPT found no nn.Linear to quantize in {type(model).__name__} (skipped: {sorted(skip)})"
            )
        logger.info("QuEPT: %d linear layers made elastic (%s)", len(swapped), config.bits)
        if not self.pre_quantized:
            # Clipping logits of a float checkpoint are initialised after loading, not "missing".
            model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []), CLIP_PATTERN]

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        layers = quept_linears(model)
        if self.pre_quantized:
            _check_loaded(layers)
        for layer in layers.values():
            if not self.pre_quantized:
                layer.reset_clipping()
            for param in (*layer.clip_upper.values(), *layer.clip_lower.values()):
                param.requires_grad_(False)
        from .switch import set_bits

        set_bits(model, config.default_bits)
        if not self.pre_quantized and config.dataset is not None:
            from .calibration import calibrate

            calibrate(model, config.dataset, tokenizer=config.tokenizer)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _check_loaded(layers: dict[str, QuEPTLinear]) -> None:
    """A pre-quantized checkpoint must carry every per-bit tensor: name the ones it lacks."""
    missing = [
        f"{name}.{kind}.{bits}"
        for name, layer in layers.items()
        for kind in ("clip_upper", "clip_lower")
        for bits, param in getattr(layer, kind).items()
        if not getattr(param, "_is_hf_initialized", False)
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"The QuEPT checkpoint lacks per-bit clipping tensors: {shown}")


def register() -> None:
    """Register ``"quept"`` with transformers once (importing quept_hf twice, or reloading it, is harmless)."""
    for mapping, cls, registrar in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, QuEPTConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, QuEPTHfQuantizer, register_quantizer),
    ):
        current = mapping.get("quept")
        if current is None:
            registrar("quept")(cls)
        elif current.__qualname__ == cls.__qualname__ and current.__module__ == cls.__module__:
            mapping["quept"] = cls  # a reload of quept_hf: keep the newest class
        else:
            raise RuntimeError(f"quantization method 'quept' is already registered by {current.__module__}")


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuEPTConfig) -> nn.Module:
    """Make an already loaded float model elastic in place (e.g. a GGUF-loaded model, which transformers
    refuses to combine with a ``quantization_config`` in ``from_pretrained``)."""
    _drop_previous_quantization(model)
    quantizer = QuEPTHfQuantizer(config, pre_quantized=False)
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    return quantizer.postprocess_model(model)


def _drop_previous_quantization(model: nn.Module) -> None:
    """A GGUF-loaded model carries ``quantization_config`` (gguf) though its weights are float already."""
    config = getattr(model, "config", None)
    previous = getattr(config, "quantization_config", None)
    if previous is None:
        return
    method = previous.get("quant_method") if isinstance(previous, dict) else getattr(previous, "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf":
        raise ValueError(f"The model is already quantized with {method!r}; QuEPT needs a float model")
    if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
        raise ValueError("The model keeps GGUF-packed weights; load it with dequantize=True before QuEPT")
    del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False

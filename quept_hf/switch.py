"""Run-time bit switching: `set_bits` / `get_bits` on a transformers model or a PEFT wrapper of it."""

from __future__ import annotations

from torch import nn

from .config import QuEPTConfig
from .nn import FLOAT_BITS
from .quantizer import quept_linears


def quept_config(model: nn.Module) -> QuEPTConfig:
    """The `QuEPTConfig` of a QuEPT model (unwrapping a ``peft.PeftModel``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "quept":
        config = QuEPTConfig.from_dict(config)
    if not isinstance(config, QuEPTConfig):
        raise ValueError(
            f"{type(base).__name__} is not a QuEPT model: load it with "
            "from_pretrained(..., quantization_config=quept_hf.QuEPTConfig(...)) after `import quept_hf`"
        )
    return config


def set_bits(model: nn.Module, bits: int) -> None:
    """Switch every elastic layer to ``bits`` (16 runs the float weights, for reference)."""
    config = quept_config(model)
    if bits not in config.bits and bits != FLOAT_BITS:
        raise ValueError(f"bits={bits!r} is not available; this model was built for bits {config.bits} (or 16)")
    for layer in quept_linears(model).values():
        layer.set_bits(bits)


def get_bits(model: nn.Module) -> int:
    """The bit-width every elastic layer currently runs at."""
    widths = {layer.active_bits for layer in quept_linears(model).values()}
    if len(widths) != 1:
        raise ValueError(f"the model's layers run at different bit-widths: {sorted(widths)}")
    return widths.pop()

"""MB-CLoRA as a PEFT method: ``peft.get_peft_model(quept_model, MBCLoRAConfig())`` or
``model.add_adapter(MBCLoRAConfig())`` adds one cascaded adapter per bit-width (``w2`` ... ``w8``)."""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import MBCLORA, MBCLoRAConfig, adapter_name_for_bits
from .layer import MBCLoRALayer
from .model import ElasticAdapters, MBCLoRAModel


def register() -> None:
    """Register the PEFT method once (re-importing quept_hf is harmless)."""
    if MBCLORA in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name="mbclora", config_cls=MBCLoRAConfig, model_cls=MBCLoRAModel)


__all__ = [
    "MBCLORA",
    "ElasticAdapters",
    "MBCLoRAConfig",
    "MBCLoRALayer",
    "MBCLoRAModel",
    "adapter_name_for_bits",
    "register",
]

"""quept_hf: QuEPT elastic-precision post-training quantization for Hugging Face Transformers.

``import quept_hf`` registers quantization method ``"quept"`` with transformers, so
``from_pretrained(..., quantization_config=quept_hf.QuEPTConfig(...))`` and loading a saved QuEPT
model both work.
"""

from . import hub, mbclora
from .calibration import calibrate
from .config import QuEPTConfig
from .mbclora import MBCLoRAConfig
from .mixed_precision import plan_mixed_precision
from .nn import QuEPTLinear
from .packing import FrozenLinear, PackedLinear, export, freeze, pack_model, set_weight_form
from .quantizer import QuEPTHfQuantizer, quantize_model, register
from .switch import get_bits, quept_config, set_bits

__version__ = "0.1.0"

register()
mbclora.register()

__all__ = [
    "FrozenLinear",
    "MBCLoRAConfig",
    "PackedLinear",
    "QuEPTConfig",
    "QuEPTHfQuantizer",
    "QuEPTLinear",
    "__version__",
    "calibrate",
    "export",
    "freeze",
    "get_bits",
    "hub",
    "pack_model",
    "plan_mixed_precision",
    "quantize_model",
    "quept_config",
    "set_bits",
    "set_weight_form",
]

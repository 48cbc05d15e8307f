"""quept_hf: QuEPT elastic-precision post-training quantization for Hugging Face Transformers.

``import quept_hf`` registers quantization method ``"quept"`` with transformers, so
``from_pretrained(..., quantization_config=quept_hf.QuEPTConfig(...))`` and loading a saved QuEPT
model both work.
"""

from . import hub, mbclora
from ._version import __version__
from .calibration import calibrate
from .compat import warn_untested_versions
from .config import QuEPTConfig, quept_config
from .mbclora import MBCLoRAConfig
from .mixed_precision import plan_mixed_precision
from .nn import QuEPTLinear
from .packing import FrozenLinear, PackedLinear, set_weight_form
from .packing.export import export, pack_model
from .packing.freeze import freeze
from .quantizer import QuEPTHfQuantizer, quantize_model, register
from .saving import push_to_hub, save_pretrained
from .switch import get_bits, set_bits

register()
mbclora.register()
warn_untested_versions()

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
    "push_to_hub",
    "quantize_model",
    "quept_config",
    "save_pretrained",
    "set_bits",
    "set_weight_form",
]

"""Per-architecture knowledge for the shared calibration engine: where the blocks are and how to feed them.

One small `Architecture` per family; the engine in `quept_hf.calibration` never branches on model type.
"""

from . import encoders, vision, vlm
from .fold import fold_block_norms, fold_norm
from .layout import DecoderLayout, find_module
from .registry import (
    Architecture,
    Chain,
    ModuleRoles,
    architecture_for,
    find_architecture,
    module_roles,
    register_architecture,
    supported_model_types,
)

__all__ = [
    "Architecture",
    "Chain",
    "DecoderLayout",
    "ModuleRoles",
    "architecture_for",
    "encoders",
    "find_architecture",
    "find_module",
    "fold_block_norms",
    "fold_norm",
    "module_roles",
    "register_architecture",
    "supported_model_types",
    "vision",
    "vlm",
]

"""Block-wise one-shot multi-bit calibration (spec sections 2-4): data, capture, MB-ToMe, engine, memory plan."""

from .engine import calibrate
from .mbtome import merge_tokens
from .memory import MemoryPlan, plan

__all__ = ["MemoryPlan", "calibrate", "merge_tokens", "plan"]

"""Block-wise one-shot multi-bit calibration (spec sections 2-4): data, capture, MB-ToMe, engine."""

from .engine import calibrate
from .mbtome import merge_tokens

__all__ = ["calibrate", "merge_tokens"]

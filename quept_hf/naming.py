"""One vocabulary for bit-widths: the float reference's "width", and the adapter names of bit-widths (``w4``).

The lowest layer of the package (no torch, no transformers): the config, the algorithm (`quept_hf.nn`) and the
glue all take these from here, so a name is parsed and made in one place.
"""

from __future__ import annotations

import re

__all__ = ["BITS_ADAPTER", "FLOAT_BITS", "adapter_name_for_bits", "bits_of_adapter_name"]

FLOAT_BITS = 16  # "bit-width" of the float reference: set_bits(model, 16) runs the float weights
BITS_ADAPTER = re.compile(r"^w([2-8])$")  # adapter names of the quantized bit-widths 2..8


def adapter_name_for_bits(bits: int) -> str:
    """The adapter name of a bit-width: ``w4`` for 4 bits."""
    return f"w{bits}"


def bits_of_adapter_name(name: object) -> int | None:
    """``4`` for ``"w4"``; ``None`` for anything that is not a bit-width adapter name (a plan, ``"w9"``, ``4``)."""
    match = BITS_ADAPTER.match(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None

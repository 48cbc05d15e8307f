"""Real low-bit storage: dense packing of 2..8-bit codes, the frozen and packed layers, freeze, export, interop.

The package itself exports only the storage layers (codec, `PackedLinear`, `FrozenLinear`, working forms), which
the rest of quept_hf builds on; `freeze`, `export`, `pack_model` and the engines' formats (`gguf`, `interop`) sit
above the glue that looks things up on a model, and are imported from their modules (or from ``quept_hf``).

``quept_hf.freeze(model, bits=[2, 3, 4, 8])`` turns an elastic model into its deployable form: packed codes of
every kept bit-width (`FrozenLinear`), switched by ``set_adapter`` without re-quantizing.

``quept_hf.export(model, "w3", out_dir)`` freezes an elastic model at one bit-width (or a mixed plan) and writes
a transformers folder with packed weights that ``from_pretrained`` loads through the ``"quept"`` method;
`quept_hf.packing.interop.export_compressed_tensors` writes compressed-tensors ``pack-quantized`` instead.
"""

from .codec import pack, packed_cols, unpack
from .frozen import FrozenLinear, set_weight_form
from .linear import PackedLinear, set_weight_cache
from .working import WEIGHT_FORMS, dequantize_codes

__all__ = [
    "WEIGHT_FORMS",
    "FrozenLinear",
    "PackedLinear",
    "dequantize_codes",
    "pack",
    "packed_cols",
    "set_weight_cache",
    "set_weight_form",
    "unpack",
]

"""Vision-language models: LLaVA, LLaVA-OneVision and Qwen2-VL.

The language model is elastic by default; the vision tower only with ``QuEPTConfig(quantize_vision_tower=True)``
(then it is calibrated first, as its own chain of blocks); the multimodal projector always stays in float.
Calibration data are image-text pairs run through the model's processor (`quept_hf.calibration.data`).
"""

from __future__ import annotations

from typing import Any

from .registry import Architecture, first_sample, register_architecture

_LANGUAGE_BLOCKS = ("model.language_model.layers", "language_model.model.layers", "language_model.layers")


def _packed_first_sample(batch: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL packs every image's patches into one ``pixel_values`` tensor: keep the first image's rows."""
    sample = first_sample({k: v for k, v in batch.items() if k != "pixel_values"})
    if "pixel_values" in batch:
        rows = int(batch["image_grid_thw"][0].prod())
        sample["pixel_values"] = batch["pixel_values"][:rows]
    return sample


LLAVA = register_architecture(
    Architecture(
        name="LLaVA / LLaVA-OneVision",
        model_types=("llava", "llava_onevision"),
        block_paths=_LANGUAGE_BLOCKS,
        input_kind="image_text",
        vision_block_paths=("model.vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers"),
        vision_modules=("vision_tower",),
        float_modules=("multi_modal_projector",),
    )
)

QWEN2_VL = register_architecture(
    Architecture(
        name="Qwen2-VL",
        model_types=("qwen2_vl",),
        block_paths=_LANGUAGE_BLOCKS,
        input_kind="image_text",
        vision_block_paths=("model.visual.blocks", "visual.blocks"),
        vision_modules=("visual",),
        float_modules=("merger",),
        first_sample=_packed_first_sample,
        unbatched_vision=True,
    )
)

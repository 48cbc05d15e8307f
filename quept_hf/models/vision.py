"""Vision Transformers: ViT, DeiT, DINOv2 and Swin (spec section 1, "ViTs").

All four share transformers' block layout (``layernorm_before``/``norm1`` -> q/k/v projections,
``layernorm_after``/``norm2`` -> ``mlp.fc1``), so one description per block layout serves them: per-tensor
activations with a learned scale per bit-width, patch embedding and classifier heads pinned at 8 bits, and
the LayerNorm scale folded into the q/k/v and fc1 columns before calibration.
"""

from __future__ import annotations

from .registry import Architecture, register_architecture

_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
_FC1 = ("mlp.fc1", "mlp.weights_in")  # DINOv2's SwiGLU variant names its input projection weights_in
_HEADS = ("classifier", "cls_classifier", "distillation_classifier")
_PATCH_EMBEDDING = ("embeddings.patch_embeddings.projection",)

_VIT_COMMON = dict(
    input_kind="image",
    forward_kwargs=(),
    pinned_modules=_PATCH_EMBEDDING + _HEADS,
    activation_granularity="per_tensor",
)

VIT = register_architecture(
    Architecture(
        name="Vision Transformer (ViT, DeiT)",
        model_types=("vit", "deit"),
        block_paths=("vit.layers", "deit.layers", "layers", "vit.encoder.layer", "deit.encoder.layer", "encoder.layer"),
        norm_folds=(("layernorm_before", _QKV), ("layernorm_after", _FC1)),
        **_VIT_COMMON,
    )
)

DINOV2 = register_architecture(
    Architecture(
        name="DINOv2",
        model_types=("dinov2",),
        block_paths=("dinov2.encoder.layer", "encoder.layer"),
        norm_folds=(("norm1", _QKV), ("norm2", _FC1)),
        **_VIT_COMMON,
    )
)

SWIN = register_architecture(
    Architecture(
        name="Swin Transformer",
        model_types=("swin",),
        block_paths=("swin.encoder.layers.*.blocks", "encoder.layers.*.blocks"),
        norm_folds=(("layernorm_before", _QKV), ("layernorm_after", _FC1)),
        stage_transition="downsample",
        **{**_VIT_COMMON, "pinned_modules": (*_PATCH_EMBEDDING, *_HEADS, "downsample.reduction")},
    )
)

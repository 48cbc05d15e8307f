"""Registry of supported architectures (model_type -> `Architecture`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..compat import unwrap
from .layout import GEMMA3_LAYOUT, LLAMA_LAYOUT, DecoderLayout, find_module

INPUT_KINDS = ("text", "image", "image_text")


def first_sample(batch: dict[str, Any]) -> dict[str, Any]:
    """The first sample of a batch whose tensors are all batch-first (the engine captures block kwargs on it)."""
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class Chain:
    """Blocks calibrated in sequence, the output of one feeding the next (a VLM has two: vision, then language).

    Attributes:
        name: shown in progress bars and messages.
        blocks: the Transformer blocks, in execution order.
        transitions: ``{i: module}``: run on block i's output before block i+1 (Swin's patch merging), called
            with the hidden states and whichever of block i's keyword arguments its ``forward`` accepts.
        unbatched: the blocks take ``(tokens, hidden)`` without a batch dimension (Qwen2-VL's vision tower):
            samples are stacked on a new first dimension and calibrated one at a time.
    """

    name: str
    blocks: nn.ModuleList
    transitions: dict[int, nn.Module] = field(default_factory=dict)
    unbatched: bool = False


@dataclass(frozen=True)
class Architecture:
    """What the calibration engine and the quantizer need to know about a model family.

    Attributes:
        name: family name shown in messages.
        model_types: ``config.model_type`` values served.
        block_paths: dotted attribute paths tried in order to find the Transformer blocks; a ``*`` segment
            expands over a ``ModuleList`` (``"swin.encoder.layers.*.blocks"``: every stage's blocks, flattened).
        input_kind: ``"text"`` (input_ids windows), ``"image"`` (pixel_values) or ``"image_text"`` (processor
            outputs of image-text pairs).
        forward_kwargs: extra keyword arguments of the model's forward during calibration.
        vision_block_paths: a VLM's vision-tower blocks, calibrated first when the vision tower is quantized.
        vision_modules: module names (dotted components, any depth) of the vision tower: left in float unless
            ``QuEPTConfig(quantize_vision_tower=True)``.
        float_modules: module names always left in float (a VLM's projector).
        pinned_modules: modules pinned at 8 bits instead of being elastic (patch embedding, classifier head).
        activation_granularity: ``"per_token"`` (LLMs) or ``"per_tensor"`` with a learned scale per bit (ViTs).
        norm_folds: ``(norm, (linears...))`` paths inside a block: the LayerNorm's per-channel scale is folded
            into the linears it feeds before calibration (RepQ-ViT-style, float outputs unchanged).
        stage_transition: attribute of a ``*``-expanded stage run after its last block (Swin: ``"downsample"``).
        first_sample: slices one sample out of a calibration batch (Qwen2-VL packs the patches of all images).
        unbatched_vision: the vision blocks take unbatched packed sequences (see `Chain.unbatched`).
        layout: where a pre-norm decoder block's norms and projections are (rotation, smoothing, KV-cache
            quantization need it); ``None``: those transforms are not available for the family.
    """

    name: str
    model_types: tuple[str, ...]
    block_paths: tuple[str, ...]
    input_kind: str = "text"
    forward_kwargs: tuple[tuple[str, Any], ...] = (("use_cache", False),)
    vision_block_paths: tuple[str, ...] = ()
    vision_modules: tuple[str, ...] = ()
    float_modules: tuple[str, ...] = ()
    pinned_modules: tuple[str, ...] = ()
    activation_granularity: str = "per_token"
    norm_folds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    stage_transition: str | None = None
    first_sample: Callable[[dict], dict] = first_sample
    unbatched_vision: bool = False
    layout: DecoderLayout | None = None

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"Architecture {self.name}: input_kind={self.input_kind!r}; allowed: {INPUT_KINDS}")

    # ------------------------------------------------------------------ blocks
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The (language-model) blocks, flattened in execution order."""
        return self._chain("blocks", model, self.block_paths).blocks

    def chains(self, model: nn.Module, quantize_vision_tower: bool = False) -> list[Chain]:
        """Block chains to calibrate, in order: the vision tower's (when quantized), then the main one."""
        chains = [self._chain(self.name, model, self.block_paths)]
        if quantize_vision_tower and self.vision_block_paths:
            vision = self._chain(f"{self.name} vision tower", model, self.vision_block_paths)
            vision.unbatched = self.unbatched_vision
            chains.insert(0, vision)
        return chains

    def _chain(self, name: str, model: nn.Module, paths: tuple[str, ...]) -> Chain:
        for path in paths:
            found = _expand(model, path, self.stage_transition)
            if found is not None and len(found[0]) > 0:
                return Chain(name, nn.ModuleList(found[0]), found[1])
        raise ValueError(f"{self.name}: found no Transformer blocks in {type(model).__name__} at {paths}")

    # ------------------------------------------------------------ module roles
    def float_module_names(self, model: nn.Module, quantize_vision_tower: bool = False) -> list[str]:
        """Full names of the modules that stay in float (projector; vision tower unless quantized)."""
        patterns = self.float_modules + (() if quantize_vision_tower else self.vision_modules)
        return [name for name, _ in model.named_modules() if name and _inside(name, patterns)]

    def pinned_module_names(self, model: nn.Module) -> list[str]:
        """Full names of the plain Linear/Conv2d modules pinned at 8 bits."""
        return [
            name
            for name, module in model.named_modules()
            if type(module) in (nn.Linear, nn.Conv2d) and _ends_with(name, self.pinned_modules)
        ]


def _inside(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` is, or lies under, a module whose dotted path contains ``pattern`` as whole components."""
    dotted = f".{name}."
    return any(f".{p}." in dotted for p in patterns)


def _ends_with(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _expand(model: nn.Module, path: str, transition: str | None) -> tuple[list[nn.Module], dict] | None:
    """Blocks at ``path`` (one ``*`` expands over a ModuleList) and the stage transitions after each stage."""
    head, star, tail = path.partition(".*.")
    if not star:
        blocks = find_module(model, path)
        return (list(blocks), {}) if isinstance(blocks, nn.ModuleList) else None
    stages = find_module(model, head)
    if not isinstance(stages, nn.ModuleList):
        return None
    blocks, transitions = [], {}
    for stage in stages:
        inner = find_module(stage, tail)
        if not isinstance(inner, nn.ModuleList):
            return None
        blocks.extend(inner)
        after = getattr(stage, transition, None) if transition else None
        if after is not None and len(inner):
            transitions[len(blocks) - 1] = after
    return blocks, transitions


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    for model_type in arch.model_types:
        _REGISTRY[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def _model_type(model: nn.Module) -> str | None:
    base = unwrap(model)
    return getattr(getattr(base, "config", None), "model_type", None)


def find_architecture(model: nn.Module) -> Architecture | None:
    """The `Architecture` of a model, or ``None`` (quantizing works on any model; calibrating needs one)."""
    return _REGISTRY.get(_model_type(model))


def architecture_for(model: nn.Module) -> Architecture:
    """The `Architecture` of a transformers model (a clear error lists the supported model types)."""
    model_type = _model_type(model)
    if model_type not in _REGISTRY:
        base = unwrap(model)
        raise ValueError(
            f"QuEPT calibration does not support model_type={model_type!r} ({type(base).__name__}); "
            f"supported: {supported_model_types()}"
        )
    return _REGISTRY[model_type]


DECODER_LLM = register_architecture(
    Architecture(
        name="decoder LLM (LLaMA family)",
        model_types=("llama", "mistral", "qwen2"),
        block_paths=("model.layers", "model.language_model.layers", "language_model.model.layers", "layers"),
        layout=LLAMA_LAYOUT,
    )
)

# Same blocks as LLaMA; its own layout: (1 + weight) RMSNorms, sandwich norms (no rotation).
GEMMA3 = register_architecture(
    replace(DECODER_LLM, name="Gemma 3", model_types=("gemma3", "gemma3_text"), layout=GEMMA3_LAYOUT)
)


@dataclass(frozen=True)
class ModuleRoles:
    """How the quantizer treats a model's modules: which stay float, which are pinned, how activations go."""

    kept_float: tuple[str, ...] = ()
    pinned: tuple[str, ...] = ()
    activation_granularity: str = "per_token"


def module_roles(model: nn.Module, quantize_vision_tower: bool = False) -> ModuleRoles:
    """The roles of a model's modules (defaults for an unregistered model: every linear elastic, per token)."""
    arch = find_architecture(model)
    if arch is None:
        return ModuleRoles()
    return ModuleRoles(
        kept_float=tuple(arch.float_module_names(model, quantize_vision_tower)),
        pinned=tuple(arch.pinned_module_names(model)),
        activation_granularity=arch.activation_granularity,
    )

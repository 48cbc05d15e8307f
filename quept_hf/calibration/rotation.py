"""QuaRot-style rotation of a decoder LLM before W4A4 calibration (``QuEPTConfig(rotation=True)``).

Per-token 4-bit activation quantization fails on LLMs because a few residual-stream channels carry values
100x larger than the rest: every token's scale is set by its outliers. An orthogonal rotation Q of the
residual stream spreads each outlier over all channels, and it is free at inference when folded into the
weights. With the float model's function unchanged:

1. every RMSNorm's scale is folded into the linears that read it (the norm keeps unit scale, and a
   scale-free RMSNorm commutes with any rotation: ``rms(x Q) = rms(x)``);
2. the residual stream is rotated by a random orthogonal Hadamard matrix ``Q = H diag(signs) / sqrt(n)``:
   embeddings ``E Q``; q/k/v/gate/up and the LM head read it as ``W Q``; o_proj/down_proj write it as
   ``Q^T W`` (bias ``Q^T b``);
3. each value head is rotated by a Hadamard matrix (v_proj rows ``H W_v``, o_proj columns ``W_o H^T``,
   per head) — free, and it spreads outliers of the values and of o_proj's input;
4. down_proj's input — the MLP's widest, most outlier-heavy activation, which no weight can absorb because
   the SwiGLU product sits in front of it — gets an ONLINE Hadamard transform (``x H^T``, O(n log n), the
   ``fast_hadamard_transform`` kernel on CUDA), its weight the matching ``W H^T`` offline;
5. with a quantized KV cache, queries and keys get an online Hadamard over the head dimension after RoPE
   (`quept_hf.nn.kv_cache`).

Steps 1-3 and the offline half of 4 change the saved weights: a saved model IS the rotated model. The config
records ``rotation=True`` and loading re-installs the online transforms (4-5) with
`install_online_transforms`, which holds no state but the model's sizes.

Tied embeddings: folding the final norm into the LM head makes it differ from the embedding (``E Q`` vs
``W diag(g) Q``), so a tied head is untied (copied, ``tie_word_embeddings=False``) with a logged note: the
checkpoint grows by one vocabulary x hidden matrix.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..compat import refresh_tied_weights, unwrap
from ..config import QuEPTConfig
from ..models import Architecture, DecoderLayout, find_architecture
from ..nn.hadamard import base_order, hadamard_matrix, hadamard_transform, random_signs
from ..nn.kv_cache import KV_ATTRIBUTE, KVQuantization, inner_implementation, register_kv_attention
from .offload import each_onloaded, loaded_on_cpu
from .reparam import norm_scale, rewrite_inputs, rewrite_outputs, scale_inputs

logger = logging.getLogger(__name__)

DEFAULT_ON = {"rotation": "weight_activation", "smoothing": "weight_only"}  # mode in which each is on by default


class OnlineHadamard:
    """``x -> x H^T / sqrt(n)`` over the last axis: the input transform of a rotated down_proj.

    Stateless (the order comes from the input), so it is rebuilt from the config at load time."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(x)

    def __repr__(self) -> str:
        return "OnlineHadamard()"


ONLINE_HADAMARD = OnlineHadamard()


# ------------------------------------------------------------------------------------------ what is possible
def _why_not(model: nn.Module, arch: Architecture | None, transform: str) -> str | None:
    """Why ``transform`` cannot run on this model (``None``: it can)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if arch is None or arch.layout is None:
        return f"model_type={model_type!r} has no decoder layout in quept_hf.models"
    if transform == "rotation":
        if arch.layout.rotation_blocker:
            return arch.layout.rotation_blocker
        if model.get_output_embeddings() is None:
            return f"{type(model).__name__} has no LM head to absorb the final norm and the rotation"
    return None


def resolve_transforms(model: nn.Module, config: QuEPTConfig, fresh: bool) -> None:
    """Turn ``rotation`` / ``smoothing`` = ``None`` (the mode's default) into a bool for this model, in place.

    ``fresh``: a float model about to be quantized. A saved checkpoint (``fresh=False``) whose config predates
    these fields was neither rotated nor smoothed: ``None`` means ``False`` there. An explicit ``True`` the
    model cannot honour raises a ValueError saying why; a default that does not apply is logged and dropped.
    """
    base = unwrap(model)
    arch = find_architecture(base)
    for field, mode in DEFAULT_ON.items():
        value = getattr(config, field)
        reason = _why_not(base, arch, field)
        if value is None:
            value = fresh and config.mode == mode
            if value and reason:
                logger.info("QuEPT: %s (default in %s mode) skipped: %s", field, mode, reason)
                value = False
        elif value and reason and fresh:
            raise ValueError(f"QuEPTConfig({field}=True) is not available for this model: {reason}; set {field}=False")
        setattr(config, field, bool(value))
    if config.kv_bits is not None and (arch is None or arch.layout is None):
        reason = _why_not(base, arch, "kv_bits")
        raise ValueError(f"QuEPTConfig(kv_bits={config.kv_bits!r}) needs a decoder layout: {reason}")


# -------------------------------------------------------------------------------------------------- rotation
def _hadamard(n: int, what: str) -> torch.Tensor:
    """Normalized n x n Hadamard matrix (float64); the error names the dimension that has none."""
    try:
        base_order(n)
    except ValueError as exc:
        raise ValueError(f"QuEPT rotation needs a Hadamard matrix of the {what} ({n}): {exc}") from exc
    return hadamard_matrix(n, dtype=torch.float64) / n**0.5


@torch.no_grad()
def _untie_lm_head(model: nn.Module) -> None:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        logger.warning(
            "QuEPT rotation: lm_head was tied to the input embedding; it is untied (copied) because the folded "
            "final norm makes the two differ. The checkpoint grows by one %s matrix.",
            "x".join(map(str, head.weight.shape)),
        )
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    refresh_tied_weights(model)  # what save_pretrained drops as duplicates


@torch.no_grad()
def _fold_norm(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """``W diag(offset + g)`` for every reader; the norm keeps unit scale (weight ``1 - offset``)."""
    scale = norm_scale(norm, offset)
    for reader in readers:
        scale_inputs(reader, scale)
    norm.weight.fill_(1.0 - offset)


def fold_block_norms(block: nn.Module, layout: DecoderLayout) -> None:
    """Fold a block's RMSNorm scales into their readers (attention and MLP inputs)."""
    for norm, readers in ((layout.attn_norm, layout.qkv), (layout.mlp_norm, layout.gate_up)):
        _fold_norm(layout.get(block, norm), [layout.get(block, p) for p in readers], layout.norm_offset)


class ResidualRotation:
    """``Q = H diag(signs) / sqrt(n)`` (`quept_hf.nn.hadamard.random_hadamard_matrix`), applied with the fast
    transform: ``W Q`` costs O(n log n + n m) per row instead of a dense n x n product (the 49152-row embedding
    and LM head of SmolLM2 dominate the rotation time otherwise)."""

    def __init__(self, n: int, seed: int):
        self.signs = random_signs(n, seed).double()

    def read(self, w: torch.Tensor) -> torch.Tensor:
        """``W Q`` for a weight whose columns live in the residual stream."""
        return hadamard_transform(w, transpose=True) * self.signs.to(w.device)

    def write(self, w: torch.Tensor) -> torch.Tensor:
        """``Q^T W`` for a weight (or bias column) whose rows live in the residual stream."""
        return self.read(w.T).T


def rotate_block_residual(block: nn.Module, layout: DecoderLayout, q: ResidualRotation) -> None:
    """A block's side of ``x -> x Q``: readers ``W Q``, writers ``Q^T W`` (its norms must be folded first)."""
    for path in (*layout.qkv, *layout.gate_up):
        rewrite_inputs(layout.get(block, path), q.read)
    for path in (layout.o_proj, layout.down_proj):
        rewrite_outputs(layout.get(block, path), q.write)


def rotate_value_heads(block: nn.Module, layout: DecoderLayout) -> None:
    """Per value head ``v -> H v``: v_proj rows ``H W_v``, o_proj columns ``W_o H^T`` (every head the same H)."""
    head_dim = int(layout.get(block, layout.attention).head_dim)
    h = _hadamard(head_dim, "attention head dimension")

    def rows(w: torch.Tensor) -> torch.Tensor:
        return (h @ w.reshape(-1, head_dim, w.shape[-1])).reshape(w.shape)

    def columns(w: torch.Tensor) -> torch.Tensor:
        return (w.reshape(w.shape[0], -1, head_dim) @ h.T).reshape(w.shape)

    rewrite_outputs(layout.get(block, layout.v_proj), rows)
    rewrite_inputs(layout.get(block, layout.o_proj), columns)


def _has_online_input(module: nn.Module) -> bool:
    """Only quantized linears (QuEPTLinear, PackedLinear) quantize their input, so only they get the transform."""
    return hasattr(getattr(module, "base_layer", module), "input_transform")


def rotate_down_inputs(block: nn.Module, layout: DecoderLayout) -> None:
    """down_proj weight ``W H^T``: the offline half of the online Hadamard on its input."""
    down = layout.get(block, layout.down_proj)
    if _has_online_input(down):
        width = getattr(down, "in_features", None) or down.weight.shape[1]
        _hadamard(width, "MLP intermediate size")  # a clear error before anything changes
        rewrite_inputs(down, hadamard_transform)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Apply steps 1-4 of the module docstring to a float (or freshly quantized, uncalibrated) model in place.

    One block at a time: a model whose weights accelerate offloads (``device_map``) has each block loaded, rotated
    and written back in turn (`quept_hf.calibration.offload.each_onloaded`), so it never holds more than one."""
    arch = find_architecture(model)
    reason = _why_not(model, arch, "rotation")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if reason is None and head.weight is embedding.weight and head.weight.is_meta:
        reason = "its tied embedding and LM head are offloaded (device_map): keep them on a device to untie them"
    if reason:
        raise ValueError(f"QuEPT rotation is not available for this model: {reason}")
    layout, blocks = arch.layout, arch.blocks(model)
    hidden = embedding.weight.shape[1]
    _hadamard(hidden, "hidden size")
    for block in blocks:  # check every size before changing any weight
        _hadamard(int(layout.get(block, layout.attention).head_dim), "attention head dimension")
        if _has_online_input(down := layout.get(block, layout.down_proj)):
            _hadamard(getattr(down, "in_features", None) or down.weight.shape[1], "MLP intermediate size")
    q = ResidualRotation(hidden, seed)
    _untie_lm_head(model)
    for block in each_onloaded(model, blocks):
        fold_block_norms(block, layout)
        rotate_block_residual(block, layout, q)
        rotate_value_heads(block, layout)
        rotate_down_inputs(block, layout)
    final_norm = layout.final_norm(model)
    with loaded_on_cpu(embedding, final_norm, head):
        rewrite_inputs(embedding, q.read)
        _fold_norm(final_norm, [head], layout.norm_offset)
        rewrite_inputs(head, q.read)
    logger.info("QuEPT: rotated %d blocks (hidden %d, seed %d)", len(blocks), hidden, seed)


# ------------------------------------------------------------------------------------------ online transforms
def install_online_transforms(model: nn.Module, config: QuEPTConfig) -> None:
    """(Re)install what a rotated / KV-quantized model computes online, from the config alone (at load too)."""
    base = unwrap(model)
    if not config.rotation and config.kv_bits is None:
        return
    arch = find_architecture(base)
    layout, blocks = arch.layout, arch.blocks(base)
    for block in blocks:
        down = layout.get(block, layout.down_proj)
        if config.rotation and _has_online_input(down):
            getattr(down, "base_layer", down).input_transform = ONLINE_HADAMARD
    if config.kv_bits is not None:
        spec = KVQuantization(config.kv_bits, rotate=bool(config.rotation))
        for block in blocks:
            setattr(layout.get(block, layout.attention), KV_ATTRIBUTE, spec)
        name = register_kv_attention(inner_implementation(base.config._attn_implementation))
        base.set_attn_implementation(name)


def restored_on_load(transform: object, config: QuEPTConfig) -> bool:
    """Whether loading a checkpoint saved with ``config`` re-installs ``transform`` (so it need not be stored)."""
    return bool(config.rotation) and isinstance(transform, OnlineHadamard)

"""Where the pieces of a pre-norm decoder block sit: the data rotation, smoothing and KV quantization need.

QuaRot-style rotation and AWQ-style smoothing rewrite weights in pairs (a norm and the linears it feeds, a
linear and the one reading its output); which modules pair up is per-architecture knowledge, so it lives here
as plain data on the `Architecture` and `quept_hf.calibration` never branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecoderLayout:
    """Module paths of one decoder block (relative to the block) and of the model around it.

    Attributes:
        attn_norm: norm whose output feeds ``qkv``.
        qkv: the attention input projections (read the residual stream through ``attn_norm``).
        v_proj, o_proj: the value projection and the attention output projection (writes the residual).
        mlp_norm: norm whose output feeds ``gate_up``.
        gate_up: the MLP input projections.
        up_proj, down_proj: the MLP projection whose output is multiplied into ``down_proj``'s input, and
            ``down_proj`` itself (writes the residual).
        attention: the attention module (KV-cache quantization and the Q/K Hadamard are installed on it).
        final_norms: model-level paths tried for the norm before the LM head.
        norm_offset: an RMSNorm multiplies by ``norm_offset + weight`` (Gemma: 1, LLaMA: 0).
        rotation_blocker: why the residual stream of this family cannot be rotated (``None``: it can).
    """

    attn_norm: str = "input_layernorm"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    attention: str = "self_attn"
    final_norms: tuple[str, ...] = ("model.norm", "model.language_model.norm", "language_model.model.norm")
    norm_offset: float = 0.0
    rotation_blocker: str | None = None

    def get(self, root: nn.Module, path: str) -> nn.Module:
        """The submodule at a dotted path (a clear error when the model does not match the layout)."""
        module = find_module(root, path)
        if module is None:
            raise ValueError(f"{type(root).__name__} has no module {path!r} expected by the decoder layout")
        return module

    def final_norm(self, model: nn.Module) -> nn.Module:
        for path in self.final_norms:
            norm = find_module(model, path)
            if norm is not None:
                return norm
        raise ValueError(f"{type(model).__name__}: found no final norm at {self.final_norms}")


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.c`` for ``path="a.b.c"`` (torch's ``get_submodule``), or ``None`` when any part is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


LLAMA_LAYOUT = DecoderLayout()

# Gemma 3: RMSNorm scales by (1 + weight); its "sandwich" norms normalise each sub-layer's OUTPUT before the
# residual add, so a rotation of the residual stream would not commute with them.
GEMMA3_LAYOUT = DecoderLayout(
    mlp_norm="pre_feedforward_layernorm",
    norm_offset=1.0,
    rotation_blocker=(
        "Gemma 3 normalises each sub-layer's output (post_attention_layernorm, post_feedforward_layernorm) "
        "before the residual add, so its residual stream cannot be rotated without changing the float model"
    ),
)

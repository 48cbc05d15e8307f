"""Export a QuEPT model at one bit-width (or mixed plan) as ONE ``.gguf`` file that llama.cpp runs as it is.

``quept_hf.export(model, "w4", "out.gguf", format="gguf")`` (or `export_gguf`) takes an ELASTIC model (the
layers' codes are computed exactly as `quept_hf.export` computes them) or a FROZEN one (`quept_hf.freeze`: the
stored codes of the width are used), and writes the container with gguf-py (llama.cpp's own package), following
llama.cpp's ``convert_hf_to_gguf.py`` for LLaMA (``conversion/llama.py``, ``conversion/base.py``):

* tensor names from ``gguf.get_tensor_name_map`` (``blk.N.attn_q.weight`` ...), q/k rows permuted as
  ``LlamaModel.permute`` does (llama.cpp's rope pairs rows (i, i + d/2); HF pairs them interleaved). Rows carry
  their own scales and zero points, so permuting codes, scales and zeros together is exact;
* ``general.architecture = llama`` and the ``llama.*`` hyperparameters, rope base/scaling, RMS norm eps
  (Qwen2: ``qwen2``, HF row order kept as ``Qwen2Model`` does, q/k/v biases F32);
* tokenizer and chat template: copied field by field from a source GGUF (``tokenizer="path.gguf"``; SmolLM2's
  float source came from one, found automatically), else built from a Hugging Face tokenizer the way
  ``_set_vocab_gpt2`` + ``gguf.SpecialVocab`` do.

Tensor types (`gguf_type`): W4 -> Q4_1 and W5 -> Q5_1, exact up to fp16 of ``d``/``m`` where every 32-block
lies in one QuEPT group (`quept_hf.packing.gguf_blocks`); a width calibrated or frozen with
``zero_point="symmetric"`` -> Q4_0 / Q5_0 / Q8_0, exact up to fp16 of ``d`` and half a bit per weight smaller;
W8 and W7 -> Q8_0; W2 -> Q2_K, W3 -> Q3_K, W6 -> Q6_K
where rows are multiples of 256, else llama-quantize's fallback (``tensor_type_fallback`` in
``src/llama-quant.cpp``: Q2_K/Q3_K -> Q4_0, Q6_K -> Q8_0; F16 when even 32 does not divide the row). Every
non-exact type is searched against QuEPT's DEQUANTIZED weight, with QuEPT's own scale as a candidate (W2/W3 in
Q4_0 are then exact up to fp16 of ``d``). Embeddings (and an untied, unquantized lm_head) take
``embedding_type``; norms stay F32. Weight-only models only: llama.cpp has no QuEPT activation quantizer.

The file is written in two passes that need no tensor data up front: every tensor's name, type and shape (known
from shapes alone, so meta tensors of an offloaded model do) as gguf-py's tensor info, then the data in that
order, one tensor at a time; an offloaded block (``device_map``) is loaded while its tensors are written. So the
export of a model larger than memory peaks at about one block, and its bytes equal the in-memory export's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from torch import nn
from tqdm.auto import tqdm

from .. import assets
from ..calibration.offload import offloaded_units, onloaded
from ..compat import unwrap
from ..config import quept_config
from ..inspection import frozen_linears, quept_linears
from . import gguf_blocks as blocks
from .frozen import FrozenLinear
from .plan import BitsOrPlan, QuantizedLinear, expand_plan, plan_mapping, quantize_layers, resolve_plan
from .working import dequantize_codes

logger = logging.getLogger(__name__)

__all__ = ["BIT_TYPES", "EMBEDDING_TYPES", "LINEAR_TYPES", "export_gguf", "gguf_summary", "gguf_type", "permute_rows"]

ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}
PERMUTED = {gguf.MODEL_ARCH.LLAMA}  # convert_hf_to_gguf's LlamaModel.undo_permute; Qwen2Model keeps HF's rows
BIT_TYPES = {2: "Q2_K", 3: "Q3_K", 4: "Q4_1", 5: "Q5_1", 6: "Q6_K", 7: "Q8_0", 8: "Q8_0"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q6_K": "Q8_0"}  # llama-quant.cpp tensor_type_fallback
EXACT = {"Q4_1": 4, "Q5_1": 5}
SYMMETRIC_TYPES = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}  # a `zero_point="symmetric"` width's grid, held exactly
EMBEDDING_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
LINEAR_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_K", "Q8_0")  # what `_encode_linear` writes
GridOf = Callable[[str], QuantizedLinear]  # a quantized linear's grid, computed when the file reaches it
FILE_TYPES = {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q6_K": "MOSTLY_Q6_K", "F16": "MOSTLY_F16"}


# ------------------------------------------------------------------------------------------- types


def gguf_type(bits: int, row_length: int, weight_types: Mapping[int, str] | None = None) -> str:
    """The GGML type of a ``bits``-wide QuEPT linear whose rows have ``row_length`` weights (module docstring);
    ``weight_types`` (``{bits: type}``) overrides `BIT_TYPES`, the fallbacks apply to it the same way."""
    qtype = (weight_types or {}).get(bits, BIT_TYPES[bits])
    if row_length % gguf.GGML_QUANT_SIZES[QType[qtype]][0]:
        qtype = FALLBACK.get(qtype, qtype)
    if row_length % gguf.GGML_QUANT_SIZES[QType[qtype]][0]:
        qtype = "F16"
    return qtype


def permute_rows(rows: int, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """Row order of convert_hf_to_gguf's ``LlamaModel.permute`` for a q (or k) projection of ``rows`` rows."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    index = torch.arange(rows)
    return index.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


# ------------------------------------------------------------------------------------ QuEPT's grids


def _plan(model: nn.Module, bits_or_plan: BitsOrPlan) -> tuple[str, dict[str, int], dict[str, tuple[int, int]], GridOf]:
    """``(plan name, {module: bits}, {module: (out, in)}, grid of one module)``. The grid of an elastic layer is
    computed as `quept_hf.export` computes it, a frozen layer's stored codes are read; one layer at a time, when
    the file reaches it, so an offloaded model needs only its current block in memory."""
    frozen = frozen_linears(unwrap(model))
    if not frozen:
        name, plan = resolve_plan(model, bits_or_plan)
        layers = quept_linears(unwrap(model))
        shapes = {m: (layers[m].out_features, layers[m].in_features) for m in plan}
        return name, plan, shapes, lambda module: quantize_layers(model, {module: plan[module]})[module]
    config = quept_config(model)
    name, mapping = plan_mapping(model, config, bits_or_plan)
    plan = expand_plan(mapping, list(frozen), config.default_bits)
    for module, bits in plan.items():
        if bits not in frozen[module].bits:
            raise ValueError(
                f"bits_or_plan: width {bits} is not kept by frozen layer {module} (it keeps {frozen[module].bits})"
            )
    shapes = {m: (frozen[m].out_features, frozen[m].in_features) for m in plan}
    return name, plan, shapes, lambda module: _frozen_grid(frozen[module], plan[module])


def _frozen_grid(layer: FrozenLinear, bits: int) -> QuantizedLinear:
    key = str(bits)
    act = bits if layer.quantize_activations else None
    bias = None if layer.bias is None else layer.bias.detach()
    scales, zeros, group = layer.scales[key], layer.zeros[key], layer.group_size[bits]
    return QuantizedLinear(layer.codes(bits), scales, zeros, bias, bits, group, act, layer.input_transform)


def _check_weight_only(name: str, q: QuantizedLinear) -> None:
    if q.activation_bits is not None or q.input_transform is not None:
        raise ValueError(
            f"model: layer {name} quantizes activations or applies an online input transform; GGUF (llama.cpp) "
            "runs weight-only models, so export a weight_only QuEPT model"
        )


# ------------------------------------------------------------------------------- linear tensors


@dataclass
class _Grid:
    """One linear's grid as numpy, rows already in GGUF order: codes, per-element scale and zero."""

    codes: np.ndarray  # (out, in) uint8
    scale: np.ndarray  # (out, in) float32, QuEPT's s of each element's group
    zero: np.ndarray  # (out, in) float32
    weight: np.ndarray  # (out, in) float32, s * (c - z): QuEPT's dequantized weight, bitwise
    aligned: bool  # every 32-block lies in one QuEPT group


def _grid(q: QuantizedLinear, order: torch.Tensor | None) -> _Grid:
    codes, scales, zeros = q.codes, q.scales.detach(), q.zeros.detach()
    if order is not None:
        codes, scales, zeros = codes[order], scales[order], zeros[order]
    in_f = codes.shape[1]
    size = in_f if scales.shape[1] == 1 else q.group_size
    weight = dequantize_codes(codes, scales, zeros, q.group_size).float()
    expand = lambda t: t.float().repeat_interleave(size, dim=1)[:, :in_f].numpy()  # noqa: E731
    return _Grid(codes.numpy(), expand(scales), expand(zeros), weight.numpy(), size % blocks.QK == 0)


def _encode_linear(grid: _Grid, qtype: str) -> np.ndarray:
    """Bytes of one linear at ``qtype`` (shape ``(out, bytes per row)``) from QuEPT's grid."""
    out_f = grid.codes.shape[0]
    if qtype == "F16":
        return grid.weight.astype(np.float16)
    block = gguf.GGML_QUANT_SIZES[QType[qtype]][0]
    y = grid.weight.reshape(-1, block)
    first = lambda a, step: np.ascontiguousarray(a[:, ::step]).reshape(-1)  # noqa: E731  (one value per block)
    if qtype in EXACT and grid.aligned:
        s, z = first(grid.scale, block), first(grid.zero, block)
        encode = blocks.encode_q4_1 if qtype == "Q4_1" else blocks.encode_q5_1
        data = encode(grid.codes.reshape(-1, block), s, -s * z)
    elif qtype in EXACT:
        logger.warning("GGUF: a QuEPT group size not a multiple of 32: %s re-quantized from the grid (min/max)", qtype)
        return gguf.quants.quantize(grid.weight, QType[qtype])
    elif qtype in blocks.SYMMETRIC:
        data = blocks.quantize_symmetric(qtype, y, first(grid.scale, block))
    elif qtype == "Q2_K":
        s, z = first(grid.scale, blocks.SUB), first(grid.zero, blocks.SUB)
        data = blocks.quantize_k_asymmetric(y, s.reshape(-1, 16), (s * z).reshape(-1, 16))
    else:
        data = blocks.quantize_k_symmetric(qtype, y, first(grid.scale, blocks.SUB).reshape(-1, 16))
    return data.reshape(out_f, -1)


def _float_type(shape: tuple[int, ...], qtype: str) -> str:
    """The type a float tensor (embedding, norm, untied head) takes: F32 for vectors, F16 where blocks do not fit."""
    if len(shape) == 1 or qtype == "F32":
        return "F32"
    if qtype != "F16" and shape[-1] % gguf.GGML_QUANT_SIZES[QType[qtype]][0]:
        return "F16"
    return qtype


def _encode_float(tensor: torch.Tensor, qtype: str) -> np.ndarray:
    array = tensor.detach().float().numpy()
    return array if qtype == "F32" else gguf.quants.quantize(array, QType[qtype])


# -------------------------------------------------------------------------------------- metadata


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _add_hparams(writer: gguf.GGUFWriter, config) -> None:
    """``llama.*`` keys as ``TextModel.set_gguf_parameters`` + ``LlamaModel.set_gguf_parameters`` write them."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind not in ("default", "llama3"):
        raise ValueError(f"model: rope_type {kind!r} is not supported by the GGUF export yet (default, linear, llama3)")


def _rope_freqs(config) -> np.ndarray | None:
    """Llama-3 rope factors (``LlamaModel.generate_extra_tensors``), or None for other rope types."""
    rope = _rope(config)
    if (rope.get("rope_type") or "").lower() != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# ------------------------------------------------------------------------------------------ vocab


def _add_vocab(writer: gguf.GGUFWriter, model: nn.Module, tokenizer, vocab_size: int) -> None:
    """Tokenizer fields: from a GGUF file (copied), a Hugging Face tokenizer (gpt2 BPE), or none (ids only)."""
    source = tokenizer if tokenizer is not None else _default_vocab_source(model)
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source).endswith(".gguf") or not os.path.isfile(source):
            raise ValueError(f"tokenizer={source!r}: expected a tokenizer object or an existing .gguf file")
        return _copy_gguf_vocab(writer, os.fspath(source), vocab_size)
    if source is not None and getattr(source, "vocab", None) is not None:
        return _add_hf_vocab(writer, source, vocab_size)
    logger.warning("GGUF: no tokenizer given or found; writing tokenizer model 'none' (llama.cpp runs token ids)")
    writer.add_tokenizer_model("none")


def _default_vocab_source(model: nn.Module):
    """SmolLM2 converted by `quept_hf.assets`: its source GGUF; a local source folder: its tokenizer."""
    folder = getattr(unwrap(model), "name_or_path", "") or ""
    if Path(folder).name == assets.SMOLLM2_FLOAT_NAME:
        try:
            return os.path.join(*assets.smollm2_gguf())
        except (FileNotFoundError, ImportError):
            pass
    if os.path.isdir(folder):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            return None
    return None


def _copy_gguf_vocab(writer: gguf.GGUFWriter, path: str, vocab_size: int) -> None:
    reader = gguf.GGUFReader(path)
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if tokens is not None and len(tokens.data) != vocab_size:
        raise ValueError(f"tokenizer={path!r} has {len(tokens.data)} tokens, the model's vocabulary {vocab_size}")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)


# convert_hf_to_gguf's pre-tokenizer detection: the sha256 of the token ids of this text names llama.cpp's
# pre-tokenizer (``get_vocab_base_pre``); only the hashes of the families exported here are listed.
_PRE_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multi"
    "ple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3."
    "..3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211"
    "\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411"
    "\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told"
    " he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
}


def _tokenizer_pre(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer`` (``"default"`` for an unlisted one, with a warning)."""
    digest = hashlib.sha256(str(tokenizer.encode(_PRE_CHECK_TEXT)).encode()).hexdigest()
    if digest not in KNOWN_PRE:
        logger.warning("GGUF: unknown BPE pre-tokenizer (hash %s); writing 'default'", digest)
    return KNOWN_PRE.get(digest, "default")


def _add_hf_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """``_set_vocab_gpt2`` (``get_vocab_base`` token list and types, ``SpecialVocab`` merges/ids/template)."""
    reverse = {i: t for t, i in tokenizer.vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        special = token in added and decoder[i].special
        types.append(
            gguf.TokenType.CONTROL
            if special
            else gguf.TokenType.USER_DEFINED
            if token in added
            else gguf.TokenType.NORMAL
        )
        tokens.append(token)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special_vocab.merges:
        logger.warning("GGUF: the tokenizer has no BPE merges; writing tokenizer model 'none' (token ids only)")
        writer.add_tokenizer_model("none")
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if getattr(tokenizer, "chat_template", None):
        special_vocab.chat_template = tokenizer.chat_template
    # Written explicitly (as convert_hf_to_gguf does for SmolLM2-sized vocabularies): llama.cpp's own defaults
    # differ from the tokenizer's when the tokenizer config does not spell them out.
    special_vocab.add_special_token.setdefault("bos", bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "add_prefix_space", None) is not None:
        writer.add_add_space_prefix(bool(tokenizer.add_prefix_space))
    special_vocab.add_to_gguf(writer)


# ------------------------------------------------------------------------------------------ export


def _check_args(
    model: nn.Module, bits_or_plan: BitsOrPlan, embedding_type: str, weight_types: Mapping[int, str] | None
) -> gguf.MODEL_ARCH:
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"embedding_type={embedding_type!r} is not supported; choose one of {list(EMBEDDING_TYPES)}")
    if weight_types is not None and (
        not isinstance(weight_types, Mapping)
        or any(b not in BIT_TYPES or t not in LINEAR_TYPES for b, t in weight_types.items())
    ):
        raise ValueError(
            f"weight_types={weight_types!r}: expected {{bits: type}} with bits in {sorted(BIT_TYPES)} and types "
            f"from {list(LINEAR_TYPES)}, e.g. {{4: 'Q4_0'}}"
        )
    if not isinstance(bits_or_plan, (int, str, Mapping)) or isinstance(bits_or_plan, bool):
        raise ValueError(f"bits_or_plan={bits_or_plan!r}: expected 4, 'w4', a stored plan name or {{module: bits}}")
    arch = (getattr(unwrap(model).config, "architectures", None) or [type(unwrap(model)).__name__])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"model: architecture {arch} has no GGUF export yet; supported: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _weight_types(model: nn.Module, weight_types: Mapping[int, str] | None) -> dict[int, str]:
    """The caller's ``{bits: type}`` over the model's own: a symmetric width takes its exact symmetric type."""
    kinds = quept_config(model).zero_point
    own = {b: SYMMETRIC_TYPES[b] for b, kind in kinds.items() if kind == "symmetric" and b in SYMMETRIC_TYPES}
    return own | dict(weight_types or {})


def _target(path: str | os.PathLike, base: nn.Module, plan_name: str, overwrite: bool) -> Path:
    """``path`` itself when it names a ``.gguf`` file, else ``path/<model>-<plan>.gguf``."""
    target = Path(os.fspath(path))
    if target.suffix != ".gguf":
        if target.is_file():
            raise ValueError(f"path={os.fspath(path)!r} is a file without the .gguf suffix")
        stem = Path(getattr(base, "name_or_path", "") or "model").name or "model"
        target = target / f"{stem}-{plan_name}.gguf"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists: pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@dataclass
class _Entry:
    """One tensor of the file, known from shapes alone (its info is written before any data)."""

    name: str  # GGUF tensor name
    qtype: str
    shape: tuple[int, ...]  # (rows, columns) in elements
    source: str | None  # the quantized linear (``linear``), else the state-dict key; None: rope factors
    linear: bool
    order: torch.Tensor | None  # GGUF row order (q/k permutation) or None

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[QType[self.qtype]]
        return math.prod(self.shape) // block * size


def _entries(
    base: nn.Module,
    plan: dict[str, int],
    shapes: dict[str, tuple[int, int]],
    arch,
    embedding_type: str,
    weight_types: Mapping[int, str] | None = None,
) -> list[_Entry]:
    """Every tensor llama.cpp loads, in the model's order (offloaded tensors are meta here: shapes suffice)."""
    config = base.config
    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if arch not in PERMUTED:
        n_head = None
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries, done = [], set()
    for key, tensor in base.state_dict().items():
        plain = key.replace(".base_layer", "")
        module, _, leaf = plain.rpartition(".")
        name = tmap.get_name(plain, try_suffixes=(".weight", ".bias"))
        if name is None or plain in done or (tied and name == "output.weight") or leaf not in ("weight", "bias"):
            continue
        done.add(plain)
        shape = tuple(tensor.shape)
        order = _order(plain, shape[0], n_head, n_kv)
        if module in plan and leaf == "weight":
            entries.append(_Entry(name, gguf_type(plan[module], shape[1], weight_types), shape, module, True, order))
        elif module in plan:
            entries.append(_Entry(name, "F32", shape, key, False, order))
        else:
            qtype = embedding_type if name in ("token_embd.weight", "output.weight") else "F32"
            entries.append(_Entry(name, _float_type(shape, qtype), shape, key, False, order))
    for module in [m for m in plan if m + ".weight" not in done]:  # frozen layers: codes, no float weight
        name = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        order = _order(module + ".weight", shapes[module][0], n_head, n_kv)
        qtype = gguf_type(plan[module], shapes[module][1], weight_types)
        entries.append(_Entry(name, qtype, shapes[module], module, True, order))
    freqs = _rope_freqs(config)
    if freqs is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        entries.append(_Entry(name, "F32", tuple(freqs.shape), None, False, None))
    return entries


def _data(entry: _Entry, base: nn.Module, grid_of: GridOf) -> np.ndarray:
    """The bytes (as an array) of one entry, from the tensors now in memory."""
    if entry.linear:
        q = grid_of(entry.source)
        _check_weight_only(entry.source, q)
        return _encode_linear(_grid(q, entry.order), entry.qtype)
    if entry.source is None:
        return _rope_freqs(base.config)
    module, _, leaf = entry.source.rpartition(".")
    tensor = getattr(base.get_submodule(module), leaf)
    return _encode_float(tensor if entry.order is None else tensor[entry.order], entry.qtype)


def _order(key: str, rows: int, n_head: int | None, n_kv: int | None) -> torch.Tensor | None:
    """GGUF row order of a q/k projection (or bias) where the architecture permutes them, else None."""
    if n_head is None:
        return None
    if ".q_proj." in key:
        return permute_rows(rows, n_head, n_head)
    if ".k_proj." in key:
        return permute_rows(rows, n_head, n_kv)
    return None


def export_gguf(
    model: nn.Module,
    bits_or_plan: BitsOrPlan,
    path: str | os.PathLike,
    *,
    embedding_type: str = "Q8_0",
    weight_types: Mapping[int, str] | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> str:
    """Write ``model`` at ``bits_or_plan`` as one llama.cpp GGUF file; returns its path.

    Args:
        model: an elastic or frozen weight-only QuEPT LLaMA-family model.
        bits_or_plan: ``4``, ``"w4"``, a stored plan (``"mixed-3.25"``) or ``{module or block: bits}``; in a
            mixed plan every tensor takes the type of its own width.
        path: a ``.gguf`` file, or a folder (the file is then ``<model>-<plan>.gguf`` inside it).
        embedding_type: GGML type of the token embedding (and an untied, unquantized lm_head).
        weight_types: ``{bits: GGML type}`` over `BIT_TYPES` (and `SYMMETRIC_TYPES` for a symmetric width) for the
            linears of that width, e.g. ``{4: "Q4_0"}``: llama.cpp's Q4_0 rung. An asymmetric W4 grid does not fit
            its symmetric blocks, so each block's scale is searched against QuEPT's dequantized weight, like every
            non-exact type; for an exact Q4_0 file, freeze the width onto the symmetric grid first
            (``quept_hf.freeze(model, zero_point={4: "symmetric"}, error_compensation=texts, tokenizer=tok)``).
        tokenizer: a Hugging Face tokenizer or a ``.gguf`` file to copy ``tokenizer.*`` fields from; default:
            SmolLM2's source GGUF, or the tokenizer of the model's source folder.
        overwrite: replace an existing file.
    """
    arch = _check_args(model, bits_or_plan, embedding_type, weight_types)
    base = unwrap(model)
    plan_name, plan, shapes, grid_of = _plan(model, bits_or_plan)
    entries = _entries(base, plan, shapes, arch, embedding_type, _weight_types(model, weight_types))
    target = _target(path, base, plan_name, overwrite)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        writer = _writer(staging, base, entries, plan_name, arch, tokenizer, model)
        _write_data(writer, entries, base, grid_of)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    summary = gguf_summary(target)
    logger.info(
        "QuEPT: wrote %s (%s): %.3f bits per linear weight, %.3f per weight overall, types %s",
        target,
        plan_name,
        summary["linear_bpw"],
        summary["file_bpw"],
        summary["type_counts"],
    )
    return str(target)


def _writer(staging: Path, base, entries: list[_Entry], plan_name: str, arch, tokenizer, model) -> gguf.GGUFWriter:
    """A writer with the header, metadata and every tensor's info written: what is left is the data, in order."""
    writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(getattr(base, "name_or_path", "") or "model").name or "model")
    writer.add_string("quept.plan", plan_name)
    _add_hparams(writer, base.config)
    for entry in entries:
        writer.add_tensor_info(
            entry.name, entry.shape, np.dtype(np.float32), entry.nbytes, raw_dtype=QType[entry.qtype]
        )
    linear = [entry.qtype for entry in entries if entry.linear]
    main = max(set(linear), key=linear.count)
    writer.add_file_type(
        getattr(gguf.LlamaFileType, FILE_TYPES.get(main, f"MOSTLY_{main}"), gguf.LlamaFileType.GUESSED)
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, model, tokenizer, base.config.vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def _write_data(writer: gguf.GGUFWriter, entries: list[_Entry], base: nn.Module, grid_of: GridOf) -> None:
    """Each tensor's data in the order of its info; an offloaded unit (block) is loaded while its tensors are
    written and let go after (`quept_hf.calibration.offload.onloaded`), so the peak is about one block."""
    units = offloaded_units(base)
    with contextlib.ExitStack() as loaded:
        current = None
        for entry in tqdm(entries, desc="QuEPT: GGUF tensors", unit="tensor", leave=False):
            unit = _unit_of(entry.source, units)
            if unit != current:
                loaded.close()
                if unit is not None:
                    loaded.enter_context(onloaded(units[unit], "cpu"))
                current = unit
            writer.write_tensor_data(_data(entry, base, grid_of))
    writer.close()


def _unit_of(source: str | None, units: dict[str, nn.Module]) -> str | None:
    """The offloaded unit (device-map entry) holding ``source`` (a module or tensor name), or None."""
    if source is None:
        return None
    return next((u for u in units if u == "" or source == u or source.startswith(u + ".")), None)


def gguf_summary(path: str | os.PathLike) -> dict:
    """Types and true bits per weight of a GGUF file: ``linear_bpw`` over the block linears, ``file_bpw`` over
    every tensor (embedding and norms included), ``types`` per tensor and ``type_counts``."""
    reader = gguf.GGUFReader(path)
    types, linear_bits, linear_n, total_bits, total_n = {}, 0, 0, 0, 0
    for t in reader.tensors:
        types[t.name] = t.tensor_type.name
        bits, n = int(t.n_bytes) * 8, int(t.n_elements)
        total_bits, total_n = total_bits + bits, total_n + n
        if t.name.startswith("blk.") and len(t.shape) == 2:
            linear_bits, linear_n = linear_bits + bits, linear_n + n
    counts = {k: list(types.values()).count(k) for k in sorted(set(types.values()))}
    return {
        "types": types,
        "type_counts": counts,
        "linear_bpw": linear_bits / max(linear_n, 1),
        "file_bpw": total_bits / max(total_n, 1),
        "bytes": os.path.getsize(path),
    }

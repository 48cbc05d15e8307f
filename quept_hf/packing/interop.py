"""Export a frozen QuEPT model as compressed-tensors ``pack-quantized``, the layout vLLM and transformers load.

Why this format: compressed-tensors (the llm-compressor / vLLM checkpoint format) stores integer weights of ANY
width 1..8 packed densely into int32 words (``weight_packed``), with ASYMMETRIC zero points for the ``group`` and
``channel`` strategies (``weight_zero_point``, packed along the output dimension), and dequantizes
``(q - zp) * scale``. That is exactly the QuEPT weight quantizer ``s * (c - z)`` once the codes are shifted to the
signed range: ``q = c - 2^(b-1)``, ``zp = z - 2^(b-1)``, so ``q - zp = c - z``. No approximation is made:

* ONE scheme covers every layer (transformers' loader applies the first dense config group to all dense layers):
  ``channel`` when every QuEPT layer is per-channel, else ``group`` with the largest size ``d`` dividing every
  row length and every QuEPT group size; a coarser QuEPT group repeats its scale and zero point ``group / d``
  times (more scale storage, identical weights). QuEPT pads a short last group; compressed-tensors groups must
  divide the row, which ``d`` does (SmolLM2 at group 128: rows of 576 -> ``d = 64``);
* the zero point must fit the packed code range, i.e. ``0 <= z <= 2^b - 1``. QuEPT's ``round(-xmin / s)`` leaves
  it only for a group whose weights all share one sign; such a layer raises a ValueError naming it, rather
  than being silently rounded.

Weight-only models and one bit-width per export: QuEPT's activation quantizer (per-token absmax with its own
clamp) and online input transforms have no exact compressed-tensors equivalent, and transformers' loader applies
one scheme to every dense layer (so a mixed plan could be written but not loaded back there).

Loading through transformers 5.23 needs ``quantization_config=CompressedTensorsConfig(dequantize=True)``: its
default (compressed) path cannot load ANY asymmetric ``pack-quantized`` checkpoint, compressed-tensors' own
included (its meta-device skeleton expects an unpacked zero point: vllm-project/llm-compressor#1618), while its
dequantize-on-load path reads this layout exactly. Serving engines may restrict what they run fast (e.g. group
sizes 32/64/128 for Marlin-style kernels).
"""

from __future__ import annotations

import copy
import math
import os

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import staged_folder
from .export import BitsOrPlan, QuantizedLinear, _check_target, _unwrap, quantize_layers, resolve_plan

__all__ = ["compressed_tensors_available", "export_compressed_tensors"]

CT_PIP = "pip install 'compressed-tensors>=0.15'"


def compressed_tensors_available() -> bool:
    """Whether the ``compressed-tensors`` package (needed to write and to load this format) imports."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def _ct_grouping(layers: dict[str, QuantizedLinear]) -> tuple[str, int | None]:
    """ONE compressed-tensors ``(strategy, group_size)`` that represents every layer's grouping exactly.

    One scheme for the whole model, because transformers' loader applies the first dense config group to every
    dense layer. ``channel`` when every layer has one group per row; else ``group`` with the largest size that
    divides every row length and every QuEPT group size (coarser QuEPT groups repeat their scale and zero).
    """
    if all(q.scales.shape[1] == 1 for q in layers.values()):
        return "channel", None
    size = 0
    for q in layers.values():
        size = math.gcd(size, q.codes.shape[1])
        if q.scales.shape[1] > 1:
            size = math.gcd(size, q.group_size)
    return "group", size


def _ct_tensors(name: str, q: QuantizedLinear, size: int | None) -> dict[str, torch.Tensor]:
    """``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` (+ bias) of one layer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (q.bits - 1)
    zeros, scales = q.zeros, q.scales
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 2 * offset - 1:
        raise ValueError(
            f"{name}: zero points outside 0..{2 * offset - 1} (a group whose weights all share one sign): "
            "compressed-tensors cannot store them exactly"
        )
    if size is not None:
        in_features = q.codes.shape[1]
        repeat = (in_features if scales.shape[1] == 1 else q.group_size) // size
        scales = scales.repeat_interleave(repeat, dim=1)[:, : in_features // size]
        zeros = zeros.repeat_interleave(repeat, dim=1)[:, : in_features // size]
    codes = (q.codes.to(torch.int32) - offset).to(torch.int8)
    out = {
        f"{name}.weight_packed": pack_to_int32(codes, q.bits),
        f"{name}.weight_scale": scales.contiguous(),
        f"{name}.weight_zero_point": pack_to_int32((zeros.to(torch.int32) - offset).to(torch.int8), q.bits, 0),
        f"{name}.weight_shape": torch.tensor(tuple(q.codes.shape)),
    }
    if q.bias is not None:
        out[f"{name}.bias"] = q.bias.contiguous()
    return out


def _ct_config(layers: dict[str, QuantizedLinear], ignore: list[str]) -> dict:
    """The ``quantization_config`` block compressed-tensors' own ``ModelCompressor.update_config`` writes."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    (bits,) = {q.bits for q in layers.values()}
    strategy, size = _ct_grouping(layers)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=strategy, group_size=size)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=list(layers), weights=args)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **config.model_dump(exclude=["quant_method"]),
    }


def _dedupe_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep the first name of each tied tensor (the embedding, for LLMs)."""
    seen, out = set(), {}
    for key, value in state.items():
        ident = (value.data_ptr(), value.dtype, tuple(value.shape))
        if ident not in seen:
            seen.add(ident)
            out[key] = value.contiguous()
    return out


@torch.no_grad()
def export_compressed_tensors(
    model: nn.Module,
    bits_or_plan: BitsOrPlan,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> str:
    """Write ``model`` frozen at ``bits_or_plan`` as a compressed-tensors ``pack-quantized`` folder.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir,
    quantization_config=CompressedTensorsConfig(dequantize=True))`` (transformers' own compressed-tensors path;
    quept_hf is not needed; see the module docstring for why ``dequantize=True``) and gives the fake-quant
    model's logits. Raises ImportError without ``compressed-tensors``, and ValueError for mixed plans,
    weight+activation models, input transforms or unrepresentable zero points.
    """
    if not compressed_tensors_available():
        raise ImportError(f"export_compressed_tensors needs the compressed-tensors package: {CT_PIP}")
    from ..quantizer import quept_linears
    from ..serialization import base_state_dict

    out_dir = os.fspath(out_dir)
    _check_target(out_dir, overwrite)
    base = _unwrap(model)
    _, plan = resolve_plan(model, bits_or_plan)
    layers = quantize_layers(model, plan)
    _check_supported(layers)
    prefixes = tuple(name + "." for name in quept_linears(base))
    state = {k: v for k, v in base_state_dict(base).items() if not k.startswith(prefixes)}
    _, size = _ct_grouping(layers)
    for name, q in layers.items():
        state.update(_ct_tensors(name, q, size))
    floats = [n for n, m in base.named_modules() if type(m) is nn.Linear]
    _write_folder(base, _dedupe_tied(state), _ct_config(layers, floats), out_dir, tokenizer)
    return out_dir


def _check_supported(layers: dict[str, QuantizedLinear]) -> None:
    """Weight-only, one bit-width: what compressed-tensors can hold exactly and transformers can load."""
    widths = sorted({q.bits for q in layers.values()})
    if len(widths) > 1:
        raise ValueError(
            f"compressed-tensors export takes one bit-width, the plan mixes {widths}: transformers' loader applies "
            "one scheme to every dense layer; use quept_hf.export (the quept packed format) for mixed plans"
        )
    activation = [n for n, q in layers.items() if q.activation_bits is not None]
    transformed = [n for n, q in layers.items() if q.input_transform is not None]
    if activation or transformed:
        which = activation or transformed
        raise ValueError(
            f"compressed-tensors export is weight-only: {which[0]} (and {len(which) - 1} more) "
            f"{'quantizes activations' if activation else 'applies an input transform'}, which that format "
            "cannot reproduce exactly; use quept_hf.export (the quept packed format) instead"
        )


def _write_folder(base: nn.Module, state: dict, quant_config: dict, out_dir: str, tokenizer) -> None:
    """config.json (with the compressed-tensors block), generation config, model.safetensors: staged, then moved."""
    with staged_folder(out_dir) as staging:
        config = type(base.config).from_dict(copy.deepcopy(base.config.to_dict()))
        config.quantization_config = quant_config
        config.save_pretrained(staging)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(staging)
        save_file(state, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

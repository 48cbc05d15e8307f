"""Export a frozen QuEPT model as compressed-tensors (``pack-quantized``; W8A8 ``int-quantized`` for vLLM).

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

``target="vllm"``: the layouts vLLM 0.32's CPU build runs (read from its sources, and run by
benchmarks/vllm_check.py), and a ValueError naming the reason for every other width. The 4-bit layout is also
one CUDA's Marlin kernel accepts by its ``can_implement`` (uint4 with zero points, groups -1/32/64/128; not run
on a GPU here):

* 4 bits: weight-only ``pack-quantized`` uint4 WITH zero points (asymmetric, vLLM's ``CompressedTensorsWNA16``
  -> ``CPUWNA16LinearKernel``, which takes only ``uint4`` / ``uint4b8``: ``_CPUWNA16_SUPPORTED_QUANT_TYPES`` in
  ``vllm/model_executor/kernels/linear/mixed_precision/cpu.py``). QuEPT's codes and zero points are stored
  unchanged: exact up to the engine's 16-bit arithmetic. Rows (in features) and out features must be multiples
  of 32 (``can_implement``, and ``TORCH_CHECK_EQ(a_k_size % 32, 0)`` in ``csrc/cpu/cpu_wna16.cpp``); the group
  must be one per row or 32, 64 or 128 wide (CPU: any even size; CUDA Marlin: ``MARLIN_SUPPORTED_GROUP_SIZES``).
  The kernel dispatches only bf16 / fp16 activations (``VLLM_DISPATCH_16B_TYPES``), and on a CPU with AMX and
  bf16 vLLM switches to its W4A8 path by default (``VLLM_CPU_INT4_W4A8=1``), which quantizes activations to
  int8 and crashes on rows that are not a multiple of 128 (``convert_weight_packed_scale_zp``; SmolLM2's 576):
  run it with ``dtype="float16"`` (or ``VLLM_CPU_INT4_W4A8=0``);
* 8 bits: ``int-quantized`` W8A8 int8, symmetric per-channel weights and dynamic per-token symmetric int8
  activations (``CompressedTensorsW8A8Int8`` -> ``CPUInt8ScaledMMLinearKernel``): vLLM's CPU build has no 8-bit
  weight-only kernel (``uint8`` / ``uint8b128`` are refused by ``CPUWNA16LinearKernel``) and its W8A8 int8 path
  takes only SYMMETRIC weights (``_is_dynamic_token_w8a8`` in ``compressed_tensors.py``). QuEPT's asymmetric
  8-bit grid ``s * (c - z)`` fits a symmetric int8 row exactly only when ``-128 <= c - z <= 127`` over the whole
  row with one scale; every other row is re-gridded against QuEPT's DEQUANTIZED weight (per-row scale searched
  for the least squared error), and the export states that error. The activation quantizer is vLLM's: for a
  weight-only QuEPT model it is an extra approximation; a QuEPT model that quantizes activations per token at
  8 bits (its absmax / 127 quantizer is vLLM's) is exported with them;
* 2, 3, 5, 6, 7 bits: refused. Neither CPU kernel takes them (and CUDA Marlin takes only 4 and 8 bits).

The folder then also holds ``quept_export.json``: target, scheme, whether the conversion is exact, and its error.
A model whose weights accelerate offloads (``device_map``) is exported one block at a time
(`quept_hf.packing.stream.write_blockwise`: one shard per block, the error added up as the blocks go): the same
tensors and report, at a peak memory of one block.

Loading through transformers 5.23 needs ``quantization_config=CompressedTensorsConfig(dequantize=True)``: its
default (compressed) path cannot load ANY asymmetric ``pack-quantized`` checkpoint, compressed-tensors' own
included (its meta-device skeleton expects an unpacked zero point: vllm-project/llm-compressor#1618), while its
dequantize-on-load path reads this layout exactly. Serving engines may restrict what they run fast (e.g. group
sizes 32/64/128 for Marlin-style kernels).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import staged_folder
from ..calibration.offload import has_offloaded
from ..compat import unwrap
from ..inspection import base_state_dict, quept_linears
from .plan import BitsOrPlan, QuantizedLinear, check_target, quantize_layers, resolve_plan
from .stream import write_blockwise

__all__ = ["VLLM_TARGET", "compressed_tensors_available", "export_compressed_tensors"]

CT_PIP = "pip install 'compressed-tensors>=0.15'"
VLLM_TARGET = "vllm"
# Group sizes every vLLM 4-bit path runs: CPUWNA16 takes any even size, CUDA Marlin only these (-1: one per row).
VLLM_W4_GROUPS = (32, 64, 128)
VLLM_MULTIPLE = 32  # CPUWNA16LinearKernel.can_implement: in and out features multiples of 32
# Candidate per-row int8 scales, absmax/127 down to VLLM_W8_LOWEST of it (SmolLM2 RTN W8, weights alone:
# 0.9 gave top-5 overlap 0.99 and the least error; no search 0.96; down to 0.7 clipped outliers harder).
VLLM_W8_SEARCH, VLLM_W8_LOWEST = 32, 0.9


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
    if not torch.equal(zeros, zeros.round()):
        raise ValueError(
            f"{name}: W{q.bits} has float zero points (QuEPTConfig.zero_point={{{q.bits}: 'float'}}), which "
            "compressed-tensors (integer zero points) cannot store: export that width with format='gguf' or "
            "calibrate it with zero_point='integer'"
        )
    if zeros.min() < 0 or zeros.max() > 2 * offset - 1:
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


def _ct_config(layers: dict[str, QuantizedLinear], ignore: list[str], w8a8: bool = False) -> dict:
    """The ``quantization_config`` block compressed-tensors' own ``ModelCompressor.update_config`` writes.

    ``w8a8``: vLLM's W8A8 int8 scheme (``int-quantized``, symmetric per-channel int8 weights, dynamic per-token
    symmetric int8 activations) instead of the asymmetric weight-only ``pack-quantized`` one.
    """
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    (bits,) = {q.bits for q in layers.values()}
    if w8a8:
        weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        scheme = QuantizationScheme(targets=list(layers), weights=weights, input_activations=inputs)
        form = "int-quantized"
    else:
        strategy, size = _ct_grouping(layers)
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=strategy, group_size=size)
        scheme, form = QuantizationScheme(targets=list(layers), weights=args), "pack-quantized"
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=form,
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
    target: str | None = None,
) -> str:
    """Write ``model`` frozen at ``bits_or_plan`` as a compressed-tensors folder.

    ``target=None`` (the general format): asymmetric ``pack-quantized`` at any width 1..8, exact. The folder
    loads with ``AutoModelForCausalLM.from_pretrained(out_dir,
    quantization_config=CompressedTensorsConfig(dequantize=True))`` (transformers' own compressed-tensors path;
    quept_hf is not needed; see the module docstring for why ``dequantize=True``) and gives the fake-quant
    model's logits.

    ``target="vllm"``: only a layout vLLM's CPU build runs (module docstring): W4 as asymmetric uint4
    ``pack-quantized`` (exact), W8 as W8A8 int8 (exact only where the rows allow; the error is stated in
    ``quept_export.json`` and a warning); other widths raise a ValueError saying why.

    Raises ImportError without ``compressed-tensors``, and ValueError for mixed plans, weight+activation models
    (except per-token W8A8 for vLLM), input transforms or unrepresentable zero points.
    """
    if not compressed_tensors_available():
        raise ImportError(f"export_compressed_tensors needs the compressed-tensors package: {CT_PIP}")
    if target not in (None, VLLM_TARGET):
        raise ValueError(f"target={target!r}: allowed are None (the general format) and {VLLM_TARGET!r}")
    out_dir = os.fspath(out_dir)
    check_target(out_dir, overwrite)
    base = unwrap(model)
    _, plan = resolve_plan(model, bits_or_plan)
    layers = quantize_layers(model, plan)  # offloaded layers come as meta tensors: their format, no weight read
    w8a8 = target == VLLM_TARGET and _check_vllm(layers)
    _check_supported(layers, allow_int8_tokens=w8a8)
    _, size = _ct_grouping(layers)
    int8 = _Int8Conversion() if w8a8 else None

    def converted(quantized: dict[str, QuantizedLinear]) -> dict[str, torch.Tensor]:
        state = {}
        for name, q in quantized.items():
            state.update(int8.tensors(name, q) if int8 is not None else _ct_tensors(name, q, size))
        return state

    def write_weights(folder: str) -> None:
        if has_offloaded(base):  # one block at a time: the offloaded weights are never all in memory
            write_blockwise(model, folder, plan, lambda m: converted(quantize_layers(model, {n: plan[n] for n in m})),
                            {"format": "pt"})  # fmt: skip
            return
        prefixes = tuple(name + "." for name in quept_linears(base))
        state = {k: v for k, v in base_state_dict(base).items() if not k.startswith(prefixes)} | converted(layers)
        save_file(_dedupe_tied(state), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

    def report() -> dict | None:
        if int8 is not None:
            return int8.report(weight_only=all(q.activation_bits is None for q in layers.values()))
        return _report_w4(layers, size) if target == VLLM_TARGET else None

    floats = [n for n, m in base.named_modules() if type(m) is nn.Linear]
    _write_folder(base, write_weights, _ct_config(layers, floats, w8a8), out_dir, tokenizer, report)
    return out_dir


def _check_vllm(layers: dict[str, QuantizedLinear]) -> bool:
    """Refuse, with the reason, what vLLM 0.32's CPU build cannot run; True for 8 bits (the W8A8 int8 scheme)."""
    widths = sorted({q.bits for q in layers.values()})
    if len(widths) > 1:
        return False  # a mixed plan: _check_supported refuses it with its own reason
    if widths != [4] and widths != [8]:
        raise ValueError(
            f"target='vllm' exports 4 or 8 bits, not {widths}: vLLM's CPU build runs compressed-tensors weight-only "
            "layers only as uint4 / uint4b8 (CPUWNA16LinearKernel, _CPUWNA16_SUPPORTED_QUANT_TYPES in "
            "vllm/model_executor/kernels/linear/mixed_precision/cpu.py; CUDA Marlin adds only uint8b128) and 8-bit "
            "weights only as W8A8 int8; export without target= for the general format"
        )
    if widths == [8]:
        return True  # any shape: the sgl int8 kernel where K % 32 and N % 16 allow, else oneDNN
    for name, q in layers.items():
        out_features, in_features = q.codes.shape
        if in_features % VLLM_MULTIPLE or out_features % VLLM_MULTIPLE:
            raise ValueError(
                f"target='vllm': {name} is {out_features} x {in_features}; vLLM's CPU kernels need in and out "
                f"features that are multiples of {VLLM_MULTIPLE} (CPUWNA16LinearKernel.can_implement, cpu_wna16.cpp)"
            )
    _, size = _ct_grouping(layers)
    if size is not None and size not in VLLM_W4_GROUPS:
        raise ValueError(
            f"target='vllm': the layers' groups store as compressed-tensors group {size} (the largest size dividing "
            f"every row and QuEPT group); vLLM runs 4 bits per channel or at groups {VLLM_W4_GROUPS} "
            "(CPUWNA16: even sizes; CUDA Marlin: MARLIN_SUPPORTED_GROUP_SIZES): calibrate with group_size -1, 32, "
            "64 or 128 on rows those divide"
        )
    acts = [n for n, q in layers.items() if q.activation_bits is not None]
    if acts:
        raise ValueError(
            f"target='vllm' at 4 bits is weight-only: {acts[0]} (and {len(acts) - 1} more) quantizes activations; "
            "vLLM's int4-weight activation paths need SYMMETRIC int4 weights (_is_dynamic_token_w4a8_int in "
            "compressed_tensors.py), which QuEPT's asymmetric grid is not"
        )
    return False


def _report_w4(layers: dict[str, QuantizedLinear], size: int | None) -> dict:
    """What the W4 vLLM export is: QuEPT's own codes and zero points, so exact up to vLLM's 16-bit arithmetic."""
    return {
        "target": VLLM_TARGET,
        "scheme": "W4A16 asymmetric uint4 pack-quantized" + (" per channel" if size is None else f" group {size}"),
        "exact": True,
        "weight_max_abs_error": 0.0,
        "weight_relative_error": 0.0,
        "rows_exact": sum(q.codes.shape[0] for q in layers.values()),
        "rows": sum(q.codes.shape[0] for q in layers.values()),
        "activations": "16-bit, not quantized",
        "vllm_dtype": "float16",
        "vllm_dtype_why": (
            "CPUWNA16 dispatches only 16-bit activations; with bfloat16 on an AMX CPU vLLM switches to its W4A8 "
            "path (VLLM_CPU_INT4_W4A8=1 by default), which quantizes activations and needs rows % 128 == 0"
        ),
    }


def _int8_rows(q: QuantizedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 ``(codes (out, in), scale (out, 1), exact (out,), QuEPT's dequantized weight)`` of a layer.

    A row is exact when it has one scale and ``c - z`` lies in ``[-128, 127]``: then its int8 codes ARE ``c - z``
    with QuEPT's scale. Other rows get the per-row scale, among ``VLLM_W8_SEARCH`` candidates from absmax / 127
    down to ``VLLM_W8_LOWEST`` of it (clipping the largest weights), with the least squared error against QuEPT's
    dequantized weight, not the float one: the export approximates what QuEPT computes, never the float weight.
    """
    from .working import dequantize_codes

    target = dequantize_codes(q.codes, q.scales, q.zeros, q.group_size).to(torch.float32)
    centred = (
        q.codes.to(torch.float32)
        - q.zeros.to(torch.float32).repeat_interleave(
            q.codes.shape[1] if q.scales.shape[1] == 1 else q.group_size, dim=1
        )[:, : q.codes.shape[1]]
    )
    one_scale = (q.scales == q.scales[:, :1]).all(dim=1)
    exact = one_scale & (centred.amin(dim=1) >= -128) & (centred.amax(dim=1) <= 127)
    absmax = target.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = absmax.clone()
    for ratio in torch.linspace(1.0, VLLM_W8_LOWEST, VLLM_W8_SEARCH).tolist():
        scale = absmax * ratio
        err = ((torch.clamp(torch.round(target / scale), -128, 127) * scale - target) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    codes = torch.clamp(torch.round(target / best_scale), -128, 127)
    scale = best_scale
    exact_scale = q.scales[:, :1].to(torch.float32)
    codes = torch.where(exact[:, None], centred, codes)
    scale = torch.where(exact[:, None], exact_scale, scale)
    return codes.to(torch.int8), scale, exact, target


class _Int8Conversion:
    """QuEPT layers to vLLM's W8A8 int8 tensors, one at a time (a streamed export sees them block by block), and
    the running error of the conversion that `report` states."""

    def __init__(self) -> None:
        self.rows = self.rows_exact = 0
        self.max_err = self.sq_err = self.sq_ref = 0.0
        self.worst = ""

    def tensors(self, name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]:
        """``weight`` (int8) / ``weight_scale`` (out, 1) (+ bias) of one layer; its error is added up."""
        codes, scale, exact, target = _int8_rows(q)
        diff = codes.to(torch.float32) * scale - target
        layer_max = diff.abs().max().item()
        if layer_max > self.max_err:
            self.max_err, self.worst = layer_max, name
        self.sq_err += diff.pow(2).sum().item()
        self.sq_ref += target.pow(2).sum().item()
        self.rows, self.rows_exact = self.rows + exact.numel(), self.rows_exact + int(exact.sum())
        out = {f"{name}.weight": codes.contiguous(), f"{name}.weight_scale": scale.to(q.scales.dtype).contiguous()}
        if q.bias is not None:
            out[f"{name}.bias"] = q.bias.contiguous()
        return out

    def report(self, weight_only: bool) -> dict:
        """What the W8A8 export is, and its error against QuEPT's dequantized weights (a warning when inexact)."""
        relative = math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref else 0.0
        report = {
            "target": VLLM_TARGET,
            "scheme": "W8A8 int8: symmetric per-channel int-quantized weights, dynamic per-token int8 activations",
            "exact": self.rows_exact == self.rows,
            "weight_max_abs_error": self.max_err,
            "weight_max_abs_error_layer": self.worst,
            "weight_relative_error": relative,
            "rows_exact": self.rows_exact,
            "rows": self.rows,
            "activations": (
                "vLLM quantizes them per token to int8 (absmax / 127): an approximation the weight-only QuEPT model "
                "does not make"
                if weight_only
                else "per-token int8 absmax / 127: QuEPT's own activation quantizer"
            ),
            "vllm_dtype": "bfloat16",
            "vllm_dtype_why": (
                "on an AMX CPU vLLM runs symmetric-input W8A8 with its sgl int8 kernel, bfloat16 only (float16 "
                "aborts: 'scale_C: scalar path not implemented', gemm_int8.cpp); without AMX (oneDNN) any dtype"
            ),
        }
        if not report["exact"]:
            warnings.warn(
                f"target='vllm' at 8 bits: {self.rows - self.rows_exact} of {self.rows} rows do not fit a symmetric "
                f"int8 row (QuEPT's asymmetric grid); re-gridded against QuEPT's dequantized weight: relative error "
                f"{relative:.2e}, max |error| {self.max_err:.2e} ({self.worst}); see quept_export.json",
                stacklevel=5,  # report <- the export's report() <- _write_folder <- export_compressed_tensors
            )
        return report


def _check_supported(layers: dict[str, QuantizedLinear], allow_int8_tokens: bool = False) -> None:
    """Weight-only, one bit-width: what compressed-tensors can hold exactly and transformers can load.

    ``allow_int8_tokens`` (the vLLM W8A8 export): per-token 8-bit activation quantization is allowed, since
    that scheme's dynamic per-token int8 quantizer is QuEPT's (absmax / 127, no clipping parameter).
    """
    widths = sorted({q.bits for q in layers.values()})
    if len(widths) > 1:
        raise ValueError(
            f"compressed-tensors export takes one bit-width, the plan mixes {widths}: transformers' loader applies "
            "one scheme to every dense layer; use quept_hf.export (the quept packed format) for mixed plans"
        )
    activation = [
        n
        for n, q in layers.items()
        if q.activation_bits is not None
        and not (allow_int8_tokens and q.activation_bits == 8 and q.act_log_step is None)
    ]
    transformed = [n for n, q in layers.items() if q.input_transform is not None]
    if activation or transformed:
        which = activation or transformed
        raise ValueError(
            f"compressed-tensors export is weight-only: {which[0]} (and {len(which) - 1} more) "
            f"{'quantizes activations' if activation else 'applies an input transform'}, which that format "
            "cannot reproduce exactly; use quept_hf.export (the quept packed format) instead"
        )


def _write_folder(
    base: nn.Module,
    write_weights: Callable[[str], None],
    quant_config: dict,
    out_dir: str,
    tokenizer,
    report: Callable[[], dict | None],
) -> None:
    """The weights (``write_weights(folder)``), config.json (with the compressed-tensors block), generation config
    and the conversion report ``quept_export.json`` of a targeted export (``report()``, once the weights are
    written): staged, then moved."""
    with staged_folder(out_dir) as staging:
        write_weights(staging)
        stated = report()
        if stated is not None:
            with open(os.path.join(staging, "quept_export.json"), "w") as handle:
                json.dump(stated, handle, indent=2)
        config = type(base.config).from_dict(copy.deepcopy(base.config.to_dict()))
        config.quantization_config = quant_config
        config.save_pretrained(staging)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

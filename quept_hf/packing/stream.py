"""Checkpoints of a model larger than memory, written block by block: never the whole model in RAM.

`write_blockwise` is what every streamed safetensors format shares: for a model dispatched by accelerate
(``device_map=...`` with CPU or disk offload) it loads ONE block at a time (`quept_hf.calibration.offload.onloaded`),
asks the format for the stored tensors of the block's quantized linears, writes them with the block's other
tensors as one safetensors shard and lets the block go; the tensors outside the blocks follow in a last shard,
then the index. The formats: the frozen model (`save_frozen`, here), the packed export (`quept_hf.export`) and
compressed-tensors (`quept_hf.packing.interop.export_compressed_tensors`); the GGUF export streams on its own
(one file, gguf-py's writer).

`quept_hf.freeze` builds the frozen model in memory. `save_frozen` computes the codes exactly as `freeze` does
(`_frozen_tensors` of the same `quantize_layers`, error compensation included): the folder is the one
``freeze(model, ...).save_pretrained(folder)`` would give (same tensors, config.json and generation config), so
``from_pretrained(folder)`` (after ``import quept_hf``) loads the frozen model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils.logging import tqdm

from ..atomic import staged_folder
from ..calibration.offload import each_onloaded, loaded_on_cpu, stored_tensor
from ..compat import unwrap
from ..config import zero_point_kinds
from ..models import architecture_for
from ..nn import QuEPTLinear
from ..serialization import format_record
from .freeze import (
    HEAD_GROUP_SIZE,
    _check_head_bits,
    _frozen_tensors,
    _head_tensors,
    _hessians_by_width,
    frozen_config,
    kept_widths,
)
from .plan import QuantizedLinear, quantize_layers, regridded

logger = logging.getLogger(__name__)

__all__ = ["save_frozen", "write_blockwise"]

INDEX_NAME = "model.safetensors.index.json"


def _plain_name(key: str) -> str | None:
    """A state-dict key as the frozen model names it (no PEFT ``base_layer``), None for MB-CLoRA tensors."""
    if ".mbclora_A." in key or ".mbclora_B." in key:
        return None
    return key.replace(".base_layer", "")


def _per_tensor(base: nn.Module, kept: dict[str, list[int]]) -> list[str]:
    """Layers whose frozen codes carry a static activation step (per-tensor activations), as `freeze` finds them."""
    layers = {n.replace(".base_layer", ""): m for n, m in base.named_modules() if isinstance(m, QuEPTLinear)}
    return sorted(
        name
        for name in kept
        if layers[name].quantize_activations
        and layers[name].activation_granularity == "per_tensor"
        and any((layers[name].activation_bits or b) < 16 for b in kept[name])
    )


def _frozen_layers(
    model: nn.Module, modules: list[str], kept: dict[str, list[int]], compensated: CompensatedCodes
) -> dict[str, torch.Tensor]:
    """The frozen tensors of ``modules`` (codes, scales, zero points of every kept width, bias)."""
    by_width: dict[str, dict] = {m: {} for m in modules}
    for b in sorted({b for m in modules for b in kept[m]}):
        for module, q in quantize_layers(model, {m: b for m in modules if b in kept[m]}).items():
            by_width[module][b] = compensated.apply(module, q)
    state: dict[str, torch.Tensor] = {}
    for module, widths in by_width.items():
        state.update(_frozen_tensors(module, widths))
    return state


def _other_tensors(module: nn.Module, prefix: str, quantized_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` a checkpoint keeps as it is (norms, embeddings): not of a quantized linear."""
    state = {}
    for key, tensor in module.state_dict().items():
        name = _plain_name(prefix + key)
        if name is not None and not name.startswith(quantized_prefixes):
            state[name] = tensor
    return state


def _write_shard(folder: str, name: str, state: dict[str, torch.Tensor], metadata: dict) -> None:
    # Clones: no shared storage (tied weights) and no views of offloaded buffers in a safetensors file.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, os.path.join(folder, name),
              metadata={"format": "pt", **metadata})  # fmt: skip


@torch.no_grad()
def save_frozen(
    model: nn.Module,
    save_directory: str | os.PathLike,
    bits: Iterable[int] | None = None,
    plans: Iterable[str] | None = None,
    *,
    head_bits: int | None = None,
    error_compensation: Any = None,
    tokenizer: Any = None,
    error_compensation_bits: Iterable[int] | None = None,
    zero_point: str | Mapping[int, str] | None = None,
) -> str:
    """Write the frozen checkpoint of ``model`` to ``save_directory`` one block at a time; returns the folder.

    Same arguments and result as ``quept_hf.freeze(model, bits, plans, head_bits=..., error_compensation=...,
    tokenizer=..., error_compensation_bits=..., zero_point=...).save_pretrained(folder)``, at a peak memory of one
    block: for models dispatched by accelerate with their weights offloaded (any model works). Load the result with
    ``from_pretrained(folder)``. The folder is written in a staging folder next to it and swapped in at the end:
    it holds the old checkpoint or the new one, never a part of it. With ``error_compensation`` the input
    Hessians come from forward passes of the dispatched model (accelerate loads each block in turn; one pass per
    width and Hessian chunk, as `freeze`), and the compensated codes of each layer wait in a temporary file of
    the staging folder until their block is written.
    """
    base = unwrap(model)
    config = base.config.quantization_config
    _check_head_bits(head_bits)
    uniform, plan_maps, kept = kept_widths(model, bits, plans)
    regrid = zero_point_kinds(zero_point, sorted({b for w in kept.values() for b in w}), "save_frozen: zero_point")
    per_tensor = _per_tensor(base, kept)
    description = frozen_config(config, uniform, plan_maps, kept, per_tensor, regrid)
    hf_config = type(base.config).from_dict(base.config.to_dict())
    if head_bits is not None:
        head_name = next(n for n, m in base.named_modules() if m is base.get_output_embeddings())
        description.frozen["head"] = {"module": head_name, "bits": head_bits, "group_size": HEAD_GROUP_SIZE}
        hf_config.tie_word_embeddings = False
    metadata = format_record(types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=description)))
    folder = os.fspath(save_directory)
    with staged_folder(folder) as staging, regridded(model, regrid):
        compensated = _compensated_codes(model, kept, error_compensation, tokenizer, error_compensation_bits, staging)
        _write_tensors(model, staging, kept, metadata, head_bits, compensated)
        compensated.discard()
        hf_config.quantization_config = description.to_dict()
        hf_config.dtype = base.dtype
        hf_config.save_pretrained(staging)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(staging)
    logger.info("QuEPT: froze %d linear layers into %s, one block at a time (bits %s, plans %s)", len(kept), folder,
                uniform, sorted(plan_maps))  # fmt: skip
    return folder


class CompensatedCodes:
    """Error-compensated codes (`quept_hf.freeze`'s ``error_compensation``) computed ahead of the block-by-block
    write: GPTQ needs each layer's input Hessian at each width, which takes forward passes of the whole model, so
    the codes, scales and zero points of every compensated (layer, width) are computed chunk by chunk as the
    Hessians come and parked in safetensors files of ``folder`` until their block is written."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.where: dict[tuple[str, int], str] = {}  # (module, bits) -> file

    def add(self, quantized: dict[str, QuantizedLinear]) -> None:
        """Park compensated layers (of one width) in a file of their own."""
        path = os.path.join(self.folder, f"{len(self.where):06d}.safetensors")
        state = {}
        for module, q in quantized.items():
            state |= {f"{module}.{q.bits}.{k}": getattr(q, k).contiguous() for k in ("codes", "scales", "zeros")}
            self.where[module, q.bits] = path
        save_file(state, path)

    def apply(self, module: str, q: QuantizedLinear) -> QuantizedLinear:
        """``q`` (plain rounding) with its compensated codes and grid, when there are some."""
        path = self.where.get((module, q.bits))
        if path is None:
            return q
        with safe_open(path, framework="pt") as stored:
            parts = {k: stored.get_tensor(f"{module}.{q.bits}.{k}") for k in ("codes", "scales", "zeros")}
        return dataclasses.replace(q, **parts)

    def discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder)


def _compensated_codes(
    model: nn.Module, kept: dict[str, list[int]], data: Any, tokenizer: Any, bits: Iterable[int] | None, staging: str
) -> CompensatedCodes:
    """The compensated codes of every (layer, width) `freeze` compensates, from the same Hessians
    (`_hessians_by_width`), each chunk's layers quantized with their blocks loaded one at a time."""
    if data is None and bits is None:
        return CompensatedCodes()
    codes = CompensatedCodes(tempfile.mkdtemp(prefix=".compensated-", dir=staging))
    base = unwrap(model)
    config = base.config.quantization_config
    layers = {id(m): n for n, m in base.named_modules()}
    for width, hessians in _hessians_by_width(model, config, kept, data, tokenizer, bits):
        if hessians is None:
            continue  # plain rounding: done as the blocks are written
        modules = [base.get_submodule(m) for m in kept if m in hessians]
        for layer in each_onloaded(base, modules):
            name = layers[id(layer)]
            codes.add(quantize_layers(model, {name: width}, {name: hessians[name]}))
    return codes


def _write_tensors(
    model: nn.Module,
    folder: str,
    kept: dict[str, list[int]],
    metadata: dict,
    head_bits: int | None,
    compensated: CompensatedCodes,
) -> dict[str, str]:
    """The frozen tensors, one shard per block (`write_blockwise`), the head's codes in the last; the weight map."""

    def head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = unwrap(model)
        with loaded_on_cpu(base.get_output_embeddings()):
            head_name, head_state = _head_tensors(base, head_bits)
        return {k: v for k, v in state.items() if not k.startswith(head_name + ".")} | head_state

    return write_blockwise(model, folder, kept, lambda modules: _frozen_layers(model, modules, kept, compensated),
                           metadata, finish=None if head_bits is None else head)  # fmt: skip


def write_blockwise(
    model: nn.Module,
    folder: str,
    quantized: Iterable[str],
    layer_tensors: Callable[[list[str]], dict[str, torch.Tensor]],
    metadata: dict,
    *,
    finish: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, str]:
    """Write a checkpoint of ``model`` into ``folder`` one block at a time; returns the weight map (and writes the
    index).

    What every streamed storage format shares (the frozen model, the packed and compressed-tensors exports): each
    Transformer block is loaded (`onloaded`, when accelerate offloads it), ``layer_tensors(modules)`` gives the
    stored tensors of its ``quantized`` linears, its other tensors (norms) are kept as they are, one safetensors
    shard is written and the block is let go. The tensors outside the blocks (embeddings, final norm, head and
    quantized linears there) follow in a last shard, passed through ``finish`` when given. Tied tensors are
    written once (the first name), as transformers' own save does.
    """
    base = unwrap(model)
    quantized = list(quantized)
    names = {id(m): n for n, m in base.named_modules()}
    chains = architecture_for(base).chains(base, base.config.quantization_config.quantize_vision_tower)
    blocks = [b for chain in chains for b in chain.blocks]
    block_names = [names[id(b)] for b in blocks]
    quantized_prefixes = tuple(m + "." for m in quantized)
    shards = [f"model-{i + 1:05d}-of-{len(blocks) + 1:05d}.safetensors" for i in range(len(blocks) + 1)]
    weight_map: dict[str, str] = {}
    for block, name, shard in tqdm(zip(blocks, block_names, shards, strict=False), total=len(blocks),
                                   desc="QuEPT (streamed, block by block)", unit="block"):  # fmt: skip
        with loaded_on_cpu(block):
            modules = [m for m in quantized if m.startswith(name + ".")]
            state = {**_other_tensors(block, name + ".", quantized_prefixes), **layer_tensors(modules)}
            _write_shard(folder, shard, state, metadata)
        weight_map.update(dict.fromkeys(state, shard))
    rest = _rest(base, quantized, block_names, quantized_prefixes, layer_tensors)
    rest = rest if finish is None else finish(rest)
    _write_shard(folder, shards[-1], rest, metadata)
    weight_map.update(dict.fromkeys(rest, shards[-1]))
    _write_index(folder, weight_map)
    return weight_map


def _rest(
    base: nn.Module,
    quantized: list[str],
    block_names: list[str],
    quantized_prefixes: tuple[str, ...],
    layer_tensors: Callable[[list[str]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Tensors outside every block (embeddings, final norm, head; quantized linears there too), offloaded ones
    read one at a time from where accelerate keeps them; a tied tensor under its first name only."""
    inside = tuple(n + "." for n in block_names)
    state, seen = {}, set()
    for key, tensor in base.state_dict(keep_vars=True).items():
        name = _plain_name(key)
        if key.startswith(inside) or name is None or name.startswith(quantized_prefixes) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = stored_tensor(base, key) if tensor.device.type == "meta" else tensor.detach()
    for module in (m for m in quantized if not m.startswith(inside)):
        layer = base.get_submodule(module)
        with loaded_on_cpu(layer):
            state.update(layer_tensors([module]))
    return state


def _write_index(folder: str, weight_map: dict[str, str]) -> None:
    sizes = {}
    for shard in set(weight_map.values()):
        sizes[shard] = os.path.getsize(os.path.join(folder, shard))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)

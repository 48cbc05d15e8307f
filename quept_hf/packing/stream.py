"""Freeze a model larger than memory: the frozen checkpoint written block by block, never the whole model in RAM.

`quept_hf.freeze` builds the frozen model in memory. For a model dispatched by accelerate (``device_map=...`` with
CPU or disk offload) `save_frozen` loads ONE block at a time (`quept_hf.calibration.offload.onloaded`), computes
its codes exactly as `freeze` does (`_frozen_tensors` of the same `quantize_layers`), writes them as one
safetensors shard and lets the block go; the tensors outside the blocks follow in a last shard. The folder is the
one ``freeze(model, ...).save_pretrained(folder)`` would give (same tensors, config.json and generation config),
so ``from_pretrained(folder)`` (after ``import quept_hf``) loads the frozen model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import types
from collections.abc import Iterable

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.utils.logging import tqdm

from ..atomic import staged_folder
from ..calibration.offload import has_offloaded, onloaded, stored_tensor
from ..compat import unwrap
from ..models import architecture_for
from ..nn import QuEPTLinear
from ..serialization import format_record
from .freeze import HEAD_GROUP_SIZE, _check_head_bits, _frozen_tensors, _head_tensors, frozen_config, kept_widths
from .plan import quantize_layers

logger = logging.getLogger(__name__)

__all__ = ["save_frozen"]

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


def _frozen_layers(model: nn.Module, modules: list[str], kept: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The frozen tensors of ``modules`` (codes, scales, zero points of every kept width, bias)."""
    by_width: dict[str, dict] = {m: {} for m in modules}
    for b in sorted({b for m in modules for b in kept[m]}):
        for module, q in quantize_layers(model, {m: b for m in modules if b in kept[m]}).items():
            by_width[module][b] = q
    state: dict[str, torch.Tensor] = {}
    for module, widths in by_width.items():
        state.update(_frozen_tensors(module, widths))
    return state


def _other_tensors(module: nn.Module, prefix: str, kept_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` a frozen model keeps as it is (norms, embeddings): not of a kept linear."""
    state = {}
    for key, tensor in module.state_dict().items():
        name = _plain_name(prefix + key)
        if name is not None and not name.startswith(kept_prefixes):
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
) -> str:
    """Write the frozen checkpoint of ``model`` to ``save_directory`` one block at a time; returns the folder.

    Same arguments and result as ``quept_hf.freeze(model, bits, plans, head_bits=...).save_pretrained(folder)``,
    at a peak memory of one block: for models dispatched by accelerate with their weights offloaded (any model
    works). Load the result with ``from_pretrained(folder)``. The folder is written in a staging folder next to it
    and swapped in at the end: it holds the old checkpoint or the new one, never a part of it.
    """
    base = unwrap(model)
    config = base.config.quantization_config
    _check_head_bits(head_bits)
    uniform, plan_maps, kept = kept_widths(model, bits, plans)
    per_tensor = _per_tensor(base, kept)
    description = frozen_config(config, uniform, plan_maps, kept, per_tensor)
    hf_config = type(base.config).from_dict(base.config.to_dict())
    if head_bits is not None:
        head_name = next(n for n, m in base.named_modules() if m is base.get_output_embeddings())
        description.frozen["head"] = {"module": head_name, "bits": head_bits, "group_size": HEAD_GROUP_SIZE}
        hf_config.tie_word_embeddings = False
    metadata = format_record(types.SimpleNamespace(config=types.SimpleNamespace(quantization_config=description)))
    folder = os.fspath(save_directory)
    with staged_folder(folder) as staging:
        weight_map = _write_tensors(model, staging, kept, metadata, head_bits)
        _write_index(staging, weight_map)
        hf_config.quantization_config = description.to_dict()
        hf_config.dtype = base.dtype
        hf_config.save_pretrained(staging)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(staging)
    logger.info("QuEPT: froze %d linear layers into %s, one block at a time (bits %s, plans %s)", len(kept), folder,
                uniform, sorted(plan_maps))  # fmt: skip
    return folder


def _write_tensors(
    model: nn.Module, folder: str, kept: dict[str, list[int]], metadata: dict, head_bits: int | None
) -> dict[str, str]:
    """One shard per block (loaded, frozen, written, let go), then one for the rest; returns the weight map."""
    base = unwrap(model)
    names = {id(m): n for n, m in base.named_modules()}
    chains = architecture_for(base).chains(base, base.config.quantization_config.quantize_vision_tower)
    blocks = [b for chain in chains for b in chain.blocks]
    block_names = [names[id(b)] for b in blocks]
    kept_prefixes = tuple(m + "." for m in kept)
    shards = [f"model-{i + 1:05d}-of-{len(blocks) + 1:05d}.safetensors" for i in range(len(blocks) + 1)]
    weight_map: dict[str, str] = {}
    for block, name, shard in tqdm(zip(blocks, block_names, shards, strict=False), total=len(blocks),
                                   desc="QuEPT freeze (streamed)", unit="block"):  # fmt: skip
        with onloaded(block, "cpu") if has_offloaded(block) else contextlib.nullcontext():
            modules = [m for m in kept if m.startswith(name + ".")]
            state = {**_other_tensors(block, name + ".", kept_prefixes), **_frozen_layers(model, modules, kept)}
            _write_shard(folder, shard, state, metadata)
        weight_map.update(dict.fromkeys(state, shard))
    rest = _rest(model, base, kept, block_names, kept_prefixes, head_bits)
    _write_shard(folder, shards[-1], rest, metadata)
    weight_map.update(dict.fromkeys(rest, shards[-1]))
    return weight_map


def _rest(
    model: nn.Module,
    base: nn.Module,
    kept: dict[str, list[int]],
    block_names: list[str],
    kept_prefixes: tuple[str, ...],
    head_bits: int | None,
) -> dict[str, torch.Tensor]:
    """Tensors outside every block (embeddings, final norm, head; elastic layers there too), offloaded ones read
    one at a time from where accelerate keeps them."""
    inside = tuple(n + "." for n in block_names)
    state = {}
    for key, tensor in base.state_dict().items():
        name = _plain_name(key)
        if key.startswith(inside) or name is None or name.startswith(kept_prefixes):
            continue
        state[name] = stored_tensor(base, key) if tensor.device.type == "meta" else tensor
    outside = [m for m in kept if not m.startswith(inside)]
    for module in outside:
        layer = base.get_submodule(module)
        with onloaded(layer, "cpu") if has_offloaded(layer) else contextlib.nullcontext():
            state.update(_frozen_layers(model, [module], kept))
    if head_bits is not None:
        head = base.get_output_embeddings()
        with onloaded(head, "cpu") if has_offloaded(head) else contextlib.nullcontext():
            head_name, head_state = _head_tensors(base, head_bits)
        state = {k: v for k, v in state.items() if not k.startswith(head_name + ".")} | head_state
    return state


def _write_index(folder: str, weight_map: dict[str, str]) -> None:
    sizes = {}
    for shard in set(weight_map.values()):
        sizes[shard] = os.path.getsize(os.path.join(folder, shard))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)

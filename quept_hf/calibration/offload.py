"""Work on a model dispatched by accelerate (``device_map=...``, ``offload_folder=...``) one unit at a time.

transformers dispatches a model with accelerate: every module of an offloaded ``device_map`` entry (a *unit*, e.g.
``model.layers.7``) keeps meta tensors, and an ``AlignDevicesHook`` fetches their values from its ``weights_map``
(an `accelerate.utils.OffloadedWeightsLoader`: CPU tensors, the checkpoint's safetensors, or ``.dat`` memmaps in
the offload folder) around each forward. quept_hf changes tensors accelerate knows nothing of: per-bit clipping
logits and MB-CLoRA slices appear after loading, PEFT renames ``q_proj.weight`` to ``q_proj.base_layer.weight``,
and calibration rewrites float weights (smoothing) and learned tensors. This module keeps accelerate's machinery
and its storage, and only adds what those changes need:

- `prepare`: one hook per unit (``place_submodules=True``: a unit loads as a whole, so the clipping dicts and
  adapter slices come with their layer), every tensor under its current name in the unit's ``weights_map``
  (renamed ones as aliases of the stored entry, new ones written), and the QuEPT weight caches dropped after
  each forward (they would keep every block's weights alive).
- `onloaded`: a module's units on the compute device for a while; on exit what changed (or is new) is written
  back where the unit lives (``offload_weight`` into the offload folder for disk, the loader's CPU state dict for
  CPU offload), then the tensors go back to meta.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    has_offloaded_params,
    named_module_tensors,
    offload_weight,
    set_module_tensor_to_device,
)
from torch import nn

from ..nn import QuEPTLinear

logger = logging.getLogger(__name__)

__all__ = [
    "ActivationStore",
    "each_onloaded",
    "has_offloaded",
    "holds",
    "is_offloaded",
    "loaded_on_cpu",
    "offloaded_units",
    "onloaded",
    "prepare",
    "replay",
    "resident_device",
    "stored_tensor",
]


def offloaded_units(model: nn.Module) -> dict[str, nn.Module]:
    """The ``hf_device_map`` entries of ``model`` whose tensors accelerate offloads (CPU or disk), by name."""
    units = {}
    for name in getattr(model, "hf_device_map", None) or {}:
        module = model.get_submodule(name) if name else model
        if any(has_offloaded_params(m) for m in module.modules()):
            units[name] = module
    return units


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate offloads some of the model's weights (a dispatched model)."""
    return bool(offloaded_units(model))


def has_offloaded(module: nn.Module) -> bool:
    """Whether any tensor under ``module`` is offloaded (the module need not be a device_map entry)."""
    return any(has_offloaded_params(m) for m in module.modules())


def resident_device(model: nn.Module) -> torch.device:
    """Where the model's resident (not offloaded) tensors are: what inputs are moved to (CPU when none)."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


# ------------------------------------------------------------------------------------------- storage


def _loader(hook: AlignDevicesHook) -> tuple[object, str]:
    """``(storage, key prefix)`` of a hook's weights_map (a PrefixedDataset over the loader, or a plain dict)."""
    weights = hook.weights_map
    if isinstance(weights, PrefixedDataset):
        return weights.dataset, weights.prefix
    return weights, ""


def _stored(loader: object, key: str) -> bool:
    """Without reading the tensor (``key in loader`` would load it from disk)."""
    if isinstance(loader, OffloadedWeightsLoader):
        return key in loader.state_dict or key in loader.index
    return key in loader


def _store(loader: object, key: str, tensor: torch.Tensor) -> None:
    """Write ``tensor`` where the loader keeps ``key``: disk entries (and new keys of a loader with an offload
    folder) as accelerate's ``.dat`` memmaps, CPU entries in its state dict."""
    value = tensor.detach().to("cpu")
    if not isinstance(loader, OffloadedWeightsLoader):
        loader[key] = value
        return
    if key in loader.state_dict or (key not in loader.index and loader.save_folder is None):
        loader.state_dict[key] = value
    elif loader.save_folder is None:
        raise ValueError(
            f"QuEPT must write {key} of a disk-offloaded layer but accelerate has no offload folder: "
            "pass offload_folder=... to from_pretrained"
        )
    else:
        offload_weight(value, key, loader.save_folder, loader.index)
    if key not in loader.all_keys:
        loader.all_keys.append(key)


def _dat(loader: OffloadedWeightsLoader, key: str) -> str:
    return os.path.join(loader.save_folder, f"{key}.dat")


def _alias(loader: object, key: str, source: str) -> bool:
    """Make ``key`` read what ``source`` holds (PEFT's ``.base_layer`` renames) without copying: a safetensors entry
    gets a second name, a ``.dat`` memmap (named after its key) moves to the new name; False when ``source`` is not
    stored either."""
    if not _stored(loader, source):
        return False
    if isinstance(loader, OffloadedWeightsLoader) and source in loader.index and source not in loader.state_dict:
        entry = loader.index[source]
        if entry.get("safetensors_file") is not None:
            loader.index[key] = {"weight_name": source, **entry}
            loader.all_keys.append(key)
        else:  # a .dat memmap is named after its key: the file moves to the new name
            os.replace(_dat(loader, source), _dat(loader, key))
            loader.index[key] = loader.index.pop(source)
            loader.all_keys[loader.all_keys.index(source)] = key
        return True
    _store(loader, key, loader[source])
    return True


def _tensors(unit: nn.Module, hook: AlignDevicesHook) -> list[tuple[str, torch.Tensor]]:
    return list(
        named_module_tensors(
            unit, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
        )
    )


def _mark(tensor: torch.Tensor) -> tuple[int, int]:
    """In-place version counter and storage address: both unchanged means the values are unchanged."""
    return tensor._version, tensor.data_ptr()


# ------------------------------------------------------------------------------------------ loading


def _offloading_hooks(module: nn.Module) -> list[tuple[nn.Module, AlignDevicesHook]]:
    return [(m, m._hf_hook) for m in module.modules() if has_offloaded_params(m)]


def _load(unit: nn.Module, hook: AlignDevicesHook, device: torch.device) -> dict[str, tuple[int, int] | None]:
    """Put the unit's stored tensors on ``device``; returns their marks (None: not stored yet, e.g. still meta)."""
    loader, prefix = _loader(hook)
    marks = {}
    for name, tensor in _tensors(unit, hook):
        if _stored(loader, prefix + name) or _renamed(loader, prefix + name, tensor):
            set_module_tensor_to_device(unit, name, device, value=loader[prefix + name])
        elif tensor.device.type != "meta":
            set_module_tensor_to_device(unit, name, device)
        else:
            marks[name] = None
            continue
        marks[name] = None if not _stored(loader, prefix + name) else _mark(_get(unit, name))
    return marks


def _renamed(loader: object, key: str, tensor: torch.Tensor) -> bool:
    """A meta tensor PEFT renamed (``q_proj.weight`` -> ``q_proj.base_layer.weight``): store it under its new name
    as an alias of the old entry; False when neither name is stored."""
    return tensor.device.type == "meta" and _alias(loader, key, key.replace(".base_layer", ""))


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _write_back(unit: nn.Module, hook: AlignDevicesHook, marks: dict) -> int:
    """Store every tensor that changed since `_load` or was not stored; returns how many."""
    loader, prefix = _loader(hook)
    written = 0
    for name, tensor in _tensors(unit, hook):
        if tensor.device.type == "meta":
            if not _stored(loader, prefix + name):
                raise RuntimeError(f"QuEPT: {prefix + name} of an offloaded layer has no value (still on meta)")
            continue
        if marks.get(name) is None or marks[name] != _mark(tensor):
            _store(loader, prefix + name, tensor)
            written += 1
    return written


def _unload(unit: nn.Module, hook: AlignDevicesHook) -> None:
    for name, _ in _tensors(unit, hook):
        set_module_tensor_to_device(unit, name, "meta")
    drop_weight_caches(unit)


def stored_tensor(model: nn.Module, key: str) -> torch.Tensor | None:
    """The stored value of an offloaded tensor ``key`` of ``model`` (state-dict naming), read on its own; None when
    no offloaded unit holds it."""
    for name, unit in offloaded_units(model).items():
        prefix = f"{name}." if name else ""
        if key.startswith(prefix) and isinstance(getattr(unit, "_hf_hook", None), AlignDevicesHook):
            loader, _ = _loader(unit._hf_hook)
            if _stored(loader, key):
                return loader[key]
    return None


def holds(module: nn.Module, name: str) -> bool:
    """Whether accelerate keeps a value for ``module``'s offloaded tensor ``name`` (e.g. ``"clip_upper.4"``):
    loading a checkpoint with ``device_map`` puts offloaded tensors there, never in the (meta) parameter."""
    hook = getattr(module, "_hf_hook", None)
    if not isinstance(hook, AlignDevicesHook) or hook.weights_map is None:
        return False
    loader, prefix = _loader(hook)
    return _stored(loader, prefix + name)


def drop_weight_caches(module: nn.Module) -> None:
    """QuEPTLinear caches its quantized (or float) weight: on an offloaded layer that would pin its weights."""
    for layer in module.modules():
        if isinstance(layer, QuEPTLinear):
            layer._cache = None


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device | str) -> Iterator[None]:
    """``module``'s offloaded tensors on ``device`` inside the block; on a normal exit every tensor that changed
    (or was created) is written back to the unit's storage. Then they are offloaded again (meta)."""
    hooks = _offloading_hooks(module)
    device = torch.device(device)
    loaded = []
    try:
        for unit, hook in hooks:
            loaded.append((unit, hook, _load(unit, hook, device), hook.execution_device))
            # While loaded, the unit's forward must use (and train) these tensors, not fetch fresh ones.
            hook.offload, hook.execution_device = False, device
        yield
        written = sum(_write_back(unit, hook, marks) for unit, hook, marks, _ in loaded)
        logger.debug("offloaded %s: %d tensors written back", type(module).__name__, written)
    finally:
        for unit, hook, _, execution_device in loaded:
            hook.offload, hook.execution_device = True, execution_device
            _unload(unit, hook)


# ---------------------------------------------------------------------------------------- preparing


class _UnitHook(AlignDevicesHook):
    """accelerate's hook over a whole unit; after offloading it again, it also drops the QuEPT weight caches that
    would still reference the unit's weights."""

    def post_forward(self, module: nn.Module, output):
        output = super().post_forward(module, output)
        drop_weight_caches(module)
        return output


def _init_missing(unit: nn.Module) -> None:
    """Tensors a freshly dispatched QuEPT model lacks: clipping logits of offloaded layers (left on meta by
    ``reset_clipping`` after loading) get their initial values, on the device of the now loaded weight."""
    for layer in unit.modules():
        if isinstance(layer, QuEPTLinear) and any(
            p.device.type == "meta" for d in (layer.clip_upper, layer.clip_lower, layer.clip_act) for p in d.values()
        ):
            layer.reset_clipping()


def _sync(name: str, unit: nn.Module, hook: AlignDevicesHook, init: Callable[[nn.Module], None]) -> None:
    """Every tensor of the unit stored under its current name: aliases for renamed ones, values for new ones."""
    loader, _ = _loader(hook)
    prefix = f"{name}." if name else ""
    missing = False
    for tname, tensor in named_module_tensors(unit, include_buffers=hook.offload_buffers, recurse=True):
        key = prefix + tname
        if _stored(loader, key):
            continue
        if tensor.device.type != "meta":
            _store(loader, key, tensor)
        elif not _renamed(loader, key, tensor):
            missing = True
    if missing:
        single = _unit_hook(unit, loader, prefix, hook)
        marks = _load(unit, single, torch.device("cpu"))
        try:
            init(unit)
            _write_back(unit, single, marks)
        finally:
            _unload(unit, single)


def _unit_hook(unit: nn.Module, loader: object, prefix: str, like: AlignDevicesHook) -> AlignDevicesHook:
    return _UnitHook(
        execution_device=like.execution_device,
        offload=True,
        io_same_device=False,
        weights_map=PrefixedDataset(loader, prefix),
        offload_buffers=like.offload_buffers,
        place_submodules=True,
        skip_keys=like.skip_keys,
        tied_params_map=like.tied_params_map,
    )


def prepare(model: nn.Module, init: Callable[[nn.Module], None] = _init_missing) -> dict[str, nn.Module]:
    """Make every offloaded unit of ``model`` load and offload as a whole, with every tensor stored (see the
    module docstring); ``init(unit)`` creates tensors that are on meta and stored nowhere, with the unit loaded
    on the CPU. Idempotent: call it again after adding tensors (adapters). Returns the units by name."""
    units = offloaded_units(model)
    for name, unit in units.items():
        hooks = _offloading_hooks(unit)
        first = hooks[0][1]
        _sync(name, unit, first, init)
        if len(hooks) == 1 and isinstance(first, _UnitHook) and hooks[0][0] is unit:
            continue
        single = _unit_hook(unit, _loader(first)[0], f"{name}." if name else "", first)
        for module in unit.modules():
            remove_hook_from_module(module)
        add_hook_to_module(unit, single)
    if units:
        logger.info("QuEPT: %d offloaded units, each loaded whole and one at a time (%s, ...)", len(units),
                    next(iter(units)))  # fmt: skip
    return units


@contextlib.contextmanager
def loaded_on_cpu(*modules: nn.Module) -> Iterator[None]:
    """The offloaded ones of ``modules`` loaded on the CPU together inside the block (`onloaded`: what changed is
    written back on exit); resident modules are used as they are."""
    with contextlib.ExitStack() as stack:
        for module in {id(m): m for m in modules}.values():
            if has_offloaded(module):
                stack.enter_context(onloaded(module, "cpu"))
        yield


def replay(model: nn.Module, kind: type, fn: Callable[[nn.Module], None]) -> None:
    """Call ``fn(layer)`` for every ``kind`` module in module order, each with its offloaded unit loaded on the
    CPU: re-running a seeded initialiser this way gives the values an in-memory model gets."""
    for layer in each_onloaded(model, [m for m in model.modules() if isinstance(m, kind)]):
        fn(layer)


def each_onloaded(model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[nn.Module]:
    """Yield each of ``modules`` with its offloaded unit loaded on the CPU (consecutive modules of one unit share
    one load; what they change is written back when the generator moves past the unit)."""
    units = offloaded_units(model)
    owner = {id(m): name for name, unit in units.items() for m in unit.modules()}
    for unit, members in itertools.groupby(modules, key=lambda module: owner.get(id(module))):
        with onloaded(units[unit], "cpu") if unit is not None else contextlib.nullcontext():
            yield from members


# -------------------------------------------------------------------------------------- activations


class ActivationStore:
    """Where calibration keeps its ``num_samples x seq_len x hidden`` tensors: in RAM (``folder=None``) or as
    memory-mapped files in ``folder`` (``QuEPTConfig(activations_dir=...)``), which the kernel pages out as needed.

    A file is unlinked as soon as it is mapped: its space is freed when the last tensor viewing it goes."""

    def __init__(self, folder: str | None = None):
        self.folder = folder
        self._count = 0
        if folder is not None:
            os.makedirs(folder, exist_ok=True)

    def stack(self, chunks: Iterable[torch.Tensor], rows: int) -> torch.Tensor:
        """``torch.cat(chunks)`` (``rows`` in all) without holding it in RAM when on disk."""
        if self.folder is None:
            return torch.cat(list(chunks))
        out, start = None, 0
        for chunk in chunks:
            if out is None:
                out = self._empty((rows, *chunk.shape[1:]), chunk.dtype)
            out[start : start + len(chunk)] = chunk
            start += len(chunk)
        return out

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself in RAM mode, else a memory-mapped copy."""
        return tensor if self.folder is None else self.stack([tensor], len(tensor))

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self._count += 1
        path = os.path.join(self.folder, f"quept-activations-{os.getpid()}-{self._count}.bin")
        numel = math.prod(shape)
        tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
        os.unlink(path)
        return tensor

"""Saving and publishing a QuEPT model: `save_pretrained` and `push_to_hub`, the model's own methods routed here.

    quept_hf.save_pretrained(model, "out")        # == model.save_pretrained("out") for a QuEPT model
    quept_hf.push_to_hub(model, "me/smollm2-quept")

An elastic model with MB-CLoRA adapters is saved as ONE folder that ``from_pretrained`` restores with every
bit-width (the layout is described in `quept_hf.serialization`): the base model written by transformers' own
``save_pretrained``, the adapter as PEFT writes it, the sensitivity table, ``quept_manifest.json`` and the model
card (`quept_hf.hub`), staged and swapped in whole. Without adapters (not calibrated yet, merged, frozen) it is
transformers' ``save_pretrained`` plus the metadata and the card.

Why the model's own methods are routed here (quept_hf.compat lists every such override): with adapters attached,
transformers' ``save_pretrained`` writes the adapter only, and its ``push_to_hub`` overwrites the model card; no
public hook changes either. `install` (called by the quantizer after loading, and when MB-CLoRA is injected)
makes ``model.save_pretrained`` / ``push_to_hub`` these functions and ``load_adapter`` a checked one.

The tensors transformers writes come from the quantizer's public ``get_state_dict_and_metadata`` hook, which
answers the adapter-free state dict of a save in progress (`quept_hf.serialization.saving_state_dict`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Iterator

import torch
from accelerate.utils import set_module_tensor_to_device
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from .calibration.memory import available_memory
from .calibration.offload import is_offloaded, offloaded_units, prepare, stored_tensor
from .compat import cached_file_or_none, override_method, record_weight_conversions, saving_whole_model, unwrap
from .config import quept_config
from .hub import stamp_metadata, write_card_files
from .inspection import base_state_dict, elastic_adapter
from .mbclora.model import INJECTION_HOOKS, check_slices_loaded, slice_checkpoint_name
from .mixed_precision import SENSITIVITY_NAME, save_sensitivity
from .serialization import (
    MANIFEST_NAME,
    adapter_state_dict,
    check_adapter_format,
    check_adapter_source,
    saving_state_dict,
    staged_save,
    write_adapter,
)
from .switch import check_plans

__all__ = ["check_pushable", "install", "push_to_hub", "save_pretrained"]

# Hub arguments of ``save_pretrained(push_to_hub=True, ...)`` that go to ``push_to_hub`` instead.
_HUB_ARGS = (
    "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags", "allow_uncalibrated",
)  # fmt: skip
# transformers' ``save_pretrained`` parameters after ``save_directory``, in order (for positional calls).
_SAVE_PRETRAINED_POSITIONAL = ("is_main_process", "state_dict", "push_to_hub", "max_shard_size", "variant", "token")
# Remote files a push replaces as a whole: left over from an earlier push (other sharding, adapters since merged),
# they would be loaded together with the new ones. Files of the new upload are overwritten, not deleted.
REPLACED_FILES = (
    "model*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "adapter_config.json",
    "quality_vs_bits.png", SENSITIVITY_NAME, MANIFEST_NAME,
)  # fmt: skip
ALLOW_UNCALIBRATED_ENV = "QUEPT_ALLOW_UNCALIBRATED"

# The Hub repo id that `push_to_hub` is uploading to, so the adapter config can name it.
_PUSHING_TO: contextvars.ContextVar[str | None] = contextvars.ContextVar("quept_pushing_to", default=None)


# -------------------------------------------------------------------------------------------- saving


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args, **kwargs) -> None:
    """Save a QuEPT model (a transformers model or a ``peft.PeftModel`` of one) so ``from_pretrained`` restores it.

    With MB-CLoRA adapters attached: the whole elastic model, every bit-width (`save_elastic`); without: the
    model as transformers saves it. Both add the bit-switch metadata, the sensitivity table and the model card.
    Arguments as transformers' ``save_pretrained`` (``max_shard_size``, ``push_to_hub=True`` + hub arguments,
    ...)."""
    kwargs.update(zip(_SAVE_PRETRAINED_POSITIONAL, args, strict=False))
    if elastic_adapter(model) is None:
        return _save_plain(unwrap(model), save_directory, **kwargs)
    return save_elastic(model, save_directory, **kwargs)


def save_elastic(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    **kwargs,
) -> None:
    """Save a QuEPT model and its elastic MB-CLoRA adapter as one folder (see `quept_hf.serialization`).

    Args:
        model: a transformers model carrying MB-CLoRA adapters, or a ``peft.PeftModel`` wrapping one.
        save_directory: folder to write; created if needed.
        is_main_process, state_dict: as in transformers' ``save_pretrained`` (``state_dict`` in the model's own
            naming, adapter tensors included).
        base_model_name_or_path: written to ``adapter_config.json``; default: the Hub repo id when pushing, else
            ``save_directory``.
        kwargs: passed on to transformers' ``save_pretrained`` (``max_shard_size``, ``variant``, ...), except
            ``push_to_hub=True``, which also uploads the folder's content (``repo_id`` and the hub arguments as
            transformers takes them) through `push_to_hub`.
    """
    base = unwrap(model)
    found = elastic_adapter(base)
    if found is None:
        raise ValueError(f"{type(base).__name__} carries no MB-CLoRA adapter: use its save_pretrained")
    adapter_name, config = found
    save_directory = os.fspath(save_directory)
    push, hub_args = _hub_arguments(kwargs, save_directory)
    full = _read_offloaded(base, dict(base.state_dict() if state_dict is None else state_dict))
    to_save = base_state_dict(base, full)
    stamp_metadata(base)
    with staged_save(save_directory, is_main_process) as folder:
        with saving_whole_model(base), saving_state_dict(to_save):
            type(base).save_pretrained(base, folder, is_main_process=is_main_process, state_dict=to_save, **kwargs)
        if is_main_process:
            target = base_model_name_or_path or _PUSHING_TO.get() or save_directory
            write_adapter(base, adapter_name, config, folder, adapter_state_dict(base, adapter_name, full), target)
            _write_extras(base, folder, save_directory)
    if push:
        push_to_hub(base, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_args)


def _read_offloaded(base: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every offloaded (meta) tensor read back from where accelerate keeps it.

    transformers' own save looks an offloaded tensor up by the model's name for it, which the elastic format
    renames (no ``base_layer``), so the tensors are read here, all of them: a MemoryError says so up front when they
    do not fit (`save_frozen` writes the frozen model one block at a time instead)."""
    offloaded = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]
    if not offloaded:
        return state
    needed = sum(state[k].numel() * state[k].element_size() for k in offloaded)
    free = available_memory(torch.device("cpu"))
    if free is not None and needed > free:
        raise MemoryError(
            f"save_pretrained: the model's offloaded tensors ({needed / 2**30:.2f} GiB) are read back to write the "
            f"elastic checkpoint, but {free / 2**30:.2f} GiB of RAM is free; keep the calibration with "
            "QuEPTConfig(checkpoint_dir=...) and write the frozen model block by block with "
            "quept_hf.packing.stream.save_frozen"
        )
    for key in offloaded:
        value = stored_tensor(base, key)
        if value is None:
            raise ValueError(f"save_pretrained: {key} is offloaded (meta), but no accelerate hook holds its value")
        state[key] = value
    return state


def _save_plain(model: nn.Module, save_directory: str | os.PathLike, **kwargs):
    """transformers' ``save_pretrained`` plus metadata, sensitivity table and card; a push goes through
    `push_to_hub` (transformers' would skip its checks and overwrite the card)."""
    push, hub_args = _hub_arguments(kwargs, save_directory)
    stamp_metadata(model)
    is_main_process = kwargs.get("is_main_process", True)
    with staged_save(save_directory, is_main_process) as folder:
        result = type(model).save_pretrained(model, folder, **kwargs)
        if is_main_process:
            _write_extras(model, folder, save_directory)
    if push:
        push_to_hub(model, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_args)
    return result


def _hub_arguments(kwargs: dict, save_directory: str | os.PathLike) -> tuple[bool, dict]:
    """Take ``push_to_hub`` and the hub arguments out of ``save_pretrained``'s ``kwargs``: whether to push, and
    `push_to_hub`'s arguments (``repo_id`` defaults to the folder's name, as in transformers)."""
    push = kwargs.pop("push_to_hub", False)
    hub_args = {name: kwargs.pop(name) for name in _HUB_ARGS if name in kwargs}
    hub_args["repo_id"] = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
    return push, hub_args


def _write_extras(model: nn.Module, folder: str, save_directory: str | os.PathLike) -> None:
    """Next to the weights: the sensitivity table the model carries (so new plans need no new measurement after
    ``from_pretrained``) and README.md + quality plot, naming the folder the save ends up in."""
    save_sensitivity(model, folder)
    write_card_files(model, folder, repo_id=os.fspath(save_directory))


# ---------------------------------------------------------------------------------------------------- push


def check_pushable(model: nn.Module, repo_id: str, allow_uncalibrated: bool | None = None) -> None:
    """Refuse to publish an uncalibrated model (its adapters and clipping are untrained) unless asked to."""
    config = quept_config(model)
    if config.calibrated:
        return
    if allow_uncalibrated is None:
        allow_uncalibrated = os.environ.get(ALLOW_UNCALIBRATED_ENV, "").lower() in ("1", "true", "yes")
    if not allow_uncalibrated:
        raise ValueError(
            f"Refusing to push an uncalibrated QuEPT model to {repo_id!r}: its per-bit clipping and MB-CLoRA "
            "adapters are untrained, so its low bit-widths are far worse than QuEPT's. Run "
            "quept_hf.calibrate(model, data) first, or pass allow_uncalibrated=True (or set "
            f"{ALLOW_UNCALIBRATED_ENV}=1) to publish it anyway."
        )


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    allow_uncalibrated: bool | None = None,
):
    """Upload the whole elastic model (weights, every adapter, metadata, card, plot) in one commit.

    transformers' ``push_to_hub`` saves into a temporary folder and then overwrites ``README.md`` with the card
    already on the Hub (or a generic one): the metadata of a re-push would go stale. This does the same steps
    (create the repo, save, upload the folder in one commit) with our card and plot, refuses an uncalibrated model
    unless asked, names the repo in ``adapter_config.json`` (so ``from_pretrained(repo_id)`` loads the base from
    it), and deletes the weight files an earlier push left that this one does not replace (`REPLACED_FILES`).

    ``model.push_to_hub(...)`` of a QuEPT model comes here; a ``peft.PeftModel`` given here is pushed whole (its
    own ``push_to_hub`` uploads the adapter only, as PEFT does). Arguments as transformers' ``push_to_hub``, plus
    ``allow_uncalibrated`` (see `check_pushable`). Returns the ``CommitInfo``.
    """
    from transformers.utils.hub import hf_api

    base = unwrap(model)
    check_pushable(base, repo_id, allow_uncalibrated)  # before the repo exists: a refused push leaves nothing
    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    existing = _remote_card(repo_id, token)
    tags = [*(getattr(base, "model_tags", None) or []), *(tags or [])]
    with _pushing_to(repo_id), tempfile.TemporaryDirectory() as folder:
        stamp_metadata(base)
        if elastic_adapter(base) is not None:
            save_elastic(base, folder, max_shard_size=max_shard_size)
        else:
            base.save_pretrained(folder, max_shard_size=max_shard_size)
        write_card_files(base, folder, repo_id=repo_id, existing=existing, tags=tags, lookup_hub=True)
        return hf_api().upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload elastic QuEPT model",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=list(REPLACED_FILES),
        )


@contextlib.contextmanager
def _pushing_to(repo_id: str) -> Iterator[None]:
    """While uploading to ``repo_id``, saves name it in ``adapter_config.json`` (see `save_elastic`)."""
    token = _PUSHING_TO.set(repo_id)
    try:
        yield
    finally:
        _PUSHING_TO.reset(token)


def _remote_card(repo_id: str, token: bool | str | None) -> ModelCard | None:
    try:
        return ModelCard.load(repo_id, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None


# ------------------------------------------------------------------------------------------ the model's methods


def install(model: nn.Module) -> None:
    """Route a transformers QuEPT model's ``save_pretrained`` / ``push_to_hub`` here and check ``load_adapter``
    (instance attributes through `quept_hf.compat.override_method`; idempotent; a ``deepcopy`` keeps them bound
    to the copy).

    Called by the quantizer after loading, so even a model without adapters yet gets the checks and the card, and
    when MB-CLoRA is injected (`INJECTION_HOOKS`). Before any adapter is loaded it also records the model's own
    weight conversions, which transformers' ``load_adapter`` replaces by the adapter's."""
    record_weight_conversions(model)
    override_method(model, "save_pretrained", save_pretrained)
    override_method(model, "push_to_hub", push_to_hub)
    override_method(model, "load_adapter", _checked_load_adapter)


def _checked_load_adapter(self, *args, **kwargs):
    """transformers' ``load_adapter``, refusing what would load a wrong model: a quept_hf folder without its
    config.json (the base would come from elsewhere), an ``adapter_config.json`` edited after saving, and any
    MB-CLoRA slice the checkpoint lacked (transformers only warns)."""
    source = args[0] if args else kwargs.get("peft_model_id")
    check_adapter_source(source)
    info = type(self).load_adapter(self, *args, **kwargs)
    found = elastic_adapter(self)
    if found is not None and info is not None:
        check_slices_loaded(getattr(info, "missing_keys", ()), found[1], found[0])
    if found is not None and is_offloaded(unwrap(self)):
        _store_offloaded_slices(self, source, found[0], kwargs.get("revision"))
    if found is not None:
        check_adapter_format(source, found[1], getattr(self.config, "_commit_hash", None))
        check_plans(self)
    return info


def _store_offloaded_slices(model: nn.Module, source: str | os.PathLike, adapter_name: str, revision) -> None:
    """The MB-CLoRA slices of offloaded layers, read from the adapter file into accelerate's storage, one unit at
    a time. transformers' ``load_adapter`` of a dispatched model leaves them on meta with no value anywhere
    (copying into a meta tensor does nothing, silently), so the model would run with untrained adapters."""
    base = unwrap(model)
    source = os.fspath(source)
    path = os.path.join(source, ADAPTER_WEIGHTS_NAME) if os.path.isdir(source) else None
    path = path or cached_file_or_none(source, ADAPTER_WEIGHTS_NAME, revision)
    if path is None or not os.path.isfile(path):
        raise ValueError(f"{source!r}: the adapter of an offloaded model is read from its {ADAPTER_WEIGHTS_NAME}, "
                         "which is not there")  # fmt: skip
    names = {id(unit): name for name, unit in offloaded_units(base).items()}
    with safe_open(path, framework="pt") as stored:
        keys = set(stored.keys())
        wanted = {key: slice_checkpoint_name(key, adapter_name) for key, p in base.named_parameters() if p.is_meta}
        missing = [key for key, file_key in wanted.items() if file_key is not None and file_key not in keys]
        check_slices_loaded(missing, elastic_adapter(model)[1], adapter_name)

        def from_file(unit: nn.Module) -> None:  # the unit is loaded on the CPU; its new slices are still meta
            for name, param in list(unit.named_parameters()):
                file_key = slice_checkpoint_name(f"{names[id(unit)]}.{name}", adapter_name)
                if file_key is not None and param.is_meta:
                    set_module_tensor_to_device(unit, name, "cpu", value=stored.get_tensor(file_key))

        prepare(base, init=from_file)  # stores what from_file put in, unit by unit


INJECTION_HOOKS.append(install)

"""Saving an elastic QuEPT model WITH its MB-CLoRA adapters as one folder that ``from_pretrained`` restores.

Why this module exists
----------------------
Once adapters are attached through transformers' PEFT integration (``model.add_adapter`` / ``load_adapter``,
i.e. ``model._hf_peft_config_loaded`` is set), transformers' ``save_pretrained`` writes ONLY the adapter: no
``config.json``, no base weights. Yet an elastic QuEPT model is worth nothing without its base weights and
per-bit clipping logits. Conversely, transformers' ``from_pretrained`` of a folder holding BOTH ``config.json``
and ``adapter_config.json`` loads the full model and then calls ``load_adapter`` on the same folder
(``transformers.integrations.peft.maybe_load_adapters``). So one folder with

* the base QuEPT model in transformers format: ``config.json`` (with ``quantization_config``), generation
  config and ``model.safetensors`` (sharded as transformers shards it), keys in the ORIGINAL module naming
  (``...q_proj.weight``, ``...q_proj.clip_upper.4``: the PEFT ``.base_layer`` level is stripped and the
  ``mbclora_`` tensors are left out), written by transformers' own ``save_pretrained``; and
* the elastic adapter in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``base_model.model.`` keys, exactly what ``peft.PeftModel.save_pretrained`` writes (so PEFT tooling reads it),

is restored, every bit-width included, by ``AutoModelForCausalLM.from_pretrained(folder)`` after
``import quept_hf``; ``model.set_adapter("w4")`` then switches. ``adapter_config.json`` names the folder (or,
when pushing, the Hub repo id) as ``base_model_name_or_path``: for a Hub repo id transformers replaces the
path to load by that value, which must therefore point back at the same repo.

Nothing silently wrong on load: a save is staged next to the folder and swapped in whole (`staged_save`), so a
killed save leaves the old folder and no stale shard survives; each tensor file's sha256 goes to
``quept_manifest.json`` and the digests of the config fields the tensors depend on to the safetensors metadata
(``quept_format``), both checked on load (`check_loaded_checkpoint`, `check_adapter_format`), as are a missing
adapter and a folder that lost its ``config.json`` (`check_adapter_source`).

`save_elastic` writes that folder; `install_elastic_save` makes a transformers model's own ``save_pretrained``
and ``push_to_hub`` use it while adapters are attached. ``peft.PeftModel.save_pretrained`` is untouched (it
writes the adapter only, as PEFT always does).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fnmatch
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write_text, file_sha256, staged_folder
from .config import QuEPTConfig
from .mbclora.config import MBCLoRAConfig
from .mbclora.layer import MBCLoRALayer

PEFT_KEY_PREFIX = "base_model.model."
# Hub arguments of ``save_pretrained(push_to_hub=True, ...)`` that go to ``push_to_hub`` instead.
_HUB_ARGS = (
    "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags", "allow_uncalibrated",
)  # fmt: skip

# transformers' ``save_pretrained`` parameters after ``save_directory``, in order (for positional calls).
_SAVE_PRETRAINED_POSITIONAL = ("is_main_process", "state_dict", "push_to_hub", "max_shard_size", "variant", "token")

# The sha256 of every tensor file of a save (safetensors has no checksum): a flipped byte loaded silently before.
MANIFEST_NAME = "quept_manifest.json"
DIGESTS_ENV = "QUEPT_FILE_DIGESTS"  # "0": neither write nor check them (huge models: one more read per file)
# What a save owns in its folder: weights of any format and sharding, their indexes, configs, the adapter, the
# quality plot, temporary files. A save over an existing folder replaces these as a whole; it keeps the rest.
MODEL_FILES = (
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "config.json",
    "generation_config.json", ADAPTER_CONFIG_NAME, "quality_vs_bits.png", MANIFEST_NAME, ".quept-*", ".*.tmp",
)  # fmt: skip

FORMAT_KEY = "quept_format"  # safetensors metadata: {field: digest} of the config fields the tensors depend on
BASE_KEY, BASE_IN_FOLDER = "quept_base", "same-folder"  # adapter metadata: the base weights sit next to it
ADAPTER_FORMAT_FIELDS = ("bit_groups", "ranks", "default_bits", "cascade", "target_modules")

_MISSING = object()
# Instance attribute holding the base model's own ``_weight_conversions`` (see `_saving_as_plain_model`).
_BASE_CONVERSIONS = "_quept_base_weight_conversions"

# The Hub repo id that `push_to_hub` is uploading to, so the adapter config can name it.
_PUSHING_TO: contextvars.ContextVar[str | None] = contextvars.ContextVar("quept_pushing_to", default=None)


# ----------------------------------------------------------------------------------------- inspection


def _unwrap(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _adapter_layers(model: nn.Module) -> dict[str, MBCLoRALayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MBCLoRALayer)}


def elastic_adapter(model: nn.Module) -> tuple[str, MBCLoRAConfig] | None:
    """``(name, config)`` of the model's elastic MB-CLoRA adapter, or ``None`` when it carries none."""
    model = _unwrap(model)
    if not _adapter_layers(model):
        return None
    configs = getattr(model, "peft_config", None) or {}
    roots = [(name, config) for name, config in dict.items(configs) if isinstance(config, MBCLoRAConfig)]
    if len(roots) != 1:
        raise ValueError(f"expected one elastic MB-CLoRA adapter on the model, found {[n for n, _ in roots]}")
    return roots[0]


def base_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict as if no adapter were attached: ``q_proj.base_layer.weight`` -> ``q_proj.weight``,
    ``mbclora_`` tensors dropped. ``state_dict`` defaults to ``model.state_dict()`` (same naming)."""
    model = _unwrap(model)
    state_dict = model.state_dict() if state_dict is None else state_dict
    wrapped = set(_adapter_layers(model))
    out = {}
    for key, value in state_dict.items():
        owner, rest = _split_at_owner(key, wrapped)
        if owner is None:
            out[key] = value
        elif rest.startswith("base_layer."):
            out[f"{owner}.{rest.removeprefix('base_layer.')}"] = value
        elif not rest.startswith(MBCLoRALayer.adapter_layer_names):
            out[key] = value
    return out


def _split_at_owner(key: str, owners: set[str]) -> tuple[str | None, str]:
    """``("a.q_proj", "base_layer.weight")`` for key ``a.q_proj.base_layer.weight`` when ``a.q_proj`` is an owner."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in owners:
            return prefix, ".".join(parts[cut:])
    return None, key


def adapter_state_dict(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter tensors with ``base_model.model.`` keys, exactly as ``PeftModel.save_pretrained`` writes them."""
    from peft import get_peft_model_state_dict

    model = _unwrap(model)
    tensors = get_peft_model_state_dict(model, state_dict, adapter_name=adapter_name, save_embedding_layers=False)
    return {PEFT_KEY_PREFIX + key: value.contiguous() for key, value in tensors.items()}


# -------------------------------------------------------------------------------------------- saving


def save_elastic(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    is_main_process: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
    push_to_hub: bool = False,
    base_model_name_or_path: str | None = None,
    **kwargs,
) -> None:
    """Save a QuEPT model and its elastic MB-CLoRA adapter as one folder (see the module docstring).

    Args:
        model: a transformers model carrying MB-CLoRA adapters, or a ``peft.PeftModel`` wrapping one.
        save_directory: folder to write; created if needed.
        is_main_process, state_dict: as in transformers' ``save_pretrained`` (``state_dict`` in the model's own
            naming, adapter tensors included).
        push_to_hub: also upload the folder's content (``repo_id`` etc. in ``kwargs``, as transformers takes them).
        base_model_name_or_path: written to ``adapter_config.json``; default: the Hub repo id when pushing, else
            ``save_directory``.
        kwargs: passed on to transformers' ``save_pretrained`` (``max_shard_size``, ``variant``, ...).
    """
    base = _unwrap(model)
    found = elastic_adapter(base)
    if found is None:
        raise ValueError(f"{type(base).__name__} carries no MB-CLoRA adapter: use its save_pretrained")
    adapter_name, config = found
    save_directory = os.fspath(save_directory)
    hub_args = {name: kwargs.pop(name) for name in _HUB_ARGS if name in kwargs}
    repo_id = kwargs.pop("repo_id", None)
    full = dict(base.state_dict() if state_dict is None else state_dict)

    to_save = base_state_dict(base, full)
    _stamp_metadata(base)
    with staged_save(save_directory, is_main_process) as folder:
        with _saving_as_plain_model(base, to_save):
            type(base).save_pretrained(base, folder, is_main_process=is_main_process, state_dict=to_save, **kwargs)
        if is_main_process:
            target = base_model_name_or_path or _PUSHING_TO.get() or save_directory
            _write_adapter(base, adapter_name, config, folder, adapter_state_dict(base, adapter_name, full), target)
            _write_sensitivity(base, folder)
            _write_card(base, folder, save_directory)
    if push_to_hub:
        repo_id = repo_id or os.path.basename(os.path.normpath(save_directory))
        _elastic_push_to_hub(base, repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_args)


@contextlib.contextmanager
def _saving_as_plain_model(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make transformers' ``save_pretrained`` write ``state_dict`` (the base model), not the adapter only.

    Three things steer it to the adapter-only path or away from a ``state_dict`` argument:

    * the ``_hf_peft_config_loaded`` flag: switched off;
    * the quantizer's ``get_state_dict_and_metadata`` hook, whose result replaces any ``state_dict`` argument (the
      base hook returns ``None``: "use model.state_dict()"): it answers ``state_dict`` (or its own state dict,
      renamed the same way, if it has one);
    * ``model._weight_conversions``, reverted on save to get the checkpoint's original key names: ``load_adapter``
      overwrites it with the ADAPTER's renamings (``base_model.model.`` prefix...), so the base model's own
      conversions, recorded by `install_elastic_save` before any adapter was loaded, are put back meanwhile.
    """
    peft_flag = getattr(model, "_hf_peft_config_loaded", False)
    conversions = vars(model).get("_weight_conversions", _MISSING)
    if _BASE_CONVERSIONS in vars(model):  # None: transformers then uses the class's default conversions
        model._weight_conversions = vars(model)[_BASE_CONVERSIONS]
    model._hf_peft_config_loaded = False
    try:
        with _quantizer_state_dict(model, state_dict):
            yield
    finally:
        model._hf_peft_config_loaded = peft_flag
        _set_or_delete(model, "_weight_conversions", conversions)


@contextlib.contextmanager
def _quantizer_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """While saving, the quantizer's ``get_state_dict_and_metadata`` (the public hook transformers asks for the
    tensors and the safetensors metadata) answers ``state_dict`` when given (or its own state dict, renamed as
    `base_state_dict` does) and adds the format digests (`FORMAT_KEY`) that loading checks config.json against."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        yield
        return
    shadowed = "get_state_dict_and_metadata" in vars(quantizer)
    previous = vars(quantizer).get("get_state_dict_and_metadata")
    original = quantizer.get_state_dict_and_metadata

    def with_format(target: nn.Module):
        own, metadata = original(target)
        if state_dict is not None:
            own = state_dict if own is None else base_state_dict(target, own)
        return own, {**(metadata or {}), **_format_metadata(_quept_fields(target))}

    quantizer.get_state_dict_and_metadata = with_format
    try:
        yield
    finally:
        if shadowed:
            quantizer.get_state_dict_and_metadata = previous
        else:
            del quantizer.get_state_dict_and_metadata


def _set_or_delete(model: nn.Module, name: str, value: object) -> None:
    if value is _MISSING:
        vars(model).pop(name, None)
    else:
        setattr(model, name, value)


def _write_adapter(
    model: nn.Module,
    adapter_name: str,
    config: MBCLoRAConfig,
    save_directory: str,
    tensors: dict[str, torch.Tensor],
    base_model_name_or_path: str,
) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` as PEFT writes them, each replaced atomically."""
    config = copy.deepcopy(config)
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:  # as PeftModel.save_pretrained does, for AutoPeftModel
        auto_mapping = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    os.makedirs(save_directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".quept-adapter-", dir=save_directory)
    try:
        metadata = {"format": "pt", BASE_KEY: BASE_IN_FOLDER, **_format_metadata(_adapter_fields(config))}
        save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata=metadata)
        config.save_pretrained(staging, auto_mapping_dict=auto_mapping)
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_sensitivity(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """The mixed-precision sensitivity table the model carries, if any, next to its weights (so new plans need
    no new measurement after ``from_pretrained``)."""
    from .mixed_precision import save_sensitivity

    save_sensitivity(model, save_directory)


def _stamp_metadata(model: nn.Module) -> None:
    """Bit-switch metadata into the QuEPTConfig before config.json is written (`quept_hf.hub.stamp_metadata`)."""
    from .hub import stamp_metadata

    stamp_metadata(model)


def _write_card(model: nn.Module, folder: str | os.PathLike, save_directory: str | os.PathLike) -> None:
    """README.md (+ quality plot) next to the weights in ``folder`` (`quept_hf.hub.write_card_files`), naming the
    folder the save ends up in."""
    from .hub import write_card_files

    write_card_files(model, folder, repo_id=os.fspath(save_directory))


@contextlib.contextmanager
def staged_save(save_directory: str | os.PathLike, is_main_process: bool = True) -> Iterator[str]:
    """The folder a save writes into: a staging sibling of ``save_directory`` swapped in when the save is complete.

    Saving over a folder in place mixed two saves when killed between transformers' weights and our adapter (new
    base, old adapter, loaded without error), and a re-save with other sharding left the old ``model.safetensors``,
    which loading prefers. Staged, the folder is wholly old or wholly new and holds no stale weight file; what the
    save does not own (tokenizer files, README.md, the user's files) is carried over (`MODEL_FILES`). Other
    processes of a distributed save write nothing and get ``save_directory`` itself."""
    if not is_main_process:
        yield os.fspath(save_directory)
        return
    with staged_folder(save_directory, carry=_carried) as folder:
        yield folder
        _write_manifest(folder)


def _carried(name: str) -> bool:
    return not any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILES)


@contextlib.contextmanager
def pushing_to(repo_id: str) -> Iterator[None]:
    """While uploading to ``repo_id``, saves name it in ``adapter_config.json`` (see `save_elastic`)."""
    token = _PUSHING_TO.set(repo_id)
    try:
        yield
    finally:
        _PUSHING_TO.reset(token)


# ------------------------------------------------------------------------- the transformers overrides


def _elastic_save_pretrained(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of a QuEPT model: with MB-CLoRA adapters attached, the whole elastic model.

    transformers' own ``save_pretrained`` writes only the adapter of a model with adapters attached, which for a
    QuEPT model would lose the base weights and per-bit clipping. While MB-CLoRA adapters are attached this
    writes the base model AND the adapter into one folder (`quept_hf.serialization.save_elastic`), which
    ``from_pretrained(folder)`` restores with every bit-width; without adapters (none attached, or after
    ``merge_and_unload``) it is transformers' ``save_pretrained`` (`_plain_save_pretrained`). Both add the
    bit-switch metadata and the model card (`quept_hf.hub`). Installed per instance by `install_elastic_save`
    when MB-CLoRA is injected into a transformers model, and by the quantizer after loading (`quept_hf.hub.install`).
    """
    kwargs.update(zip(_SAVE_PRETRAINED_POSITIONAL, args, strict=False))
    if elastic_adapter(self) is None:
        return _plain_save_pretrained(self, save_directory, **kwargs)
    return save_elastic(self, save_directory, **kwargs)


def _plain_save_pretrained(model: nn.Module, save_directory, push_to_hub: bool = False, **kwargs):
    """transformers' ``save_pretrained`` plus metadata, sensitivity table and card; a push goes through
    `quept_hf.hub.push_to_hub` (transformers' would skip its checks and overwrite the card)."""
    hub_args = {name: kwargs.pop(name) for name in (*_HUB_ARGS, "repo_id") if name in kwargs}
    _stamp_metadata(model)
    is_main_process = kwargs.get("is_main_process", True)
    with staged_save(save_directory, is_main_process) as folder, _quantizer_state_dict(model):
        result = type(model).save_pretrained(model, folder, **kwargs)
        if is_main_process:
            _write_sensitivity(model, folder)
            _write_card(model, folder, save_directory)
    if push_to_hub:
        repo_id = hub_args.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
        _elastic_push_to_hub(model, repo_id, max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_args)
    return result


def _elastic_push_to_hub(self, repo_id: str, **kwargs):
    """``push_to_hub`` of a QuEPT model: `quept_hf.hub.push_to_hub`.

    It saves the folder `save_elastic` writes (when adapters are attached) into a temporary folder under
    `pushing_to`, so ``adapter_config.json`` names the repo as ``base_model_name_or_path`` (which
    ``from_pretrained(repo_id)`` then loads the base model from), adds the model card and quality plot, and
    refuses an uncalibrated model unless ``allow_uncalibrated=True``.
    """
    from .hub import push_to_hub

    return push_to_hub(self, repo_id, **kwargs)


class _BoundOverride:
    """``function`` bound to ``model``, like a method, but picklable (``torch.save(model)``) and deep-copyable
    with its model (a ``types.MethodType`` instance attribute would pickle as ``getattr(model, function name)``)."""

    def __init__(self, function: Callable, model: nn.Module):
        functools.update_wrapper(self, function)
        self.__func__, self.__self__ = function, model

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<quept_hf override {self.__func__.__name__} of {type(self.__self__).__name__}>"


def install_elastic_save(model: nn.Module) -> None:
    """Route a transformers model's ``save_pretrained`` / ``push_to_hub`` through `save_elastic` while it
    carries MB-CLoRA adapters (instance attributes; idempotent; a ``deepcopy`` keeps them bound to the copy).

    Call it when the adapters are injected, before their weights are loaded: it also records the model's own
    weight conversions, which transformers' ``load_adapter`` replaces by the adapter's."""
    if _BASE_CONVERSIONS not in vars(model):
        setattr(model, _BASE_CONVERSIONS, vars(model).get("_weight_conversions"))
    for name, function in (("save_pretrained", _elastic_save_pretrained), ("push_to_hub", _elastic_push_to_hub)):
        current = vars(model).get(name)
        if getattr(current, "__func__", None) is not function:
            setattr(model, name, _BoundOverride(function, model))


# ------------------------------------------------------------------------- format records and load checks


def _json_default(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def _digests(fields: Mapping[str, Any]) -> dict[str, str]:
    """A short sha256 per field of its canonical JSON: names a changed field without storing its value."""
    return {
        name: hashlib.sha256(json.dumps(value, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]
        for name, value in fields.items()
    }


def _format_metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    return {FORMAT_KEY: json.dumps(_digests(fields), sort_keys=True)} if fields else {}


def format_record(model: nn.Module) -> dict[str, str]:
    """The safetensors metadata entry (`FORMAT_KEY`) of a QuEPT model: digests of its config's format fields."""
    return _format_metadata(_quept_fields(model))


def _quept_fields(model: nn.Module) -> dict[str, Any]:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config.format_fields() if isinstance(config, QuEPTConfig) else {}


def _adapter_fields(config: MBCLoRAConfig) -> dict[str, Any]:
    fields = {name: getattr(config, name) for name in ADAPTER_FORMAT_FIELDS}
    if isinstance(fields["target_modules"], (list, tuple, set, frozenset)):  # peft may turn the list into a set
        fields["target_modules"] = sorted(fields["target_modules"])
    return fields


def check_format(metadata: Mapping[str, str] | None, fields: Mapping[str, Any], where: str, record: str) -> None:
    """Refuse a config whose format fields differ from the digests a safetensors file recorded when saved.

    ``where`` names the config (``"config.json's quantization_config"``), ``record`` the file. A file without a
    record (saved before quept_hf kept one, or by other tools) is not checked; fields only one side knows (another
    quept_hf version) are skipped."""
    raw = (metadata or {}).get(FORMAT_KEY)
    if raw is None:
        return
    try:
        stored = json.loads(raw)
    except ValueError:
        raise ValueError(f"{record}: its {FORMAT_KEY!r} metadata record is not JSON; the file is damaged") from None
    current = _digests(fields)
    changed = sorted(name for name in set(stored) & set(current) if stored[name] != current[name])
    if changed:
        raise ValueError(
            f"{where} no longer describes the saved weights: field(s) {changed} differ from what {record} recorded "
            "when it was saved (the config was edited after saving). Restore the saved values, or change these "
            "settings on the live model and save it again."
        )


def _locate(source: str, filename: str, revision: str | None = None) -> str | None:
    """Local path of a checkpoint's file: in a local folder or the Hub cache. ``""`` when the file is known to be
    absent, ``None`` when that is unknown (a Hub file not in the cache)."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.isfile(path) else ""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(source, filename, revision=revision)
    except (ValueError, OSError):  # not a Hub repo id
        return None
    if isinstance(found, str):
        return found
    return "" if found is not None else None


def _weight_files(source: str, revision: str | None) -> list[str]:
    """The safetensors file names of a checkpoint's weights (its shards); ``[]`` for another layout (subfolder,
    variant, a Hub file not in the cache): then there is nothing to check against."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = _locate(source, SAFE_WEIGHTS_INDEX_NAME, revision)
    if index:
        with open(index, encoding="utf-8") as f:
            return sorted(set(json.load(f).get("weight_map", {}).values()))
    return [SAFE_WEIGHTS_NAME] if _locate(source, SAFE_WEIGHTS_NAME, revision) else []


def _metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def check_loaded_checkpoint(model: nn.Module, config: QuEPTConfig) -> None:
    """After an elastic checkpoint was loaded: its config.json still describes the weights (`check_format`), and
    the MB-CLoRA adapter its metadata lists is there. A calibrated folder that lost ``adapter_config.json`` (or a
    first save killed before the adapter was written) loaded as round-to-nearest without a word."""
    source = getattr(model.config, "_name_or_path", None)
    revision = getattr(model.config, "_commit_hash", None)
    names = _weight_files(source, revision) if source else []
    first = _locate(source, names[0], revision) if names else None
    if not first:
        return
    from .mixed_precision import SENSITIVITY_NAME

    verify_files(source, [*names, SENSITIVITY_NAME], revision)
    check_format(_metadata(first), config.format_fields(), f"{source!r}: config.json's quantization_config", first)
    ranked = sorted(n for n, e in (config.adapters or {}).items() if isinstance(e, dict) and e.get("rank") is not None)
    missing = [name for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME) if _locate(source, name, revision) == ""]
    if ranked and missing:
        raise ValueError(
            f"The QuEPT checkpoint {source!r} lacks {missing}, but its config.json lists MB-CLoRA adapters "
            f"{ranked[:4]} with ranks: without them the model would run round-to-nearest. Restore the missing "
            "file(s) or save the model again."
        )


def check_adapter_source(peft_model_id: Any) -> None:
    """Before ``load_adapter``: refuse a folder `save_elastic` wrote (base weights next to the adapter) whose
    ``config.json`` is gone. transformers would take the base weights from ``adapter_config.json``'s
    ``base_model_name_or_path``, the path of the first save, i.e. whatever sits there now."""
    if not isinstance(peft_model_id, (str, os.PathLike)) or not os.path.isdir(peft_model_id):
        return
    folder = os.fspath(peft_model_id)
    adapter = _locate(folder, ADAPTER_WEIGHTS_NAME)
    if _locate(folder, "config.json") or not adapter or _metadata(adapter).get(BASE_KEY) != BASE_IN_FOLDER:
        return
    with open(os.path.join(folder, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        elsewhere = json.load(f).get("base_model_name_or_path")
    raise ValueError(
        f"{folder!r} holds a QuEPT elastic adapter saved with its base weights, but config.json is missing: the "
        f"base would be loaded from {elsewhere!r} (adapter_config.json's base_model_name_or_path) instead of this "
        "folder. Restore config.json (and the weights) in the folder, or save the model again."
    )


def check_adapter_format(peft_model_id: Any, config: MBCLoRAConfig, revision: str | None = None) -> None:
    """After ``load_adapter``: ``adapter_config.json`` still describes the adapter tensors (`check_format`)."""
    if not isinstance(peft_model_id, (str, os.PathLike)):
        return
    source = os.fspath(peft_model_id)
    adapter = _locate(source, ADAPTER_WEIGHTS_NAME, revision)
    if adapter:
        verify_files(source, [ADAPTER_WEIGHTS_NAME], revision)
        check_format(_metadata(adapter), _adapter_fields(config), f"{source!r}: {ADAPTER_CONFIG_NAME}", adapter)


def _digests_enabled() -> bool:
    return os.environ.get(DIGESTS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _write_manifest(folder: str) -> None:
    """`MANIFEST_NAME`: the sha256 of each tensor file, written last, once every file of the save is in place."""
    if not _digests_enabled():
        return
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    manifest = {"version": 1, "sha256": {name: file_sha256(os.path.join(folder, name)) for name in names}}
    atomic_write_text(os.path.join(folder, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify_files(source: str, names: list[str], revision: str | None = None) -> None:
    """Refuse a tensor file whose bytes differ from the sha256 its save recorded in `MANIFEST_NAME`.

    Costs one read of each file (about 1 GB/s); ``QUEPT_FILE_DIGESTS=0`` skips it. Files without a manifest
    (saved before quept_hf wrote one, or not by quept_hf) and Hub files whose manifest is not in the cache (the
    Hub checks its downloads itself) are not checked."""
    manifest_path = _locate(source, MANIFEST_NAME, revision) if _digests_enabled() else None
    if not manifest_path:
        return
    with open(manifest_path, encoding="utf-8") as f:
        recorded = json.load(f).get("sha256", {})
    for name in names:
        path = _locate(source, name, revision)
        if path and name in recorded and file_sha256(path) != recorded[name]:
            raise ValueError(
                f"{source!r}: {name} does not match the sha256 {MANIFEST_NAME} recorded when it was saved: the file "
                f"is damaged (changed or truncated bytes). Restore it from the original, or set {DIGESTS_ENV}=0 to "
                "load it unchecked."
            )

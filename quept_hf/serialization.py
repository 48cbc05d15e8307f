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

This module holds the format: the state dicts, the adapter files, staging, the manifest, the format records and
the load checks. `quept_hf.saving` drives a save (``quept_hf.save_pretrained``, the model's own
``save_pretrained``). ``peft.PeftModel.save_pretrained`` is untouched (it writes the adapter only, as PEFT always
does).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write_text, file_sha256, staged_folder
from .compat import unwrap
from .config import QuEPTConfig
from .mbclora.config import MBCLoRAConfig
from .mixed_precision import SENSITIVITY_NAME

PEFT_KEY_PREFIX = "base_model.model."
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

# The adapter-free state dict of the save in progress (`saving_state_dict`), which the quantizer's hook answers.
_SAVING: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar("quept_saving", default=None)


@contextlib.contextmanager
def saving_state_dict(state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, `state_dict_to_save` answers ``state_dict``.

    transformers' ``save_pretrained`` takes its tensors from the quantizer's ``get_state_dict_and_metadata`` hook
    whenever the model has a quantizer, whatever ``state_dict`` argument it was given; so an elastic save (whose
    tensors are the base model's, without the adapter's) tells the hook here."""
    token = _SAVING.set(state_dict)
    try:
        yield
    finally:
        _SAVING.reset(token)


def state_dict_to_save() -> dict[str, torch.Tensor] | None:
    """The state dict of the save in progress (`saving_state_dict`), or None: the model's own."""
    return _SAVING.get()


def adapter_state_dict(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapter tensors with ``base_model.model.`` keys, exactly as ``PeftModel.save_pretrained`` writes them."""
    from peft import get_peft_model_state_dict

    model = unwrap(model)
    tensors = get_peft_model_state_dict(model, state_dict, adapter_name=adapter_name, save_embedding_layers=False)
    return {PEFT_KEY_PREFIX + key: value.contiguous() for key, value in tensors.items()}


# -------------------------------------------------------------------------------------------- saving


def write_adapter(
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
    """Before ``load_adapter``: refuse a folder `quept_hf.saving.save_elastic` wrote (base weights next to the adapter)
    whose ``config.json`` is gone. transformers would take the base weights from ``adapter_config.json``'s
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

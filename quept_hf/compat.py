"""Every use quept_hf makes of transformers' and peft's PRIVATE state, in one place, checked against the versions
it was tested with.

Why one module: these are the lines a new transformers or peft release can break silently (the likely failure is
an incomplete checkpoint, not an exception). Each function below names the private attribute it touches and why
no public hook does the job; the rest of the package calls these functions and never touches the attributes
itself (``tests/test_layering.py`` checks that). When a release moves one, this file is the whole port.

The module imports no other quept_hf module: everything may use it.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import version
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

# What the suite ran on (pyproject.toml pins the same ranges): [lowest, first version NOT tested).
TESTED = {"transformers": ("5.20.2", "5.24.0"), "peft": ("0.21.2", "0.22.0")}


def _parse(text: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:3])


def untested_versions() -> dict[str, str]:
    """``{package: installed version}`` for each of transformers/peft outside the range in `TESTED`."""
    found = {}
    for package, (low, high) in TESTED.items():
        installed = version(package)
        if not _parse(low) <= _parse(installed) < _parse(high):
            found[package] = installed
    return found


def warn_untested_versions() -> None:
    """Log once at import when transformers or peft is outside the tested range: the private state below may
    have moved (pip's resolver normally prevents it; a forced install does not)."""
    for package, installed in untested_versions().items():
        low, high = TESTED[package]
        logger.warning(
            "quept_hf was tested with %s>=%s,<%s but %s is installed: saving and adapter switching use private "
            "state of that package (quept_hf.compat) and may break",
            package,
            low,
            high,
            installed,
        )


# ------------------------------------------------------------------------------------------------ peft


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a ``peft.PeftModel`` (its ``get_base_model``), or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def register_peft_type(name: str) -> enum.Enum:
    """Add member ``name`` to peft's ``PeftType`` enum once (idempotent) and return it.

    peft 0.21's ``register_peft_method`` requires a ``PeftType`` member, and ``PeftType`` is a closed ``str``
    Enum with no public way to extend it; adapter_config.json's ``"peft_type": "MBCLORA"`` is read back through
    ``PeftType("MBCLORA")``. So the member is built the way Enum itself builds members (``_member_map_``,
    ``_value2member_map_``, ``_member_names_``)."""
    from peft.utils import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


# ---------------------------------------------------------------------------------------- transformers


def has_peft_adapters(model: nn.Module) -> bool:
    """Whether transformers' PEFT integration holds adapters on ``model`` (``_hf_peft_config_loaded``; the public
    ``active_adapters()`` raises instead of answering False)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def record_weight_conversions(model: nn.Module) -> None:
    """Remember the model's own ``_weight_conversions`` (key renamings that saving reverts) before
    ``load_adapter`` replaces them by the ADAPTER's (``base_model.model.`` prefix ...); see `saving_whole_model`."""
    if _BASE_CONVERSIONS not in vars(model):
        setattr(model, _BASE_CONVERSIONS, vars(model).get("_weight_conversions"))


_BASE_CONVERSIONS = "_quept_base_weight_conversions"
_MISSING = object()


@contextlib.contextmanager
def saving_whole_model(model: nn.Module) -> Iterator[None]:
    """While inside, transformers' ``save_pretrained`` writes the whole model, not the adapter only.

    With adapters attached (``_hf_peft_config_loaded``) transformers writes only ``adapter_model.safetensors``
    and no config.json, and no hook (the quantizer's ``get_state_dict_and_metadata`` runs before that branch)
    changes it: the flag is switched off meanwhile, and the model's own ``_weight_conversions``
    (`record_weight_conversions`) are put back so the checkpoint keeps the original key names."""
    peft_flag = getattr(model, "_hf_peft_config_loaded", False)
    conversions = vars(model).get("_weight_conversions", _MISSING)
    if _BASE_CONVERSIONS in vars(model):  # None: transformers then uses the class's default conversions
        model._weight_conversions = vars(model)[_BASE_CONVERSIONS]
    model._hf_peft_config_loaded = False
    try:
        yield
    finally:
        model._hf_peft_config_loaded = peft_flag
        if conversions is _MISSING:
            vars(model).pop("_weight_conversions", None)
        else:
            model._weight_conversions = conversions


def allow_missing_on_load(model: nn.Module, pattern: str) -> None:
    """Let transformers load a checkpoint lacking keys that match ``pattern`` without a warning
    (``_keys_to_ignore_on_load_missing``: a class attribute, set on the instance so other models keep theirs)."""
    model._keys_to_ignore_on_load_missing = [*(model._keys_to_ignore_on_load_missing or []), pattern]


def loaded_from_checkpoint(param: nn.Parameter) -> bool:
    """Whether transformers filled ``param`` from the checkpoint (``_is_hf_initialized``), rather than leaving
    it initialised: the only record of a missing tensor once ``from_pretrained`` returns."""
    return bool(getattr(param, "_is_hf_initialized", False))


def refresh_tied_weights(model: nn.Module) -> None:
    """After untying weights, recompute what ``save_pretrained`` drops as duplicates (``all_tied_weights_keys``,
    cached by transformers at init)."""
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def mask_function(implementation: str, default: Callable) -> Callable:
    """The attention-mask function transformers registered for ``implementation`` (its own, not a user's local
    override: ``AttentionMaskInterface._global_mapping``), or ``default``."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(implementation, default)


def cached_file_or_none(repo: str, filename: str, revision: str | None = None) -> str | None:
    """Path of ``filename`` of a Hub repo (downloaded or cached), or None when the repo has no such file
    (``cached_file``'s ``_raise_exceptions_for_missing_entries``: the public ``has_file`` asks the network)."""
    from transformers.utils import cached_file

    return cached_file(repo, filename, revision=revision, _raise_exceptions_for_missing_entries=False)


# ---------------------------------------------------------------------------------- instance overrides


class BoundOverride:
    """``function`` bound to ``model``, like a method, but picklable (``torch.save(model)``) and deep-copyable
    with its model (a ``types.MethodType`` instance attribute would pickle as ``getattr(model, function name)``)."""

    def __init__(self, function: Callable, model: nn.Module):
        functools.update_wrapper(self, function)
        self.__func__, self.__self__ = function, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<quept_hf override {self.__func__.__name__} of {type(self.__self__).__name__}>"


def override_method(model: nn.Module, name: str, function: Callable) -> None:
    """Make ``model.<name>(...)`` call ``function(model, ...)`` (an instance attribute; idempotent).

    The only place quept_hf replaces a method of a model instance. The survivors and why no public hook exists
    are listed in README.md ("Layering"): transformers' ``save_pretrained`` of a model with adapters writes the
    adapter only, ``load_adapter`` has no validation hook, and ``set_adapter`` needs a loaded PEFT config."""
    if getattr(vars(model).get(name), "__func__", None) is not function:
        setattr(model, name, BoundOverride(function, model))

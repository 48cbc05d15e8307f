"""`QuEPTConfig`: the JSON-safe, validated description of an elastic-precision quantization.

Registered with transformers as quantization method ``"quept"`` (see `quept_hf.quantizer`), so
``from_pretrained(..., quantization_config=QuEPTConfig(...))`` works and ``config.json`` round-trips.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from typing import Any, NoReturn

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from .compat import unwrap

MODES = ("weight_only", "weight_activation")
MIN_BITS, MAX_BITS = 2, 8
# 2 (session 4): saves also write quept_manifest.json (tensor-file digests) and the format-field digests in the
# safetensors metadata, both checked on load; version-1 folders (without them) still load, unchecked.
FORMAT_VERSION = 2
PACKED_FORMAT = "quept-packed"  # `QuEPTConfig.packed["format"]` of a checkpoint written by `quept_hf.export`
PACKED_VERSION = 1
FROZEN_FORMAT = "quept-frozen"  # `QuEPTConfig.frozen["format"]` of a checkpoint written by `quept_hf.freeze`
FROZEN_VERSION = 1

DEFAULT_BIT_GROUPS = {
    "weight_only": [[2], [3, 4], [5, 6], [7, 8]],
    "weight_activation": [[4], [5, 6], [7, 8]],
}
# Spec section 2: learning rates per mode (LLaMA rows of the hyperparameter table).
DEFAULT_LR = {"weight_only": (7e-4, 2e-2), "weight_activation": (7e-5, 1e-1)}
DEFAULT_MERGE_WEIGHTS = {"weight_only": [0.25, 0.25, 0.25, 0.25], "weight_activation": [0.4, 0.3, 0.3]}
TOKEN_MERGE_MODES = ("mbtome", "none", "uniform", "separate")
LOSSES = ("l1", "mse")
CASCADE_TRAINING = ("joint", "owned")
LR_SCALING = ("none", "step")
ZERO_POINTS = ("integer", "float", "symmetric")
DEFAULT_LR_SCALING = {"weight_only": "step", "weight_activation": "none"}
MAX_LR = 1.0  # a larger Adam step moves a weight by more than its whole quantization range
MAX_SEED = 2**32 - 1  # numpy's seed range; torch generators take it too

# What the saved tensors depend on (how they were made and how loading reads them): a config.json edited in these
# fields no longer describes the weights (`quept_hf.serialization` keeps their digests in the safetensors metadata).
FORMAT_FIELDS = (
    "mode", "bits", "bit_groups", "group_size", "zero_point", "rotation", "kv_bits", "quantize_attention_probs",
    "quantize_vision_tower", "modules_to_not_convert", "packed", "frozen", "format_version",
)  # fmt: skip
# Calibration settings: what the engine reads, what its checkpoints fingerprint and what model cards report.
CALIBRATION_SETTINGS = (
    "num_samples", "seq_len", "epochs", "batch_size", "lr_lora", "lr_clip", "loss",
    "top_p", "merge_weights", "token_merge", "cascade_training", "lr_scaling", "seed", "checkpoint_dir",
)  # fmt: skip
# Run-time inputs: used by calibration, never serialised into config.json.
RUNTIME_FIELDS = ("dataset", "tokenizer", "image_processor", "processor")


def _is_int(value: Any) -> bool:
    """An int that is not a bool: ``True`` is not a bit-width, a size or a seed."""
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (``10**400`` is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_float(value: Any) -> Any:
    """A finite number as a float (``1`` and ``1.0`` are the same rate); anything else unchanged, for post_init
    to refuse with the field's name."""
    return float(value) if _finite_number(value) else value


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _refuse(field: str, value: Any, allowed: str) -> NoReturn:
    """The one shape of a refused setting: the field, the value given and what is allowed."""
    raise ValueError(f"QuEPTConfig.{field}={value!r} is not allowed: {allowed}")


def _int_list(field: str, value: Any, what: str) -> list[int]:
    """A non-empty list (or tuple) of exact ints, copied; anything else is refused, never converted."""
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) for v in value):
        _refuse(field, value, f"expected a non-empty list of {what} (ints, not floats, strings or bools)")
    return list(value)


def _bit_list(field: str, value: Any) -> list[int]:
    """Distinct bit-widths in MIN_BITS..MAX_BITS, returned sorted (their order carries no meaning)."""
    bits = _int_list(field, value, f"bit-widths in {MIN_BITS}..{MAX_BITS}")
    bad = [b for b in bits if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise ValueError(f"QuEPTConfig.{field}={bits} has bit-widths {bad} outside {MIN_BITS}..{MAX_BITS}")
    if len(set(bits)) != len(bits):
        raise ValueError(f"QuEPTConfig.{field}={bits} repeats a bit-width")
    return sorted(bits)


def _bit_groups(value: Any) -> list[list[int]]:
    """Groups of bit-widths, each sorted, the groups themselves low to high: the rank cascade follows this order."""
    if not isinstance(value, (list, tuple)) or not value:
        _refuse("bit_groups", value, "expected a non-empty list of groups of bit-widths, low to high")
    groups = [_bit_list("bit_groups", group) for group in value]
    if any(low[-1] >= high[0] for low, high in itertools.pairwise(groups)):
        _refuse("bit_groups", value, "groups must run low to high (each group's bits below the next group's)")
    return groups


def _flatten(groups: list[list[int]]) -> list[int]:
    return sorted(b for group in groups for b in group)


def _group_size_key(key: Any) -> int | None:
    """A group-size key: an int bit-width, or its decimal string (JSON object keys are strings)."""
    if _is_int(key):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def zero_point_kinds(zero_point: Any, bits: list[int], field: str = "QuEPTConfig.zero_point") -> dict[int, str]:
    """``{bits: kind}`` that a ``zero_point`` value names: a kind applies to every width of ``bits``, a mapping
    names some (JSON's string keys allowed), ``None`` none; each kind one of `ZERO_POINTS`. One reading of the
    value for `QuEPTConfig` (the unnamed widths stay ``"integer"``) and `quept_hf.freeze` (they keep their grid);
    a bad value is refused naming ``field``."""

    def refuse(allowed: str) -> NoReturn:
        raise ValueError(f"{field}={zero_point!r} is not allowed: {allowed}")

    if zero_point is None:
        return {}
    if isinstance(zero_point, str):
        kinds = dict.fromkeys(bits, zero_point)
    elif isinstance(zero_point, dict):
        kinds = {_group_size_key(b): z for b, z in zero_point.items()}
        if None in kinds or any(b not in bits for b in kinds):
            refuse(f"keys must be bit-widths of bits={bits} (kinds {ZERO_POINTS})")
    else:
        refuse(f"expected one of {ZERO_POINTS}, a dict {{bits: kind}} or None")
    if any(not isinstance(kind, str) or kind not in ZERO_POINTS for kind in kinds.values()):
        refuse(f"each kind must be one of {ZERO_POINTS}")
    return kinds


class QuEPTConfig(QuantizationConfigMixin):
    """Configuration of a QuEPT elastic-precision model.

    Args:
        mode: ``"weight_only"`` (bits 2..8) or ``"weight_activation"`` (WbAb, bits 4..8, activations
            quantized per token at the weight bit-width).
        bits: the bit-widths the model can switch between. Defaults to every bit of ``bit_groups``.
        bit_groups: partition of ``bits`` into calibration groups, low to high (spec section 2).
        default_bits: bit-width active after loading (default: the highest).
        group_size: input columns per quantization group; ``-1`` means per output channel. An int applies
            to every bit-width; a mapping ``{bits: size}`` sets it per bit-width. Default: 128 for
            bits <= 3, per-channel above (as the QuEPT authors do).
        zero_point: the grid ``s (c - z)``'s zero point per bit-width (`quept_hf.nn.functional.weight_qparams`):
            ``"integer"`` (the spec's integer ``z``; what integer kernels, compressed-tensors and vLLM store),
            ``"float"`` (``z`` real-valued, so the grid's minimum is exactly the clipped group minimum: GGUF
            ``Q4_1`` / ``Q5_1``'s ``d q + m``, whose export then holds the calibrated grid exactly) or
            ``"symmetric"`` (``z = 2^(b-1)``, or ``2^(b-1) - 1`` mirrored, with the group's larger clipped extreme on
            the grid: GGUF ``Q4_0`` / ``Q5_0`` / ``Q8_0``'s ``d k``, exported exactly; fewer levels per range than
            ``"integer"``, but half a bit less per weight in GGUF). A string applies to every bit-width;
            ``{bits: kind}`` sets some (the rest stay ``"integer"``), e.g. ``{4: "float", 5: "float"}`` for a
            GGUF ladder. Float widths export to GGUF and the packed/frozen formats, not to compressed-tensors
            (refused), and decode without the integer low-bit kernels. `quept_hf.freeze` can re-grid a width
            (``zero_point=``) without calibrating again.
        ranks: MB-CLoRA rank each group adds to the cascade, same order as ``bit_groups``.
        kv_bits: KV-cache bit-width (``None`` = off, an int, or ``"follow"`` the active bit-width): keys (after
            RoPE) and values quantized asymmetrically per (token, head), clipping 0.95 (`quept_hf.nn.kv_cache`).
        rotation: QuaRot-style Hadamard rotation of the residual stream before calibration, plus online Hadamard
            transforms before down_proj (and on queries/keys with ``kv_bits``); float outputs are unchanged
            (`quept_hf.calibration.rotation`). ``None``: on in weight_activation mode where the architecture
            allows it, off otherwise. Saved as a bool: a saved rotated model reloads rotated.
        smoothing: AWQ-style activation-aware per-channel scales searched per block during calibration and
            folded into the preceding norm / linear (`quept_hf.calibration.smoothing`). ``None``: on in
            weight_only mode where the architecture allows it, off otherwise.
        modules_to_not_convert: module names (or name suffixes) kept in float besides ``lm_head``; one string is one
            name.
        seed: seed of every random choice (data windows, bit sampling, adapter init), an int in 0..2**32-1.
        dataset, tokenizer: calibration data and its tokenizer (run-time only, never saved).
        image_processor, processor: what turns calibration images (ViTs) or image-text pairs (VLMs) into model
            inputs (run-time only, never saved), e.g. ``AutoImageProcessor`` / ``AutoProcessor`` instances.
        quantize_vision_tower: VLMs only: also make the vision tower elastic and calibrate it (default: the
            language model only; the multimodal projector always stays in float).
        quantize_attention_probs: weight_activation mode: also quantize the attention softmax output (unsigned,
            range [0, 1], at the active bit-width; runs attention eagerly). Default ``False``: the spec quantizes
            the inputs of every linear layer and leaves the attention matmuls in float.
        num_samples, seq_len, epochs, batch_size, lr_lora, lr_clip, loss, top_p, merge_weights,
        token_merge, cascade, checkpoint_dir: calibration settings (spec sections 2-4). ``token_merge`` builds the
            next block's quantized inputs: ``"separate"`` (default: each bit group keeps its own input stream,
            i.e. trains on the inputs it meets at inference; same cost, one activation cache per group),
            ``"mbtome"`` (the spec's MB-ToMe, section 4: one input for all groups, merged per token; measured
            6.6x worse W2 perplexity on SmolLM2, equal at 3..8 bits, see docs/RESULTS.md), ``"uniform"``
            (weighted mix) or ``"none"`` (the highest group's output). Learning rates lie in (0, 1], ``top_p`` in
            [0, 1]; ``merge_weights`` are non-negative, at least one positive. Every field takes its exact type
            (``bool`` is not an int, ``4.0`` is not a bit-width): nothing is converted.
        cascade_training: ``"owned"`` (default: each slice learns from its own group's loss only; the higher
            groups' slices are used but not pulled towards low-bit errors, which keeps high bit-widths at least as
            good as round-to-nearest) or ``"joint"`` (every group's loss trains every slice its delta uses).
        lr_scaling: ``"step"``: the MB-CLoRA slice of a bit group learns at ``lr_lora`` times
            ``step(b) / step(b_min)``, ``step(b) = 1 / (2**b - 1)`` the weight grid step relative to the range,
            so an Adam update moves every bit-width by the same fraction of ITS grid step (clipping logits keep
            ``lr_clip``: their steps are already a fraction of an 8-bit grid step); ``"none"``: one
            ``lr_lora`` / ``lr_clip`` for all (the spec). ``None`` (default): ``"step"`` in weight_only mode (one
            lr rewrites 8-bit weights by many grid steps: 5..8 bits fell below round-to-nearest on MiniLM),
            ``"none"`` in weight_activation mode (there activation error dominates the high bit-widths and the
            scaled rates under-train them: DINOv2 W5A5..W8A8 gained less; see docs/RESULTS.md).
        activations_dir: a folder for the calibration activations (``num_samples x seq_len x hidden`` float
            tensors, one per stream), memory-mapped there instead of held in RAM; ``None`` (default): in RAM.
            For models whose activations do not fit next to one block (`quept_hf.calibration.plan` tells).
        gradient_checkpointing: recompute each layer's fake-quantized weight in the backward pass of calibration
            instead of keeping its copies in the autograd graph (``torch.utils.checkpoint``): the same result, a
            block's training peak holds about one layer's weight copies instead of every layer's, for more
            compute (see docs/RESULTS.md). For blocks that barely fit; default ``False``.
        calibrated: set by quept_hf once calibration has run (``False`` for a fresh model).
        packed: set by `quept_hf.export` only: the checkpoint holds packed integer weights frozen at one
            bit-width or plan, ``{"format": "quept-packed", "version": 1, "source": "w3", "bits": {module: b},
            "activation_bits": {module: b}, "per_tensor_activations": [module]}`` (the last two only when
            activations are quantized). ``None``: an elastic checkpoint (float weights + per-bit clipping).
        frozen: set by `quept_hf.freeze` only: the checkpoint holds, per layer, packed integer codes of every KEPT
            bit-width (no float weight, no MB-CLoRA factors, no clipping logits) and still switches:
            ``{"format": "quept-frozen", "version": 1, "bits": {module: [kept bits]}, "per_tensor_activations":
            [module]}``. Exclusive with ``packed``. ``None``: not a frozen checkpoint.
        plans: mixed-precision plans made by `quept_hf.plan_mixed_precision`, ``{"mixed-3.25": {"avg_bits":
            3.249, "target": 3.25, "weighted": True, "bits": {module: b}}}``; switch with ``set_adapter`` or
            ``set_bits(model, "mixed-3.25")``.
        adapters: bit-switch metadata written by `quept_hf.hub` when the model is saved, so readers of config.json
            (``quept_hf.hub.list_bit_widths``, the Hub, other tools) learn what a checkpoint switches between without
            loading weights: ``{"w3": {"weight_bits": 3, "activation_bits": None, "kv_bits": None, "rank": 9,
            "size_bytes": ...}, "mixed-3.25": {"plan": True, "avg_bits": 3.249, ...}}``. ``None``: not recorded
            (a config that was never saved, or a model without MB-CLoRA adapters).
        evaluation: per-bit quality measured by `quept_hf.hub.record_evaluation`, by metric: ``{"perplexity":
            {"results": {"w2": 31.2, "w8": 12.1, "float": 12.0}, "dataset": "wikitext", "lower_is_better": True}}``.
        quept_version: the quept_hf version that wrote the checkpoint (set on save).
        base_model: the float model this one was quantized from (Hub repo id or path), recorded on the first save
            so model cards can name it after the elastic model is reloaded from its own repository.
    """

    def __init__(
        self,
        mode: str = "weight_only",
        bits: list[int] | None = None,
        bit_groups: list[list[int]] | None = None,
        default_bits: int | None = None,
        group_size: int | dict[int, int] | None = None,
        zero_point: str | dict[int, str] | None = None,
        ranks: list[int] | None = None,
        kv_bits: int | str | None = None,
        rotation: bool | None = None,
        smoothing: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        seed: int = 0,
        dataset: Any = None,
        tokenizer: Any = None,
        image_processor: Any = None,
        processor: Any = None,
        quantize_vision_tower: bool = False,
        quantize_attention_probs: bool = False,
        num_samples: int = 128,
        seq_len: int = 2048,
        epochs: int = 15,
        batch_size: int = 2,
        lr_lora: float | None = None,
        lr_clip: float | None = None,
        loss: str = "l1",
        top_p: float = 0.5,
        merge_weights: list[float] | None = None,
        token_merge: str = "separate",
        cascade: bool = True,
        cascade_training: str = "owned",
        lr_scaling: str | None = None,
        checkpoint_dir: str | None = None,
        activations_dir: str | None = None,
        gradient_checkpointing: bool = False,
        dataset_description: str | None = None,
        calibrated: bool = False,
        format_version: int = FORMAT_VERSION,
        packed: dict[str, Any] | None = None,
        frozen: dict[str, Any] | None = None,
        plans: dict[str, dict[str, Any]] | None = None,
        adapters: dict[str, dict[str, Any]] | None = None,
        evaluation: dict[str, dict[str, Any]] | None = None,
        quept_version: str | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ):
        # First: a newer checkpoint may carry fields this version does not know; the version is the real cause.
        self._check_format_version(format_version)
        if kwargs:
            raise ValueError(
                f"QuEPTConfig got unknown field(s) {sorted(kwargs)}; allowed fields are {sorted(self._fields())}"
            )
        self.quant_method = "quept"
        self._check_choice("mode", mode, MODES)
        self.mode = mode
        # Normalise only what carries no meaning (order inside a set of bit-widths); refuse, never convert, the rest.
        chosen = _bit_list("bits", bits) if bits is not None else None
        self.bit_groups = _bit_groups(bit_groups) if bit_groups is not None else self._default_groups(mode, chosen)
        self.bits = chosen if chosen is not None else _flatten(self.bit_groups)
        self.default_bits = default_bits if default_bits is not None else max(self.bits)
        self.group_size = self._normalise_group_size(group_size)
        self.zero_point = self._normalise_zero_point(zero_point)
        self.ranks = copy.deepcopy(ranks) if ranks is not None else [64] * len(self.bit_groups)
        self.kv_bits = kv_bits
        self.rotation = rotation
        self.smoothing = smoothing
        self.modules_to_not_convert = self._module_names(modules_to_not_convert)
        self.seed = seed
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.quantize_vision_tower = quantize_vision_tower
        self.quantize_attention_probs = quantize_attention_probs
        self.num_samples, self.seq_len, self.epochs, self.batch_size = num_samples, seq_len, epochs, batch_size
        default_lora, default_clip = DEFAULT_LR[mode]
        self.lr_lora = _as_float(lr_lora) if lr_lora is not None else default_lora
        self.lr_clip = _as_float(lr_clip) if lr_clip is not None else default_clip
        self.loss = loss
        self.top_p = _as_float(top_p)
        self.merge_weights = [_as_float(w) for w in merge_weights] if _is_list(merge_weights) else merge_weights
        if merge_weights is None:
            self.merge_weights = self._default_merge()
        self.token_merge = token_merge
        self.cascade = cascade
        self.cascade_training = cascade_training
        self.lr_scaling = lr_scaling if lr_scaling is not None else DEFAULT_LR_SCALING[mode]
        dirs = {"checkpoint_dir": checkpoint_dir, "activations_dir": activations_dir}
        for name, path in dirs.items():
            setattr(self, name, os.fspath(path) if isinstance(path, os.PathLike) else path)
        self.gradient_checkpointing = gradient_checkpointing
        self.dataset_description = dataset_description
        self.calibrated = calibrated
        self.format_version = format_version
        self.packed = copy.deepcopy(packed) if packed is not None else None
        self.frozen = copy.deepcopy(frozen) if frozen is not None else None
        self.plans = copy.deepcopy(plans) if plans is not None else {}
        self.adapters = copy.deepcopy(adapters) if adapters is not None else None
        self.evaluation = copy.deepcopy(evaluation) if evaluation is not None else None
        self.quept_version = quept_version
        self.base_model = base_model
        self.post_init()

    # ----------------------------------------------------------------- defaults
    @staticmethod
    def _default_groups(mode: str, bits: list[int] | None) -> list[list[int]]:
        groups = DEFAULT_BIT_GROUPS[mode]
        if bits is None:
            return copy.deepcopy(groups)
        # Keep the default grouping restricted to the requested bits (e.g. bits=[3] -> [[3]]).
        kept = [[b for b in g if b in bits] for g in groups]
        kept = [g for g in kept if g]
        leftover = sorted(set(bits) - set(_flatten(kept)))
        return kept + [[b] for b in leftover] if leftover else kept

    def _default_merge(self) -> list[float]:
        if len(self.bit_groups) == len(DEFAULT_MERGE_WEIGHTS[self.mode]):
            return list(DEFAULT_MERGE_WEIGHTS[self.mode])
        return [1.0 / len(self.bit_groups)] * len(self.bit_groups)

    def _normalise_group_size(self, group_size: Any) -> dict[int, int]:
        """``{bits: size}`` for exactly this config's bit-widths; an int applies to all. Keys may be the decimal
        strings JSON makes of them; sizes must be ints (a bool or float is refused by `_check_group_size`)."""
        if group_size is None:
            return {b: (128 if b <= 3 else -1) for b in self.bits}
        if _is_int(group_size):
            return dict.fromkeys(self.bits, group_size)
        if not isinstance(group_size, dict):
            _refuse("group_size", group_size, "expected an int, a dict or None")
        sizes = {_group_size_key(b): s for b, s in group_size.items()}
        extra = sorted((str(b) for b in sizes if b not in self.bits), key=str)
        if None in sizes or extra:
            _refuse("group_size", group_size, f"keys must be bit-widths of bits={self.bits}")
        if not all(_is_int(s) for s in sizes.values()):
            _refuse("group_size", group_size, "sizes must be ints (a positive size or -1 for per channel)")
        missing = [b for b in self.bits if b not in sizes]
        if missing:
            raise ValueError(f"QuEPTConfig.group_size has no entry for bit-width(s) {missing}")
        return {b: sizes[b] for b in self.bits}

    def _normalise_zero_point(self, zero_point: Any) -> dict[int, str]:
        """``{bits: kind}`` for exactly this config's bit-widths (`zero_point_kinds`; the unnamed stay integer)."""
        named = zero_point_kinds(zero_point, self.bits)
        return {b: named.get(b, "integer") for b in self.bits}

    @staticmethod
    def _module_names(names: Any) -> list[str]:
        """A list of module names; one string is ONE name (iterating it would give its characters)."""
        if names is None:
            return []
        if isinstance(names, str):
            names = [names]
        if not _is_list(names) or not all(isinstance(n, str) and n for n in names):
            _refuse("modules_to_not_convert", names, "expected a module name or a list of non-empty module names")
        return list(names)

    # --------------------------------------------------------------- validation
    def post_init(self) -> None:
        """Raise a ValueError naming the field, the value and what is allowed for every wrong setting.

        Also run after a field was changed by hand, so it re-checks types as well as ranges: a wrong model must
        never come from a setting that was quietly converted (``bits=[4.7]`` -> 4, ``cascade='no'`` -> True)."""
        self._check_choice("mode", self.mode, MODES)
        self._check_bits()
        self._check_ranks_and_sizes()
        self._check_switches()
        self._check_calibration()
        self._check_paths_and_inputs()
        self._check_packed()
        self._check_frozen()
        self._check_plans()
        self._check_hub_metadata()
        self._check_format_version(self.format_version)

    def _check_bits(self) -> None:
        self.bits = _bit_list("bits", self.bits)
        if self.mode == "weight_activation" and min(self.bits) < 4:
            raise ValueError(f"QuEPTConfig.bits={self.bits}: weight_activation mode supports bits 4..8")
        self.bit_groups = _bit_groups(self.bit_groups)
        if _flatten(self.bit_groups) != self.bits:
            raise ValueError(
                f"QuEPTConfig.bit_groups={self.bit_groups} must partition bits={self.bits} "
                "(every bit-width in exactly one group)"
            )
        if not _is_int(self.default_bits) or self.default_bits not in self.bits:
            raise ValueError(f"QuEPTConfig.default_bits={self.default_bits!r} is not one of bits={self.bits}")
        kv = self.kv_bits
        if kv is not None and kv != "follow" and not (_is_int(kv) and MIN_BITS <= kv <= MAX_BITS):
            raise ValueError(f"QuEPTConfig.kv_bits={kv!r}: allowed None, 'follow' or an int in 2..8")

    def _check_ranks_and_sizes(self) -> None:
        ranks = self.ranks
        if not _is_list(ranks) or len(ranks) != len(self.bit_groups) or not all(_is_int(r) and r > 0 for r in ranks):
            raise ValueError(
                f"QuEPTConfig.ranks={ranks!r} needs one positive rank per bit group (ints) "
                f"({len(self.bit_groups)} groups: {self.bit_groups})"
            )
        sizes = self.group_size
        if not isinstance(sizes, dict) or sorted(sizes, key=str) != sorted(self.bits, key=str):
            _refuse("group_size", sizes, f"expected {{bits: size}} for bits={self.bits}")
        if not all(_is_int(s) for s in sizes.values()):
            _refuse("group_size", sizes, "sizes must be ints (a positive size or -1 for per channel)")
        bad_sizes = {b: s for b, s in sizes.items() if s == 0 or s < -1}
        if bad_sizes:
            raise ValueError(
                f"QuEPTConfig.group_size has non-positive sizes {bad_sizes}; use a positive size or -1 (per channel)"
            )

    def _check_switches(self) -> None:
        """Choices and flags: exact values, so ``'false'`` is not taken for True."""
        for name in ("rotation", "smoothing"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"QuEPTConfig.{name}={value!r}: allowed None (the mode's default), True or False")
        flags = ("cascade", "calibrated", "quantize_vision_tower", "quantize_attention_probs", "gradient_checkpointing")
        for name in flags:
            if not isinstance(getattr(self, name), bool):
                _refuse(name, getattr(self, name), "expected True or False")
        self._check_choice("loss", self.loss, LOSSES)
        self._check_choice("cascade_training", self.cascade_training, CASCADE_TRAINING)
        self._check_choice("lr_scaling", self.lr_scaling, LR_SCALING)
        self._check_choice("token_merge", self.token_merge, TOKEN_MERGE_MODES)
        kinds = self.zero_point
        if not isinstance(kinds, dict) or sorted(kinds, key=str) != sorted(self.bits, key=str):
            _refuse("zero_point", kinds, f"expected {{bits: kind}} for bits={self.bits}")
        if any(kind not in ZERO_POINTS for kind in kinds.values()):
            _refuse("zero_point", kinds, f"each kind must be one of {ZERO_POINTS}")
        if self.quantize_attention_probs and self.mode != "weight_activation":
            raise ValueError("QuEPTConfig.quantize_attention_probs=True needs mode='weight_activation'")

    def _check_calibration(self) -> None:
        """Every numeric calibration setting in its range (AdamW checks only its default lr, not group rates)."""
        for name in ("num_samples", "seq_len", "epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < (0 if name == "epochs" else 1):
                minimum = "a non-negative" if name == "epochs" else "a positive"
                raise ValueError(f"QuEPTConfig.{name}={value!r} must be {minimum} integer")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            _refuse("seed", self.seed, f"expected an int in 0..{MAX_SEED}")
        for name in ("lr_lora", "lr_clip"):
            value = getattr(self, name)
            if not _finite_number(value) or not 0 < value <= MAX_LR:
                _refuse(name, value, f"expected a learning rate in (0, {MAX_LR}] (None: the mode's default)")
        if not _finite_number(self.top_p) or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"QuEPTConfig.top_p={self.top_p!r} must lie in [0, 1]")
        weights = self.merge_weights
        if (
            not _is_list(weights)
            or len(weights) != len(self.bit_groups)
            or not all(_finite_number(w) and w >= 0 for w in weights)
        ):
            raise ValueError(
                f"QuEPTConfig.merge_weights={weights!r} needs one non-negative weight per bit group "
                f"({len(self.bit_groups)})"
            )
        if not any(w > 0 for w in weights):
            _refuse("merge_weights", weights, "at least one weight must be positive (they are normalised to sum 1)")

    def _check_paths_and_inputs(self) -> None:
        """Paths are strings; run-time inputs are objects of the right kind, caught here and not deep in calibration."""
        self.modules_to_not_convert = self._module_names(self.modules_to_not_convert)
        for name in ("checkpoint_dir", "activations_dir", "dataset_description"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _refuse(name, value, "expected a non-empty string (a folder path for the *_dir fields) or None")
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) or callable(self.tokenizer)):
            _refuse("tokenizer", self.tokenizer, "expected a tokenizer (callable), a tokenizer name or None")
        for name in ("image_processor", "processor"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                _refuse(name, value, "expected a processor (callable) or None")

    @staticmethod
    def _check_format_version(format_version: Any) -> None:
        """A checkpoint written by a newer quept_hf fails with both version numbers and the fix."""
        if not _is_int(format_version) or format_version < 1:
            _refuse("format_version", format_version, f"expected an int in 1..{FORMAT_VERSION}")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"QuEPTConfig.format_version={format_version}: this checkpoint uses QuEPT format version "
                f"{format_version}, but the installed quept_hf reads up to version {FORMAT_VERSION}: upgrade "
                "quept_hf (pip install -U quept-hf)"
            )

    def _check_hub_metadata(self) -> None:
        """The save-time metadata (`quept_hf.hub`) must stay JSON-safe: dicts of dicts, finite numbers."""
        for name in ("quept_version", "base_model"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"QuEPTConfig.{name}={value!r} must be a string or None")
        if self.adapters is not None and not (
            isinstance(self.adapters, dict) and all(isinstance(v, dict) for v in self.adapters.values())
        ):
            raise ValueError(f"QuEPTConfig.adapters must be a dict {{adapter name: {{...}}}}, got {self.adapters!r}")
        if self.evaluation is not None and not isinstance(self.evaluation, dict):
            raise ValueError(f"QuEPTConfig.evaluation must be a dict {{metric: {{...}}}}, got {self.evaluation!r}")
        for metric, entry in (self.evaluation or {}).items():
            results = entry.get("results") if isinstance(entry, dict) else None
            if not isinstance(results, dict):
                raise ValueError(f"QuEPTConfig.evaluation[{metric!r}] needs a 'results' mapping, got {entry!r}")
            bad = {k: v for k, v in results.items() if not _finite_number(v)}
            if bad:
                raise ValueError(f"QuEPTConfig.evaluation[{metric!r}] has non-finite or non-numeric results {bad}")

    def _check_plans(self) -> None:
        """Every stored mixed plan maps module names to bit-widths this config declares."""
        if not isinstance(self.plans, dict):
            raise ValueError(
                f"QuEPTConfig.plans must be a dict {{name: {{'bits': {{module: b}}}}}}, got {self.plans!r}"
            )
        for name, plan in self.plans.items():
            widths = plan.get("bits") if isinstance(plan, dict) else None
            if not isinstance(widths, dict) or not widths:
                raise ValueError(f"QuEPTConfig.plans[{name!r}] needs a 'bits' mapping {{module: bits}}, got {plan!r}")
            bad: list[Any] = []  # values may be unhashable (JSON lists): collected without a set
            for b in widths.values():
                if (not _is_int(b) or b not in self.bits) and b not in bad:
                    bad.append(b)
            bad.sort(key=repr)
            if bad:
                raise ValueError(f"QuEPTConfig.plans[{name!r}] uses bit-widths {bad}; this config has bits {self.bits}")

    def _check_packed(self) -> None:
        """A packed checkpoint must name, for every packed module, a bit-width this config declares."""
        if self.packed is None:
            return
        packed = self.packed
        self._check_kind("packed", PACKED_FORMAT, PACKED_VERSION, default_version=1)
        for key in ("bits", "activation_bits"):
            widths = packed.get(key) or {}
            if not isinstance(widths, dict) or (key == "bits" and not widths):
                raise ValueError(f"QuEPTConfig.packed[{key!r}] must map module names to bit-widths, got {widths!r}")
            allowed = self.bits if key == "bits" else list(range(MIN_BITS, MAX_BITS + 1))
            bad = {name: b for name, b in widths.items() if not _is_int(b) or b not in allowed}
            if bad:
                shown = dict(list(bad.items())[:4])
                raise ValueError(f"QuEPTConfig.packed[{key!r}] has bit-widths outside {allowed}: {shown}")
        per_tensor = packed.get("per_tensor_activations") or []
        if not _is_list(per_tensor) or not all(isinstance(n, str) for n in per_tensor):
            _refuse("packed['per_tensor_activations']", per_tensor, "expected a list of module names")
        unknown = sorted(set(per_tensor) - set(packed.get("activation_bits") or {}))
        if unknown:
            raise ValueError(
                f"QuEPTConfig.packed['per_tensor_activations'] names modules without activation bits: {unknown[:4]}"
            )

    def _check_kind(self, kind: str, format_name: str, newest: int, default_version: int | None = None) -> None:
        """The header of a checkpoint kind (``packed``, ``frozen``): its format name and a version this quept_hf
        reads; a newer version fails with both numbers and the fix."""
        header = getattr(self, kind)
        if not isinstance(header, dict) or header.get("format") != format_name:
            raise ValueError(f"QuEPTConfig.{kind} must be a dict with format={format_name!r}, got {header!r}")
        version = header.get("version", default_version)
        if not _is_int(version) or version < 1:
            raise ValueError(f"QuEPTConfig.{kind}['version']={version!r} must be a positive integer")
        if version > newest:
            raise ValueError(
                f"QuEPTConfig.{kind}['version']={version}: this {kind} checkpoint uses {kind} format version "
                f"{version}, but the installed quept_hf reads up to version {newest}: upgrade quept_hf "
                "(pip install -U quept-hf)"
            )

    def _check_frozen(self) -> None:
        """A frozen checkpoint names, for every frozen module, the bit-widths it keeps codes of (declared ones)."""
        if self.frozen is None:
            return
        frozen = self.frozen
        self._check_kind("frozen", FROZEN_FORMAT, FROZEN_VERSION)
        if self.packed is not None:
            raise ValueError("QuEPTConfig.packed and QuEPTConfig.frozen are exclusive: a checkpoint is one kind")
        widths = frozen.get("bits")
        if not isinstance(widths, dict) or not widths:
            raise ValueError(f"QuEPTConfig.frozen['bits'] must map module names to kept bit-widths, got {widths!r}")
        for name, kept in widths.items():
            if (
                not isinstance(kept, list)
                or not kept
                or any(not _is_int(b) or b not in self.bits for b in kept)
                or kept != sorted(set(kept))
            ):
                raise ValueError(
                    f"QuEPTConfig.frozen['bits'][{name!r}]={kept!r}: expected a sorted list of distinct bit-widths "
                    f"from bits={self.bits}"
                )
        per_tensor = frozen.get("per_tensor_activations", [])
        if (
            not _is_list(per_tensor)
            or not all(isinstance(n, str) for n in per_tensor)
            or not set(per_tensor) <= set(widths)
        ):
            raise ValueError(
                f"QuEPTConfig.frozen['per_tensor_activations'] must list frozen modules, got {per_tensor!r}"
            )
        head = frozen.get("head")
        if head is not None and not (
            isinstance(head, dict)
            and set(head) == {"module", "bits", "group_size"}
            and isinstance(head["module"], str)
            and head["module"] not in widths
            and _is_int(head["bits"])
            and MIN_BITS <= head["bits"] <= MAX_BITS
            and head["group_size"] == -1
        ):
            raise ValueError(
                f"QuEPTConfig.frozen['head']={head!r}: expected {{'module': name of a non-elastic linear, 'bits': "
                f"{MIN_BITS}..{MAX_BITS}, 'group_size': -1}} or None"
            )

    def format_fields(self) -> dict[str, Any]:
        """The JSON form of `FORMAT_FIELDS`: what a checkpoint's tensors depend on."""
        out = self.to_dict()
        return {name: out[name] for name in FORMAT_FIELDS}

    @property
    def is_frozen(self) -> bool:
        """True for a checkpoint of `quept_hf.freeze`: integer codes per kept bit-width, switchable, no float master."""
        return self.frozen is not None

    @property
    def is_packed(self) -> bool:
        """True for a checkpoint of `quept_hf.export`: frozen packed weights, no bit switching."""
        return self.packed is not None

    @staticmethod
    def _check_choice(field: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            raise ValueError(f"QuEPTConfig.{field}={value!r} is unknown; allowed: {list(allowed)}")

    # ------------------------------------------------------------------ helpers
    def group_of(self, bits: int) -> int:
        """Index (low to high) of the bit group that contains ``bits``."""
        for index, group in enumerate(self.bit_groups):
            if bits in group:
                return index
        raise ValueError(f"bit-width {bits} is not one of {self.bits}")

    def activation_bits(self, bits: int) -> int | None:
        """Activation bit-width paired with a weight bit-width (``None`` in weight-only mode)."""
        return bits if self.mode == "weight_activation" else None

    # ------------------------------------------------------------ serialisation
    @classmethod
    def _fields(cls) -> set[str]:
        import inspect

        return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: run-time inputs (dataset, tokenizer) are left out, int keys become strings."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in RUNTIME_FIELDS}
        out["group_size"] = {str(b): s for b, s in self.group_size.items()}
        out["zero_point"] = {str(b): z for b, z in self.zero_point.items()}
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config a dict (``config.json``'s ``quantization_config``) describes; ``kwargs`` naming fields override
        it and are validated with it, the others are returned when ``return_unused_kwargs``."""
        config_dict = dict(config_dict)
        config_dict.pop("quant_method", None)
        fields = cls._fields()
        config = cls(**{**config_dict, **{k: v for k, v in kwargs.items() if k in fields}})
        unused = {k: v for k, v in kwargs.items() if k not in fields}
        return (config, unused) if return_unused_kwargs else config

    def clone(self) -> QuEPTConfig:
        """An independent config with the same settings and run-time inputs: each model loaded with one config
        gets its own clone, so what loading and calibration record (``calibrated``, resolved ``rotation``) never
        leaks into the user's object or into the next model loaded with it."""
        clone = type(self).from_dict(self.to_dict())
        for name in RUNTIME_FIELDS:
            setattr(clone, name, getattr(self, name, None))
        return clone

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def quept_config(model: nn.Module) -> QuEPTConfig:
    """The `QuEPTConfig` of a QuEPT model (unwrapping a ``peft.PeftModel``); a ValueError says how to make one."""
    base = unwrap(model)
    config = getattr(getattr(base, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "quept":
        config = QuEPTConfig.from_dict(config)
    if not isinstance(config, QuEPTConfig):
        raise ValueError(
            f"{type(base).__name__} is not a QuEPT model: load it with "
            "from_pretrained(..., quantization_config=quept_hf.QuEPTConfig(...)) after `import quept_hf`"
        )
    return config

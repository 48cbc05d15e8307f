"""`QuEPTConfig`: the JSON-safe, validated description of an elastic-precision quantization.

Registered with transformers as quantization method ``"quept"`` (see `quept_hf.quantizer`), so
``from_pretrained(..., quantization_config=QuEPTConfig(...))`` works and ``config.json`` round-trips.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

MODES = ("weight_only", "weight_activation")
MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 16
FORMAT_VERSION = 1
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
DEFAULT_LR_SCALING = {"weight_only": "step", "weight_activation": "none"}

# Run-time inputs: used by calibration, never serialised into config.json.
RUNTIME_FIELDS = ("dataset", "tokenizer", "image_processor", "processor")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(groups: list[list[int]]) -> list[int]:
    return sorted(b for group in groups for b in group)


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
        modules_to_not_convert: module names (or name suffixes) kept in float besides ``lm_head``.
        seed: seed of every random choice (data windows, bit sampling, adapter init).
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
            (weighted mix) or ``"none"`` (the highest group's output).
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
        if mode not in MODES:
            raise ValueError(f"QuEPTConfig.mode={mode!r} is unknown; allowed: {list(MODES)}")
        self.mode = mode
        self.bit_groups = [sorted(int(b) for b in g) for g in (bit_groups or self._default_groups(mode, bits))]
        self.bits = sorted(int(b) for b in bits) if bits is not None else _flatten(self.bit_groups)
        self.default_bits = int(default_bits) if default_bits is not None else max(self.bits)
        self.group_size = self._normalise_group_size(group_size)
        self.ranks = list(ranks) if ranks is not None else [64] * len(self.bit_groups)
        self.kv_bits = kv_bits
        self.rotation = rotation
        self.smoothing = smoothing
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.seed = int(seed)
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor
        self.quantize_vision_tower = bool(quantize_vision_tower)
        self.quantize_attention_probs = bool(quantize_attention_probs)
        self.num_samples, self.seq_len, self.epochs, self.batch_size = num_samples, seq_len, epochs, batch_size
        default_lora, default_clip = DEFAULT_LR[mode]
        self.lr_lora = float(lr_lora) if lr_lora is not None else default_lora
        self.lr_clip = float(lr_clip) if lr_clip is not None else default_clip
        self.loss = loss
        self.top_p = float(top_p)
        self.merge_weights = list(merge_weights) if merge_weights is not None else self._default_merge()
        self.token_merge = token_merge
        self.cascade = bool(cascade)
        self.cascade_training = cascade_training
        self.lr_scaling = lr_scaling if lr_scaling is not None else DEFAULT_LR_SCALING.get(mode, "step")
        self.checkpoint_dir = checkpoint_dir
        self.dataset_description = dataset_description
        self.calibrated = bool(calibrated)
        self.format_version = int(format_version)
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
        chosen = {int(b) for b in bits}
        kept = [[b for b in g if b in chosen] for g in groups]
        kept = [g for g in kept if g]
        leftover = sorted(chosen - set(_flatten(kept)))
        return kept + [[b] for b in leftover] if leftover else kept

    def _default_merge(self) -> list[float]:
        if len(self.bit_groups) == len(DEFAULT_MERGE_WEIGHTS[self.mode]):
            return list(DEFAULT_MERGE_WEIGHTS[self.mode])
        return [1.0 / len(self.bit_groups)] * len(self.bit_groups)

    def _normalise_group_size(self, group_size: int | dict | None) -> dict[int, int]:
        if group_size is None:
            return {b: (128 if b <= 3 else -1) for b in self.bits}
        if isinstance(group_size, int):
            return {b: int(group_size) for b in self.bits}
        if isinstance(group_size, dict):
            sizes = {int(b): int(s) for b, s in group_size.items()}
            missing = [b for b in self.bits if b not in sizes]
            if missing:
                raise ValueError(f"QuEPTConfig.group_size has no entry for bit-width(s) {missing}")
            return {b: sizes[b] for b in self.bits}
        raise ValueError(f"QuEPTConfig.group_size={group_size!r}: expected an int, a dict or None")

    # --------------------------------------------------------------- validation
    def post_init(self) -> None:
        """Raise a ValueError naming the field for every inconsistent setting."""
        bad = [b for b in self.bits if not MIN_BITS <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"QuEPTConfig.bits={self.bits} has bit-widths {bad} outside {MIN_BITS}..{MAX_BITS}")
        if self.mode == "weight_activation" and min(self.bits) < 4:
            raise ValueError(f"QuEPTConfig.bits={self.bits}: weight_activation mode supports bits 4..8")
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"QuEPTConfig.bits={self.bits} repeats a bit-width")
        if _flatten(self.bit_groups) != self.bits:
            raise ValueError(
                f"QuEPTConfig.bit_groups={self.bit_groups} must partition bits={self.bits} "
                "(every bit-width in exactly one group)"
            )
        if self.default_bits not in self.bits:
            raise ValueError(f"QuEPTConfig.default_bits={self.default_bits} is not one of bits={self.bits}")
        if len(self.ranks) != len(self.bit_groups) or any(int(r) <= 0 for r in self.ranks):
            raise ValueError(
                f"QuEPTConfig.ranks={self.ranks} needs one positive rank per bit group "
                f"({len(self.bit_groups)} groups: {self.bit_groups})"
            )
        bad_sizes = {b: s for b, s in self.group_size.items() if s == 0 or s < -1}
        if bad_sizes:
            raise ValueError(
                f"QuEPTConfig.group_size has non-positive sizes {bad_sizes}; use a positive size or -1 (per channel)"
            )
        if (
            self.kv_bits is not None
            and self.kv_bits != "follow"
            and not (isinstance(self.kv_bits, int) and MIN_BITS <= self.kv_bits <= MAX_BITS)
        ):
            raise ValueError(f"QuEPTConfig.kv_bits={self.kv_bits!r}: allowed None, 'follow' or an int in 2..8")
        for name in ("rotation", "smoothing"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"QuEPTConfig.{name}={value!r}: allowed None (the mode's default), True or False")
        self._check_choice("loss", self.loss, LOSSES)
        self._check_choice("cascade_training", self.cascade_training, CASCADE_TRAINING)
        self._check_choice("lr_scaling", self.lr_scaling, LR_SCALING)
        self._check_choice("token_merge", self.token_merge, TOKEN_MERGE_MODES)
        if self.quantize_attention_probs and self.mode != "weight_activation":
            raise ValueError("QuEPTConfig.quantize_attention_probs=True needs mode='weight_activation'")
        for name in ("num_samples", "seq_len", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"QuEPTConfig.{name}={value!r} must be a positive integer")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"QuEPTConfig.top_p={self.top_p} must lie in [0, 1]")
        if len(self.merge_weights) != len(self.bit_groups) or any(w < 0 for w in self.merge_weights):
            raise ValueError(
                f"QuEPTConfig.merge_weights={self.merge_weights} needs one non-negative weight per bit group "
                f"({len(self.bit_groups)})"
            )
        self._check_packed()
        self._check_frozen()
        self._check_plans()
        self._check_hub_metadata()
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses QuEPT format version {self.format_version}, but the installed quept_hf "
                f"reads up to version {FORMAT_VERSION}: upgrade quept_hf (pip install -U quept-hf)"
            )

    @staticmethod
    def _check_format_version(format_version: Any) -> None:
        """A checkpoint written by a newer quept_hf fails with both version numbers and the fix."""
        if isinstance(format_version, int) and format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses QuEPT format version {format_version}, but the installed quept_hf "
                f"reads up to version {FORMAT_VERSION}: upgrade quept_hf (pip install -U quept-hf)"
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
            bad = sorted({b for b in widths.values() if not isinstance(b, int) or b not in self.bits}, key=str)
            if bad:
                raise ValueError(f"QuEPTConfig.plans[{name!r}] uses bit-widths {bad}; this config has bits {self.bits}")

    def _check_packed(self) -> None:
        """A packed checkpoint must name, for every packed module, a bit-width this config declares."""
        if self.packed is None:
            return
        packed = self.packed
        if not isinstance(packed, dict) or packed.get("format") != PACKED_FORMAT:
            raise ValueError(f"QuEPTConfig.packed must be a dict with format={PACKED_FORMAT!r}, got {packed!r}")
        if int(packed.get("version", 1)) > PACKED_VERSION:
            raise ValueError(
                f"This packed checkpoint uses packed format version {packed['version']}, but the installed quept_hf "
                f"reads up to version {PACKED_VERSION}: upgrade quept_hf (pip install -U quept-hf)"
            )
        for key in ("bits", "activation_bits"):
            widths = packed.get(key) or {}
            if not isinstance(widths, dict) or (key == "bits" and not widths):
                raise ValueError(f"QuEPTConfig.packed[{key!r}] must map module names to bit-widths, got {widths!r}")
            allowed = self.bits if key == "bits" else list(range(MIN_BITS, MAX_BITS + 1))
            bad = {name: b for name, b in widths.items() if not isinstance(b, int) or b not in allowed}
            if bad:
                shown = dict(list(bad.items())[:4])
                raise ValueError(f"QuEPTConfig.packed[{key!r}] has bit-widths outside {allowed}: {shown}")
        unknown = sorted(set(packed.get("per_tensor_activations") or []) - set(packed.get("activation_bits") or {}))
        if unknown:
            raise ValueError(
                f"QuEPTConfig.packed['per_tensor_activations'] names modules without activation bits: {unknown[:4]}"
            )

    def _check_frozen(self) -> None:
        """A frozen checkpoint names, for every frozen module, the bit-widths it keeps codes of (declared ones)."""
        if self.frozen is None:
            return
        frozen = self.frozen
        if not isinstance(frozen, dict) or frozen.get("format") != FROZEN_FORMAT:
            raise ValueError(f"QuEPTConfig.frozen must be a dict with format={FROZEN_FORMAT!r}, got {frozen!r}")
        version = frozen.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"QuEPTConfig.frozen['version']={version!r} must be a positive integer")
        if version > FROZEN_VERSION:
            raise ValueError(
                f"This frozen checkpoint uses frozen format version {version}, but the installed quept_hf reads up "
                f"to version {FROZEN_VERSION}: upgrade quept_hf (pip install -U quept-hf)"
            )
        if self.packed is not None:
            raise ValueError("QuEPTConfig.packed and QuEPTConfig.frozen are exclusive: a checkpoint is one kind")
        widths = frozen.get("bits")
        if not isinstance(widths, dict) or not widths:
            raise ValueError(f"QuEPTConfig.frozen['bits'] must map module names to kept bit-widths, got {widths!r}")
        for name, kept in widths.items():
            if (
                not isinstance(kept, list)
                or not kept
                or any(isinstance(b, bool) or not isinstance(b, int) or b not in self.bits for b in kept)
                or kept != sorted(set(kept))
            ):
                raise ValueError(
                    f"QuEPTConfig.frozen['bits'][{name!r}]={kept!r}: expected a sorted list of distinct bit-widths "
                    f"from bits={self.bits}"
                )
        per_tensor = frozen.get("per_tensor_activations", [])
        if not isinstance(per_tensor, list) or not set(per_tensor) <= set(widths):
            raise ValueError(
                f"QuEPTConfig.frozen['per_tensor_activations'] must list frozen modules, got {per_tensor!r}"
            )

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
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        config_dict = dict(config_dict)
        config_dict.pop("quant_method", None)
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if key in cls._fields():
                setattr(config, key, value)
            else:
                unused[key] = value
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

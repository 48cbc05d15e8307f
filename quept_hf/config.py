"""`QuEPTConfig`: the JSON-safe, validated description of an elastic-precision quantization.

Registered with transformers as quantization method ``"quept"`` (see `quept_hf.quantizer`), so
``from_pretrained(..., quantization_config=QuEPTConfig(...))`` works and ``config.json`` round-trips.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

MODES = ("weight_only", "weight_activation")
MIN_BITS, MAX_BITS = 2, 8
FLOAT_BITS = 16
FORMAT_VERSION = 1

DEFAULT_BIT_GROUPS = {
    "weight_only": [[2], [3, 4], [5, 6], [7, 8]],
    "weight_activation": [[4], [5, 6], [7, 8]],
}
# Spec section 2: learning rates per mode (LLaMA rows of the hyperparameter table).
DEFAULT_LR = {"weight_only": (7e-4, 2e-2), "weight_activation": (7e-5, 1e-1)}
DEFAULT_MERGE_WEIGHTS = {"weight_only": [0.25, 0.25, 0.25, 0.25], "weight_activation": [0.4, 0.3, 0.3]}
TOKEN_MERGE_MODES = ("mbtome", "none", "uniform")
LOSSES = ("l1", "mse")

# Run-time inputs: used by calibration, never serialised into config.json.
RUNTIME_FIELDS = ("dataset", "tokenizer", "image_processor", "processor")


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
        kv_bits: KV-cache bit-width (``None`` = off, an int, or ``"follow"`` the active bit-width).
        modules_to_not_convert: module names (or name suffixes) kept in float besides ``lm_head``.
        seed: seed of every random choice (data windows, bit sampling, adapter init).
        dataset, tokenizer: calibration data and its tokenizer (run-time only, never saved).
        num_samples, seq_len, epochs, batch_size, lr_lora, lr_clip, loss, top_p, merge_weights,
        token_merge, cascade, checkpoint_dir: calibration settings (spec sections 2-4).
        calibrated: set by quept_hf once calibration has run (``False`` for a fresh model).
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
        modules_to_not_convert: list[str] | None = None,
        seed: int = 0,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 2048,
        epochs: int = 15,
        batch_size: int = 2,
        lr_lora: float | None = None,
        lr_clip: float | None = None,
        loss: str = "l1",
        top_p: float = 0.5,
        merge_weights: list[float] | None = None,
        token_merge: str = "mbtome",
        cascade: bool = True,
        checkpoint_dir: str | None = None,
        dataset_description: str | None = None,
        calibrated: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ):
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
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.seed = int(seed)
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples, self.seq_len, self.epochs, self.batch_size = num_samples, seq_len, epochs, batch_size
        default_lora, default_clip = DEFAULT_LR[mode]
        self.lr_lora = float(lr_lora) if lr_lora is not None else default_lora
        self.lr_clip = float(lr_clip) if lr_clip is not None else default_clip
        self.loss = loss
        self.top_p = float(top_p)
        self.merge_weights = list(merge_weights) if merge_weights is not None else self._default_merge()
        self.token_merge = token_merge
        self.cascade = bool(cascade)
        self.checkpoint_dir = checkpoint_dir
        self.dataset_description = dataset_description
        self.calibrated = bool(calibrated)
        self.format_version = int(format_version)
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
        self._check_choice("loss", self.loss, LOSSES)
        self._check_choice("token_merge", self.token_merge, TOKEN_MERGE_MODES)
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
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses QuEPT format version {self.format_version}, but the installed quept_hf "
                f"reads up to version {FORMAT_VERSION}: upgrade quept_hf (pip install -U quept-hf)"
            )

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

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

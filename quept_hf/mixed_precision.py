"""Mixed precision without retraining (spec section 5): sensitivity table, exact bit allocation, switchable plans.

    plans = quept_hf.plan_mixed_precision(model, texts, tokenizer=tok, avg_bits=[2.25, 3.25])
    model.set_adapter("mixed-3.25")                   # or quept_hf.set_bits(model, "mixed-3.25")

One calibrated elastic model already holds every bit-width of every layer, so a mixed plan is only a choice of
bit-width per unit: `sensitivity` measures what each choice costs, `allocate` picks the cheapest choice under a
bit budget (exact dynamic programming), `add_plan` stores the result where ``set_adapter`` / ``set_bits`` find it
(the QuEPTConfig in config.json and the MB-CLoRA adapter config), and the table itself travels with the model as
``quept_sensitivity.safetensors`` so new budgets never need a new measurement.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils.logging import tqdm  # honours transformers.logging.disable_progress_bar()

from .calibration.capture import to_device
from .calibration.data import text_windows
from .compat import cached_file_or_none, unwrap
from .config import quept_config
from .inspection import adapter_configs, quept_linears
from .models import architecture_for
from .nn import FLOAT_BITS, QuEPTLinear

logger = logging.getLogger(__name__)

SENSITIVITY_NAME = "quept_sensitivity.safetensors"
SENSITIVITY_FORMAT = "quept-sensitivity/1"
GRANULARITIES = ("layer", "block")
PLAN_PREFIX = "mixed-"
MAX_DP_CELLS = 200_000_000  # units x budget cells of the DP's choice table (int16): 400 MB at most
_TABLE_ATTR = "_quept_sensitivity"


def plan_name(avg_bits: float) -> str:
    """``mixed-2.25`` for 2.25 bits: the adapter name a plan is switched to with."""
    return f"{PLAN_PREFIX}{float(avg_bits):g}"


# ------------------------------------------------------------------------------------------------ data types


@dataclass
class SensitivityTable:
    """``values[u, j]``: divergence of the model's output from the float model's when unit ``units[u]`` runs at
    ``bits[j]`` and every other unit at ``reference_bits``.

    ``members[unit]`` lists the quantized linears a unit switches (itself for ``"layer"`` granularity, the block's
    linears for ``"block"``); ``params[u]`` counts their weights, which is what a parameter-weighted budget spends.
    ``info`` records how the table was measured (metric, tokens, seconds).
    """

    units: list[str]
    bits: list[int]
    values: torch.Tensor
    params: list[int]
    members: dict[str, list[str]]
    granularity: str = "layer"
    reference_bits: int = 8
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values, dtype=torch.float64)
        self.bits = [int(b) for b in self.bits]
        self.params = [int(p) for p in self.params]
        if tuple(self.values.shape) != (len(self.units), len(self.bits)):
            raise ValueError(
                f"sensitivity values have shape {tuple(self.values.shape)}, expected "
                f"({len(self.units)} units, {len(self.bits)} bit-widths)"
            )
        if len(self.params) != len(self.units) or any(p <= 0 for p in self.params):
            raise ValueError("a sensitivity table needs one positive parameter count per unit")
        if sorted(self.bits) != self.bits or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"sensitivity bit-widths must be sorted and distinct, got {self.bits}")
        missing = [u for u in self.units if u not in self.members]
        if missing:
            raise ValueError(f"sensitivity table lacks the member linears of units {missing[:4]}")

    def value(self, unit: str, bits: int) -> float:
        """``S[unit, bits]``."""
        return float(self.values[self.units.index(unit), self.bits.index(bits)])

    def save(self, path: str | os.PathLike) -> None:
        """safetensors: the values and parameter counts as tensors, names and bit-widths as JSON metadata."""
        metadata = {
            "format": SENSITIVITY_FORMAT,
            "units": json.dumps(self.units),
            "bits": json.dumps(self.bits),
            "members": json.dumps(self.members),
            "granularity": self.granularity,
            "reference_bits": str(self.reference_bits),
            "info": json.dumps(self.info),
        }
        tensors = {"values": self.values.contiguous(), "params": torch.tensor(self.params, dtype=torch.int64)}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityTable:
        with safe_open(os.fspath(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != SENSITIVITY_FORMAT:
                raise ValueError(f"{path} is not a QuEPT sensitivity table (format {meta.get('format')!r})")
            values, params = handle.get_tensor("values"), handle.get_tensor("params")
        return cls(
            units=json.loads(meta["units"]),
            bits=json.loads(meta["bits"]),
            values=values,
            params=params.tolist(),
            members=json.loads(meta["members"]),
            granularity=meta["granularity"],
            reference_bits=int(meta["reference_bits"]),
            info=json.loads(meta.get("info", "{}")),
        )


@dataclass(frozen=True)
class Plan:
    """A bit-width per unit and, expanded, per quantized linear (``bits``), with the average it achieves.

    ``avg_bits`` is parameter-weighted (bits per weight) when ``weighted``, else the plain mean over units;
    ``cost`` is the summed sensitivity the allocation minimised.
    """

    name: str
    target: float
    avg_bits: float
    weighted: bool
    unit_bits: dict[str, int]
    bits: dict[str, int]
    cost: float
    granularity: str = "layer"

    def to_config(self) -> dict[str, Any]:
        """The JSON-safe entry stored under ``QuEPTConfig.plans[name]``."""
        return {
            "avg_bits": self.avg_bits,
            "target": self.target,
            "weighted": self.weighted,
            "granularity": self.granularity,
            "bits": dict(self.bits),
        }


# ---------------------------------------------------------------------------------------------- measurement


@dataclass
class _Unit:
    name: str
    members: list[str]
    params: int
    block: int  # first Transformer block the unit can change (0: the whole model must run)


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    granularity: str = "layer",
    reference_bits: int | None = None,
    bits: Sequence[int] | None = None,
    num_samples: int = 4,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
) -> SensitivityTable:
    """Measure ``S[unit, b] = KL(float output distribution || output with only ``unit`` at ``b``)``.

    Every other unit runs at ``reference_bits`` (default: the highest bit-width), so each entry isolates one unit
    (spec section 5). Units are the quantized linears (``granularity="layer"``) or the Transformer blocks
    (``"block"``; a quantized linear outside every block is its own unit). LM outputs are compared as next-token
    distributions (KL, nats per token); models without logits by relative squared error of their features.

    Args:
        data: calibration texts, token ids (as `quept_hf.calibration.data.text_windows` takes them), or a list of
            ready model-input dicts (e.g. ``{"pixel_values": ...}``) used as they are.
        bits: bit-widths to measure (the choices `allocate` may make); default: every bit-width of the model.
        num_samples, seq_len: token windows measured (ONE seeded set, shared by every entry).

    Why it is fast enough for a full layer table on a CPU (units x bit-widths forwards, e.g. 210 x 6 for
    SmolLM2-135M): the float log-probabilities are computed once; one reference pass records every block's
    output; a unit inside block ``k`` then only runs blocks ``k..end`` and the head (blocks before ``k`` replay
    their recorded outputs, so the model's own forward still builds masks and position embeddings); only the
    swapped unit re-quantizes (every `QuEPTLinear` caches its quantized weight, so the others cost one matmul);
    everything runs under ``torch.no_grad`` in batches of ``batch_size`` windows. An entry thus costs about 0.6 of
    a forward of the windows (half the blocks on average, plus the head). Measured: SmolLM2-135M, 210 layers x 6
    bit-widths on 2 x 128 tokens, 57 min on ONE torch thread of a 2-core machine shared with a load average of
    8-14 (about 16 GFLOP/s); the work is about 54 TFLOP, so an idle 2-core CPU at 60-90 GFLOP/s would need an
    estimated 10-15 min. The cost is linear in ``num_samples x seq_len``. The model's bit-widths are restored
    afterwards.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; allowed: {list(GRANULARITIES)}")
    config = quept_config(model)
    reference = max(config.bits) if reference_bits is None else int(reference_bits)
    if reference not in config.bits and reference != FLOAT_BITS:
        raise ValueError(f"reference_bits={reference} is not one of the model's bits {config.bits} (or 16)")
    candidates = _candidate_bits(config.bits, bits)
    layers = quept_linears(model)
    blocks, block_names = _blocks(model)
    units = _units(layers, block_names, granularity)
    device = next(model.parameters()).device
    batches = [to_device(b, device) for b in _batches(data, tokenizer, num_samples, seq_len, batch_size, seed)]
    saved = {name: layer.active_bits for name, layer in layers.items()}
    was_training = model.training
    model.eval()  # dropout would make every entry a different random draw
    start = time.perf_counter()
    try:
        runner = _Runner(model, blocks, batches)
        values, metric = _measure(runner, layers, units, candidates, reference)
        count = runner.count()
    finally:
        model.train(was_training)
        for name, layer in layers.items():
            layer.set_bits(saved[name])
    seconds = time.perf_counter() - start
    logger.info("QuEPT sensitivity: %d units x %d bit-widths in %.1fs", len(units), len(candidates), seconds)
    return SensitivityTable(
        units=[u.name for u in units],
        bits=candidates,
        values=values,
        params=[u.params for u in units],
        members={u.name: u.members for u in units},
        granularity=granularity,
        reference_bits=reference,
        info={"metric": metric, "num_samples": num_samples, "seq_len": seq_len, "count": count, "seconds": seconds},
    )


def _candidate_bits(model_bits: list[int], bits: Sequence[int] | None) -> list[int]:
    if bits is None:
        return list(model_bits)
    chosen = sorted({int(b) for b in bits})
    unknown = [b for b in chosen if b not in model_bits]
    if unknown or not chosen:
        raise ValueError(f"bits={list(bits)}: {unknown or 'none given'}; this model provides bits {model_bits}")
    return chosen


def _measure(
    runner: _Runner, layers: dict[str, QuEPTLinear], units: list[_Unit], candidates: list[int], reference: int
) -> tuple[torch.Tensor, str]:
    """Float target once, reference pass once, then one suffix run per (unit, bit-width other than the reference)."""
    _set(layers, layers, FLOAT_BITS)
    runner.record_target()
    _set(layers, layers, reference)
    baseline = runner.record_reference()
    values = torch.empty(len(units), len(candidates), dtype=torch.float64)
    for u, unit in enumerate(tqdm(units, desc="QuEPT sensitivity", unit="unit")):
        for j, b in enumerate(candidates):
            if b == reference:
                values[u, j] = baseline
                continue
            _set(layers, unit.members, b)
            values[u, j] = runner.divergence(unit.block)
        _set(layers, unit.members, reference)
    return values, runner.metric


def _set(layers: dict[str, QuEPTLinear], names: Iterable[str], bits: int) -> None:
    """Switch quantizers directly: an MB-CLoRA layer's delta follows its base layer's active bit-width."""
    for name in names:
        layers[name].set_bits(bits)


def _blocks(model: nn.Module) -> tuple[list[nn.Module], list[str]]:
    """The Transformer blocks and their module names (relative to the transformers model); none if unknown."""
    base = unwrap(model)
    try:
        blocks = list(architecture_for(model).blocks(base))
    except ValueError:
        return [], []
    names = {id(module): name for name, module in base.named_modules()}
    return blocks, [names[id(block)] for block in blocks]


def _units(layers: dict[str, QuEPTLinear], block_names: list[str], granularity: str) -> list[_Unit]:
    def block_of(name: str) -> int | None:
        return next((k for k, b in enumerate(block_names) if name.startswith(b + ".")), None)

    if granularity == "block" and not block_names:
        raise ValueError("granularity='block' needs a model whose Transformer blocks quept_hf knows; use 'layer'")
    units: dict[str, _Unit] = {}
    for name, layer in layers.items():
        k = block_of(name)
        key = block_names[k] if granularity == "block" and k is not None else name
        unit = units.setdefault(key, _Unit(key, [], 0, k or 0))
        unit.members.append(name)
        unit.params += layer.in_features * layer.out_features
    return list(units.values())


def _batches(data: Any, tokenizer: Any, num_samples: int, seq_len: int, batch_size: int, seed: int) -> list[dict]:
    if isinstance(data, Sequence) and data and all(isinstance(b, Mapping) for b in data):
        return [dict(b) for b in data]
    ids = text_windows(data, tokenizer, num_samples, seq_len, seed)
    return [{"input_ids": ids[i : i + batch_size]} for i in range(0, len(ids), batch_size)]


class _Runner:
    """Runs the model on fixed batches: float target, recorded reference pass, and suffix-only runs."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], batches: list[dict]):
        self.model, self.blocks, self.batches = model, blocks, batches
        self.targets: list[torch.Tensor] = []
        self.recorded: list[list[Any]] = []  # recorded[batch][block] = that block's output
        self.metric = "kl"

    def _output(self, batch: dict) -> torch.Tensor:
        out = self.model(**batch, use_cache=False) if "input_ids" in batch else self.model(**batch)
        logits = getattr(out, "logits", None)
        if logits is not None:
            return logits.float()
        self.metric = "relative_mse"  # a feature extractor: its outputs are no distribution
        features = getattr(out, "last_hidden_state", None)
        return (features if features is not None else out[0]).float()

    def record_target(self) -> None:
        self.targets = [self._reference_form(self._output(batch)) for batch in self.batches]

    def _reference_form(self, out: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(out, dim=-1) if self.metric == "kl" else out

    def record_reference(self) -> float:
        """Run at the reference bit-width once, recording every block's output; returns its divergence."""
        self.recorded = []
        total = 0.0
        for batch, target in zip(self.batches, self.targets, strict=True):
            outputs: list[Any] = [None] * len(self.blocks)
            with _recording(self.blocks, outputs):
                total += self._divergence(self._output(batch), target)
            self.recorded.append(outputs)
        return total / self.count()

    def divergence(self, first_block: int) -> float:
        """Divergence with blocks before ``first_block`` replaying their recorded reference outputs."""
        total = 0.0
        for index, (batch, target) in enumerate(zip(self.batches, self.targets, strict=True)):
            with _replaying(self.blocks[:first_block], self.recorded[index][:first_block]):
                total += self._divergence(self._output(batch), target)
        return total / self.count()

    def _divergence(self, out: torch.Tensor, target: torch.Tensor) -> float:
        if self.metric == "kl":
            return float(F.kl_div(F.log_softmax(out, dim=-1), target, log_target=True, reduction="sum"))
        error = (out - target).pow(2).flatten(1).sum(1) / target.pow(2).flatten(1).sum(1).clamp_min(1e-30)
        return float(error.sum())

    def count(self) -> int:
        """Tokens (KL is summed per token) or samples (relative error is per sample)."""
        if self.metric == "kl":
            return sum(int(t[..., 0].numel()) for t in self.targets)
        return sum(int(t.shape[0]) for t in self.targets)


@contextlib.contextmanager
def _recording(blocks: list[nn.Module], outputs: list[Any]) -> Iterator[None]:
    def hook(index: int):
        def fn(module, args, output):
            # A copy: a later in-place update of the returned tensor must not change the recording.
            outputs[index] = output.clone() if isinstance(output, torch.Tensor) else output

        return fn

    handles = [block.register_forward_hook(hook(k)) for k, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replaying(blocks: list[nn.Module], outputs: list[Any]) -> Iterator[None]:
    """Blocks return their recorded output without computing (instance ``forward`` overrides, undone after)."""
    for block, output in zip(blocks, outputs, strict=True):
        block.forward = _Replay(output)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class _Replay:
    def __init__(self, output: Any):
        self.output = output

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


# ----------------------------------------------------------------------------------------------- allocation


def allocate(table: SensitivityTable, avg_bits: float, weighted: bool = True, name: str | None = None) -> Plan:
    """The plan minimising the summed sensitivity whose average bit-width is at most ``avg_bits`` (exact DP).

    ``weighted=True`` budgets bits per weight (``sum(params_u * b_u) <= avg_bits * sum(params_u)``: the number
    that sets the memory); ``False`` budgets the plain mean over units (``sum(b_u) <= avg_bits * units``, the
    paper's form). Budgets are integers: each unit's extra cost over the lowest bit-width, ``w_u * (b - b_min)``,
    is divided by the gcd of all of them, and the fractional target (2.25 read as exactly 9/4) is floored once,
    so the DP is exact with no rounding of the constraint. Among equally cheap plans the one spending the most of
    the budget wins. An ``avg_bits`` outside ``[min(bits), max(bits)]`` is a ValueError naming that range.
    """
    target = _exact(avg_bits)
    low, high = min(table.bits), max(table.bits)
    if not low <= target <= high:
        raise ValueError(
            f"avg_bits={avg_bits} is infeasible for this table: the feasible range is [{low}, {high}] bits "
            f"({'parameter-weighted' if weighted else 'per-unit'} average)"
        )
    values = table.values.numpy()
    if not np.isfinite(values).all():
        raise ValueError("the sensitivity table holds NaN or infinite entries; measure it again")
    weights = np.asarray(table.params if weighted else [1] * len(table.units), dtype=np.int64)
    extra = weights[:, None] * (np.asarray(table.bits, dtype=np.int64)[None, :] - low)
    capacity = math.floor(target * int(weights.sum())) - low * int(weights.sum())
    step = math.gcd(*extra.flatten().tolist()) or 1
    picks = _knapsack(values, extra // step, capacity // step)
    unit_bits = {u: table.bits[j] for u, j in zip(table.units, picks, strict=True)}
    spent = sum(int(w) * b for w, b in zip(weights, unit_bits.values(), strict=True))
    return Plan(
        name=name or plan_name(avg_bits),
        target=float(avg_bits),
        avg_bits=spent / int(weights.sum()),
        weighted=weighted,
        unit_bits=unit_bits,
        bits={m: unit_bits[u] for u in table.units for m in table.members[u]},
        cost=float(sum(values[i, j] for i, j in enumerate(picks))),
        granularity=table.granularity,
    )


def _exact(avg_bits: float) -> Fraction:
    """2.25 -> 9/4 exactly (a float's decimal spelling, not its binary approximation)."""
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float, Fraction)):
        raise ValueError(f"avg_bits={avg_bits!r} must be a number")
    if isinstance(avg_bits, float) and not math.isfinite(avg_bits):
        raise ValueError(f"avg_bits={avg_bits!r} must be finite")
    return Fraction(repr(avg_bits)) if isinstance(avg_bits, float) else Fraction(avg_bits)


def _knapsack(costs: np.ndarray, weights: np.ndarray, capacity: int) -> list[int]:
    """Multiple-choice knapsack, exact: one choice per row, summed weight <= capacity, minimal summed cost.

    ``best[c]`` is the cheapest summed cost of the rows so far with summed weight EXACTLY ``c``; ``choice[i, c]``
    remembers which column row ``i`` took to get there, for the backtrack.
    """
    rows, cols = costs.shape
    if rows * (capacity + 1) > MAX_DP_CELLS:
        raise ValueError(
            f"the bit budget needs a {rows} x {capacity + 1} DP table; use granularity='block' or weighted=False"
        )
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((rows, capacity + 1), dtype=np.int16)
    for i in range(rows):
        new = np.full(capacity + 1, np.inf)
        for j in range(cols):
            w = int(weights[i, j])
            if w > capacity:
                continue
            candidate = best[: capacity + 1 - w] + costs[i, j]
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            choice[i, w:][better] = j
        best = new
    finite = np.isfinite(best)
    cell = int(np.flatnonzero(finite & (best == best[finite].min()))[-1])
    picks = [0] * rows
    for i in reversed(range(rows)):
        picks[i] = int(choice[i, cell])
        cell -= int(weights[i, picks[i]])
    return picks


# ------------------------------------------------------------------------------------------ plans on models


def add_plan(model: nn.Module, plan: Plan) -> None:
    """Store ``plan`` where switching finds it: ``QuEPTConfig.plans`` (config.json) and the MB-CLoRA adapter
    config's ``plans`` (adapter_config.json), so ``set_adapter(plan.name)`` and ``set_bits(model, plan.name)``
    both work now and after ``save_pretrained`` / ``from_pretrained``."""
    config = quept_config(model)
    layers = quept_linears(model)
    unknown = sorted(set(plan.bits) - set(layers))
    if unknown:
        raise ValueError(f"plan {plan.name!r} names modules this model lacks: {unknown[:4]}")
    bad = sorted({b for b in plan.bits.values() if b not in config.bits})
    if bad:
        raise ValueError(f"plan {plan.name!r} uses bit-widths {bad} this model lacks (it has {config.bits})")
    config.plans[plan.name] = plan.to_config()
    for adapter in adapter_configs(model):
        adapter.plans[plan.name] = dict(plan.bits)


def plan_mixed_precision(
    model: nn.Module,
    data: Any = None,
    tokenizer: Any = None,
    avg_bits: float | Sequence[float] = (2.25, 3.25),
    weighted: bool = True,
    granularity: str = "layer",
    table: SensitivityTable | None = None,
    **sensitivity_kwargs: Any,
) -> dict[str, Plan]:
    """Measure (or reuse) the sensitivity table, allocate one plan per target and store each as ``mixed-{avg}``.

    With ``data`` the table is measured (`sensitivity`, extra keyword arguments go there); without it the table
    given as ``table``, or the one the model carries (measured earlier, or loaded with it by ``from_pretrained``),
    is reused, so new budgets cost milliseconds. The table is kept on the model and saved next to it by
    ``save_pretrained`` (``quept_sensitivity.safetensors``). Returns ``{plan name: Plan}``.
    """
    if table is None and data is not None:
        table = sensitivity(model, data, tokenizer=tokenizer, granularity=granularity, **sensitivity_kwargs)
    elif table is None:
        table = load_sensitivity(model)
    attach_sensitivity(model, table)
    targets = [avg_bits] if isinstance(avg_bits, (int, float, Fraction)) else list(avg_bits)
    plans = {}
    for target in targets:
        plan = allocate(table, target, weighted=weighted)
        add_plan(model, plan)
        plans[plan.name] = plan
    return plans


# ----------------------------------------------------------------------------------------------- persistence


def attach_sensitivity(model: nn.Module, table: SensitivityTable) -> None:
    """Keep ``table`` on the model; its saves write it next to the weights (`save_sensitivity`)."""
    setattr(unwrap(model), _TABLE_ATTR, table)


def attached_sensitivity(model: nn.Module) -> SensitivityTable | None:
    """The sensitivity table the model carries (measured or loaded), or None."""
    return getattr(unwrap(model), _TABLE_ATTR, None)


def save_sensitivity(model: nn.Module, save_directory: str | os.PathLike) -> bool:
    """Write the model's table as ``quept_sensitivity.safetensors`` into ``save_directory`` (True if it had one)."""
    table = attached_sensitivity(model)
    if table is None:
        return False
    os.makedirs(save_directory, exist_ok=True)
    table.save(os.path.join(os.fspath(save_directory), SENSITIVITY_NAME))
    return True


def load_sensitivity(source: nn.Module | str | os.PathLike) -> SensitivityTable:
    """The sensitivity table of a folder (or Hub repo id), or of a model: the one it carries, else the one saved
    in the folder it was loaded from. A clear error says how to measure one when there is none."""
    if isinstance(source, nn.Module):
        table = attached_sensitivity(source)
        if table is not None:
            return table
        folder = getattr(getattr(unwrap(source), "config", None), "name_or_path", None)
    else:
        folder = os.fspath(source)
    path = _resolve(folder) if folder else None
    if path is None:
        raise ValueError(
            f"no sensitivity table found (looked for {SENSITIVITY_NAME} in {folder!r}): measure one with "
            "quept_hf.plan_mixed_precision(model, data, tokenizer=...) or quept_hf.mixed_precision.sensitivity(...)"
        )
    table = SensitivityTable.load(path)
    if isinstance(source, nn.Module):
        attach_sensitivity(source, table)
    return table


def _resolve(folder: str) -> str | None:
    """Local file, else the Hub's copy (``None`` when the repo has no table or cannot be reached)."""
    local = os.path.join(folder, SENSITIVITY_NAME)
    if os.path.isfile(local):
        return local
    if os.path.isdir(folder):
        return None
    try:
        return cached_file_or_none(folder, SENSITIVITY_NAME)
    except (OSError, ValueError):
        return None


def attach_saved_sensitivity(model: nn.Module) -> None:
    """At ``from_pretrained`` of a local folder: carry the folder's sensitivity table, if it holds one."""
    folder = getattr(getattr(model, "config", None), "name_or_path", None)
    if folder and os.path.isfile(os.path.join(folder, SENSITIVITY_NAME)):
        attach_sensitivity(model, SensitivityTable.load(os.path.join(folder, SENSITIVITY_NAME)))

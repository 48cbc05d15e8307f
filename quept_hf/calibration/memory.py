"""Peak-memory plan of a calibration, before it starts: what is resident where, and whether one block fits.

Block-wise calibration holds, besides the weights accelerate keeps resident, ONE block on the compute device (its
weights, MB-CLoRA slices, clipping logits, their gradients and AdamW moments, the fake-quantized weights of the
autograd graph, and the graph's activations of one batch) and the calibration activations (float inputs and
targets, one quantized stream per bit group, one more being built), in RAM or memory-mapped on disk
(``QuEPTConfig(activations_dir=...)``). `plan` adds these up from shapes alone (it works on meta tensors) and
refuses early, naming what does not fit, when even one block does not.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from accelerate.utils import named_module_tensors
from torch import nn

from ..compat import unwrap
from ..config import QuEPTConfig
from ..models import architecture_for
from ..nn import QuEPTLinear
from .offload import offloaded_units

logger = logging.getLogger(__name__)

__all__ = ["MemoryPlan", "available_memory", "plan"]

# fp32 copies of a block's weights at the peak: W + delta, its groups, clipped and rounded copies in the autograd
# graph, the float and the cached weight (fit to the measured 1.5B peak, docs/RESULTS.md)
GRAPH_WEIGHT_COPIES = 8
# With gradient checkpointing: one cached quantized copy of every layer (the no-grad forwards that build the next
# block's inputs) and about one more that the allocator keeps from the backward's recomputes (fit to the 1.5B run of
# session 9: 971 MiB over the RSS at the start against 930 planned; without checkpointing 1564 against 1610)
CHECKPOINTED_WEIGHT_COPIES = 2
GRAPH_ACTIVATIONS_PER_TOKEN = 14  # hidden-sized tensors the autograd graph keeps per token of a decoder block
GiB = 2**30


@dataclasses.dataclass
class MemoryPlan:
    """Bytes by role; ``str(plan)`` is the log line calibration starts with."""

    device: str
    resident_weights: int  # weights accelerate keeps in memory (not offloaded)
    offloaded_weights: dict[str, int]  # "disk" / "cpu": bytes accelerate offloads there
    block_weights: int  # the largest block's tensors, loaded on the compute device
    block_training: int  # trainable slices and clipping logits with gradients and AdamW moments
    block_graph: int  # autograd graph of one batch through one block (estimate)
    activations: int  # calibration activations (all streams)
    activations_dir: str | None  # memory-mapped there, or in RAM
    gradient_checkpointing: bool  # the graph holds one layer's weight copies, not the block's
    available: int | None  # free memory of the compute device (RAM for the CPU) when measured

    @property
    def block_peak(self) -> int:
        return self.block_weights + self.block_training + self.block_graph

    @property
    def ram_peak(self) -> int:
        """What the CPU holds at the peak: resident weights, activations in RAM, a CPU-computed block."""
        ram = self.resident_weights + (0 if self.activations_dir else self.activations)
        return ram + (self.block_peak if self.device == "cpu" else 0)

    def __str__(self) -> str:
        offloaded = ", ".join(f"{_gib(b)} on {where}" for where, b in sorted(self.offloaded_weights.items())) or "none"
        where = f"memory-mapped in {self.activations_dir}" if self.activations_dir else "in RAM"
        free = "" if self.available is None else f" of {_gib(self.available)} available"
        return (
            f"QuEPT memory plan: resident weights {_gib(self.resident_weights)}, offloaded {offloaded}; one block at a "
            f"time on {self.device}: {_gib(self.block_weights)} weights + {_gib(self.block_training)} trainable state "
            f"+ ~{_gib(self.block_graph)} autograd graph; activations {_gib(self.activations)} {where}; "
            f"peak ~{_gib(self.block_peak)} on {self.device}{free}, ~{_gib(self.ram_peak)} in RAM"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _hidden_size(block: nn.Module) -> int:
    """Width of the hidden states a block reads: the input width of its first linear layer."""
    first = next((m for m in block.modules() if isinstance(m, (QuEPTLinear, nn.Linear))), None)
    return first.in_features if first is not None else 0


def _block_bytes(block: nn.Module) -> int:
    return _bytes(t for _, t in named_module_tensors(block, include_buffers=True, recurse=True))


def _block_training(block: nn.Module, config: QuEPTConfig) -> int:
    """Trainable tensors x 4 (value, gradient, two AdamW moments); adapters not attached yet from the ranks."""
    trainable = 0
    for name, tensor in named_module_tensors(block, recurse=True):
        if "mbclora_" in name or ".clip_" in name or name.startswith("clip_"):
            trainable += tensor.numel() * tensor.element_size()
    if not any("mbclora_" in n for n, _ in block.named_parameters()):
        for layer in block.modules():
            if isinstance(layer, QuEPTLinear):
                trainable += sum(config.ranks) * (layer.in_features + layer.out_features) * layer.weight.element_size()
    return 4 * trainable


def _block_graph(block: nn.Module, config: QuEPTConfig, hidden: int) -> int:
    """Weight copies of the autograd graph plus the activations it keeps. With ``gradient_checkpointing`` the graph
    holds one layer's copies at a time (recomputed in backward), next to `CHECKPOINTED_WEIGHT_COPIES` of every
    layer."""
    layers = [m for m in block.modules() if isinstance(m, QuEPTLinear)]
    sizes = [m.in_features * m.out_features for m in layers]
    if config.gradient_checkpointing:
        weights = (CHECKPOINTED_WEIGHT_COPIES * sum(sizes) + GRAPH_WEIGHT_COPIES * max(sizes, default=0)) * 4
    else:
        weights = sum(sizes) * 4 * GRAPH_WEIGHT_COPIES
    widest = max((max(m.in_features, m.out_features) for m in layers), default=hidden)
    tokens = config.batch_size * config.seq_len
    return weights + tokens * (GRAPH_ACTIVATIONS_PER_TOKEN * hidden + 3 * widest) * 4


def available_memory(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (MemAvailable for the CPU), None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def plan(
    model: nn.Module, config: QuEPTConfig, device: torch.device | str | None = None, check: bool = False
) -> MemoryPlan:
    """The peak-memory plan of calibrating ``model`` with ``config`` (a `QuEPTConfig`: its ``num_samples``,
    ``seq_len``, ``batch_size``, ``bit_groups``, ``token_merge``, ``ranks``, ``activations_dir`` and
    ``gradient_checkpointing`` count).

    ``device`` defaults to CUDA when available, else the CPU. With ``check=True`` a MemoryError names what does not
    fit: one block on the compute device, or (activations in RAM) the activations next to it."""
    model = unwrap(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    blocks = [b for chain in architecture_for(model).chains(model, config.quantize_vision_tower) for b in chain.blocks]
    largest = max(blocks, key=_block_bytes)
    hidden = _hidden_size(largest)
    offloaded: dict[str, int] = {}
    device_map = getattr(model, "hf_device_map", None) or {}
    units = offloaded_units(model)
    for name, unit in units.items():
        where = "disk" if device_map.get(name) == "disk" else "cpu"
        offloaded[where] = offloaded.get(where, 0) + _bytes(p for _, p in named_module_tensors(unit, recurse=True))
    resident = _bytes(t for t in model.state_dict().values() if t.device.type != "meta")
    streams = len(config.bit_groups) if config.token_merge == "separate" else 1
    element = next(p for p in largest.parameters() if p.is_floating_point()).element_size()
    activation = config.num_samples * config.seq_len * hidden * element
    result = MemoryPlan(
        device=device.type,
        resident_weights=resident,
        offloaded_weights=offloaded,
        block_weights=_block_bytes(largest),
        block_training=_block_training(largest, config),
        block_graph=_block_graph(largest, config, hidden),
        activations=(3 + streams) * activation,
        activations_dir=config.activations_dir,
        gradient_checkpointing=config.gradient_checkpointing,
        available=available_memory(device),
    )
    if check:
        _check(result)
    return result


def _check(result: MemoryPlan) -> None:
    """Refuse before any work when one block (or the RAM-resident activations next to it) cannot fit."""
    if result.available is None:
        return
    if result.block_peak > result.available:
        raise MemoryError(
            f"QuEPT calibration needs ~{_gib(result.block_peak)} on {result.device} for ONE block "
            f"({_gib(result.block_weights)} weights, {_gib(result.block_training)} trainable state, "
            f"~{_gib(result.block_graph)} autograd graph) but {_gib(result.available)} is free: "
            f"{'' if result.gradient_checkpointing else 'set QuEPTConfig(gradient_checkpointing=True), '}lower "
            "batch_size / seq_len, or calibrate on a larger device"
        )
    extra = result.block_peak if result.device == "cpu" else 0
    if not result.activations_dir and result.activations + extra > result.available:
        raise MemoryError(
            f"QuEPT calibration activations need {_gib(result.activations)} in RAM (plus ~{_gib(extra)} for the "
            f"block) but {_gib(result.available)} is free: set QuEPTConfig(activations_dir=...) to memory-map them on "
            "disk, or lower num_samples / seq_len"
        )

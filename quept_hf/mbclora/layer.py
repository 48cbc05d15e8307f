"""`MBCLoRALayer`: the cascaded multi-bit low-rank delta around a `QuEPTLinear` (spec section 3)."""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..nn import QuEPTLinear
from .config import MBCLoRAConfig


class MBCLoRALayer(nn.Module, BaseTunerLayer):
    """Wraps a `QuEPTLinear` (``base_layer``) and feeds it the weight delta of the active bit-width.

    Storage is one (A, B) slice pair per bit GROUP, in cascade order (highest group first):
    ``mbclora_A[adapter][k]`` has shape (rank_k, in) and ``mbclora_B[adapter][k]`` (out, rank_k). A bit-width
    of cascade position k uses slices 0..k, so group-mates share the very same tensors.
    Active adapters are bit-width names (``w4``), mixed plans, or the elastic adapter's own name.
    """

    adapter_layer_names = ("mbclora_A", "mbclora_B")
    other_param_names = ()

    def __init__(self, base_layer: QuEPTLinear, adapter_name: str, config: MBCLoRAConfig, module_name: str = ""):
        super().__init__()
        BaseTunerLayer.__init__(self)
        if not isinstance(base_layer, QuEPTLinear):
            raise TypeError(
                f"MB-CLoRA adapts QuEPTLinear layers only, got {type(base_layer).__name__} at {module_name!r}: "
                "quantize the model with QuEPTConfig first"
            )
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.mbclora_A = nn.ModuleDict()
        self.mbclora_B = nn.ModuleDict()
        self.elastic: dict[str, MBCLoRAConfig] = {}
        self.owned_gradients = False
        self._disable_adapters = False
        self.merged_adapters = []
        self.update_layer(adapter_name, config)

    # ------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, config: MBCLoRAConfig) -> None:
        """Create the cascade slices of one elastic adapter (one slice pair per bit group)."""
        groups_high_first = list(reversed(config.bit_groups))
        ranks_high_first = list(reversed(config.ranks))
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else None}
        a_slices = nn.ParameterList(nn.Parameter(torch.zeros(r, self.in_features, **factory)) for r in ranks_high_first)
        b_slices = nn.ParameterList(
            nn.Parameter(torch.zeros(self.out_features, r, **factory)) for r in ranks_high_first
        )
        if config.init_weights and weight.device.type != "meta":
            for a in a_slices:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.mbclora_A[adapter_name] = a_slices
        self.mbclora_B[adapter_name] = b_slices
        self.elastic[adapter_name] = config
        self._cascade_index = {b: k for k, group in enumerate(groups_high_first) for b in group}
        self.set_adapter(adapter_name)

    def _root(self) -> str:
        if len(self.elastic) != 1:
            raise ValueError(f"expected one elastic MB-CLoRA adapter, found {list(self.elastic)}")
        return next(iter(self.elastic))

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Activate a bit-width adapter: the base layer switches bits, the delta follows the cascade."""
        name = adapter_names if isinstance(adapter_names, str) else adapter_names[0]
        if isinstance(adapter_names, list) and len(adapter_names) != 1:
            raise ValueError(f"MB-CLoRA runs one bit-width at a time, got adapters {adapter_names}")
        root = self._root()
        self.base_layer.set_bits(self.elastic[root].bits_for(name, self.module_name, root))
        self._active_adapter = [name]

    def cascade_slices(self, bits: int) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The (A, B) slices that make the delta of ``bits``: every group from the highest down to its own."""
        root = self._root()
        k = self._cascade_index[bits]
        a_slices, b_slices = self.mbclora_A[root], self.mbclora_B[root]
        if not self.elastic[root].cascade:
            return [a_slices[k]], [b_slices[k]]
        return list(a_slices)[: k + 1], list(b_slices)[: k + 1]

    def group_parameters(self, group: list[int]) -> list[nn.Parameter]:
        """The slice pair owned by a bit group (to train or freeze it on its own)."""
        root = self._root()
        k = self._cascade_index[group[0]]
        return [self.mbclora_A[root][k], self.mbclora_B[root][k]]

    def delta_weight(self, bits: int) -> torch.Tensor:
        """``B[:, :R(b)] @ A[:R(b), :]`` for bit-width ``bits``.

        With ``owned_gradients`` (set by calibration), the slices of higher groups take part in the delta but
        get no gradient from this bit-width: each group's slice is trained by its own group's loss only.
        """
        a_slices, b_slices = self.cascade_slices(bits)
        if self.owned_gradients:
            a_slices = [a.detach() for a in a_slices[:-1]] + a_slices[-1:]
            b_slices = [b.detach() for b in b_slices[:-1]] + b_slices[-1:]
        return torch.cat(list(b_slices), dim=1) @ torch.cat(list(a_slices), dim=0)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged or self.base_layer.is_float:
            return self.base_layer(x)
        return self.base_layer(x, delta=_CascadeDelta(self, self.base_layer.active_bits))

    # ----------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Bake the active bit-width into the base layer: W <- W + delta_b, and only b stays available."""
        if self.merged:
            return
        bits = self.base_layer.active_bits
        with torch.no_grad():
            merged = self.base_layer.weight + self.delta_weight(bits).to(self.base_layer.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging {self.module_name} at {bits} bits gives non-finite weights")
            self.base_layer.weight.data = merged
        self.base_layer.restrict_to(bits)
        self.merged_adapters.append(self.active_adapters[0])

    def unmerge(self) -> None:
        raise ValueError("MB-CLoRA merges are final: the merged layer keeps only one bit-width")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        root = self._root()
        return self.delta_weight(self.elastic[root].bits_for(adapter, self.module_name, root))

    def __repr__(self) -> str:
        return "mbclora." + super().__repr__()


class _CascadeDelta:
    """The `WeightDelta` a `MBCLoRALayer` hands to its `QuEPTLinear` (computed only on a cache miss)."""

    def __init__(self, layer: MBCLoRALayer, bits: int):
        self.layer, self.bits = layer, bits
        self.slices = [p for pair in zip(*layer.cascade_slices(bits), strict=True) for p in pair]
        self.requires_grad = any(p.requires_grad for p in self.slices)

    def __call__(self) -> torch.Tensor:
        return self.layer.delta_weight(self.bits)

    def cache_key(self) -> tuple:
        return ("mbclora", self.bits, *((p._version, p.data_ptr()) for p in self.slices))

"""`MBCLoRAConfig`: the PEFT config of MB-CLoRA, multi-bit cascaded low-rank adapters (spec section 3)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft import PeftConfig

from ..compat import register_peft_type
from ..naming import adapter_name_for_bits, bits_of_adapter_name

PEFT_TYPE_NAME = "MBCLORA"


MBCLORA = register_peft_type(PEFT_TYPE_NAME)  # peft's PeftType has no public way to add a member


@dataclass
class MBCLoRAConfig(PeftConfig):
    """One elastic adapter holding a low-rank weight delta for every bit-width, in cascade.

    Injecting it creates one adapter per bit-width, named ``w2`` ... ``w8``, switched with ``set_adapter``.
    Ranks cascade from the highest bit group down: ``delta_b = B[:, :R(b)] @ A[:R(b), :]`` where ``R(b)`` is the
    summed rank of b's group and every higher group, so lower bit-widths get more rank and share the
    high-bit components (spec section 3).
    """

    bit_groups: list[list[int]] | None = field(
        default=None, metadata={"help": "Bit groups, low to high; default: the model's QuEPTConfig.bit_groups"}
    )
    ranks: list[int] | None = field(
        default=None, metadata={"help": "Rank each group adds to the cascade (same order as bit_groups)"}
    )
    default_bits: int | None = field(default=None, metadata={"help": "Bit-width of the adapter's own name"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to adapt; default: every QuEPTLinear of the model"}
    )
    cascade: bool = field(default=True, metadata={"help": "False: each group has an independent delta (ablation)"})
    init_weights: bool = field(default=True, metadata={"help": "B = 0 and A Kaiming-uniform, so delta starts at 0"})
    plans: dict[str, dict[str, int]] = field(
        default_factory=dict, metadata={"help": "Mixed-precision plans: adapter name -> {module name: bits}"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MBCLORA
        if self.bit_groups is not None:
            self.bit_groups = [sorted(int(b) for b in group) for group in self.bit_groups]
        if self.ranks is not None and self.bit_groups is not None and len(self.ranks) != len(self.bit_groups):
            raise ValueError(
                f"MBCLoRAConfig.ranks={self.ranks} needs one rank per bit group ({len(self.bit_groups)} groups)"
            )
        if self.ranks is not None and any(int(r) <= 0 for r in self.ranks):
            raise ValueError(f"MBCLoRAConfig.ranks={self.ranks} must be positive")

    @property
    def bits(self) -> list[int]:
        return sorted(b for group in self.bit_groups or [] for b in group)

    def adapter_names(self) -> list[str]:
        """The bit-width adapters this elastic adapter provides, low to high, then any mixed plans."""
        return [adapter_name_for_bits(b) for b in self.bits] + list(self.plans)

    def bits_for(self, adapter_name: str, module_name: str, root_name: str) -> int:
        """Bit-width a module runs at when ``adapter_name`` is active (a ValueError lists what exists)."""
        if adapter_name == root_name:
            return int(self.default_bits or max(self.bits))
        bits = bits_of_adapter_name(adapter_name)
        if bits in self.bits:
            return bits
        if adapter_name in self.plans:
            return int(self.plans[adapter_name].get(module_name, self.default_bits or max(self.bits)))
        raise ValueError(
            f"adapter {adapter_name!r} does not exist; available adapters: {[root_name, *self.adapter_names()]}"
        )

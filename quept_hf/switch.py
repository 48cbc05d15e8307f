"""Run-time bit switching: `set_bits` / `get_bits` on a transformers model or a PEFT wrapper of it.

With MB-CLoRA adapters attached, ``set_bits(model, b)`` is exactly ``set_adapter(f"w{b}")`` (the weight
bit-width, the activation bit-width and the low-rank delta all follow); without adapters it only switches the
quantizers. ``16`` runs the float weights without any delta, for reference. Mixed precision: a stored plan's
name (``set_bits(model, "mixed-3.25")``, the same as ``set_adapter("mixed-3.25")``) or a hand-made mapping
``{module name: bits}`` sets a bit-width per quantized linear; ``get_bits`` then returns that mapping.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .compat import has_peft_adapters, override_method
from .config import QuEPTConfig, quept_config
from .inspection import adapter_configs, frozen_linears, mbclora_layers, quept_linears
from .mbclora.layer import MBCLoRALayer
from .mbclora.model import INJECTION_HOOKS, ElasticAdapters
from .naming import FLOAT_BITS, adapter_name_for_bits


def set_bits(model: nn.Module, bits: int | str | Mapping[str, int]) -> None:
    """Switch the whole model to ``bits``; ``16`` runs the float weights (no quantization, no delta).

    With MB-CLoRA adapters this is the same operation as ``set_adapter(f"w{bits}")``, through whichever
    front door the model has: a ``peft.PeftModel``'s, the transformers model's PEFT integration, or (for a
    bare injected model) every adapter layer's. Without adapters only the quantizers switch.

    ``bits`` may also be a stored mixed plan's name (``"mixed-3.25"``: exactly ``set_adapter("mixed-3.25")``)
    or a mapping ``{module name: bits}`` (a hand-made plan; modules it leaves out keep their bit-width).
    """
    _refuse_packed(model)
    if isinstance(bits, Mapping):
        set_layer_bits(model, bits)
        return
    if isinstance(bits, str):
        _set_plan(model, bits)
        return
    config = quept_config(model)
    floats = [] if config.is_frozen else [FLOAT_BITS]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in [*config.bits, *floats]:
        raise ValueError(
            f"set_bits: bits={bits!r} is not available; this model provides bit-widths {config.bits}"
            f"{'' if config.is_frozen else ' (or 16, float)'}, plan names {sorted(config.plans)} or a "
            "{module: bits} mapping"
        )
    if config.is_frozen:  # every layer keeps its own widths: check them all before switching any
        layers = frozen_linears(model)
        _switch_layers(layers, dict.fromkeys(layers, bits), config)
        return
    adapters = list(mbclora_layers(model).values())
    if not adapters or bits == FLOAT_BITS:
        # Float reference: MBCLoRALayer.forward skips the delta whenever its base layer runs in float.
        for layer in quept_linears(model).values():
            layer.set_bits(bits)
        return
    _activate(model, adapters, adapter_name_for_bits(bits))


def _activate(model: nn.Module, adapters: list[MBCLoRALayer], name: str) -> None:
    """``set_adapter(name)`` through the model's own front door (see `set_bits`)."""
    if _is_peft_model(model) or has_peft_adapters(model):
        model.set_adapter(name)
    else:
        for layer in adapters:
            layer.set_adapter(name)


def _set_plan(model: nn.Module, name: str) -> None:
    """A stored plan by name: through ``set_adapter`` when adapters are attached, else layer by layer."""
    config = quept_config(model)
    if name not in config.plans:
        available = [adapter_name_for_bits(b) for b in config.bits] + sorted(config.plans)
        if name in available:
            set_bits(model, config.bits[available.index(name)])
            return
        raise ValueError(f"no bit-width or plan named {name!r}; this model provides {available}")
    plan = {module: int(b) for module, b in config.plans[name]["bits"].items()}
    check_plans(model)
    adapters = list(mbclora_layers(model).values())
    if not adapters:
        set_layer_bits(model, plan)
        return
    for elastic in adapter_configs(model):  # a plan made before the adapter was attached: teach it the plan
        elastic.plans.setdefault(name, plan)
    _activate(model, adapters, name)


def check_plans(model: nn.Module) -> None:
    """Every stored mixed plan (config.json's and the MB-CLoRA adapter's) names quantized linears of this model at
    widths they keep: a plan naming other modules would switch nothing and still answer to its name."""
    layers = switchable_layers(model)
    plans = {name: entry["bits"] for name, entry in quept_config(model).plans.items()}
    for elastic in adapter_configs(model):
        plans.update(elastic.plans)
    for name, plan in plans.items():
        unknown = sorted(set(plan) - set(layers))
        if unknown:
            raise ValueError(
                f"mixed plan {name!r} names {len(unknown)} module(s) that are not quantized linears of this model, "
                f"e.g. {unknown[:3]} (quantized linears are named like {sorted(layers)[:2]}); re-plan with "
                "quept_hf.plan_mixed_precision"
            )
        bad = {module: b for module, b in plan.items() if b not in layers[module].bits}
        if bad:
            module = next(iter(bad))
            raise ValueError(
                f"mixed plan {name!r} sets {dict(list(bad.items())[:3])}; {module} offers {layers[module].bits}"
            )


def set_layer_bits(model: nn.Module, bits: Mapping[str, int]) -> None:
    """A hand-made plan ``{module name: bits}``: those quantized linears switch, the others keep their bits.

    Module names are those `get_bits` reports (transformers names, e.g. ``model.layers.0.mlp.down_proj``). The
    whole mapping is checked before anything switches: unknown names or bit-widths are one ValueError naming them.
    An MB-CLoRA layer's delta (and, in weight_activation mode, its activation bit-width) follows its base layer.
    """
    config = quept_config(model)
    layers = switchable_layers(model)
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise ValueError(
            f"set_bits: unknown module name(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; quantized "
            f"linears are named like {sorted(layers)[:3]} (see quept_hf.get_bits(model))"
        )
    _switch_layers(layers, bits, config)


def _switch_layers(layers: Mapping[str, nn.Module], bits: Mapping[str, int], config: QuEPTConfig) -> None:
    """Check every requested width against what its layer offers (16 only for elastic layers), then switch."""

    def allowed(name: str) -> list[int]:
        return layers[name].bits if config.is_frozen else [*layers[name].bits, FLOAT_BITS]

    bad = {
        name: b for name, b in bits.items() if isinstance(b, bool) or not isinstance(b, int) or b not in allowed(name)
    }
    if bad:
        shown = dict(list(bad.items())[:5])
        first = next(iter(bad))
        raise ValueError(f"set_bits: bit-width(s) not available for {shown}; {first} offers {allowed(first)}")
    for name, b in bits.items():
        layers[name].set_bits(int(b))


def get_bits(model: nn.Module) -> int | dict[str, int]:
    """The bit-width every elastic layer runs at, or ``{module name: bits}`` for every quantized linear when
    they differ (a mixed plan is active; block plans show expanded to their linears)."""
    widths = {name: layer.active_bits for name, layer in switchable_layers(model).items()}
    if not widths and _is_packed(model):
        widths = dict(quept_config(model).packed["bits"])  # a packed model runs at its frozen widths
    if not widths:
        raise ValueError(f"{type(model).__name__} has no quantized linear layer")
    if len(set(widths.values())) == 1:
        return next(iter(widths.values()))
    return widths


def switchable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a switch sets, by module name: elastic `QuEPTLinear`s, or a frozen model's `FrozenLinear`s (one
    walk over the modules: the config says which kind the model is)."""
    try:
        frozen = quept_config(model).is_frozen
    except ValueError:  # not a QuEPT model: whichever layers it has
        return quept_linears(model) or frozen_linears(model)
    return frozen_linears(model) if frozen else quept_linears(model)


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """``set_adapter`` of a QuEPT transformers model: a bit-width (``"w3"``) or stored plan (``"mixed-3.25"``).

    Elastic: transformers' own ``set_adapter``, after checking the name, so an unknown one is told which
    bit-widths exist (transformers would list only the saved adapter, ``['default']``). Frozen: the model carries
    no PEFT adapter (its widths are stored codes) and transformers would answer "No adapter loaded"; the stored
    codes of that width or plan are switched to instead."""
    config = quept_config(model)
    if not config.is_frozen:
        adapters = getattr(model, "peft_config", None)
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if isinstance(adapters, ElasticAdapters) and name not in adapters]
        if unknown:
            raise ValueError(
                f"set_adapter: adapter_name={unknown[0]!r} does not exist; this elastic model provides "
                f"{adapters.available()}"
            )
        type(model).set_adapter(model, adapter_name)
        return
    if isinstance(adapter_name, list):
        if len(adapter_name) != 1:
            raise ValueError(f"set_adapter: a frozen model runs one bit-width at a time, got {adapter_name}")
        adapter_name = adapter_name[0]
    if not isinstance(adapter_name, str):
        raise ValueError(f"set_adapter: adapter_name={adapter_name!r} must be a name like 'w4' or 'mixed-3.25'")
    _set_plan(model, adapter_name)


def install_switch(model: nn.Module) -> None:
    """Give a QuEPT transformers model the `set_adapter` front door (an instance attribute: see quept_hf.compat)."""
    override_method(model, "set_adapter", set_adapter)


INJECTION_HOOKS.append(install_switch)


def _is_packed(model: nn.Module) -> bool:
    try:
        return quept_config(model).is_packed
    except ValueError:
        return False


def _refuse_packed(model: nn.Module) -> None:
    """A packed checkpoint holds integer codes of ONE bit-width per layer: there is nothing to switch to."""
    if _is_packed(model):
        source = quept_config(model).packed.get("source")
        raise ValueError(
            f"this model is packed (exported at {source!r}) and cannot switch bit-widths: load the elastic "
            "checkpoint to switch, or export another bit-width"
        )


def _is_peft_model(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)

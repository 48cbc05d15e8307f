"""transformers hooks for quantization method ``"quept"``: swap modules, initialise or restore, serialise.

Glue only: the quantization math lives in `quept_hf.nn`, calibration in `quept_hf.calibration`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer

from . import saving
from .calibration import calibrate
from .calibration.offload import holds
from .calibration.rotation import install_online_transforms, resolve_transforms, rotate_model
from .compat import allow_missing_on_load, loaded_from_checkpoint
from .config import QuEPTConfig
from .inspection import quept_linears
from .mixed_precision import attach_saved_sensitivity
from .models import architecture_for, module_roles
from .nn import QuEPTLinear, pin_modules
from .nn.attention import ATTENTION_IMPLEMENTATION, register_attention
from .packing.frozen import FrozenLinear
from .packing.linear import PackedLinear
from .serialization import check_loaded_checkpoint, format_record, state_dict_to_save
from .switch import check_plans, install_switch, set_bits

logger = logging.getLogger(__name__)

CLIP_PATTERN = r"\.clip_(upper|lower|act)\.\d+$"


def _matches(name: str, patterns: list[str]) -> bool:
    """``name`` equals a pattern or ends with ``.pattern`` (``"lm_head"`` matches ``"model.lm_head"``)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_linears(
    model: nn.Module, config: QuEPTConfig, skip: list[str], activation_granularity: str = "per_token"
) -> list[str]:
    """Swap every ``nn.Linear`` not matched by ``skip`` for a `QuEPTLinear` (same device, shared weights).

    Works on the meta device (before weight loading) and on real weights alike; returns the swapped names.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or _matches(name, skip):
            continue
        new = QuEPTLinear.from_linear(
            module,
            bits=config.bits,
            group_size=config.group_size,
            zero_point=config.zero_point,
            quantize_activations=config.mode == "weight_activation",
            activation_granularity=activation_granularity,
        )
        new.set_bits(config.default_bits)
        _replace(model, name, new)
        swapped.append(name)
    return swapped


def replace_packed_linears(model: nn.Module, config: QuEPTConfig) -> list[str]:
    """Swap each module named in ``config.packed["bits"]`` for an empty `PackedLinear` (before weight loading).

    The new modules live on the old weight's device (meta while transformers builds the skeleton), so no float
    weight of a packed linear is ever materialised; the checkpoint fills ``qweight``, ``scales``, ``zeros``.
    """
    activation_bits = config.packed.get("activation_bits") or {}
    per_tensor = set(config.packed.get("per_tensor_activations") or [])
    for name, bits in config.packed["bits"].items():
        module = _linear_named(model, name, "packed")
        new = _packed_like(module, bits, config.group_size[bits], activation_bits.get(name), name in per_tensor)
        _replace(model, name, new)
    return list(config.packed["bits"])


def _packed_like(
    module: nn.Linear, bits: int, group_size: int, activation_bits: int | None = None, per_tensor: bool = False
) -> nn.Module:
    """An empty `PackedLinear` of ``module``'s shape, on its device and dtype (meta before weight loading)."""
    return PackedLinear(
        module.in_features,
        module.out_features,
        module.bias is not None,
        bits=bits,
        group_size=group_size,
        activation_bits=activation_bits,
        activation_granularity="per_tensor" if per_tensor else "per_token",
        device=module.weight.device,
        dtype=module.weight.dtype,
    )


def replace_frozen_linears(model: nn.Module, config: QuEPTConfig) -> list[str]:
    """Swap each module named in ``config.frozen["bits"]`` for an empty `FrozenLinear` keeping those widths.

    As for packed checkpoints, the new modules live on the old weight's device (meta while transformers builds the
    skeleton), so no float weight of a frozen linear is ever materialised."""
    per_tensor = set(config.frozen.get("per_tensor_activations") or [])
    for name, kept in config.frozen["bits"].items():
        module = _linear_named(model, name, "frozen")
        new = FrozenLinear(
            module.in_features,
            module.out_features,
            module.bias is not None,
            bits=kept,
            group_size=config.group_size,
            quantize_activations=config.mode == "weight_activation",
            activation_granularity="per_tensor" if name in per_tensor else "per_token",
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        _replace(model, name, new)
    head = config.frozen.get("head")
    if head is not None:
        new = _packed_like(_linear_named(model, head["module"], "frozen"), head["bits"], head["group_size"])
        new.set_weight_form("dequantized")
        _replace(model, head["module"], new)
    return list(config.frozen["bits"])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _linear_named(model: nn.Module, name: str, kind: str) -> nn.Linear:
    """The ``nn.Linear`` a checkpoint of ``kind`` names, or a ValueError saying what the model has there."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if type(module) is not nn.Linear:
        found = "nothing" if module is None else type(module).__name__
        raise ValueError(f"The {kind} QuEPT checkpoint names {name!r}; {type(model).__name__} has {found} there")
    return module


class QuEPTHfQuantizer(HfQuantizer):
    """Quantizer of method ``"quept"``: elastic multi-bit fake quantization with learnable clipping."""

    requires_calibration = False
    quantization_config: QuEPTConfig

    def __init__(self, quantization_config: QuEPTConfig, **kwargs):
        super().__init__(quantization_config.clone(), **kwargs)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        resolve_transforms(model, config, fresh=not self.pre_quantized)  # rotation/smoothing: None -> bool
        model.config.quantization_config = config  # the model's own clone, not the object the user passed
        if config.is_frozen:
            swapped = replace_frozen_linears(model, config)
            pin_modules(model, module_roles(model, config.quantize_vision_tower).pinned)
            logger.info("QuEPT: %d frozen linear layers (bits %s)", len(swapped), config.bits)
            return
        if config.is_packed:
            swapped = replace_packed_linears(model, config)
            # Pinned layers (ViT patch embedding / head at 8 bits) keep float weights and fake-quantize as in
            # the elastic model; with no elastic layer to follow they never switch to float.
            pin_modules(model, module_roles(model, config.quantize_vision_tower).pinned)
            logger.info("QuEPT: %d packed linear layers (%s)", len(swapped), config.packed.get("source"))
            return
        if not self.pre_quantized and config.dataset is not None:
            architecture_for(model)  # calibration follows loading: refuse an unsupported model before loading it
        skip = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert, keep_in_fp32_modules, add_default_skips=True
        )
        roles = module_roles(model, config.quantize_vision_tower)  # per-architecture: float, pinned, activations
        skip = [*skip, *roles.kept_float, *roles.pinned]
        swapped = replace_linears(model, config, skip, roles.activation_granularity)
        pin_modules(model, roles.pinned)
        if not swapped:
            raise ValueError(
                f"QuEPT found no nn.Linear to quantize in {type(model).__name__} (skipped: {sorted(skip)})"
            )
        logger.info("QuEPT: %d linear layers made elastic (%s)", len(swapped), config.bits)
        if not self.pre_quantized:
            # Clipping logits of a float checkpoint are initialised after loading, not "missing".
            allow_missing_on_load(model, CLIP_PATTERN)

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if config.is_frozen:
            return _finish_frozen(model, config)
        if config.is_packed:
            _check_packed_loaded(model)
            if config.quantize_attention_probs:
                register_attention()
                model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
            _install_transforms(model, config, rotate=False)
            return model
        layers = quept_linears(model)
        if self.pre_quantized:
            _check_loaded(layers)
            _check_saved_files(model, config)
            attach_saved_sensitivity(model)
        for layer in layers.values():
            if not self.pre_quantized:
                layer.reset_clipping()
            # Loading re-creates parameters with requires_grad=True: freeze the float weights again (spec:
            # they stay frozen), else the weight cache is off outside torch.no_grad and the paths differ.
            clips = (*layer.clip_upper.values(), *layer.clip_lower.values(), *layer.clip_act.values())
            for param in (layer.weight, layer.bias, *clips):
                if param is not None:
                    param.requires_grad_(False)
        from .calibration.offload import prepare

        prepare(model)  # device_map offloading (accelerate): each offloaded block one unit, its QuEPT tensors stored
        check_plans(model)
        set_bits(model, config.default_bits)
        _install_hub_hooks(model)
        if config.quantize_attention_probs:
            register_attention()
            model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
        _install_transforms(model, config, rotate=not self.pre_quantized)
        if not self.pre_quantized and config.dataset is not None:
            calibrate(model, config.dataset, tokenizer=config.tokenizer)
        return model

    def get_state_dict_and_metadata(self, model):
        """transformers' saving hook: the model's own tensors, and in the safetensors metadata the digests of the
        config fields they depend on, which loading checks config.json against (every checkpoint kind). During an
        elastic save the tensors are the base model's, without the adapter's (`serialization.saving_state_dict`);
        otherwise None: the model's own."""
        return state_dict_to_save(), format_record(model)

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def _install_hub_hooks(model: nn.Module) -> None:
    """From loading on, ``save_pretrained`` / ``push_to_hub`` / ``load_adapter`` of an elastic transformers model go
    through quept_hf (metadata, model card, uncalibrated-push refusal, complete-adapter check), adapters or not.
    Before ``load_adapter`` runs, so the elastic save records the model's own weight conversions."""
    if isinstance(model, PreTrainedModel):
        saving.install(model)
        install_switch(model)


def _install_transforms(model: nn.Module, config: QuEPTConfig, rotate: bool) -> None:
    """Rotate a fresh float model (``config.rotation``) and (re)install the online transforms it computes.

    A saved model holds rotated weights already (``rotate=False``): only the online parts come back."""
    if rotate and config.rotation:
        rotate_model(model, seed=config.seed)
    install_online_transforms(model, config)


def _check_loaded(layers: dict[str, QuEPTLinear]) -> None:
    """A pre-quantized checkpoint must carry every per-bit tensor: name the ones it lacks."""
    missing = [
        f"{name}.{kind}.{bits}"
        for name, layer in layers.items()
        for kind in ("clip_upper", "clip_lower", "clip_act")
        for bits, param in getattr(layer, kind).items()
        if not (loaded_from_checkpoint(param) or (param.device.type == "meta" and holds(layer, f"{kind}.{bits}")))
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"The QuEPT checkpoint lacks per-bit clipping tensors: {shown}")


def _check_packed_loaded(model: nn.Module) -> None:
    """Every tensor of every `PackedLinear` must come from the checkpoint (else its values are garbage)."""
    _check_all_loaded(model, PackedLinear, "packed")


def _check_all_loaded(model: nn.Module, layer_type: type, kind: str) -> None:
    """Every tensor of every ``layer_type`` layer must come from the checkpoint: name the ones it lacks."""
    missing = [
        f"{name}.{pname}"
        for name, module in model.named_modules()
        if isinstance(module, layer_type)
        for pname, param in module.named_parameters()
        if not loaded_from_checkpoint(param)
    ]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(f"The {kind} QuEPT checkpoint lacks tensors: {shown}")


def _finish_frozen(model: nn.Module, config: QuEPTConfig) -> nn.Module:
    """After loading a frozen checkpoint: check every code tensor arrived, restore online transforms, switch to the
    default width (deriving its working form from the codes) and give the model its ``set_adapter`` front door."""
    _check_all_loaded(model, (FrozenLinear, PackedLinear), "frozen")
    _check_saved_files(model, config)
    if config.quantize_attention_probs:
        register_attention()
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
    _install_transforms(model, config, rotate=False)
    check_plans(model)
    set_bits(model, config.default_bits)
    install_switch(model)
    return model


def register() -> None:
    """Register ``"quept"`` with transformers once (importing quept_hf twice, or reloading it, is harmless)."""
    for mapping, cls, registrar in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, QuEPTConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, QuEPTHfQuantizer, register_quantizer),
    ):
        current = mapping.get("quept")
        if current is None:
            registrar("quept")(cls)
        elif current.__qualname__ == cls.__qualname__ and current.__module__ == cls.__module__:
            mapping["quept"] = cls  # a reload of quept_hf: keep the newest class
        else:
            raise RuntimeError(f"quantization method 'quept' is already registered by {current.__module__}")


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuEPTConfig) -> nn.Module:
    """Make an already loaded float model elastic in place (e.g. a GGUF-loaded model, which transformers
    refuses to combine with a ``quantization_config`` in ``from_pretrained``)."""
    quantizer = QuEPTHfQuantizer(config, pre_quantized=False)
    _drop_previous_quantization(model, quantizer)
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    return quantizer.postprocess_model(model)


def _drop_previous_quantization(model: nn.Module, quantizer: HfQuantizer) -> None:
    """A GGUF-loaded model carries ``quantization_config`` (gguf) though its weights are float already."""
    config = getattr(model, "config", None)
    previous = getattr(config, "quantization_config", None)
    if previous is None:
        return
    method = previous.get("quant_method") if isinstance(previous, dict) else getattr(previous, "quant_method", None)
    method = getattr(method, "value", method)
    if method != "gguf":
        raise ValueError(f"The model is already quantized with {method!r}; QuEPT needs a float model")
    packed = [name for name, param in model.named_parameters() if not param.is_floating_point()]
    if packed:
        raise ValueError(
            f"The model keeps GGUF-packed (integer) weights, e.g. {packed[0]}; load it with dequantize=True "
            "before QuEPT"
        )
    quantizer.remove_quantization_config(model)


def _check_saved_files(model: nn.Module, config: QuEPTConfig) -> None:
    """An elastic or frozen checkpoint's config.json must still describe its weights, and the adapter it lists must
    be there (`quept_hf.serialization.check_loaded_checkpoint`)."""
    check_loaded_checkpoint(model, config)

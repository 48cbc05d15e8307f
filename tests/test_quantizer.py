"""The "quept" quantizer on a tiny random LLaMA: module swap, bit switching, save/load, GGUF path, caching."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import QuEPTConfig, QuEPTLinear, get_bits, quantize_model, set_bits
from quept_hf.inspection import quept_linears
from quept_hf.nn import CLIP_INIT

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJECTIONS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
EXPECTED = sorted(f"model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS)


def load(folder: str, **config) -> torch.nn.Module:
    kwargs = {"quantization_config": QuEPTConfig(**config)} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def load_float(folder: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def input_ids(seed: int = 0, batch: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def randomise_clipping(model, seed: int = 0) -> None:
    """Move every clipping logit away from its initial value, so a save/load test can see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quept_linears(model).values():
            for param in (*layer.clip_upper.values(), *layer.clip_lower.values()):
                param.copy_(1.0 + 4.0 * torch.rand(param.shape, generator=gen))


# ----------------------------------------------------------------------------------------- module swap


def test_swaps_exactly_the_projections(tiny_llama_dir):
    model = load(tiny_llama_dir, group_size=32)
    assert sorted(quept_linears(model)) == EXPECTED
    for name, module in model.named_modules():
        if isinstance(module, QuEPTLinear):
            assert name in EXPECTED
            assert module.bits == ALL_BITS and module.active_bits == 8
        elif isinstance(module, torch.nn.Linear):
            assert name == "lm_head"
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert isinstance(model.config.quantization_config, QuEPTConfig)
    assert model.is_quantized


def test_modules_to_not_convert(tiny_llama_dir):
    skip = ["down_proj", "model.layers.0.self_attn.q_proj"]
    model = load(tiny_llama_dir, modules_to_not_convert=skip)
    expected = [n for n in EXPECTED if not n.endswith("down_proj") and n != "model.layers.0.self_attn.q_proj"]
    assert sorted(quept_linears(model)) == expected
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, QuEPTLinear)


def test_float_weights_are_loaded_unchanged(tiny_llama_dir):
    model, ref = load(tiny_llama_dir), load_float(tiny_llama_dir)
    for name, layer in quept_linears(model).items():
        assert torch.equal(layer.weight, ref.get_submodule(name).weight)
        assert not layer.weight.requires_grad


def test_clipping_logits_are_initialised_after_loading(tiny_llama_dir):
    model = load(tiny_llama_dir)  # default group sizes: 128 for bits <= 3, per-channel above
    for layer in quept_linears(model).values():
        assert sorted(layer.clip_upper) == [str(b) for b in ALL_BITS]
        for bits, param in [*layer.clip_upper.items(), *layer.clip_lower.items()]:
            groups = 1 if layer.in_features <= 128 else 2  # down_proj: 160 columns = 2 groups of 128
            assert param.shape == (layer.out_features, groups if int(bits) <= 3 else 1)
            assert bool((param == CLIP_INIT).all())
            assert not param.requires_grad
    mlp = load(tiny_llama_dir, group_size={**dict.fromkeys(ALL_BITS, -1), 2: 32, 3: 32}).model.layers[0].mlp
    assert mlp.down_proj.clip_upper["2"].shape == (64, 5)  # 160 input columns / 32
    assert mlp.down_proj.clip_upper["4"].shape == (64, 1)


# ------------------------------------------------------------------------------------------ bit switching


def test_every_bit_width_runs(tiny_llama_dir):
    model = load(tiny_llama_dir, group_size=32)
    ids = input_ids()
    outputs = {}
    for bits in ALL_BITS:
        set_bits(model, bits)
        assert get_bits(model) == bits
        assert all(layer.active_bits == bits for layer in quept_linears(model).values())
        outputs[bits] = logits(model, ids)
        assert outputs[bits].shape == (2, 48, 128)
        assert bool(torch.isfinite(outputs[bits]).all())
    assert not torch.equal(outputs[2], outputs[8])


def test_logit_error_decreases_with_bits(tiny_llama_dir):
    """Per-channel quantization: the mean |logit - float logit| does not grow as bits grow."""
    model, ref_model = load(tiny_llama_dir, group_size=-1), load_float(tiny_llama_dir)
    ids = input_ids(length=64)
    ref = logits(ref_model, ids)
    errors = []
    for bits in (2, 3, 4, 6, 8):
        set_bits(model, bits)
        errors.append(float((logits(model, ids) - ref).abs().mean()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < errors[0] / 10, errors


def test_set_bits_16_is_the_float_model(tiny_llama_dir):
    model, ref_model = load(tiny_llama_dir), load_float(tiny_llama_dir)
    ids = input_ids()
    set_bits(model, 16)
    assert get_bits(model) == 16
    assert torch.equal(logits(model, ids), logits(ref_model, ids))
    set_bits(model, 8)
    assert not torch.equal(logits(model, ids), logits(ref_model, ids))


def test_set_bits_rejects_unavailable_bits(tiny_llama_dir):
    model = load(tiny_llama_dir, bits=[3, 4, 8])
    for bits in (1, 2, 5, 9, 32):
        with pytest.raises(ValueError, match=rf"bits={bits} is not available.*\[3, 4, 8\]"):
            set_bits(model, bits)
    assert get_bits(model) == 8
    with pytest.raises(ValueError, match="not available for this layer"):
        model.model.layers[0].mlp.up_proj.set_bits(5)


def test_default_bits_and_mixed_layers(tiny_llama_dir):
    model = load(tiny_llama_dir, default_bits=4)
    assert get_bits(model) == 4
    model.model.layers[0].mlp.up_proj.set_bits(2)
    mixed = get_bits(model)  # layers at different widths: one entry per quantized linear
    assert mixed == {name: 2 if name == "model.layers.0.mlp.up_proj" else 4 for name in EXPECTED}


def test_set_bits_refuses_a_float_model(tiny_llama_dir):
    with pytest.raises(ValueError, match="is not a QuEPT model"):
        set_bits(load_float(tiny_llama_dir), 4)


# ---------------------------------------------------------------------------------------- save and load


def test_each_model_gets_its_own_config(tiny_llama_dir):
    """Loading and calibration record state in the config: it must land in the model's clone, never in the user's
    object, or a second model loaded with the same config would start out "calibrated"."""
    user = QuEPTConfig(
        mode="weight_only", ranks=[2] * 4, num_samples=2, seq_len=8, epochs=0, dataset=torch.ones(2, 8).long()
    )
    first = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=user)
    second = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=user)
    own = first.config.quantization_config
    assert own is not user and own is not second.config.quantization_config
    assert own.calibrated and own.smoothing is not None and torch.equal(own.dataset, user.dataset)
    assert not user.calibrated and user.smoothing is None and user.rotation is None
    assert user.to_dict() == QuEPTConfig.from_dict(user.to_dict()).to_dict()


def test_save_and_reload_is_bit_identical(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir, group_size=32)
    randomise_clipping(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "quept" and saved["bits"] == ALL_BITS

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no quantization_config: from config.json
    assert isinstance(reloaded.config.quantization_config, QuEPTConfig)
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    for name, layer in quept_linears(model).items():
        other = quept_linears(reloaded)[name]
        for bits in layer.clip_upper:
            assert torch.equal(layer.clip_upper[bits], other.clip_upper[bits])
            assert torch.equal(layer.clip_lower[bits], other.clip_lower[bits])
    ids = input_ids()
    for bits in [*ALL_BITS, 16]:
        set_bits(model, bits)
        set_bits(reloaded, bits)
        assert torch.equal(logits(model, ids), logits(reloaded, ids)), f"bits={bits}"


def test_missing_clipping_tensor_is_named(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir)
    model.save_pretrained(tmp_path / "full")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "full", broken)
    tensors = load_file(broken / "model.safetensors")
    missing = "model.layers.1.mlp.up_proj.clip_lower.5"
    del tensors[missing]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"lacks per-bit clipping tensors: {missing}$"):
        AutoModelForCausalLM.from_pretrained(broken)


# ------------------------------------------------------------------------------ already loaded (GGUF) models


def test_quantize_model_on_a_gguf_loaded_model(tiny_llama_dir, tmp_path):
    model, ref_model = load_float(tiny_llama_dir), load_float(tiny_llama_dir)
    model.config.quantization_config = {"quant_method": "gguf"}  # what a gguf_file= load leaves behind
    returned = quantize_model(model, QuEPTConfig(group_size=32))
    assert returned is model
    assert sorted(quept_linears(model)) == EXPECTED
    assert isinstance(model.config.quantization_config, QuEPTConfig)
    assert get_bits(model) == 8
    ids = input_ids()
    set_bits(model, 16)
    assert torch.equal(logits(model, ids), logits(ref_model, ids))
    set_bits(model, 3)
    fresh = load(tiny_llama_dir, group_size=32)
    set_bits(fresh, 3)
    assert torch.equal(logits(model, ids), logits(fresh, ids))
    # The result saves and reloads as a QuEPT checkpoint.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    set_bits(reloaded, 3)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


def test_quantize_model_on_a_plain_float_model(tiny_llama_dir):
    model = quantize_model(load_float(tiny_llama_dir), QuEPTConfig())
    assert sorted(quept_linears(model)) == EXPECTED


@pytest.mark.parametrize("method", ["bitsandbytes", "quept"])
def test_quantize_model_refuses_other_quantizations(tiny_llama_dir, method):
    model = load_float(tiny_llama_dir)
    model.config.quantization_config = {"quant_method": method}
    with pytest.raises(ValueError, match=f"already quantized with '{method}'"):
        quantize_model(model, QuEPTConfig())
    assert not quept_linears(model)


# ------------------------------------------------------------------------------------------- weight cache


def test_cache_skips_requantization_and_follows_in_place_changes(tiny_llama_dir, monkeypatch):
    model = load(tiny_llama_dir, group_size=32)
    calls = []
    original = QuEPTLinear.quantized_weight

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QuEPTLinear, "quantized_weight", counting)
    ids = input_ids()
    n_layers = len(EXPECTED)
    with torch.no_grad():
        first = logits(model, ids)
        assert len(calls) == n_layers
        second = logits(model, ids)
        assert len(calls) == n_layers, "second forward re-quantized"
        assert torch.equal(first, second)

        # In-place change of one weight: only that layer re-quantizes, and the output follows.
        layer = model.model.layers[0].self_attn.q_proj
        layer.weight.mul_(0.5)
        changed = logits(model, ids)
        assert calls[n_layers:] == [layer]
        assert not torch.equal(changed, first)

        # In-place change of the active bit-width's clipping logits also invalidates the cache.
        layer.clip_upper["8"].fill_(1.0)
        logits(model, ids)
        assert calls[n_layers + 1 :] == [layer]

        # A bit switch quantizes each layer once at the new width, then the cache is used again.
        set_bits(model, 4)
        logits(model, ids)
        logits(model, ids)
        assert len(calls) == 2 * n_layers + 2

    # The cached result equals a fresh model's output with the same weights.
    fresh = load(tiny_llama_dir, group_size=32)
    with torch.no_grad():
        fresh.model.layers[0].self_attn.q_proj.weight.mul_(0.5)
        fresh.model.layers[0].self_attn.q_proj.clip_upper["8"].fill_(1.0)
    set_bits(fresh, 4)
    assert torch.equal(logits(model, ids), logits(fresh, ids))


def test_no_cache_while_training_the_clipping(tiny_llama_dir):
    model = load(tiny_llama_dir, group_size=32)
    layer = model.model.layers[1].mlp.down_proj
    layer.clip_upper["8"].requires_grad_(True)
    model(input_ids=input_ids()).logits.sum().backward()
    grad = layer.clip_upper["8"].grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_import_quept_hf_exports():
    for name in ("QuEPTConfig", "QuEPTLinear", "quantize_model", "set_bits", "get_bits", "quept_config"):
        assert hasattr(quept_hf, name)

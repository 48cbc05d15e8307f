"""MB-CLoRA (issue 3) on a tiny random LLaMA: cascade numerics, switching, persistence, merge, training, cache."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import MBCLoRAConfig, QuEPTConfig, QuEPTLinear, get_bits, set_bits
from quept_hf.inspection import quept_linears
from quept_hf.mbclora import MBCLoRALayer
from quept_hf.nn import fake_quantize_activation, fake_quantize_weight

try:
    from tests.conftest_hub import local_hub
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest_hub import local_hub  # type: ignore[no-redef]  # noqa: F401

WEIGHT_ONLY_BITS = [2, 3, 4, 5, 6, 7, 8]
NUM_LAYERS = 14  # 2 blocks x 7 projections
LAYER = "model.layers.0.self_attn.q_proj"

# Distinct ranks per group (low to high), and the cumulative rank R(b) each bit-width must use, by hand:
# weight_only groups {2},{3,4},{5,6},{7,8} with ranks 5,4,3,2 -> cascade from the top: 2, 2+3, 2+3+4, 2+3+4+5.
# weight_activation groups {4},{5,6},{7,8} with ranks 4,3,2 -> 2, 2+3, 2+3+4.
LAYOUTS = {
    "weight_only": ([5, 4, 3, 2], {8: 2, 7: 2, 6: 5, 5: 5, 4: 9, 3: 9, 2: 14}),
    "weight_activation": ([4, 3, 2], {8: 2, 7: 2, 6: 5, 5: 5, 4: 9}),
}


# ----------------------------------------------------------------------------------------------- helpers


def quept(folder: str, mode: str = "weight_only", ranks: list[int] | None = None) -> torch.nn.Module:
    ranks = ranks or [4] * (4 if mode == "weight_only" else 3)
    config = QuEPTConfig(mode=mode, ranks=ranks)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).eval()


def peft_model(folder: str, mode: str = "weight_only", ranks: list[int] | None = None, seed: int = 1) -> PeftModel:
    model = quept(folder, mode, ranks)
    torch.manual_seed(seed)  # A's Kaiming init
    return get_peft_model(model, MBCLoRAConfig()).eval()


def hf_model(folder: str, seed: int = 1) -> torch.nn.Module:
    """The same adapters as `peft_model`, attached through transformers' own PEFT integration."""
    model = quept(folder)
    torch.manual_seed(seed)
    model.add_adapter(MBCLoRAConfig())
    return model.eval()


def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """B starts at 0 (delta = 0): give every B slice seeded values so each bit-width's delta shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mbclora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def randomise_clipping(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quept_linears(model).values():
            for param in (*layer.clip_upper.values(), *layer.clip_lower.values()):
                param.copy_(1.0 + 4.0 * torch.rand(param.shape, generator=gen))


def input_ids(seed: int = 0, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits


def logits_per_bits(model, ids, bits=WEIGHT_ONLY_BITS) -> dict[int, torch.Tensor]:
    out = {}
    for b in bits:
        model.set_adapter(f"w{b}")
        out[b] = logits(model, ids)
    return out


def adapter_layers(model) -> dict[str, MBCLoRALayer]:
    return {
        name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, MBCLoRALayer)
    }


# ----------------------------------------------------------------------------------------------- cascade


@pytest.mark.parametrize("mode", list(LAYOUTS))
def test_cascade_matches_explicit_slices(tiny_llama_dir, mode):
    """Every bit-width of both default layouts: delta_b = B[:, :R(b)] @ A[:R(b), :], computed in weight space."""
    ranks, cumulative = LAYOUTS[mode]
    model = peft_model(tiny_llama_dir, mode, ranks)
    perturb(model)
    layer = adapter_layers(model)[LAYER]
    assert [a.shape[0] for a in layer.mbclora_A["default"]] == ranks[::-1]  # stored high group first
    a_full = torch.cat(list(layer.mbclora_A["default"]), dim=0).detach()
    b_full = torch.cat(list(layer.mbclora_B["default"]), dim=1).detach()
    assert a_full.shape == (sum(ranks), layer.in_features) and b_full.shape == (layer.out_features, sum(ranks))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    base = layer.base_layer
    assert sorted(cumulative) == sorted(base.bits)
    for bits, rank in cumulative.items():
        model.set_adapter(f"w{bits}")
        assert base.active_bits == bits
        delta = b_full[:, :rank].contiguous() @ a_full[:rank, :].contiguous()
        torch.testing.assert_close(layer.delta_weight(bits).detach(), delta, rtol=0, atol=1e-7)
        key = str(bits)
        w_q = fake_quantize_weight(base.weight + delta, bits, base.clip_upper[key], base.clip_lower[key],
                                   base.group_size[bits])  # fmt: skip
        x_q = fake_quantize_activation(x, bits) if mode == "weight_activation" else x
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x_q, w_q, base.bias))
    # Group-mates get the same delta; different groups do not.
    assert torch.equal(layer.delta_weight(5), layer.delta_weight(6))
    assert not torch.allclose(layer.delta_weight(6), layer.delta_weight(7))


def test_delta_is_added_before_quantization(tiny_llama_dir):
    """The layer computes Q_b(W + delta_b) x, which differs from Q_b(W) x + delta_b x."""
    model = peft_model(tiny_llama_dir)
    perturb(model)
    model.set_adapter("w4")
    layer = adapter_layers(model)[LAYER]
    base = layer.base_layer
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        delta = layer.delta_weight(4)
        weight_space = F.linear(x, base.quantized_weight(delta, bits=4))
        output_space = F.linear(x, base.quantized_weight(None, bits=4)) + F.linear(x, delta)
        out = layer(x)
    torch.testing.assert_close(out, weight_space)
    assert (out - output_space).abs().max() > 1e-3


def test_group_mates_share_storage(tiny_llama_dir):
    """w3 and w4 use the very same slice tensors; every lower bit-width reuses the high groups' slices."""
    model = peft_model(tiny_llama_dir)
    layer = adapter_layers(model)[LAYER]

    def pointers(bits):
        a, b = layer.cascade_slices(bits)
        return [p.data_ptr() for p in a], [p.data_ptr() for p in b]

    assert pointers(3) == pointers(4) and pointers(5) == pointers(6) and pointers(7) == pointers(8)
    a8, _ = pointers(8)
    a6, _ = pointers(6)
    a2, b2 = pointers(2)
    assert a2[: len(a6)] == a6 and a6[: len(a8)] == a8 and len(set(a2 + b2)) == 8
    # Stored once: 4 (A, B) slice pairs per layer, whatever the number of bit-widths.
    adapter_keys = [k for k in model.state_dict() if ".mbclora_" in k]
    assert len(adapter_keys) == NUM_LAYERS * 8


def test_fresh_adapter_leaves_the_model_unchanged(tiny_llama_dir):
    model = quept(tiny_llama_dir)
    ids = input_ids()
    before = {}
    for b in WEIGHT_ONLY_BITS:
        set_bits(model, b)
        before[b] = logits(model, ids)
    wrapped = get_peft_model(model, MBCLoRAConfig())
    after = logits_per_bits(wrapped, ids)
    for b in WEIGHT_ONLY_BITS:
        assert torch.equal(after[b], before[b]), b


# --------------------------------------------------------------------------------------------- switching


def test_switching_through_peft_and_transformers_agree(tiny_llama_dir):
    """set_adapter("w{b}") switches every layer through both front doors, with the same outputs."""
    ids = input_ids()
    wrapped, model = peft_model(tiny_llama_dir), hf_model(tiny_llama_dir)
    perturb(wrapped), perturb(model)
    through_peft = logits_per_bits(wrapped, ids)
    through_hf = logits_per_bits(model, ids)
    for b in WEIGHT_ONLY_BITS:
        assert torch.equal(through_peft[b], through_hf[b]), b
    assert not torch.equal(through_peft[3], through_peft[4])  # same delta, different quantizer
    for candidate in (wrapped, model):
        candidate.set_adapter("w3")
        assert get_bits(candidate) == 3
        assert all(layer.active_bits == 3 for layer in quept_linears(candidate).values())
    assert model.active_adapters() == ["w3"] and wrapped.active_adapter == "w3"


def test_weight_activation_switch_moves_the_activation_bits(tiny_llama_dir):
    model = peft_model(tiny_llama_dir, "weight_activation")
    model.set_adapter("w5")
    base = adapter_layers(model)[LAYER].base_layer
    x = torch.randn(1, 3, base.in_features, generator=torch.Generator().manual_seed(5))
    assert base.active_bits == 5 and base.quantize_activations
    torch.testing.assert_close(base.quantize_input(x), fake_quantize_activation(x, 5))


def test_set_bits_is_set_adapter(tiny_llama_dir, tmp_path):
    """quept_hf.set_bits(model, b) == set_adapter(f"w{b}") through PeftModel, transformers and bare injection."""
    ids = input_ids()
    wrapped, model = peft_model(tiny_llama_dir), hf_model(tiny_llama_dir)
    torch.manual_seed(1)
    bare = peft.inject_adapter_in_model(MBCLoRAConfig(), quept(tiny_llama_dir))
    for candidate in (wrapped, model, bare):
        perturb(candidate)
    reference = logits_per_bits(wrapped, ids, [4, 7])
    for candidate in (wrapped, model, bare):
        for b in (7, 4):
            set_bits(candidate, b)
            assert get_bits(candidate) == b
            assert torch.equal(logits(candidate, ids), reference[b]), (type(candidate).__name__, b)
    assert wrapped.active_adapter == "w4" and model.active_adapters() == ["w4"]
    # 16 = the float model: no quantization and no delta.
    set_bits(model, 16)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert torch.equal(logits(model, ids), logits(float_model, ids))
    set_bits(model, 4)
    assert torch.equal(logits(model, ids), reference[4])


def test_unknown_adapter_is_a_value_error_listing_the_available_ones(tiny_llama_dir):
    wrapped, model = peft_model(tiny_llama_dir), hf_model(tiny_llama_dir)
    for adapters in (wrapped.peft_config, model.peft_config):  # a plain membership test answers, never raises
        assert "w4" in adapters and "w9" not in adapters and "default" in adapters and 9 not in adapters
    with pytest.raises(ValueError, match=r"adapter_name='w9' does not exist.*'w2'.*'w8'"):
        model.set_adapter("w9")  # the transformers model: quept_hf's set_adapter names what exists
    with pytest.raises(ValueError, match="w9"):
        wrapped.set_adapter("w9")  # a PeftModel: PEFT's own check ("Adapter w9 not found.")
    weight_activation = quept(tiny_llama_dir, "weight_activation")
    weight_activation.add_adapter(MBCLoRAConfig())
    with pytest.raises(ValueError, match=r"'w3'.*'w4', 'w5', 'w6', 'w7', 'w8'"):
        weight_activation.set_adapter("w3")
    with pytest.raises(ValueError, match="bits=3 is not available"):
        set_bits(weight_activation, 3)
    with pytest.raises(ValueError, match="bits=9 is not available"):
        set_bits(wrapped, 9)


# ------------------------------------------------------------------------------------------- persistence


def test_peft_save_and_from_pretrained_round_trip(tiny_llama_dir, tmp_path):
    ids = input_ids()
    wrapped = peft_model(tiny_llama_dir)
    perturb(wrapped)
    expected = logits_per_bits(wrapped, ids)
    wrapped.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    assert "config.json" not in os.listdir(tmp_path)  # PEFT's own format: the adapter only
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == NUM_LAYERS * 8 and all(k.startswith("base_model.model.") for k in tensors)
    restored = PeftModel.from_pretrained(quept(tiny_llama_dir), tmp_path).eval()
    got = logits_per_bits(restored, ids)
    for b in WEIGHT_ONLY_BITS:
        assert torch.equal(got[b], expected[b]), b
    # transformers' load_adapter reads the same folder.
    model = quept(tiny_llama_dir)
    model.load_adapter(str(tmp_path))
    got = logits_per_bits(model, ids)
    for b in WEIGHT_ONLY_BITS:
        assert torch.equal(got[b], expected[b]), b


def test_save_pretrained_is_one_folder_that_from_pretrained_restores(tiny_llama_dir, tmp_path):
    """A QuEPT model with adapters saves base + adapter; plain from_pretrained(folder) restores every bit."""
    ids = input_ids()
    model = hf_model(tiny_llama_dir)
    perturb(model)
    randomise_clipping(model)
    expected = logits_per_bits(model, ids)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    assert not [f for f in files if f.startswith(".")]  # no staging leftovers
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quept"
    base_keys = set(load_file(tmp_path / "model.safetensors"))
    assert f"{LAYER}.weight" in base_keys and f"{LAYER}.clip_upper.4" in base_keys
    assert not [k for k in base_keys if ".base_layer." in k or "mbclora_" in k]
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "MBCLORA" and adapter["base_model_name_or_path"] == str(tmp_path)
    assert model.active_adapters() == ["w8"] and model._hf_peft_config_loaded  # the model is left as it was

    restored = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(restored.get_submodule(LAYER), MBCLoRALayer)
    got = logits_per_bits(restored, ids)
    for b in WEIGHT_ONLY_BITS:
        assert torch.equal(got[b], expected[b]), b

    # The adapter files are exactly what PeftModel.save_pretrained writes for the same adapter.
    via_peft = PeftModel.from_pretrained(quept(tiny_llama_dir), tmp_path)
    via_peft.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    their_config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert {k: v for k, v in adapter.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in their_config.items() if k != "base_model_name_or_path"
    }

    # A restored model saves elastically again.
    restored.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    again.set_adapter("w3")
    assert torch.equal(logits(again, ids), expected[3])


def test_push_to_hub_then_from_pretrained_restores_every_bit(tiny_llama_dir, local_hub):
    ids = input_ids()
    model = hf_model(tiny_llama_dir)
    perturb(model)
    expected = logits_per_bits(model, ids, [2, 5])
    model.push_to_hub("me/tiny-elastic", allow_uncalibrated=True)  # perturbed, never calibrated: refused by default
    files = set(local_hub.files("me/tiny-elastic"))
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= files
    adapter = json.loads(local_hub.files("me/tiny-elastic")["adapter_config.json"])
    assert adapter["base_model_name_or_path"] == "me/tiny-elastic"
    restored = AutoModelForCausalLM.from_pretrained("me/tiny-elastic").eval()
    got = logits_per_bits(restored, ids, [2, 5])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[5], expected[5])


# ------------------------------------------------------------------------------------------------- merge


def test_merge_and_unload_bakes_the_active_bits(tiny_llama_dir, tmp_path):
    ids = input_ids()
    wrapped = peft_model(tiny_llama_dir)
    perturb(wrapped)
    wrapped.set_adapter("w4")
    expected = logits(wrapped, ids)
    merged = wrapped.merge_and_unload()
    assert not [m for m in merged.modules() if isinstance(m, MBCLoRALayer)]
    assert not [k for k in merged.state_dict() if "mbclora_" in k or ".base_layer." in k]
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-6)
    assert get_bits(merged) == 4 and all(layer.bits == [4] for layer in quept_linears(merged).values())
    with pytest.raises(ValueError, match="not available"):
        set_bits(merged, 6)
    # Saved, it is a plain single-bit QuEPT checkpoint.
    merged.save_pretrained(tmp_path)
    assert "adapter_config.json" not in os.listdir(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-6)


def test_merge_refuses_a_mixed_bit_model(tiny_llama_dir):
    wrapped = peft_model(tiny_llama_dir)
    layers = list(quept_linears(wrapped))
    set_bits(wrapped, {layers[0]: 2, **{name: 8 for name in layers[1:]}})
    with pytest.raises(ValueError, match=r"mixes \[2, 8\] bits.*quept_hf.export"):
        wrapped.merge_and_unload()
    assert any(isinstance(m, MBCLoRALayer) for m in wrapped.modules())  # nothing was merged


# -------------------------------------------------------------------------------------------------- train


def enable_clipping_grads(model, bits: int) -> None:
    for layer in quept_linears(model).values():
        layer.clip_upper[str(bits)].requires_grad_(True)
        layer.clip_lower[str(bits)].requires_grad_(True)


def test_gradients_flow_through_the_ste_into_a_b_and_clipping(tiny_llama_dir):
    model = peft_model(tiny_llama_dir).train()
    perturb(model)
    model.set_adapter("w4")
    enable_clipping_grads(model, 4)
    model(input_ids=input_ids()).logits.pow(2).mean().backward()
    layer = adapter_layers(model)[LAYER]
    used_a, used_b = layer.cascade_slices(4)
    for param in (*used_a, *used_b, layer.base_layer.clip_upper["4"], layer.base_layer.clip_lower["4"]):
        assert param.grad is not None and param.grad.abs().sum() > 0
    unused = layer.group_parameters([2])  # the lowest group is not part of w4's cascade
    assert all(p.grad is None or not p.grad.any() for p in unused)
    assert layer.base_layer.weight.grad is None  # the float weight stays frozen


def test_one_group_frozen_while_another_trains(tiny_llama_dir):
    model = peft_model(tiny_llama_dir).train()
    perturb(model)
    model.set_adapter("w4")
    for layer in adapter_layers(model).values():
        for param in layer.group_parameters([7, 8]):
            param.requires_grad_(False)
    model(input_ids=input_ids()).logits.pow(2).mean().backward()
    for layer in adapter_layers(model).values():
        assert all(p.grad is None for p in layer.group_parameters([7, 8]))
        assert all(p.grad is not None and p.grad.any() for p in layer.group_parameters([3, 4]))
        assert all(p.grad is not None and p.grad.any() for p in layer.group_parameters([5, 6]))


# -------------------------------------------------------------------------------------------------- cache


def test_inference_cache_computes_the_delta_once_per_switch(tiny_llama_dir, monkeypatch):
    model = peft_model(tiny_llama_dir)
    perturb(model)
    calls = []
    original = MBCLoRALayer.delta_weight
    monkeypatch.setattr(MBCLoRALayer, "delta_weight", lambda self, bits: calls.append(bits) or original(self, bits))
    ids = input_ids()
    with torch.no_grad():
        model.set_adapter("w4")
        first = model(input_ids=ids).logits
        assert calls == [4] * NUM_LAYERS
        for _ in range(3):
            assert torch.equal(model(input_ids=ids).logits, first)
        assert len(calls) == NUM_LAYERS  # cached: no delta, no re-quantization
        model.set_adapter("w6")
        model(input_ids=ids)
        model(input_ids=ids)
        assert calls[NUM_LAYERS:] == [6] * NUM_LAYERS  # the switch invalidated the cache, once
        model.set_adapter("w4")
        assert torch.equal(model(input_ids=ids).logits, first)
        assert len(calls) == 3 * NUM_LAYERS
        # Training (an in-place update of B) invalidates it too.
        adapter_layers(model)[LAYER].mbclora_B["default"][0].add_(0.1)
        changed = model(input_ids=ids).logits
        assert len(calls) == 3 * NUM_LAYERS + 1 and not torch.equal(changed, first)
    # With gradients enabled and trainable adapters nothing is cached: each forward recomputes.
    model(input_ids=ids)
    model(input_ids=ids)
    assert len(calls) == 5 * NUM_LAYERS + 1


def test_quept_linear_is_the_adapted_base_layer(tiny_llama_dir):
    """MB-CLoRA targets exactly the QuEPTLinear layers, and refuses anything else."""
    model = peft_model(tiny_llama_dir)
    layers = adapter_layers(model)
    assert len(layers) == NUM_LAYERS and all(isinstance(m.base_layer, QuEPTLinear) for m in layers.values())
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(".mbclora_" in name for name in trainable)
    with pytest.raises(TypeError, match="QuEPTLinear"):
        MBCLoRALayer(torch.nn.Linear(4, 4), "default", MBCLoRAConfig(bit_groups=[[4]], ranks=[2]))
    assert quept_hf.set_bits is set_bits

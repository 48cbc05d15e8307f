"""Packed low-bit storage (issue 9): PackedLinear numerics, export/load through "quept", interop, errors.

Equality tolerance: the packed dequantized weight is BITWISE the fake-quant weight (same ops, same dtype), and
the logits are compared with ``max |diff| <= 1e-5`` (observed: exactly 0 on CPU). The tolerance only leaves room
for a BLAS that picks a different kernel for an identical matmul.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import MBCLoRAConfig, PackedLinear, QuEPTConfig, export, pack_model
from quept_hf.inspection import quept_linears
from quept_hf.nn.functional import fake_quantize_activation, fake_quantize_weight, quantize_weight_codes
from quept_hf.packing import packed_cols, set_weight_cache
from quept_hf.packing.interop import compressed_tensors_available, export_compressed_tensors

ALL_BITS = [2, 3, 4, 5, 6, 7, 8]
# Group sizes per bit-width covering group 32, group 128 (one group for in=64, a padded second group for in=160)
# and per-channel; tiny LLaMA in_features are 64 and 160.
GROUPS = {2: 32, 3: 128, 4: -1, 5: 32, 6: 128, 7: -1, 8: 32}
ATOL = 1e-5
SHAPES = [(5, 37, 32), (3, 100, 128), (4, 200, -1), (2, 129, 128), (7, 64, 32), (6, 1, -1)]


def ids(seed: int = 0, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids) -> torch.Tensor:
    return model(input_ids=input_ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def perturb(model, seed: int = 0) -> None:
    """Non-zero MB-CLoRA deltas and clipping logits away from their init, so export must use both."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mbclora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        for layer in quept_linears(model).values():
            for param in (*layer.clip_upper.values(), *layer.clip_lower.values()):
                param.copy_(1.0 + 4.0 * torch.rand(param.shape, generator=gen))


def elastic_model(folder: str, mode: str = "weight_only", **config) -> torch.nn.Module:
    groups = 4 if mode == "weight_only" else 3
    config.setdefault("group_size", GROUPS if mode == "weight_only" else {b: GROUPS[b] for b in range(4, 9)})
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=QuEPTConfig(mode=mode, ranks=[2] * groups, **config)
    ).eval()
    torch.manual_seed(0)
    model.add_adapter(MBCLoRAConfig())
    perturb(model)
    return model.eval()


@pytest.fixture(scope="module")
def elastic(tiny_llama_dir):
    return elastic_model(tiny_llama_dir)


# ------------------------------------------------------------------------------------------ PackedLinear


def random_layer(out_f: int, in_f: int, group: int, bits: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen)
    groups = 1 if group == -1 or group >= in_f else -(-in_f // group)
    upper = 1.0 + 4.0 * torch.rand(out_f, groups, generator=gen)
    lower = 1.0 + 4.0 * torch.rand(out_f, groups, generator=gen)
    return weight, upper, lower


@pytest.mark.parametrize("bits", ALL_BITS)
def test_packed_linear_round_trip_and_fake_quant_equality(bits):
    """Codes survive pack/unpack and the dequantized weight IS the fake-quant weight, for odd shapes and groups."""
    for seed, (out_f, in_f, group) in enumerate(SHAPES):
        weight, upper, lower = random_layer(out_f, in_f, group, bits, seed)
        codes, scales, zeros = quantize_weight_codes(weight, bits, upper, lower, group)
        bias = torch.randn(out_f)
        layer = PackedLinear.from_codes(codes, scales, zeros, bias, bits=bits, group_size=group)
        assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (out_f, packed_cols(in_f, bits))
        assert torch.equal(layer.codes(), codes)
        fake = fake_quantize_weight(weight, bits, upper, lower, group)
        assert torch.equal(layer.dequantized_weight(), fake), (bits, out_f, in_f, group)
        x = torch.randn(3, in_f)
        assert max_diff(layer(x), F.linear(x, fake, bias)) <= ATOL


def test_activation_quantization_and_input_transform():
    """weight_activation mode: the input goes through the transform, then QuEPT's per-token quantizer."""
    weight, upper, lower = random_layer(6, 40, 32, 4, 0)
    codes, scales, zeros = quantize_weight_codes(weight, 4, upper, lower, 32)
    layer = PackedLinear.from_codes(codes, scales, zeros, None, bits=4, group_size=32, activation_bits=4)
    layer.input_transform = lambda t: t * 2.0
    x = torch.randn(2, 5, 40)
    expected = F.linear(fake_quantize_activation(x * 2.0, 4), fake_quantize_weight(weight, 4, upper, lower, 32))
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_quept_linear_freezes_into_an_equal_packed_linear(granularity):
    """Layer level, both activation quantizers (per-tensor: the ViT path with a calibrated log step)."""
    from quept_hf import QuEPTLinear
    from quept_hf.packing.plan import _quantize

    torch.manual_seed(0)
    layer = QuEPTLinear(
        48, 10, True, bits=[4, 6], group_size={4: 32, 6: -1}, quantize_activations=True,
        activation_granularity=granularity,
    )  # fmt: skip
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        for key in layer.clip_act:
            layer.clip_act[key].fill_(-3.0)
    x = torch.randn(2, 7, 48)
    for bits in (4, 6):
        layer.set_bits(bits)
        q = _quantize(layer, None, bits)
        packed = PackedLinear.from_codes(
            q.codes, q.scales, q.zeros, q.bias, bits=bits, group_size=q.group_size,
            activation_bits=q.activation_bits, act_log_step=q.act_log_step,
        )  # fmt: skip
        assert packed.activation_granularity == granularity
        with torch.no_grad():
            assert torch.equal(packed(x), layer(x))


def test_weight_cache_is_opt_in_and_exact():
    weight, upper, lower = random_layer(8, 48, 32, 3, 1)
    layer = PackedLinear.from_codes(*quantize_weight_codes(weight, 3, upper, lower, 32), None, bits=3, group_size=32)
    x = torch.randn(4, 48)
    plain = layer(x)
    assert layer.working.nbytes() == 0
    assert set_weight_cache(layer, True) == 1
    assert torch.equal(layer(x), plain) and layer.working.weight is not None
    set_weight_cache(layer, False)
    assert layer.working.weight is None
    assert torch.equal(layer(x), plain) and layer.working.nbytes() == 0


# ------------------------------------------------------------------------------------------ export / load


class FloatAllocations(TorchDispatchMode):
    """Records the shape of every float tensor an aten op creates on a real (non-meta) device."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


@pytest.mark.parametrize("bits", ALL_BITS)
def test_export_loads_packed_and_matches_fake_quant(elastic, tmp_path, bits):
    """export -> from_pretrained: PackedLinear everywhere, no float linear weight allocated, logits equal."""
    quept_hf.set_bits(elastic, bits)
    expected = logits(elastic, ids())
    folder = export(elastic, f"w{bits}", tmp_path / "packed")
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "model.safetensors"]
    qconfig = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "quept" and qconfig["packed"]["format"] == "quept-packed"
    assert set(qconfig["packed"]["bits"].values()) == {bits} and qconfig["bits"] == [bits]

    recorder = FloatAllocations()
    with recorder if bits == 3 else contextlib.nullcontext():  # recording every op is slow: one width suffices
        loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    packed = {name: m for name, m in loaded.named_modules() if isinstance(m, PackedLinear)}
    assert sorted(packed) == sorted(quept_linears(elastic)) and len(packed) == 14
    weight_shapes = {(m.out_features, m.in_features) for m in packed.values()}
    assert not weight_shapes & recorder.shapes, "a float tensor of a packed linear's weight shape was allocated"
    for module in packed.values():
        assert module.bits == bits and module.group_size == GROUPS[bits] and module.qweight.dtype == torch.uint8
    assert max_diff(logits(loaded, ids()), expected) <= ATOL
    assert quept_hf.get_bits(loaded) == bits  # uniform: an int, as for an elastic model
    with pytest.raises(ValueError, match=r"packed .* cannot switch"):
        quept_hf.set_bits(loaded, 8)


def test_file_and_resident_size_follow_the_bit_width(elastic, tmp_path):
    """Packed bytes = ceil(in*bits/8) per row plus two floats per (row, group); the file holds exactly that."""
    bits = 3
    folder = export(elastic, bits, tmp_path / "w3")
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        for name, layer in quept_linears(elastic).items():
            assert f"{name}.weight" not in keys
            qweight, scales = fh.get_tensor(f"{name}.qweight"), fh.get_tensor(f"{name}.scales")
            assert qweight.dtype == torch.uint8
            assert qweight.numel() == layer.out_features * -(-layer.in_features * bits // 8)
            assert scales.shape == fh.get_tensor(f"{name}.zeros").shape
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for module in loaded.modules():
        if isinstance(module, PackedLinear):
            groups = module.scales.shape[1]
            expected = module.out_features * (packed_cols(module.in_features, bits) + 2 * groups * 4)
            assert module.storage_bytes() == expected


def test_mixed_plan_and_hand_made_plan_export(elastic, tmp_path):
    """A stored plan (QuEPTConfig.plans) and a {block or module: bits} mapping export per-layer widths."""
    layers = quept_linears(elastic)
    names = sorted(layers)
    plan = {name: ALL_BITS[i % len(ALL_BITS)] for i, name in enumerate(names)}
    quept_hf.quept_config(elastic).plans["mixed-5.00"] = {"avg_bits": 5.0, "bits": plan}
    try:
        for name, bits in plan.items():
            layers[name].set_bits(bits)
        expected = logits(elastic, ids())
        loaded = AutoModelForCausalLM.from_pretrained(export(elastic, "mixed-5.00", tmp_path / "mixed"))
        assert max_diff(logits(loaded, ids()), expected) <= ATOL
        assert {n: m.bits for n, m in loaded.named_modules() if isinstance(m, PackedLinear)} == plan
    finally:
        del quept_hf.quept_config(elastic).plans["mixed-5.00"]

    custom = {"model.layers.1": 2, "model.layers.1.mlp.down_proj": 6}
    packed = pack_model(elastic, custom)
    widths = {n: m.bits for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert widths["model.layers.1.mlp.down_proj"] == 6 and widths["model.layers.1.self_attn.q_proj"] == 2
    assert widths["model.layers.0.self_attn.q_proj"] == quept_hf.quept_config(elastic).default_bits


def test_weight_activation_and_peft_wrapped_export(tiny_llama_dir, tmp_path):
    """W4A4 through a PeftModel: the activation bits are stored and reproduced at load."""
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir,
        quantization_config=QuEPTConfig(mode="weight_activation", ranks=[2, 2, 2], group_size=32),
    ).eval()
    torch.manual_seed(0)
    model = get_peft_model(base, MBCLoRAConfig()).eval()
    perturb(model)
    model.set_adapter("w4")
    expected = logits(model, ids())
    folder = export(model, 4, tmp_path / "w4a4")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, PackedLinear) and layer.activation_bits == 4
    assert max_diff(logits(loaded, ids()), expected) <= ATOL


def test_vit_export_keeps_pinned_layers_and_per_tensor_activation_steps(tmp_path):
    """ViT W4A4: per-tensor activation steps travel in the checkpoint; the 8-bit pinned head/patch embedding
    are pinned again at load, so the packed classifier's logits equal the fake-quant ones."""
    try:
        from tests.tiny_models import vit
    except ModuleNotFoundError:  # `tests/` itself on sys.path
        from tiny_models import vit  # type: ignore[no-redef]
    from quept_hf import QuEPTLinear

    tiny = vit(tmp_path)
    model = tiny.load(mode="weight_activation", group_size=32, ranks=[2, 2, 2])
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, QuEPTLinear):
                for step in layer.clip_act.values():
                    step.fill_(-2.5)
    quept_hf.set_bits(model, 4)
    with torch.no_grad():
        expected = model(**tiny.inputs).logits
        loaded = tiny.auto_class.from_pretrained(export(model, 4, tmp_path / "packed")).eval()
        assert max_diff(loaded(**tiny.inputs).logits, expected) <= ATOL
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert {"PackedLinear", "PinnedLinear", "PinnedConv2d"} <= kinds
    assert all(m.act_log_step is not None for m in loaded.modules() if isinstance(m, PackedLinear))


# ----------------------------------------------------------------------------------------------- errors


def test_clear_errors_for_unsupported_requests(elastic, tiny_llama_dir, tmp_path):
    for request, message in [
        (9, r"bit-widths 2\.\.8"),
        (1, r"bit-widths 2\.\.8"),
        ("w9", r"unknown bit-width or plan 'w9'; this model provides \['w2'"),
        ("mixed-9.99", r"unknown bit-width or plan .* provides \['w2'"),
        ("banana", "unknown bit-width or plan"),
        ({"model.layers.7.mlp": 3}, "match no quantized linear"),
        ({"model.layers.0.mlp.up_proj": 16}, r"bit-widths 2\.\.8"),
    ]:
        with pytest.raises(ValueError, match=message):
            pack_model(elastic, request)
    narrow = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=QuEPTConfig(bits=[4, 8]))
    with pytest.raises(ValueError, match=r"not available; this model was calibrated for bits \[4, 8\]"):
        pack_model(narrow, 3)
    with pytest.raises(ValueError, match=r"has no QuEPTLinear|not a QuEPT model"):
        pack_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(elastic, 4, tmp_path / "full")
    with pytest.raises(ValueError, match=r"bits 2\.\.8"):
        PackedLinear(8, 8, bits=9, group_size=-1)
    with pytest.raises(ValueError, match="format='quept-packed'"):
        QuEPTConfig(bits=[4], packed={"format": "gptq", "bits": {"a": 4}})
    with pytest.raises(ValueError, match="outside"):
        QuEPTConfig(bits=[4], packed={"format": "quept-packed", "bits": {"a": 3}})


def test_merged_model_exports_only_its_merged_bits(tiny_llama_dir, tmp_path):
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=QuEPTConfig(ranks=[2] * 4, group_size=32)
    ).eval()
    torch.manual_seed(0)
    model = get_peft_model(base, MBCLoRAConfig()).eval()
    perturb(model)
    model.set_adapter("w3")
    expected = logits(model, ids())
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="not available"):
        pack_model(merged, 4)
    assert max_diff(logits(pack_model(merged, 3), ids()), expected) <= ATOL


def test_overwrite_replaces_atomically(elastic, tmp_path):
    target = tmp_path / "out"
    export(elastic, 8, target)
    export(elastic, 2, target, overwrite=True)
    config = json.loads((target / "config.json").read_text())["quantization_config"]
    assert config["packed"]["source"] == "w2"
    assert sorted(os.listdir(tmp_path)) == ["out"], "staging folders must not be left behind"


# ---------------------------------------------------------------------------------------------- interop

needs_ct = pytest.mark.skipif(
    not compressed_tensors_available(), reason="compressed-tensors is not installed (pip install compressed-tensors)"
)


@needs_ct
def test_compressed_tensors_layout_is_the_packages_own(elastic):
    """Our tensors equal what compressed-tensors' own compressor writes for the same quantized weight.

    down_proj (in=160) at 3 bits has QuEPT group 128 (a padded second group), at 4 bits one group per row:
    both are stored with compressed-tensors group 32, scales and zero points repeated.
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from quept_hf.packing.interop import _ct_tensors
    from quept_hf.packing.linear import dequantize_codes
    from quept_hf.packing.plan import quantize_layers

    name = "model.layers.0.mlp.down_proj"
    for bits, repeat in ((3, 4), (4, 5)):
        q = quantize_layers(elastic, {name: bits})[name]
        ours = _ct_tensors(name, q, 32)
        scale = ours[f"{name}.weight_scale"]
        zero_point = unpack_from_int32(ours[f"{name}.weight_zero_point"], bits, scale.shape, packed_dim=0)
        expected_zeros = q.zeros.repeat_interleave(repeat, dim=1)[:, :5] - (1 << (bits - 1))
        assert scale.shape == (64, 5) and torch.equal(zero_point.float(), expected_zeros)
        args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="group", group_size=32)
        dense = dequantize_codes(q.codes, q.scales, q.zeros, q.group_size)
        theirs = PackedQuantizationCompressor.compress(
            {"weight": dense, "weight_scale": scale, "weight_zero_point": zero_point},
            QuantizationScheme(targets=[name], weights=args),
        )
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            assert torch.equal(ours[f"{name}.{key}"], theirs[key]), (bits, key)


@needs_ct
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_export_loads_in_transformers(elastic, tmp_path, bits):
    """transformers' own compressed-tensors loader reproduces the fake-quant logits.

    ``dequantize=True``: transformers 5.23's default (compressed) path cannot load ANY asymmetric pack-quantized
    checkpoint, compressed-tensors' own included (its meta-device skeleton expects an unpacked zero point; see
    vllm-project/llm-compressor#1618); its dequantize-on-load path reads the layout correctly.
    """
    from transformers import CompressedTensorsConfig

    quept_hf.set_bits(elastic, bits)
    expected = logits(elastic, ids())
    folder = export_compressed_tensors(elastic, bits, tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))
    assert max_diff(logits(loaded, ids()), expected) <= ATOL


@needs_ct
def test_compressed_tensors_refuses_what_it_cannot_hold(elastic, tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="one bit-width"):
        export_compressed_tensors(elastic, {"model.layers.0": 4, "model.layers.1": 8}, tmp_path / "mixed")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=QuEPTConfig(mode="weight_activation", group_size=32)
    )
    with pytest.raises(ValueError, match="weight-only"):
        export_compressed_tensors(model, 8, tmp_path / "ct")

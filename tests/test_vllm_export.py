"""compressed-tensors export for vLLM (issue 16, part 4): ``export_compressed_tensors(..., target="vllm")``.

vLLM itself is not needed here (it lives in its own venv: ``make test-engines`` runs benchmarks/vllm_check.py);
these tests pin what the exporter writes for it and what it refuses:

* W4: the general asymmetric ``pack-quantized`` layout, tensor for tensor (QuEPT's codes and zero points
  unchanged), plus a report saying so;
* W8: W8A8 int8 (``int-quantized`` symmetric per-channel weights, dynamic per-token int8 activations); rows
  whose ``c - z`` fits int8 with one scale are QuEPT's weight exactly, the others carry the stated error;
* every width, shape, group size or activation setting vLLM's CPU kernels cannot run raises a ValueError.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quept_hf import QuEPTConfig
from quept_hf.packing.interop import (
    _check_vllm,
    _int8_rows,
    compressed_tensors_available,
    export_compressed_tensors,
)
from quept_hf.packing.plan import QuantizedLinear, quantize_layers
from quept_hf.packing.working import dequantize_codes
from tests.test_packing_export import elastic_model

pytestmark = pytest.mark.skipif(
    not compressed_tensors_available(), reason="compressed-tensors is not installed (pip install compressed-tensors)"
)


@pytest.fixture(scope="module")
def elastic(tiny_llama_dir):
    """Weight-only elastic tiny Llama: W4 per channel, W8 group 32 (rows of 64 and 160, all multiples of 32)."""
    return elastic_model(tiny_llama_dir)


def read(folder) -> tuple[dict, dict, dict]:
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    return config, load_file(folder / "model.safetensors"), json.loads((folder / "quept_export.json").read_text())


def test_vllm_w4_is_the_general_layout_with_a_report(elastic, tmp_path):
    export_compressed_tensors(elastic, 4, tmp_path / "general")
    export_compressed_tensors(elastic, 4, tmp_path / "vllm", target="vllm")
    config, tensors, report = read(tmp_path / "vllm")
    general = load_file(tmp_path / "general" / "model.safetensors")
    assert tensors.keys() == general.keys()
    assert all(torch.equal(tensors[k], general[k]) for k in tensors)
    assert config == json.loads((tmp_path / "general" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["symmetric"] is False and weights["strategy"] == "channel"
    assert report["exact"] and report["vllm_dtype"] == "float16" and report["rows_exact"] == report["rows"]
    assert not (tmp_path / "general" / "quept_export.json").exists()


def test_vllm_w8_is_w8a8_int8_with_its_stated_error(elastic, tmp_path):
    with pytest.warns(UserWarning, match="symmetric int8 row"):
        export_compressed_tensors(elastic, 8, tmp_path / "w8", target="vllm")
    config, tensors, report = read(tmp_path / "w8")
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized"
    assert (
        group["weights"]["num_bits"] == 8
        and group["weights"]["symmetric"]
        and group["weights"]["strategy"] == "channel"
    )
    inputs = group["input_activations"]
    assert inputs["dynamic"] and inputs["symmetric"] and inputs["strategy"] == "token" and inputs["num_bits"] == 8
    layers = quantize_layers(elastic, {name: 8 for name in group["targets"]})
    sq_err = sq_ref = 0.0
    for name, q in layers.items():
        weight, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert weight.dtype == torch.int8 and weight.shape == q.codes.shape and scale.shape == (q.codes.shape[0], 1)
        target = dequantize_codes(q.codes, q.scales, q.zeros, q.group_size)
        diff = weight.float() * scale - target
        sq_err, sq_ref = sq_err + diff.pow(2).sum().item(), sq_ref + target.pow(2).sum().item()
        assert diff.abs().max().item() <= report["weight_max_abs_error"] + 1e-7
    assert not report["exact"] and report["weight_relative_error"] == pytest.approx((sq_err / sq_ref) ** 0.5, rel=1e-4)
    assert 0 < report["weight_relative_error"] < 0.05 and "weight-only QuEPT model" in report["activations"]


def test_int8_rows_are_exact_where_the_asymmetric_grid_fits():
    """A row with one scale and ``c - z`` in [-128, 127] is stored as ``c - z`` with QuEPT's scale: bitwise."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (3, 64), generator=gen, dtype=torch.uint8)
    codes[2, 0], codes[2, 1] = 0, 255  # row 2 spans the whole range with z = 100: c - z reaches 155
    zeros = torch.tensor([[128.0], [128.0], [100.0]])
    scales = torch.tensor([[0.01], [0.02], [0.03]])
    q = QuantizedLinear(codes, scales, zeros, None, 8, -1, None)
    int8, scale, exact, target = _int8_rows(q)
    assert exact.tolist() == [True, True, False]
    assert torch.equal(int8[:2].float() * scale[:2], target[:2])
    assert torch.equal(int8[:2].to(torch.int32), codes[:2].to(torch.int32) - 128)
    plain = target[2].abs().max() / 127  # the searched scale never does worse than absmax / 127 (no clipping)
    plain_err = ((torch.round(target[2] / plain) * plain - target[2]) ** 2).sum()
    assert ((int8[2].float() * scale[2] - target[2]) ** 2).sum() <= plain_err


def test_vllm_w8a8_keeps_quepts_own_per_token_activations(tiny_llama_dir, tmp_path):
    """QuEPT's per-token int8 activation quantizer IS vLLM's dynamic per-token one: that model exports; at 4 bits
    (vLLM has no asymmetric W4A8) and without a target (the general format is weight-only) it is refused."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=QuEPTConfig(mode="weight_activation", rotation=False, group_size=-1)
    ).eval()
    with pytest.warns(UserWarning):
        export_compressed_tensors(model, 8, tmp_path / "w8a8", target="vllm")
    _, _, report = read(tmp_path / "w8a8")
    assert "QuEPT's own activation quantizer" in report["activations"]
    with pytest.raises(ValueError, match="weight-only"):
        export_compressed_tensors(model, 4, tmp_path / "w4a4", target="vllm")
    with pytest.raises(ValueError, match="weight-only"):
        export_compressed_tensors(model, 8, tmp_path / "general")


def test_vllm_refuses_what_its_cpu_kernels_cannot_run(elastic, tiny_llama_dir, tmp_path):
    for bits in (2, 3, 5, 6, 7):
        with pytest.raises(ValueError, match="CPUWNA16LinearKernel"):
            export_compressed_tensors(elastic, bits, tmp_path / f"w{bits}", target="vllm")
    with pytest.raises(ValueError, match="one bit-width"):
        export_compressed_tensors(
            elastic, {"model.layers.0": 4, "model.layers.1": 8}, tmp_path / "mixed", target="vllm"
        )
    with pytest.raises(ValueError, match="target="):
        export_compressed_tensors(elastic, 4, tmp_path / "x", target="tensorrt")
    small_groups = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=QuEPTConfig(group_size=16)
    ).eval()
    with pytest.raises(ValueError, match="group 16"):
        export_compressed_tensors(small_groups, 4, tmp_path / "g16", target="vllm")
    export_compressed_tensors(small_groups, 4, tmp_path / "g16-general")  # the general format still takes it
    odd = QuantizedLinear(
        torch.zeros(48, 64, dtype=torch.uint8), torch.ones(48, 1), torch.full((48, 1), 8.0), None, 4, -1, None
    )
    with pytest.raises(ValueError, match="multiples of 32"):
        _check_vllm({"layer": odd})
    odd.bits = 8
    assert _check_vllm({"layer": odd})  # W8A8: oneDNN takes any shape

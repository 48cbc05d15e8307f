"""Issue 15: the frozen elastic model — packed codes per kept bit-width, switching without re-quantizing.

Equality: on the reference path (weight form ``"dequantized"``) the frozen layer's working weight is BITWISE the
elastic layer's fake-quant weight (the same `quantize_weight_codes` codes, dequantized with the fake quantizer's
ops in the same dtype), so logits are compared for exact equality. The kernel path is compared with a stated
tolerance (bf16 activations).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import FrozenLinear, QuEPTConfig, freeze, get_bits, set_bits, set_weight_form
from quept_hf.cli import main as cli_main
from quept_hf.inspection import quept_linears

try:
    from tests import tiny_models
    from tests.test_packing_export import ALL_BITS, elastic_model, ids, logits
except ModuleNotFoundError:  # `tests/` itself on sys.path
    import tiny_models  # type: ignore[no-redef]
    from test_packing_export import ALL_BITS, elastic_model, ids, logits  # type: ignore[no-redef]

pytestmark = pytest.mark.usefixtures("one_thread")


def plan_for(model) -> dict[str, int]:
    """A hand-made mixed plan: alternate 3 and 6 bits over the quantized linears."""
    return {name: (3 if i % 2 else 6) for i, name in enumerate(sorted(quept_linears(model)))}


@pytest.fixture(scope="module")
def elastic(tiny_llama_dir):
    model = elastic_model(tiny_llama_dir)
    quept_hf.quept_config(model).plans["mixed-4.5"] = {"bits": plan_for(model)}
    set_bits(model, "mixed-4.5")  # teaches the adapter the plan, as plan_mixed_precision's plans are
    return model


@pytest.fixture(scope="module")
def frozen(elastic):
    return freeze(elastic)


def assert_same_at_every_width(elastic, frozen, widths, x) -> None:
    for name in widths:
        set_bits(elastic, name)
        frozen.set_adapter(name)
        assert torch.equal(logits(elastic, x), logits(frozen, x)), name


# ----------------------------------------------------------------------------------------- equality


def test_frozen_logits_equal_elastic_at_every_width_and_plan(elastic, frozen):
    assert_same_at_every_width(elastic, frozen, [*(f"w{b}" for b in ALL_BITS), "mixed-4.5"], ids())
    assert get_bits(frozen) == get_bits(elastic) == plan_for(elastic)


def test_frozen_model_keeps_no_float_weight_adapter_or_clipping(frozen):
    names = [n for n, _ in frozen.named_parameters()]
    assert not [n for n in names if "mbclora" in n or "clip_" in n]
    layers = {n: m for n, m in frozen.named_modules() if isinstance(m, FrozenLinear)}
    assert len(layers) == 14
    for name in layers:
        assert f"{name}.weight" not in names
        assert all(f"{name}.qweight.{b}" in names for b in ALL_BITS)
    assert all(p.dtype == torch.uint8 for n, p in frozen.named_parameters() if ".qweight." in n)


def test_switching_never_runs_the_quantizer(frozen, monkeypatch):
    import quept_hf.nn.functional as functional

    def forbidden(*args, **kwargs):
        raise AssertionError("a frozen switch re-ran the quantizer")

    for name in ("quantize_weight_codes", "fake_quantize_weight", "weight_qparams"):
        monkeypatch.setattr(functional, name, forbidden)
    for b in (2, 5, 8):
        frozen.set_adapter(f"w{b}")
        logits(frozen, ids())


def test_per_bit_evaluates_every_kept_width(frozen):
    from quept_hf.evaluation import per_bit

    frozen.set_adapter("w5")
    results = per_bit(frozen, lambda m: quept_hf.get_bits(m))
    assert results == {b: b for b in ALL_BITS} and quept_hf.get_bits(frozen) == 5


def test_subset_of_widths_and_plans(elastic):
    small = freeze(elastic, bits=[3, 8], plans=[])
    config = quept_hf.quept_config(small)
    assert config.bits == [3, 8] and config.plans == {} and config.is_frozen
    assert_same_at_every_width(elastic, small, ["w3", "w8"], ids(1))
    with pytest.raises(ValueError, match=r"bits=4.*\[3, 8\]"):
        set_bits(small, 4)
    with pytest.raises(ValueError, match=r"no bit-width or plan named 'mixed-4.5'"):
        small.set_adapter("mixed-4.5")
    # A plan keeps its widths only where it uses them: 3 and 6 bits, on alternate layers.
    planned = freeze(elastic, bits=[8], plans=["mixed-4.5"])
    kept = quept_hf.quept_config(planned).frozen["bits"]
    assert {tuple(v) for v in kept.values()} == {(3, 8), (6, 8)}
    assert_same_at_every_width(elastic, planned, ["w8", "mixed-4.5"], ids(2))


def test_size_is_the_sum_of_the_kept_widths(elastic):
    """Linear-layer codes cost (sum of kept bits) / 16 of fp16, plus scales and zeros."""
    for bits in ([3, 4, 8], ALL_BITS):
        frozen = freeze(elastic, bits=bits, plans=[])
        for layer in (m for m in frozen.modules() if isinstance(m, FrozenLinear)):
            codes = sum(p.numel() for p in layer.qweight.values())
            fp16 = layer.in_features * layer.out_features * 2
            assert codes <= sum(-(-layer.in_features * b // 8) for b in bits) * layer.out_features
            assert abs(codes / fp16 - sum(bits) / 16) < 0.02


# ------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_bit_identical(elastic, frozen, tmp_path):
    frozen.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["frozen"]["format"] == "quept-frozen" and config["frozen"]["version"] == 1
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if k.endswith("q_proj.weight") or "clip_" in k or "mbclora" in k]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].mlp.down_proj, FrozenLinear)
    assert_same_at_every_width(elastic, loaded, ["w2", "w5", "w8", "mixed-4.5"], ids(3))
    loaded.set_adapter("w8")
    frozen.set_adapter("w8")
    for (name, a), (_, b) in zip(frozen.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_push_to_hub_is_one_commit_and_reloads(elastic, frozen, local_hub):
    """transformers' own push_to_hub: one commit with the frozen folder; from_pretrained(repo) switches again."""
    before = len(local_hub.commits("me/frozen")) if "me/frozen" in local_hub.repo_ids() else 0
    frozen.push_to_hub("me/frozen")
    assert len(local_hub.commits("me/frozen")) == before + 2  # the repo's initial commit + ONE upload
    loaded = AutoModelForCausalLM.from_pretrained("me/frozen").eval()
    assert quept_hf.quept_config(loaded).is_frozen
    assert_same_at_every_width(elastic, loaded, ["w3", "mixed-4.5"], ids(9))


def test_kinds_are_never_taken_for_each_other(elastic, frozen, tmp_path):
    """An elastic checkpoint edited to say frozen, or the reverse, fails naming the missing tensors."""
    frozen.save_pretrained(tmp_path / "frozen")
    elastic.save_pretrained(tmp_path / "elastic")
    kinds = {
        k: json.loads((tmp_path / k / "config.json").read_text())["quantization_config"] for k in ("frozen", "elastic")
    }
    for folder, other in (("frozen", "elastic"), ("elastic", "frozen")):
        path = tmp_path / folder / "config.json"
        data = json.loads(path.read_text())
        data["quantization_config"] = kinds[other]
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="lacks"):
            AutoModelForCausalLM.from_pretrained(tmp_path / folder)


def test_edited_format_fields_are_refused(frozen, tmp_path):
    """config.json's fields the codes depend on are checked against the digest saved with the tensors."""
    frozen.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["rotation"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rotation"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_format_version_from_the_future_is_refused(frozen, tmp_path):
    frozen.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["frozen"]["version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"frozen format version 2.*upgrade"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------- errors


def test_bad_requests_name_the_argument(elastic, frozen):
    with pytest.raises(ValueError, match="freeze: bits=\\[9\\]"):
        freeze(elastic, bits=[9])
    with pytest.raises(ValueError, match="16 cannot be kept"):
        freeze(elastic, bits=[16])
    with pytest.raises(ValueError, match="freeze: plans \\['nope'\\]"):
        freeze(elastic, plans=["nope"])
    with pytest.raises(ValueError, match=r"freeze: plans='mixed-4.5'"):
        freeze(elastic, plans="mixed-4.5")
    with pytest.raises(ValueError, match="bits=16 is not available"):
        set_bits(frozen, 16)
    with pytest.raises(ValueError, match=r"bits=4\.0 is not available"):
        set_bits(frozen, 4.0)
    with pytest.raises(ValueError, match=r"no bit-width or plan named 'foo'.*'w2'"):
        frozen.set_adapter("foo")
    with pytest.raises(ValueError, match="form='fast' is unknown"):
        set_weight_form(frozen, "fast")
    with pytest.raises(ValueError, match=r"already packed|no QuEPTLinear"):
        freeze(frozen)


def test_config_refuses_a_malformed_frozen_description():
    base = dict(format="quept-frozen", version=1, bits={"a": [4, 8]})
    QuEPTConfig(bits=[4, 8], frozen=base)
    for bad, match in (
        ({**base, "format": "x"}, "format="),
        ({**base, "version": "1"}, "version"),
        ({**base, "bits": {"a": [8, 4]}}, "sorted list"),
        ({**base, "bits": {"a": [3]}}, "sorted list"),
        ({**base, "per_tensor_activations": ["b"]}, "per_tensor_activations"),
    ):
        with pytest.raises(ValueError, match=match):
            QuEPTConfig(bits=[4, 8], frozen=bad)


# -------------------------------------------------------------------------------------- weight forms


def test_weight_forms(elastic, frozen):
    """``"none"`` is exact too; ``"kernel"`` is within bf16 arithmetic of the reference."""
    x = ids(4)
    for b in (3, 4, 8):
        elastic.set_adapter(f"w{b}")
        frozen.set_adapter(f"w{b}")
        reference = logits(elastic, x)
        set_weight_form(frozen, "none")
        assert torch.equal(logits(frozen, x), reference)
        for form in ("kernel", "kernel-all"):
            set_weight_form(frozen, form)
            kernel = logits(frozen, x)
            assert (kernel - reference).abs().max() <= 0.05 * reference.abs().max()
        set_weight_form(frozen, "dequantized")
        assert torch.equal(logits(frozen, x), reference)


def test_kernel_all_switch_derives_nothing(elastic, frozen, monkeypatch):
    """``"kernel-all"`` prepares every width once; a switch then neither unpacks codes nor prepares a kernel."""
    import quept_hf.packing.frozen as frozen_module
    import quept_hf.packing.kernels as kernels

    x = ids(8)
    set_weight_form(frozen, "kernel-all")
    expected = {}
    for b in (2, 5, 8):
        frozen.set_adapter(f"w{b}")
        expected[b] = logits(frozen, x)

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel-all switch derived a working form")

    monkeypatch.setattr(kernels, "prepare_kernel", forbidden)
    monkeypatch.setattr(frozen_module, "unpack", forbidden)
    try:
        for b in (8, 2, 5):
            frozen.set_adapter(f"w{b}")
            assert torch.equal(logits(frozen, x), expected[b])
    finally:
        monkeypatch.undo()
        set_weight_form(frozen, "dequantized")


# ------------------------------------------------------------------------------- other architectures


def test_weight_activation_with_rotation_and_kv_cache(tiny_llama_dir, tmp_path):
    elastic = elastic_model(tiny_llama_dir, mode="weight_activation", kv_bits="follow")
    assert quept_hf.quept_config(elastic).rotation
    frozen = freeze(elastic)
    widths = [f"w{b}" for b in range(4, 9)]
    assert_same_at_every_width(elastic, frozen, widths, ids(5))
    frozen.save_pretrained(tmp_path)
    assert_same_at_every_width(elastic, AutoModelForCausalLM.from_pretrained(tmp_path).eval(), widths, ids(6))


MODES = {"weight_only": dict(group_size=16, ranks=[2] * 4), "weight_activation": dict(lr_scaling="none", ranks=[2] * 3)}


@pytest.mark.parametrize(
    ("family", "mode"),
    [("bert", "weight_only"), ("vit", "weight_activation"), ("vit", "weight_only"), ("llava", "weight_only"),
     ("llava", "weight_activation"), ("qwen2_vl", "weight_only")],
)  # fmt: skip
def test_architectures_freeze_save_and_reload_exactly(family, mode, tmp_path):
    """Tiny BERT / ViT (W+A: per-tensor activations, pinned layers) / VLMs in both modes: calibrate briefly, freeze,
    switch, save and reload: every width bit-identical to the elastic model."""
    tiny = getattr(tiny_models, family)(tmp_path)
    elastic = tiny.load(mode=mode, num_samples=4, batch_size=2, epochs=1, **MODES[mode])
    elastic.eval()
    frozen = freeze(elastic)
    widths = [f"w{b}" for b in quept_hf.quept_config(elastic).bits]

    @torch.no_grad()
    def outputs(model):
        out = model(**tiny.inputs)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    frozen.save_pretrained(tmp_path / "frozen")
    reloaded = tiny.auto_class.from_pretrained(tmp_path / "frozen").eval()
    for name in widths:
        set_bits(elastic, name)  # calibration attached MB-CLoRA as a bare PEFT injection: no set_adapter
        frozen.set_adapter(name)
        reloaded.set_adapter(name)
        reference = outputs(elastic)
        assert torch.equal(outputs(frozen), reference), name
        assert torch.equal(outputs(reloaded), reference), name


def test_cli_freeze(elastic, tmp_path):
    elastic.save_pretrained(tmp_path / "elastic")
    assert (
        cli_main(
            ["freeze", str(tmp_path / "elastic"), "--bits", "2,4", "--plans", "", "--out", str(tmp_path / "frozen")]
        )
        == 0
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "frozen").eval()
    assert quept_hf.quept_config(loaded).bits == [2, 4]
    card = (tmp_path / "frozen" / "README.md").read_text()
    assert "w2" in card and "w4" in card and "w3" not in card
    assert_same_at_every_width(elastic, loaded, ["w2", "w4"], ids(7))


@pytest.mark.slow
def test_smollm2_kernel_perplexity_within_half_a_percent(smollm2_dir, wiki_split):
    """The kernel path's stated tolerance on the real model: held-out perplexity within 0.5% of the exact path."""
    from transformers import AutoTokenizer

    from quept_hf.evaluation import perplexity

    elastic = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=QuEPTConfig()).eval()
    frozen = freeze(elastic, bits=[4, 8], plans=[])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = wiki_split[1]
    for bits in (4, 8):
        frozen.set_adapter(f"w{bits}")
        scores = {}
        for form in ("dequantized", "kernel"):
            set_weight_form(frozen, form)
            scores[form] = perplexity(frozen, texts, tokenizer, seq_len=256, max_windows=2)
        assert abs(scores["kernel"] / scores["dequantized"] - 1) < 0.005, (bits, scores)


@pytest.mark.slow
def test_smollm2_frozen_equals_elastic(smollm2_dir, tmp_path):
    """The real SmolLM2-135M (uncalibrated elastic, so it needs no data): frozen logits equal at every width."""
    elastic = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=QuEPTConfig()).eval()
    frozen = freeze(elastic, bits=[2, 4, 8])
    x = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert_same_at_every_width(elastic, frozen, ["w2", "w4", "w8"], x)
    frozen.save_pretrained(tmp_path)
    assert_same_at_every_width(elastic, AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ["w4"], x)


def test_head_bits_stores_the_output_head_as_codes(elastic, tmp_path):
    """``head_bits=8``: lm_head becomes 8-bit per-row codes (untied), within 8-bit rounding of the float head."""
    frozen = freeze(elastic, bits=[4], plans=[], head_bits=8)
    head = frozen.get_output_embeddings()
    assert isinstance(head, quept_hf.PackedLinear) and head.bits == 8
    assert not frozen.config.tie_word_embeddings
    set_bits(elastic, 4)
    reference = logits(elastic, ids(10))
    got = logits(frozen, ids(10))
    assert 0 < (got - reference).abs().max() <= 0.02 * reference.abs().max()
    frozen.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.get_tensor("lm_head.qweight").dtype == torch.uint8  # noqa: SIM118
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, ids(10)), got)
    with pytest.raises(ValueError, match="head_bits=1"):
        freeze(elastic, head_bits=1)

"""QuEPTConfig: validation messages, JSON round trip, run-time fields, registration with transformers."""

from __future__ import annotations

import json

import pytest
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)

import quept_hf
from quept_hf import QuEPTConfig, QuEPTHfQuantizer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # bit-widths
        ({"bits": [1, 2]}, r"bit-widths \[1\] outside 2..8"),
        ({"bits": [4, 9]}, r"bit-widths \[9\] outside 2..8"),
        ({"bits": [2, 2, 3], "bit_groups": [[2], [2, 3]]}, "repeats a bit-width"),
        ({"bits": [2, 3, 4], "bit_groups": [[2], [3]]}, "must partition bits"),
        ({"bits": [2, 3], "bit_groups": [[2], [3, 4]]}, "must partition bits"),
        ({"default_bits": 9}, r"default_bits=9 is not one of bits"),
        ({"bits": [2, 4], "default_bits": 3}, r"default_bits=3 is not one of bits"),
        ({"mode": "weight_activation", "bits": [3, 4]}, "weight_activation mode supports bits 4..8"),
        ({"mode": "weight_activation", "bits": [2, 8]}, "weight_activation mode supports bits 4..8"),
        # ranks
        ({"ranks": [64, 0, 64, 64]}, "needs one positive rank per bit group"),
        ({"ranks": [64, -8, 64, 64]}, "needs one positive rank per bit group"),
        ({"ranks": [64, 64]}, "needs one positive rank per bit group"),
        # group sizes
        ({"group_size": 0}, "non-positive sizes"),
        ({"group_size": -2}, "non-positive sizes"),
        ({"group_size": {2: 128, 3: 0, 4: -1, 5: -1, 6: -1, 7: -1, 8: -1}}, "non-positive sizes"),
        ({"group_size": {2: 128}}, r"no entry for bit-width\(s\) \[3, 4, 5, 6, 7, 8\]"),
        ({"group_size": "128"}, "expected an int, a dict or None"),
        # choices
        ({"mode": "int4"}, r"mode='int4' is unknown"),
        ({"loss": "huber"}, r"loss='huber' is unknown"),
        ({"token_merge": "avg"}, r"token_merge='avg' is unknown"),
        ({"kv_bits": 1}, "kv_bits=1"),
        ({"kv_bits": "auto"}, "kv_bits='auto'"),
        # calibration settings
        ({"num_samples": 0}, "num_samples=0 must be a positive integer"),
        ({"seq_len": 2048.0}, r"seq_len=2048.0 must be a positive integer"),
        ({"batch_size": -1}, "batch_size=-1 must be a positive integer"),
        ({"epochs": -1}, "epochs=-1 must be a non-negative integer"),
        ({"top_p": 1.5}, r"top_p=1.5 must lie in \[0, 1\]"),
        ({"merge_weights": [0.5, 0.5]}, "one non-negative weight per bit group"),
        ({"merge_weights": [0.5, 0.5, 0.5, -0.5]}, "one non-negative weight per bit group"),
        ({"format_version": 99}, "upgrade quept_hf"),
        # unknown keys
        ({"bit": 4}, r"unknown field\(s\) \['bit'\]"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuEPTConfig(**kwargs)


def test_unknown_keys_in_from_dict():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['group'\]"):
        QuEPTConfig.from_dict({"quant_method": "quept", "mode": "weight_only", "group": 64})


def test_post_init_revalidates_after_mutation():
    config = QuEPTConfig()
    config.default_bits = 1
    with pytest.raises(ValueError, match="default_bits=1"):
        config.post_init()


def test_defaults_follow_the_spec():
    wo = QuEPTConfig()
    assert wo.bit_groups == [[2], [3, 4], [5, 6], [7, 8]]
    assert wo.bits == [2, 3, 4, 5, 6, 7, 8] and wo.default_bits == 8
    assert wo.group_size == {2: 128, 3: 128, 4: -1, 5: -1, 6: -1, 7: -1, 8: -1}
    assert (wo.lr_lora, wo.lr_clip) == (7e-4, 2e-2)
    wa = QuEPTConfig(mode="weight_activation")
    assert wa.bit_groups == [[4], [5, 6], [7, 8]] and wa.merge_weights == [0.4, 0.3, 0.3]
    assert QuEPTConfig(bits=[3, 8]).bit_groups == [[3], [8]]


def _custom_config(**extra) -> QuEPTConfig:
    return QuEPTConfig(
        mode="weight_activation",
        bits=[4, 5, 6, 8],
        bit_groups=[[4], [5, 6], [8]],
        default_bits=6,
        group_size={4: 64, 5: 128, 6: -1, 8: -1},
        ranks=[96, 64, 32],
        kv_bits="follow",
        modules_to_not_convert=["mlp.down_proj"],
        seed=3,
        num_samples=16,
        seq_len=256,
        epochs=0,
        lr_lora=1e-4,
        loss="mse",
        top_p=0.25,
        merge_weights=[0.5, 0.25, 0.25],
        token_merge="uniform",
        cascade=False,
        checkpoint_dir="/tmp/ckpt",
        dataset_description="wikipedia",
        calibrated=True,
        **extra,
    )


@pytest.mark.parametrize("make", [QuEPTConfig, _custom_config], ids=["default", "custom"])
def test_dict_and_json_round_trip(make):
    config = make()
    as_dict = config.to_dict()
    assert as_dict["quant_method"] == "quept"
    again = QuEPTConfig.from_dict(as_dict)
    assert again.to_dict() == as_dict
    assert again.group_size == config.group_size  # int keys come back as ints
    text = config.to_json_string()
    from_json = QuEPTConfig.from_dict(json.loads(text))
    assert from_json.to_json_string() == text
    assert from_json.to_dict() == as_dict
    # transformers' generic loader builds the same config from the dict stored in config.json.
    auto = AutoQuantizationConfig.from_dict(json.loads(text))
    assert isinstance(auto, QuEPTConfig) and auto.to_dict() == as_dict


def test_from_dict_return_unused_kwargs():
    config, unused = QuEPTConfig.from_dict(QuEPTConfig().to_dict(), return_unused_kwargs=True, seed=5, other=1)
    assert config.seed == 5 and unused == {"other": 1}


def test_runtime_fields_are_never_serialised():
    texts = ["some calibration text"] * 3

    class Tokenizer:  # not JSON-serialisable on purpose; callable, as a tokenizer is
        def __call__(self, text):
            return {"input_ids": []}

    config = _custom_config(dataset=texts, tokenizer=Tokenizer())
    assert config.dataset is texts
    as_dict = config.to_dict()
    assert "dataset" not in as_dict and "tokenizer" not in as_dict
    parsed = json.loads(config.to_json_string())
    assert "dataset" not in parsed and "tokenizer" not in parsed
    assert "calibration text" not in config.to_json_string()
    assert QuEPTConfig.from_dict(parsed).dataset is None
    # Also through a transformers model config (what save_pretrained writes to config.json).
    from transformers import LlamaConfig

    model_config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128)
    model_config.quantization_config = config
    saved = json.loads(model_config.to_json_string())
    assert saved["quantization_config"] == json.loads(config.to_json_string())


def test_registered_with_transformers():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["quept"] is QuEPTConfig
    assert AUTO_QUANTIZER_MAPPING["quept"] is QuEPTHfQuantizer


def test_register_again_is_harmless():
    quept_hf.register()
    quept_hf.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["quept"] is QuEPTConfig
    assert AUTO_QUANTIZER_MAPPING["quept"] is QuEPTHfQuantizer

"""Faults that must end in a clear error or an intact model, never in a wrong model that loads silently.

Issue 17: bad settings, a calibration checkpoint of another model or with a damaged block file, a save killed
half-way, stale weight files, edited metadata, a folder without ``config.json``. Each test reproduces one
defect class on a tiny model and fails on the code that had it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quept_hf import QuEPTConfig
from quept_hf.calibration import calibrate
from quept_hf.config import RUNTIME_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- config: ranges and types


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        # defect 5: numeric settings out of range
        ({"lr_lora": -1e-3}, "lr_lora"),
        ({"lr_clip": 0.0}, "lr_clip"),
        ({"lr_lora": float("nan")}, "lr_lora"),
        ({"lr_clip": 10.0}, "lr_clip"),
        ({"top_p": -0.1}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"merge_weights": [0.5, float("inf"), 0.25, 0.25]}, "merge_weights"),
        # defect 10: silent type coercion
        ({"bits": [4.7]}, "bits"),
        ({"bits": "48"}, "bits"),
        ({"bits": [True, 4]}, "bits"),
        ({"default_bits": 5.9}, "default_bits"),
        ({"default_bits": True, "bits": [1 + 1, 8]}, "default_bits"),
        ({"cascade": "no"}, "cascade"),
        ({"calibrated": "false"}, "calibrated"),
        ({"quantize_vision_tower": 1}, "quantize_vision_tower"),
        ({"group_size": True}, "group_size"),
        ({"group_size": 64.0}, "group_size"),
        ({"group_size": {"2": 128, "3": 128, "4": -1, "5": -1, "6": -1, "7": -1, "8": 1.5}}, "group_size"),
        ({"bits": [3, 4], "bit_groups": [[4], [3]]}, "bit_groups"),
        ({"bit_groups": [[2, 5], [3, 4], [6], [7, 8]]}, "bit_groups"),
        ({"num_samples": True}, "num_samples"),
        ({"format_version": "1"}, "format_version"),
        ({"kv_bits": True}, "kv_bits"),
        # defect 11: errors far from the cause
        ({"bits": []}, "bits"),
        ({"bit_groups": []}, "bit_groups"),
        ({"ranks": [2.5, 4, 4, 4]}, "ranks"),
        ({"seed": 2**70}, "seed"),
        ({"merge_weights": [0.0, 0.0, 0.0, 0.0]}, "merge_weights"),
        ({"checkpoint_dir": 123}, "checkpoint_dir"),
        ({"checkpoint_dir": ""}, "checkpoint_dir"),
        ({"tokenizer": 42}, "tokenizer"),
        ({"processor": 3.5}, "processor"),
        ({"modules_to_not_convert": [1, 2]}, "modules_to_not_convert"),
    ],
)
def test_bad_setting_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuEPTConfig\.{field}=") as caught:
        QuEPTConfig(**kwargs)
    assert repr(kwargs[field])[:20] in str(caught.value) or str(kwargs[field])[:20] in str(caught.value)


def test_exact_types_are_accepted_and_kept():
    config = QuEPTConfig(bits=[8, 4], lr_lora=1, top_p=0, seed=2**32 - 1, merge_weights=[1, 0])
    assert config.bits == [4, 8] and config.bit_groups == [[4], [8]]
    assert config.lr_lora == 1.0 and isinstance(config.lr_lora, float) and config.merge_weights == [1.0, 0.0]


def test_mutated_field_is_rechecked():
    config = QuEPTConfig()
    config.cascade = "no"
    with pytest.raises(ValueError, match=r"QuEPTConfig\.cascade='no'"):
        config.post_init()


def test_module_name_string_is_one_name():
    """Defect 6: ``"q_proj"`` was iterated into the names 'q', '_', 'p', ... so q_proj got quantized anyway."""
    assert QuEPTConfig(modules_to_not_convert="q_proj").modules_to_not_convert == ["q_proj"]
    assert QuEPTConfig.from_dict({"modules_to_not_convert": "q_proj"}).modules_to_not_convert == ["q_proj"]


def test_module_name_string_keeps_layer_in_float(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from quept_hf.nn import QuEPTLinear

    cfg = QuEPTConfig(modules_to_not_convert="q_proj")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    attention = model.model.layers[0].self_attn
    assert not isinstance(attention.q_proj, QuEPTLinear) and isinstance(attention.k_proj, QuEPTLinear)


# -------------------------------------------------------------------- config: property over JSON values

FIELDS = sorted(QuEPTConfig._fields() - set(RUNTIME_FIELDS))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
# Values of the right shape, so that many examples get through validation and test the round trip.
PLAUSIBLE = {
    "mode": st.sampled_from(["weight_only", "weight_activation"]),
    "bits": st.lists(st.integers(1, 9), min_size=1, max_size=4, unique=True),
    "bit_groups": st.lists(st.lists(st.integers(2, 8), min_size=1, max_size=2), min_size=1, max_size=3),
    "default_bits": st.integers(2, 8),
    "group_size": st.sampled_from([-1, 32, 128, 0]),
    "ranks": st.lists(st.integers(0, 8), min_size=1, max_size=4),
    "kv_bits": st.sampled_from([None, "follow", 4, 9]),
    "lr_lora": st.floats(-1, 2),
    "lr_clip": st.floats(-1, 2),
    "top_p": st.floats(-0.5, 1.5),
    "seed": st.integers(-5, 2**33),
    "cascade": st.booleans(),
    "calibrated": st.booleans(),
    "modules_to_not_convert": st.sampled_from(["q_proj", ["mlp.down_proj"], []]),
    "checkpoint_dir": st.sampled_from(["/tmp/ckpt", None]),
    "epochs": st.integers(-1, 3),
    "merge_weights": st.lists(st.floats(-1, 1), min_size=1, max_size=4),
    "format_version": st.just(1),
    "rotation": st.sampled_from([None, True, False]),
    "smoothing": st.sampled_from([None, True, False]),
    "loss": st.sampled_from(["l1", "mse"]),
    "token_merge": st.sampled_from(["mbtome", "none", "uniform", "separate"]),
    "lr_scaling": st.sampled_from([None, "none", "step"]),
    "cascade_training": st.sampled_from(["joint", "owned"]),
    "quantize_attention_probs": st.booleans(),
    "zero_point": st.sampled_from([None, "integer", "float", "round", {}, {"4": "float"}, {4: "float", 8: "integer"}]),
}


def _field_values(name: str) -> st.SearchStrategy:
    """Mostly values of the field's shape (three draws in four), else any JSON value."""
    plausible = PLAUSIBLE.get(name, JSON_VALUES)
    return st.one_of(plausible, plausible, plausible, JSON_VALUES)


CONFIG_DICTS = st.fixed_dictionaries({}, optional={name: _field_values(name) for name in FIELDS})


def _expected(name: str, given, config: QuEPTConfig):
    """What ``to_dict()[name]`` must be for a given value: itself, or its one documented normal form."""
    if name == "bits":
        return sorted(given)
    if name == "bit_groups":
        return [sorted(group) for group in given]
    if name == "modules_to_not_convert" and isinstance(given, str):
        return [given]
    if name == "group_size":
        sizes = dict.fromkeys(config.bits, given) if isinstance(given, int) else given
        return {str(int(b)): s for b, s in sizes.items()}
    if name == "zero_point":
        # A string applies to every width; a mapping names some, the others stay "integer".
        kinds = dict.fromkeys(config.bits, given) if isinstance(given, str) else {int(b): z for b, z in given.items()}
        return {str(b): kinds.get(b, "integer") for b in config.bits}
    return given


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIG_DICTS)
def test_from_dict_round_trips_or_names_a_field(config_dict):
    try:
        config = QuEPTConfig.from_dict(config_dict)
    except ValueError as exc:
        named = re.search(r"QuEPTConfig\.(\w+)", str(exc))
        assert named and named.group(1) in FIELDS, str(exc)
        return
    out = config.to_dict()
    text = config.to_json_string()
    again = QuEPTConfig.from_dict(json.loads(text))
    assert again.to_dict() == out and again.to_json_string() == text
    for name, given_value in config_dict.items():
        if given_value is not None:
            assert out[name] == _expected(name, given_value, config), name


# ------------------------------------------------------------------------ calibration checkpoints (defect 1)

SMALL = dict(ranks=[4] * 4, group_size=16, smoothing=False, num_samples=8, seq_len=16, batch_size=4, epochs=0)


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory) -> str:
    """The tiny LLaMA's architecture with other random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    folder = tmp_path_factory.mktemp("other_llama")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    return str(folder)


def _elastic(folder: str, **config):
    from transformers import AutoModelForCausalLM

    cfg = QuEPTConfig(**{**SMALL, **config})
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))


def test_checkpoint_of_another_model_is_refused(tiny_llama_dir, other_llama_dir, tmp_path):
    folder = str(tmp_path / "ckpt")
    calibrate(_elastic(tiny_llama_dir), _ids(), checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"checkpoint_dir '.*ckpt' holds the calibration of another model") as caught:
        calibrate(_elastic(other_llama_dir), _ids(), checkpoint_dir=folder)
    assert "float weights of blocks [0, 1]" in str(caught.value)
    calibrate(_elastic(tiny_llama_dir), _ids(), checkpoint_dir=folder)  # its own model still resumes


def test_checkpoint_of_another_architecture_names_it(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import TINY_LLAMA

    deeper = tmp_path / "deeper"
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3})).save_pretrained(deeper)
    folder = str(tmp_path / "ckpt")
    calibrate(_elastic(tiny_llama_dir), _ids(), checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"another model .*architecture: 'LlamaForCausalLM \(.*, 2 blocks\)'"):
        calibrate(_elastic(str(deeper)), _ids(), checkpoint_dir=folder)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_block_file_is_refused_on_resume(tiny_llama_dir, tmp_path, damage):
    folder = tmp_path / "ckpt"
    calibrate(_elastic(tiny_llama_dir), _ids(), checkpoint_dir=str(folder))
    block = folder / "block_0000.safetensors"
    data = bytearray(block.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10  # inside the last tensor's bytes: safetensors itself would load it
        block.write_bytes(bytes(data))
    elif damage == "truncate":
        block.write_bytes(bytes(data[: len(data) // 2]))
    else:
        block.unlink()
    with pytest.raises(ValueError, match=r"block file block_0000\.safetensors (is corrupted|is missing)"):
        calibrate(_elastic(tiny_llama_dir), _ids(), checkpoint_dir=str(folder))


# ------------------------------------------------------------------------------------- saving and loading

BITS_CHECKED = (2, 4, 8)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# A child that re-saves the folder it loads, changed, and is SIGKILLed by a hook at one point of the save.
KILL_CHILD = r"""
import os, signal, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
import quept_hf
from quept_hf import atomic, saving

folder, point, expected = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.no_grad():
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.base_layer.weight", "mbclora_B.default")):
            param.add_(0.05)
logits = {}
with torch.no_grad():
    for bits in (2, 4, 8):
        quept_hf.set_bits(model, bits)
        logits[f"w{bits}"] = model(input_ids=torch.arange(24).reshape(2, 12)).logits.contiguous()
save_file(logits, expected)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

writes = []
def die_on_second_shard(original):
    def write(*args, **kwargs):
        writes.append(args[1])
        if len(writes) == 2:
            die()
        return original(*args, **kwargs)
    return write

if point == "after_base":  # transformers wrote config.json + weights, the adapter is not written yet
    saving.write_adapter = die
elif point == "after_adapter":
    saving.save_sensitivity = die
elif point == "before_swap":
    atomic._swap_in = die
elif point == "mid_shards":
    import transformers.modeling_utils as mu
    mu.safe_save_file = die_on_second_shard(mu.safe_save_file)
model.save_pretrained(folder, max_shard_size="20KB")
"""


@torch.no_grad()
def _logits(model) -> dict[str, torch.Tensor]:
    import quept_hf

    out = {}
    for bits in BITS_CHECKED:
        quept_hf.set_bits(model, bits)
        out[f"w{bits}"] = model(input_ids=torch.arange(24).reshape(2, 12)).logits
    return out


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.fixture(scope="module")
def saved_template(tiny_llama_dir, tmp_path_factory):
    """A calibrated tiny elastic LLaMA saved to a folder (with a tokenizer next to it), and its logits."""
    from tests.conftest import make_tiny_tokenizer

    model = _elastic(tiny_llama_dir)
    calibrate(model, _ids())
    folder = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder, _logits(model)


@pytest.fixture
def saved(saved_template, tmp_path):
    """A fresh copy of the saved folder (tests damage it) and the logits it must load with."""
    import shutil

    template, logits = saved_template
    folder = tmp_path / "model"
    shutil.copytree(template, folder)
    return folder, logits


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    target = data.get("quantization_config", data)
    target.update(changes)
    path.write_text(json.dumps(data))


def test_saved_folder_loads_identically(saved):
    folder, logits = saved
    _assert_same(_logits(_load(folder)), logits)


def test_format_version_1_folder_loads_and_resaves_as_current(saved, tmp_path):
    """A folder of format version 1 (before this session: no manifest, no digests in the safetensors metadata) loads
    with the same outputs; saving it again writes the current version with both."""
    from safetensors.torch import load_file, save_file

    from quept_hf.config import FORMAT_VERSION
    from quept_hf.serialization import MANIFEST_NAME

    folder, logits = saved
    (folder / MANIFEST_NAME).unlink()
    for path in folder.glob("*.safetensors"):
        save_file(load_file(path), path, metadata={"format": "pt"})
    _edit_json(folder / "config.json", format_version=1)
    model = _load(folder)
    _assert_same(_logits(model), logits)
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["format_version"] == (
        FORMAT_VERSION
    )
    assert (tmp_path / "again" / MANIFEST_NAME).exists()
    _assert_same(_logits(_load(tmp_path / "again")), logits)


@pytest.mark.parametrize("point", ["after_base", "after_adapter", "before_swap", "mid_shards"])
def test_save_killed_leaves_the_old_model(saved, tmp_path, point):
    """Defect 3: a kill between transformers' base weights and our adapter left new base + old adapter."""
    import subprocess
    import sys

    folder, old_logits = saved
    before = sorted(p.name for p in folder.iterdir())
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(folder), point, str(tmp_path / "new.st")])
    assert child.returncode == -9  # killed by the hook, not finished
    assert sorted(p.name for p in folder.iterdir()) == before
    _assert_same(_logits(_load(folder)), old_logits)


def test_completed_resave_is_wholly_new_without_stale_weights(saved, tmp_path):
    """Defects 3 and 4: the re-save (now sharded) replaces everything; the old model.safetensors is gone."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    folder, old_logits = saved
    expected = tmp_path / "new.st"
    subprocess.run([sys.executable, "-c", KILL_CHILD, str(folder), "none", str(expected)], check=True)
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= names  # not the save's: carried over
    new_logits = _logits(_load(folder))
    _assert_same(new_logits, load_file(expected))
    assert not torch.equal(new_logits["w2"], old_logits["w2"])


@pytest.mark.parametrize("missing", ADAPTER_FILES)
def test_calibrated_folder_without_adapter_is_refused(saved, missing):
    """Defect 2: without adapter_config.json a calibrated folder loaded as round-to-nearest."""
    folder, _ = saved
    (folder / missing).unlink()
    with pytest.raises(ValueError, match=rf"lacks \[{missing!r}\].*lists MB-CLoRA adapters"):
        _load(folder)


@pytest.mark.parametrize(
    ("path", "changes", "field"),
    [
        ("config.json", {"rotation": True}, "rotation"),
        ("config.json", {"kv_bits": 4}, "kv_bits"),
        ("adapter_config.json", {"cascade": False}, "cascade"),
        ("adapter_config.json", {"default_bits": 4}, "default_bits"),
        ("adapter_config.json", {"bit_groups": [[2, 3], [4], [5, 6], [7, 8]]}, "bit_groups"),
    ],
)
def test_edited_metadata_is_refused(saved, path, changes, field):
    """Defect 7: an edited format field loaded silently with other outputs (a flipped rotation, other groups)."""
    folder, _ = saved
    _edit_json(folder / path, **changes)
    with pytest.raises(ValueError, match=rf"no longer describes the saved weights: field\(s\) \[{field!r}\]"):
        _load(folder)


def test_edited_descriptive_metadata_still_loads(saved):
    folder, logits = saved
    _edit_json(folder / "config.json", dataset_description="edited by hand")
    _assert_same(_logits(_load(folder)), logits)


def test_folder_without_config_json_is_refused(saved, tmp_path):
    """Defect 8: the base weights came from the first save's path (adapter_config.json), whatever sits there."""
    import shutil

    folder, _ = saved
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    (moved / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json is missing: the base would be loaded from .*model'"):
        _load(moved)


@pytest.mark.parametrize("name", ["model.safetensors", "adapter_model.safetensors"])
def test_flipped_byte_in_a_tensor_file_is_refused(saved, name, monkeypatch):
    """safetensors has no checksum: a flipped byte in the tensor data loaded silently (quept_manifest.json now)."""
    folder, _ = saved
    path = folder / name
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{name} does not match the sha256 quept_manifest\.json recorded"):
        _load(folder)
    monkeypatch.setenv("QUEPT_FILE_DIGESTS", "0")  # the opt-out for huge models: loads, unchecked
    _load(folder)


# ------------------------------------------------------------------------------------ 9. mixed plans


def test_plan_naming_unknown_modules_is_refused(tiny_llama_dir, tmp_path):
    """A stored plan naming modules the model does not have would switch nothing: refused when used and on load."""
    import json

    from transformers import AutoModelForCausalLM

    import quept_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quept_hf.QuEPTConfig()).eval()
    config = quept_hf.quept_config(model)
    config.plans["mixed-x"] = {"bits": {"model.layers.9.mlp.down_proj": 3}}
    with pytest.raises(ValueError, match=r"mixed plan 'mixed-x' names 1 module\(s\).*layers\.9"):
        quept_hf.set_bits(model, "mixed-x")
    assert quept_hf.get_bits(model) == 8  # nothing switched
    config.plans["mixed-x"] = {"bits": {"model.layers.0.mlp.down_proj": 3}}
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["plans"]["mixed-x"]["bits"] = {"model.layers.9.mlp.down_proj": 3}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="mixed plan 'mixed-x' names"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_token_ids_outside_the_vocabulary_are_refused(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    import quept_hf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quept_hf.QuEPTConfig()).eval()
    ids = torch.randint(0, 128, (4, 16))
    ids[0, 0], ids[1, 3] = 0, 128
    with pytest.raises(ValueError, match=r"token ids must lie in 0\.\.127.*found 0\.\.128"):
        quept_hf.calibrate(model, ids, epochs=0, num_samples=4, seq_len=16)

"""Publishing elastic models (issue 8), against the local Hub server with the REAL huggingface_hub/transformers
clients: push -> from_pretrained bit-identical at every bit-width, adapters-only push, history, metadata-only
reads, the model card and its plot, and the errors (uncalibrated push, missing tensors, newer format)."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard, create_repo
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf import QuEPTConfig, hub, saving
from quept_hf.config import FORMAT_VERSION
from quept_hf.inspection import quept_linears
from quept_hf.mixed_precision import Plan, add_plan

try:
    from tests.conftest import make_tiny_tokenizer
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest import make_tiny_tokenizer  # type: ignore[no-redef]

try:
    from tests.conftest_hub import local_hub
except ModuleNotFoundError:  # `tests/` itself on sys.path
    from conftest_hub import local_hub  # type: ignore[no-redef]  # noqa: F401

REPO = "me/tiny-quept"
BITS = [2, 3, 4, 5, 6, 7, 8]
PLAN = "mixed-3.5"
PLAN_AVG = (12288 * 4 + 30720 * 3) / 43008  # attention at 4 bits, MLP at 3, weighted by weights per block
ADAPTERS = [*(f"w{b}" for b in BITS), PLAN]
WEIGHT_FILES = {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"}


pytestmark = pytest.mark.usefixtures("one_thread")


def load_quept(folder: str) -> torch.nn.Module:
    config = QuEPTConfig(ranks=[4] * 4, group_size=16, smoothing=False)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config).eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits_per_adapter(model, adapters=ADAPTERS) -> dict[str, torch.Tensor]:
    out = {}
    for name in adapters:
        model.set_adapter(name)
        out[name] = model(input_ids=input_ids()).logits
    return out


def assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir):
    """A calibrated tiny elastic LLaMA with a mixed plan and recorded quality, and its logits per adapter."""
    torch.set_num_threads(1)
    model = load_quept(tiny_llama_dir)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    quept_hf.calibrate(model, ids, epochs=1, num_samples=4, seq_len=16)
    widths = {name: 3 if ".mlp." in name else 4 for name in quept_linears(model)}
    add_plan(model, Plan(PLAN, 3.5, 3.5, True, {}, widths, 0.0))
    hub.record_evaluation(model, {**{b: 60.0 / b for b in BITS}, PLAN: 16.0, 16: 6.0}, dataset="random ids")
    return model.eval(), logits_per_adapter(model)


def fresh(calibrated) -> torch.nn.Module:
    """A private copy of the calibrated model (tests may change its metadata)."""
    return copy.deepcopy(calibrated[0])


# ------------------------------------------------------------------------------------------ push and load


def test_push_then_from_pretrained_is_bit_identical_with_card_and_metadata(calibrated, local_hub):
    model, expected = fresh(calibrated), calibrated[1]
    model.push_to_hub(REPO)
    files = local_hub.files(REPO)
    assert WEIGHT_FILES | {"README.md", hub.PLOT_NAME} <= set(files)
    assert files[hub.PLOT_NAME].startswith(b"\x89PNG")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == REPO

    quantization = json.loads(files["config.json"])["quantization_config"]
    assert quantization["quept_version"] == quept_hf.__version__ and quantization["calibrated"]
    adapters = quantization["adapters"]
    assert sorted(adapters) == sorted(ADAPTERS) and list(hub.list_bit_widths(REPO)["adapters"]) == ADAPTERS
    assert [adapters[f"w{b}"]["rank"] for b in BITS] == [16, 12, 12, 8, 8, 4, 4]  # cascade: 4 per group
    sizes = [adapters[f"w{b}"]["size_bytes"] for b in BITS]
    assert sizes == sorted(sizes) and adapters[f"w{BITS[0]}"]["activation_bits"] is None
    assert adapters[PLAN]["plan"] and adapters[PLAN]["weight_bits"] == [3, 4]
    assert adapters[PLAN]["avg_bits"] == round(PLAN_AVG, 4)
    assert quantization["evaluation"]["perplexity"]["results"]["w2"] == 30.0

    card = ModelCard.load(REPO)
    assert local_hub.validated_cards[-1] == files["README.md"].decode()
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"quept", "quantization", "elastic-precision", "mixed-precision"} <= set(card.data.tags)
    assert card.data.quept == hub.list_bit_widths(REPO) == hub.switch_metadata(QuEPTConfig.from_dict(quantization))
    assert "import quept_hf" in card.text and f'from_pretrained("{REPO}")' in card.text
    assert 'model.set_adapter("w3")' in card.text and f"![quality vs bits]({hub.PLOT_NAME})" in card.text
    assert "| `w2` | 2 | float | 30 |" in card.text and f"| `{PLAN}` | {PLAN_AVG:.3g} avg (3/4) |" in card.text
    assert "Calibration data: token ids (8, 32)" in card.text

    restored = AutoModelForCausalLM.from_pretrained(REPO).eval()
    assert_identical(logits_per_adapter(restored), expected)


def test_push_twice_keeps_both_revisions(calibrated, local_hub):
    """The second push (sharded this time) is a new commit that replaces the weights; the first still loads."""
    model, expected = fresh(calibrated), calibrated[1]
    first = model.push_to_hub(REPO)
    hub.record_evaluation(model, {3: 19.5})
    second = model.push_to_hub(REPO, commit_message="new numbers", max_shard_size="150KB")
    commits = local_hub.commits(REPO)
    assert len(commits) == 3 and [c.oid for c in commits[1:]] == [first.oid, second.oid] and first.oid != second.oid
    assert commits[-1].title == "new numbers"
    files = local_hub.files(REPO)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files  # no stale single file
    assert "model.safetensors" in local_hub.files(REPO, first.oid)
    assert hub.list_bit_widths(REPO)["evaluation"]["perplexity"]["results"]["w3"] == 19.5
    assert hub.list_bit_widths(REPO, revision=first.oid)["evaluation"]["perplexity"]["results"]["w3"] == 20.0
    assert "| `w3` | 3 | float | 19.5 |" in ModelCard.load(REPO).text  # the card follows, not the old one
    some = ["w2", "w5", PLAN]
    for revision in (first.oid, None):
        loaded = AutoModelForCausalLM.from_pretrained(REPO, revision=revision).eval()
        assert_identical(logits_per_adapter(loaded, some), {k: expected[k] for k in some})


def test_hand_written_card_is_kept_and_list_bit_widths_reads_config_json_only(calibrated, local_hub, tmp_path):
    create_repo(REPO)
    ModelCard("---\nlicense: mit\ntags:\n- mine\n---\n# Our notes\n").push_to_hub(REPO)
    fresh(calibrated).push_to_hub(REPO)
    card = ModelCard.load(REPO)
    assert card.text.strip() == "# Our notes" and card.data.license == "mit"  # text kept, metadata added
    assert "mine" in card.data.tags and "quept" in card.data.tags and card.data.quept["calibrated"]

    before = len(local_hub.requests)
    info = hub.list_bit_widths(REPO)
    paths = [path for _, path, _ in local_hub.requests[before:]]
    assert paths and all(path.endswith("/config.json") for path in paths), paths
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))
    assert info["bits"] == BITS and info["default_adapter"] == "w8" and info["plans"] == {PLAN: round(PLAN_AVG, 4)}
    assert info["adapters"]["w4"]["weight_bits"] == 4 and info["calibrated"] and info["rotation"] is False


def test_adapters_only_push_loads_with_peft(calibrated, local_hub, tmp_path):
    """``PeftModel.push_to_hub`` uploads the adapter alone (PEFT's format); PeftModel.from_pretrained restores it
    on the elastic base (float weights + calibrated clipping) at every bit-width."""
    model, expected = fresh(calibrated), calibrated[1]
    model.save_pretrained(tmp_path / "full")
    base_dir = tmp_path / "base"
    shutil.copytree(tmp_path / "full", base_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (base_dir / name).unlink()
    # A base without its adapter must say so: a folder whose metadata lists adapter ranks but lacks them is refused.
    saved = json.loads((base_dir / "config.json").read_text())
    for entry in saved["quantization_config"]["adapters"].values():
        entry["rank"] = None
    (base_dir / "config.json").write_text(json.dumps(saved))
    wrapped = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "full"))
    wrapped.push_to_hub("me/tiny-adapters")
    files = set(local_hub.files("me/tiny-adapters"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    info = hub.list_bit_widths("me/tiny-adapters")
    assert info["adapter_only"] and info["bits"] == BITS and PLAN in info["plans"]

    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), "me/tiny-adapters").eval()
    assert_identical(logits_per_adapter(again), expected)


# ------------------------------------------------------------------------------------------------- errors


def test_uncalibrated_push_is_refused_unless_allowed(tiny_llama_dir, local_hub, tmp_path, monkeypatch):
    model = load_quept(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"Refusing to push an uncalibrated QuEPT model to 'me/raw'.*calibrate"):
        model.push_to_hub("me/raw")
    with pytest.raises(ValueError, match="uncalibrated"):
        model.save_pretrained(tmp_path / "raw", push_to_hub=True, repo_id="me/raw")
    assert local_hub.repo_ids() == []  # refused before the repo was created

    model.push_to_hub("me/raw", allow_uncalibrated=True)
    card = ModelCard.load("me/raw")
    assert "published without calibration" in card.text and "quept_hf.set_bits(model, 3)" in card.text
    assert not card.data.quept["calibrated"] and hub.PLOT_NAME not in local_hub.files("me/raw")
    monkeypatch.setenv(saving.ALLOW_UNCALIBRATED_ENV, "1")
    model.push_to_hub("me/raw-env")
    assert "config.json" in local_hub.files("me/raw-env")


@pytest.mark.parametrize(("tensor", "bits"), [("mbclora_B.3", [2]), ("mbclora_A.0", BITS)])
def test_missing_adapter_tensors_are_named(calibrated, tiny_llama_dir, tmp_path, tensor, bits):
    """Slice 3 (the lowest group, cascade order) serves 2 bits only; slice 0 (the highest group) serves all."""
    fresh(calibrated).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    missing = f"base_model.model.model.layers.1.mlp.up_proj.{tensor}"
    del tensors[missing]
    save_file(tensors, path, metadata={"format": "pt"})
    message = re.escape(f"lacks tensors of bit-width(s) {bits}: {missing}.")
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(load_quept(tiny_llama_dir), str(tmp_path))


def test_newer_format_version_fails_with_both_versions(calibrated, tmp_path):
    fresh(calibrated).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(format_version=FORMAT_VERSION + 1, a_field_from_the_future=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = (
        f"QuEPT format version {FORMAT_VERSION + 1}, but the installed quept_hf reads up to version {FORMAT_VERSION}"
    )
    with pytest.raises(ValueError, match=message):
        hub.list_bit_widths(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_forgetting_the_import_fails_loudly(calibrated, tmp_path, monkeypatch):
    """What a session without ``import quept_hf`` sees (transformers and PEFT don't know the names): an elastic
    checkpoint does not load silently as a float model, PEFT stops on the adapter type (documented in the card)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    fresh(calibrated).save_pretrained(tmp_path)
    for mapping, key in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, "quept"),
        (AUTO_QUANTIZER_MAPPING, "quept"),
        (PEFT_TYPE_TO_CONFIG_MAPPING, "MBCLORA"),
    ):
        monkeypatch.delitem(mapping, key)
    with pytest.raises(KeyError, match="MBCLORA"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_record_evaluation_checks_names_and_values(calibrated):
    model = fresh(calibrated)
    text = ["The quick brown fox jumps over the lazy dog. " * 4]
    before = quept_hf.get_bits(model)
    entry = hub.measure_perplexity(model, text, make_tiny_tokenizer(), ["w2", "w8", "float"], seq_len=16)
    assert {"w2", "w8", "float", PLAN} <= set(entry["results"]) and entry["lower_is_better"]
    assert entry["results"]["w2"] != entry["results"]["w8"] and quept_hf.get_bits(model) == before  # restored
    with pytest.raises(ValueError, match=r"no bit-width or plan named 'w9'.*'w2'.*'mixed-3.5', 'float'"):
        hub.record_evaluation(model, {"w9": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        hub.record_evaluation(model, {3: float("nan")})
    entry = hub.record_evaluation(model, {"float": 5.0, 4: 7}, metric_name="accuracy")
    assert entry == {"results": {"float": 5.0, "w4": 7.0}, "dataset": None, "lower_is_better": False}

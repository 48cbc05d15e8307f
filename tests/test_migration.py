"""Checkpoints written by earlier quept_hf versions keep loading, to the same logits.

``tests/fixtures/format-<N>/`` holds folders written by the quept_hf that introduced format version N
(`tests/fixtures/make_fixtures.py`, run once and committed): an elastic tiny LLaMA with its MB-CLoRA adapter and
a mixed plan, the same model frozen, and the logits each gave when saved. A change to `QuEPTConfig`, the
quantizer or the file layout that cannot read them fails here, before a user's checkpoint does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quept_hf
from quept_hf.config import FORMAT_VERSION

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = sorted(p for p in FIXTURES.glob("format-*") if p.is_dir())
INPUT_IDS = torch.arange(3, 27).reshape(2, 12)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_current_format_has_a_fixture():
    assert FIXTURES / f"format-{FORMAT_VERSION}" in FORMATS, (
        f"format version {FORMAT_VERSION} has no committed fixture: run tests/fixtures/make_fixtures.py "
        f"tests/fixtures/format-{FORMAT_VERSION} once and commit it"
    )


@pytest.mark.parametrize("folder", FORMATS, ids=[p.name for p in FORMATS])
@pytest.mark.parametrize("kind", ["elastic", "frozen"])
def test_old_checkpoint_loads_to_its_saved_logits(folder, kind):
    expected = {k.split(".", 1)[1]: v for k, v in load_file(folder / "expected_logits.safetensors").items()
                if k.startswith(kind + ".")}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder / kind).eval()
    assert set(expected) >= {"w2", "w8"}
    for name, logits in expected.items():
        model.set_adapter(name)
        with torch.no_grad():
            got = model(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5, msg=f"{folder.name}/{kind} at {name}")


@pytest.mark.parametrize("folder", FORMATS, ids=[p.name for p in FORMATS])
def test_old_elastic_checkpoint_resaves_as_current(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder / "elastic").eval()
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert quept_hf.quept_config(again).format_version == FORMAT_VERSION
    for bits in (2, 8):
        quept_hf.set_bits(model, bits)
        quept_hf.set_bits(again, bits)
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=INPUT_IDS).logits, model(input_ids=INPUT_IDS).logits)

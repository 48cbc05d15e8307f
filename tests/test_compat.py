"""quept_hf.compat: the version check that guards its private-state accesses, and the accesses themselves."""

from __future__ import annotations

import logging

import pytest
from peft.utils import PeftType

from quept_hf import compat


def test_installed_versions_are_the_tested_ones():
    assert compat.untested_versions() == {}, "pyproject.toml's pins and compat.TESTED disagree with the venv"


def test_an_untested_version_is_named_in_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(compat.TESTED, "peft", ("0.30.0", "0.31.0"))
    assert set(compat.untested_versions()) == {"peft"}
    with caplog.at_level(logging.WARNING, logger="quept_hf.compat"):
        compat.warn_untested_versions()
    assert "peft>=0.30.0,<0.31.0" in caplog.text and "quept_hf.compat" in caplog.text


@pytest.mark.parametrize(
    ("text", "parsed"), [("5.23.0", (5, 23, 0)), ("0.21.2.dev0", (0, 21, 2)), ("2.13.0+cpu", (2, 13, 0))]
)
def test_versions_compare_numerically(text, parsed):
    assert compat._parse(text) == parsed
    assert compat._parse("5.9.0") < compat._parse("5.23.0")


def test_registered_peft_type_reads_back_by_value():
    member = compat.register_peft_type("MBCLORA")
    assert PeftType("MBCLORA") is member is PeftType.MBCLORA
    assert compat.register_peft_type("MBCLORA") is member  # idempotent

"""Every built-in check carries its manual: the module docstring names each option, and the
operator page under docs/checks/ exists and mentions each option too."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from mxward.shared.cli import builtin_checks
from mxward.shared.plugin import Check

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checks"
CHECKS = sorted(builtin_checks().items())


@pytest.mark.parametrize(("name", "cls"), CHECKS, ids=[n for n, _ in CHECKS])
def test_module_docstring_documents_every_option(name: str, cls: type[Check[Any]]) -> None:
    """Each Options field appears in the check module's docstring, with the stage and failure."""
    doc = inspect.getmodule(cls).__doc__ or ""  # type: ignore[union-attr]
    assert doc.startswith(f"{name}:"), "the manual starts with the check's name"
    for section in ("Stage:", "Options", "Facts", "Failure behaviour", "Redis keys"):
        assert section in doc, f"missing section {section!r}"
    for field in dataclasses.fields(cls.options_type):
        assert f"\n    {field.name} " in doc, f"option {field.name} is not documented"


@pytest.mark.parametrize(("name", "cls"), CHECKS, ids=[n for n, _ in CHECKS])
def test_operator_page_mentions_every_option(name: str, cls: type[Check[Any]]) -> None:
    """docs/checks/<name>.md exists and names every option."""
    page = (DOCS / f"{name}.md").read_text()
    for field in dataclasses.fields(cls.options_type):
        assert f"`{field.name}`" in page, f"docs/checks/{name}.md does not mention {field.name}"


@pytest.mark.parametrize(("name", "cls"), CHECKS, ids=[n for n, _ in CHECKS])
def test_check_name_matches_module(name: str, cls: type[Check[Any]]) -> None:
    """name = module name = config table = log key = Redis namespace."""
    assert cls.__module__.rsplit(".", 1)[1] == name

"""Packaging guards: the three source folders install as mxward.* and nothing else."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"policyd": "mxward.policyd", "contentfilter": "mxward.contentfilter", "shared": "mxward.shared"}


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> set[str]:
    found = set()
    for folder, dotted in ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([dotted, *rel.parts]) if rel.parts else dotted)
    return found


def test_every_package_dir_is_listed() -> None:
    """Each folder with an __init__.py is in pyproject's packages list, and nothing else is."""
    setuptools = _pyproject()["tool"]["setuptools"]  # type: ignore[index]
    assert set(setuptools["packages"]) == _package_dirs()  # type: ignore[index]
    assert setuptools["package-dir"] == {v: k for k, v in ROOTS.items()}  # type: ignore[index]


def test_every_package_has_py_typed() -> None:
    """The three roots ship py.typed so users' type checkers read our annotations."""
    for folder in ROOTS:
        assert (ROOT / folder / "py.typed").is_file()


@pytest.mark.parametrize(
    "path", sorted(p for f in ROOTS for p in (ROOT / f).rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_source_file_is_visible_to_the_install(path: Path) -> None:
    """Each module is importable as mxward.* (a new module needs `pip install -e .` again)."""
    folder = path.relative_to(ROOT).parts[0]
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    name = ".".join([ROOTS[folder], *parts])
    assert importlib.util.find_spec(name) is not None, (
        f"{name} not installed (re-run `pip install -e . --config-settings editable_mode=strict`)"
    )


def test_no_bare_top_level_names_are_imported() -> None:
    """Nothing imported the folders under their bare names (a second copy of every class)."""
    bare = sorted(m for m in sys.modules if m.split(".")[0] in ROOTS)
    assert bare == []


def test_console_script_is_declared() -> None:
    """`mxward` is the one console script."""
    assert _pyproject()["project"]["scripts"] == {"mxward": "mxward.shared.cli:main"}  # type: ignore[index]

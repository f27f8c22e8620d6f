"""Packaging guards: the three source folders install as mxward.* and nothing else."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
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


def _compiled() -> list[str]:
    """setup.py's COMPILED: the request-path modules mypyc compiles, as paths like shared/x.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py defines no COMPILED")


def _module_name(path: str) -> str:
    folder, rest = path.split("/", 1)
    return ".".join([ROOTS[folder], *Path(rest).with_suffix("").parts])


def _file_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec the file system gives now (a compiled module's own __spec__ can name a wrong file)."""
    package, _, last = name.rpartition(".")
    return importlib.machinery.PathFinder.find_spec(last, importlib.import_module(package).__path__)


@pytest.mark.parametrize("path", _compiled())
def test_compiled_module_can_be_compiled(path: str) -> None:
    """Each listed module exists and defines no async generator (which mypyc cannot compile)."""
    source = ROOT / path
    assert source.is_file(), f"setup.py's COMPILED names {path}, which does not exist"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.AsyncFunctionDef):
            inner = [n for n in ast.walk(node) if isinstance(n, ast.Yield | ast.YieldFrom)]
            assert not inner, f"{path}: async generator {node.name}() cannot be compiled"


@pytest.mark.parametrize("path", _compiled())
def test_compiled_module_is_current(path: str) -> None:
    """An installed C extension is at least as new as its source: an edit needs a reinstall.

    With MXWARD_COMPILE=1 (the test command sets it) each listed module must be compiled.
    """
    name = _module_name(path)
    spec = _file_spec(name)
    assert spec is not None and spec.origin is not None
    installed = Path(spec.origin)
    compiled = installed.suffix == ".so"
    if os.environ.get("MXWARD_COMPILE") == "1":
        assert compiled, f"{name} is not compiled ({installed})"
    if compiled:
        assert installed.stat().st_mtime >= (ROOT / path).stat().st_mtime, (
            f"{installed.name} is older than {path}: re-run the install (tests/run.sh does)"
        )

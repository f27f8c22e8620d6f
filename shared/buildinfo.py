"""Which build of mxward is running: the request path compiled by mypyc, or pure Python.

setup.py compiles the modules of the request path into C extensions when it can (see its
docstring and MXWARD_COMPILE); the same source runs either way. ``mxward --version`` and the
daemons' start line name the build, so a slower host can be told apart from a pure-Python one.
"""

from __future__ import annotations

import importlib
from importlib.machinery import EXTENSION_SUFFIXES, PathFinder

__all__ = ["build"]


def build() -> str:
    """``"compiled"`` when the request path runs as C extensions, else ``"pure Python"``."""
    # One of setup.py's COMPILED modules, looked up in the file system: the __file__ and
    # __spec__ that a compiled module sets for itself can name a wrong folder.
    spec = PathFinder.find_spec("pipeline", importlib.import_module("mxward.shared").__path__)
    origin = spec.origin if spec is not None and spec.origin else ""
    return "compiled" if origin.endswith(tuple(EXTENSION_SUFFIXES)) else "pure Python"

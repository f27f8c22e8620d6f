"""Build hook: compile the request path of mxward with mypyc (the rest lives in pyproject.toml).

mypyc, which ships with mypy, turns type-annotated Python modules into C extensions. The modules
in COMPILED carry every policy request (protocol parser, connection loop, the service and the
check pipeline, the decision line, budgets, RESP encoding and the helpers they call); compiled,
a policy request costs about a sixth less CPU (docs/benchmarks.md). The source stays the same
Python, and an installation without a C compiler runs it as it is.

MXWARD_COMPILE chooses:
    auto (default)  compile when mypyc and a C compiler are available, else install pure Python
    1               compile, and fail the installation when that is not possible
    0               pure Python only (what a debugger or a profiler of the Python frames needs)

``mxward --version`` says which build is installed.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent
# The package folders, installed as mxward.<folder> ([tool.setuptools] package-dir).
FOLDERS = ("policyd", "shared", "contentfilter")
# The request path. A module here may not define async generators (mypyc cannot compile them
# yet) and may only be subclassed by other compiled code; tests/test_packaging.py checks the list.
COMPILED = (
    "policyd/protocol.py",
    "policyd/greylist_triplet.py",
    "policyd/server.py",
    "policyd/service.py",
    "shared/aio.py",
    "shared/clock.py",
    "shared/logs.py",
    "shared/matchers.py",
    "shared/netutil.py",
    "shared/pipeline.py",
    "shared/records.py",
    "shared/redislink.py",
    "shared/resp.py",
    "shared/timeouts.py",
    "shared/units.py",
)


def _choice() -> str:
    value = os.environ.get("MXWARD_COMPILE", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"MXWARD_COMPILE={value!r}: use auto, 1 (compile or fail) or 0 (pure Python)")
    return value


def _compiler_missing() -> str:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"no Python headers ({include}/Python.h; Debian: python3-dev)"
    return ""


def _stage(stage: Path) -> None:
    """Copy the package folders under their installed names, which mypyc compiles them as."""
    if stage.exists():
        shutil.rmtree(stage)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")  # not the extensions of a build before
    for folder in FOLDERS:
        shutil.copytree(HERE / folder, stage / "mxward" / folder, ignore=ignore)
    (stage / "mxward" / "__init__.py").write_text("")  # for mypy's module names only


def _extensions() -> list[Any]:
    choice = _choice()
    if choice == "0":
        return []
    missing = _compiler_missing()
    try:
        from mypyc.build import mypycify
    except ImportError:
        missing = missing or "mypyc is not installed (it ships with mypy)"
    if missing:
        if choice == "1":
            sys.exit(f"MXWARD_COMPILE=1 but cannot compile: {missing}")
        print(f"mxward: installing pure Python: {missing}", file=sys.stderr)
        return []
    stage = HERE / "build" / "mypyc"
    _stage(stage)
    cwd = os.getcwd()
    os.chdir(stage)  # mypyc names modules and writes its C files relative to the current folder
    try:
        paths = [f"mxward/{name}" for name in COMPILED]  # as _stage laid them out
        # Third-party imports are not installed in an isolated build; they compile as Any.
        options = ["--ignore-missing-imports", "--config-file", os.devnull]
        extensions = mypycify(options + paths, group_name="mxward.shared.native", opt_level="3")
    finally:
        os.chdir(cwd)
    for ext in extensions:
        ext.sources = [str(stage / source) for source in ext.sources]
        ext.include_dirs = [d if os.path.isabs(d) else str(stage / d) for d in ext.include_dirs]
    return extensions


setup(ext_modules=_extensions())

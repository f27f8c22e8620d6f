"""Built-in envelope-stage checks, listed explicitly (no import-time discovery).

A check named in ``[policyd] checks`` is looked up here first, then among the packages that
register under the ``mxward.checks`` entry-point group.
"""

from __future__ import annotations

from typing import Any

from mxward.policyd.checks.greylist import GreylistCheck
from mxward.shared.plugin import Check

__all__ = ["CHECKS", "builtin_checks"]

CHECKS: tuple[type[Check[Any]], ...] = (GreylistCheck,)


def builtin_checks() -> dict[str, type[Check[Any]]]:
    """Name → class of every built-in envelope check."""
    return {cls.name: cls for cls in CHECKS}

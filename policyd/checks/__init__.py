"""Built-in envelope-stage checks, listed explicitly (no import-time discovery).

A check named in ``[policyd] checks`` is looked up here first, then among the packages that
register under the ``mxward.checks`` entry-point group.
"""

from __future__ import annotations

from typing import Any

from mxward.policyd.checks.greylist import GreylistCheck
from mxward.policyd.checks.karma import KarmaCheck
from mxward.shared.plugin import Check

__all__ = ["CHECKS"]

CHECKS: tuple[type[Check[Any]], ...] = (
    KarmaCheck,
    GreylistCheck,
)

"""Built-in DATA-stage checks, listed explicitly (no import-time discovery)."""

from __future__ import annotations

from typing import Any

from mxward.contentfilter.checks.headers import HeadersCheck
from mxward.shared.plugin import Check

__all__ = ["CHECKS"]

CHECKS: tuple[type[Check[Any]], ...] = (HeadersCheck,)

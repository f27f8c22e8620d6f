"""Built-in DATA-stage checks, listed explicitly (no import-time discovery)."""

from __future__ import annotations

from typing import Any

from mxward.contentfilter.checks.arc import ArcCheck
from mxward.contentfilter.checks.dkim import DkimCheck
from mxward.contentfilter.checks.dmarc import DmarcCheck
from mxward.contentfilter.checks.domainkeys import DomainkeysCheck
from mxward.contentfilter.checks.headers import HeadersCheck
from mxward.shared.plugin import Check

__all__ = ["CHECKS"]

CHECKS: tuple[type[Check[Any]], ...] = (HeadersCheck, DkimCheck, DmarcCheck, ArcCheck, DomainkeysCheck)

"""Built-in envelope-stage checks, listed explicitly (no import-time discovery).

A check named in ``[policyd] checks`` is looked up here first, then among the packages that
register under the ``mxward.checks`` entry-point group.
"""

from __future__ import annotations

from typing import Any

from mxward.policyd.checks.badmailfrom import BadmailfromCheck
from mxward.policyd.checks.dnsbl import DnsblCheck
from mxward.policyd.checks.dnswl import DnswlCheck
from mxward.policyd.checks.earlytalker import EarlytalkerCheck
from mxward.policyd.checks.fcrdns import FcrdnsCheck
from mxward.policyd.checks.geoip import GeoipCheck
from mxward.policyd.checks.greylist import GreylistCheck
from mxward.policyd.checks.helo import HeloCheck
from mxward.policyd.checks.karma import KarmaCheck
from mxward.policyd.checks.p0f import P0fCheck
from mxward.policyd.checks.rhsbl import RhsblCheck
from mxward.policyd.checks.spf import SpfCheck
from mxward.shared.plugin import Check

__all__ = ["CHECKS"]

CHECKS: tuple[type[Check[Any]], ...] = (
    KarmaCheck,
    GreylistCheck,
    SpfCheck,
    EarlytalkerCheck,
    HeloCheck,
    FcrdnsCheck,
    DnswlCheck,
    DnsblCheck,
    RhsblCheck,
    BadmailfromCheck,
    GeoipCheck,
    P0fCheck,
)

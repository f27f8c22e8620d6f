"""DNS fixtures: the test DNS server on loopback serving ``tests/data/dns/test.zone``.

Tests that need more data call ``dns_server.add_zone(Path(...))`` or pass zone text; see
:mod:`support.dnsserver` for the zone format and the fault controls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support.dnsserver import DnsServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["DNS_DATA", "TEST_ZONE", "dns_server"]

DNS_DATA = Path(__file__).resolve().parent.parent / "data" / "dns"
TEST_ZONE = DNS_DATA / "test.zone"


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """A DnsServer on 127.0.0.1 (UDP and TCP, one free port) serving test.zone, in the test's loop."""
    async with DnsServer([TEST_ZONE]) as server:
        yield server

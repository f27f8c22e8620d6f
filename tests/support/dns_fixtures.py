"""DNS fixtures: the test DNS server on loopback serving ``tests/data/dns/test.zone``, and
``spf_dns``: the SPF test zones served from a thread, for daemon subprocesses (end-to-end tests).

Tests that need more data call ``dns_server.add_zone(Path(...))`` or pass zone text; see
:mod:`support.dnsserver` for the zone format and the fault controls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support.dnsserver import DnsServer, ThreadedDnsServer

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

__all__ = ["DNS_DATA", "TEST_ZONE", "dns_server", "spf_dns"]

DNS_DATA = Path(__file__).resolve().parent.parent / "data" / "dns"
TEST_ZONE = DNS_DATA / "test.zone"


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """A DnsServer on 127.0.0.1 (UDP and TCP, one free port) serving test.zone, in the test's loop."""
    async with DnsServer([TEST_ZONE]) as server:
        yield server


@pytest.fixture
def spf_dns() -> Iterator[ThreadedDnsServer]:
    """The SPF test zones (spf.zone), served from a thread so a daemon subprocess can ask them."""
    with ThreadedDnsServer([DNS_DATA / "spf.zone"]) as server:
        yield server

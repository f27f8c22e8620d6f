"""dnswl: allow list lookups (list.dnswl.org's encoding) against a real rbldnsd."""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import pytest
from support.dnsserver import DnsServer

from mxward.policyd.checks.dnsbl import DnsblCheck
from mxward.policyd.checks.dnsbl import Options as DnsblOptions
from mxward.policyd.checks.dnsbl import Zone as DnsblZone
from mxward.policyd.checks.dnswl import DnswlCheck, Options, Zone
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import Check, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

WL = "wl.dnsbl.test"

# list.dnswl.org's trust levels, one entry each
LEVELS = (
    Zone(zone=WL, name="wl-hi", codes=("127.0.*.3",), score=-5.0),
    Zone(zone=WL, name="wl-med", codes=("127.0.*.2",), score=-3.0),
    Zone(zone=WL, name="wl-low", codes=("127.0.*.1",), score=-1.0),
    Zone(zone=WL, name="wl-none", codes=("127.0.*.0",), score=0.0),
)


def services(server: DnsServer) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=(server.nameserver,), timeout=0.5, lifetime=1.0)),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(),
    )


def tx(client: str) -> Transaction:
    return Transaction(stage=Stage.CONNECT, client_address=client, client_ip=parse_ip(client))


async def run(server: DnsServer, client: str, *zones: Zone, **kw: Any) -> Result:
    kw.setdefault("health_check", False)
    check = DnswlCheck(Options(zones=zones or LEVELS, **kw), services(server))
    return await check.check(Stage.CONNECT, tx(client))


class Case(NamedTuple):
    client: str
    zones: tuple[Zone, ...]
    verdict: Verdict
    score: float
    listed: str
    level: int
    trusted: bool


CASES = {
    "trust high": Case("127.0.3.20", LEVELS, Verdict.PASS, -5.0, "wl-hi", 3, True),
    "trust low": Case("127.0.3.21", LEVELS, Verdict.PASS, -1.0, "wl-low", 1, False),
    "trust none": Case("127.0.3.2", LEVELS, Verdict.PASS, 0.0, "wl-none", 0, False),
    "not listed": Case("127.0.3.9", LEVELS, Verdict.SKIP, 0.0, "", -1, False),
    "over the limit": Case("127.0.3.22", LEVELS, Verdict.ERROR, 0.0, "", -1, False),
    "IPv6 trust high": Case("::3:20", LEVELS, Verdict.PASS, -5.0, "wl-hi", 3, True),
    "level from the answer": Case("127.0.3.20", (Zone(zone=WL),), Verdict.PASS, -5.0, WL, 3, True),
    "fixed level": Case("127.0.3.21", (Zone(zone=WL, level=2, score=-2),), Verdict.PASS, -2.0, WL, 2, True),
    "IPv6 not asked": Case("::3:20", (Zone(zone=WL, ipv6=False),), Verdict.SKIP, 0.0, "", -1, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_verdicts(dns_lists: DnsServer, case: Case) -> None:
    """Each trust level gives its score and facts; a refusal code is an error, not a listing."""
    r = await run(dns_lists, case.client, *case.zones)
    assert (r.verdict, r.score) == (case.verdict, case.score), r
    assert r.facts == {"dnswl.listed": case.listed, "dnswl.level": case.level, "dnswl.trusted": case.trusted}
    assert r.action is None and r.reason == ""


async def test_the_log_shows_codes_and_level(dns_lists: DnsServer) -> None:
    """listed=<name>:<code> and level=<n>; an over-limit answer is logged as an error."""
    hit = await run(dns_lists, "127.0.3.20")
    assert dict(hit.log) == {"listed": "wl-hi:127.0.10.3", "level": 3}
    refused = await run(dns_lists, "127.0.3.22")
    assert dict(refused.log) == {"errors": f"{WL}:refused:127.0.0.255"}


async def test_trusted_level_sets_the_bar(dns_lists: DnsServer) -> None:
    """trusted_level = 1 trusts a low-trust listing too."""
    r = await run(dns_lists, "127.0.3.21", trusted_level=1)
    assert r.facts["dnswl.trusted"] is True


async def test_a_failing_zone_is_an_error_and_trusts_nobody(dns_lists: DnsServer) -> None:
    """SERVFAIL: ERROR, score 0, not trusted."""
    dns_lists.servfail(f"20.3.0.127.{WL}")
    r = await run(dns_lists, "127.0.3.20")
    assert (r.verdict, r.score, r.facts["dnswl.trusted"]) == (Verdict.ERROR, 0.0, False)
    assert r.log["errors"] == f"{WL}:servfail"


async def test_no_zones_skips(dns_lists: DnsServer) -> None:
    """Without zones nothing is asked."""
    check = DnswlCheck(Options(), services(dns_lists))
    r = await check.check(Stage.CONNECT, tx("127.0.3.20"))
    assert (r.verdict, dict(r.log)) == (Verdict.SKIP, {"note": "no zones"})
    assert not dns_lists.queries


async def test_the_allow_list_passes_its_health_probe(dns_lists: DnsServer) -> None:
    """wl.dnsbl.test lists 127.0.0.2 and not 127.0.0.1."""
    check = DnswlCheck(Options(zones=LEVELS), services(dns_lists))
    await check.health.probe_all()
    assert check.health.state(WL, "ipv4") == "ok"
    assert dns_lists.queries[("2.0.0.127.wl.dnsbl.test", "A")] == 1  # one zone, one probe


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"zones": [{"zone": WL, "level": 300}]}, "level must be"),
        ({"trusted_level": -1}, "trusted_level"),
        ({"zone_timeout": 0}, "zone_timeout"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Mistakes in [checks.dnswl] are reported at start."""
    with pytest.raises(ConfigError, match=message):
        build_settings(Options, table, source="mxward.toml", table="checks.dnswl")


@pytest.mark.parametrize(
    ("client", "dnsbl_verdict", "bl_asked"),
    [("127.0.3.20", Verdict.SKIP, False), ("127.0.3.2", Verdict.FAIL, True)],
    ids=["trusted: dnsbl skipped", "not trusted: dnsbl asks"],
)
async def test_dnsbl_skips_clients_dnswl_trusts(
    dns_lists: DnsServer, client: str, dnsbl_verdict: Verdict, bl_asked: bool
) -> None:
    """dnswl before dnsbl with skip_if_dnswl: a trusted client is not looked up in block lists."""
    svc = services(dns_lists)
    dnswl: Check[Any] = DnswlCheck(Options(zones=LEVELS, health_check=False), svc)
    dnsbl: Check[Any] = DnsblCheck(
        DnsblOptions(zones=(DnsblZone(zone="bl.dnsbl.test"),), skip_if_dnswl=True, health_check=False), svc
    )
    pipeline = Pipeline(
        [ActiveCheck(check=dnswl, timeout=5.0), ActiveCheck(check=dnsbl, timeout=5.0)], PipelineSettings()
    )
    results = await pipeline.run([Stage.CONNECT], tx(client), asyncio.get_running_loop().time() + 5)
    by_name = {r.check: r for r in results}
    assert by_name["dnsbl"].verdict is dnsbl_verdict
    reversed_ip = ".".join(reversed(client.split(".")))
    assert (dns_lists.queries[(f"{reversed_ip}.bl.dnsbl.test", "A")] == 1) is bl_asked

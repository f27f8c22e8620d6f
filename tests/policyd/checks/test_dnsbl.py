"""dnsbl: block list lookups against a real rbldnsd (tests/data/rbldnsd) behind the test DNS server."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import time
from typing import Any, NamedTuple

import pytest
from support.dnsserver import DnsServer
from support.rbldnsd import DNSBL_ZONE

from mxward.policyd.checks._dnslists import CodeSet
from mxward.policyd.checks.dnsbl import DnsblCheck, Options, Zone
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import Answer, DnsSettings, DnsTempError, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Check, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

BL = "bl.dnsbl.test"


def services(server: DnsServer, *, lifetime: float = 1.0, cache_size: int = 100) -> Services:
    settings = DnsSettings(
        nameservers=(server.nameserver,), timeout=min(lifetime, 0.5), lifetime=lifetime, cache_size=cache_size
    )
    return Services(
        dns=Resolver(settings),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(),
        hostname="mx.test.example",
    )


def tx(client: str, **facts: Any) -> Transaction:
    return Transaction(stage=Stage.CONNECT, client_address=client, client_ip=parse_ip(client), facts=facts)


def options(*zones: Zone, **kw: Any) -> Options:
    kw.setdefault("health_check", False)
    return Options(zones=zones or (Zone(zone=BL),), **kw)


async def run(server: DnsServer, client: str, opts: Options | None = None, **facts: Any) -> Result:
    check = DnsblCheck(opts or options(), services(server))
    return await check.check(Stage.CONNECT, tx(client, **facts))


# ------------------------------------------------------------------------------------------
# answer codes


@pytest.mark.parametrize(
    ("pattern", "answer", "matches"),
    [
        ("127.0.0.2", "127.0.0.2", True),
        ("127.0.0.2", "127.0.0.3", False),
        ("127.0.0.[2..11]", "127.0.0.11", True),
        ("127.0.0.[2..11]", "127.0.0.12", False),
        ("127.0.0.[2;4;10..11]", "127.0.0.4", True),
        ("127.0.0.[2;4;10..11]", "127.0.0.3", False),
        ("127.0.*.3", "127.0.15.3", True),
        ("127.0.*.3", "127.0.15.2", False),
        ("&4", "127.0.0.12", True),
        ("&0x08", "127.0.0.4", False),
    ],
)
def test_answer_code_patterns(pattern: str, answer: str, matches: bool) -> None:
    """Exact values, postscreen-style octet ranges and lists, wildcards and bitmasks."""
    assert CodeSet([pattern]).matches(ipaddress.IPv4Address(answer)) is matches


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"zones": [{"zone": ""}]}, "a zone name is required"),
        ({"zones": [{"zone": "bl dnsbl test"}]}, "is not a DNS zone name"),
        ({"zones": [{"zone": BL, "codes": ["127.0.0"]}]}, "expected four octets"),
        ({"zones": [{"zone": BL, "codes": ["127.0.0.[9..300]"]}]}, "within 0..255"),
        ({"zones": [{"zone": BL, "codes": ["&x"]}]}, "bitmask"),
        ({"zones": [{"zone": BL, "reply": "{client} listed"}]}, "unknown placeholder"),
        ({"zones": [{"zone": BL, "action": "drop"}]}, "is not valid"),
        ({"reject_code": 450}, "reject_code must be 5xx"),
        ({"defer_dsn": "5.7.1"}, "defer_dsn"),
        ({"allow_networks": ["not-a-net"]}, "is not an IP network"),
        ({"health_interval": "1s"}, "at least 10s"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Mistakes in [checks.dnsbl] stop the start with a message naming them."""
    with pytest.raises(ConfigError, match=message):
        build_settings(Options, table, source="mxward.toml", table="checks.dnsbl")


def test_zone_tables_are_read_from_toml_tables() -> None:
    """[[checks.dnsbl.zones]] tables become Zone objects; zone names are normalised."""
    opts = build_settings(
        Options,
        {"zones": [{"zone": "BL.DNSBL.test.", "codes": "127.0.0.2", "action": "reject"}]},
        source="mxward.toml",
        table="checks.dnsbl",
    )
    assert opts.zones == (Zone(zone=BL, codes=("127.0.0.2",), action="reject"),)


# ------------------------------------------------------------------------------------------
# verdicts


class Case(NamedTuple):
    client: str
    zone: Zone
    verdict: Verdict
    score: float
    reason: str


CASES = {
    "listed with TXT": Case(
        "127.0.3.2",
        Zone(zone=BL),
        Verdict.FAIL,
        10.0,
        "Client host [127.0.3.2] blocked using bl.dnsbl.test;"
        " Listed in bl.dnsbl.test, see https://bl.dnsbl.test/query?ip=127.0.3.2",
    ),
    "not listed": Case("127.0.3.9", Zone(zone=BL), Verdict.PASS, 0.0, ""),
    "listed without TXT": Case(
        "127.0.3.4", Zone(zone=BL), Verdict.FAIL, 10.0, "Client host [127.0.3.4] blocked using bl.dnsbl.test"
    ),
    "code not counted": Case("127.0.3.3", Zone(zone=BL, codes=("127.0.0.2",)), Verdict.PASS, 0.0, ""),
    "code range counted": Case(
        "127.0.3.3",
        Zone(zone=BL, codes=("127.0.0.[4..7]",), score=3.5),
        Verdict.FAIL,
        3.5,
        "Client host [127.0.3.3] blocked using bl.dnsbl.test;"
        " Address 127.0.3.3 is a dynamic address and should not send mail directly",
    ),
    "bitmask hit": Case("127.0.3.5", Zone(zone=BL, codes=("&8",), txt=False), Verdict.FAIL, 10.0, ""),
    "bitmask miss": Case("127.0.3.3", Zone(zone=BL, codes=("&8",)), Verdict.PASS, 0.0, ""),
    "own reply": Case(
        "127.0.3.2",
        Zone(zone=BL, name="bl", reply="{ip} is on {name} ({code}): {txt}"),
        Verdict.FAIL,
        10.0,
        "127.0.3.2 is on bl (127.0.0.2): Listed in bl.dnsbl.test, see https://bl.dnsbl.test/query?ip=127.0.3.2",
    ),
    "IPv6 listed": Case(
        "::3:2",
        Zone(zone=BL),
        Verdict.FAIL,
        10.0,
        "Client host [::3:2] blocked using bl.dnsbl.test; IPv6 address ::3:2 is listed in bl.dnsbl.test",
    ),
    "IPv6 not listed": Case("::3:9", Zone(zone=BL), Verdict.PASS, 0.0, ""),
    "IPv4-mapped is IPv4": Case("::ffff:127.0.3.4", Zone(zone=BL), Verdict.FAIL, 10.0, ""),
    "IPv6 not asked": Case("::3:2", Zone(zone=BL, ipv6=False), Verdict.SKIP, 0.0, ""),
    "query refused": Case("127.0.3.2", Zone(zone="refused.dnsbl.test"), Verdict.ERROR, 0.0, ""),
    "answer outside 127/8": Case("127.0.3.7", Zone(zone="static.dnsbl.test"), Verdict.ERROR, 0.0, ""),
    "two answers": Case(
        "127.0.3.6",
        Zone(zone="static.dnsbl.test"),
        Verdict.FAIL,
        10.0,
        "Client host [127.0.3.6] blocked using static.dnsbl.test; first reason; second reason",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_verdicts(dns_lists: DnsServer, case: Case) -> None:
    """Each answer leads to its verdict, score and reply text."""
    r = await run(dns_lists, case.client, options(case.zone))
    assert (r.verdict, r.score) == (case.verdict, case.score), r
    if case.reason:
        assert r.reason == case.reason
    assert r.action is None
    if case.verdict is Verdict.FAIL:
        assert r.facts == {"dnsbl.listed": case.zone.label}
    if case.verdict is Verdict.PASS:
        assert r.facts == {"dnsbl.listed": ""}


@pytest.mark.parametrize(
    ("client", "log"),
    [
        ("127.0.3.2", {"errors": "refused.dnsbl.test:refused:127.255.255.254"}),
        ("127.0.3.7", {"errors": "static.dnsbl.test:bad-answer:198.51.100.7"}),
    ],
)
async def test_error_answers_are_logged_not_listed(
    dns_lists: DnsServer, client: str, log: dict[str, str]
) -> None:
    """ "Query refused" codes and answers outside 127.0.0.0/8 are errors for the zone."""
    zone = "refused.dnsbl.test" if log["errors"].startswith("refused") else "static.dnsbl.test"
    r = await run(dns_lists, client, options(Zone(zone=zone)))
    assert r.verdict is Verdict.ERROR and r.score == 0
    assert dict(r.log) == log


async def test_the_log_names_zone_and_codes(dns_lists: DnsServer) -> None:
    """listed=<name>:<code>+<code> for every listing entry."""
    r = await run(dns_lists, "127.0.3.6", options(Zone(zone="static.dnsbl.test", name="static")))
    assert dict(r.log) == {"listed": "static:127.0.0.2+127.0.0.4"}


@pytest.mark.parametrize(
    ("action", "kind", "code", "dsn"),
    [("reject", ActionKind.REJECT, 554, "5.7.1"), ("defer", ActionKind.DEFER, 450, "4.7.1")],
)
async def test_an_entry_can_answer_at_once(
    dns_lists: DnsServer, action: str, kind: ActionKind, code: int, dsn: str
) -> None:
    """action = reject/defer forces the reply, with the listing text."""
    r = await run(dns_lists, "127.0.3.4", options(Zone(zone=BL, action=action)))  # type: ignore[arg-type]
    assert r.action is not None
    assert (r.action.kind, r.action.code, r.action.dsn) == (kind, code, dsn)
    assert r.action.text == "Client host [127.0.3.4] blocked using bl.dnsbl.test"


async def test_one_zone_with_two_entries_is_asked_once(dns_lists: DnsServer) -> None:
    """ZEN-style: code 2 rejects, code 10 only scores; the zone is asked one question."""
    zones = (
        Zone(zone=BL, name="sbl", codes=("127.0.0.2",), action="reject"),
        Zone(zone=BL, name="pbl", codes=("127.0.0.10",), score=2.0),
    )
    check = DnsblCheck(options(*zones), services(dns_lists))
    pbl = await check.check(Stage.CONNECT, tx("127.0.3.4"))
    assert (pbl.verdict, pbl.score, pbl.action, pbl.facts["dnsbl.listed"]) == (Verdict.FAIL, 2.0, None, "pbl")
    sbl = await check.check(Stage.CONNECT, tx("127.0.3.2"))
    assert sbl.action is not None and sbl.action.kind is ActionKind.REJECT
    assert sbl.facts["dnsbl.listed"] == "sbl"
    assert dns_lists.queries[("4.3.0.127.bl.dnsbl.test", "A")] == 1


async def test_scores_and_reasons_of_several_zones_add_up(dns_lists: DnsServer) -> None:
    """Two listing zones: both scores, both reasons; the reject entry's text alone forces."""
    zones = (Zone(zone=BL, score=4.0, txt=False), Zone(zone="half.dnsbl.test", score=3.0, action="reject"))
    r = await run(dns_lists, "127.0.3.2", options(*zones))
    assert r.score == 7.0
    assert r.reason == (
        "Client host [127.0.3.2] blocked using bl.dnsbl.test;"
        " Client host [127.0.3.2] blocked using half.dnsbl.test; Listed in half.dnsbl.test"
    )
    assert r.action is not None
    assert r.action.text == "Client host [127.0.3.2] blocked using half.dnsbl.test; Listed in half.dnsbl.test"
    assert r.facts == {"dnsbl.listed": "bl.dnsbl.test,half.dnsbl.test"}


async def test_no_txt_question_when_txt_is_off(dns_lists: DnsServer) -> None:
    """txt = false: only the A question is asked."""
    r = await run(dns_lists, "127.0.3.2", options(Zone(zone=BL, txt=False)))
    assert r.reason == "Client host [127.0.3.2] blocked using bl.dnsbl.test"
    assert dns_lists.queries[("2.3.0.127.bl.dnsbl.test", "TXT")] == 0


# ------------------------------------------------------------------------------------------
# DNS failures and time limits


@pytest.mark.parametrize("fault", ["servfail", "drop"])
async def test_a_failing_zone_is_an_error_never_a_score(dns_lists: DnsServer, fault: str) -> None:
    """SERVFAIL or no answer: ERROR with score 0, the reason logged."""
    getattr(dns_lists, fault)(f"2.3.0.127.{BL}")
    r = await run(dns_lists, "127.0.3.2")
    assert (r.verdict, r.score, r.action) == (Verdict.ERROR, 0.0, None)
    assert r.log["errors"] == f"{BL}:{'servfail' if fault == 'servfail' else 'timeout'}"


async def test_a_failing_zone_does_not_hide_the_others(dns_lists: DnsServer) -> None:
    """One zone SERVFAILs, another lists the client: FAIL with the error logged."""
    dns_lists.servfail(f"2.3.0.127.{BL}")
    r = await run(dns_lists, "127.0.3.2", options(Zone(zone=BL), Zone(zone="half.dnsbl.test")))
    assert (r.verdict, r.score) == (Verdict.FAIL, 10.0)
    assert r.log["errors"] == f"{BL}:servfail"
    assert r.log["listed"] == "half.dnsbl.test:127.0.0.2"


async def test_a_slow_zone_is_cut_off_at_zone_timeout(dns_lists: DnsServer) -> None:
    """A zone answering after 1.5s is given up after zone_timeout (0.3s); the fast one counts."""
    dns_lists.delay(f"2.3.0.127.{BL}", 1.5)
    check = DnsblCheck(
        options(Zone(zone=BL), Zone(zone="half.dnsbl.test"), zone_timeout=0.3),
        services(dns_lists, lifetime=3.0),
    )
    started = time.monotonic()
    r = await check.check(Stage.CONNECT, tx("127.0.3.2"))
    assert time.monotonic() - started < 1.0
    assert r.log["errors"] == f"{BL}:timeout"
    assert r.facts == {"dnsbl.listed": "half.dnsbl.test"}


async def test_a_failing_txt_question_keeps_the_listing(dns_lists: DnsServer) -> None:
    """The A record lists the client; the TXT question fails: listed, reply without the text."""
    check = DnsblCheck(options(), services(dns_lists))
    await check.services.dns.query(f"2.3.0.127.{BL}", "A")  # the A answer is cached now
    dns_lists.servfail(f"2.3.0.127.{BL}")
    r = await check.check(Stage.CONNECT, tx("127.0.3.2"))
    assert (r.verdict, r.reason) == (Verdict.FAIL, "Client host [127.0.3.2] blocked using bl.dnsbl.test")


# ------------------------------------------------------------------------------------------
# skipping


@pytest.mark.parametrize(
    ("opts", "client", "facts", "log"),
    [
        (Options(), "127.0.3.2", {}, {"note": "no zones"}),
        (options(allow_networks=("127.0.3.0/29",)), "127.0.3.2", {}, {"allowed": "network"}),
        (options(skip_if_dnswl=True), "127.0.3.2", {"dnswl.trusted": True}, {"skipped": "dnswl"}),
        (options(Zone(zone=BL, ipv6=False)), "::3:2", {}, {"note": "no zone for IPv6"}),
    ],
    ids=["no zones", "allowed network", "trusted by dnswl", "no IPv6 zone"],
)
async def test_skips_ask_nothing(
    dns_lists: DnsServer, opts: Options, client: str, facts: dict[str, Any], log: dict[str, str]
) -> None:
    """No zones, an allowed network, a dnswl-trusted client or no zone for the family: no question."""
    r = await run(dns_lists, client, opts, **facts)
    assert (r.verdict, r.score, dict(r.log)) == (Verdict.SKIP, 0.0, log)
    assert not dns_lists.queries


async def test_an_untrusted_dnswl_listing_does_not_skip(dns_lists: DnsServer) -> None:
    """skip_if_dnswl only skips for dnswl.trusted."""
    r = await run(dns_lists, "127.0.3.2", options(skip_if_dnswl=True), **{"dnswl.trusted": False})
    assert r.verdict is Verdict.FAIL


def test_skip_if_dnswl_makes_dnsbl_wait_for_dnswl(dns_lists: DnsServer) -> None:
    """With skip_if_dnswl, dnsbl needs dnswl's fact: a pipeline without dnswl before it does not start."""
    plain = DnsblCheck(options(), services(dns_lists))
    waiting = DnsblCheck(options(skip_if_dnswl=True), services(dns_lists))
    assert plain.needs == ()
    assert waiting.needs == ("dnswl.trusted",)
    with pytest.raises(ValueError, match="needs"):
        Pipeline([ActiveCheck(check=waiting, timeout=5.0)], PipelineSettings())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# zone health (RFC 5782 section 5)


@pytest.mark.parametrize(
    ("zone", "family", "state"),
    [
        (BL, "ipv4", "ok"),
        (BL, "ipv6", "ok"),
        ("broken.dnsbl.test", "ipv4", "broken"),
        ("half.dnsbl.test", "ipv4", "ok"),
        ("half.dnsbl.test", "ipv6", "broken"),
        ("refused.dnsbl.test", "ipv4", "erring"),
        ("empty.dnsbl.test", "ipv4", "no-test-entry"),
    ],
)
async def test_health_probes_judge_the_test_entries(
    dns_lists: DnsServer, zone: str, family: str, state: str
) -> None:
    """127.0.0.2 / ::FFFF:7F00:2 must be listed, 127.0.0.1 / ::1 must not."""
    check = DnsblCheck(options(Zone(zone=zone), health_check=True), services(dns_lists))
    await check.health.probe_all()
    assert check.health.state(zone, family) == state
    assert check.health.usable(zone, family) is (state != "broken")


async def test_a_broken_zone_is_ignored_with_a_warning(
    dns_lists: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A zone listing 127.0.0.1 lists everyone: after the probe its answers are ignored."""
    check = DnsblCheck(
        options(Zone(zone="broken.dnsbl.test"), Zone(zone=BL), health_check=True), services(dns_lists)
    )
    before = await check.check(Stage.CONNECT, tx("127.0.3.9"))
    assert before.verdict is Verdict.FAIL  # what the probe protects from
    with caplog.at_level(logging.WARNING, logger="mxward.checks.dnsbl"):
        await check.health.probe_all()
    assert "zone=broken.dnsbl.test family=ipv4 health=broken" in caplog.text
    assert "lists the test entry 1.0.0.127" in caplog.text
    after = await check.check(Stage.CONNECT, tx("127.0.3.9"))
    assert (after.verdict, after.score, after.log["ignored"]) == (Verdict.PASS, 0.0, "broken.dnsbl.test")


async def test_a_zone_broken_for_ipv6_still_serves_ipv4(dns_lists: DnsServer) -> None:
    """half.dnsbl.test lists ::1: ignored for IPv6 clients only."""
    check = DnsblCheck(options(Zone(zone="half.dnsbl.test"), health_check=True), services(dns_lists))
    await check.health.probe_all()
    v6 = await check.check(Stage.CONNECT, tx("::3:2"))
    assert (v6.verdict, dict(v6.log)) == (
        Verdict.SKIP,
        {"note": "every zone ignored", "ignored": "half.dnsbl.test"},
    )
    v4 = await check.check(Stage.CONNECT, tx("127.0.3.2"))
    assert v4.verdict is Verdict.FAIL


async def test_a_failed_probe_keeps_the_last_state(dns_lists: DnsServer) -> None:
    """Our DNS trouble during a probe changes nothing: the zone stays as last judged."""
    check = DnsblCheck(
        options(Zone(zone="broken.dnsbl.test"), health_check=True), services(dns_lists, cache_size=0)
    )
    await check.health.probe_all()
    dns_lists.servfail("1.0.0.127.broken.dnsbl.test")
    await check.health.probe_all()
    assert dns_lists.queries[("1.0.0.127.broken.dnsbl.test", "A")] == 2
    assert check.health.state("broken.dnsbl.test", "ipv4") == "broken"


async def test_health_runs_in_the_background_from_start(dns_lists: DnsServer) -> None:
    """start() probes without blocking; aclose() stops the probing task."""
    check = DnsblCheck(options(Zone(zone="broken.dnsbl.test"), health_check=True), services(dns_lists))
    await check.start()
    try:
        for _ in range(100):
            if check.health.state("broken.dnsbl.test", "ipv4") != "unknown":
                break
            await asyncio.sleep(0.02)
        assert check.health.state("broken.dnsbl.test", "ipv4") == "broken"
    finally:
        await check.aclose()
    assert check.health._task is None


async def test_no_probes_without_health_check(dns_lists: DnsServer) -> None:
    """health_check = false: no test entry is ever asked."""
    check = DnsblCheck(options(Zone(zone=BL)), services(dns_lists))
    await check.start()
    await asyncio.sleep(0.05)
    await check.aclose()
    assert not dns_lists.queries


# ------------------------------------------------------------------------------------------
# in the pipeline


async def test_a_listing_rejects_at_rcpt_with_the_txt_reason(dns_lists: DnsServer) -> None:
    """Score 10 from connect reaches the reject threshold at RCPT: 550 5.7.1 with the list's text."""
    check: Check[Any] = DnsblCheck(options(), services(dns_lists))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=5.0)], PipelineSettings())
    deadline = asyncio.get_running_loop().time() + 5
    results = await pipeline.run([Stage.CONNECT], tx("127.0.3.2"), deadline)
    connect = pipeline.decide(Stage.CONNECT, results)
    assert connect.action.kind is ActionKind.DUNNO
    rcpt = pipeline.decide(Stage.RCPT, results)
    assert (rcpt.action.kind, rcpt.action.code, rcpt.action.dsn) == (ActionKind.REJECT, 550, "5.7.1")
    assert "see https://bl.dnsbl.test/query?ip=127.0.3.2" in rcpt.action.text


def test_defaults_are_safe() -> None:
    """Without zones nothing is asked; a zone only scores by default, and probes its health."""
    zone = Zone(zone=BL)
    assert Options().zones == ()
    assert (zone.action, zone.score, zone.txt, zone.ipv6) == ("score", 10.0, True, True)
    assert dataclasses.replace(Options(), zones=(zone,)).health_check is True


# ------------------------------------------------------------------------------------------
# the test DNS server's forwarding (tests/support/dnsserver.py)


async def test_forwarding_relays_rbldnsd_and_keeps_own_zones_below(
    dns_server: DnsServer, rbldnsd: Any
) -> None:
    """Forwarding all of dnsbl.test: rbldnsd answers its names, our own static zone still answers itself."""
    dns_server.forward("dnsbl.test", rbldnsd.host, rbldnsd.port)
    dns_server.add_zone(DNSBL_ZONE)
    resolver = services(dns_server).dns
    assert await resolver.query(f"2.3.0.127.{BL}", "A") == Answer(records=("127.0.0.2",), ttl=60.0)
    assert (await resolver.query("6.3.0.127.static.dnsbl.test", "TXT")).records
    assert dns_server.queries[(f"2.3.0.127.{BL}", "A")] == 1


async def test_forwarding_to_a_silent_server_is_servfail(dns_server: DnsServer) -> None:
    """An upstream that does not answer becomes SERVFAIL, as from a recursive resolver."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never read: the question goes unanswered
        dns_server.forward("silent.dnsbl.test", "127.0.0.1", sock.getsockname()[1])
        resolver = Resolver(DnsSettings(nameservers=(dns_server.nameserver,), timeout=3.0, lifetime=3.0))
        with pytest.raises(DnsTempError) as caught:
            await resolver.query("2.0.0.127.silent.dnsbl.test", "A")
    assert caught.value.reason == "servfail"

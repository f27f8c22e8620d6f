"""rhsbl: domain list lookups (sender, HELO, client name) against a real rbldnsd."""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
from support.dnsserver import DnsServer

from mxward.policyd.checks.rhsbl import Options, RhsblCheck, Zone, identities
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.plugin import ActionKind, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

DBL = "dbl.dnsbl.test"
ALL = ("sender", "helo", "client")


def services(server: DnsServer) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=(server.nameserver,), timeout=0.5, lifetime=1.0)),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(),
    )


def tx(
    sender: str = "alice@clean.example", helo: str = "mail.clean.example", client_name: str = "unknown"
) -> Transaction:
    return Transaction(
        stage=Stage.MAIL,
        client_address="127.0.3.2",
        client_ip=parse_ip("127.0.3.2"),
        client_name=client_name,
        helo=helo,
        sender=sender,
    )


async def run(server: DnsServer, t: Transaction, *zones: Zone, **kw: Any) -> Result:
    kw.setdefault("health_check", False)
    check = RhsblCheck(Options(zones=zones or (Zone(zone=DBL),), **kw), services(server))
    return await check.check(Stage.MAIL, t)


class Case(NamedTuple):
    tx: Transaction
    zone: Zone
    verdict: Verdict
    score: float
    reason: str = ""


CASES = {
    "sender listed": Case(
        tx("bob@spammer.example"),
        Zone(zone=DBL),
        Verdict.FAIL,
        10.0,
        "Sender address [spammer.example] blocked using dbl.dnsbl.test;"
        " Domain spammer.example is listed in dbl.dnsbl.test",
    ),
    "sender in capitals": Case(tx("bob@SPAMMER.Example."), Zone(zone=DBL), Verdict.FAIL, 10.0),
    "sender not listed": Case(tx(), Zone(zone=DBL), Verdict.PASS, 0.0),
    "listed without TXT": Case(
        tx("x@redirector.example"),
        Zone(zone=DBL),
        Verdict.FAIL,
        10.0,
        "Sender address [redirector.example] blocked using dbl.dnsbl.test",
    ),
    "null sender not asked": Case(tx(""), Zone(zone=DBL), Verdict.SKIP, 0.0),
    "address literal not asked": Case(tx("x@[127.0.0.1]"), Zone(zone=DBL), Verdict.SKIP, 0.0),
    "HELO listed": Case(
        tx(helo="mx.badhelo.example"),
        Zone(zone=DBL, identities=("helo",)),
        Verdict.FAIL,
        10.0,
        "Helo command [mx.badhelo.example] blocked using dbl.dnsbl.test;"
        " Domain badhelo.example is listed in dbl.dnsbl.test",
    ),
    "HELO not asked by default": Case(tx(helo="mx.badhelo.example"), Zone(zone=DBL), Verdict.PASS, 0.0),
    "HELO of the null sender": Case(
        tx("", helo="badhelo.example"), Zone(zone=DBL, identities=("helo",)), Verdict.FAIL, 10.0
    ),
    "HELO address not asked": Case(
        tx("", helo="127.0.3.2"), Zone(zone=DBL, identities=ALL), Verdict.SKIP, 0.0
    ),
    "client name listed": Case(
        tx(client_name="bad-client.example"),
        Zone(zone=DBL, identities=("client",), score=4.0),
        Verdict.FAIL,
        4.0,
        "Client host [bad-client.example] blocked using dbl.dnsbl.test;"
        " Host bad-client.example is a known spam client",
    ),
    "client name unknown": Case(tx(""), Zone(zone=DBL, identities=("client",)), Verdict.SKIP, 0.0),
    "code not counted": Case(
        tx("x@spammer.example"), Zone(zone=DBL, codes=("127.0.1.4",)), Verdict.PASS, 0.0
    ),
    "query refused": Case(tx("x@refused.example"), Zone(zone=DBL), Verdict.ERROR, 0.0),
    "answer outside 127/8": Case(
        tx("x@rewritten.example"), Zone(zone="static.dnsbl.test"), Verdict.ERROR, 0.0
    ),
    "own reply": Case(
        tx("bob@spammer.example"),
        Zone(zone=DBL, reply="{identity} {domain} is on {name} ({code}) for {ip}"),
        Verdict.FAIL,
        10.0,
        "sender spammer.example is on dbl.dnsbl.test (127.0.1.2) for 127.0.3.2",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_verdicts(dns_lists: DnsServer, case: Case) -> None:
    """Each identity and answer leads to its verdict, score and reply text."""
    r = await run(dns_lists, case.tx, case.zone)
    assert (r.verdict, r.score) == (case.verdict, case.score), r
    if case.reason:
        assert r.reason == case.reason
    assert r.action is None
    if case.verdict is Verdict.FAIL:
        assert r.facts == {"rhsbl.listed": case.zone.label}


async def test_an_entry_scores_once_for_several_listed_names(dns_lists: DnsServer) -> None:
    """Sender and HELO both listed in one entry: one score, both reasons, both in the log."""
    r = await run(dns_lists, tx("x@spammer.example", helo="badhelo.example"), Zone(zone=DBL, identities=ALL))
    assert (r.verdict, r.score) == (Verdict.FAIL, 10.0)
    assert r.reason.count("blocked using") == 2
    assert r.log["listed"] == f"{DBL}:sender=spammer.example:127.0.1.2,{DBL}:helo=badhelo.example:127.0.1.2"


async def test_the_same_name_is_asked_once(dns_lists: DnsServer) -> None:
    """The HELO name equal to the sender domain is one question."""
    await run(dns_lists, tx("x@clean.example", helo="clean.example"), Zone(zone=DBL, identities=ALL))
    assert dns_lists.queries[("clean.example.dbl.dnsbl.test", "A")] == 1


@pytest.mark.parametrize(
    ("action", "kind", "code"), [("reject", ActionKind.REJECT, 554), ("defer", ActionKind.DEFER, 450)]
)
async def test_an_entry_can_answer_at_once(
    dns_lists: DnsServer, action: str, kind: ActionKind, code: int
) -> None:
    """action = reject/defer forces the reply with the listing text."""
    r = await run(dns_lists, tx("x@redirector.example"), Zone(zone=DBL, action=action))  # type: ignore[arg-type]
    assert r.action is not None and (r.action.kind, r.action.code) == (kind, code)
    assert r.action.text == "Sender address [redirector.example] blocked using dbl.dnsbl.test"


async def test_allowed_domains_are_never_asked(dns_lists: DnsServer) -> None:
    """allow_domains: the name (and its subdomains) is not looked up."""
    r = await run(dns_lists, tx("x@mail.spammer.example"), Zone(zone=DBL), allow_domains=("spammer.example",))
    assert (r.verdict, dict(r.log)) == (Verdict.SKIP, {"note": "nothing to look up"})
    assert not dns_lists.queries


@pytest.mark.parametrize("fault", ["servfail", "drop"])
async def test_dns_trouble_is_an_error_never_a_score(dns_lists: DnsServer, fault: str) -> None:
    """SERVFAIL or timeout: ERROR, score 0, logged with the name."""
    getattr(dns_lists, fault)(f"spammer.example.{DBL}")
    r = await run(dns_lists, tx("x@spammer.example"))
    assert (r.verdict, r.score, r.action) == (Verdict.ERROR, 0.0, None)
    assert r.log["errors"] == f"{DBL}:spammer.example:{'servfail' if fault == 'servfail' else 'timeout'}"


async def test_a_name_too_long_for_the_zone_is_not_asked(dns_lists: DnsServer) -> None:
    """A sender domain that makes the question longer than 253 characters is left out."""
    domain = ".".join(["a" * 60] * 4)
    r = await run(dns_lists, tx(f"x@{domain}"))
    assert r.verdict is Verdict.SKIP


@pytest.mark.parametrize(
    ("zone", "state"),
    [
        (DBL, "ok"),
        ("brokendbl.dnsbl.test", "broken"),
        ("static.dnsbl.test", "ok"),
        ("empty.dnsbl.test", "no-test-entry"),
    ],
)
async def test_health_probes_ask_test_and_invalid(dns_lists: DnsServer, zone: str, state: str) -> None:
    """RFC 5782: "test" must be listed, "invalid" must not."""
    check = RhsblCheck(Options(zones=(Zone(zone=zone),)), services(dns_lists))
    await check.health.probe_all()
    assert check.health.state(zone, "domain") == state


async def test_a_broken_domain_list_is_ignored(dns_lists: DnsServer) -> None:
    """brokendbl lists "invalid": after the probe it is left out, with the others still asked."""
    check = RhsblCheck(
        Options(zones=(Zone(zone="brokendbl.dnsbl.test"), Zone(zone=DBL))), services(dns_lists)
    )
    t = tx("x@clean.example")
    assert (await check.check(Stage.MAIL, t)).verdict is Verdict.FAIL
    await check.health.probe_all()
    r = await check.check(Stage.MAIL, t)
    assert (r.verdict, r.log["ignored"]) == (Verdict.PASS, "brokendbl.dnsbl.test")


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (
            tx("a@Example.ORG", helo="MX.example.net.", client_name="mail.example.com"),
            {"sender": "example.org", "helo": "mx.example.net", "client": "mail.example.com"},
        ),
        (tx("", helo="[192.0.2.1]"), {}),
        (tx("postmaster", helo="localhost"), {}),
    ],
)
def test_identities(t: Transaction, expected: dict[str, str]) -> None:
    """Names are lower-cased; null sender, literals, IPs and dotless names are left out."""
    assert identities(t) == expected


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"zones": [{"zone": DBL, "identities": []}]}, "identities must name"),
        ({"zones": [{"zone": DBL, "identities": ["rcpt"]}]}, "is not valid"),
        ({"zones": [{"zone": DBL, "reply": "{sender}"}]}, "unknown placeholder"),
        ({"allow_domains": ["/[/"]}, "regular expression"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Mistakes in [checks.rhsbl] are reported at start."""
    with pytest.raises(ConfigError, match=message):
        build_settings(Options, table, source="mxward.toml", table="checks.rhsbl")

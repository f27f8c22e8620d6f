"""fcrdns: RFC 8601 iprev against the tests' own DNS server (tests/data/dns/helo.zone)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import pytest
from support.dns_fixtures import DNS_DATA
from support.dnsserver import DnsServer

from mxward.policyd.checks.fcrdns import FcrdnsCheck, Options, is_hostname
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.plugin import ActionKind, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

HELO_ZONE = DNS_DATA / "helo.zone"


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add_zone(HELO_ZONE)
    return dns_server


def services(server: DnsServer) -> Services:
    settings = DnsSettings(nameservers=(server.nameserver,), timeout=0.3, lifetime=0.6)
    return Services(
        dns=Resolver(settings),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(),
        hostname="mx.test.example",
    )


def tx(client: str, **attrs: str) -> Transaction:
    return Transaction(
        stage=Stage.CONNECT,
        client_address=client,
        client_ip=parse_ip(client),
        client_name=attrs.get("client_name", "unknown"),
        reverse_client_name=attrs.get("reverse_client_name", "unknown"),
        attrs=attrs,
    )


async def run(
    server: DnsServer, client: str, options: Options | None = None, attrs: dict[str, str] | None = None
) -> Result:
    check = FcrdnsCheck(options or Options(), services(server))
    return await check.check(Stage.CONNECT, tx(client, **(attrs or {})))


class Case(NamedTuple):
    client: str
    options: Options
    result: str
    verdict: Verdict
    score: float
    name: str = ""


@pytest.mark.parametrize(
    "case",
    [
        # pass: a PTR name resolves back to the client address
        Case("127.0.1.2", Options(), "pass", Verdict.PASS, -1.0, "good.helo.test.example"),
        Case("127.0.1.8", Options(), "pass", Verdict.PASS, -1.0, "multi-b.helo.test.example"),
        Case("2001:db8:1::2", Options(), "pass", Verdict.PASS, -1.0, "good.helo.test.example"),
        Case("127.0.1.12", Options(max_names=12), "pass", Verdict.PASS, -1.0, "many-12.helo.test.example"),
        # pass by network, only when asked for (iprev is exact)
        Case("127.0.1.3", Options(network_pass=True), "pass", Verdict.PASS, 0.0, "net.helo.test.example"),
        Case(
            "2001:db8:1::4", Options(network_pass=True), "pass", Verdict.PASS, 0.0, "net6.helo.test.example"
        ),
        # fail: PTR names exist, none resolves back
        Case("127.0.1.3", Options(), "fail", Verdict.FAIL, 1.0, ""),
        Case("2001:db8:1::4", Options(), "fail", Verdict.FAIL, 1.0, ""),
        Case("127.0.1.4", Options(network_pass=True), "fail", Verdict.FAIL, 1.0, ""),
        Case("127.0.1.5", Options(), "fail", Verdict.FAIL, 1.0, ""),  # PTR name NXDOMAIN
        Case("127.0.1.10", Options(), "fail", Verdict.FAIL, 1.0, ""),  # PTR name without address
        Case("127.0.1.11", Options(), "fail", Verdict.FAIL, 1.0, ""),  # PTR "localhost": not a FQDN
        Case("127.0.1.12", Options(), "fail", Verdict.FAIL, 1.0, ""),  # the match is name 12 of 12
        # permerror: no PTR at all
        Case("127.0.1.6", Options(), "permerror", Verdict.FAIL, 1.0, ""),
        Case("2001:db8:1::3", Options(), "permerror", Verdict.FAIL, 1.0, ""),
        # scores are options
        Case("127.0.1.2", Options(score_pass=-2.5), "pass", Verdict.PASS, -2.5, "good.helo.test.example"),
        Case("127.0.1.4", Options(score_fail=3), "fail", Verdict.FAIL, 3.0, ""),
        Case("127.0.1.6", Options(score_permerror=0.5), "permerror", Verdict.FAIL, 0.5, ""),
    ],
)
async def test_iprev_results(dns: DnsServer, case: Case) -> None:
    """Each iprev result comes with its verdict, score and facts."""
    r = await run(dns, case.client, case.options)
    assert r.verdict is case.verdict
    assert r.score == case.score
    policy = str(parse_ip(case.client))
    assert r.facts == {"iprev.result": case.result, "iprev.name": case.name, "iprev.policy": policy}
    assert r.log["iprev"] == case.result
    assert r.action is None
    assert bool(r.reason) == (case.verdict is Verdict.FAIL)


@pytest.mark.parametrize(
    ("client", "fault", "how", "dns_log"),
    [
        ("127.0.1.7", "7.1.0.127.in-addr.arpa", "servfail", "ptr:servfail"),
        ("127.0.1.7", "7.1.0.127.in-addr.arpa", "drop", "ptr:timeout"),
        ("127.0.1.7", "7.1.0.127.in-addr.arpa", "refuse", "ptr:refused"),
        ("127.0.1.9", "brk.helo.test.example", "servfail", "forward:servfail"),
        ("127.0.1.9", "brk.helo.test.example", "drop", "forward:timeout"),
        # one name does not confirm, the other cannot be asked: the result is unknown
        ("127.0.1.13", "mix-b.helo.test.example", "servfail", "forward:servfail"),
    ],
)
async def test_our_dns_trouble_is_temperror_and_never_scored(
    dns: DnsServer, client: str, fault: str, how: str, dns_log: str
) -> None:
    """SERVFAIL, REFUSED or a timeout gives iprev=temperror: verdict error, no score, no reply."""
    getattr(dns, how)(fault)
    r = await run(dns, client, Options(reject=("fail", "permerror")))
    assert r.verdict is Verdict.ERROR
    assert r.score == 0
    assert r.action is None
    assert r.reason == ""
    assert r.facts["iprev.result"] == "temperror"
    assert r.log["dns"] == dns_log


async def test_a_confirmed_name_wins_over_a_failing_lookup(dns: DnsServer) -> None:
    """One PTR name that resolves back is enough, even when another name's lookup fails."""
    dns.servfail("mix-b.helo.test.example")
    r = await run(dns, "127.0.1.14")
    assert r.verdict is Verdict.PASS
    assert r.facts["iprev.name"] == "mix-ok.helo.test.example"


async def test_at_most_max_names_are_looked_up_and_never_a_bare_label(dns: DnsServer) -> None:
    """Twelve PTR names cost ten forward questions; ``localhost`` is never asked."""
    await run(dns, "127.0.1.12")
    forward = [name for (name, qtype) in dns.queries if qtype == "A"]
    assert sorted(forward) == [f"many-{n:02}.helo.test.example" for n in range(1, 11)]
    dns.reset_queries()
    await run(dns, "127.0.1.11")
    assert all(qtype == "PTR" for (_, qtype) in dns.queries)


async def test_the_forward_question_matches_the_client_family(dns: DnsServer) -> None:
    """An IPv4 client's names are asked for A records, an IPv6 client's for AAAA."""
    await run(dns, "127.0.1.2")
    await run(dns, "2001:db8:1::2")
    asked = {qtype for (name, qtype) in dns.queries if name == "good.helo.test.example"}
    assert asked == {"A", "AAAA"}
    assert dns.queries[("good.helo.test.example", "A")] == 1


async def test_loopback_clients_are_not_special(dns: DnsServer) -> None:
    """127.0.0.0/8 gets what its DNS says: 127.0.1.6 has no PTR, so it is permerror."""
    r = await run(dns, "127.0.1.6")
    assert r.facts["iprev.result"] == "permerror"


@pytest.mark.parametrize(
    ("options", "client", "kind", "reply"),
    [
        (
            Options(reject=("permerror",)),
            "127.0.1.6",
            ActionKind.REJECT,
            "550 5.7.25 Reverse DNS of 127.0.1.6 is not forward-confirmed (iprev=permerror)",
        ),
        (
            Options(reject=("fail",), reject_code=450, reject_dsn="4.7.25", reject_text="No FCrDNS for {ip}"),
            "127.0.1.4",
            ActionKind.DEFER,
            "450 4.7.25 No FCrDNS for 127.0.1.4",
        ),
    ],
)
async def test_a_listed_result_is_answered_at_once(
    dns: DnsServer, options: Options, client: str, kind: ActionKind, reply: str
) -> None:
    """With ``reject`` a fail or permerror forces a reply, 5xx rejecting and 4xx deferring."""
    r = await run(dns, client, options)
    assert r.action is not None
    assert r.action.kind is kind
    assert r.action.reply == reply


@pytest.mark.parametrize(
    ("options", "client"),
    [
        (Options(reject=("fail",)), "127.0.1.6"),  # permerror is not listed
        (Options(reject=("permerror",)), "127.0.1.4"),  # fail is not listed
        (Options(reject=("fail", "permerror")), "127.0.1.2"),  # pass
    ],
)
async def test_results_not_listed_are_only_scored(dns: DnsServer, options: Options, client: str) -> None:
    """Only the listed results force a reply; the rest are scores."""
    assert (await run(dns, client, options)).action is None


@pytest.mark.parametrize(
    ("client", "attrs", "expected"),
    [
        (
            "127.0.1.2",
            {"client_name": "good.helo.test.example", "reverse_client_name": "good.helo.test.example"},
            {"postfix": "agree"},
        ),
        ("127.0.1.6", {"client_name": "unknown", "reverse_client_name": "unknown"}, {"postfix": "agree"}),
        (
            "127.0.1.6",
            {"client_name": "unknown", "reverse_client_name": "stale.example"},
            {"postfix": "differs", "postfix_name": "unknown", "postfix_reverse": "stale.example"},
        ),
        (
            "127.0.1.2",
            {"client_name": "unknown", "reverse_client_name": "good.helo.test.example"},
            {"postfix": "differs", "postfix_name": "unknown", "postfix_reverse": "good.helo.test.example"},
        ),
        ("127.0.1.2", {}, {}),
    ],
)
async def test_postfix_names_are_compared_for_the_log_only(
    dns: DnsServer, client: str, attrs: dict[str, str], expected: dict[str, str]
) -> None:
    """Postfix's client_name/reverse_client_name are logged against ours, never scored."""
    plain = await run(dns, client)
    r = await run(dns, client, attrs=attrs)
    assert {k: v for k, v in r.log.items() if k.startswith("postfix")} == expected
    assert (r.verdict, r.score, r.facts) == (plain.verdict, plain.score, plain.facts)


async def test_a_request_without_client_address_is_skipped(dns: DnsServer) -> None:
    """Nothing to look up: skip, no facts."""
    check = FcrdnsCheck(Options(), services(dns))
    r = await check.check(Stage.CONNECT, Transaction(stage=Stage.CONNECT))
    assert r.verdict is Verdict.SKIP
    assert r.facts == {}


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("mail.example.com", True),
        ("mail.example.com.", True),
        ("MAIL-1.Example.COM", True),
        ("win_host.example.com", True),
        ("localhost", False),
        ("-bad.example.com", False),
        ("bad-.example.com", False),
        ("1.2.3.4", False),
        ("exa mple.com", False),
        ("", False),
        ("a..b", False),
        (("x" * 64) + ".example", False),
    ],
)
def test_host_name_syntax(name: str, valid: bool) -> None:
    """Only fully qualified host names are looked up."""
    assert is_hostname(name) is valid


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_names": 0}, "max_names"),
        ({"ipv4_prefix": 33}, "ipv4_prefix"),
        ({"reject": ["temperror"]}, "reject"),
        ({"reject_code": 250}, "reject_code"),
        ({"reject_code": 450}, "reject_dsn"),
        ({"reject_text": "{client}"}, "placeholder"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Impossible settings stop the start with a message naming the key."""
    with pytest.raises(ConfigError, match=message):
        build_settings(Options, table, source="mxward.toml", table="checks.fcrdns")


def test_the_defaults_score_and_never_reject() -> None:
    """By default fcrdns only scores: nothing is listed in ``reject``."""
    defaults = Options()
    assert defaults.reject == ()
    assert not defaults.network_pass
    assert dataclasses.asdict(build_settings(Options, {}, source="", table="checks.fcrdns")) == (
        dataclasses.asdict(defaults)
    )

"""helo: qpsmtpd's lenient / rfc / strict test sets against the tests' own DNS server.

DNS data: tests/data/dns/helo.zone (clients 127.0.1.0/24 and 2001:db8:1::/48, ordinary Internet
clients here). The last tests run helo and fcrdns through the policy service and read the
decision log line.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import pytest
from support.dns_fixtures import DNS_DATA
from support.dnsserver import DnsServer
from support.policy_client import request

from mxward.policyd.checks.fcrdns import FcrdnsCheck
from mxward.policyd.checks.fcrdns import Options as FcrdnsOptions
from mxward.policyd.checks.helo import BadName, HeloCheck, Options, Scores
from mxward.policyd.service import PolicyService
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Check, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

HELO_ZONE = DNS_DATA / "helo.zone"
LENIENT = Options()
RFC = Options(policy="rfc")
STRICT = Options(policy="strict")


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add_zone(HELO_ZONE)
    return dns_server


def services(server: DnsServer, hostname: str = "mx.test.example") -> Services:
    settings = DnsSettings(nameservers=(server.nameserver,), timeout=0.3, lifetime=0.6)
    return Services(
        dns=Resolver(settings),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(),
        hostname=hostname,
    )


async def run(
    server: DnsServer, helo: str, client: str = "127.0.1.2", options: Options = LENIENT, **attrs: str
) -> Result:
    check = HeloCheck(options, services(server))
    tx = Transaction(
        stage=Stage.HELO, client_address=client, client_ip=parse_ip(client), helo=helo, attrs=attrs
    )
    return await check.check(Stage.HELO, tx)


def bad(*entries: str | tuple[str, str]) -> Options:
    names = tuple(
        BadName(pattern=e) if isinstance(e, str) else BadName(pattern=e[0], reason=e[1]) for e in entries
    )
    return Options(bad_names=names)


# ---------------------------------------------------------------------------------------------
# Failing tests, one row per test and way to fail


class Fail(NamedTuple):
    helo: str
    client: str
    options: Options
    attrs: dict[str, str]
    test: str
    reason: str  # "" = not compared (the same test's text is compared in another row)


_FAILURE_ROWS: list[tuple[str, str, Options, dict[str, str], str, str]] = [
    (
        "",
        "127.0.1.2",
        LENIENT,
        {},
        "empty",
        "HELO/EHLO with your host name is required (RFC 5321 section 4.1.1.1)",
    ),
    ("Yahoo.COM", "127.0.1.2", bad("yahoo.com"), {}, "bad_name", "I do not believe you are Yahoo.COM"),
    (
        "mx.spam.example",
        "127.0.1.2",
        bad(("/\\.spam\\.example$/", "Go away, {helo}")),
        {},
        "bad_name",
        "Go away, mx.spam.example",
    ),
    ("hostonly", "127.0.1.2", bad("!/\\./"), {}, "bad_name", "I do not believe you are hostonly"),
    (
        "MX.test.example",
        "127.0.1.2",
        LENIENT,
        {},
        "own_name",
        "You are not me: MX.test.example is this server's own name or address",
    ),
    ("relay.ours.example", "127.0.1.2", Options(own_names=("relay.ours.example",)), {}, "own_name", ""),
    ("[192.0.2.25]", "127.0.1.2", Options(own_addresses=("192.0.2.0/24",)), {}, "own_name", ""),
    ("192.0.2.25", "127.0.1.2", Options(own_addresses=("192.0.2.25",)), {}, "own_name", ""),
    ("[127.0.0.1]", "127.0.1.2", LENIENT, {"server_address": "127.0.0.1"}, "own_name", ""),
    (
        "localhost",
        "127.0.1.2",
        LENIENT,
        {},
        "localhost",
        "You are not localhost: localhost is only accepted from this host",
    ),
    ("LOCALHOST.localdomain", "127.0.1.2", LENIENT, {}, "localhost", ""),
    ("mail.localhost", "2001:db8:1::2", LENIENT, {}, "localhost", ""),
    ("localhost", "127.0.0.2", LENIENT, {}, "localhost", ""),  # 127/8 is not trusted, only 127.0.0.1
    (
        "[127.0.1.99]",
        "127.0.1.2",
        LENIENT,
        {},
        "forged_literal",
        "HELO address literal [127.0.1.99] is not your address 127.0.1.2",
    ),
    ("[IPv6:2001:db8:1::2]", "2001:db8:1::5", LENIENT, {}, "forged_literal", ""),
    ("[IPv6:2001:db8:1::2]", "127.0.1.2", LENIENT, {}, "forged_literal", ""),
    (
        "[mail.example]",
        "127.0.1.2",
        LENIENT,
        {},
        "forged_literal",
        "[mail.example] is not a valid address literal",
    ),
    ("[]", "127.0.1.2", LENIENT, {}, "forged_literal", "[] is not a valid address literal"),
    (
        "127.0.1.2",
        "127.0.1.2",
        LENIENT,
        {},
        "plain_ip",
        (
            "A bare IP address is not a valid HELO name; use your host name or [127.0.1.2]"
            " (RFC 5321 section 4.1.3)"
        ),
    ),
    (
        "2001:db8:1::2",
        "2001:db8:1::2",
        LENIENT,
        {},
        "plain_ip",
        (
            "A bare IP address is not a valid HELO name; use your host name or [IPv6:2001:db8:1::2]"
            " (RFC 5321 section 4.1.3)"
        ),
    ),
    (
        "hostonly",
        "127.0.1.2",
        RFC,
        {},
        "not_fqdn",
        "HELO name hostonly is not a fully qualified host name (RFC 5321 section 4.1.1.1)",
    ),
    ("exa mple.example", "127.0.1.2", RFC, {}, "not_fqdn", ""),
    ("mail.example.123", "127.0.1.2", RFC, {}, "not_fqdn", ""),
    (
        "nonexistent.helo.test.example",
        "127.0.1.20",
        RFC,
        {},
        "no_forward_dns",
        "HELO name nonexistent.helo.test.example does not exist in DNS",
    ),
    (
        "fwd24.helo.test.example",
        "127.0.1.24",
        RFC,
        {},
        "no_reverse_dns",
        "Your address 127.0.1.24 has no reverse DNS (PTR) record",
    ),
    (
        "[127.0.1.2]",
        "127.0.1.2",
        STRICT,
        {},
        "address_literal",
        "HELO with an address literal is not accepted here; use your host name",
    ),
    (
        "away.helo.test.example",
        "127.0.1.23",
        STRICT,
        {},
        "no_matching_dns",
        "HELO name away.helo.test.example does not match your address 127.0.1.23 in DNS",
    ),
    (
        "smtp.helo.test.example",
        "127.0.1.22",
        Options(policy="strict", reverse_match_labels=0),
        {},
        "no_matching_dns",
        "",
    ),
    (
        "near.helo.test.example",
        "127.0.1.23",
        Options(policy="strict", forward_ipv4_prefix=32),
        {},
        "no_matching_dns",
        "",
    ),
]


FAILURES = [Fail(*row) for row in _FAILURE_ROWS]


@pytest.mark.parametrize("case", FAILURES, ids=[f"{c.test}:{c.helo}" for c in FAILURES])
async def test_each_failing_test_scores_with_its_reason(dns: DnsServer, case: Fail) -> None:
    """The first failing test decides: verdict fail, its score, its reason, and helo.test."""
    r = await run(dns, case.helo, case.client, case.options, **case.attrs)
    assert r.verdict is Verdict.FAIL
    assert r.log["test"] == case.test
    assert r.facts["helo.test"] == case.test
    assert r.facts["helo.name"] == case.helo
    assert r.score == getattr(Scores(), case.test)
    assert r.action is None
    assert r.reason
    if case.reason:
        assert r.reason == case.reason


# ---------------------------------------------------------------------------------------------
# Passing names


class Pass(NamedTuple):
    helo: str
    client: str
    options: Options
    attrs: dict[str, str]
    fwd: str | None  # helo.forward_match
    rev: str | None  # helo.reverse_match
    score: float


_PASS_ROWS: list[tuple[str, str, Options, dict[str, str], str | None, str | None, float]] = [
    ("mail.example.net", "127.0.1.2", LENIENT, {}, None, None, 0.0),
    ("hostonly", "127.0.1.2", LENIENT, {}, None, None, 0.0),  # FQDN is the rfc set's test
    ("host.example", "127.0.1.2", bad("!/\\./"), {}, None, None, 0.0),
    ("notyahoo.com", "127.0.1.2", bad("yahoo.com"), {}, None, None, 0.0),
    ("localhost", "127.0.0.1", LENIENT, {}, None, None, 0.0),
    ("localhost", "::1", LENIENT, {}, None, None, 0.0),
    ("mx.test.example", "127.0.0.1", LENIENT, {}, None, None, 0.0),  # our own host may say our name
    ("mx.test.example", "192.0.2.25", Options(own_addresses=("192.0.2.0/24",)), {}, None, None, 0.0),
    ("[127.0.1.30]", "127.0.1.30", LENIENT, {"server_address": "127.0.1.30"}, None, None, 0.0),
    ("[127.0.1.2]", "127.0.1.2", LENIENT, {}, None, None, 0.0),
    ("[127.0.1.2]", "127.0.1.2", RFC, {}, None, None, 0.0),  # literals are exempt from not_fqdn
    ("[IPv6:2001:db8:1::2]", "2001:db8:1::2", LENIENT, {}, None, None, 0.0),
    ("[IPv6:::ffff:127.0.1.2]", "127.0.1.2", LENIENT, {}, None, None, 0.0),
    ("mail.helo.test.example", "127.0.1.20", RFC, {}, "yes", "yes", 0.0),
    ("mail.helo.test.example.", "127.0.1.20", RFC, {}, "yes", "yes", 0.0),
    ("noaddr.helo.test.example", "127.0.1.20", RFC, {}, "no", "yes", 0.0),  # exists without address
    ("away.helo.test.example", "127.0.1.23", RFC, {}, "no", "no", 0.0),  # matching is strict's test
    (
        "fwd24.helo.test.example",
        "127.0.1.24",
        Options(policy="rfc", skip_tests=("no_reverse_dns",)),
        {},
        "yes",
        None,
        0.0,
    ),
    ("mail.helo.test.example", "127.0.1.20", STRICT, {}, "yes", "yes", -1.0),
    ("MAIL.helo.test.example", "2001:db8:1::20", STRICT, {}, "yes", "yes", -1.0),
    ("fwd.helo.test.example", "127.0.1.21", STRICT, {}, "yes", "no", 0.0),
    ("smtp.helo.test.example", "127.0.1.22", STRICT, {}, "no", "yes", 0.0),
    ("near.helo.test.example", "127.0.1.23", STRICT, {}, "yes", "no", 0.0),  # same /24
    (
        "mail.helo.test.example",
        "127.0.1.20",
        Options(policy="strict", scores=Scores(dns_match=-2.0)),
        {},
        "yes",
        "yes",
        -2.0,
    ),
]


PASSES = [Pass(*row) for row in _PASS_ROWS]


@pytest.mark.parametrize("case", PASSES, ids=[f"{c.options.policy}:{c.helo}:{c.client}" for c in PASSES])
async def test_believable_names_pass(dns: DnsServer, case: Pass) -> None:
    """Names that pass every test of the set: verdict pass, the match facts, and strict's bonus."""
    r = await run(dns, case.helo, case.client, case.options, **case.attrs)
    assert r.verdict is Verdict.PASS, r
    assert r.score == case.score
    assert r.reason == ""
    assert r.facts == {
        "helo.name": case.helo,
        "helo.test": "",
        "helo.forward_match": case.fwd,
        "helo.reverse_match": case.rev,
    }


class Trouble(NamedTuple):
    helo: str
    client: str
    options: Options
    fault: str  # the name our DNS server fails for
    how: str  # servfail | drop (a timeout)
    dns_log: str


RFC_REJECTING = Options(policy="rfc", reject=("no_forward_dns", "no_reverse_dns"))
STRICT_REJECTING = Options(policy="strict", reject=("no_forward_dns", "no_reverse_dns", "no_matching_dns"))
TROUBLE = [
    Trouble(
        "flaky.helo.test.example",
        "127.0.1.20",
        RFC_REJECTING,
        "flaky.helo.test.example",
        "servfail",
        "forward:servfail",
    ),
    Trouble(
        "flaky.helo.test.example",
        "127.0.1.23",
        STRICT_REJECTING,
        "flaky.helo.test.example",
        "servfail",
        "forward:servfail",
    ),
    Trouble(
        "flaky.helo.test.example",
        "127.0.1.20",
        RFC_REJECTING,
        "flaky.helo.test.example",
        "drop",
        "forward:timeout",
    ),
    Trouble(
        "away.helo.test.example",
        "127.0.1.23",
        STRICT_REJECTING,
        "23.1.0.127.in-addr.arpa",
        "servfail",
        "reverse:servfail",
    ),
    Trouble(
        "fwd24.helo.test.example",
        "127.0.1.24",
        RFC_REJECTING,
        "24.1.0.127.in-addr.arpa",
        "drop",
        "reverse:timeout",
    ),
]


@pytest.mark.parametrize("case", TROUBLE, ids=[f"{c.dns_log}:{c.helo}" for c in TROUBLE])
async def test_our_dns_trouble_never_fails_the_sender(dns: DnsServer, case: Trouble) -> None:
    """SERVFAIL or a timeout leaves the test undecided: verdict error, no score, no reply."""
    getattr(dns, case.how)(case.fault)
    r = await run(dns, case.helo, case.client, case.options)
    assert r.verdict is Verdict.ERROR
    assert r.score == 0
    assert r.action is None
    assert r.reason == ""
    assert r.log["dns"] == case.dns_log
    assert r.facts["helo.test"] == ""


async def test_lenient_asks_no_dns(dns: DnsServer) -> None:
    """The lenient set answers from the request alone."""
    await run(dns, "mail.helo.test.example", "127.0.1.20")
    assert not dns.queries


async def test_a_failing_cheap_test_saves_the_dns_questions(dns: DnsServer) -> None:
    """A name that is not a FQDN is not looked up."""
    await run(dns, "hostonly", "127.0.1.20", STRICT)
    assert not dns.queries


@pytest.mark.parametrize(
    ("options", "kind", "reply"),
    [
        (
            Options(reject=("forged_literal",)),
            ActionKind.REJECT,
            "550 5.7.1 HELO address literal [127.0.1.99] is not your address 127.0.1.2",
        ),
        (
            Options(reject=("forged_literal",), reject_code=450, reject_dsn="4.7.1"),
            ActionKind.DEFER,
            "450 4.7.1 HELO address literal [127.0.1.99] is not your address 127.0.1.2",
        ),
        (
            Options(reject=("forged_literal",), reject_code=554, reject_dsn="5.7.0"),
            ActionKind.REJECT,
            "554 5.7.0 HELO address literal [127.0.1.99] is not your address 127.0.1.2",
        ),
    ],
)
async def test_a_listed_test_answers_at_once(
    dns: DnsServer, options: Options, kind: ActionKind, reply: str
) -> None:
    """A test in ``reject`` forces the reply (4xx defers); its score still counts."""
    r = await run(dns, "[127.0.1.99]", "127.0.1.2", options)
    assert r.action is not None
    assert r.action.kind is kind
    assert r.action.reply == reply
    assert r.score == 5.0


async def test_tests_not_listed_only_score(dns: DnsServer) -> None:
    """A failing test that is not in ``reject`` forces nothing."""
    r = await run(dns, "[127.0.1.99]", "127.0.1.2", Options(reject=("plain_ip",)))
    assert r.verdict is Verdict.FAIL
    assert r.action is None


async def test_skipped_tests_do_not_run(dns: DnsServer) -> None:
    """``skip_tests`` takes single tests out of the set."""
    r = await run(dns, "localhost", "127.0.1.2", Options(skip_tests=("localhost",)))
    assert r.verdict is Verdict.PASS


async def test_scores_are_options(dns: DnsServer) -> None:
    """Each test's score comes from ``[checks.helo.scores]``."""
    r = await run(dns, "localhost", "127.0.1.2", Options(scores=Scores(localhost=7.5)))
    assert r.score == 7.5


async def test_a_hostname_without_a_dot_is_not_our_name(dns: DnsServer) -> None:
    """``[mxward] hostname`` only counts when it is a FQDN: "localhost" stays the localhost test."""
    check = HeloCheck(LENIENT, services(dns, hostname="localhost"))
    tx = Transaction(
        stage=Stage.HELO, client_address="127.0.1.2", client_ip=parse_ip("127.0.1.2"), helo="localhost"
    )
    r = await check.check(Stage.HELO, tx)
    assert r.log["test"] == "localhost"


@pytest.mark.parametrize(
    ("options", "helo", "header"),
    [
        (LENIENT, "mail.helo.test.example", ""),
        (Options(add_header=True), "mail.helo.test.example", "X-HELO: mail.helo.test.example"),
        (Options(add_header=True), "[127.0.1.99]", "X-HELO: [127.0.1.99]"),
        (Options(add_header=True), "m\u00e4il.example", "X-HELO: m?il.example"),
        (Options(add_header=True), "", ""),
    ],
)
async def test_the_x_helo_header(dns: DnsServer, options: Options, helo: str, header: str) -> None:
    """X-HELO is off by default; when on it carries the name, in printable ASCII."""
    r = await run(dns, helo, "127.0.1.2", options)
    assert r.header == header


async def test_a_request_without_client_address_is_skipped(dns: DnsServer) -> None:
    """Nothing to compare with: skip."""
    check = HeloCheck(STRICT, services(dns))
    r = await check.check(Stage.HELO, Transaction(stage=Stage.HELO, helo="mail.example"))
    assert r.verdict is Verdict.SKIP


# ---------------------------------------------------------------------------------------------
# Configuration


def test_the_toml_shapes_load() -> None:
    """bad_names is an array of tables, scores a table, test names are checked."""
    options = build_settings(
        Options,
        {
            "policy": "strict",
            "reject": ["forged_literal", "bad_name"],
            "bad_names": [{"pattern": "yahoo.com"}, {"pattern": "!/\\./", "reason": "No dot in {helo}"}],
            "scores": {"plain_ip": 4.5},
        },
        source="mxward.toml",
        table="checks.helo",
    )
    assert options.bad_names[1] == BadName(pattern="!/\\./", reason="No dot in {helo}")
    assert options.scores.plain_ip == 4.5
    assert options.scores.localhost == 5.0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"policy": "paranoid"}, "policy"),
        ({"reject": ["forged"]}, "reject"),
        ({"skip_tests": ["dns"]}, "skip_tests"),
        ({"reject_code": 450}, "reject_dsn"),
        ({"bad_names": [{"reason": "x"}]}, "needs a pattern"),
        ({"bad_names": [{"pattern": "/[/"}]}, "regular expression"),
        ({"bad_names": [{"pattern": "!yahoo.com"}]}, "negated"),
        ({"bad_names": [{"pattern": "x.example", "reason": "{ip}"}]}, "helo"),
        ({"bad_names": [{"pattern": "x.example", "colour": "red"}]}, "colour"),
        ({"own_names": ["mx"]}, "own_names"),
        ({"own_addresses": ["not-an-ip"]}, "not-an-ip"),
        ({"forward_ipv4_prefix": 4}, "forward_ipv4_prefix"),
        ({"reverse_match_labels": -1}, "reverse_match_labels"),
        ({"scores": {"unknown_test": 1}}, "unknown_test"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Impossible settings stop the start with a message naming the key."""
    with pytest.raises(ConfigError, match=message):
        build_settings(Options, table, source="mxward.toml", table="checks.helo")


# ---------------------------------------------------------------------------------------------
# Through the policy service: the decision and its log line


def pipeline(server: DnsServer, helo: Options, *, reject_score: float = 10.0) -> Pipeline:
    svc = services(server)
    built: list[Check[Any]] = [FcrdnsCheck(FcrdnsOptions(), svc), HeloCheck(helo, svc)]
    checks = [ActiveCheck(check=check, timeout=2.0) for check in built]
    return Pipeline(checks, PipelineSettings(reject_score=reject_score))


def decision_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("decision ")]


async def test_the_decision_line_carries_both_verdicts_and_the_header_goes_once(
    dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A good client passes both checks; X-HELO is prepended for the first recipient only."""
    caplog.set_level(logging.INFO, logger="mxward.policyd")
    service = PolicyService(pipeline(dns, Options(policy="strict", add_header=True)))
    attrs = request(
        client_address="127.0.1.20",
        client_name="mail.helo.test.example",
        reverse_client_name="mail.helo.test.example",
        helo_name="mail.helo.test.example",
        instance="h2.1",
    )
    assert await service.handle(attrs) == "PREPEND X-HELO: mail.helo.test.example"
    assert await service.handle({**attrs, "recipient": "carol@example.com"}) == "DUNNO"
    first = decision_lines(caplog)[0]
    assert "score=-2" in first
    assert "fcrdns:pass(-1," in first
    assert "[iprev=pass name=mail.helo.test.example postfix=agree]" in first
    assert "helo:pass(-1," in first
    assert "[fwd=yes rev=yes]" in first


async def test_a_forced_helo_reject_is_logged_with_the_fcrdns_verdict(
    dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged literal in ``reject`` answers 550 5.7.1; the line shows both checks' verdicts."""
    caplog.set_level(logging.INFO, logger="mxward.policyd")
    service = PolicyService(pipeline(dns, Options(reject=("forged_literal",))))
    attrs = request(
        client_address="127.0.1.30",
        reverse_client_name="dyn-30.heloisp.example",
        helo_name="[127.0.1.99]",
        instance="h2.2",
    )
    reply = await service.handle(attrs)
    assert reply == "550 5.7.1 HELO address literal [127.0.1.99] is not your address 127.0.1.30"
    (line,) = decision_lines(caplog)
    assert "action=550" in line
    assert "fcrdns:fail(+1," in line
    assert "[iprev=fail ptr=dyn-30.heloisp.example ptrs=1 postfix=agree]" in line
    assert "helo:fail(forced,+5," in line
    assert "[test=forged_literal]" in line


async def test_scores_of_both_checks_add_up_to_one_reply_with_both_reasons(
    dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """No PTR (+1) and a false localhost (+5) reach a threshold of 6 at RCPT: one 550 with both reasons."""
    caplog.set_level(logging.INFO, logger="mxward.policyd")
    service = PolicyService(pipeline(dns, Options(), reject_score=6.0))
    reply = await service.handle(request(client_address="127.0.1.6", helo_name="localhost", instance="h2.3"))
    assert reply == (
        "550 5.7.1 Client address 127.0.1.6 has no reverse DNS; "
        "You are not localhost: localhost is only accepted from this host"
    )
    (line,) = decision_lines(caplog)
    assert "score=6" in line
    assert "fcrdns:fail(+1," in line
    assert "helo:fail(+5," in line


async def test_dns_trouble_lets_the_mail_through(dns: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    """With the client's PTR and the HELO name failing on our side, both checks log errors and DUNNO."""
    caplog.set_level(logging.INFO, logger="mxward.policyd")
    dns.servfail("23.1.0.127.in-addr.arpa")
    dns.servfail("away.helo.test.example")
    service = PolicyService(
        pipeline(dns, Options(policy="strict", reject=("no_matching_dns",)), reject_score=0.5)
    )
    reply = await service.handle(request(client_address="127.0.1.23", helo_name="away.helo.test.example"))
    assert reply == "DUNNO"
    (line,) = decision_lines(caplog)
    assert "fcrdns:error(" in line
    assert "iprev=temperror dns=ptr:servfail" in line
    assert "helo:error(" in line

"""spf: pyspf's evaluation with its DNS answered by our resolver, against the test DNS server."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import spf  # type: ignore[import-untyped]
from support.dns_fixtures import DNS_DATA
from support.dnsserver import DnsServer

from mxward.policyd.checks import spf as spf_module
from mxward.policyd.checks.spf import Evaluation, Options, SpfCheck, spf_domain
from mxward.policyd.service import PolicyService
from mxward.shared.clock import SystemClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Check, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateStore

SPF_ZONE = DNS_DATA / "spf.zone"
D = "spf.test.example"

Factory = Callable[..., SpfCheck]
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")


@pytest.fixture
async def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add_zone(SPF_ZONE)
    return dns_server


@pytest.fixture
async def make(dns: DnsServer) -> AsyncIterator[Factory]:
    """Build SpfCheck instances on the test DNS server; they are closed after the test."""
    made: list[SpfCheck] = []

    def factory(*, lifetime: float = 3.0, hostname: str = "mx.test.example", **options: Any) -> SpfCheck:
        resolver = Resolver(
            DnsSettings(nameservers=(dns.nameserver,), timeout=min(1.0, lifetime), lifetime=lifetime)
        )
        services = Services(
            dns=resolver, state=cast("StateStore", None), clock=SystemClock(), hostname=hostname
        )
        check = SpfCheck(Options(**options), services)
        made.append(check)
        return check

    yield factory
    for check in made:
        await check.aclose()


def tx(
    client: str = "127.0.2.1", sender: str = f"alice@pass.{D}", helo: str = "client.test.example"
) -> Transaction:
    return Transaction(
        stage=Stage.MAIL,
        client_address=client,
        client_ip=parse_ip(client),
        sender=sender,
        helo=helo,
        instance="i1",
    )


async def run(check: SpfCheck, t: Transaction) -> Result:
    return await check.check(Stage.MAIL, t)


# ------------------------------------------------------------------------------------------
# every result, every mechanism


@pytest.mark.parametrize(
    ("sender", "client", "expected"),
    [
        (f"alice@pass.{D}", "127.0.2.1", "pass"),
        (f"alice@pass.{D}", "127.0.2.99", "fail"),
        (f"alice@softfail.{D}", "127.0.2.99", "softfail"),
        (f"alice@neutral.{D}", "127.0.2.99", "neutral"),
        (f"alice@none.{D}", "127.0.2.1", "none"),  # TXT records, none of them SPF
        (f"alice@nxdomain.{D}", "127.0.2.1", "none"),  # no such domain
        ("alice@localhost", "127.0.2.1", "none"),  # not a multi-label domain: no lookup
        (f"alice@nomail.{D}", "127.0.2.1", "fail"),  # v=spf1 -all
        (f"alice@syntax.{D}", "127.0.2.1", "permerror"),
        (f"alice@unknown-mech.{D}", "127.0.2.1", "permerror"),
        (f"alice@two-records.{D}", "127.0.2.1", "permerror"),
        (f"alice@toomany.{D}", "127.0.2.1", "permerror"),  # 11 DNS mechanisms
        (f"alice@ten-lookups.{D}", "127.0.2.1", "pass"),  # 10 are allowed
        (f"alice@void.{D}", "127.0.2.1", "permerror"),  # 3 void lookups
        (f"alice@void-ok.{D}", "127.0.2.1", "pass"),  # 2 are allowed
        (f"alice@redirect-none.{D}", "127.0.2.1", "permerror"),  # redirect to no record
        (f"alice@include.{D}", "127.0.2.2", "pass"),
        (f"alice@include.{D}", "127.0.2.99", "fail"),
        (f"alice@redirect.{D}", "127.0.2.1", "pass"),
        (f"alice@redirect.{D}", "127.0.2.99", "fail"),
        (f"alice@a.{D}", "127.0.2.3", "pass"),
        (f"alice@a.{D}", "127.0.2.99", "fail"),
        (f"alice@a-cidr.{D}", "127.0.2.2", "pass"),  # a:.../30
        (f"alice@a-cidr.{D}", "127.0.2.5", "fail"),
        (f"alice@mx.{D}", "127.0.2.4", "pass"),
        (f"alice@mx.{D}", "127.0.2.99", "fail"),
        (f"alice@ip6.{D}", "2001:db8:2::5", "pass"),
        (f"alice@ip6.{D}", "2001:db8:3::1", "fail"),
        (f"alice@pass.{D}", "2001:db8:2::5", "fail"),  # ip4 never matches an IPv6 client
        (f"alice@pass.{D}", "::ffff:127.0.2.1", "pass"),  # IPv4-mapped is IPv4
        (f"alice@exists.{D}", "127.0.2.5", "pass"),  # exists:%{i}._ip...
        (f"alice@exists.{D}", "127.0.2.99", "fail"),
        (f"dave@macro.{D}", "127.0.2.6", "pass"),  # exists:%{ir}.%{v}._spf.%{d}
        (f"carol@macro.{D}", "127.0.2.99", "pass"),  # exists:%{l}._user.%{d}
        (f"dave@macro.{D}", "127.0.2.99", "fail"),
        (f"alice@ptr.{D}", "127.0.2.7", "pass"),  # forward-confirmed PTR under the domain
        (f"alice@ptr.{D}", "127.0.2.99", "fail"),
        ("alice@PASS.SPF.Test.Example", "127.0.2.1", "pass"),  # domains are case-insensitive
    ],
)
async def test_results_for_every_mechanism(make: Factory, sender: str, client: str, expected: str) -> None:
    """Each test domain gives the RFC 7208 result for the client, with the facts to match."""
    r = await run(make(header_type="none"), tx(client, sender))
    assert r.facts["spf.result"] == expected, r.log
    assert r.facts["spf.identity"] == "mailfrom"
    assert r.facts["spf.domain"] == sender.rpartition("@")[2].lower()
    assert ("spf.pass_domain" in r.facts) is (expected == "pass")
    verdicts = {"pass": Verdict.PASS, "none": Verdict.SKIP, "neutral": Verdict.SKIP}
    assert r.verdict is verdicts.get(expected, Verdict.FAIL)


@pytest.mark.parametrize(
    ("fault", "sender", "lookup_time", "lifetime", "problem"),
    [
        ("servfail", f"a@broken.{D}", 8.0, 3.0, "servfail"),
        ("servfail", f"a@include-broken.{D}", 8.0, 3.0, "servfail"),  # inside an include
        ("drop", f"a@slow.{D}", 8.0, 0.3, "timeout"),  # our resolver gives up
        ("drop", f"a@slow.{D}", 0.3, 5.0, "in time"),  # the evaluation's budget runs out
    ],
)
async def test_dns_trouble_is_a_temperror_that_costs_nothing(
    make: Factory,
    dns: DnsServer,
    *,
    fault: str,
    sender: str,
    lookup_time: float,
    lifetime: float,
    problem: str,
) -> None:
    """SERVFAIL or a timeout: temperror, verdict ERROR, score 0, no forced reply, mail accepted."""
    getattr(dns, fault)(("broken." if "broken" in sender else "slow.") + D)
    check = make(lookup_time=lookup_time, lifetime=lifetime)
    started = time.monotonic()
    r = await run(check, tx("127.0.2.1", sender))
    assert time.monotonic() - started < 4
    assert r.facts["spf.result"] == "temperror"
    assert r.verdict is Verdict.ERROR
    assert r.score == 0 and r.action is None and r.reason == ""
    assert problem in str(r.log["problem"]).lower()
    assert r.header.startswith("Received-SPF: temperror (")


# ------------------------------------------------------------------------------------------
# actions and scores


def evaluation(result: str, domain: str = f"example.{D}") -> Evaluation:
    return Evaluation(result=result, identity="mailfrom", domain=domain)


@pytest.mark.parametrize(
    ("result", "options", "kind", "code", "dsn", "score"),
    [
        ("pass", {}, None, 0, "", -1.0),
        ("pass", {"pass_score": -3.0}, None, 0, "", -3.0),
        ("fail", {}, ActionKind.REJECT, 550, "5.7.23", 5.0),
        ("fail", {"fail_action": "defer"}, ActionKind.DEFER_IF_PERMIT, 450, "4.7.23", 5.0),
        ("fail", {"fail_action": "score", "fail_score": 7.0}, None, 0, "", 7.0),
        ("softfail", {}, None, 0, "", 2.0),
        ("softfail", {"softfail_action": "reject"}, ActionKind.REJECT, 550, "5.7.23", 2.0),
        ("softfail", {"softfail_action": "defer"}, ActionKind.DEFER_IF_PERMIT, 450, "4.7.23", 2.0),
        ("neutral", {}, None, 0, "", 0.5),
        ("neutral", {"neutral_action": "reject"}, ActionKind.REJECT, 550, "5.7.23", 0.5),
        ("none", {}, None, 0, "", 0.5),
        ("none", {"none_action": "defer", "none_score": 0.0}, ActionKind.DEFER_IF_PERMIT, 450, "4.7.23", 0.0),
        ("permerror", {}, None, 0, "", 0.0),
        ("permerror", {"permerror_action": "reject"}, ActionKind.REJECT, 550, "5.7.24", 0.0),
        ("permerror", {"permerror_action": "defer"}, ActionKind.DEFER_IF_PERMIT, 450, "4.7.24", 0.0),
        ("temperror", {}, None, 0, "", 0.0),
        ("temperror", {"temperror_action": "defer"}, ActionKind.DEFER_IF_PERMIT, 450, "4.7.24", 0.0),
    ],
)
async def test_each_result_maps_to_its_configured_action_and_score(
    make: Factory,
    *,
    result: str,
    options: dict[str, Any],
    kind: ActionKind | None,
    code: int,
    dsn: str,
    score: float,
) -> None:
    """Actions use RFC 7372 codes: 5.7.23 failed, 5.7.24 permerror, 4.7.24 temporary."""
    r = make(**options).report(evaluation(result), tx("127.0.2.99"))
    assert r.score == score
    if kind is None:
        assert r.action is None
    else:
        assert r.action is not None
        assert (r.action.kind, r.action.code, r.action.dsn) == (kind, code, dsn)
        assert r.action.text == r.reason
        assert r.reason.startswith(f"SPF {result}: ")
    assert bool(r.reason) is (kind is not None or score > 0)


async def test_an_spf_fail_is_rejected_with_550_5_7_23_and_a_reason(make: Factory) -> None:
    """A -all domain and a stranger: 550 5.7.23 with a sentence naming domain and client."""
    r = await run(make(), tx("127.0.2.99", f"mallory@pass.{D}"))
    assert r.action is not None and r.action.reply == (
        f"550 5.7.23 SPF fail: domain of pass.{D} does not designate 127.0.2.99 as permitted sender"
    )


async def test_the_domains_explanation_is_quoted_as_the_domains(make: Factory) -> None:
    """exp= text, macros expanded, is introduced as coming from the domain (RFC 7208 6.2)."""
    r = await run(make(), tx("127.0.2.99", f"bob@explained.{D}"))
    assert r.action is not None
    assert r.action.text == (
        f"SPF fail: The domain explained.{D} explains: "
        f"127.0.2.99 is not one of explained.{D}'s designated mail servers"
    )


async def test_reply_text_placeholders_are_filled(make: Factory) -> None:
    """reply_text may use result, domain, identity, client, sender and explanation."""
    check = make(reply_text="{identity} {result} {domain} {client} {sender}")
    r = await run(check, tx("127.0.2.99", f"mallory@pass.{D}"))
    assert r.reason == f"mailfrom fail pass.{D} 127.0.2.99 mallory@pass.{D}"


@pytest.mark.parametrize(
    ("sender", "client", "result", "rejected"),
    [
        (f"a@softfail.{D}", "127.0.2.99", "softfail", True),
        (f"a@neutral.{D}", "127.0.2.99", "neutral", True),
        (f"a@sub.neutral.{D}", "127.0.2.99", "none", True),  # subdomains count
        (f"a@syntax.{D}", "127.0.2.1", "permerror", True),
        (f"a@pass.{D}", "127.0.2.1", "pass", False),
        (f"a@mx.{D}", "127.0.2.99", "fail", True),  # fail as always
        (f"a@include-broken.{D}", "127.0.2.1", "temperror", False),  # never for our DNS trouble
    ],
)
async def test_reject_not_pass_domains_treat_not_pass_like_fail(
    make: Factory, dns: DnsServer, *, sender: str, client: str, result: str, rejected: bool
) -> None:
    """For listed sender domains every result but pass and temperror is handled like fail."""
    dns.servfail(f"broken.{D}")
    domains = [f"softfail.{D}", f"neutral.{D}", f"syntax.{D}", f"pass.{D}", f"include-broken.{D}"]
    r = await run(make(reject_not_pass_domains=domains), tx(client, sender))
    assert r.facts["spf.result"] == result
    assert (r.action is not None and r.action.dsn.startswith("5.7.2")) is rejected


# ------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize(
    ("check_helo", "sender", "helo", "client", "result", "identity", "domain"),
    [
        ("null-sender", "", f"helo.{D}", "127.0.2.8", "pass", "helo", f"helo.{D}"),
        ("null-sender", "", f"helo.{D}", "127.0.2.99", "fail", "helo", f"helo.{D}"),
        ("null-sender", "", "[127.0.2.8]", "127.0.2.8", "none", "helo", "[127.0.2.8]"),  # address literal
        ("null-sender", "", "", "127.0.2.8", "none", "helo", ""),
        ("null-sender", f"a@pass.{D}", f"helo.{D}", "127.0.2.1", "pass", "mailfrom", f"pass.{D}"),
        ("always", f"a@pass.{D}", f"helo.{D}", "127.0.2.1", "fail", "helo", f"helo.{D}"),  # HELO fail decides
        ("always", f"a@softfail.{D}", f"helo.{D}", "127.0.2.8", "softfail", "mailfrom", f"softfail.{D}"),
        ("always", f"a@pass.{D}", "client", "127.0.2.1", "pass", "mailfrom", f"pass.{D}"),  # HELO none
        ("always", "", f"helo.{D}", "127.0.2.8", "pass", "helo", f"helo.{D}"),
        ("null-sender", "no-domain", f"helo.{D}", "127.0.2.8", "none", "mailfrom", ""),
    ],
)
async def test_identities_mailfrom_and_helo(
    make: Factory,
    *,
    check_helo: str,
    sender: str,
    helo: str,
    client: str,
    result: str,
    identity: str,
    domain: str,
) -> None:
    """The null sender is checked by HELO; check_helo = "always" lets a HELO fail decide."""
    r = await run(make(check_helo=check_helo), tx(client, sender, helo))
    assert (r.facts["spf.result"], r.facts["spf.identity"], r.facts["spf.domain"]) == (
        result,
        identity,
        domain,
    )


async def test_with_check_helo_always_the_helo_result_is_logged(make: Factory) -> None:
    """The MAIL FROM result counts, and the HELO result appears as log field helo."""
    r = await run(make(check_helo="always"), tx("127.0.2.8", f"a@softfail.{D}", f"helo.{D}"))
    assert r.log["helo"] == "pass" and r.log["result"] == "softfail"


# ------------------------------------------------------------------------------------------
# who is not checked


async def test_skip_networks_are_not_checked(make: Factory, dns: DnsServer) -> None:
    """A client in skip_networks: SKIP, no facts, no header, not one DNS question."""
    dns.reset_queries()
    r = await run(make(skip_networks=["127.0.2.96/28"]), tx("127.0.2.99", f"a@pass.{D}"))
    assert r.verdict is Verdict.SKIP and r.log == {"skipped": "network"}
    assert not r.facts and not r.header and r.action is None
    assert dns.queries == {}


@pytest.mark.parametrize(("client", "skipped"), [("127.0.2.20", True), ("127.0.2.99", False)])
async def test_a_client_passing_for_an_allow_domain_is_not_checked(
    make: Factory, client: str, skipped: bool
) -> None:
    """allow_domains: the forwarder's own SPF vouches for the client; others are checked."""
    r = await run(make(allow_domains=[f"forwarder.{D}"]), tx(client, f"a@pass.{D}"))
    if skipped:
        assert r.verdict is Verdict.SKIP and r.log["skipped"] == "allow_domains" and not r.header
    else:
        assert r.facts["spf.result"] == "fail"


async def test_no_client_address_is_a_skip(make: Factory) -> None:
    r = await run(make(), Transaction(stage=Stage.MAIL, sender=f"a@pass.{D}"))
    assert r.verdict is Verdict.SKIP and not r.facts


# ------------------------------------------------------------------------------------------
# headers


async def test_received_spf_header_follows_rfc_7208_9_1(make: Factory) -> None:
    """Received-SPF: result (comment) client-ip; envelope-from; helo; receiver; identity; mechanism."""
    r = await run(make(), tx("127.0.2.1", f"alice@pass.{D}", "client.test.example"))
    assert r.header == (
        f"Received-SPF: pass (mx.test.example: domain of pass.{D} designates 127.0.2.1 as permitted "
        f'sender) client-ip=127.0.2.1; envelope-from="alice@pass.{D}"; helo=client.test.example; '
        'receiver=mx.test.example; identity=mailfrom; mechanism="ip4:127.0.2.1"'
    )


async def test_received_spf_for_the_null_sender_has_no_envelope_from(make: Factory) -> None:
    r = await run(make(), tx("127.0.2.8", "", f"helo.{D}"))
    assert r.header.startswith(f"Received-SPF: pass (mx.test.example: domain of helo.{D} designates ")
    assert "envelope-from" not in r.header and "identity=helo" in r.header


async def test_received_spf_quotes_an_ipv6_client_and_names_the_problem(make: Factory) -> None:
    r = await run(make(), tx("2001:db8:2::5", f"a@syntax.{D}"))
    assert r.header.startswith("Received-SPF: permerror (")
    assert 'client-ip="2001:db8:2::5";' in r.header
    assert 'problem="Invalid IP4 address: ip4:127.0.2.300"' in r.header


@pytest.mark.parametrize(
    ("sender", "helo", "client", "expected"),
    [
        (
            f"alice@pass.{D}",
            "client.test.example",
            "127.0.2.1",
            (
                f"Authentication-Results: mx.test.example; spf=pass (domain of pass.{D} designates "
                f"127.0.2.1 as permitted sender) smtp.mailfrom=pass.{D}"
            ),
        ),
        (
            "",
            f"helo.{D}",
            "127.0.2.99",
            (
                f"Authentication-Results: mx.test.example; spf=fail (domain of helo.{D} does not "
                f"designate 127.0.2.99 as permitted sender) smtp.helo=helo.{D}"
            ),
        ),
        (
            "",
            "[127.0.2.1]",
            "127.0.2.1",
            (
                "Authentication-Results: mx.test.example; spf=none (domain of [127.0.2.1] does not "
                'publish an SPF record) smtp.helo="[127.0.2.1]"'
            ),
        ),
    ],
)
async def test_authentication_results_header_follows_rfc_8601(
    make: Factory, sender: str, helo: str, client: str, expected: str
) -> None:
    r = await run(make(header_type="authentication-results"), tx(client, sender, helo))
    assert r.header == expected


async def test_authserv_id_option_and_header_type_none(make: Factory) -> None:
    ar = await run(make(header_type="authentication-results", authserv_id="example.org"), tx())
    assert ar.header.startswith("Authentication-Results: example.org; spf=pass ")
    none = await run(make(header_type="none"), tx())
    assert none.header == "" and none.facts["spf.result"] == "pass"


@pytest.mark.parametrize(
    ("sender", "helo"),
    [
        ('"evil\r\nX-Injected: yes"@none.spf.test.example', "bad\nX-Injected: yes"),
        ('we"ird\\(x)@none.spf.test.example', 'h(e)l"o\\'),
        ("jos\u00e9@none.spf.test.example", "\u00fcber.example"),
        ("a" * 600 + "@none.spf.test.example", "b" * 600),
    ],
)
async def test_client_supplied_text_cannot_break_the_header(make: Factory, sender: str, helo: str) -> None:
    """No CR/LF or control characters, ASCII only, bounded, and quoted values stay quoted."""
    for header_type in ("received-spf", "authentication-results"):
        r = await run(make(header_type=header_type), tx("127.0.2.1", sender, helo))
        header = r.header
        assert header and header.isascii() and header.isprintable(), header
        assert "X-Injected: yes" not in header.split(";")[0] or '"' in header
        assert len(header) < 998
        # Take out the quoted strings, then the one comment: no quote or parenthesis may remain.
        rest = QUOTED.sub("", header)
        assert len(COMMENT.findall(rest)) == 1, header
        assert not set(COMMENT.sub("", rest)) & set('()"\\'), header


async def test_the_domains_explanation_is_one_bounded_printable_line(make: Factory) -> None:
    """exp= text with control characters and huge length becomes one bounded line."""
    r = await run(make(), tx("127.0.2.99", f"a@exp-long.{D}"))
    assert r.action is not None
    text = r.action.text
    assert text.isprintable() and "\n" not in text and len(text) <= 400
    assert "explains: line one line two" in text


# ------------------------------------------------------------------------------------------
# DNS through our resolver, without blocking the event loop


async def test_dns_goes_through_the_resolver_and_its_cache(make: Factory, dns: DnsServer) -> None:
    """The same evaluation twice: the second asks the DNS server nothing (the resolver's cache)."""
    check = make()
    dns.reset_queries()
    first = await run(check, tx("127.0.2.4", f"a@mx.{D}"))
    asked = dns.queries
    assert asked[(f"mx.{D}", "TXT")] == 1 and asked[(f"mx.{D}", "MX")] == 1
    assert asked[(f"mail.mx.{D}", "A")] == 1
    second = await run(check, tx("127.0.2.4", f"a@mx.{D}"))
    assert dns.queries == asked
    assert first.facts == second.facts and first.facts["spf.result"] == "pass"


async def test_the_event_loop_keeps_serving_while_an_evaluation_waits_on_slow_dns(
    make: Factory, dns: DnsServer
) -> None:
    """While one evaluation waits 0.6 s for DNS, the loop ticks and another evaluation completes.

    The DNS server runs in the same event loop: were the loop blocked, nothing would answer.
    """
    dns.delay(f"slow.{D}", 0.6)
    check = make()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    slow = asyncio.create_task(run(check, tx("127.0.2.1", f"a@slow.{D}")))
    await asyncio.sleep(0.1)
    fast = await run(check, tx("127.0.2.1", f"a@pass.{D}"))
    assert fast.facts["spf.result"] == "pass"
    assert not slow.done()
    slow_result = await slow
    stop.set()
    await beat
    assert slow_result.facts["spf.result"] == "pass"
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.3f}s"


async def test_a_cancelled_evaluation_leaves_nothing_behind(make: Factory, dns: DnsServer) -> None:
    """Cut off by the pipeline's timeout, the next evaluation runs at once and normally."""
    dns.drop(f"slow.{D}")
    check = make(lifetime=5.0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await run(check, tx("127.0.2.1", f"a@slow.{D}"))
    started = time.monotonic()
    r = await run(check, tx("127.0.2.1", f"a@pass.{D}"))
    assert r.facts["spf.result"] == "pass"
    assert time.monotonic() - started < 1.0


async def test_each_question_goes_to_the_network_once_and_no_thread_is_used(
    make: Factory, dns: DnsServer
) -> None:
    """A cold include chain takes several passes, but every name is asked of DNS only once,
    and pyspf runs on the event loop's thread (no pool, no helper threads)."""
    check = make()
    threads = threading.active_count()
    dns.reset_queries()
    r = await run(check, tx("127.0.2.2", f"a@include.{D}"))
    assert r.facts["spf.result"] == "pass"
    asked = dns.queries
    assert asked and all(count == 1 for count in asked.values()), asked
    assert threading.active_count() == threads
    # Warm: nothing more is asked.
    dns.reset_queries()
    assert (await run(check, tx("127.0.2.2", f"a@include.{D}"))).facts["spf.result"] == "pass"
    assert sum(dns.queries.values()) == 0


async def test_concurrent_evaluations_each_get_their_own_answers(make: Factory) -> None:
    """Many evaluations at once: each one's DNS answers go to that evaluation."""
    check = make()
    cases = [
        (f"a@pass.{D}", "127.0.2.1", "pass"),
        (f"a@pass.{D}", "127.0.2.99", "fail"),
        (f"a@include.{D}", "127.0.2.2", "pass"),
        (f"a@mx.{D}", "127.0.2.4", "pass"),
        (f"a@softfail.{D}", "127.0.2.99", "softfail"),
        (f"a@void.{D}", "127.0.2.1", "permerror"),
    ] * 5
    results = await asyncio.gather(*(run(check, tx(client, sender)) for sender, client, _ in cases))
    assert [r.facts["spf.result"] for r in results] == [expected for _, _, expected in cases]


async def test_other_pyspf_users_in_the_process_keep_their_own_dns(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside an evaluation of ours, pyspf's DNS function is the one it had before."""
    make()  # installs the hook
    asked: list[tuple[str, str]] = []

    def other_dns(name: str, qtype: str, strict: object, timeout: float) -> list[Any]:
        asked.append((name, qtype))
        return [((name, qtype), (b"v=spf1 +all",))] if qtype == "TXT" else []

    monkeypatch.setattr(spf_module._HOOK, "_previous", other_dns)
    outcome: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcome.append(spf.check2(i="192.0.2.1", s="x@elsewhere.example", h="h.example"))
    )
    thread.start()
    thread.join(5)
    assert outcome == [("pass", "sender SPF authorized")]
    assert asked == [("elsewhere.example", "TXT")]


# ------------------------------------------------------------------------------------------
# once per message, through the policy service


async def test_three_recipients_one_evaluation_one_header(make: Factory, dns: DnsServer) -> None:
    """Through the service: SPF is evaluated once per message and Received-SPF prepended once."""
    check = make()
    service = PolicyService(
        Pipeline([ActiveCheck(cast("Check[object]", check), timeout=9.0)], PipelineSettings())
    )
    dns.reset_queries()
    answers = [
        await service.handle(
            {
                "request": "smtpd_access_policy",
                "protocol_state": "RCPT",
                "client_address": "127.0.2.1",
                "helo_name": "client.test.example",
                "sender": f"alice@pass.{D}",
                "recipient": rcpt,
                "instance": "abc.123",
            }
        )
        for rcpt in ("a@example.com", "b@example.com", "c@example.com")
    ]
    assert answers[0].startswith("PREPEND Received-SPF: pass (")
    assert answers[1:] == ["DUNNO", "DUNNO"]
    assert dns.queries[(f"pass.{D}", "TXT")] == 1


async def test_a_fail_through_the_service_is_550_5_7_23(make: Factory) -> None:
    service = PolicyService(
        Pipeline([ActiveCheck(cast("Check[object]", make()), timeout=9.0)], PipelineSettings())
    )
    answer = await service.handle(
        {
            "request": "smtpd_access_policy",
            "protocol_state": "RCPT",
            "client_address": "127.0.2.99",
            "helo_name": "client.test.example",
            "sender": f"mallory@pass.{D}",
            "recipient": "bob@example.com",
            "instance": "abc.124",
        }
    )
    assert answer.startswith("550 5.7.23 SPF fail: ")


# ------------------------------------------------------------------------------------------
# options and helpers


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reply_text": "SPF {verdict}"}, "unknown placeholder"),
        ({"reply_text": "SPF {result"}, "reply_text"),
        ({"lookup_time": 0.0}, "lookup_time"),
        ({"lookup_time": 120.0}, "lookup_time"),
        ({"authserv_id": "mx example"}, "authserv_id"),
        ({"allow_domains": ("not a domain",)}, "allow_domains"),
        ({"skip_networks": ("127.0.2.0/33",)}, "not an IP network"),
        ({"reject_not_pass_domains": ("/[/",)}, "regular expression"),
        ({"fail_score": float("inf")}, "fail_score"),
        ({"pass_score": float("nan")}, "pass_score"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        Options(**options)


def test_defaults_follow_spf_engine() -> None:
    """fail is rejected; permerror and temperror accepted; Received-SPF; nothing skipped."""
    o = Options()
    assert (o.fail_action, o.permerror_action, o.temperror_action) == ("reject", "score", "score")
    assert o.header_type == "received-spf" and o.skip_networks == () and o.pass_score < 0
    assert dataclasses.replace(o, fail_action="score").fail_action == "score"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("mail.example.com", "mail.example.com"),
        ("_spf.example.com", "_spf.example.com"),
        ("b\u00fccher.example", "xn--bcher-kva.example"),
        ("localhost", None),
        ("[192.0.2.1]", None),
        ("192.0.2.1", None),
        ("a..example", None),
        ("-bad.example", None),
        ("x" * 64 + ".example", None),
        ("", None),
    ],
)
def test_spf_domain_accepts_only_valid_multi_label_names(name: str, expected: str | None) -> None:
    """RFC 7208 4.3: malformed names and single labels are "none" without a lookup."""
    assert spf_domain(name) == expected


def test_ip_helpers_agree_with_pyspf() -> None:
    """pyspf sees IPv4-mapped clients as IPv4, as parse_ip does."""
    q = spf.query(i="::ffff:127.0.2.1", s="a@b.example", h="h.example")
    assert q.c == str(parse_ip("::ffff:127.0.2.1")) == str(ipaddress.ip_address("127.0.2.1"))

"""p0f check: facts from p0f's API, OS block/penalise rules, skips for every p0f trouble."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, cast

import pytest
from support.p0f_server import FakeHost, FakeP0f, RealP0f

from mxward.policyd.checks.p0f import Options, P0fCheck
from mxward.policyd.service import PolicyService
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Check, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

CLIENT = "192.0.2.7"
WINDOWS = FakeHost(os_name="Windows", os_flavor="7 or 8", link_type="Ethernet or modem", distance=9)
LINUX = FakeHost(os_name="Linux", os_flavor="3.11 and newer", link_type="DSL", distance=0, uptime_min=600)
UNKNOWN_OS = FakeHost(link_type="Ethernet or modem", distance=5)


def services() -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",))),
        state=StateStore(StateSettings(url="unix:///nonexistent/redis.sock")),
        clock=FrozenClock(),
    )


def make(path: object, **options: Any) -> P0fCheck:
    return P0fCheck(Options(socket=str(path), **options), services())


def tx(client: str = CLIENT) -> Transaction:
    return Transaction(stage=Stage.CONNECT, client_address=client, client_ip=ipaddress.ip_address(client))


async def run(check: P0fCheck, t: Transaction | None = None) -> Result:
    try:
        return await check.check(Stage.CONNECT, t or tx())
    finally:
        await check.aclose()


@pytest.mark.parametrize(
    ("host", "options", "expected"),
    [
        (LINUX, {}, (Verdict.PASS, 0.0, False)),
        (WINDOWS, {"block": ("Windows 7 or 8",)}, (Verdict.FAIL, 0.0, True)),  # exact genre
        (WINDOWS, {"block": ("windows 7 OR 8",)}, (Verdict.FAIL, 0.0, True)),  # case-insensitive
        (WINDOWS, {"block": ("Windows",)}, (Verdict.FAIL, 0.0, True)),  # OS name: every flavour
        (WINDOWS, {"block": ("Windows 7",)}, (Verdict.PASS, 0.0, False)),  # exact means exact
        (WINDOWS, {"block": ("/^win/",)}, (Verdict.FAIL, 0.0, True)),  # regex, case-insensitive
        (LINUX, {"block": ("/windows/",)}, (Verdict.PASS, 0.0, False)),  # qpsmtpd acceptance 2
        (WINDOWS, {"penalise": ("/windows/",)}, (Verdict.FAIL, 1.0, False)),  # smite_os
        (WINDOWS, {"penalise": ("Windows",), "penalise_score": 2.5}, (Verdict.FAIL, 2.5, False)),
        (WINDOWS, {"block": ("Windows",), "penalise": ("Windows",)}, (Verdict.FAIL, 0.0, True)),
        (LINUX, {"penalise": ("/windows/",)}, (Verdict.PASS, 0.0, False)),
        (UNKNOWN_OS, {"block": ("/.*/",), "penalise": ("/.*/",)}, (Verdict.PASS, 0.0, False)),
    ],
)
async def test_os_rules(
    fake_p0f: FakeP0f, host: FakeHost, options: dict[str, Any], expected: tuple[Verdict, float, bool]
) -> None:
    """Exact genre or OS name and /regex/ entries block or penalise; an unknown OS never matches."""
    fake_p0f.hosts[CLIENT] = host
    r = await run(make(fake_p0f.path, **options))
    assert (r.verdict, r.score, r.action is not None) == expected


async def test_a_block_is_a_550_with_the_genre_in_the_text(fake_p0f: FakeP0f) -> None:
    """qpsmtpd acceptance 1: a blocked genre gets a Postfix-style 550 5.7.1 reply."""
    fake_p0f.hosts[CLIENT] = WINDOWS
    r = await run(make(fake_p0f.path, block=("Windows 7 or 8",)))
    assert r.action is not None and r.action.kind is ActionKind.REJECT
    assert r.action.reply == "550 5.7.1 Mail from Windows 7 or 8 systems is not accepted here"
    custom = make(
        fake_p0f.path, block=("Windows",), block_code=554, block_dsn="5.7.0", block_text="OS {genre}"
    )
    r = await run(custom)
    assert r.action is not None and r.action.reply == "554 5.7.0 OS Windows 7 or 8"


@pytest.mark.parametrize(
    ("host", "facts"),
    [
        (
            WINDOWS,
            {
                "p0f.genre": "Windows 7 or 8",
                "p0f.os": "Windows",
                "p0f.flavor": "7 or 8",
                "p0f.link": "Ethernet or modem",
                "p0f.distance": 9,
            },
        ),
        (
            LINUX,
            {
                "p0f.genre": "Linux 3.11 and newer",
                "p0f.os": "Linux",
                "p0f.flavor": "3.11 and newer",
                "p0f.link": "DSL",
                "p0f.distance": 0,
                "p0f.uptime_min": 600,
            },
        ),
        (UNKNOWN_OS, {"p0f.link": "Ethernet or modem", "p0f.distance": 5}),
        (FakeHost(), {}),  # known host, nothing known about it: no facts at all
    ],
)
async def test_facts_carry_what_p0f_knows(fake_p0f: FakeP0f, host: FakeHost, facts: dict[str, Any]) -> None:
    """Genre, OS, flavour, link, distance and uptime; unknowns (-1, 0, "") are left out."""
    fake_p0f.hosts[CLIENT] = host
    r = await run(make(fake_p0f.path))
    assert dict(r.facts) == facts


@pytest.mark.parametrize(
    ("mode", "note"),
    [
        ("normal", "no match"),
        ("bad_magic", "bad reply"),
        ("bad_status", "bad reply"),
        ("short", "bad reply"),
        ("close", "bad reply"),
        ("silent", "p0f unavailable"),
    ],
)
async def test_p0f_trouble_is_a_skip_never_a_penalty(fake_p0f: FakeP0f, mode: str, note: str) -> None:
    """No match, garbage, a cut reply or silence: skip, score 0, no action, no facts."""
    fake_p0f.mode = mode
    if mode != "normal":
        fake_p0f.hosts[CLIENT] = WINDOWS
    r = await run(make(fake_p0f.path, block=("/./",), penalise=("/./",), query_timeout=0.2))
    assert (r.verdict, r.score, r.action, dict(r.facts)) == (Verdict.SKIP, 0.0, None, {})
    assert r.log["note"] == note


async def test_an_absent_socket_is_a_skip() -> None:
    """qpsmtpd acceptance 4: no p0f socket, the mail is accepted and no header is added."""
    r = await run(make("/nonexistent/p0f.sock", block=("/./",), add_header=True))
    assert (r.verdict, r.score, r.action, r.header) == (Verdict.SKIP, 0.0, None, "")
    assert r.log["note"] == "p0f unavailable" and "cannot connect" in str(r.log["error"])


async def test_no_client_address_is_a_skip(fake_p0f: FakeP0f) -> None:
    """A request without a parsable client address is not queried."""
    r = await run(make(fake_p0f.path), Transaction(stage=Stage.CONNECT, client_address="unknown"))
    assert r.verdict is Verdict.SKIP and fake_p0f.queries == []


async def test_ipv6_clients_are_queried_as_ipv6(fake_p0f: FakeP0f) -> None:
    """An IPv6 client is asked with address type 6 and found."""
    fake_p0f.hosts["2001:db8::25"] = LINUX
    r = await run(make(fake_p0f.path), tx("2001:db8::25"))
    assert r.verdict is Verdict.PASS and r.facts["p0f.os"] == "Linux"
    assert fake_p0f.queries[0][1] == 6


@pytest.mark.parametrize(
    ("host", "add_header", "header"),
    [
        (WINDOWS, False, ""),
        (WINDOWS, True, 'X-P0F: genre="Windows 7 or 8"; link="Ethernet or modem"'),
        (FakeHost(os_name="Linux"), True, "X-P0F: genre=Linux"),
        (FakeHost(), True, ""),  # nothing known: no empty header
        # p0f's strings are data: quotes, semicolons and control characters never pass.
        (FakeHost(os_name='Evil"; x=1\r\nBcc: a'), True, 'X-P0F: genre="Evil x=1Bcc: a"'),
    ],
)
async def test_the_optional_header_is_one_safe_line(
    fake_p0f: FakeP0f, host: FakeHost, add_header: bool, header: str
) -> None:
    """add_header (off by default) gives one X-P0F line with the known fields."""
    fake_p0f.hosts[CLIENT] = host
    r = await run(make(fake_p0f.path, add_header=add_header))
    assert r.header == header


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block": ("/[unclosed/",)}, "block: '/[unclosed/' is not a valid regular expression"),
        ({"penalise": ("",)}, "penalise: empty entry"),
        ({"block_code": 450}, "block_code must be a 5xx"),
        ({"block_dsn": "4.7.1"}, "block_dsn"),
        ({"block_text": "no {os}"}, "unknown placeholder"),
        ({"socket": ""}, "socket must name"),
        ({"query_timeout": 0.0}, "query_timeout"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    """Invalid rules, codes and texts are configuration errors, not runtime surprises."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Options(**options)


async def test_a_blocked_os_is_rejected_at_rcpt_through_the_policy_service(fake_p0f: FakeP0f) -> None:
    """With delay_reject, the connect-stage block is Postfix's reply to the first RCPT."""
    fake_p0f.hosts[CLIENT] = WINDOWS
    check = make(fake_p0f.path, block=("Windows",))
    service = PolicyService(
        Pipeline([ActiveCheck(check=cast("Check[object]", check), timeout=1.0)], PipelineSettings())
    )
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": CLIENT,
        "sender": "a@example.net",
        "recipient": "b@example.com",
        "instance": "p0f.1",
    }
    try:
        text, _, decision = await service.decide(attrs)
    finally:
        await check.aclose()
    assert text == "550 5.7.1 Mail from Windows 7 or 8 systems is not accepted here"
    assert decision.stage is Stage.RCPT


async def test_a_real_p0f_blocks_a_loopback_linux_client(real_p0f: RealP0f) -> None:
    """Against the real p0f: 127.0.4.3 connects, p0f says Linux, block = ["Linux"] rejects it."""
    await real_p0f.fingerprint("127.0.4.3")
    r = await run(make(real_p0f.socket, block=("Linux",), query_timeout=2.0), tx("127.0.4.3"))
    assert r.verdict is Verdict.FAIL and r.action is not None and r.action.code == 550
    assert r.facts["p0f.os"] == "Linux"
    unseen = await run(make(real_p0f.socket, block=("Linux",), query_timeout=2.0), tx("127.0.4.251"))
    assert (unseen.verdict, unseen.log["note"]) == (Verdict.SKIP, "no match")

"""DMARC aggregate reports: recording in Redis, building RFC 9990 reports, the XML schema, files.

Real Redis (support.redis_fixtures), the test DNS server with tests/data/dmarc/dmarc.zone, a
frozen clock, and every report validated against the schema of RFC 9990 Appendix A
(tests/data/dmarc/rfc9990.xsd) with xmlschema. Sending is in test_dmarcreports_send.py.
"""

from __future__ import annotations

import argparse
import calendar
import dataclasses
import gzip
import io
import re
import stat
from pathlib import Path
from typing import Any

import pytest
import xmlschema
from support.dnsserver import DnsServer

from mxward.contentfilter.dmarcreports import (
    XML_NAMESPACE,
    AggregateReport,
    PolicyPublished,
    Reporter,
    ReportSettings,
    ReportURI,
    Row,
    add_parser,
    evaluation_from_facts,
    organizational_domain,
    parse_dmarc_record,
    parse_report_uris,
    record_evaluation,
    run_command,
)
from mxward.contentfilter.message import Message
from mxward.shared.clock import FrozenClock
from mxward.shared.config import Config
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import LogValue, Services, Stage, Transaction
from mxward.shared.state import StateSettings, StateStore

DATA = Path(__file__).parents[1] / "data" / "dmarc"
SCHEMA = xmlschema.XMLSchema(DATA / "rfc9990.xsd")
DAY0 = calendar.timegm((2023, 11, 14, 0, 0, 0))  # a Tuesday, 00:00:00 UTC
HOUR = 3600
DAY = 86400
HOST = "mx.receiver.example"
SETTINGS = ReportSettings(org_name="Receiver Org", email="dmarc-reports@receiver.example")
MESSAGE = (
    b"From: Alice <alice@sender.example>\r\n"
    b"To: Bob <bob@receiver.example>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <20231114.1@sender.example>\r\n"
    b"\r\n"
    b"Hello Bob\r\n"
)
FACTS: dict[str, LogValue] = {
    "dmarc.result": "pass",
    "dmarc.from_domain": "sender.example",
    "dmarc.policy_domain": "sender.example",
    "dmarc.policy": "reject",
    "dmarc.disposition": "none",
    "dmarc.override": "",
    "dmarc.spf_aligned": True,
    "dmarc.dkim_aligned": True,
    "dmarc.rua": "mailto:dmarc@sender.example",
    "dmarc.mode": "9989",
    "spf.result": "pass",
    "spf.domain": "sender.example",
    "spf.identity": "mailfrom",
    "dkim.results": "other.example:s2:fail sender.example:sel1:pass",
}
FAILING: dict[str, LogValue] = FACTS | {
    "dmarc.result": "fail",
    "dmarc.disposition": "reject",
    "dmarc.spf_aligned": False,
    "dmarc.dkim_aligned": False,
    "spf.result": "fail",
    "spf.domain": "spoofer.example",
    "dkim.results": "",
}


def tx(
    client: str = "192.0.2.1",
    sender: str = "bounce@sender.example",
    queue_id: str = "4Bx9Kq1Zz3z9sT",
    recipients: tuple[str, ...] = ("bob@receiver.example",),
    message: bytes = MESSAGE,
) -> Transaction:
    return Transaction(
        stage=Stage.CONTENT,
        client_address=client,
        sender=sender,
        queue_id=queue_id,
        recipients=recipients,
        message=Message.parse(message),
    )


def validate(xml: bytes) -> None:
    """Fail the test with the validator's reason if ``xml`` is not a valid RFC 9990 report."""
    errors = [str(e.reason) for e in SCHEMA.iter_errors(io.BytesIO(xml))]
    assert not errors, errors


def decoded(xml: bytes) -> dict[str, Any]:
    """The report as a dict (xmlschema's decoding, which also validates)."""
    data = SCHEMA.to_dict(io.BytesIO(xml))
    assert isinstance(data, dict)
    return data


def records(xml: bytes) -> list[dict[str, Any]]:
    found = decoded(xml)["record"]
    assert isinstance(found, list)
    return found


@pytest.fixture
def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add_zone(DATA / "dmarc.zone")
    return dns_server


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(DAY0 + 10 * HOUR)


@pytest.fixture
def services(dns: DnsServer, state_store: StateStore, clock: FrozenClock) -> Services:
    settings = DnsSettings(nameservers=(dns.nameserver,), timeout=0.3, lifetime=0.6)
    return Services(dns=Resolver(settings, clock=clock), state=state_store, clock=clock, hostname=HOST)


async def record(
    services: Services,
    facts: dict[str, LogValue] | None = None,
    settings: ReportSettings = SETTINGS,
    **kw: Any,
) -> None:
    await record_evaluation(
        services.state,
        tx(**kw),
        FACTS if facts is None else facts,
        now=services.clock.now(),
        settings=settings,
    )


async def report_of(
    services: Services, domain: str = "sender.example", begin: int = DAY0, end: int = DAY0 + DAY
) -> AggregateReport:
    found = await Reporter(SETTINGS, services).report(domain, begin, end)
    assert found is not None
    return found


def files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def read(path: Path) -> bytes:
    return path.read_bytes()


async def keys(store: StateStore) -> list[str]:
    return sorted([k async for k in store.namespace("dmarcreport").scan()])


# --------------------------------------------------------------------------------------------
# Settings


def test_settings_defaults() -> None:
    """The defaults: daily reports kept a week, failure reports off."""
    settings = ReportSettings()
    assert settings.period == DAY
    assert settings.retention == 7 * DAY
    assert settings.failure_reports is False
    assert settings.address("mx1.example.net") == "postmaster@mx1.example.net"
    assert settings.submitter("mx1.example.net") == "mx1.example.net"
    assert SETTINGS.submitter(HOST) == "receiver.example"
    assert SETTINGS.organization(HOST) == "Receiver Org"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"period": 5 * HOUR}, "period must be a whole number of hours that divides 24"),
        ({"period": 1800.0}, "period must be a whole number of hours"),
        ({"period": 2 * DAY}, "period must be a whole number of hours"),
        ({"retention": HOUR}, "retention must be at least 1d"),
        ({"email": "not an address"}, "email 'not an address' is not an address"),
        ({"email": "a@b@c"}, "is not an address"),
        ({"org_name": "two\nlines"}, "org_name must be one printable line"),
        ({"failure_limit": -1}, "failure_limit must be between 0 and 1000"),
        ({"max_size": 100}, "max_size must be at least 4096 bytes"),
    ],
)
def test_settings_refuse_bad_values(kwargs: dict[str, Any], message: str) -> None:
    """Each bad setting is refused with a message naming it."""
    with pytest.raises(ValueError, match=re.escape(message)):
        ReportSettings(**kwargs)


@pytest.mark.parametrize("hours", [1, 2, 3, 4, 6, 8, 12, 24])
def test_every_period_dividing_a_day_is_accepted(hours: int) -> None:
    """Periods of whole hours that divide 24 are valid."""
    assert ReportSettings(period=hours * HOUR).period == hours * HOUR


def test_settings_load_from_toml_table() -> None:
    """The config loader builds the table from TOML values, durations included."""
    from mxward.shared.config import ConfigError, build_settings

    settings = build_settings(
        ReportSettings,
        {"period": "6h", "retention": "14d", "email": "rua@example.org", "failure_reports": True},
        source="test.toml",
        table="dmarc_reports",
    )
    assert (settings.period, settings.retention, settings.failure_reports) == (6 * HOUR, 14 * DAY, True)
    with pytest.raises(ConfigError, match="period must be a whole number"):
        build_settings(ReportSettings, {"period": "7h"}, source="test.toml", table="dmarc_reports")
    with pytest.raises(ConfigError, match="unknown key 'periode'"):
        build_settings(ReportSettings, {"periode": "1d"}, source="test.toml", table="dmarc_reports")


# --------------------------------------------------------------------------------------------
# DMARC records, URIs, organizational domains


def test_dmarc_record_tags() -> None:
    """Tags are parsed with v=DMARC1 first; anything else is not a DMARC record."""
    assert parse_dmarc_record("v=DMARC1; p=reject; RUA=mailto:a@b.example;") == {
        "v": "DMARC1",
        "p": "reject",
        "rua": "mailto:a@b.example",
    }
    assert parse_dmarc_record("v = DMARC1 ;p=none") == {"v": "DMARC1", "p": "none"}
    assert parse_dmarc_record("p=none; v=DMARC1") is None
    assert parse_dmarc_record("v=dmarc1; p=none") is None
    assert parse_dmarc_record("v=spf1 -all") is None
    assert parse_dmarc_record("") is None


def test_report_uris() -> None:
    """mailto URIs with size limits are used; other schemes and bad addresses are set aside."""
    uris, ignored = parse_report_uris(
        "mailto:a@one.example!10m, mailto:b@two.example!512, mailto:c%2Cd@three.example?subject=x,"
        " https://reports.example/x, mailto:bad\r\n@x.example, mailto:e@four.example!10q,"
        " MAILTO:f@Five.Example!1k"
    )
    assert uris == [
        ReportURI("a@one.example", 10 << 20),
        ReportURI("b@two.example", 512),
        ReportURI("f@five.example", 1024),
    ]
    assert "https://reports.example/x" in ignored
    assert "mailto:e@four.example!10q" in ignored
    assert all("\r" not in u.address and "\n" not in u.address for u in uris)


def test_addresses_that_smtp_cannot_carry_safely_are_refused() -> None:
    """A comma, space or non-ASCII character in an address keeps it out of the envelope."""
    uris, ignored = parse_report_uris("mailto:c%2Cd@three.example,mailto:x%20y@a.example,mailto:ü@a.example")
    assert uris == []
    assert len(ignored) == 3


@pytest.mark.parametrize(
    ("domain", "organizational"),
    [
        ("sender.example", "sender.example"),
        ("mail.sender.example", "sender.example"),
        ("sub.sender.example", "sender.example"),
        ("x.sub.sender.example", "sender.example"),
        ("nodmarc.example", "nodmarc.example"),
        ("a.y.psd.example", "y.psd.example"),
        ("a.org.psd.example", "org.psd.example"),
        ("a.b.c.d.e.f.deep.example", "deep.example"),
        ("host.twice.example", "host.twice.example"),
    ],
)
async def test_organizational_domain_by_tree_walk(
    services: Services, domain: str, organizational: str
) -> None:
    """RFC 9989 section 4.10: fewest labels with a record, psd=y and psd=n, the 5-query shortcut."""
    assert await organizational_domain(services.dns, domain) == organizational


async def test_tree_walk_is_the_dmarc_checks_walk(services: Services, dns: DnsServer) -> None:
    """The destination check walks as the dmarc check does (RFC 9989 section 4.10): a name of
    eight labels costs eight questions, itself and then from seven labels up."""
    from mxward.contentfilter.dmarclib import walk_names

    await organizational_domain(services.dns, "a.b.c.d.e.f.deep.example")
    asked = sorted(name for name, kind in dns.queries if kind == "TXT")
    assert asked == sorted(
        [
            "_dmarc.a.b.c.d.e.f.deep.example",
            "_dmarc.b.c.d.e.f.deep.example",
            "_dmarc.c.d.e.f.deep.example",
            "_dmarc.d.e.f.deep.example",
            "_dmarc.e.f.deep.example",
            "_dmarc.f.deep.example",
            "_dmarc.deep.example",
            "_dmarc.example",
        ]
    )
    assert asked == sorted(f"_dmarc.{name}" for name in walk_names("a.b.c.d.e.f.deep.example"))


# --------------------------------------------------------------------------------------------
# Recording


def test_evaluation_of_a_passing_message() -> None:
    """A pass under p=reject is reported as disposition pass, with its DKIM and SPF results."""
    evaluation = evaluation_from_facts(tx(), FACTS)
    assert evaluation is not None
    row = evaluation.row
    assert (evaluation.policy_domain, row.source_ip, row.disposition) == (
        "sender.example",
        "192.0.2.1",
        "pass",
    )
    assert (row.dkim_aligned, row.spf_aligned) == (True, True)
    assert row.dkim == (("sender.example", "sel1", "pass"), ("other.example", "s2", "fail"))
    assert row.spf == ("sender.example", "pass")
    assert (row.header_from, row.envelope_from, row.envelope_to) == ("sender.example", "sender.example", None)


@pytest.mark.parametrize(
    "changes",
    [
        {"dmarc.result": "none"},
        {"dmarc.result": "temperror"},
        {"dmarc.result": None},
        {"dmarc.policy_domain": "not a domain"},
        {"dmarc.from_domain": ""},
    ],
)
def test_nothing_to_report(changes: dict[str, LogValue]) -> None:
    """No DMARC pass or fail, or no usable domain: nothing is recorded."""
    assert evaluation_from_facts(tx(), FACTS | changes) is None


def test_no_client_address_no_row() -> None:
    """Without the client address there is no source_ip, so no row."""
    assert evaluation_from_facts(tx(client=""), FACTS) is None
    assert evaluation_from_facts(tx(client="unknown"), FACTS) is None


def test_missing_facts_are_left_out_not_guessed() -> None:
    """Without SPF and DKIM facts the row has no auth results."""
    facts = {k: v for k, v in FACTS.items() if not k.startswith(("spf.", "dkim."))}
    evaluation = evaluation_from_facts(tx(), facts)
    assert evaluation is not None
    assert (evaluation.row.spf, evaluation.row.dkim) == (None, ())


def test_null_sender_has_an_empty_envelope_from_and_the_helo_spf_result() -> None:
    """RFC 7208 section 2.4: for <> the MAIL FROM identity is the HELO's; envelope_from is empty."""
    facts = FACTS | {"spf.identity": "helo", "spf.domain": "mail.sender.example"}
    evaluation = evaluation_from_facts(tx(sender=""), facts)
    assert evaluation is not None
    assert evaluation.row.envelope_from == ""
    assert evaluation.row.spf == ("mail.sender.example", "pass")
    with_sender = evaluation_from_facts(tx(), facts)
    assert with_sender is not None
    assert with_sender.row.spf is None  # only the HELO was checked for a real sender: not DMARC's SPF


def test_envelope_to_only_when_configured_and_unique() -> None:
    """envelope_to is the recipients' one domain, when asked for."""
    one = evaluation_from_facts(tx(recipients=("a@rcpt.example", "b@RCPT.example")), FACTS, envelope_to=True)
    two = evaluation_from_facts(tx(recipients=("a@rcpt.example", "b@other.example")), FACTS, envelope_to=True)
    off = evaluation_from_facts(tx(recipients=("a@rcpt.example",)), FACTS)
    assert one is not None and two is not None and off is not None
    assert (one.row.envelope_to, two.row.envelope_to, off.row.envelope_to) == ("rcpt.example", None, None)


def test_dkim_results_are_ordered_by_preference_and_bounded() -> None:
    """Strict-aligned passes first, then relaxed, other passes, failures; bad entries dropped."""
    results = " ".join(
        [
            "x.example:a:fail",
            "third.example:b:pass",
            "mail.sender.example:c:pass",
            "sender.example:d:pass",
            "broken-entry",
            "sender.example:e:unknownresult",
        ]
        + [f"d{i}.example:s:fail" for i in range(150)]
    )
    evaluation = evaluation_from_facts(tx(), FACTS | {"dkim.results": results})
    assert evaluation is not None
    dkim = evaluation.row.dkim
    assert [d[1] for d in dkim[:4]] == ["d", "c", "b", "a"]
    assert len(dkim) == 100


async def test_a_message_is_counted(services: Services) -> None:
    """One evaluation makes one row with count 1."""
    await record(services)
    report = await report_of(services)
    assert [count for _, count in report.rows] == [1]


async def test_the_same_queue_id_is_counted_once(services: Services, clock: FrozenClock) -> None:
    """Postfix retrying a message (same queue id) does not count it twice, even an hour later."""
    await record(services)
    clock.advance(HOUR)
    await record(services)
    await record(services, queue_id="4Bx9Kq1Zz3zAAA")
    report = await report_of(services)
    assert report.messages == 2


async def test_without_queue_id_every_evaluation_counts(services: Services) -> None:
    """Before-queue mode has no queue id: each evaluation is a message."""
    await record(services, queue_id="")
    await record(services, queue_id="")
    assert (await report_of(services)).messages == 2


async def test_distinct_rows_per_tuple(services: Services) -> None:
    """Different source IPs or results make different rows."""
    await record(services, queue_id="A1")
    await record(services, queue_id="A2")
    await record(services, queue_id="A3", client="2001:db8::25")
    await record(services, FAILING, queue_id="A4")
    report = await report_of(services)
    counts = sorted((row.source_ip, row.disposition, count) for row, count in report.rows)
    assert counts == [("192.0.2.1", "pass", 2), ("192.0.2.1", "reject", 1), ("2001:db8::25", "pass", 1)]


async def test_no_rua_nothing_recorded(services: Services, state_store: StateStore) -> None:
    """RFC 9989: no rua, no aggregate report; nothing is stored."""
    await record(services, FACTS | {"dmarc.rua": ""})
    await record(services, FACTS | {"dmarc.rua": "https://reports.example/"})
    assert await keys(state_store) == []


async def test_every_key_has_a_ttl_and_shares_the_domain_tag(
    services: Services, state_store: StateStore, clock: FrozenClock
) -> None:
    """All keys expire (retention after the end of their UTC day); a domain's keys share a hash tag."""
    await record(services)
    ns = state_store.namespace("dmarcreport")
    found = await keys(state_store)
    assert found
    prefix = ns.prefix
    expected = DAY0 + DAY + SETTINGS.retention - clock.now()
    for key in found:
        rest = key[len(prefix) :]
        assert rest.startswith(("{d:sender.example}:", "{i:20231114}:")), key
        ttl = await ns.ttl(key)
        assert 0 < ttl <= expected, (key, ttl)
        assert ttl >= expected - 5, (key, ttl)
    assert any(":r:2023111410" in k for k in found)
    assert any(":m:2023111410" in k for k in found)
    assert any(":q:" in k for k in found)


async def test_rows_are_capped_per_hour(
    services: Services, state_store: StateStore, monkeypatch: Any
) -> None:
    """A flood of distinct rows stops at the cap; more messages are counted as dropped."""
    import mxward.contentfilter.dmarcreports as module

    monkeypatch.setattr(module, "MAX_ROWS_PER_HOUR", 3)
    for i in range(5):
        await record(services, queue_id=f"Q{i}", client=f"192.0.2.{i + 1}")
    await record(services, queue_id="Q9", client="192.0.2.1")  # an existing row still counts
    reporter = Reporter(SETTINGS, services)
    data = await reporter.period("sender.example", DAY0, DAY0 + DAY)
    assert len(data.rows) == 3
    assert data.dropped == 2
    assert sum(data.rows.values()) == 4


async def test_redis_failure_is_logged_not_raised(
    redis_factory: Any, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    """Recording never fails the message: a dead Redis costs the count, with a warning."""
    server = redis_factory()
    async with StateStore(StateSettings(url=server.url, retry_after=0)) as store:
        server.stop()
        await record_evaluation(store, tx(), FACTS, now=services.clock.now(), settings=SETTINGS)
    assert "dmarc report: not counted for sender.example" in caplog.text


# --------------------------------------------------------------------------------------------
# Periods


async def test_utc_day_boundaries(services: Services, clock: FrozenClock) -> None:
    """23:59:59 belongs to one day's report, 00:00:00 to the next."""
    clock.advance(DAY0 + DAY - 1 - clock.now())
    await record(services, queue_id="LATE")
    clock.advance(1)
    await record(services, queue_id="EARLY")
    first = await report_of(services, begin=DAY0, end=DAY0 + DAY)
    second = await report_of(services, begin=DAY0 + DAY, end=DAY0 + 2 * DAY)
    assert (first.messages, second.messages) == (1, 1)


async def test_shorter_periods_add_up_hours(services: Services, clock: FrozenClock) -> None:
    """With 6-hour periods, 05:59:59 and 06:00:00 fall in different reports."""
    settings = ReportSettings(email="dmarc-reports@receiver.example", period=6 * HOUR)
    clock.advance(DAY0 + 6 * HOUR - 1 - clock.now())
    await record(services, queue_id="B1", settings=settings)
    clock.advance(1)
    await record(services, queue_id="B2", settings=settings)
    clock.advance(HOUR)
    await record(services, queue_id="B3", settings=settings)
    reporter = Reporter(settings, services)
    first = await reporter.report("sender.example", DAY0, DAY0 + 6 * HOUR)
    second = await reporter.report("sender.example", DAY0 + 6 * HOUR, DAY0 + 12 * HOUR)
    assert first is not None and second is not None
    assert (first.messages, second.messages) == (1, 2)
    assert second.filename.split("!")[2:4] == [str(DAY0 + 6 * HOUR), str(DAY0 + 12 * HOUR - 1)]


# --------------------------------------------------------------------------------------------
# The report


async def test_report_is_valid_against_the_rfc9990_schema(services: Services) -> None:
    """A report with varied rows validates against the RFC 9990 schema."""
    await record(services, queue_id="C1")
    await record(services, FAILING, queue_id="C2", client="2001:db8::1")
    await record(services, FACTS | {"spf.identity": "helo"}, queue_id="C3", sender="")
    await record(
        services, FAILING | {"dmarc.override": "forwarded", "dmarc.disposition": "none"}, queue_id="C4"
    )
    await record(services, {k: v for k, v in FACTS.items() if not k.startswith("spf.")}, queue_id="C5")
    await record(services, FACTS | {"dkim.results": "sender.example:<&>\x01:pass"}, queue_id="C6")
    report = await report_of(services)
    xml = report.xml()
    validate(xml)
    assert xml.startswith(
        b"<?xml version='1.0' encoding='utf-8'?>\n<feedback xmlns=\"" + XML_NAMESPACE.encode()
    )
    assert len(records(xml)) == 6


async def test_report_metadata_and_policy_from_dns(services: Services) -> None:
    """Metadata names the reporter and period; the policy is the record published for the domain."""
    await record(services)
    data = decoded((await report_of(services)).xml())
    assert data["version"] == 1
    meta = data["report_metadata"]
    assert meta["org_name"] == "Receiver Org"
    assert meta["email"] == "dmarc-reports@receiver.example"
    assert re.fullmatch(r"[0-9a-f]{32}", meta["report_id"])
    assert meta["date_range"] == {"begin": DAY0, "end": DAY0 + DAY - 1}
    assert meta["generator"].startswith("mxward")
    assert data["policy_published"] == {
        "domain": "sender.example",
        "discovery_method": "treewalk",
        "p": "reject",
        "sp": "quarantine",
        "np": "reject",
        "fo": "1",
        "adkim": "s",
        "aspf": "r",
    }


async def test_policy_from_the_record_the_check_saw(services: Services) -> None:
    """With the dmarc.record fact, the report shows that record, not today's DNS."""
    seen = "v=DMARC1; p=quarantine; pct=50; adkim=r; rua=mailto:dmarc@sender.example"
    await record(services, FACTS | {"dmarc.record": seen, "dmarc.mode": "7489"})
    published = decoded((await report_of(services)).xml())["policy_published"]
    assert published == {
        "domain": "sender.example",
        "discovery_method": "psl",
        "p": "quarantine",
        "adkim": "r",
    }


async def test_policy_without_any_record_uses_the_applied_policy(services: Services) -> None:
    """A domain that no longer publishes a record still gets its report; p is what was applied."""
    facts = FACTS | {"dmarc.policy_domain": "gone.example", "dmarc.from_domain": "gone.example"}
    await record(services, facts | {"dmarc.policy": "quarantine"})
    report = await report_of(services, domain="gone.example")
    validate(report.xml())
    assert report.policy == PolicyPublished(
        domain="gone.example", p="quarantine", discovery_method="treewalk"
    )


async def test_row_contents(services: Services) -> None:
    """A record carries the row, identifiers and the uninterpreted DKIM and SPF results."""
    await record(services)
    (only,) = records((await report_of(services)).xml())
    assert only["row"] == {
        "source_ip": "192.0.2.1",
        "count": 1,
        "policy_evaluated": {"disposition": "pass", "dkim": "pass", "spf": "pass"},
    }
    assert only["identifiers"] == {"header_from": "sender.example", "envelope_from": "sender.example"}
    assert only["auth_results"] == {
        "dkim": [
            {"domain": "sender.example", "selector": "sel1", "result": "pass"},
            {"domain": "other.example", "selector": "s2", "result": "fail"},
        ],
        "spf": {"domain": "sender.example", "scope": "mfrom", "result": "pass"},
    }


@pytest.mark.parametrize(
    ("changes", "domain", "reasons"),
    [
        ({"dmarc.override": "forwarded", "dmarc.disposition": "none"}, "sender.example",
         [{"type": "trusted_forwarder", "comment": "known forwarder"}]),
        ({"dmarc.override": "trusted_arc", "dmarc.disposition": "none"}, "sender.example",
         [{"type": "trusted_forwarder", "comment": "ARC chain sealed by a trusted sealer"}]),
        ({"dmarc.override": "local_policy", "dmarc.disposition": "quarantine"}, "sender.example",
         [{"type": "local_policy"}]),
        ({"dmarc.override": "sampled_out", "dmarc.disposition": "none"}, "sender.example",
         [{"type": "other", "comment": "sampled out (pct)"}]),
        ({"dmarc.disposition": "quarantine"}, "sender.example", [{"type": "local_policy"}]),
        ({"dmarc.disposition": "reject"}, "sender.example", None),
        ({"dmarc.disposition": "none"}, "testing.example", [{"type": "policy_test_mode"}]),
    ],
)  # fmt: skip
async def test_override_reasons(
    services: Services, changes: dict[str, LogValue], domain: str, reasons: list[dict[str, str]] | None
) -> None:
    """A failing message that got less than its policy says why (RFC 9990 section 3.1.2)."""
    facts = FAILING | {"dmarc.policy_domain": domain, "dmarc.from_domain": domain} | changes
    await record(services, facts)
    xml = (await report_of(services, domain=domain)).xml()
    (only,) = records(xml)
    found = only["row"]["policy_evaluated"].get("reason")
    if found is not None:  # xmlschema decodes a comment as {"@lang": "en", "$": text}
        found = [{k: v["$"] if isinstance(v, dict) else v for k, v in r.items()} for r in found]
    assert found == reasons


async def test_text_from_messages_cannot_break_the_xml(services: Services) -> None:
    """Markup characters are escaped and control characters dropped."""
    await record(services, FACTS | {"dkim.results": "sender.example:a<b>&c\x07d:pass"})
    xml = (await report_of(services)).xml()
    validate(xml)
    assert b"a&lt;b&gt;&amp;cd" in xml


async def test_report_id_and_file_name_are_stable_and_unique(services: Services) -> None:
    """The same report gets the same id, name and bytes; another domain or period another id."""
    await record(services)
    await record(services, FACTS | {"dmarc.policy_domain": "outsourced.example"}, queue_id="D2")
    one, again = await report_of(services), await report_of(services)
    other = await report_of(services, domain="outsourced.example")
    later = dataclasses.replace(one, begin=one.begin + DAY, end=one.end + DAY)
    assert (one.report_id, one.filename, one.compressed()) == (
        again.report_id,
        again.filename,
        again.compressed(),
    )
    assert len({one.report_id, other.report_id, later.report_id}) == 3
    assert re.fullmatch(
        rf"receiver\.example!sender\.example!{DAY0}!{DAY0 + DAY - 1}![0-9a-f]{{32}}\.xml\.gz", one.filename
    )
    assert one.filename.endswith(f"!{one.report_id}.xml.gz")


async def test_compressed_report_is_gzip_of_the_xml(services: Services) -> None:
    """The attachment is the XML compressed with gzip."""
    await record(services)
    report = await report_of(services)
    assert gzip.decompress(report.compressed()) == report.xml()


async def test_malformed_rows_in_redis_are_left_out(
    services: Services, state_store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows that do not parse (a bug, a foreign writer) are skipped with a warning."""
    await record(services)
    ns = state_store.namespace("dmarcreport")
    key = ns.key("r", "2023111410", tag="d:sender.example")
    await ns.hset(key, {'{"ip":"not an ip"}': 3, "garbage": 1}, 3600)
    report = await report_of(services)
    assert report.messages == 1
    assert "2 malformed row(s) left out" in caplog.text


def test_row_key_round_trip() -> None:
    """A row survives its JSON form unchanged."""
    evaluation = evaluation_from_facts(tx(), FACTS | {"dmarc.override": "forwarded"}, envelope_to=True)
    assert evaluation is not None
    assert Row.from_key(evaluation.row.key()) == evaluation.row


# --------------------------------------------------------------------------------------------
# The command: listing and files


def parse(*argv: str) -> argparse.Namespace:
    top = argparse.ArgumentParser(prog="mxward")
    add_parser(top.add_subparsers(dest="command", required=True))
    return top.parse_args(["dmarc", "report", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ("--period", "2023-13-01"),
        ("--period", "yesterday"),
        ("--domain", "not a domain"),
        ("--dir", "/tmp", "--send"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed dates and domains, or --dir with --send, exit with status 2."""
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2


async def test_list_when_empty(services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    """Without data the command says so."""
    assert await run_command(parse(), Config(), services, settings=SETTINGS) == 0
    assert capsys.readouterr().out == "(no DMARC report data)\n"


async def test_list_shows_each_domain_and_period(
    services: Services, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """The listing names domain, period, size, destinations and state."""
    await record(services)
    clock.advance(DAY)
    await record(services, queue_id="E2")
    assert await run_command(parse(), Config(), services, settings=SETTINGS) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = "1 record(s), 1 message(s); rua mailto:dmarc@sender.example"
    assert lines == [
        f"sender.example 2023-11-14 00:00-24:00 UTC: {summary}; not sent",
        f"sender.example 2023-11-15 00:00-24:00 UTC: {summary}; in progress",
    ]


async def test_dir_writes_ended_periods_only(
    services: Services, clock: FrozenClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dir writes one valid .xml.gz per ended period, mode 0600; the running day waits."""
    await record(services)
    assert await run_command(parse("--dir", str(tmp_path)), Config(), services, settings=SETTINGS) == 0
    assert files(tmp_path) == []
    assert "period not ended yet" in capsys.readouterr().out
    clock.advance(DAY)
    assert await run_command(parse("--dir", str(tmp_path)), Config(), services, settings=SETTINGS) == 0
    (path,) = files(tmp_path)
    assert path.name == (await report_of(services)).filename
    assert mode(path) == 0o600
    validate(gzip.decompress(read(path)))
    assert "1 report(s) written, 0 failed" in capsys.readouterr().out


async def test_dir_dry_run_writes_nothing(
    services: Services, clock: FrozenClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run says what it would write."""
    await record(services)
    clock.advance(DAY)
    assert (
        await run_command(parse("--dir", str(tmp_path), "--dry-run"), Config(), services, settings=SETTINGS)
        == 0
    )
    assert files(tmp_path) == []
    assert "would write" in capsys.readouterr().out


async def test_period_and_domain_select(
    services: Services, clock: FrozenClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--period picks one UTC day and --domain one policy domain."""
    await record(services)
    await record(services, FACTS | {"dmarc.policy_domain": "outsourced.example"}, queue_id="F2")
    clock.advance(DAY)
    await record(services, queue_id="F3")
    clock.advance(DAY)
    args = parse("--dir", str(tmp_path), "--period", "2023-11-15", "--domain", "sender.example")
    assert await run_command(args, Config(), services, settings=SETTINGS) == 0
    (path,) = files(tmp_path)
    assert path.name.startswith(f"receiver.example!sender.example!{DAY0 + DAY}!")


async def test_period_in_the_future_is_refused(
    services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    """A day that has not begun is a usage error."""
    assert await run_command(parse("--period", "2023-11-20"), Config(), services, settings=SETTINGS) == 2
    assert "has not begun yet" in capsys.readouterr().err


async def test_dir_must_exist(services: Services, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dir names a directory that exists."""
    args = parse("--dir", str(tmp_path / "missing"))
    assert await run_command(args, Config(), services, settings=SETTINGS) == 2
    assert "is not a directory" in capsys.readouterr().err


async def test_state_store_down_fails_cleanly(
    redis_factory: Any, services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    """With Redis unreachable the command says so and exits 1."""
    server = redis_factory()
    async with StateStore(StateSettings(url=server.url, retry_after=0)) as store:
        server.stop()
        broken = Services(dns=services.dns, state=store, clock=services.clock, hostname=HOST)
        assert await run_command(parse(), Config(), broken, settings=SETTINGS) == 1
    assert "mxward dmarc report: state store:" in capsys.readouterr().err


async def test_the_schema_check_catches_what_rfc9990_forbids(services: Services) -> None:
    """The validator is really applied: RFC 7489's pct and reason "forwarded" are not RFC 9990."""
    await record(services)
    xml = (await report_of(services)).xml()
    with_pct = xml.replace(b"<p>reject</p>", b"<p>reject</p><pct>100</pct>")
    old_reason = xml.replace(
        b"<spf>pass</spf>\n", b"<spf>pass</spf><reason><type>forwarded</type></reason>\n", 1
    )
    for bad in (with_pct, old_reason):
        assert bad != xml
        assert list(SCHEMA.iter_errors(io.BytesIO(bad)))


# --------------------------------------------------------------------------------------------
# With the dmarc check: its facts, its after() hook


async def test_the_dmarc_checks_after_hook_records_its_evaluation(services: Services, dns: DnsServer) -> None:
    """The dmarc check evaluates a message and its after() hook counts it: the fact names agree,
    and the report shows the policy the check saw without asking DNS again."""
    from mxward.contentfilter.checks.dmarc import DmarcCheck, Options
    from mxward.shared.plugin import DUNNO, Decision

    check = DmarcCheck(Options(reports=True), services)
    transaction = Transaction(
        stage=Stage.CONTENT,
        client_address="192.0.2.1",
        sender="bounce@sender.example",
        queue_id="4Bx9Kq1Zz3z9sT",
        recipients=("bob@receiver.example",),
        message=Message.parse(MESSAGE),
        facts={
            "dkim.pass_domains": "sender.example",
            "dkim.results": "sender.example:sel1:pass",
            "spf.result": "pass",
            "spf.domain": "sender.example",
            "spf.identity": "mailfrom",
        },
    )
    result = await check.check(Stage.CONTENT, transaction)
    assert result.facts["dmarc.result"] == "pass"
    decision = Decision(action=DUNNO, score=result.score, results=(result,), stage=Stage.CONTENT)
    await check.after(transaction, decision)
    dns.reset_queries()
    report = await report_of(services)
    assert not dns.queries  # the published policy came with the facts
    xml = report.xml()
    validate(xml)
    (only,) = records(xml)
    assert only["row"]["policy_evaluated"] == {"disposition": "pass", "dkim": "pass", "spf": "pass"}
    assert only["auth_results"]["dkim"] == [
        {"domain": "sender.example", "selector": "sel1", "result": "pass"}
    ]
    published = decoded(xml)["policy_published"]
    assert (published["p"], published["sp"], published["np"], published["adkim"]) == (
        "reject",
        "quarantine",
        "reject",
        "s",
    )


async def test_published_policy_from_the_checks_facts(services: Services, dns: DnsServer) -> None:
    """dmarc.p, dmarc.sp, ... describe the record the check applied; DNS is not asked again."""
    facts = FACTS | {
        "dmarc.p": "quarantine",
        "dmarc.sp": "",
        "dmarc.np": "none",
        "dmarc.adkim": "r",
        "dmarc.aspf": "s",
        "dmarc.fo": "0:d",
        "dmarc.pct": 100,
        "dmarc.testing": False,
    }
    await record(services, facts)
    dns.reset_queries()
    published = decoded((await report_of(services)).xml())["policy_published"]
    assert published == {
        "domain": "sender.example",
        "discovery_method": "treewalk",
        "p": "quarantine",
        "np": "none",
        "adkim": "r",
        "aspf": "s",
        "fo": "0:d",
    }
    assert not dns.queries


async def test_testing_mode_fact_gives_policy_test_mode(services: Services) -> None:
    """dmarc.testing (t=y applied) is reported as override policy_test_mode and testing y."""
    facts = FAILING | {"dmarc.p": "reject", "dmarc.testing": True, "dmarc.disposition": "quarantine"}
    await record(services, facts)
    xml = (await report_of(services)).xml()
    (only,) = records(xml)
    assert only["row"]["policy_evaluated"]["reason"] == [{"type": "policy_test_mode"}]
    assert decoded(xml)["policy_published"]["testing"] == "y"


async def test_spf_the_check_used_wins(services: Services) -> None:
    """The SPF result the dmarc check used (dmarc.spf_*) is the one reported."""
    await record(
        services, FACTS | {"dmarc.spf_result": "softfail", "dmarc.spf_domain": "bounces.sender.example"}
    )
    (only,) = records((await report_of(services)).xml())
    assert only["auth_results"]["spf"] == {
        "domain": "bounces.sender.example",
        "scope": "mfrom",
        "result": "softfail",
    }


def test_rua_separated_by_spaces_or_commas() -> None:
    """The check's dmarc.rua separates URIs with spaces; records use commas: both work."""
    assert parse_report_uris("mailto:a@x.example mailto:b@x.example!1k,mailto:c@x.example")[0] == [
        ReportURI("a@x.example"),
        ReportURI("b@x.example", 1024),
        ReportURI("c@x.example"),
    ]

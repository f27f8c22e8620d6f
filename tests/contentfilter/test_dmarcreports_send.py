"""DMARC reports by mail: destination checks, size limits, no double sending, failure reports.

``mxward dmarc report --send`` runs against real Redis (support.redis_fixtures), the test DNS
server with tests/data/dmarc/dmarc.zone (external destination authorizations) and a sink SMTP
server standing in for the reinjection smtpd (``[filter] reinject``); reports that arrive
are parsed and their XML validated against the RFC 9990 schema.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import email.message
import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xmlschema
from support.dnsserver import DnsServer
from support.postfix import DeliveredMessage, SmtpSink

from mxward.contentfilter.dmarcreports import (
    FailureReport,
    Reporter,
    ReportSettings,
    ReportURI,
    add_parser,
    authorized_destinations,
    parse_report_uris,
    record_evaluation,
    run_command,
)
from mxward.contentfilter.message import Message
from mxward.shared.clock import FrozenClock
from mxward.shared.config import Config, FilterSettings
from mxward.shared.dns import DnsSettings, DnsTempError, Resolver
from mxward.shared.plugin import LogValue, Services, Stage, Transaction
from mxward.shared.state import StateStore

DATA = Path(__file__).parents[1] / "data" / "dmarc"
SCHEMA = xmlschema.XMLSchema(DATA / "rfc9990.xsd")
DAY0 = calendar.timegm((2023, 11, 14, 0, 0, 0))
HOUR = 3600
DAY = 86400
HOST = "mx.receiver.example"
SETTINGS = ReportSettings(org_name="Receiver Org", email="dmarc-reports@receiver.example")
MESSAGE = (
    b"Received: from mail.sender.example (mail.sender.example [192.0.2.1])\r\n"
    b"\tby mx.receiver.example (Postfix) with ESMTP id 4Bx9Kq1Zz3z9sT\r\n"
    b"\tfor <bob.private@receiver.example>; Tue, 14 Nov 2023 10:00:00 +0000 (UTC)\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=sel1; i=alice.secret@sender.example;\r\n"
    b"\th=from:to:subject; bh=AAAA; b=BBBB\r\n"
    b"From: Alice Secret <alice.secret@sender.example>\r\n"
    b"To: Bob Private <bob.private@receiver.example>, carol@receiver.example\r\n"
    b"Subject: the merger plans\r\n"
    b"Date: Tue, 14 Nov 2023 10:00:00 +0000\r\n"
    b"Message-ID: <20231114.1@sender.example>\r\n"
    b"X-Private: internal only\r\n"
    b"\r\n"
    b"Confidential body text\r\n"
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
    "dkim.results": "sender.example:sel1:pass",
}
FAILING: dict[str, LogValue] = FACTS | {
    "dmarc.result": "fail",
    "dmarc.disposition": "reject",
    "dmarc.spf_aligned": False,
    "dmarc.dkim_aligned": False,
    "spf.result": "fail",
    "spf.domain": "spoofer.example",
    "dkim.results": "sender.example:sel1:fail",
}
FAILURES = ReportSettings(
    org_name="Receiver Org", email="dmarc-reports@receiver.example", failure_reports=True
)


def tx(queue_id: str = "4Bx9Kq1Zz3z9sT", client: str = "192.0.2.1") -> Transaction:
    return Transaction(
        stage=Stage.CONTENT,
        client_address=client,
        sender="bounce.user@sender.example",
        queue_id=queue_id,
        recipients=("bob.private@receiver.example",),
        message=Message.parse(MESSAGE),
    )


def for_domain(domain: str, facts: dict[str, LogValue] = FACTS) -> dict[str, LogValue]:
    """The facts for a policy domain of dmarc.zone, with the rua its record publishes."""
    rua = {
        "sender.example": "mailto:dmarc@sender.example",
        "sub.sender.example": "mailto:dmarc@sender.example",
        "outsourced.example": "mailto:agg@reports.example,mailto:x@unauthorized.example",
        "redirected.example": "mailto:first@reports.example",
        "badauth.example": "mailto:agg@reports.example",
    }[domain]
    return facts | {"dmarc.policy_domain": domain, "dmarc.from_domain": domain, "dmarc.rua": rua}


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


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def config(sink: SmtpSink) -> Config:
    return Config(filter=FilterSettings(reinject=f"127.0.0.1:{sink.port}", reinject_timeout=5.0))


async def record(
    services: Services, facts: dict[str, LogValue] = FACTS, settings: ReportSettings = SETTINGS, **kw: Any
) -> None:
    await record_evaluation(services.state, tx(**kw), facts, now=services.clock.now(), settings=settings)


def parse(*argv: str) -> argparse.Namespace:
    top = argparse.ArgumentParser(prog="mxward")
    add_parser(top.add_subparsers(dest="command", required=True))
    return top.parse_args(["dmarc", "report", *argv])


async def send(services: Services, config: Config, *argv: str, settings: ReportSettings = SETTINGS) -> int:
    return await run_command(parse("--send", *argv), config, services, settings=settings)


def files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def read(path: Path) -> bytes:
    return path.read_bytes()


def to(sink: SmtpSink) -> list[str]:
    """The recipients of every message the sink received, in order."""
    return [r for m in sink.messages for r in m.rcpt_tos]


def attachment(delivered: DeliveredMessage) -> tuple[str, bytes]:
    """The report attachment: its file name and the XML inside."""
    parts = [p for p in delivered.message().iter_attachments() if p.get_content_type() == "application/gzip"]
    assert len(parts) == 1
    part = parts[0]
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    return str(part.get_filename()), gzip.decompress(data)


# --------------------------------------------------------------------------------------------
# Sending


async def test_report_is_mailed_to_rua_after_the_period(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the day ends, one mail per rua address, from the reporting address, with the report."""
    await record(services)
    assert await send(services, config) == 0
    assert sink.messages == []
    clock.advance(DAY)
    assert await send(services, config) == 0
    (delivered,) = sink.messages
    assert delivered.mail_from == "dmarc-reports@receiver.example"
    assert delivered.rcpt_tos == ("dmarc@sender.example",)
    msg = delivered.message()
    report = await Reporter(SETTINGS, services).report("sender.example", DAY0, DAY0 + DAY)
    assert report is not None
    assert msg["Subject"] == (
        f"Report Domain: sender.example Submitter: receiver.example Report-ID: <{report.report_id}>"
    )
    assert msg["From"].addresses[0].addr_spec == "dmarc-reports@receiver.example"
    assert msg["From"].addresses[0].display_name == "Receiver Org"
    assert msg["To"] == "dmarc@sender.example"
    assert msg["Message-ID"] == f"<{report.report_id}@receiver.example>"
    name, xml = attachment(delivered)
    assert name == report.filename
    assert not list(SCHEMA.iter_errors(io.BytesIO(xml)))
    assert "sent to mailto:dmarc@sender.example" in capsys.readouterr().out


async def test_no_double_sending(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, state_store: StateStore
) -> None:
    """A sent report is marked in Redis and not sent again; its data stays until it expires."""
    recorded = clock.now()
    await record(services)
    clock.advance(DAY)
    assert await send(services, config) == 0
    assert await send(services, config) == 0
    assert len(sink.messages) == 1
    ns = state_store.namespace("dmarcreport")
    rows = ns.key("r", "2023111410", tag="d:sender.example")
    assert await ns.exists(rows)
    sent = ns.key("s", str(DAY0), str(DAY0 + DAY), tag="d:sender.example")
    assert list(await ns.hgetall(sent)) == ["mailto:dmarc@sender.example"]
    # TTLs were set at different (frozen-clock) times: compare when each expires
    rows_expire = recorded + await ns.ttl(rows)
    sent_expire = clock.now() + await ns.ttl(sent)
    assert rows_expire <= DAY0 + DAY + SETTINGS.retention
    assert sent_expire >= rows_expire + DAY - 5  # the mark outlives the data it is about


async def test_two_nodes_sending_at_once_send_once(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock
) -> None:
    """Two runs at the same moment (two MX nodes): the lock lets one send."""
    await record(services)
    clock.advance(DAY)
    results = await asyncio.gather(send(services, config), send(services, config))
    assert results == [0, 0]
    assert to(sink) == ["dmarc@sender.example"]


async def test_dry_run_sends_and_marks_nothing(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """--send --dry-run says what it would send."""
    await record(services)
    clock.advance(DAY)
    assert await send(services, config, "--dry-run") == 0
    assert sink.messages == []
    assert "would send to mailto:dmarc@sender.example" in capsys.readouterr().out
    assert await send(services, config) == 0
    assert len(sink.messages) == 1


async def test_refused_delivery_is_tried_again(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 4xx from the reinjection smtpd leaves the report unsent (exit 1) for the next run."""
    await record(services)
    clock.advance(DAY)
    sink.data_reply = "451 4.3.0 try later"
    assert await send(services, config) == 1
    assert "failed: message refused: 451 4.3.0 try later; will try again" in capsys.readouterr().out
    sink.data_reply = None
    assert await send(services, config) == 0
    assert to(sink) == ["dmarc@sender.example"]


async def test_reinjection_down_is_tried_again(
    services: Services, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """No reinjection smtpd: exit 1 with the reason, nothing marked."""
    await record(services)
    clock.advance(DAY)
    port = sink.port
    sink.stop()
    dead = Config(filter=FilterSettings(reinject=f"127.0.0.1:{port}", reinject_timeout=2.0))
    assert await send(services, dead) == 1
    assert "cannot connect to 127.0.0.1" in capsys.readouterr().out


async def test_external_destination_needs_authorization(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """rua at another organization: sent only where <domain>._report._dmarc.<host> says v=DMARC1."""
    await record(services, for_domain("outsourced.example"))
    clock.advance(DAY)
    assert await send(services, config) == 0
    assert to(sink) == ["agg@reports.example"]
    out = capsys.readouterr().out
    assert "not sending to mailto:x@unauthorized.example: unauthorized.example does not accept reports" in out


async def test_authorization_can_name_another_address_on_the_same_host(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock
) -> None:
    """The authorizing record's rua replaces the destination, if it is on the same host."""
    await record(services, for_domain("redirected.example"))
    clock.advance(DAY)
    assert await send(services, config) == 0
    assert to(sink) == ["second@reports.example"]


async def test_an_authorization_record_must_start_with_v_dmarc1(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock
) -> None:
    """A record where v=DMARC1 is not first authorizes nothing."""
    await record(services, for_domain("badauth.example"))
    clock.advance(DAY)
    assert await send(services, config) == 0
    assert sink.messages == []


async def test_same_organizational_domain_needs_no_authorization(services: Services, dns: DnsServer) -> None:
    """A subdomain's record reporting to its parent: no _report._dmarc query."""
    allowed, note = await authorized_destinations(
        services.dns, "sub.sender.example", ReportURI("dmarc@sender.example")
    )
    assert allowed == [ReportURI("dmarc@sender.example")]
    assert note == "same organizational domain"
    assert not any("_report._dmarc" in name for name, _ in dns.queries)


async def test_dns_trouble_defers_the_destination(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, dns: DnsServer
) -> None:
    """A SERVFAIL during the check sends nothing and marks nothing; the next run sends."""
    await record(services, for_domain("outsourced.example"))
    clock.advance(DAY)
    dns.servfail("outsourced.example._report._dmarc.reports.example")
    assert await send(services, config) == 1
    assert sink.messages == []
    dns.heal()
    assert await send(services, config) == 0
    assert to(sink) == ["agg@reports.example"]
    dns.servfail("_dmarc.other.example")
    with pytest.raises(DnsTempError):
        await authorized_destinations(services.dns, "sender.example", ReportURI("a@other.example"))


async def test_size_limits(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A destination whose !size limit is below the report message is skipped; others get it."""
    rua = "mailto:small@sender.example!100,mailto:big@sender.example!10m"
    await record(services, FACTS | {"dmarc.rua": rua})
    clock.advance(DAY)
    assert await send(services, config) == 0
    assert to(sink) == ["big@sender.example"]
    assert "above the 100 bytes mailto:small@sender.example accepts" in capsys.readouterr().out


async def test_max_size_caps_every_destination(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """A report message above max_size is not sent anywhere."""
    small = ReportSettings(email="dmarc-reports@receiver.example", max_size=4096)
    for i in range(300):
        await record(
            services, settings=small, queue_id=f"Q{i}", client=f"2001:db8::{i:x}:{i * 7919 % 65536:x}"
        )
    clock.advance(DAY)
    assert await send(services, config, settings=small) == 0
    assert sink.messages == []
    assert "above max_size" in capsys.readouterr().out


async def test_domain_filter_when_sending(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock
) -> None:
    """--domain sends only that domain's reports."""
    await record(services)
    await record(services, for_domain("outsourced.example"), queue_id="Z2")
    clock.advance(DAY)
    assert await send(services, config, "--domain", "outsourced.example") == 0
    assert to(sink) == ["agg@reports.example"]


# --------------------------------------------------------------------------------------------
# Failure reports (RFC 9991)


async def test_failure_reports_are_off_by_default(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, state_store: StateStore
) -> None:
    """Privacy first: without failure_reports nothing about single messages is kept."""
    await record(services, FAILING)
    assert not [k async for k in state_store.namespace("dmarcreport").scan("*:f:*")]
    clock.advance(DAY)
    assert await send(services, config) == 0
    assert to(sink) == ["dmarc@sender.example"]  # the aggregate report only


async def stored_failure(services: Services, state_store: StateStore) -> FailureReport:
    ns = state_store.namespace("dmarcreport")
    (key,) = [k async for k in ns.scan("*:f:*")]
    raw = await ns._store._call("LRANGE", key, 0, -1)
    (entry,) = raw
    report = FailureReport.from_json(entry)
    assert report is not None
    return report


async def test_failure_report_is_redacted(services: Services, state_store: StateStore) -> None:
    """Stored failure data has no body, no Subject and no local parts."""
    await record(services, FAILING, settings=FAILURES)
    report = await stored_failure(services, state_store)
    text = "\n".join(report.headers)
    for secret in (
        "alice.secret",
        "bob.private",
        "carol@",
        "merger",
        "Confidential",
        "internal only",
        "Secret",
    ):
        assert secret not in text, secret
    assert "From: redacted@sender.example" in text
    assert "To: redacted@receiver.example, redacted@receiver.example" in text
    assert "i=redacted@sender.example" in text
    assert "Message-ID: <20231114.1@sender.example>" in text
    assert report.mail_from == "redacted@sender.example"


async def test_failure_reports_only_for_failures_and_rate_limited(
    services: Services, state_store: StateStore
) -> None:
    """Passing mail makes no failure report; at most failure_limit per domain and hour are kept."""
    limited = ReportSettings(email="dmarc-reports@receiver.example", failure_reports=True, failure_limit=2)
    await record(services, FACTS, settings=limited, queue_id="P1")
    for i in range(5):
        await record(services, FAILING, settings=limited, queue_id=f"F{i}")
    ns = state_store.namespace("dmarcreport")
    (key,) = [k async for k in ns.scan("*:f:*")]
    assert await ns._store._call("LLEN", key) == 2


async def test_failure_report_message_is_afrf(services: Services, state_store: StateStore) -> None:
    """The failure report is multipart/report with a feedback-report and redacted headers."""
    await record(services, FAILING, settings=FAILURES)
    report = await stored_failure(services, state_store)
    raw = report.message(
        sender="dmarc-reports@receiver.example",
        org_name="Receiver Org",
        submitter="receiver.example",
        recipient="fail@sender.example",
        now=DAY0 + 11 * HOUR,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "feedback-report"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/feedback-report",
        "text/rfc822-headers",
    ]
    feedback = raw.split(b"Content-Type: message/feedback-report\r\n")[1].split(b"\r\n--")[0].decode()
    feedback = feedback.replace("\r\n\t", " ")  # unfold
    fields = dict(line.split(": ", 1) for line in feedback.split("\r\n") if ": " in line)
    assert fields["Feedback-Type"] == "auth-failure"
    assert fields["Auth-Failure"] == "dmarc"
    assert fields["Identity-Alignment"] == "dkim, spf"
    assert fields["Source-IP"] == "192.0.2.1"
    assert fields["Reported-Domain"] == "sender.example"
    assert fields["Original-Mail-From"] == "<redacted@sender.example>"
    assert fields["Delivery-Result"] == "reject"
    assert fields["DKIM-Domain"] == "sender.example"
    assert fields["DKIM-Selector"] == "sel1"
    assert fields["Authentication-Results"].startswith(
        "receiver.example; dmarc=fail header.from=sender.example"
    )
    assert b"alice.secret" not in raw and b"merger" not in raw and b"Confidential" not in raw
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()


async def test_failure_reports_are_sent_to_ruf_once(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock
) -> None:
    """--send mails failure reports at once (no period to wait for), once each."""
    await record(services, FAILING, settings=FAILURES)
    assert await send(services, config, settings=FAILURES) == 0
    assert await send(services, config, settings=FAILURES) == 0
    (delivered,) = sink.messages
    assert delivered.rcpt_tos == ("fail@sender.example",)
    assert delivered.message().get_content_type() == "multipart/report"


async def test_no_failure_reports_when_fo_asks_only_for_dkim(
    services: Services, config: Config, sink: SmtpSink, state_store: StateStore
) -> None:
    """fo=d asks for DKIM failure reports, not DMARC ones: nothing is sent."""
    facts = FAILING | {
        "dmarc.policy_domain": "fod.example",
        "dmarc.from_domain": "fod.example",
        "dmarc.rua": "mailto:dmarc@fod.example",
    }
    await record(services, facts, settings=FAILURES)
    assert [k async for k in state_store.namespace("dmarcreport").scan("*:f:*")]
    assert await send(services, config, settings=FAILURES) == 0
    assert sink.messages == []


async def test_failure_reports_written_to_a_directory(
    services: Services, config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dir writes failure reports as .eml files next to the aggregate reports."""
    await record(services, FAILING, settings=FAILURES)
    args = parse("--dir", str(tmp_path))
    assert await run_command(args, config, services, settings=FAILURES) == 0
    (path,) = files(tmp_path)
    assert re.fullmatch(r"receiver\.example!sender\.example!failure![0-9a-f]{16}\.eml", path.name)
    assert b"Auth-Failure: dmarc" in read(path)


async def test_dns_trouble_with_the_policy_record_defers_the_report(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, dns: DnsServer
) -> None:
    """Without the record the check saw, the report needs DNS: a SERVFAIL postpones it."""
    await record(services)
    clock.advance(DAY)
    dns.servfail("_dmarc.sender.example")
    assert await send(services, config) == 1
    assert sink.messages == []
    dns.heal()
    assert await send(services, config) == 0
    assert to(sink) == ["dmarc@sender.example"]


def test_internationalized_destination_domains_become_a_labels() -> None:
    """A rua domain in Unicode is used in its ASCII form; a Unicode local part is refused."""
    uris, ignored = parse_report_uris("mailto:dmarc@bücher.example,mailto:jürgen@example.org")
    assert uris == [ReportURI("dmarc@xn--bcher-kva.example")]
    assert ignored == ["mailto:jürgen@example.org"]


async def test_an_organization_name_in_unicode(
    services: Services, config: Config, sink: SmtpSink, clock: FrozenClock, state_store: StateStore
) -> None:
    """A non-ASCII org_name is encoded in the From display name of both kinds of report."""
    settings = ReportSettings(
        org_name="Empfänger GmbH", email="dmarc-reports@receiver.example", failure_reports=True
    )
    await record(services, FAILING, settings=settings)
    clock.advance(DAY)
    assert await send(services, config, settings=settings) == 0
    assert len(sink.messages) == 2
    for delivered in sink.messages:
        assert delivered.data.isascii()
        assert delivered.message()["From"].addresses[0].display_name == "Empfänger GmbH"

"""End to end: a real private Postfix asks the real `mxward policyd`, whose SPF check asks the test DNS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import ThreadedDnsServer
from support.policy_client import running, write_config
from support.postfix import send_mail

pytestmark = pytest.mark.postfix

D = "spf.test.example"
RECIPIENTS = ["one@sink.test", "two@sink.test", "three@sink.test"]


@pytest.fixture
def mx(tmp_path: Path, postfix: Any, redis_server: Any, spf_dns: ThreadedDnsServer) -> Iterator[Any]:
    """mxward policyd with only the spf check, and a Postfix asking it at RCPT."""
    config, log, address = write_config(
        tmp_path,
        redis_server.url,
        policyd='checks = ["spf"]',
        extra=f'[dns]\nnameservers = ["{spf_dns.nameserver}"]\n[checks.spf]\n',
    )
    with running(config, log, address):
        yield postfix(policy_service=f"inet:{address}")


def test_an_spf_fail_sender_gets_550_5_7_23(mx: Any, tmp_path: Path) -> None:
    """A -all domain from a host it does not designate, and a bounce whose HELO fails: 550 5.7.23."""
    forged = send_mail(
        mx.smtpd_port, client_ip="127.0.2.99", mail_from=f"ceo@pass.{D}", rcpt_to=RECIPIENTS[:1]
    )
    reply = forged.rcpt[RECIPIENTS[0]]
    assert (reply.code, reply.enhanced) == (550, "5.7.23"), reply
    assert f"SPF fail: domain of pass.{D} does not designate 127.0.2.99 as permitted sender" in reply.text
    bounce = send_mail(
        mx.smtpd_port, client_ip="127.0.2.99", helo=f"helo.{D}", mail_from="", rcpt_to=RECIPIENTS[:1]
    )
    reply = bounce.rcpt[RECIPIENTS[0]]
    assert (reply.code, reply.enhanced) == (550, "5.7.23"), reply
    assert mx.queue() == []
    log = (tmp_path / "mxward.log").read_text()
    assert "spf:fail(" in log and "identity=helo" in log


def test_an_spf_pass_message_to_three_recipients_has_one_received_spf(mx: Any) -> None:
    """Three recipients, one message at the sink, exactly one Received-SPF header."""
    sent = send_mail(
        mx.smtpd_port,
        client_ip="127.0.2.1",
        mail_from=f"alice@pass.{D}",
        rcpt_to=RECIPIENTS,
        subject="spf pass",
    )
    assert [sent.rcpt[r].code for r in RECIPIENTS] == [250, 250, 250]
    assert sent.data is not None and sent.data.code == 250
    for rcpt in RECIPIENTS:
        mx.sink.wait_delivered(rcpt, timeout=20)
    messages = mx.sink.messages
    assert sorted(r for m in messages for r in m.rcpt_tos) == sorted(RECIPIENTS)
    for message in messages:
        headers = message.headers("Received-SPF")
        assert len(headers) == 1, f"expected exactly one Received-SPF, got {headers}"
        # "pass (<our host name>: domain of ...)": the daemon's host name is the machine's.
        assert headers[0].startswith("pass (")
        assert f": domain of pass.{D} designates 127.0.2.1 as permitted sender)" in headers[0]
        assert f'client-ip=127.0.2.1; envelope-from="alice@pass.{D}"; helo=client.test.example;' in headers[0]
        assert headers[0].endswith('identity=mailfrom; mechanism="ip4:127.0.2.1"')

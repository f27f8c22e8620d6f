"""End to end: karma books what a real Postfix did with each message, and boxes a bad client."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import ThreadedDnsServer
from support.policy_client import MXWARD, running, write_config
from support.postfix import send_mail

pytestmark = pytest.mark.postfix

D = "spf.test.example"


@pytest.fixture
def mx(tmp_path: Path, postfix: Any, redis_server: Any, spf_dns: ThreadedDnsServer) -> Iterator[Any]:
    """karma + spf; Postfix asks at RCPT and at END-OF-DATA (where clean messages are booked)."""
    config, log, address = write_config(
        tmp_path,
        redis_server.url,
        policyd='checks = ["karma", "spf"]',
        extra=f'[dns]\nnameservers = ["{spf_dns.nameserver}"]\n[checks.karma]\n[checks.spf]\n',
    )
    with running(config, log, address):
        instance = postfix(policy_service=f"inet:{address}", policy_end_of_data=True)
        instance.mxward_config = config
        yield instance


def karma(config: Path, *args: str) -> str:
    out = subprocess.run(
        [MXWARD, "--config", str(config), "karma", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_a_refused_client_is_boxed_and_refused_at_its_next_connection(mx: Any) -> None:
    """SPF forgery (550 5.7.23) books naughty; the next connection gets karma's 550 5.7.1."""
    bad = "127.0.5.66"
    forged = send_mail(mx.smtpd_port, client_ip=bad, mail_from=f"ceo@pass.{D}", rcpt_to=["a@sink.test"])
    assert forged.rcpt["a@sink.test"].code == 550
    assert wait_for(lambda: "BOXED" in karma(mx.mxward_config, "show", bad)), "not boxed"

    again = send_mail(
        mx.smtpd_port, client_ip=bad, mail_from="someone@elsewhere.test", rcpt_to=["b@sink.test"]
    )
    reply = again.rcpt["b@sink.test"]
    assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
    assert f"Too much bad mail from {bad}; refused for 23h59m" in reply.text or "refused for 1d" in reply.text
    # postmaster@ still reaches a human, and other clients are not affected.
    human = send_mail(
        mx.smtpd_port, client_ip=bad, mail_from="someone@elsewhere.test", rcpt_to=["postmaster@sink.test"]
    )
    assert human.rcpt["postmaster@sink.test"].code == 250
    good = send_mail(
        mx.smtpd_port, client_ip="127.0.2.1", mail_from=f"alice@pass.{D}", rcpt_to=["c@sink.test"]
    )
    assert good.rcpt["c@sink.test"].code == 250
    # The operator lets the client back in.
    assert "history=+5" in karma(mx.mxward_config, "allow", bad)
    back = send_mail(
        mx.smtpd_port, client_ip=bad, mail_from="someone@elsewhere.test", rcpt_to=["d@sink.test"]
    )
    assert back.rcpt["d@sink.test"].code == 250


def test_a_delivered_message_is_booked_once_at_end_of_data(mx: Any) -> None:
    """Three recipients, one message: one booking (neutral: SPF pass alone is not nice)."""
    client = "127.0.2.1"
    sent = send_mail(
        mx.smtpd_port,
        client_ip=client,
        mail_from=f"bob@pass.{D}",
        rcpt_to=["x@sink.test", "y@sink.test", "z@sink.test"],
    )
    assert sent.data is not None and sent.data.code == 250
    line = wait_for(lambda: (out := karma(mx.mxward_config, "show", client)) and "messages=1" in out and out)
    assert line, karma(mx.mxward_config, "show", client)
    assert "neutral=1" in line and "naughty=0" in line

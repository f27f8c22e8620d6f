"""End to end: a real private Postfix asks the real `mxward policyd` at RCPT time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from support.policy_client import running, write_config
from support.postfix import send_mail

pytestmark = pytest.mark.postfix

DELAY = 2  # seconds: greylisting's delay, shortened for the test


def start(
    tmp_path: Path, postfix: Any, state_url: str, *, policyd: str = "", greylist: str = "", **postfix_kw: Any
) -> tuple[Any, Any]:
    config, log, address = write_config(
        tmp_path,
        state_url,
        policyd=policyd,
        greylist=f'delay = "{DELAY}s"\n' + greylist,
    )
    daemon_cm = running(config, log, address)
    daemon_cm.__enter__()
    try:
        instance = postfix(policy_service=f"inet:{address}", **postfix_kw)
    except BaseException:
        daemon_cm.__exit__(None, None, None)
        raise
    return daemon_cm, instance


def test_first_attempt_is_greylisted_and_the_retry_is_delivered(
    tmp_path: Path, postfix: Any, redis_server: Any
) -> None:
    """From 127.0.0.2: 450 4.7.1 on the first try, accepted and delivered after the delay."""
    daemon_cm, pf = start(tmp_path, postfix, redis_server.url)
    try:
        first = send_mail(pf.smtpd_port, mail_from="alice@sender.example", rcpt_to=["bob@sink.test"])
        reply = first.rcpt["bob@sink.test"]
        assert (reply.code, reply.enhanced) == (450, "4.7.1"), reply
        assert "Greylisted, please try again in 2 seconds" in reply.text
        assert pf.queue() == []
        early = send_mail(pf.smtpd_port, mail_from="alice@sender.example", rcpt_to=["bob@sink.test"])
        assert early.rcpt["bob@sink.test"].code == 450
        time.sleep(DELAY + 0.2)
        retry = send_mail(
            pf.smtpd_port,
            mail_from="alice@sender.example",
            rcpt_to=["bob@sink.test"],
            subject="greylisted then delivered",
        )
        assert retry.rcpt["bob@sink.test"].code == 250
        assert retry.data is not None and retry.data.code == 250
        delivered = pf.sink.wait_delivered("bob@sink.test", timeout=20)
        delayed = int(delivered.headers("X-Greylist")[0].split()[1])  # "delayed N seconds by mxward ..."
        assert DELAY <= delayed <= DELAY + 2
        assert delivered.headers("Subject") == ["greylisted then delivered"]
        pf.wait_for_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]: 450 4\.7\.1 <bob@sink\.test>")
    finally:
        daemon_cm.__exit__(None, None, None)


def test_each_recipient_is_judged_on_its_own(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """In one transaction a known recipient is accepted while a new one waits."""
    daemon_cm, pf = start(tmp_path, postfix, redis_server.url)
    try:
        send_mail(pf.smtpd_port, mail_from="carol@sender.example", rcpt_to=["known@sink.test"])
        time.sleep(DELAY + 0.2)
        both = send_mail(
            pf.smtpd_port, mail_from="carol@sender.example", rcpt_to=["known@sink.test", "new@sink.test"]
        )
        assert both.rcpt["known@sink.test"].code == 250
        assert both.rcpt["new@sink.test"].code == 450
        message = pf.sink.wait_delivered("known@sink.test", timeout=20)
        assert message.rcpt_tos == ("known@sink.test",)
    finally:
        daemon_cm.__exit__(None, None, None)


def test_authenticated_client_is_not_greylisted(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """A client with a SASL login (here via XCLIENT LOGIN) gets 250 on the first try."""
    daemon_cm, pf = start(tmp_path, postfix, redis_server.url, xclient_hosts="127.0.0.3")
    try:
        result = send_mail(
            pf.smtpd_port,
            client_ip="127.0.0.3",
            mail_from="dave@sender.example",
            rcpt_to=["auth@sink.test"],
            xclient={"ADDR": "127.0.0.3", "NAME": "[UNAVAILABLE]", "LOGIN": "dave"},
        )
        assert result.rcpt["auth@sink.test"].code == 250
        pf.sink.wait_delivered("auth@sink.test", timeout=20)
    finally:
        daemon_cm.__exit__(None, None, None)
    log = (tmp_path / "mxward.log").read_text()
    assert "rcpt=<auth@sink.test> state=RCPT action=DUNNO score=0 exempt=sasl" in log


def test_allow_listed_network_is_not_greylisted(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """A client in [policyd.exempt] networks is accepted at once; one outside is not."""
    daemon_cm, pf = start(
        tmp_path, postfix, redis_server.url, policyd='[policyd.exempt]\nnetworks = ["127.0.0.4/32"]'
    )
    try:
        trusted = send_mail(
            pf.smtpd_port,
            client_ip="127.0.0.4",
            mail_from="erin@sender.example",
            rcpt_to=["trusted@sink.test"],
        )
        assert trusted.rcpt["trusted@sink.test"].code == 250
        other = send_mail(
            pf.smtpd_port,
            client_ip="127.0.0.5",
            mail_from="erin@sender.example",
            rcpt_to=["trusted@sink.test"],
        )
        assert other.rcpt["trusted@sink.test"].code == 450
        pf.sink.wait_delivered("trusted@sink.test", timeout=20)
    finally:
        daemon_cm.__exit__(None, None, None)


def test_with_redis_stopped_postfix_still_gets_an_answer_in_time(
    tmp_path: Path, postfix: Any, redis_factory: Any
) -> None:
    """Redis going away never leaves Postfix waiting: greylisting fails open within the deadline."""
    server = redis_factory()
    daemon_cm, pf = start(tmp_path, postfix, server.url)
    try:
        assert (
            send_mail(pf.smtpd_port, mail_from="f@sender.example", rcpt_to=["before@sink.test"])
            .rcpt["before@sink.test"]
            .code
            == 450
        )
        server.stop()
        started = time.monotonic()
        during = send_mail(pf.smtpd_port, mail_from="f@sender.example", rcpt_to=["during@sink.test"])
        elapsed = time.monotonic() - started
        assert during.rcpt["during@sink.test"].code == 250
        assert elapsed < 5, f"answer took {elapsed:.1f}s"
        pf.sink.wait_delivered("during@sink.test", timeout=20)
        assert "Policy service unavailable" not in pf.maillog()
    finally:
        daemon_cm.__exit__(None, None, None)
    assert "greylist:error(" in (tmp_path / "mxward.log").read_text()

"""End to end: a real private Postfix asks `mxward policyd`, whose dnsbl check asks a real rbldnsd.

The daemon's resolver is the test DNS server (in a thread), which forwards the list zones to
rbldnsd (tests/data/rbldnsd). Clients connect from 127.0.3.x: 127.0.3.2 is listed with a TXT
record naming it, 127.0.3.3 is listed with code 127.0.0.4, 127.0.3.9 is not listed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import ThreadedDnsServer
from support.policy_client import running, write_config
from support.postfix import send_mail
from support.rbldnsd import DNSBL_ZONE, Rbldnsd

pytestmark = pytest.mark.postfix

RCPT = "bob@sink.test"


@pytest.fixture
def list_dns(rbldnsd: Rbldnsd) -> Iterator[ThreadedDnsServer]:
    """The test DNS server in a thread (the daemon is another process), forwarding to rbldnsd."""
    with ThreadedDnsServer([DNSBL_ZONE]) as server:
        rbldnsd.forward_from(server)
        yield server


def start(tmp_path: Path, postfix: Any, state_url: str, nameserver: str, zones: str) -> tuple[Any, Any]:
    config, log, address = write_config(
        tmp_path,
        state_url,
        policyd='checks = ["greylist", "dnsbl"]',
        greylist="enabled = false",
        extra=f'[dns]\nnameservers = ["{nameserver}"]\nlifetime = "2s"\n[checks.dnsbl]\n{zones}',
    )
    daemon_cm = running(config, log, address)
    daemon_cm.__enter__()
    try:
        instance = postfix(policy_service=f"inet:{address}")
    except BaseException:
        daemon_cm.__exit__(None, None, None)
        raise
    return daemon_cm, instance


def test_a_listed_client_gets_5xx_at_rcpt_with_the_lists_text(
    tmp_path: Path, postfix: Any, redis_server: Any, list_dns: ThreadedDnsServer
) -> None:
    """127.0.3.2 (listed): 550 5.7.1 naming the list and its TXT; 127.0.3.9: accepted and delivered."""
    zones = '[[checks.dnsbl.zones]]\nzone = "bl.dnsbl.test"\n'
    daemon_cm, pf = start(tmp_path, postfix, redis_server.url, list_dns.nameserver, zones)
    try:
        listed = send_mail(pf.smtpd_port, client_ip="127.0.3.2", mail_from="a@sender.example", rcpt_to=[RCPT])
        reply = listed.rcpt[RCPT]
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        assert "Client host [127.0.3.2] blocked using bl.dnsbl.test" in reply.text
        assert "Listed in bl.dnsbl.test, see https://bl.dnsbl.test/query?ip=127.0.3.2" in reply.text
        clean = send_mail(
            pf.smtpd_port,
            client_ip="127.0.3.9",
            mail_from="a@sender.example",
            rcpt_to=[RCPT],
            subject="not listed",
        )
        assert clean.rcpt[RCPT].code == 250
        assert clean.data is not None and clean.data.code == 250
        delivered = pf.sink.wait_delivered(RCPT, timeout=20)
        assert delivered.headers("Subject") == ["not listed"]
    finally:
        daemon_cm.__exit__(None, None, None)
    log = (tmp_path / "mxward.log").read_text()
    assert "dnsbl:fail(+10," in log
    assert "listed=bl.dnsbl.test:127.0.0.2" in log


def test_a_reject_zone_answers_at_once_and_dns_trouble_lets_mail_through(
    tmp_path: Path, postfix: Any, redis_server: Any, list_dns: ThreadedDnsServer
) -> None:
    """Bit 4 with action = "reject": 554 5.7.1 with the TXT at once; while the lookup SERVFAILs: 250."""
    zones = '[[checks.dnsbl.zones]]\nzone = "bl.dnsbl.test"\ncodes = ["&4"]\naction = "reject"\n'

    daemon_cm, pf = start(tmp_path, postfix, redis_server.url, list_dns.nameserver, zones)
    try:
        dynamic = send_mail(
            pf.smtpd_port, client_ip="127.0.3.3", mail_from="a@sender.example", rcpt_to=[RCPT]
        )
        reply = dynamic.rcpt[RCPT]
        assert (reply.code, reply.enhanced) == (554, "5.7.1"), reply
        assert "Address 127.0.3.3 is a dynamic address" in reply.text
        list_dns.servfail("5.3.0.127.bl.dnsbl.test")  # 127.0.3.5 is listed with 127.0.0.12
        failing = send_mail(
            pf.smtpd_port, client_ip="127.0.3.5", mail_from="a@sender.example", rcpt_to=[RCPT]
        )
        assert failing.rcpt[RCPT].code == 250
        pf.sink.wait_delivered(RCPT, timeout=20)
        list_dns.heal()
        healed = send_mail(pf.smtpd_port, client_ip="127.0.3.5", mail_from="a@sender.example", rcpt_to=[RCPT])
        assert healed.rcpt[RCPT].code == 554
    finally:
        daemon_cm.__exit__(None, None, None)
    log = (tmp_path / "mxward.log").read_text()
    assert "dnsbl:error(" in log
    assert "errors=bl.dnsbl.test:servfail" in log

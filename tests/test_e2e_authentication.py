"""End to end: DKIM and DMARC through a real Postfix and `mxward filter` / `mxward run`.

A message signed by Perl's Mail::DKIM (the independent reference) for example.com, which
publishes p=reject, is delivered with dkim=pass and dmarc=pass; the same message altered in
transit is quarantined after-queue and refused with a 5xx in proxy mode; an authenticated
submission (XCLIENT LOGIN, so policyd records the SASL login for the filter) leaves signed with
an RSA and an Ed25519 key, and Mail::DKIM verifies both signatures it knows.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dnsserver import ThreadedDnsServer
from support.filter_setup import filter_lab
from support.postfix import build_message, send_mail

pytestmark = pytest.mark.postfix

DKIM_DATA = Path(__file__).resolve().parent / "data" / "dkim"


@pytest.fixture
def auth_dns(tmp_path: Path) -> Iterator[ThreadedDnsServer]:
    """example.com's DKIM keys (tests/data/dkim/dkim.zone) and a p=reject DMARC record."""
    zone = tmp_path / "auth.zone"
    text = (DKIM_DATA / "dkim.zone").read_text()
    ns = "@ NS ns.example.com.\n"
    assert ns in text
    zone.write_text(text.replace(ns, ns + '_dmarc TXT "v=DMARC1; p=reject; adkim=r; aspf=r"\n', 1))
    # The DMARC tree walk also asks about com. (NXDOMAIN there, as on the Internet).
    top = tmp_path / "com.zone"
    top.write_text(
        "$TTL 300\n$ORIGIN com.\n@ SOA ns.com. hostmaster.com. 1 3600 600 86400 300\n@ NS ns.com.\n"
    )
    with ThreadedDnsServer([zone, top]) as server:
        yield server


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    for name in ("example.com.rsa.key", "example.com.ed.key"):
        shutil.copy(DKIM_DATA / name, folder / name)
        (folder / name).chmod(0o600)
    return folder


def mail_dkim_sign(message: bytes) -> bytes:
    done = subprocess.run(
        [
            "perl",
            str(DKIM_DATA / "dkimsign.pl"),
            "--key",
            str(DKIM_DATA / "example.com.rsa.key"),
            "--domain",
            "example.com",
            "--selector",
            "rsa",
            "--method",
            "relaxed/relaxed",
        ],
        input=message,
        capture_output=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def mail_dkim_verify(message: bytes, dns: ThreadedDnsServer) -> dict[str, str]:
    """selector -> Mail::DKIM's result for each signature."""
    done = subprocess.run(
        ["perl", str(DKIM_DATA / "dkimverify.pl"), "--dns", dns.nameserver],
        input=message,
        capture_output=True,
        check=True,
        timeout=60,
    )
    lines = done.stdout.decode().splitlines()[:-1]  # "result domain selector algorithm detail"
    return {line.split()[2]: line.split()[0] for line in lines}


def checks_table(dns: ThreadedDnsServer) -> str:
    """The filter asks only the test DNS server (the client's SPF cannot align here: DKIM decides)."""
    return f'[dns]\nnameservers = ["{dns.nameserver}"]\n'


FILTER_CHECKS = 'checks = ["headers", "dkim", "arc", "dmarc"]\n'


def signed_message() -> bytes:
    body = "A signed message.\nWith two lines.\n"
    return mail_dkim_sign(build_message("news@example.com", ["bob@sink.test"], subject="signed", body=body))


@pytest.mark.parametrize("mode", ["after-queue", "proxy"])
def test_signed_mail_passes_and_altered_mail_is_stopped(
    tmp_path: Path, postfix: Any, redis_server: Any, auth_dns: ThreadedDnsServer, mode: str
) -> None:
    signed = signed_message()
    altered = signed.replace(b"With two lines.", b"With two lines, altered in transit.")
    with filter_lab(
        tmp_path,
        postfix,
        redis_server.url,
        mode=mode,
        filter_extra=FILTER_CHECKS,
        extra=checks_table(auth_dns),
    ) as lab:
        good = send_mail(
            lab.postfix.smtpd_port, mail_from="news@example.com", rcpt_to=["bob@sink.test"], message=signed
        )
        assert good.data is not None and good.data.code == 250, good
        delivered = lab.postfix.sink.wait_delivered("bob@sink.test", timeout=20)
        ar = delivered.headers("Authentication-Results")
        assert len(ar) == 1, ar
        assert "dkim=pass" in ar[0] and "header.d=example.com" in ar[0] and "header.s=rsa" in ar[0], ar[0]
        assert "dmarc=pass" in ar[0] and "header.from=example.com" in ar[0], ar[0]

        bad = send_mail(
            lab.postfix.smtpd_port, mail_from="news@example.com", rcpt_to=["carol@sink.test"], message=altered
        )
        assert bad.data is not None
        if mode == "proxy":
            assert bad.data.code >= 500 and "DMARC" in bad.data.text, bad.data
        else:
            assert bad.data.code == 250  # queued by Postfix, then quarantined: no bounce
            line = lab.daemon.wait_log("action=quarantine", timeout=20)
            assert "dmarc:fail" in line and "dkim:fail" in line, line
        assert lab.postfix.sink.delivered_to("carol@sink.test") == []


def test_authenticated_submission_leaves_signed_with_both_keys(
    tmp_path: Path, postfix: Any, redis_server: Any, auth_dns: ThreadedDnsServer, keys: Path
) -> None:
    signing = (
        f"{checks_table(auth_dns)}"
        "[[checks.dkim.keys]]\n"
        f'domain = "example.com"\nselector = "rsa"\nkey_file = "{keys}/example.com.rsa.key"\n'
        'algorithm = "rsa-sha256"\n'
        "[[checks.dkim.keys]]\n"
        f'domain = "example.com"\nselector = "ed"\nkey_file = "{keys}/example.com.ed.key"\n'
        'algorithm = "ed25519-sha256"\n'
    )
    with filter_lab(
        tmp_path,
        postfix,
        redis_server.url,
        command="run",
        filter_extra=FILTER_CHECKS,
        extra=signing,
        policyd_extra='checks = ["karma"]\n',
        xclient_hosts="127.0.0.2",
    ) as lab:
        sent = send_mail(
            lab.postfix.smtpd_port,
            mail_from="alice@example.com",
            rcpt_to=["dave@sink.test"],
            body="Outgoing mail from an authenticated user.\n",
            xclient={"LOGIN": "alice"},
        )
        assert sent.data is not None and sent.data.code == 250, sent
        delivered = lab.postfix.sink.wait_delivered("dave@sink.test", timeout=20)
        signatures = delivered.headers("DKIM-Signature")
        assert len(signatures) == 2, signatures
        assert {"a=rsa-sha256", "a=ed25519-sha256"} <= {
            part.strip() for sig in signatures for part in sig.split(";")
        }
        results = mail_dkim_verify(delivered.data, auth_dns)
        assert results["rsa"] == "pass", results
        # Debian 12's Mail::DKIM cannot verify Ed25519; a newer one must say pass
        assert results["ed"] in ("pass", "invalid"), results
        line = lab.daemon.wait_log("filter queue=")
        assert "policyd=found" in line

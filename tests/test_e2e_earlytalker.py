"""End to end: a real Postfix configured with what `mxward postfix-config` prints for earlytalker.

postscreen(8) answers the public port in front of smtpd, smtpd refuses unauthorised pipelining,
and smtpd behind postscreen still asks the real `mxward policyd`. The impolite clients are raw
sockets (they must break the protocol on purpose); the polite one is smtplib.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.policy_client import MXWARD, Daemon, running, write_config
from support.postfix import PostfixConfig, Reply, parse_postfix_config, send_mail

pytestmark = pytest.mark.postfix

GREET_WAIT = 2  # seconds: postscreen_greet_wait, shortened for the test
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Site:
    """A running policy daemon and the private Postfix configured from its postfix-config output."""

    postfix: Any
    daemon: Daemon
    printed: PostfixConfig


@contextlib.contextmanager
def site(
    tmp_path: Path, postfix: Any, state_url: str, *, earlytalker: str = "", exempt: str = ""
) -> Iterator[Site]:
    """Start `mxward policyd` (checks = ["earlytalker"]) and a Postfix set up with its printed lines."""
    config, log, address = write_config(
        tmp_path,
        state_url,
        policyd='checks = ["earlytalker"]',
        extra=(
            f"[policyd.exempt]\nnetworks = [{exempt}]\n"
            f'[checks.earlytalker]\ngreet_wait = "{GREET_WAIT}s"\nstress_greet_wait = "{GREET_WAIT}s"\n'
            f"{earlytalker}"
        ),
    )
    out = subprocess.run(
        [MXWARD, "--config", str(config), "postfix-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = parse_postfix_config(out.stdout)
    with running(config, log, address) as daemon:
        instance = postfix(extra_main_cf=printed.main_cf, public_service=printed.master_cf)
        yield Site(instance, daemon, printed)


class RawClient:
    """An SMTP client that sends exactly what it is told, when it is told."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(
            (LOOPBACK, port), timeout=GREET_WAIT + 10, source_address=(source, 0)
        )
        self.reader = self.sock.makefile("rb")

    def line(self) -> str:
        """One line without its line end; "" when the server closed the connection."""
        try:
            return self.reader.readline(4096).decode("ascii", "replace").rstrip("\r\n")
        except ConnectionResetError:
            return ""

    def reply(self) -> Reply:
        """The next complete (possibly multi-line) reply; code 0 when the server hung up."""
        texts: list[str] = []
        while line := self.line():
            texts.append(line[4:])
            if line[3:4] != "-":
                return Reply(int(line[:3]), "\n".join(texts))
        return Reply(0, "connection closed by server")

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a server that already hung up is seen at the next reply
            self.sock.sendall(data)

    def ask(self, command: str) -> Reply:
        self.send(command.encode() + b"\r\n")
        return self.reply()

    def greeting(self) -> Reply:
        """Wait for the whole greeting, as a polite client does."""
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        self.reader.close()
        self.sock.close()


@contextlib.contextmanager
def raw_client(port: int, source: str) -> Iterator[RawClient]:
    client = RawClient(port, source)
    try:
        yield client
    finally:
        client.close()


def talk_early(port: int, source: str) -> dict[str, Reply]:
    """Send EHLO right after the first greeting line (the teaser), then MAIL and RCPT."""
    with raw_client(port, source) as client:
        teaser = client.line()
        assert teaser.startswith("220-"), teaser  # postscreen's teaser: the greeting is not complete
        client.send(b"EHLO early.example\r\n")
        ehlo = client.reply()
        if ehlo.code == 220:  # the rest of the greeting came first (nobody stopped us)
            ehlo = client.reply()
        replies = {"ehlo": ehlo}
        if ehlo.code == 250:
            replies["mail"] = client.ask("MAIL FROM:<bot@sender.example>")
            replies["rcpt"] = client.ask("RCPT TO:<bob@sink.test>")
        return replies


# ---- talking before the greeting (postscreen's pregreet test)


@dataclass(frozen=True)
class PregreetCase:
    action: str  # greet_action
    client: str
    expected: dict[str, tuple[int, str | None]]  # step -> (code, enhanced code)
    log: str  # maillog line (regex) that shows what postscreen did


PREGREET_CASES = {
    "enforce-550-at-rcpt": PregreetCase(
        "enforce",
        "127.0.6.10",
        {"ehlo": (250, None), "mail": (250, "2.1.0"), "rcpt": (550, "5.5.1")},
        r"NOQUEUE: reject: RCPT from \[127\.0\.6\.10\]:\d+: 550 5\.5\.1 Protocol error; "
        r"from=<bot@sender\.example>, to=<bob@sink\.test>, proto=ESMTP, helo=<early\.example>",
    ),
    "drop-521": PregreetCase("drop", "127.0.6.20", {"ehlo": (521, "5.5.1")}, r"DISCONNECT \[127\.0\.6\.20\]"),
    "ignore-logs-only": PregreetCase(
        "ignore",
        "127.0.6.30",
        {"ehlo": (250, None), "mail": (250, "2.1.0"), "rcpt": (250, "2.1.5")},
        r"postfix/smtpd\[\d+\]: connect from unknown\[127\.0\.6\.30\]",  # handed on, not refused
    ),
}


@pytest.mark.parametrize("case", PREGREET_CASES.values(), ids=PREGREET_CASES.keys())
def test_a_client_that_talks_before_the_greeting(
    tmp_path: Path, postfix: Any, redis_server: Any, case: PregreetCase
) -> None:
    """EHLO before the 220 greeting: PREGREET, then 550 5.5.1 at RCPT (enforce), 521 (drop) or nothing."""
    with site(tmp_path, postfix, redis_server.url, earlytalker=f'greet_action = "{case.action}"\n') as s:
        assert s.printed.main_cf["postscreen_greet_action"] == case.action
        replies = talk_early(s.postfix.smtpd_port, case.client)
        assert {step: (r.code, r.enhanced) for step, r in replies.items()} == case.expected, replies
        if case.action != "ignore":
            assert "Protocol error" in replies[list(case.expected)[-1]].text
        escaped = case.client.replace(".", r"\.")
        s.postfix.wait_for_log(rf"PREGREET \d+ after [\d.]+ from \[{escaped}\]:\d+: EHLO early\.example")
        s.postfix.wait_for_log(case.log)
        assert s.postfix.queue() == []
        assert s.postfix.sink.messages == []


def test_an_exempt_client_is_not_tested(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """A client in [policyd.exempt] networks goes straight to smtpd: no wait, no pregreet test."""
    with site(tmp_path, postfix, redis_server.url, exempt='"127.0.6.40/32"') as s:
        assert "127.0.6.40/32 permit" in s.printed.main_cf["postscreen_access_list"]
        started = time.monotonic()
        with raw_client(s.postfix.smtpd_port, "127.0.6.40") as client:
            client.send(b"EHLO early.example\r\n")  # at once: no greeting line seen yet
            greeting = client.reply()
            ehlo = client.reply()
            rcpt = (client.ask("MAIL FROM:<a@sender.example>"), client.ask("RCPT TO:<bob@sink.test>"))
        assert greeting.code == 220 and s.postfix.token in greeting.text
        assert time.monotonic() - started < GREET_WAIT
        assert (ehlo.code, rcpt[0].code, rcpt[1].code) == (250, 250, 250)
        s.postfix.wait_for_log(r"ALLOWLISTED \[127\.0\.6\.40\]")
        assert "PREGREET" not in s.postfix.maillog()


# ---- the polite client


def test_a_polite_client_waits_once_and_its_mail_is_delivered(
    tmp_path: Path, postfix: Any, redis_server: Any
) -> None:
    """A client that waits gets the greeting after greet_wait, delivers, and is not delayed again."""
    with site(tmp_path, postfix, redis_server.url) as s:
        port = s.postfix.smtpd_port
        started = time.monotonic()
        first = send_mail(
            port, mail_from="alice@sender.example", rcpt_to=["bob@sink.test"], client_ip="127.0.6.50"
        )
        first_took = time.monotonic() - started
        assert first.banner.code == 220
        teaser, banner = first.banner.text.split("\n")  # postscreen's 220- line, then smtpd's 220
        assert s.postfix.token in teaser and s.postfix.token in banner
        assert first.rcpt["bob@sink.test"].code == 250
        assert first.data is not None and first.data.code == 250
        assert first_took >= GREET_WAIT - 0.1
        s.postfix.sink.wait_delivered("bob@sink.test", timeout=20)
        s.postfix.wait_for_log(r"PASS NEW \[127\.0\.6\.50\]")
        # smtpd behind postscreen still asks mxward, with the real client address
        s.daemon.wait_log("client=unknown[127.0.6.50]")

        started = time.monotonic()
        again = send_mail(
            port, mail_from="alice@sender.example", rcpt_to=["carol@sink.test"], client_ip="127.0.6.50"
        )
        assert again.data is not None and again.data.code == 250
        assert time.monotonic() - started < GREET_WAIT  # remembered for greet_ttl: no wait
        s.postfix.wait_for_log(r"PASS OLD \[127\.0\.6\.50\]")
        s.postfix.sink.wait_delivered("carol@sink.test", timeout=20)
        assert "PREGREET" not in s.postfix.maillog()


# ---- pipelining without leave (smtpd)

BURST = b"MAIL FROM:<bot@sender.example>\r\nRCPT TO:<bob@sink.test>\r\nDATA\r\n"
BODY = b"Subject: pipelined\r\n\r\nbody\r\n.\r\n"


@dataclass(frozen=True)
class PipeliningCase:
    earlytalker: str  # extra [checks.earlytalker] lines
    hello: str  # HELO (no PIPELINING offered) or EHLO
    burst: bytes  # sent in one write after the HELO/EHLO reply
    expected: list[tuple[int, str | None]]  # the replies (code 0: disconnected)
    log: str  # maillog line (regex)


NO_DISCONNECT = "forbid_unauth_pipelining = false\n"
PIPELINING_CASES = {
    "helo-burst-disconnected": PipeliningCase(
        "",
        "HELO",
        BURST,
        [(554, "5.5.0"), (0, None)],
        r"improper command pipelining after MAIL from unknown\[127\.0\.6\.60\]",
    ),
    "helo-burst-refused-at-data": PipeliningCase(
        NO_DISCONNECT,
        "HELO",
        BURST,
        [(250, "2.1.0"), (250, "2.1.5"), (503, "5.5.0")],
        r"reject: DATA from unknown\[127\.0\.6\.60\]: 503 5\.5\.0 <DATA>: Data command rejected: "
        r"Improper use of SMTP command pipelining",
    ),
    "helo-burst-observe-logs-only": PipeliningCase(
        'mode = "observe"\n',
        "HELO",
        BURST,
        [(250, "2.1.0"), (250, "2.1.5"), (354, None)],
        r"reject_warning: DATA from unknown\[127\.0\.6\.60\]: 503 5\.5\.0",
    ),
    "ehlo-text-with-data-disconnected": PipeliningCase(
        "",
        "EHLO",
        BURST + BODY,
        [(250, "2.1.0"), (250, "2.1.5"), (554, "5.5.0"), (0, None)],
        r"improper command pipelining after DATA from unknown\[127\.0\.6\.60\]",
    ),
    "ehlo-text-with-data-refused-at-data": PipeliningCase(
        NO_DISCONNECT,
        "EHLO",
        BURST + BODY,
        [(250, "2.1.0"), (250, "2.1.5"), (503, "5.5.0")],
        r"reject: DATA from unknown\[127\.0\.6\.60\]: 503 5\.5\.0",
    ),
}


@pytest.mark.parametrize("case", PIPELINING_CASES.values(), ids=PIPELINING_CASES.keys())
def test_pipelining_without_leave_is_refused(
    tmp_path: Path, postfix: Any, redis_server: Any, case: PipeliningCase
) -> None:
    """Commands sent ahead of time where RFC 2920 does not allow it: 554 and disconnect, or 503 at DATA."""
    with site(tmp_path, postfix, redis_server.url, earlytalker=case.earlytalker) as s:
        with raw_client(s.postfix.smtpd_port, "127.0.6.60") as client:
            assert client.greeting().code == 220
            assert client.ask(f"{case.hello} pipe.example").code == 250
            client.send(case.burst)
            replies = [client.reply() for _ in case.expected]
        assert [(r.code, r.enhanced) for r in replies] == case.expected, replies
        s.postfix.wait_for_log(case.log)
        assert s.postfix.queue() == []
        assert s.postfix.sink.messages == []


def test_pipelining_after_ehlo_is_accepted(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """MAIL/RCPT/DATA in one write after EHLO is what PIPELINING allows: the mail is delivered."""
    with site(tmp_path, postfix, redis_server.url) as s:
        assert s.printed.main_cf["smtpd_forbid_unauth_pipelining"] == "yes"
        with raw_client(s.postfix.smtpd_port, "127.0.6.70") as client:
            assert client.greeting().code == 220
            assert "PIPELINING" in client.ask("EHLO pipe.example").text
            client.send(BURST.replace(b"bot@", b"dave@"))
            replies = [client.reply() for _ in range(3)]
            assert [r.code for r in replies] == [250, 250, 354], replies
            client.send(BODY)
            assert client.reply().code == 250
        delivered = s.postfix.sink.wait_delivered("bob@sink.test", timeout=20)
        assert delivered.mail_from == "dave@sender.example"
        assert "improper command pipelining" not in s.postfix.maillog()

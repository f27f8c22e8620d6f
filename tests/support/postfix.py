"""A private, throw-away Postfix instance on loopback for end-to-end tests.

What it builds (the tested recipe of the Postfix protocol reference, section 7):

* a scratch directory ``/tmp/mxpf-XXXXXXXX`` (mode 0755, so the ``postfix``-owned daemons can
  enter it) holding ``etc/`` (main.cf, master.cf), ``spool/`` (queue), ``data/``, ``log/maillog`` and
  ``mail/`` (Maildirs);
* one smtpd listener on ``127.0.0.1:<free port>``; ``mynetworks = 127.0.0.1/32``, so a client bound
  to 127.0.0.2 or above is an ordinary Internet client that may only send to our own domains;
* routing: ``sink.test`` is relayed to an in-process :class:`SmtpSink`; ``local.test`` is delivered
  by virtual(8) into ``mail/<user>/`` Maildirs; everything else (bounces, DSNs, other domains)
  goes to the ``error:`` transport, so nothing ever leaves the host;
* optional policy delegation (``check_policy_service``) at RCPT, and if asked at DATA and
  END-OF-DATA, with ``default_action = 451 4.3.5 Policy service unavailable``;
* ``chroot = n`` everywhere, no syslog (``maillog_file`` through the ``postlog`` service).

Postfix must be installed (``apt-get install -y postfix``) and the tests must run as root:
master(8) needs root to start. Postfix listeners use SO_REUSEPORT, so two instances on one port
would silently share connections; ports are therefore bind-tested and checked with ``ss -ltn``,
and after start the harness verifies that only this instance's master owns its smtpd port.

Everything blocking has a synchronous form; the ``*_async`` forms run it in a worker thread or
poll with ``asyncio.sleep``, so an asyncio server in the test's own loop (e.g. a policy server)
keeps answering while a test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import email.utils
import functools
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import smtplib
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, Self, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
    from types import TracebackType

__all__ = [
    "DEFAULT_POLICY_ACTION",
    "DeliveredMessage",
    "PostfixConfig",
    "PostfixError",
    "PostfixInstance",
    "QueuedMessage",
    "QueuedRecipient",
    "Reply",
    "SendResult",
    "SmtpSink",
    "build_message",
    "find_free_port",
    "find_free_ports",
    "find_postfix_tool",
    "parse_postfix_config",
    "postfix_missing_reason",
    "send_mail",
    "send_mail_async",
    "xtext",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SINK_DOMAIN = "sink.test"
LOCAL_DOMAIN = "local.test"
DEFAULT_POLICY_ACTION = "451 4.3.5 Policy service unavailable"
NOBODY_UID = 65534  # virtual(8) delivers as this uid/gid (static maps below)
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
_POSTFIX_TOOLS = ("postfix", "postconf", "postqueue", "postsuper")


class PostfixError(RuntimeError):
    """The private instance could not be built, started, queried or stopped."""


# --------------------------------------------------------------------------------------------
# Tools and ports


def find_postfix_tool(name: str) -> str:
    """Absolute path of a Postfix command (``postfix``, ``postqueue``...), also outside $PATH."""
    path = shutil.which(name, path=_TOOL_PATH)
    if path is None:
        raise PostfixError(f"{name} not found: install Postfix with `apt-get install -y postfix`")
    return path


def postfix_missing_reason() -> str | None:
    """Why a private instance cannot run here (not installed, not root), or None if it can."""
    missing = [tool for tool in _POSTFIX_TOOLS if shutil.which(tool, path=_TOOL_PATH) is None]
    if missing:
        return (
            f"Postfix is not installed ({', '.join(missing)} not found); install it with "
            "`DEBIAN_FRONTEND=noninteractive apt-get install -y postfix` "
            "(answer 'No configuration': the tests never use /etc/postfix)"
        )
    if os.geteuid() != 0:
        return "the private Postfix instance needs root: master(8) only starts as root"
    return None


_handed_out_lock = threading.Lock()
_handed_out: set[int] = set()  # ports this process already gave away: never hand one out twice


def _ss() -> str:
    ss = shutil.which("ss", path=_TOOL_PATH)
    if ss is None:
        raise PostfixError("ss not found: install it with `apt-get install -y iproute2`")
    return ss


def _listening_ports() -> set[int]:
    """Ports with a TCP listener on any address, from ``ss -Hltn`` (IPv4 and IPv6)."""
    out = subprocess.run([_ss(), "-Hltn"], capture_output=True, text=True, check=True, timeout=10).stdout
    ports: set[int] = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            _, _, port = fields[3].rpartition(":")
            if port.isdigit():
                ports.add(int(port))
    return ports


def _bind_free(host: str, port: int) -> bool:
    """True if a plain TCP socket (no SO_REUSEADDR/SO_REUSEPORT) can bind host:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _candidate_range() -> tuple[int, int]:
    """Ports below the kernel's ephemeral range, so outgoing connections never collide with them."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (20000, low) if low - 20000 >= 2000 else (40000, 60000)


def find_free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Distinct TCP ports that are free right now: bind-tested on ``host`` and absent from ``ss -ltn``.

    Ports come from below the ephemeral range and are never handed out twice in one process.
    A port is only free until someone binds it: use it promptly.
    """
    low, high = _candidate_range()
    chosen: list[int] = []
    with _handed_out_lock:
        listening = _listening_ports()
        for _ in range(2000):
            if len(chosen) == count:
                break
            port = random.randrange(low, high)
            if port in _handed_out or port in listening or port in chosen:
                continue
            if _bind_free(host, port) and _bind_free("0.0.0.0", port):
                chosen.append(port)
        if len(chosen) < count:
            raise PostfixError(f"found only {len(chosen)} of {count} free ports in {low}-{high}")
        # the double check: nothing started listening on them while we were choosing
        if busy := set(chosen) & _listening_ports():
            raise PostfixError(f"ports {sorted(busy)} became busy while being chosen")
        _handed_out.update(chosen)
    return chosen


def find_free_port(host: str = LOOPBACK) -> int:
    """One TCP port that is free right now (see :func:`find_free_ports`)."""
    return find_free_ports(1, host)[0]


def _port_free(port: int, host: str = LOOPBACK) -> bool:
    return _bind_free(host, port) and port not in _listening_ports()


# --------------------------------------------------------------------------------------------
# SMTP sink


@dataclass(frozen=True)
class DeliveredMessage:
    """One transaction received by the sink, as Postfix's smtp(8) client sent it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    rcpt_options: tuple[tuple[str, ...], ...]  # per recipient, same order as rcpt_tos
    data: bytes  # CRLF line ends, dot-stuffing removed, without the final "."
    helo: str
    peer: tuple[str, int]
    xforward: tuple[tuple[str, str], ...] = ()  # XFORWARD attributes of this transaction

    def message(self) -> email.message.EmailMessage:
        """The data parsed with the modern email policy."""
        parsed = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        return parsed

    def headers(self, name: str) -> list[str]:
        """All values of one header field, top (newest) first, unfolded."""
        return [str(value) for value in self.message().get_all(name, [])]


def _split_path(arg: str, keyword: str) -> tuple[str, tuple[str, ...]] | None:
    """'FROM:<a@b> SIZE=1' -> ('a@b', ('SIZE=1',)); None on a syntax error."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None
    end = rest.index(">")
    return rest[1:end], tuple(rest[end + 1 :].split())


class _SinkHandler(socketserver.StreamRequestHandler):
    timeout = 60
    server: _SinkServer

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode("utf-8") + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        sink = self.server.sink
        self._reply("220 sink.test.example ESMTP mxward test sink")
        helo = ""
        mail_from: str | None = None
        mail_options: tuple[str, ...] = ()
        rcpts: list[tuple[str, tuple[str, ...]]] = []
        xforward: list[tuple[str, str]] = []
        while True:
            raw = self.rfile.readline(65536)
            if not raw:
                return
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                helo = arg
                features = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"]
                if sink.xforward:
                    features.append("XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
                if sink.smtputf8:
                    features.append("SMTPUTF8")
                self._reply("250-sink.test.example")
                for feature in features[:-1]:
                    self._reply(f"250-{feature}")
                self._reply(f"250 {features[-1]}")
            elif verb == "HELO":
                helo = arg
                self._reply("250 sink.test.example")
            elif verb == "MAIL":
                parsed = _split_path(arg, "FROM:")
                if parsed is None:
                    self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                    continue
                reply = sink.mail_reply or "250 2.1.0 Ok"
                if reply.startswith("2"):
                    (mail_from, mail_options), rcpts = parsed, []
                self._reply(reply)
            elif verb == "RCPT":
                parsed = _split_path(arg, "TO:")
                if mail_from is None or parsed is None:
                    self._reply(
                        "503 5.5.1 Error: need MAIL command"
                        if mail_from is None
                        else "501 5.5.4 Syntax: RCPT TO:<address>"
                    )
                    continue
                reply = sink.rcpt_replies.get(parsed[0]) or sink.rcpt_reply or "250 2.1.5 Ok"
                if reply.startswith("2"):
                    rcpts.append(parsed)
                self._reply(reply)
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self._reply("554 5.5.1 Error: no valid recipients")
                    continue
                self._reply("354 End data with <CR><LF>.<CR><LF>")
                lines: list[bytes] = []
                while True:
                    chunk = self.rfile.readline(1 << 20)
                    if not chunk:
                        return
                    if chunk in (b".\r\n", b".\n"):
                        break
                    lines.append(chunk[1:] if chunk.startswith(b".") else chunk)
                reply = sink.data_reply or "250 2.0.0 Ok: queued as SINK"
                if reply.startswith("2"):
                    sink.record(
                        DeliveredMessage(
                            mail_from=mail_from,
                            rcpt_tos=tuple(addr for addr, _ in rcpts),
                            mail_options=mail_options,
                            rcpt_options=tuple(opts for _, opts in rcpts),
                            data=b"".join(lines),
                            helo=helo,
                            peer=self.client_address,
                            xforward=tuple(xforward),
                        )
                    )
                self._reply(reply)
                mail_from, mail_options, rcpts, xforward = None, (), [], []
            elif verb == "RSET":
                mail_from, mail_options, rcpts, xforward = None, (), [], []
                sink.resets += 1
                self._reply("250 2.0.0 Ok")
            elif verb == "XFORWARD" and sink.xforward:
                for item in arg.split():
                    name, _, value = item.partition("=")
                    xforward.append((name.upper(), value))
                self._reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self._reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._reply("221 2.0.0 Bye")
                return
            else:
                self._reply("502 5.5.2 Error: command not recognized")


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False

    def __init__(self, sink: SmtpSink, address: tuple[str, int]) -> None:
        self.sink = sink
        super().__init__(address, _SinkHandler)


class SmtpSink:
    """A threaded in-process SMTP server on loopback that records every message it accepts.

    It announces PIPELINING, 8BITMIME, ENHANCEDSTATUSCODES, DSN and (unless ``smtputf8=False``)
    SMTPUTF8, and with ``xforward=True`` XFORWARD (recorded per transaction). Set ``mail_reply``,
    ``rcpt_reply`` (or per address ``rcpt_replies``) or ``data_reply`` (e.g. ``"451 4.3.0
    later"``) to answer those commands differently; a non-2xx DATA reply records nothing.
    """

    def __init__(self, host: str = LOOPBACK, *, smtputf8: bool = True, xforward: bool = False) -> None:
        self.host = host
        self.smtputf8 = smtputf8
        self.xforward = xforward
        self.mail_reply: str | None = None
        self.rcpt_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.resets = 0
        self._messages: list[DeliveredMessage] = []
        self._changed = threading.Condition()
        self._server: _SinkServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise PostfixError("the sink is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen on an unused port chosen by the kernel (port 0: no race)."""
        if self._server is not None:
            return
        self._server = _SinkServer(self, (self.host, 0))
        self._thread = threading.Thread(target=self._server.serve_forever, name="smtp-sink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def record(self, message: DeliveredMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._changed:
            self._messages.clear()

    @property
    def messages(self) -> list[DeliveredMessage]:
        """Everything received so far, oldest first (a copy)."""
        with self._changed:
            return list(self._messages)

    def delivered_to(self, rcpt: str) -> list[DeliveredMessage]:
        """Messages with ``rcpt`` among their envelope recipients (case-insensitive)."""
        wanted = rcpt.lower()
        return [m for m in self.messages if wanted in (r.lower() for r in m.rcpt_tos)]

    def wait_delivered(self, rcpt: str, timeout: float = 10.0) -> DeliveredMessage:
        """The first message for ``rcpt``, waiting up to ``timeout`` seconds for it to arrive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if found := self.delivered_to(rcpt):
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no message for {rcpt} reached the sink within {timeout}s")
                self._changed.wait(min(left, 0.1))

    async def wait_delivered_async(self, rcpt: str, timeout: float = 10.0) -> DeliveredMessage:
        """:meth:`wait_delivered` for asyncio tests: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while not (found := self.delivered_to(rcpt)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no message for {rcpt} reached the sink within {timeout}s")
            await asyncio.sleep(0.02)
        return found[0]


# --------------------------------------------------------------------------------------------
# SMTP client


@dataclass(frozen=True)
class Reply:
    """One SMTP reply; ``code`` 0 means the server closed the connection instead."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code (RFC 3463) at the start of the text, if any."""
        match = re.match(r"[245]\.\d{1,3}\.\d{1,3}\b", self.text)
        return match.group(0) if match else None


_DISCONNECTED = Reply(0, "connection closed by server")


@dataclass(frozen=True)
class SendResult:
    """What the server answered at each step; later steps are None when not reached."""

    banner: Reply
    ehlo: Reply | None = None
    xclient: Reply | None = None
    mail: Reply | None = None
    rcpt: Mapping[str, Reply] = field(default_factory=dict)
    data: Reply | None = None

    @property
    def accepted(self) -> list[str]:
        """Recipients the server accepted at RCPT."""
        return [rcpt for rcpt, reply in self.rcpt.items() if reply.ok]

    @property
    def queue_id(self) -> str | None:
        """The queue id from a 250 after DATA ("queued as ID"), if any."""
        if self.data is None or not self.data.ok:
            return None
        match = re.search(r"queued as (\w+)", self.data.text)
        return match.group(1) if match else None


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding, as XCLIENT and XFORWARD attribute values require."""
    return "".join(
        chr(byte) if 33 <= byte <= 126 and byte not in b"+=" else f"+{byte:02X}"
        for byte in value.encode("utf-8")
    )


def _reply(code: int, text: bytes | str) -> Reply:
    decoded = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return Reply(code, decoded)


def build_message(
    mail_from: str,
    rcpt_to: Sequence[str],
    *,
    subject: str = "mxward test",
    headers: Mapping[str, str] | None = None,
    body: str = "Test message.\n",
) -> bytes:
    """A small RFC 5322 message; ``headers`` are added after the standard ones."""
    lines = [
        f"From: <{mail_from}>",
        f"To: {', '.join(f'<{r}>' for r in rcpt_to)}",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-ID: {email.utils.make_msgid(domain='client.test.example')}",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\r\n", "\n").replace("\n", "\r\n")).encode()


def send_mail(
    port: int,
    *,
    mail_from: str,
    rcpt_to: Sequence[str],
    client_ip: str = "127.0.0.2",
    helo: str = "client.test.example",
    host: str = LOOPBACK,
    subject: str = "mxward test",
    headers: Mapping[str, str] | None = None,
    body: str = "Test message.\n",
    message: bytes | None = None,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
    xclient: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> SendResult:
    """One SMTP transaction from ``client_ip`` (a 127/8 address) to ``host:port``; never raises on 4xx/5xx.

    With ``xclient`` (e.g. ``{"ADDR": "192.0.2.7", "NAME": "[UNAVAILABLE]", "LOGIN": "alice"}``) it
    sends ``XCLIENT`` after the first EHLO and EHLOs again; values are xtext-encoded here. The
    client address must be in the instance's ``xclient_hosts``. DATA is sent only when at least
    one recipient was accepted; ``message`` (raw bytes) replaces the generated one. If the server
    hangs up, that step's reply is ``Reply(0, ...)`` and the steps after it are absent.
    """
    if not client_ip.startswith("127."):
        raise ValueError(f"test clients stay on loopback, not {client_ip}")
    smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout, source_address=(client_ip, 0))

    def ask(command: Callable[[], tuple[int, bytes]]) -> Reply:
        try:
            return _reply(*command())
        except smtplib.SMTPDataError as exc:  # DATA itself refused (no 354)
            return _reply(exc.smtp_code, exc.smtp_error)
        except smtplib.SMTPServerDisconnected:
            return _DISCONNECTED

    try:
        banner = ask(lambda: smtp.connect(host, port))
        if banner.code != 220:
            return SendResult(banner=banner)
        ehlo = ask(lambda: smtp.ehlo(helo))
        if ehlo.code != 250:
            return SendResult(banner=banner, ehlo=ehlo)
        xclient_reply: Reply | None = None
        if xclient is not None:
            args = " ".join(f"{name.upper()}={xtext(value)}" for name, value in xclient.items())
            xclient_reply = ask(lambda: smtp.docmd("XCLIENT", args))
            if xclient_reply.code != 220:
                return SendResult(banner=banner, ehlo=ehlo, xclient=xclient_reply)
            smtp.ehlo_resp = None  # XCLIENT restarts the session at the greeting: EHLO again
            smtp.esmtp_features = {}
            ehlo = ask(lambda: smtp.ehlo(helo))
            if ehlo.code != 250:
                return SendResult(banner=banner, ehlo=ehlo, xclient=xclient_reply)
        mail = ask(lambda: smtp.mail(mail_from, list(mail_options)))
        rcpt: dict[str, Reply] = {}
        data: Reply | None = None
        if mail.ok:
            for address in rcpt_to:
                rcpt[address] = ask(functools.partial(smtp.rcpt, address, list(rcpt_options)))
            if any(reply.ok for reply in rcpt.values()):
                content = message
                if content is None:
                    content = build_message(mail_from, rcpt_to, subject=subject, headers=headers, body=body)
                data = ask(functools.partial(smtp.data, content))
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()
        return SendResult(banner=banner, ehlo=ehlo, xclient=xclient_reply, mail=mail, rcpt=rcpt, data=data)
    finally:
        smtp.close()


def _in_thread(func: Callable[_P, _T]) -> Callable[_P, Awaitable[_T]]:
    @functools.wraps(func)
    async def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return await asyncio.to_thread(func, *args, **kwargs)

    return run


send_mail_async = _in_thread(send_mail)
""":func:`send_mail` in a worker thread, for asyncio tests whose loop serves a policy server."""


# --------------------------------------------------------------------------------------------
# Queue listing


@dataclass(frozen=True)
class QueuedRecipient:
    address: str
    delay_reason: str  # empty unless the recipient was deferred


@dataclass(frozen=True)
class QueuedMessage:
    """One entry of ``postqueue -j``: queue (active, deferred, hold, incoming...), id, envelope."""

    queue_name: str
    queue_id: str
    sender: str
    recipients: tuple[QueuedRecipient, ...]
    arrival_time: int
    message_size: int


# --------------------------------------------------------------------------------------------
# Reading `mxward postfix-config` output

_MASTER_MARKER = "# ---- master.cf"
_FILTER_MASTER_MARKER = "# ---- master.cf for the content filter"
# name, type, private, unpriv, chroot, wakeup, maxproc, command: a master.cf service line
_MASTER_SERVICE = re.compile(
    r"^# ([\w.:\[\]/-]+\s+(?:inet|unix|unix-dgram|fifo|pass)(?:\s+[ny-])(?:\s+[ny-]){2}\s+\S+\s+\S+\s+\S.*)$"
)


@dataclass(frozen=True)
class PostfixConfig:
    """What ``mxward postfix-config`` printed: main.cf settings and master.cf services."""

    main_cf: dict[str, str]  # logical lines: continuation lines joined with one space
    master_cf: tuple[str, ...]  # printed commented out, after the "# ---- master.cf" marker
    filter_master_cf: tuple[str, ...] = ()  # the content filter's (after its own marker)


def parse_postfix_config(text: str) -> PostfixConfig:
    """Split ``mxward postfix-config`` output the way an operator applies it.

    Every uncommented line is main.cf (a line starting with white space continues the one
    before, as in main.cf); the master.cf services are the commented service lines after the
    ``# ---- master.cf`` marker.
    """
    settings: dict[str, str] = {}
    services: list[str] = []
    filter_services: list[str] = []
    current = ""
    section: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(_FILTER_MASTER_MARKER):
            section = filter_services
            continue
        if line.startswith(_MASTER_MARKER):
            section = services
            continue
        if line.startswith("# ---- "):
            section = None
            continue
        if section is not None and (match := _MASTER_SERVICE.match(line)):
            section.append(match.group(1))
            continue
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():
            if not current:
                raise ValueError(f"continuation line without a parameter: {line!r}")
            settings[current] = f"{settings[current]} {line.strip()}".strip()
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a main.cf line: {line!r}")
        current = name.strip()
        settings[current] = value.strip()
    return PostfixConfig(main_cf=settings, master_cf=tuple(services), filter_master_cf=tuple(filter_services))


# --------------------------------------------------------------------------------------------
# The instance


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _public_service(smtpd_port: int, lines: Sequence[str]) -> list[str]:
    """The master.cf lines of the public SMTP listener on ``127.0.0.1:<smtpd_port>``.

    Without ``lines`` that is a plain smtpd. Otherwise ``lines`` replace it (for example
    postscreen in front of smtpd, as ``mxward postfix-config`` prints it): the first line's
    service name (``smtp``) becomes ``127.0.0.1:<port>``, the other lines are kept as written.
    """
    listen = f"{LOOPBACK}:{smtpd_port}"
    if not lines:
        return [f"{listen} inet n - n - - smtpd"]
    fields = lines[0].split()
    if len(fields) < 8 or fields[1] != "inet":
        raise PostfixError(f"the first public_service line must be an inet service, not {lines[0]!r}")
    # the service name (smtp) is replaced: the private instance listens on loopback, on its port
    return [" ".join([listen, *fields[1:]]), *lines[1:]]


def _master_cf(smtpd_port: int, extra_lines: Iterable[str], public_service: Sequence[str] = ()) -> str:
    services = [
        # service type  private unpriv  chroot  wakeup  maxproc command + args
        *_public_service(smtpd_port, public_service),
        "pickup     unix  n - n 60 1 pickup",
        "cleanup    unix  n - n -  0 cleanup",
        "qmgr       unix  n - n 300 1 qmgr",
        "rewrite    unix  - - n -  - trivial-rewrite",
        "bounce     unix  - - n -  0 bounce",
        "defer      unix  - - n -  0 bounce",
        "trace      unix  - - n -  0 bounce",
        "verify     unix  - - n -  1 verify",
        "flush      unix  n - n 1000? 0 flush",
        "proxymap   unix  - - n -  - proxymap",
        "proxywrite unix  - - n -  1 proxymap",
        "smtp       unix  - - n -  - smtp",
        "relay      unix  - - n -  - smtp",
        "showq      unix  n - n -  - showq",
        "error      unix  - - n -  - error",
        "retry      unix  - - n -  - error",
        "discard    unix  - - n -  - discard",
        "local      unix  - n n -  - local",
        "virtual    unix  - n n -  - virtual",
        "lmtp       unix  - - n -  - lmtp",
        "anvil      unix  - - n -  1 anvil",
        "scache     unix  - - n -  1 scache",
        "postlog    unix-dgram n - n - 1 postlogd",
    ]
    return "# Generated by tests/support/postfix.py: private test instance.\n" + "\n".join(
        [*services, *extra_lines, ""]
    )


def _render_main_cf(settings: Mapping[str, str]) -> str:
    lines = ["# Generated by tests/support/postfix.py: private test instance, loopback only."]
    lines += [f"{name} = {value}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


class PostfixInstance:
    """A private Postfix in a scratch directory; nothing exists until :meth:`start`.

    ``policy_service`` is a Postfix policy endpoint, ``inet:127.0.0.1:PORT`` or ``unix:/abs/path``.
    It is consulted at RCPT after ``reject_unauth_destination``, and also at DATA / END-OF-DATA
    when ``policy_data`` / ``policy_end_of_data`` are set; when it cannot be reached the client
    gets ``policy_default_action``. smtpd runs as ``postfix``, so a unix socket needs mode 0666
    (or ``postfix`` ownership) and traversable parent directories, else Postfix logs "Permission
    denied" and applies the default action.

    ``extra_main_cf`` overrides or adds main.cf settings (applied last); ``extra_master_cf`` lines
    are appended to master.cf. ``public_service`` replaces the plain smtpd on the public port with
    other master.cf lines, e.g. postscreen(8) in front of smtpd (``smtp inet n - n - 1
    postscreen``, ``smtpd pass - - n - - smtpd``, ``dnsblog ...``, ``tlsproxy ...``): the first
    line's service name becomes ``127.0.0.1:<smtpd_port>``. ``xclient_hosts`` becomes
    ``smtpd_authorized_xclient_hosts``. ``local_users`` get Maildirs at ``<user>@local.test``.
    Set ``MXWARD_KEEP_POSTFIX=1`` to keep the scratch directory (config, maillog, queue) after
    :meth:`stop`.
    """

    def __init__(
        self,
        *,
        policy_service: str | None = None,
        policy_timeout: str = "10s",
        policy_data: bool = False,
        policy_end_of_data: bool = False,
        policy_default_action: str = DEFAULT_POLICY_ACTION,
        extra_main_cf: Mapping[str, str] | None = None,
        extra_master_cf: Sequence[str] = (),
        xclient_hosts: str = "",
        local_users: Sequence[str] = ("user",),
        smtpd_port: int | None = None,
        sink_smtputf8: bool = True,
        start_timeout: float = 20.0,
        public_service: Sequence[str] = (),
    ) -> None:
        self.policy_service = policy_service
        self.policy_timeout = policy_timeout
        self.policy_data = policy_data
        self.policy_end_of_data = policy_end_of_data
        self.policy_default_action = policy_default_action
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_master_cf = tuple(extra_master_cf)
        self.public_service = tuple(public_service)
        self.xclient_hosts = xclient_hosts
        self.local_users = tuple(local_users)
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(4)  # in the banner: proves we talk to *this* instance
        self.sink = SmtpSink(smtputf8=sink_smtputf8)
        self._smtpd_port = smtpd_port
        self._root: Path | None = None
        self._master_pid: int | None = None
        self._running = False

    # ---- paths and settings

    @property
    def root(self) -> Path:
        if self._root is None:
            raise PostfixError("the instance has not been started")
        return self._root

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def maillog_path(self) -> Path:
        return self.root / "log" / "maillog"

    @property
    def mail_dir(self) -> Path:
        return self.root / "mail"

    @property
    def smtpd_port(self) -> int:
        if self._smtpd_port is None:
            raise PostfixError("the instance has not been started")
        return self._smtpd_port

    @property
    def running(self) -> bool:
        return self._running

    def policy_check(self) -> str:
        """The ``check_policy_service`` restriction text used for every policy hook."""
        if self.policy_service is None:
            raise PostfixError("no policy_service configured")
        return (
            f"check_policy_service {{ {self.policy_service}, timeout={self.policy_timeout}, "
            f"{{ default_action = {self.policy_default_action} }} }}"
        )

    def main_cf_settings(self) -> dict[str, str]:
        """The main.cf settings (before ``extra_main_cf`` is applied)."""
        root = self.root
        users = " ".join(f"{u}@{LOCAL_DOMAIN}={u}/" for u in self.local_users)
        never_leave = "error:5.7.1 test instance sends no mail off this host"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(root / "spool"),
            "data_directory": str(root / "data"),
            "maillog_file": str(root / "log" / "maillog"),
            "maillog_file_prefixes": str(root / "log"),
            "myhostname": "mx.test.example",
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "smtpd_banner": f"$myhostname ESMTP mxward-test-{self.token}",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            # only 127.0.0.1 is trusted: clients bound to 127.0.0.2+ are ordinary Internet clients
            "mynetworks": "127.0.0.1/32",
            "smtputf8_enable": "yes",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "in_flow_delay": "0s",
            # nothing leaves this host: bounces, DSNs and unknown domains end in error(8)
            "default_transport": never_leave,
            "relay_transport": never_leave,
            "relay_domains": SINK_DOMAIN,
            "transport_maps": f"inline:{{ {SINK_DOMAIN}=smtp:[{LOOPBACK}]:{self.sink.port} }}",
            "virtual_mailbox_domains": LOCAL_DOMAIN,
            "virtual_mailbox_base": str(root / "mail"),
            "virtual_mailbox_maps": f"inline:{{ {users} }}",
            "virtual_uid_maps": f"static:{NOBODY_UID}",
            "virtual_gid_maps": f"static:{NOBODY_UID}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unauth_destination",
        }
        if self.policy_service is not None:
            check = self.policy_check()
            settings["smtpd_recipient_restrictions"] = f"reject_unauth_destination, {check}"
            if self.policy_data:
                settings["smtpd_data_restrictions"] = check
            if self.policy_end_of_data:
                settings["smtpd_end_of_data_restrictions"] = check
        if self.xclient_hosts:
            settings["smtpd_authorized_xclient_hosts"] = self.xclient_hosts
        return settings

    # ---- commands

    def _run(
        self, tool: str, *args: str, check: bool = True, timeout: float = 60.0, output: str = "stdout"
    ) -> str:
        """Run a Postfix command on this instance; its stdout (``output="both"``: and stderr)."""
        command = [find_postfix_tool(tool), "-c", str(self.config_dir), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise PostfixError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
                f"\n--- maillog tail ---\n{self.maillog_tail()}"
            )
        return done.stdout + done.stderr if output == "both" else done.stdout

    def postconf(self, *names: str) -> dict[str, str]:
        """Effective values of main.cf parameters, as ``postconf -c DIR name...`` reports them."""
        out = self._run("postconf", *names)
        values: dict[str, str] = {}
        for line in out.splitlines():
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
        return values

    # ---- life cycle

    def _build(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="mxpf-", dir="/tmp"))  # short: unix socket paths are limited
        self._root = root
        root.chmod(0o755)  # mkdtemp gives 0700: the postfix-owned daemons could not enter it
        for sub in ("etc", "spool", "data", "log", "mail"):
            (root / sub).mkdir()
        shutil.chown(root / "data", user="postfix")  # data_directory must belong to mail_owner
        os.chown(root / "mail", NOBODY_UID, NOBODY_UID)  # virtual(8) writes as nobody
        self.sink.start()
        if self._smtpd_port is None:
            self._smtpd_port = find_free_port()
        settings = self.main_cf_settings()
        settings.update(self.extra_main_cf)
        files = {
            root / "etc" / "main.cf": _render_main_cf(settings),
            root / "etc" / "master.cf": _master_cf(
                self.smtpd_port, self.extra_master_cf, self.public_service
            ),
        }
        past = time.time() - 60
        for path, text in files.items():
            path.write_text(text, encoding="utf-8")
            # Postfix re-reads a config file until its mtime is a couple of seconds old (it
            # guards against half-written files): backdating saves ~2 s per command.
            os.utime(path, (past, past))

    def start(self) -> None:
        """Build the directory, check and start Postfix, and wait for this instance's banner."""
        if self._running:
            return
        if reason := postfix_missing_reason():
            raise PostfixError(reason)
        try:
            self._build()
            if not _port_free(self.smtpd_port):
                raise PostfixError(f"smtpd port {self.smtpd_port} is no longer free")
            if warnings := self._run("postfix", "check", output="both").strip():
                _log.warning("postfix check:\n%s", warnings)
            self._run("postfix", "start")
            self._running = True
            self._master_pid = self._wait_master_pid()
            self._wait_banner()
            self._check_port_owner()
        except BaseException:
            with contextlib.suppress(PostfixError):
                self.stop()
            raise

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def _wait_master_pid(self) -> int:
        deadline = time.monotonic() + self.start_timeout
        while (pid := self._read_master_pid()) is None:
            if time.monotonic() >= deadline:
                raise PostfixError(f"master(8) wrote no pid file\n{self.maillog_tail()}")
            time.sleep(0.02)
        return pid

    def _master_alive(self) -> bool:
        if self._master_pid is None:
            return False
        try:
            os.kill(self._master_pid, 0)
        except ProcessLookupError:
            return False
        # a zombie is gone for our purposes
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self._master_pid}/stat").read_text(encoding="ascii")
            if stat.rpartition(")")[2].split()[0] == "Z":
                return False
        return True

    def _wait_banner(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if not self._master_alive():
                raise PostfixError(f"master(8) exited during start-up\n{self.maillog_tail()}")
            try:
                with socket.create_connection((LOOPBACK, self.smtpd_port), timeout=2) as conn:
                    reader = conn.makefile("rb")
                    banner = reader.readline(1024).decode("ascii", "replace")
                    # a multi-line greeting (postscreen's "220-" teaser): read to its last line
                    for _ in range(10):
                        if not banner.startswith("220-"):
                            break
                        banner = reader.readline(1024).decode("ascii", "replace")
                    if banner.startswith("220 ") and self.token in banner:
                        conn.sendall(b"QUIT\r\n")
                        return
                    last_error = f"unexpected banner {banner!r}"
            except OSError as exc:
                last_error = repr(exc)
            time.sleep(0.05)
        raise PostfixError(
            f"no banner on {LOOPBACK}:{self.smtpd_port} within {self.start_timeout}s "
            f"({last_error})\n{self.maillog_tail()}"
        )

    def _check_port_owner(self) -> None:
        """Fail if another process (e.g. another Postfix via SO_REUSEPORT) also listens on our port."""
        out = subprocess.run(
            [_ss(), "-Hltnp", f"sport = :{self.smtpd_port}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        pids = {int(pid) for pid in re.findall(r"pid=(\d+)", out)}
        # master(8) and the smtpd children it forked (they inherit the listening socket)
        strangers = {pid for pid in pids if self._master_pid not in (pid, _parent_pid(pid))}
        if self._master_pid not in pids or strangers:
            raise PostfixError(
                f"port {self.smtpd_port} is also held by pids {sorted(strangers)}, not only by our "
                f"master {self._master_pid} (another Postfix sharing it through SO_REUSEPORT?):\n{out}"
            )

    def stop(self) -> None:
        """Stop Postfix, drop its queue, wait for master(8) to exit, stop the sink, remove the directory."""
        if self._root is None:
            self.sink.stop()
            return
        problems: list[str] = []
        if self._running or self._read_master_pid() is not None:
            self._master_pid = self._master_pid or self._read_master_pid()
            # postsuper first: with master(8) gone it would log directly to the maillog file,
            # fail to open it as mail_owner and sleep 1 s in msg_fatal().
            with contextlib.suppress(PostfixError, subprocess.TimeoutExpired):
                self._run("postsuper", "-d", "ALL", check=False)
            with contextlib.suppress(PostfixError, subprocess.TimeoutExpired):
                self._run("postfix", "stop", check=False)
            deadline = time.monotonic() + 15
            while self._master_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._master_alive() and self._master_pid is not None:
                problems.append(f"master {self._master_pid} ignored 'postfix stop'; killed")
                os.kill(self._master_pid, signal.SIGKILL)
        self._running = False
        self._master_pid = None
        self.sink.stop()
        if os.environ.get("MXWARD_KEEP_POSTFIX"):
            _log.warning("kept the private Postfix directory %s (MXWARD_KEEP_POSTFIX is set)", self._root)
        else:
            shutil.rmtree(self._root, ignore_errors=True)
        self._root = None
        if problems:
            raise PostfixError("; ".join(problems))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- observing

    def maillog(self) -> str:
        """The whole maillog so far ("" before the first line is written)."""
        try:
            return self.maillog_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, PostfixError):
            return ""

    def maillog_tail(self, lines: int = 40) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def log_position(self) -> int:
        """Current length of the maillog text: pass it as ``since`` to look only at newer lines."""
        return len(self.maillog())

    def wait_for_log(self, pattern: str, timeout: float = 10.0, *, since: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` (multiline regex) in the maillog after offset ``since``."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self.maillog(), since):
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{pattern!r} not in the maillog within {timeout}s\n{self.maillog_tail()}")
            time.sleep(0.05)

    async def wait_for_log_async(
        self, pattern: str, timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]:
        """:meth:`wait_for_log` for asyncio tests (polls with ``asyncio.sleep``)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self.maillog(), since):
                return match
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{pattern!r} not in the maillog within {timeout}s\n{self.maillog_tail()}")
            await asyncio.sleep(0.05)

    def queue(self) -> list[QueuedMessage]:
        """The queue as ``postqueue -j`` lists it (machine-readable form of ``postqueue -p``)."""
        entries: list[QueuedMessage] = []
        for line in self._run("postqueue", "-j").splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            entries.append(
                QueuedMessage(
                    queue_name=str(item["queue_name"]),
                    queue_id=str(item["queue_id"]),
                    sender=str(item["sender"]),
                    recipients=tuple(
                        QueuedRecipient(str(r["address"]), str(r.get("delay_reason", "")))
                        for r in item["recipients"]
                    ),
                    arrival_time=int(item["arrival_time"]),
                    message_size=int(item["message_size"]),
                )
            )
        return entries

    def flush(self) -> None:
        """Ask Postfix to retry deferred mail now (``postqueue -f``)."""
        self._run("postqueue", "-f")

    def maildir_messages(self, user: str = "user") -> list[bytes]:
        """Messages delivered to ``<user>@local.test`` (Maildir ``new/``), oldest first."""
        new = self.mail_dir / user / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))
        return [path.read_bytes() for path in files]

    def wait_maildir(self, user: str = "user", count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``<user>@local.test`` has at least ``count`` messages, and return them."""
        deadline = time.monotonic() + timeout
        while len(found := self.maildir_messages(user)) < count:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{user}@{LOCAL_DOMAIN} has {len(found)} of {count} messages after {timeout}s"
                )
            time.sleep(0.05)
        return found

"""The filter's SMTP server: aiosmtpd's command loop with the parts a Postfix filter needs.

aiosmtpd gives the connection handling, the command loop and idle timeouts. This subclass
replaces what a content filter cannot use as it ships (see docs/filter.md):

* **EHLO** announces PIPELINING, SIZE, 8BITMIME, SMTPUTF8, DSN, ENHANCEDSTATUSCODES and, to
  ``[filter] xforward_hosts`` only, ``XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE``;
* **MAIL/RCPT** keep their ESMTP parameters byte for byte (SIZE, BODY, SMTPUTF8, RET, ENVID;
  NOTIFY, ORCPT per recipient) and relay each command to the reinjection smtpd at once, so
  every recipient gets the downstream's own answer;
* **DATA** is read in bulk (not line by line), ends only at CRLF.CRLF (a bare LF before a
  dot is content: no SMTP smuggling), is dot-unstuffed once, and is bounded by
  ``max_message_size`` and ``max_line_length`` (checked after the whole message was read);
* **XFORWARD** (Postfix's extension) sets the original client's attributes per transaction;
* replies to pipelined commands go out in one write, when the pipelined group is answered;
* every internal failure becomes ``451 4.3.0``, never aiosmtpd's ``500`` (a 5xx would make
  Postfix bounce the mail).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP

from mxward.contentfilter.envelope import Envelope
from mxward.contentfilter.reinject import Downstream, DownstreamError, Reply
from mxward.shared.netutil import NetworkList, parse_ip

if TYPE_CHECKING:
    from mxward.contentfilter.service import FilterService
    from mxward.shared.config import FilterSettings

__all__ = ["XFORWARD_ATTRS", "FilterSMTP"]

log = logging.getLogger("mxward.filter")

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"}
_RCPT_PARAMS = {"NOTIFY", "ORCPT"}
_PATH = re.compile(r'\s*<((?:"(?:[^"\\]|\\.)*"|[^<>"\s])*)>\s*(.*)', re.DOTALL)
_XTEXT = re.compile(r"\+([0-9A-F]{2})")
_READ_SIZE = 262144
# Single-line replies without an enhanced status code, and the code they get.
_ENHANCED = {
    b"221": b"2.0.0",
    b"250": b"2.0.0",
    b"421": b"4.4.2",
    b"451": b"4.3.0",
    b"500": b"5.5.2",
    b"501": b"5.5.4",
    b"502": b"5.5.1",
    b"503": b"5.5.1",
    b"504": b"5.5.4",
    b"530": b"5.7.0",
    b"554": b"5.5.0",
}
_BARE_REPLY = re.compile(rb"(221|250|421|451|50[01234]|530|554) (?![245]\.\d{1,3}\.\d{1,3}\b)[^\r\n]*\Z")
_TERMINATOR = b"\r\n.\r\n"


def _xtext_decode(value: str) -> str:
    raw = _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)
    return raw.encode("latin-1", "replace").decode("utf-8", "replace")


class _NoHooks:
    """aiosmtpd wants a handler object; every hook lives in the subclass."""


class FilterSMTP(SMTP):
    """One upstream connection."""

    # The StreamReader's buffer limit: command lines are bounded separately (512 bytes and
    # 2 KiB for MAIL/RCPT/XFORWARD), DATA is read in bulk.
    line_length_limit = _READ_SIZE

    def __init__(
        self,
        service: FilterService,
        settings: FilterSettings,
        *,
        hostname: str,
        downstream: Callable[[], Downstream],
        allowed: NetworkList,
        xforward_hosts: NetworkList,
    ) -> None:
        super().__init__(
            _NoHooks(),
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="mxward",
            timeout=settings.idle_timeout,
        )
        self.command_size_limits = collections.defaultdict(
            lambda: 512, {"MAIL": 2048, "RCPT": 2048, "XFORWARD": 1024}
        )
        self.service = service
        self.settings = settings
        self._make_downstream = downstream
        self._downstream: Downstream | None = None
        self._allowed = allowed
        self._xforward_hosts = xforward_hosts
        self._peer_ip: str = ""
        self._tx: Envelope | None = None
        self._xforward: dict[str, str] = {}
        self._xforward_fresh = True
        self._pending: list[bytes] = []

    # ----------------------------------------------------------------------------------------
    # connection

    @property
    def busy(self) -> bool:
        """In a mail transaction (between MAIL FROM and the reply to the final dot)."""
        return self._tx is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        self.service.connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.service.connections.discard(self)
        super().connection_lost(error)
        downstream, self._downstream = self._downstream, None
        if downstream is not None:
            # Closing aborts an open downstream transaction: nothing of it is delivered.
            task = asyncio.get_event_loop().create_task(downstream.close())
            self.service.background(task)

    def _peer_in(self, networks: NetworkList) -> bool:
        """Whether the client is in ``networks``; a unix-socket client is local and always is."""
        if not self._peer_ip:
            return True
        ip = parse_ip(self._peer_ip)
        return ip is not None and ip in networks

    async def _handle_client(self) -> None:
        if not self._peer_in(self._allowed):
            log.warning("refused connection from %s: not in [filter] allowed_clients", self._peer_ip)
            await self.push("554 5.7.1 Access denied")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def push(self, status: Any) -> None:
        """Send a reply; while more pipelined commands are waiting, collect the replies.

        aiosmtpd's own replies (unknown command, bad syntax, QUIT) carry no enhanced status
        code; we announce ENHANCEDSTATUSCODES, so the missing code is added (RFC 2034).
        """
        data = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        match = _BARE_REPLY.match(data)
        if match is not None:
            data = data[:4] + _ENHANCED[data[:3]] + b" " + data[4:]
        data += b"\r\n"
        buffered = self._reader._buffer  # type: ignore[attr-defined]  # noqa: SLF001
        if b"\n" in buffered and not data.startswith(b"354"):
            self._pending.append(data)
            return
        if self._pending:
            data = b"".join(self._pending) + data
            self._pending.clear()
        self._writer.write(data)
        await self._writer.drain()

    async def handle_exception(self, error: Exception) -> str:
        log.error("client %s: %s: %s", self._peer_ip, type(error).__name__, error, exc_info=error)
        await self._abort()
        return f"451 4.3.0 {self.settings.tempfail_text}"

    # ----------------------------------------------------------------------------------------
    # commands

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        await self._abort()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ]
        if self._peer_in(self._xforward_hosts):
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRS))
        reply = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self.push(reply)

    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        await self._abort()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname}")

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        await self._abort()
        await self.push("250 2.0.0 Ok")

    async def smtp_NOOP(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push("502 5.5.1 VRFY command is disabled")

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        if not self._peer_in(self._xforward_hosts):
            await self.push("550 5.7.0 Error: insufficient authorization")
            return
        if self._tx is not None:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        if not arg:
            await self.push("501 5.5.4 Syntax: XFORWARD attribute=value...")
            return
        update: dict[str, str] = {}
        for item in arg.split():
            name, sep, value = item.partition("=")
            name = name.upper()
            if not sep or name not in XFORWARD_ATTRS:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute name: {name[:64]}")
                return
            decoded = _xtext_decode(value)
            if len(decoded) > 255:
                await self.push(f"501 5.5.4 Bad XFORWARD attribute value: {name} too long")
                return
            update[name] = "" if decoded.upper() == "[UNAVAILABLE]" else decoded
        if self._xforward_fresh:  # the first XFORWARD of a transaction forgets the last one's
            self._xforward = {}
            self._xforward_fresh = False
        self._xforward.update(update)
        await self.push("250 2.0.0 Ok")

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self._tx is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = self._path(arg, "FROM:")
        if parsed is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        sender, params = parsed
        problem = self._check_params(params, _MAIL_PARAMS)
        if problem:
            await self.push(problem)
            return
        for param in params:
            name, _, value = param.partition("=")
            if name.upper() == "SIZE" and value.isdigit() and int(value) > self.settings.max_message_size:
                await self.push("552 5.3.4 Message size exceeds fixed limit")
                return
        env = Envelope(sender=sender, mail_params=params, xforward=dict(self._xforward), peer=self._peer_ip)
        reply = await self._downstream_mail(env)
        if reply.ok:
            self._tx = env
        await self.push(reply.relay())

    async def smtp_RCPT(self, arg: str | None) -> None:
        env = self._tx
        if env is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        parsed = self._path(arg, "TO:")
        if parsed is None or not parsed[0]:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        address, params = parsed
        problem = self._check_params(params, _RCPT_PARAMS)
        if problem:
            await self.push(problem)
            return
        if len(env.recipients) >= self.settings.max_recipients:
            await self.push("452 4.5.3 Error: too many recipients")
            return
        if env.broken:
            await self.push(f"451 4.3.0 {self.settings.tempfail_text}")
            return
        line = f"RCPT TO:<{address}>" + "".join(f" {p}" for p in params)
        assert self._downstream is not None
        try:
            reply = self._soften(await self._downstream.command(line))
        except DownstreamError as exc:
            env.broken = str(exc)
            log.warning("reinjection failed at RCPT: %s", exc)
            await self.push(f"451 4.3.0 {self.settings.tempfail_text}")
            return
        if reply.ok:
            env.recipients.append((address, params))
        await self.push(reply.relay())

    async def smtp_DATA(self, arg: str | None) -> None:
        env = self._tx
        if env is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if not env.recipients:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content, problem = await self._read_data()
        if problem or content is None:
            await self._abort()
            await self.push(problem)
            return
        if env.broken:
            await self._abort()
            await self.push(f"451 4.3.0 {self.settings.tempfail_text}")
            return
        assert self._downstream is not None
        try:
            reply = await self.service.deliver(env, content, self._downstream)
        finally:
            self._tx = None
            self._xforward = {}
            self._xforward_fresh = True
        await self.push(reply)

    # ----------------------------------------------------------------------------------------
    # helpers

    @staticmethod
    def _path(arg: str | None, keyword: str) -> tuple[str, tuple[str, ...]] | None:
        if not arg or arg[: len(keyword)].upper() != keyword:
            return None
        match = _PATH.fullmatch(arg[len(keyword) :])
        if match is None:
            return None
        return match.group(1), tuple(match.group(2).split())

    @staticmethod
    def _check_params(params: tuple[str, ...], allowed: set[str]) -> str:
        for param in params:
            name = param.partition("=")[0].upper()
            if name not in allowed:
                return f"555 5.5.4 Unsupported option: {name[:40]}"
        return ""

    def _soften(self, reply: Reply) -> Reply:
        """A downstream 5xx becomes 451 unless ``relay_downstream_rejects`` (see docs/filter.md)."""
        if reply.code >= 500 and not self.settings.relay_downstream_rejects:
            log.warning("reinjection smtpd refused permanently (%s); deferring instead", reply.relay())
            return Reply(451, (f"4.3.0 reinjection refused: {reply.text}"[:400],))
        return reply

    async def _downstream_mail(self, env: Envelope) -> Reply:
        """Open (or reuse) the downstream session and relay XFORWARD and MAIL FROM."""
        for attempt in (1, 2):
            downstream = self._downstream
            reused = downstream is not None and downstream.connected
            try:
                if downstream is None or not downstream.connected:
                    if downstream is not None:
                        await downstream.close()
                    downstream = self._downstream = self._make_downstream()
                    await downstream.connect()
                missing = self._missing_extensions(downstream, env.mail_params)
                if missing:
                    log.error(
                        "reinjection smtpd %s:%d does not announce %s, which this mail needs; deferring",
                        downstream.host,
                        downstream.port,
                        missing,
                    )
                    return Reply(451, (f"4.3.0 {self.settings.tempfail_text}",))
                params = [
                    p
                    for p in env.mail_params
                    if downstream.supports("SIZE") or not p.upper().startswith("SIZE=")
                ]
                line = f"MAIL FROM:<{env.sender}>" + "".join(f" {p}" for p in params)
                replies = await downstream.commands([*downstream.xforward_lines(env.xforward), line])
            except DownstreamError as exc:
                if reused and attempt == 1:
                    continue  # a cached session the server had closed: one fresh try
                log.warning("reinjection unavailable: %s", exc)
                return Reply(451, (f"4.3.0 {self.settings.tempfail_text}",))
            for reply in replies[:-1]:
                if not reply.ok:
                    log.warning("reinjection smtpd refused XFORWARD: %s", reply.relay())
            return self._soften(replies[-1])
        return Reply(451, (f"4.3.0 {self.settings.tempfail_text}",))

    @staticmethod
    def _missing_extensions(downstream: Downstream, params: tuple[str, ...]) -> str:
        for param in params:
            name, _, value = param.upper().partition("=")
            need = {"SMTPUTF8": "SMTPUTF8", "RET": "DSN", "ENVID": "DSN"}.get(name)
            if name == "BODY" and value == "8BITMIME":
                need = "8BITMIME"
            if need and not downstream.supports(need):
                return need
        return ""

    async def _abort(self) -> None:
        """End the current transaction here and downstream (nothing of it is delivered)."""
        self._xforward = {}
        self._xforward_fresh = True
        if self._tx is None:
            return
        self._tx = None
        if self._downstream is not None:
            await self._downstream.reset()

    async def _read_data(self) -> tuple[bytes | None, str]:
        """The message after DATA: read in bulk up to CRLF.CRLF, dot-unstuffed.

        Returns ``(content, "")`` or ``(None, reply)`` when the message broke a limit (the
        whole message is read first, so the reply goes after the dot, RFC 5321 §4.2.5).
        """
        reader = self._reader
        limit = self.settings.max_message_size
        # The DATA line's CRLF, so that an empty message's ".\r\n" is found like any other end.
        buf = bytearray(b"\r\n")
        start = 0
        overflow = False
        while True:
            pos = buf.find(_TERMINATOR, start)
            if pos >= 0:
                break
            if len(buf) > limit + 2:
                overflow = True
                del buf[2:-4]  # keep only what may be the start of the terminator
            start = max(0, len(buf) - 4)
            self._reset_timeout()
            chunk = await reader.read(_READ_SIZE)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            buf += chunk
        rest = buf[pos + 5 :]
        if rest:  # pipelined commands after the dot go back to the command loop
            reader._buffer[0:0] = rest  # type: ignore[attr-defined]  # noqa: SLF001
        if overflow or pos > limit:
            return None, "552 5.3.4 Message size exceeds fixed limit"
        content = bytes(buf[: pos + 2]).replace(b"\r\n.", b"\r\n")[2:]
        max_line = self.settings.max_line_length
        if len(content) > max_line and re.search(b"[^\n]{%d}" % (max_line + 1), content):
            return None, f"500 5.5.2 Message has a line longer than {max_line} bytes"
        return content, ""

"""The downstream side of the filter: an SMTP client session to the reinjection smtpd.

Each upstream connection (one Postfix ``scan`` delivery process, or one proxied client in
before-queue mode) gets its own downstream session, opened at its first MAIL FROM and kept
while the upstream connection lives, so Postfix's connection caching carries over to the
reinjection side. The envelope is relayed **as it arrives**: MAIL FROM and each RCPT TO go
downstream at once and their replies go back upstream, so every recipient gets the
reinjection smtpd's own answer (a refused recipient is refused, or deferred, alone; nothing
accepted downstream is ever sent twice because of another recipient). The message itself is
sent after the checks, with DATA; the upstream gets 250 only when the downstream said 250
to the final dot.

Only this module speaks SMTP as a client. It does what RFC 5321 asks of one: dot-stuffing on
output, CRLF line ends (a bare LF or CR in the content becomes CRLF, so no line end is
ambiguous downstream), replies of several lines, and XFORWARD (Postfix's extension,
http://www.postfix.org/XFORWARD_README.html) with xtext-encoded values, sent only for the
attributes the server announced.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Downstream", "DownstreamError", "Reply", "dot_stuff", "xtext"]

log = logging.getLogger("mxward.filter")

_MAX_REPLY_LINES = 100
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class DownstreamError(Exception):
    """The reinjection smtpd cannot be reached, timed out or broke the protocol."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: the code and the text of its lines (without the code)."""

    code: int
    lines: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def relay(self) -> str:
        """The reply as one line for the upstream (multi-line replies joined)."""
        text = self.text.replace("\r", " ").replace("\n", " ")
        return f"{self.code} {text}"[:512]


def xtext(value: str) -> str:
    """RFC 3461 xtext: ``+XX`` for '+', '=', controls, space and non-ASCII."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def dot_stuff(content: bytes) -> bytes:
    """The DATA payload for ``content``: CRLF line ends, leading dots doubled, ``.CRLF`` added."""
    pairs = content.count(b"\r\n")
    if content.count(b"\n") != pairs or content.count(b"\r") != pairs:
        content = _BARE_LINE_END.sub(b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


class Downstream:
    """One SMTP client session to the reinjection smtpd."""

    def __init__(self, host: str, port: int, *, helo: str, timeout: float) -> None:
        self.host = host
        self.port = port
        self.helo = helo
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.broken = False

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self.broken and not self._writer.is_closing()

    def supports(self, extension: str) -> bool:
        return extension in self.extensions

    async def connect(self) -> None:
        """Connect and greet (EHLO); raises DownstreamError."""
        await self.close()
        self.broken = False
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=65536)
                greeting = await self._read_reply()
                if greeting.code != 220:
                    raise DownstreamError(f"greeting {greeting.relay()!r}")
                self._writer.write(f"EHLO {self.helo}\r\n".encode("ascii"))
                ehlo = await self._read_reply()
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise DownstreamError(f"cannot connect to {self.host}:{self.port}: {_describe(exc)}") from None
        if ehlo.code != 250:
            self.broken = True
            raise DownstreamError(f"EHLO refused: {ehlo.relay()!r}")
        extensions: dict[str, str] = {}
        for line in ehlo.lines[1:]:
            keyword, _, params = line.partition(" ")
            extensions[keyword.upper()] = params
        self.extensions = extensions

    async def close(self) -> None:
        """QUIT (if the session was greeted) and close; an open transaction is abandoned."""
        writer, self._writer, self._reader = self._writer, None, None
        extensions, self.extensions = self.extensions, {}
        if writer is None:
            return
        if not writer.is_closing() and not self.broken and extensions:
            try:
                writer.write(b"QUIT\r\n")
                async with asyncio.timeout(1.0):
                    await writer.drain()
            except (OSError, TimeoutError):
                pass
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass

    # ----------------------------------------------------------------------------------------
    # commands

    async def commands(self, lines: Sequence[str]) -> list[Reply]:
        """Send ``lines`` (pipelined when the server allows it) and return one reply for each."""
        if not self.connected:
            raise DownstreamError("not connected")
        if len(lines) > 1 and not self.supports("PIPELINING"):
            return [(await self.commands([line]))[0] for line in lines]
        data = "".join(f"{line}\r\n" for line in lines).encode("utf-8", "surrogateescape")
        try:
            async with asyncio.timeout(self.timeout):
                assert self._writer is not None
                self._writer.write(data)
                return [await self._read_reply() for _ in lines]
        except (OSError, TimeoutError, DownstreamError) as exc:
            self.broken = True
            raise DownstreamError(f"{self.host}:{self.port}: {_describe(exc)}") from None

    async def command(self, line: str) -> Reply:
        return (await self.commands([line]))[0]

    def xforward_lines(self, attrs: Mapping[str, str]) -> list[str]:
        """XFORWARD commands for the attributes the server announced (each line <= 512)."""
        announced = set(self.extensions.get("XFORWARD", "").upper().split())
        lines: list[str] = []
        current = "XFORWARD"
        for name, value in attrs.items():
            if name not in announced or not value:
                continue
            item = f" {name}={xtext(value[:255])}"
            if len(current) + len(item) > 500 and current != "XFORWARD":
                lines.append(current)
                current = "XFORWARD"
            current += item
        if current != "XFORWARD":
            lines.append(current)
        return lines

    async def send_data(self, content: bytes) -> Reply:
        """DATA, then the message; the reply to the final dot (or to DATA if it was refused)."""
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        payload = dot_stuff(content)
        try:
            async with asyncio.timeout(self.timeout):
                assert self._writer is not None
                self._writer.write(payload)
                await self._writer.drain()
                return await self._read_reply()
        except (OSError, TimeoutError, DownstreamError) as exc:
            self.broken = True
            raise DownstreamError(f"{self.host}:{self.port} during DATA: {_describe(exc)}") from None

    async def reset(self) -> None:
        """RSET, so nothing of the current transaction is delivered; a failure drops the session."""
        if not self.connected:
            return
        try:
            reply = await self.command("RSET")
        except DownstreamError:
            await self.close()
            return
        if reply.code != 250:
            self.broken = True
            await self.close()

    async def _read_reply(self) -> Reply:
        assert self._reader is not None
        lines: list[str] = []
        code = 0
        while True:
            raw = await self._reader.readline()
            if not raw:
                raise DownstreamError("connection closed by the server")
            if not raw.endswith(b"\n"):
                raise DownstreamError("reply line too long")
            text = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit() or (len(text) > 3 and text[3] not in " -"):
                raise DownstreamError(f"malformed reply {text[:80]!r}")
            line_code = int(text[:3])
            if code and line_code != code:
                raise DownstreamError("reply lines with different codes")
            code = line_code
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return Reply(code, tuple(lines))
            if len(lines) > _MAX_REPLY_LINES:
                raise DownstreamError("reply with too many lines")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

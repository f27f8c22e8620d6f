"""The Postfix policy delegation protocol, without sockets.

A request is a block of ``name=value`` lines, each ended by LF, closed by one empty line; many
requests follow each other on one connection. The answer is one ``action=...`` line and an empty
line, exactly one per request, in order (Postfix SMTPD_POLICY_README, "Protocol description").

:class:`RequestParser` turns received bytes into attribute dicts and enforces the limits
(line length, attribute count, request size); it raises :class:`ProtocolError` on anything
Postfix would never send, after which the server logs the client and closes the connection
without a reply, which is what the protocol asks a server to do on trouble.
Lines ending in CR LF are accepted too (people test by hand with telnet).

:func:`format_reply` builds the reply bytes. An action must never be empty or a bare number:
Postfix treats both as OK.
"""

from __future__ import annotations

from dataclasses import dataclass

from mxward.shared.plugin import Action, ActionKind, Stage

__all__ = [
    "STATE_STAGES",
    "Limits",
    "ProtocolError",
    "RequestParser",
    "action_text",
    "format_reply",
]

# protocol_state → the check stages that are complete at that point.
STATE_STAGES: dict[str, Stage | None] = {
    "CONNECT": Stage.CONNECT,
    "EHLO": Stage.HELO,
    "HELO": Stage.HELO,
    "MAIL": Stage.MAIL,
    "RCPT": Stage.RCPT,
    "DATA": Stage.DATA,
    "END-OF-MESSAGE": Stage.END_OF_MESSAGE,
    "VRFY": None,
    "ETRN": None,
}


class ProtocolError(Exception):
    """The peer sent something that is not a policy request; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request may contain (Postfix itself sends about 30 short lines)."""

    max_line_length: int = 8192
    max_attributes: int = 256
    max_request_size: int = 65536


# Every byte but "=" and LF: what bytes.translate() drops to see the shape of a request.
_NOT_SEPARATORS = bytes(b for b in range(256) if b not in b"=\n")


class RequestParser:
    """Incremental parser: ``feed(bytes)`` returns the complete requests received so far."""

    __slots__ = ("_buf", "_limits")

    def __init__(self, limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete request held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict[str, str]]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # Keep a trailing CR: its LF may arrive with the next read.
            tail = b"\r" if buf.endswith(b"\r") else b""
            buf = buf[: len(buf) - len(tail)].replace(b"\r\n", b"\n") + tail
        requests: list[dict[str, str]] = []
        start = 0
        limits = self._limits
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            if end - start + 2 > limits.max_request_size:
                raise ProtocolError(f"request larger than {limits.max_request_size} bytes")
            requests.append(self._parse_block(buf[start:end]))
            start = end + 2
        rest = buf[start:]
        if len(rest) > limits.max_request_size:
            raise ProtocolError(f"request larger than {limits.max_request_size} bytes")
        if rest and len(rest) - rest.rfind(b"\n") - 1 > limits.max_line_length:
            raise ProtocolError(f"line longer than {limits.max_line_length} bytes")
        self._buf = rest
        return requests

    def _parse_block(self, block: bytes) -> dict[str, str]:
        if not block or block.startswith(b"\n"):
            raise ProtocolError("empty line where a request should start")
        if b"\x00" in block:
            raise ProtocolError("NUL byte in request")
        limits = self._limits
        count = block.count(b"\n") + 1
        if count > limits.max_attributes:
            raise ProtocolError(f"more than {limits.max_attributes} attributes")
        if len(block) > limits.max_line_length:
            lines = block.split(b"\n")
            if max(map(len, lines)) > limits.max_line_length:
                number = next(n for n, line in enumerate(lines, 1) if len(line) > limits.max_line_length)
                raise ProtocolError(f"line {number} longer than {limits.max_line_length} bytes")
        text = block.decode("utf-8", "surrogateescape")
        attrs: dict[str, str] = {}
        if block.translate(None, _NOT_SEPARATORS) == b"=\n" * (count - 1) + b"=":
            # The fast path (this runs for every request): every line has exactly one "=", so
            # one C-level split makes names and values alternate. ("=" and LF are single bytes
            # that UTF-8 and surrogateescape keep as they are.)
            parts = iter(text.replace("\n", "=").split("="))
            attrs = dict(zip(parts, parts, strict=False))
        if len(attrs) != count or "" in attrs:
            # A value with "=", a line without one, an empty name, a repeated name: line by line.
            attrs = {}
            for number, line in enumerate(text.split("\n"), 1):
                name, sep, value = line.partition("=")
                if not sep or not name:
                    shown = line[:40].encode("ascii", "backslashreplace").decode()
                    raise ProtocolError(f"line {number} is not name=value: {shown!r}")
                attrs[name] = value  # a repeated name: the last value wins (the protocol allows either)
        request = attrs.get("request")
        if request != "smtpd_access_policy":
            raise ProtocolError(f"request={request!r}, expected smtpd_access_policy")
        return attrs


_MAX_TEXT = 400  # Postfix cuts the whole SMTP reply at 510 bytes


def _clean(text: str) -> str:
    # Reply text must be one line of valid UTF-8 (Postfix treats invalid UTF-8 as a failed
    # request when smtputf8_enable = yes), printable (Postfix turns the rest into spaces) and
    # bounded in length.
    if not (text.isprintable() and text.isascii()):
        text = "".join(ch if ch.isprintable() else " " for ch in text)
        text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3].rstrip() + "..."
    return text


def action_text(action: Action, header: str = "") -> str:
    """The value of ``action=`` for a decision.

    DUNNO (or a PREPEND of ``header`` when the mail is otherwise let through);
    ``DEFER_IF_PERMIT 4.7.1 text`` (Postfix sends 450 4.7.1 if the mail would otherwise be
    accepted, so a later REJECT still wins); ``450 4.7.1 text`` / ``550 5.7.1 text`` for DEFER
    and REJECT.
    """
    kind = action.kind
    if kind is ActionKind.DUNNO:
        return f"PREPEND {_clean(header)}" if header else "DUNNO"
    if kind is ActionKind.DEFER_IF_PERMIT:
        return f"DEFER_IF_PERMIT {action.dsn} {_clean(action.text)}"
    return f"{action.code} {action.dsn} {_clean(action.text)}"


def format_reply(text: str) -> bytes:
    """``action=<text>`` plus the empty line, as bytes."""
    return b"action=" + text.encode("utf-8", "replace") + b"\n\n"

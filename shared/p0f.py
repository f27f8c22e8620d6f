"""A client for the p0f 3 API: what p0f's passive fingerprinting knows about a client address.

p0f watches the network interface and fingerprints TCP handshakes; its API socket (``p0f -s
PATH``, a unix stream socket) answers queries about a host by IP address. The protocol, from
p0f's README section "API access":

* query, 21 bytes: magic ``0x50304601`` (u32, native byte order), address type (u8: 4 or 6),
  16 bytes of address in network order, an IPv4 address left-aligned and zero-padded;
* reply, 232 bytes: magic ``0x50304602`` (u32, native), status (u32: ``0x00`` bad query,
  ``0x10`` OK, ``0x20`` no match), then, meaningful only with OK: first_seen, last_seen,
  total_conn, uptime_min, up_mod_days, last_nat, last_chg (u32 each), distance (s16, -1 when
  unknown), bad_sw (u8), os_match_q (u8) and six NUL-terminated 32-byte strings: os_name,
  os_flavor, http_name, http_flavor, link_type, language.

IPv4-mapped IPv6 addresses (``::ffff:192.0.2.7``, as a dual-stack listener reports IPv4
clients) are asked as IPv4, because p0f saw IPv4 packets; other IPv6 addresses as 16 bytes
of type 6.

:class:`P0fClient` keeps one connection and sends one query at a time on it (p0f answers in
order, and caps API connections at 20 by default, so a connection per query would not scale
with concurrent requests). Every query has a short overall time limit; a connection that
timed out or answered garbage is closed, so a late reply can never be taken for the next
one's. A connection p0f closed (p0f restarted) is reopened once, transparently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "QUERY_MAGIC",
    "REPLY_MAGIC",
    "REPLY_SIZE",
    "STATUS_BAD_QUERY",
    "STATUS_NO_MATCH",
    "STATUS_OK",
    "HostInfo",
    "P0fClient",
    "P0fError",
    "P0fProtocolError",
    "P0fUnavailableError",
    "decode_reply",
    "encode_query",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

QUERY_MAGIC: Final = 0x50304601
REPLY_MAGIC: Final = 0x50304602
STATUS_BAD_QUERY: Final = 0x00
STATUS_OK: Final = 0x10
STATUS_NO_MATCH: Final = 0x20

_QUERY = struct.Struct("=IB16s")
_REPLY = struct.Struct("=IIIIIIIIIhBB32s32s32s32s32s32s")
REPLY_SIZE: Final = _REPLY.size  # 232


class P0fError(Exception):
    """p0f could not answer a query."""


class P0fUnavailableError(P0fError):
    """The API socket is missing, refuses connections, or p0f did not answer in time."""


class P0fProtocolError(P0fError):
    """p0f's answer was not a valid reply (bad magic, short, rejected query, unknown status)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HostInfo:
    """p0f's record of one host (the fields of a p0f 3 API reply with status OK)."""

    first_seen: int = 0
    last_seen: int = 0
    total_conn: int = 0
    uptime_min: int = 0  # 0 = unknown
    up_mod_days: int = 0
    last_nat: int = 0  # 0 = never detected
    last_chg: int = 0
    distance: int = -1  # network hops; -1 = unknown
    bad_sw: int = 0
    os_match_q: int = 0
    os_name: str = ""
    os_flavor: str = ""
    http_name: str = ""
    http_flavor: str = ""
    link_type: str = ""
    language: str = ""

    @property
    def genre(self) -> str:
        """``"<os_name> <os_flavor>"`` (``"Windows 7 or 8"``), qpsmtpd's name for it."""
        return f"{self.os_name} {self.os_flavor}".strip()


def _address(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def encode_query(ip: IPAddress) -> bytes:
    """The 21-byte query for ``ip``."""
    ip = _address(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return _QUERY.pack(QUERY_MAGIC, 4, ip.packed.ljust(16, b"\0"))
    return _QUERY.pack(QUERY_MAGIC, 6, ip.packed)


def _text(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return "".join(ch for ch in text if ch.isprintable()).strip()


def decode_reply(data: bytes) -> HostInfo | None:
    """The host record of a reply, None for "no match"; :class:`P0fProtocolError` otherwise."""
    if len(data) != REPLY_SIZE:
        raise P0fProtocolError(f"reply of {len(data)} bytes, expected {REPLY_SIZE}")
    fields = _REPLY.unpack(data)
    magic, status = fields[0], fields[1]
    if magic != REPLY_MAGIC:
        raise P0fProtocolError(f"bad reply magic 0x{magic:08x}")
    if status == STATUS_NO_MATCH:
        return None
    if status == STATUS_BAD_QUERY:
        raise P0fProtocolError("p0f answered 'bad query'")
    if status != STATUS_OK:
        raise P0fProtocolError(f"unknown reply status 0x{status:02x}")
    (first_seen, last_seen, total_conn, uptime_min, up_mod_days, last_nat, last_chg) = fields[2:9]
    distance, bad_sw, os_match_q = fields[9:12]
    os_name, os_flavor, http_name, http_flavor, link_type, language = (_text(f) for f in fields[12:18])
    return HostInfo(
        first_seen=first_seen,
        last_seen=last_seen,
        total_conn=total_conn,
        uptime_min=uptime_min,
        up_mod_days=up_mod_days,
        last_nat=last_nat,
        last_chg=last_chg,
        distance=distance,
        bad_sw=bad_sw,
        os_match_q=os_match_q,
        os_name=os_name,
        os_flavor=os_flavor,
        http_name=http_name,
        http_flavor=http_flavor,
        link_type=link_type,
        language=language,
    )


class P0fClient:
    """Queries one p0f API socket; create once per process, close with :meth:`aclose`."""

    def __init__(self, path: str, *, timeout: float = 0.5) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def query(self, ip: IPAddress) -> HostInfo | None:
        """p0f's record of ``ip``, or None when p0f has not seen it.

        Raises :class:`P0fUnavailableError` or :class:`P0fProtocolError`.
        """
        request = encode_query(ip)
        try:
            async with asyncio.timeout(self.timeout), self._lock:
                try:
                    return await self._exchange(request)
                except BaseException:
                    # Timed out, cancelled or garbled: a reply may still be on its way, and
                    # the next query must not read it. Start over on a new connection.
                    self._drop()
                    raise
        except TimeoutError:
            raise P0fUnavailableError(f"no reply from {self.path} within {self.timeout:g}s") from None

    async def _exchange(self, request: bytes) -> HostInfo | None:
        while True:
            fresh = self._writer is None
            reader, writer = await self._connection()
            try:
                writer.write(request)
                await writer.drain()
                data = await reader.readexactly(REPLY_SIZE)
            except asyncio.IncompleteReadError as exc:
                self._drop()
                if exc.partial:
                    raise P0fProtocolError(f"short reply: {len(exc.partial)} of {REPLY_SIZE} bytes") from None
                if fresh:
                    raise P0fProtocolError("p0f closed the connection without a reply") from None
            except ConnectionError as exc:
                self._drop()
                if fresh:
                    raise P0fUnavailableError(f"{self.path}: {exc}") from None
            else:
                return decode_reply(data)
            # A kept connection that p0f closed meanwhile (restart): once more on a new one.

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.path)
            except OSError as exc:
                raise P0fUnavailableError(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return self._reader, self._writer

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def aclose(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

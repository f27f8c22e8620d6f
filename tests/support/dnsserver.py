"""A small authoritative DNS server for tests: UDP and TCP on loopback, port 0, with fault injection.

``async with DnsServer([TEST_ZONE]) as server:`` runs it in the test's event loop;
``with ThreadedDnsServer([TEST_ZONE]) as server:`` runs the same server in a thread with its own
loop, for synchronous tests or a daemon subprocess pointed at ``server.nameserver``. Both answer
through one :class:`Responder`.

Zones: a :class:`~pathlib.Path` is read as a zone file, a ``str`` is zone-file text. A file may
hold several zones: each starts at a ``$ORIGIN`` line followed (before the next ``$ORIGIN``) by
that zone's SOA; a ``$ORIGIN`` block without an SOA continues the zone before it, and lines
before the first ``$ORIGIN`` (such as ``$TTL``) apply to every zone. Each zone is parsed with
``dns.zone.from_text``. Answers: authoritative data (following CNAMEs), NXDOMAIN and NODATA
with the zone's SOA in the authority section (TTL = min(SOA TTL, minimum), RFC 2308), REFUSED
outside the zones. No wildcards, delegations or DNSSEC. UDP replies larger than 512 bytes (or
the client's EDNS payload) are sent truncated (TC), so clients retry over TCP.

Forwarding: ``forward(zone, host, port)`` passes every question at or below ``zone`` to another
DNS server over UDP and relays its reply unchanged (a zone of our own below ``zone`` still
answers itself), so one test server can serve the test zones and hand DNS list zones to a real
``rbldnsd``. Faults apply before forwarding; an upstream that does not reply within
``FORWARD_TIMEOUT`` seconds gives SERVFAIL, as a recursive resolver would.

Faults per name (any type, case-insensitive): ``servfail``, ``refuse``, ``drop`` (no reply: the
client times out), ``delay`` (seconds before replying), undone by ``heal``. ``queries`` counts
questions per (name, type) as received, ``tcp_queries`` the ones that came over TCP; names are
lower-case without the trailing dot, types are mnemonics (``("mail.test.example", "A")``).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable
    from types import TracebackType

__all__ = ["DnsServer", "Responder", "ThreadedDnsServer", "ZoneSource", "parse_zones"]

ZoneSource = str | Path
T = TypeVar("T")

UDP_PLAIN_LIMIT = 512
TCP_LIMIT = 65535
MAX_CNAME_CHAIN = 8
FORWARD_TIMEOUT = 2.0
_ORIGIN_LINE = re.compile(r"^\$ORIGIN\s+(\S+)", re.IGNORECASE | re.MULTILINE)
_SOA_RECORD = re.compile(r"^[^;\n]*\bSOA\b", re.IGNORECASE | re.MULTILINE)


def parse_zones(source: ZoneSource) -> list[dns.zone.Zone]:
    """Parse one zone file (Path) or zone text (str) that may hold several zones."""
    if isinstance(source, Path):
        text, filename = source.read_text(encoding="utf-8"), str(source)
    else:
        text, filename = source, "<zone text>"
    starts = [match.start() for match in _ORIGIN_LINE.finditer(text)]
    if not starts:
        raise ValueError(f"{filename}: a test zone needs a $ORIGIN line")
    preamble = text[: starts[0]]
    blocks = [text[start:end] for start, end in zip(starts, [*starts[1:], len(text)], strict=True)]
    zone_texts: list[str] = []
    for block in blocks:
        if _SOA_RECORD.search(block) or not zone_texts:
            zone_texts.append(preamble + block)
        else:
            zone_texts[-1] += block
    zones = []
    for zone_text in zone_texts:
        match = _ORIGIN_LINE.search(zone_text)
        assert match is not None
        zones.append(
            dns.zone.from_text(zone_text, origin=match.group(1), relativize=False, filename=filename)
        )
    return zones


def _key_name(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class Responder:
    """The answer logic shared by both servers: zones, faults and query counters (thread-safe)."""

    def __init__(self, zones: Iterable[ZoneSource] = ()) -> None:
        self._lock = threading.Lock()
        self._zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._names: set[dns.name.Name] = set()  # every name that exists, empty non-terminals too
        self._servfail: set[dns.name.Name] = set()
        self._refuse: set[dns.name.Name] = set()
        self._drop: set[dns.name.Name] = set()
        self._delay: dict[dns.name.Name, float] = {}
        self._forwards: dict[dns.name.Name, tuple[str, int]] = {}
        self._queries: Counter[tuple[str, str]] = Counter()
        self._tcp_queries: Counter[tuple[str, str]] = Counter()
        for source in zones:
            self.add_zone(source)

    # -- controls --------------------------------------------------------------------------

    def add_zone(self, source: ZoneSource) -> None:
        """Serve the zones in ``source`` too (a zone with the same origin is replaced)."""
        zones = parse_zones(source)
        with self._lock:
            for zone in zones:
                assert zone.origin is not None
                self._zones[zone.origin] = zone
            self._names = set()
            for zone in self._zones.values():
                assert zone.origin is not None
                for owner in zone.nodes:
                    self._names.update(_names_down_to(owner, zone.origin))

    def forward(self, zone: str, host: str, port: int) -> None:
        """Pass questions at or below ``zone`` to the DNS server at ``host``:``port`` (UDP)."""
        with self._lock:
            self._forwards[dns.name.from_text(zone)] = (host, port)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL to every question about ``name``."""
        with self._lock:
            self._servfail.add(dns.name.from_text(name))

    def refuse(self, name: str) -> None:
        """Answer REFUSED to every question about ``name``."""
        with self._lock:
            self._refuse.add(dns.name.from_text(name))

    def drop(self, name: str) -> None:
        """Never reply to questions about ``name`` (the client times out)."""
        with self._lock:
            self._drop.add(dns.name.from_text(name))

    def delay(self, name: str, seconds: float) -> None:
        """Wait ``seconds`` before replying to questions about ``name``."""
        with self._lock:
            self._delay[dns.name.from_text(name)] = seconds

    def heal(self, name: str | None = None) -> None:
        """Remove the faults of ``name``, or of every name."""
        with self._lock:
            faults = (self._servfail, self._refuse, self._drop)
            if name is None:
                for fault in faults:
                    fault.clear()
                self._delay.clear()
                return
            qname = dns.name.from_text(name)
            for fault in faults:
                fault.discard(qname)
            self._delay.pop(qname, None)

    @property
    def queries(self) -> Counter[tuple[str, str]]:
        """A snapshot of the questions received per (name, type)."""
        with self._lock:
            return Counter(self._queries)

    @property
    def tcp_queries(self) -> Counter[tuple[str, str]]:
        """A snapshot of the questions received over TCP per (name, type)."""
        with self._lock:
            return Counter(self._tcp_queries)

    def reset_queries(self) -> None:
        """Forget the counted questions."""
        with self._lock:
            self._queries.clear()
            self._tcp_queries.clear()

    # -- answering -------------------------------------------------------------------------

    async def respond(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The reply to one query message, or None to send nothing."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None
        if len(query.question) != 1 or query.opcode() != dns.opcode.QUERY:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR if len(query.question) != 1 else dns.rcode.NOTIMP)
            return response.to_wire()
        question = query.question[0]
        qname = question.name
        key = (_key_name(qname), dns.rdatatype.to_text(question.rdtype))
        with self._lock:
            self._queries[key] += 1
            if tcp:
                self._tcp_queries[key] += 1
            delay = self._delay.get(qname, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        with self._lock:
            if qname in self._drop:
                return None
            faulty = qname in self._servfail or qname in self._refuse
            upstream = None if faulty else self._upstream_of(qname)
            if upstream is None:
                return _to_wire(query, self._answer(query, qname, question.rdtype), tcp=tcp)
        return await _relay(query, wire, upstream)

    def _answer(
        self, query: dns.message.Message, qname: dns.name.Name, qtype: dns.rdatatype.RdataType
    ) -> dns.message.Message:
        response = dns.message.make_response(query)
        if qname in self._servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        zone = self._zone_of(qname)
        if qname in self._refuse or zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        for _ in range(MAX_CNAME_CHAIN):
            node = zone.get_node(qname)
            if node is None:
                if qname not in self._names:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                _add_soa(response, zone)
                return response
            rdataset = node.get_rdataset(dns.rdataclass.IN, qtype)
            if rdataset is not None:
                response.answer.append(_rrset(qname, rdataset))
                return response
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None or qtype == dns.rdatatype.CNAME:
                _add_soa(response, zone)
                return response
            response.answer.append(_rrset(qname, cname))
            qname = next(iter(cname)).target
            next_zone = self._zone_of(qname)
            if next_zone is None:
                return response  # the target is outside our zones: the client asks elsewhere
            zone = next_zone
        return response

    def _upstream_of(self, qname: dns.name.Name) -> tuple[str, int] | None:
        """The server to forward ``qname`` to, unless one of our own zones is closer to it."""
        name = qname
        while True:
            upstream = self._forwards.get(name)
            if upstream is not None:
                return upstream
            if name in self._zones or name == dns.name.root:
                return None
            name = name.parent()

    def _zone_of(self, qname: dns.name.Name) -> dns.zone.Zone | None:
        name = qname
        while True:
            zone = self._zones.get(name)
            if zone is not None:
                return zone
            if name == dns.name.root:
                return None
            name = name.parent()


def _names_down_to(name: dns.name.Name, origin: dns.name.Name) -> list[dns.name.Name]:
    """``name`` and its ancestors down to ``origin``: the names that exist because ``name`` does."""
    names = [name]
    while names[-1] != origin and names[-1] != dns.name.root:
        names.append(names[-1].parent())
    return names


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))


def _add_soa(response: dns.message.Message, zone: dns.zone.Zone) -> None:
    assert zone.origin is not None
    soa = zone.find_rdataset(zone.origin, dns.rdatatype.SOA)
    minimum = min(soa.ttl, next(iter(soa)).minimum)
    response.authority.append(dns.rrset.from_rdata_list(zone.origin, minimum, list(soa)))


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, reply: asyncio.Future[bytes]) -> None:
        self.reply = reply

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _relay(query: dns.message.Message, wire: bytes, upstream: tuple[str, int]) -> bytes:
    """Ask ``upstream`` the query as it came; its reply, or SERVFAIL when it does not answer."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _RelayProtocol(reply), remote_addr=upstream)
    try:
        transport.sendto(wire)
        async with asyncio.timeout(FORWARD_TIMEOUT):
            return await reply
    except (TimeoutError, OSError):
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()
    finally:
        transport.close()


def _to_wire(query: dns.message.Message, response: dns.message.Message, *, tcp: bool) -> bytes:
    limit = TCP_LIMIT if tcp else max(UDP_PLAIN_LIMIT, query.payload if query.edns >= 0 else 0)
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.TC | (response.flags & dns.flags.AA)
        return truncated.to_wire(max_size=limit)


class _Controls:
    """The controls both servers share, delegated to their :class:`Responder`."""

    responder: Responder

    def add_zone(self, source: ZoneSource) -> None:
        """Serve the zones in ``source`` too."""
        self.responder.add_zone(source)

    def forward(self, zone: str, host: str, port: int) -> None:
        """Pass questions at or below ``zone`` to the DNS server at ``host``:``port``."""
        self.responder.forward(zone, host, port)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for ``name``."""
        self.responder.servfail(name)

    def refuse(self, name: str) -> None:
        """Answer REFUSED for ``name``."""
        self.responder.refuse(name)

    def drop(self, name: str) -> None:
        """Never answer for ``name``."""
        self.responder.drop(name)

    def delay(self, name: str, seconds: float) -> None:
        """Answer for ``name`` after ``seconds``."""
        self.responder.delay(name, seconds)

    def heal(self, name: str | None = None) -> None:
        """Remove the faults of ``name``, or of every name."""
        self.responder.heal(name)

    @property
    def queries(self) -> Counter[tuple[str, str]]:
        """Questions received per (name, type)."""
        return self.responder.queries

    @property
    def tcp_queries(self) -> Counter[tuple[str, str]]:
        """Questions received over TCP per (name, type)."""
        return self.responder.tcp_queries

    def reset_queries(self) -> None:
        """Forget the counted questions."""
        self.responder.reset_queries()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._server.spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        wire = await self._server.responder.respond(data, tcp=False)
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class DnsServer(_Controls):
    """The test DNS server in the running event loop: ``async with DnsServer(zones) as server``."""

    def __init__(self, zones: Iterable[ZoneSource] = (), *, host: str = "127.0.0.1") -> None:
        self.responder = Responder(zones)
        self.host = host
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._replies: set[asyncio.Task[Any]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def nameserver(self) -> str:
        """``host:port`` (``[host]:port`` for IPv6), as the ``[dns] nameservers`` setting takes it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind UDP and TCP to one free port on ``host``."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:  # the TCP side of this port is taken: try another port
                udp.close()
                continue
            self._udp, self.port = udp, port
            return
        raise OSError(f"no port free on {self.host} for both UDP and TCP")

    async def stop(self) -> None:
        """Close the sockets, cancel the replies still pending and wait for the connections to end."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._replies):
            task.cancel()
        for writer in list(self._writers):
            writer.close()  # the handler sees end of stream and returns by itself
        pending = self._replies | self._connections
        if pending:
            await asyncio.wait(pending)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run one reply as a task that ``stop`` cancels."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)
        return task

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Not cancelled by stop() (Python 3.11's stream callback logs a cancelled handler as an
        # error): stop() closes the connection and cancels the reply instead.
        connection = asyncio.current_task()
        assert connection is not None
        self._connections.add(connection)
        self._writers.add(writer)
        try:
            while not writer.is_closing():
                length = int.from_bytes(await reader.readexactly(2), "big")
                reply = self.spawn(self.responder.respond(await reader.readexactly(length), tcp=True))
                await asyncio.wait({reply})
                if reply.cancelled():
                    break
                wire = reply.result()
                if wire is not None:
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(connection)
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class ThreadedDnsServer(_Controls):
    """The same server in a thread with its own event loop: ``with ThreadedDnsServer(zones) as server``."""

    def __init__(self, zones: Iterable[ZoneSource] = (), *, host: str = "127.0.0.1") -> None:
        self._server = DnsServer(zones, host=host)
        self.responder = self._server.responder
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def nameserver(self) -> str:
        return self._server.nameserver

    def start(self) -> None:
        """Start the thread and wait until the server listens."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="test-dns-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._server.start(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server, its loop and the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._server.stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

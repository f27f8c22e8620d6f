"""The DNS service: typed questions, a TTL cache, in-flight deduplication and a time budget.

One :class:`Resolver` is created per process and handed to the checks through ``Services``.
It asks a stub question of the configured recursive resolvers (dnspython's asynchronous
resolver does the wire work: UDP, TCP when an answer is truncated, retries until the budget is
spent) and keeps its own cache; dnspython's cache is never used.

Questions (all ``async``):
    ``query(name, rdtype) -> Answer``   the generic question the typed ones are built on
    ``a(name)``, ``aaaa(name)``         addresses as text
    ``addresses(name)``                 A then AAAA, both asked at the same time
    ``ptr(ip)``                         reverse names, lower-case, no trailing dot
    ``txt(name)``                       one string per record, its character-strings joined,
                                        decoded as UTF-8 (bad bytes become U+FFFD)
    ``mx(name)``                        ``(preference, host)`` sorted by preference, then host;
                                        a null MX (RFC 7505) has host ``""``
    ``dnsbl(zone, ip)``                 the A records of the RFC 5782 name (reversed IPv4 octets or
                                        reversed IPv6 nibbles, then ``zone``)
    ``dnsbl_txt(zone, ip)``             the TXT records of that name
:meth:`Resolver.reverse_name` builds the in-addr.arpa / ip6.arpa / DNSBL names.

Settings (``[dns]``, :class:`DnsSettings`):
    nameservers   list of str  []                  resolvers as ``"192.0.2.1"``,
                                                   ``"127.0.0.1:5353"``, ``"::1"`` or
                                                   ``"[::1]:5353"``; empty means the system's
                                                   resolvers from ``resolv_conf``
    resolv_conf   str          "/etc/resolv.conf"  read only when ``nameservers`` is empty
    timeout       float        2.0                 seconds to wait for one reply before
                                                   asking again
    lifetime      float        5.0                 cap for one question, retries included;
                                                   at least ``timeout``
    cache_size    int          10000               cached questions (least recently used go
                                                   first); 0 turns the cache off
    negative_ttl  float        300.0               cap for caching "no such name" / "no data";
                                                   the zone's SOA minimum wins when smaller
    max_ttl       float        86400.0             cap for caching answers
    edns          bool         true                send EDNS0 with a 1232-byte UDP payload
    reuse_results bool         true                let the pipeline reuse a check's result
                                                   while the cached answers it came from
                                                   are valid (see "Reused results")

Errors:
    "No such name" (NXDOMAIN) and "no data" (NODATA) are answers: the typed questions return
    an empty list and :class:`Answer` says which one it was. SERVFAIL, REFUSED, other bad
    replies, timeouts, running out of ``lifetime`` and network errors raise
    :class:`DnsTempError`, whose ``reason`` is ``"servfail"``, ``"refused"``, ``"timeout"``,
    ``"network"`` or another rcode in lower case. That is trouble with our resolver, never
    the sender's fault: checks turn it into verdict ERROR (temperror), not a score.
    :class:`DnsError` itself is raised for a question that cannot be asked (a name that is not
    valid DNS syntax or too long). A question type dnspython does not know, or a meta type
    such as ANY, raises ``ValueError``; so does a malformed IP address.

Cache:
    Keyed by (lower-case name, type). Answers are kept for the smallest TTL of the answer and
    its CNAME chain, at most ``max_ttl``. NXDOMAIN and NODATA are kept for
    min(SOA TTL, SOA minimum) of the zone's SOA in the reply (RFC 2308), at most
    ``negative_ttl``, and for ``negative_ttl`` when the reply carries no SOA. A TTL of 0 is
    not cached. Temporary errors are never cached. Expiry follows the injected clock's
    ``monotonic()``. Identical questions asked while one is on the wire share that one query
    and its answer or error; a waiter that is cancelled does not cancel it for the others.
    :attr:`Resolver.stats` counts queries sent, cache hits (and how many were negative),
    questions that joined a query in flight, and temporary errors.

Reused results:
    A check whose result follows from the request's values and DNS answers alone (no Redis,
    no clock, no reloaded file) may name those values (``Check.reuse_key``). The pipeline
    then asks :meth:`Resolver.watch` for the earliest expiry of the cached answers that the
    check read while it ran without waiting, and reuses that result for the same values until
    then: exactly what running the check again on the same cache would give, for a fraction
    of the cost. A check that waited for the network is not reused (its answers are cached
    now, so the next run is). ``reuse_results = false`` turns this off.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rdtypes.mxbase
import dns.rdtypes.nsbase
import dns.rdtypes.txtbase
import dns.resolver
import dns.rrset

from mxward.shared.aio import running_loop
from mxward.shared.clock import SystemClock
from mxward.shared.units import Duration

if TYPE_CHECKING:
    from mxward.shared.clock import Clock

__all__ = [
    "Answer",
    "DnsError",
    "DnsSettings",
    "DnsTempError",
    "Resolver",
    "ResolverStats",
    "normalize_domain",
    "parse_nameserver",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORT: Final = 53
EDNS_PAYLOAD: Final = 1232  # DNS flag day 2020: fits a 1280-byte IPv6 packet without fragments


class DnsError(Exception):
    """The root of the DNS service's errors; raised itself for a question that cannot be asked."""


class DnsTempError(DnsError):
    """The resolver could not answer now (SERVFAIL, REFUSED, timeout, network): never the sender's fault.

    ``reason`` is a short word for logs and metrics: ``servfail``, ``refused``, ``timeout``,
    ``network`` or another rcode in lower case.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_nameserver(text: str) -> tuple[str, int]:
    """Parse ``"192.0.2.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` into (address, port).

    Raises ValueError naming the entry when it is not an IP address with an optional port.
    """
    entry = text.strip()
    if entry.startswith("["):
        host, closed, rest = entry[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"dns nameserver {text!r}: expected [IPv6]:port")
        port_text = rest[1:] if rest else str(DEFAULT_PORT)
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host, port_text = entry, str(DEFAULT_PORT)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"dns nameserver {text!r}: {host!r} is not an IP address") from None
    if entry.startswith("[") and address.version != 6:
        raise ValueError(f"dns nameserver {text!r}: brackets are only for IPv6 addresses")
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"dns nameserver {text!r}: port must be a number from 1 to 65535")
    return str(address), int(port_text)


@dataclass(frozen=True, kw_only=True)
class DnsSettings:
    """The ``[dns]`` table; see the module docstring for every field."""

    nameservers: tuple[str, ...] = ()
    resolv_conf: str = "/etc/resolv.conf"
    timeout: Duration = 2.0
    lifetime: Duration = 5.0
    cache_size: int = 10000
    negative_ttl: Duration = 300.0
    max_ttl: Duration = 86400.0
    edns: bool = True
    reuse_results: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.nameservers, str):
            raise TypeError("dns nameservers must be a list of addresses, not one string")
        object.__setattr__(self, "nameservers", tuple(self.nameservers))
        for entry in self.nameservers:
            parse_nameserver(entry)
        for key in ("timeout", "lifetime"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"dns {key} must be a positive number of seconds, got {value!r}")
        if self.lifetime < self.timeout:
            raise ValueError(
                f"dns lifetime ({self.lifetime}) must be at least timeout ({self.timeout}):"
                " it caps one question including its retries"
            )
        for key in ("negative_ttl", "max_ttl"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"dns {key} must be zero or more seconds, got {value!r}")
        if self.cache_size < 0:
            raise ValueError(f"dns cache_size must be zero or more entries, got {self.cache_size!r}")

    def nameserver_addresses(self) -> tuple[tuple[str, int], ...]:
        """The configured nameservers as (address, port) pairs."""
        return tuple(parse_nameserver(entry) for entry in self.nameservers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The answer to one question, in text form.

    ``records`` per type: addresses for A/AAAA; names lower-case without the trailing dot for
    PTR/CNAME/NS; ``"<preference> <host>"`` for MX; joined, UTF-8-decoded strings for TXT;
    dnspython's presentation format otherwise. ``ttl`` is how long the answer is cached (after
    the ``max_ttl`` / ``negative_ttl`` caps). ``nxdomain`` tells "no such name" apart from
    "no data" when ``records`` is empty.
    """

    records: tuple[str, ...]
    ttl: float
    nxdomain: bool = False


@dataclass(slots=True)
class ResolverStats:
    """Counters since start, for metrics.

    ``queries``: questions sent to the nameservers (retries and the TCP retry of a truncated
    answer count once); ``cache_hits``: questions answered from the cache, ``negative_hits``
    being those that were NXDOMAIN or NODATA; ``coalesced``: questions that joined an identical
    one already in flight; ``temp_errors``: queries that ended in DnsTempError.
    """

    queries: int = 0
    cache_hits: int = 0
    negative_hits: int = 0
    coalesced: int = 0
    temp_errors: int = 0


_Key = tuple[str, str]


class _TtlCache:
    """A bounded LRU map of answers with an expiry time each."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[_Key, tuple[float, Answer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _Key, now: float) -> tuple[float, Answer] | None:
        """The entry (expiry, answer) for ``key`` if it has not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def peek(self, key: _Key, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[0] > now

    def put(self, key: _Key, answer: Answer, now: float) -> None:
        if self._size == 0 or answer.ttl <= 0:
            return
        self._entries[key] = (now + answer.ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Resolver:
    """The DNS service; see the module docstring."""

    def __init__(self, settings: DnsSettings, *, clock: Clock | None = None) -> None:
        self.settings = settings
        self.stats = ResolverStats()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._cache = _TtlCache(settings.cache_size)
        self._inflight: dict[_Key, asyncio.Task[Answer]] = {}
        self._resolver = _make_dnspython_resolver(settings)
        # While watching (see watch()): the earliest expiry of the cached answers served.
        self._earliest: float | None = None

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The nameservers in use, as ``address:port`` / ``[address]:port`` (for the startup log)."""
        result = []
        for server in self._resolver.nameservers:
            if isinstance(server, dns.nameserver.AddressAndPortNameserver):
                address, port = server.address, server.port
                result.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
            else:
                result.append(str(server))
        return tuple(result)

    @property
    def cache_entries(self) -> int:
        """How many questions are cached now (expired ones included until they are looked up)."""
        return len(self._cache)

    # -- typed questions -------------------------------------------------------------------

    async def a(self, name: str) -> list[str]:
        """IPv4 addresses of ``name``."""
        return list((await self.query(name, "A")).records)

    async def aaaa(self, name: str) -> list[str]:
        """IPv6 addresses of ``name``."""
        return list((await self.query(name, "AAAA")).records)

    async def addresses(self, name: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``name``, both asked at the same time.

        Raises DnsTempError when either question fails for a temporary reason.
        """
        if self.is_cached(name, "A") and self.is_cached(name, "AAAA"):
            return [*await self.a(name), *await self.aaaa(name)]
        results = await asyncio.gather(self.a(name), self.aaaa(name), return_exceptions=True)
        addresses: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            addresses.extend(result)
        return addresses

    async def ptr(self, ip: str | IPAddress) -> list[str]:
        """Reverse names of ``ip``, lower-case, without the trailing dot."""
        return list((await self.query(self.reverse_name(ip), "PTR")).records)

    async def txt(self, name: str) -> list[str]:
        """TXT records of ``name``, one string per record."""
        return list((await self.query(name, "TXT")).records)

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """MX records of ``name`` as (preference, host), sorted; host ``""`` is a null MX."""
        records = []
        for record in (await self.query(name, "MX")).records:
            preference, _, host = record.partition(" ")
            records.append((int(preference), host))
        return sorted(records)

    async def dnsbl(self, zone: str, ip: str | IPAddress) -> list[str]:
        """A records listing ``ip`` in the DNSBL ``zone`` (RFC 5782); empty when not listed."""
        return list((await self.query(self.reverse_name(ip, zone), "A")).records)

    async def dnsbl_txt(self, zone: str, ip: str | IPAddress) -> list[str]:
        """TXT records (the listing reasons) for ``ip`` in the DNSBL ``zone``."""
        return list((await self.query(self.reverse_name(ip, zone), "TXT")).records)

    @staticmethod
    def reverse_name(ip: str | IPAddress, zone: str | None = None) -> str:
        """The reversed name of ``ip`` under ``zone`` (RFC 5782), or in in-addr.arpa / ip6.arpa.

        IPv4 uses reversed octets, IPv6 reversed nibbles of all 32 hex digits (also for
        IPv4-mapped addresses, as RFC 5782 section 5 tests ``::FFFF:7F00:2``). No trailing dot.
        """
        address = ip if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address) else _parse_ip(ip)
        if address.version == 4:
            labels = [str(octet) for octet in reversed(address.packed)]
            default_zone = "in-addr.arpa"
        else:
            labels = list(reversed(address.packed.hex()))
            default_zone = "ip6.arpa"
        suffix = (zone if zone is not None else default_zone).strip(".")
        return ".".join([*labels, suffix]) if suffix else ".".join(labels)

    # -- the generic question --------------------------------------------------------------

    def cached(self, name: str, rdtype: str) -> Answer | None:
        """The cached answer to this question, or None: never asks the network.

        For callers that cannot wait (a synchronous library such as pyspf asking from inside
        the event loop). Raises DnsError for a name that is not valid DNS syntax.
        """
        now = self._clock.monotonic()
        key = _plain_key(name, rdtype)
        if key is None:
            qname, qtype = _question(name, rdtype)
            key = _full_key(qname, qtype)
        # A plain name's key is the full key already: one lookup either way.
        entry = self._cache.get(key, now)
        return self._hit(entry) if entry is not None else None

    def is_cached(self, name: str, rdtype: str) -> bool:
        """Whether :meth:`query` would answer at once (from the cache, or with a DnsError).

        Callers that would ask several questions concurrently ask them one after the other
        instead when all are cached: concurrency costs a task per question, waiting nothing.
        """
        key = _plain_key(name, rdtype)
        if key is None:
            try:
                qname, qtype = _question(name, rdtype)
            except DnsError:
                return True
            key = _full_key(qname, qtype)
        return self._cache.peek(key, self._clock.monotonic())

    def now(self) -> float:
        """The resolver clock's ``monotonic()`` time, the time base of cache expiries."""
        return self._clock.monotonic()

    def watch(self) -> float | None:
        """Start noting the expiry of cached answers served; returns what to give :meth:`unwatch`.

        The pipeline calls this around a check's first step: when the check finishes without
        waiting, every answer it read came from the cache, and the earliest of their expiries
        (see :meth:`unwatch`) bounds how long its result stays the same.
        """
        outer = self._earliest
        self._earliest = math.inf
        return outer

    def unwatch(self, outer: float | None) -> float:
        """Stop noting; the earliest expiry (``monotonic()`` time) seen since :meth:`watch`.

        ``inf`` when no cached answer was read. ``outer`` restores a watch that was running.
        """
        earliest = self._earliest if self._earliest is not None else math.inf
        self._earliest = outer if outer is None else min(outer, earliest)
        return earliest

    def _hit(self, entry: tuple[float, Answer]) -> Answer:
        expires, answer = entry
        if self._earliest is not None and expires < self._earliest:
            self._earliest = expires
        self.stats.cache_hits += 1
        if not answer.records:
            self.stats.negative_hits += 1
        return answer

    async def query(self, name: str, rdtype: str) -> Answer:
        """Ask for ``rdtype`` records of ``name``, through the cache and the in-flight table."""
        now = self._clock.monotonic()
        key = _plain_key(name, rdtype)
        if key is not None:
            # A cache hit on a plain name costs no dnspython parsing (the common case).
            entry = self._cache.get(key, now)
            if entry is not None:
                return self._hit(entry)
            qname, qtype = _question(name, rdtype)
        else:
            qname, qtype = _question(name, rdtype)
            key = _full_key(qname, qtype)
            entry = self._cache.get(key, now)
            if entry is not None:
                return self._hit(entry)
        task = self._inflight.get(key)
        if task is None:
            task = running_loop().create_task(self._fetch(key, qname, qtype))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        else:
            self.stats.coalesced += 1
        # shield: cancelling one waiter must not cancel the query the others wait for.
        return await asyncio.shield(task)

    def _forget(self, key: _Key, task: asyncio.Task[Answer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, so a query whose waiters all left is not logged as lost

    async def _fetch(self, key: _Key, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Answer:
        self.stats.queries += 1
        try:
            answer = await self._ask(key, qname, qtype)
        except DnsTempError as exc:
            self.stats.temp_errors += 1
            logger.debug("dns temperror name=%s type=%s reason=%s", key[0], key[1], exc.reason)
            raise
        self._cache.put(key, answer, self._clock.monotonic())
        return answer

    async def _ask(self, key: _Key, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Answer:
        question = f"{key[0]}/{key[1]}"
        try:
            async with asyncio.timeout(self.settings.lifetime):
                result = await self._resolver.resolve(qname, qtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            response = (exc.kwargs.get("responses") or {}).get(qname)
            return Answer(records=(), ttl=self._negative_ttl(response, []), nxdomain=True)
        except (TimeoutError, dns.exception.Timeout) as exc:
            raise DnsTempError(
                f"{question}: no answer within {self.settings.lifetime:g}s", reason="timeout"
            ) from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTempError(f"{question}: {exc}", reason=_failure_reason(exc)) from exc
        except dns.resolver.YXDOMAIN as exc:
            raise DnsError(f"{question}: the name is too long after DNAME substitution") from exc
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{question}: {exc}", reason="error") from exc
        chain = result.chaining_result
        if chain.answer is None:
            return Answer(records=(), ttl=self._negative_ttl(result.response, chain.cnames))
        records = tuple(_record_text(rdata) for rdata in chain.answer)
        return Answer(records=records, ttl=min(float(chain.minimum_ttl), self.settings.max_ttl))

    def _negative_ttl(self, response: dns.message.Message | None, cnames: list[dns.rrset.RRset]) -> float:
        """RFC 2308: min(SOA TTL, SOA minimum) and the CNAME TTLs, capped by ``negative_ttl``."""
        ttl = self.settings.negative_ttl
        for rrset in cnames:
            ttl = min(ttl, rrset.ttl)
        if response is not None:
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                    ttl = min(ttl, rrset.ttl, getattr(rrset[0], "minimum", rrset.ttl))
                    break
        return float(ttl)


_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def normalize_domain(text: str) -> str | None:
    """``text`` as a DNS name in lower-case A-labels without a trailing dot, or None.

    Labels of letters, digits, "-" and "_" (not at a label's ends), at most 253 characters,
    and no all-numeric top label (that would be an address). What the checks compare domains
    by (SPF, DMARC, DKIM signing domains, report destinations).
    """
    name = text.strip().removesuffix(".")
    if not name or len(name) > 1000:
        return None
    if not name.isascii():
        name = _to_ascii(name) or ""
    name = name.lower()
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


def _to_ascii(name: str) -> str | None:
    """A-labels of a name with U-labels: IDNA2008 (UTS 46 mapping) if ``idna`` is installed."""
    try:
        import idna
    except ImportError:
        try:
            return name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None


def _make_dnspython_resolver(settings: DnsSettings) -> dns.asyncresolver.Resolver:
    if settings.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(address, port) for address, port in settings.nameserver_addresses()
        ]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(filename=settings.resolv_conf, configure=True)
        except dns.exception.DNSException as exc:
            raise DnsError(
                f"dns: no nameservers configured and none usable in {settings.resolv_conf}"
            ) from exc
        # resolv.conf entries come back as plain addresses: make them nameservers with a port too.
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(server, resolver.port) if isinstance(server, str) else server
            for server in resolver.nameservers
        ]
    resolver.cache = None  # ours is the cache
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.lifetime
    resolver.retry_servfail = False
    if settings.edns:
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
    else:
        resolver.use_edns(edns=False)
    return resolver


def _parse_ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def _question(name: str, rdtype: str) -> tuple[dns.name.Name, dns.rdatatype.RdataType]:
    try:
        qtype = dns.rdatatype.from_text(rdtype.strip().upper())
    except dns.exception.DNSException:
        raise ValueError(f"unknown DNS record type {rdtype!r}") from None
    if dns.rdatatype.is_metatype(qtype):
        raise ValueError(f"DNS record type {rdtype!r} cannot be asked for (meta type)")
    try:
        qname = dns.name.from_text(name.strip())
    except dns.exception.DNSException as exc:
        raise DnsError(f"invalid domain name {name!r}: {exc}") from exc
    return qname, qtype


def _full_key(qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> _Key:
    return (qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(qtype))


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


def _plain_key(name: str, rdtype: str) -> _Key | None:
    """The cache key of a name made of letters, digits, "-" and "_" only, without dnspython.

    Such a name is written the same way by dnspython (nothing to escape), so the key equals
    :func:`_full_key`'s; any other name returns None and takes the full path.
    """
    if _PLAIN_NAME.fullmatch(name) is None:
        return None
    return (name.rstrip(".").lower(), rdtype.upper())


def _name_text(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _record_text(rdata: dns.rdata.Rdata) -> str:
    if isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
        return b"".join(rdata.strings).decode("utf-8", "replace")
    if isinstance(rdata, dns.rdtypes.nsbase.NSBase):
        return _name_text(rdata.target)
    if isinstance(rdata, dns.rdtypes.mxbase.MXBase):
        return f"{rdata.preference} {_name_text(rdata.exchange)}"
    return rdata.to_text()


def _failure_reason(exc: dns.resolver.NoNameservers) -> str:
    """The last nameserver's trouble as one word: an rcode, ``timeout`` or ``network``."""
    errors = exc.kwargs.get("errors") or []
    if not errors:
        return "network"
    _server, _tcp, _port, error, response = errors[-1]
    if isinstance(response, dns.message.Message):
        return dns.rcode.to_text(response.rcode()).lower()
    if isinstance(error, dns.exception.Timeout):
        return "timeout"
    return "network"

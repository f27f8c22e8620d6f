"""greylist: delay mail from unknown (client network, sender, recipient) triplets.

Stage: rcpt (``smtpd_recipient_restrictions``, after ``reject_unauth_destination``).

What and why
    Most spam software sends each message once and never retries a temporary failure; real
    mail servers retry (RFC 5321 section 4.5.4.1). The first time a triplet of client network,
    envelope sender and recipient is seen, the recipient is answered ``450 4.7.1`` with a text
    saying when to retry; a retry after ``delay`` and within ``retry_window`` passes, and the
    triplet is then known for ``max_age`` since it was last seen (RFC 6647). The semantics and
    defaults are postgrey's, so a site can switch without surprises.

    The reply is ``DEFER_IF_PERMIT``: Postfix defers only if the rest of its restrictions
    would accept the recipient, so a later permanent reject still wins and only wanted mail
    waits. It applies to that one recipient; the others of the transaction are unaffected.

Triplet
    * client network: the client address masked to ``ipv4_prefix`` / ``ipv6_prefix`` bits
      (/24 and /64: big senders retry from another address of the same pool);
    * sender, normalised: lower-cased, ``+extension`` removed (``recipient_delimiter``), BATV
      tags (``prvs=...=``) removed with ``strip_batv``, runs of digits in the local part
      replaced by ``#`` with ``strip_verp`` (so VERP bounce addresses form one sender); the
      null sender ``<>`` is its own sender;
    * recipient, lower-cased.

Auto-allow
    A client network whose triplets passed greylisting ``auto_allow_clients`` times (counted at
    most once per ``auto_allow_interval``) is not greylisted any more until it has been quiet
    for ``max_age``. 0 turns this off.

Options ([checks.greylist]), besides enabled/timeout/on_error/mode:
    delay                   duration  "5m"    time a new triplet must wait before a retry passes
    retry_window            duration  "2d"    a first retry later than delay + this starts over
    max_age                 duration  "35d"   a passed triplet (and an auto-allowed client) is
                                              forgotten after this long without mail
    auto_allow_clients      int       5       passes after which the client network is allowed
    auto_allow_interval     duration  "1h"    at most one pass counted per client per interval
    ipv4_prefix             int       24      bits of an IPv4 client address in the triplet
    ipv6_prefix             int       64      bits of an IPv6 client address in the triplet
    recipient_delimiter     string    "+"     extension delimiter stripped from the sender
    strip_batv              bool      true    remove BATV prvs= tags from the sender
    strip_verp              bool      true    collapse digit runs in the sender's local part
    allow_networks          list      []      client networks never greylisted (CIDR)
    allow_client_hostnames  list      []      verified client host names never greylisted:
                                              "example.com" matches it and its subdomains,
                                              ".example.com" subdomains only, "/re/" a regex.
                                              Postfix's client_name is forward-confirmed, so a
                                              spammer cannot claim a name with PTR alone
    allow_recipients        list      ["postmaster@", "abuse@"]
                                              recipients never greylisted: "user@dom",
                                              "user@" (any domain), "@dom", "dom", "/re/"
    allow_sender_domains    list      []      sender domains never greylisted (and their
                                              subdomains). Sender domains are easily forged:
                                              prefer client host names or networks
    reply_text              string    "Greylisted, please try again in {seconds} seconds"
                                              text after ``450 4.7.1``; {seconds} is replaced
    dsn                     string    "4.7.1" enhanced status code of the deferral
    add_header              bool      true    PREPEND ``X-Greylist: delayed N seconds by mxward
                                              at HOST; DATE`` on the first delivery that passed
    spf_pool                bool      true    when SPF passed for the sender's domain, the domain
                                              stands in for the client network in the triplet:
                                              a pool of servers the domain authorises retries
                                              from any of its addresses (needs the spf check)
    skip_good_karma         bool      true    clients karma counts as good are not greylisted
                                              (needs the karma check)
    skip_dnswl              bool      true    clients listed on a DNSWL are not greylisted
                                              (needs the dnswl check; its trusted_level)
    skip_countries          list      []      ISO country codes never greylisted, e.g. ["DE"]
                                              (needs the geoip check)
    only_os                 list      []      greylist only clients whose p0f OS matches one of
                                              these ("Windows", "/^windows (xp|7)/"); a client
                                              p0f did not see is then not greylisted. [] = all
                                              (needs the p0f check)

Exemptions
    Authenticated clients (``sasl_username``) and ``[policyd.exempt] networks`` are exempted by
    the pipeline before any check runs. Facts from checks that ran earlier in the transaction
    exempt more (each only when that check is in [policyd] checks): ``karma.good``,
    ``dnswl.trusted``, ``geoip.country``, ``p0f.genre``; see the options above. The log says
    which (``allowed=karma``).

Trusted sender pool
    Large senders send from pools of addresses in many networks, so their retry often comes
    from another network and meets a new triplet. With ``spf_pool``, when the spf check found
    ``pass`` for the sender's domain, the triplet is (``spf:DOMAIN``, sender, recipient): once
    a retry passed, the domain's authorised servers pass whichever address they send from,
    and auto-allow counts per domain. A sender without SPF pass is greylisted by network.

Facts provided
    ``greylist.status``: ``new`` | ``early`` (retried before delay) | ``pass`` | ``awl`` |
    ``allowed``; ``greylist.delayed``: seconds the first passing delivery was delayed.

Redis keys (namespace ``greylist``; the client network is the hash tag, so one client's keys
share a Redis Cluster slot)
    ``mxward:greylist:{NET}:t:SENDER/RECIPIENT``  hash first, last, passes, seen, s, r.
        TTL delay + retry_window until it passes, then max_age, renewed on every pass.
    ``mxward:greylist:{NET}:c``  hash count, counted, last: the auto-allow counter.
        TTL max_age, renewed on every pass.
    All updates are one Lua script per request (atomic across workers and MX nodes). A request
    that Postfix repeats after a timeout changes nothing that matters: a new triplet stays new,
    and a pass is counted towards auto-allow at most once per interval.

Failure behaviour
    Redis unavailable or slow: verdict ERROR, and with the default ``on_error = "ignore"`` the
    recipient is not greylisted (mail flows; the log says why). ``on_error = "tempfail"``
    answers ``451 4.3.0`` instead.

RFCs: RFC 6647 (greylisting), RFC 5321 section 4.5.4.1 (retry intervals).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, ClassVar

from mxward.policyd.greylist_triplet import Triplets, normalise_sender
from mxward.shared.matchers import AddressList, DomainList, TextList
from mxward.shared.netutil import NetworkList, mask_address
from mxward.shared.plugin import Check, Result, Services, Stage, Transaction
from mxward.shared.units import Duration, format_duration

__all__ = ["GreylistCheck", "Options", "normalise_sender"]

_SCRIPT = """
-- KEYS[1] triplet hash, KEYS[2] client hash
-- ARGV: now, delay, retry_window, max_age, awl_after, awl_interval, sender, recipient
-- Counters are read once and written back with HSET (one call per hash): the script runs
-- atomically, and every redis.call costs Redis CPU on every request.
local now = tonumber(ARGV[1])
local delay = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local max_age = tonumber(ARGV[4])
local awl_after = tonumber(ARGV[5])

local count, counted = 0, 0
if awl_after > 0 then
  local c = redis.call('HMGET', KEYS[2], 'count', 'counted')
  count = tonumber(c[1]) or 0
  counted = tonumber(c[2]) or 0
  if count >= awl_after then
    redis.call('HSET', KEYS[2], 'last', now)
    redis.call('EXPIRE', KEYS[2], max_age)
    return {'awl', 0, count}
  end
end

local t = redis.call('HMGET', KEYS[1], 'first', 'passes', 'seen')
local first = tonumber(t[1])
local passes = tonumber(t[2]) or 0
if first == nil or (passes == 0 and now - first > delay + window) then
  redis.call('HSET', KEYS[1], 'first', now, 'last', now, 'passes', 0, 'seen', 1,
             's', ARGV[7], 'r', ARGV[8])
  redis.call('EXPIRE', KEYS[1], delay + window)
  return {'new', delay, 0}
end
if passes == 0 and now - first < delay then
  redis.call('HSET', KEYS[1], 'seen', (tonumber(t[3]) or 0) + 1, 'last', now)
  return {'early', delay - (now - first), 0}
end

redis.call('HSET', KEYS[1], 'last', now, 'passes', passes + 1)
redis.call('EXPIRE', KEYS[1], max_age)
if awl_after > 0 and now - counted >= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[2], 'count', count + 1, 'counted', now, 'last', now)
  redis.call('EXPIRE', KEYS[2], max_age)
end
return {'pass', now - first, passes}
"""


@dataclass(frozen=True, kw_only=True)
class Options:
    delay: Duration = 300.0
    retry_window: Duration = 2 * 86400.0
    max_age: Duration = 35 * 86400.0
    auto_allow_clients: int = 5
    auto_allow_interval: Duration = 3600.0
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    recipient_delimiter: str = "+"
    strip_batv: bool = True
    strip_verp: bool = True
    allow_networks: tuple[str, ...] = ()
    allow_client_hostnames: tuple[str, ...] = ()
    allow_recipients: tuple[str, ...] = ("postmaster@", "abuse@")
    allow_sender_domains: tuple[str, ...] = ()
    reply_text: str = "Greylisted, please try again in {seconds} seconds"
    dsn: str = "4.7.1"
    add_header: bool = True
    spf_pool: bool = True
    skip_good_karma: bool = True
    skip_dnswl: bool = True
    skip_countries: tuple[str, ...] = ()
    only_os: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.delay < 1:
            raise ValueError("delay must be at least 1s")
        if self.max_age < self.delay + self.retry_window:
            raise ValueError("max_age must be at least delay + retry_window")
        if self.auto_allow_clients < 0:
            raise ValueError("auto_allow_clients must be 0 (off) or more")
        if not 8 <= self.ipv4_prefix <= 32 or not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv4_prefix must be 8..32 and ipv6_prefix 16..128")
        if not re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", self.dsn):
            raise ValueError(f"dsn {self.dsn!r} must be an enhanced code 4.x.y")
        fields = {name for _, name, _, _ in string.Formatter().parse(self.reply_text) if name}
        if fields - {"seconds"}:
            raise ValueError(f"reply_text: unknown placeholder(s) {sorted(fields - {'seconds'})}")
        NetworkList(self.allow_networks)
        DomainList(self.allow_client_hostnames)
        AddressList(self.allow_recipients)
        DomainList(self.allow_sender_domains)
        for code in self.skip_countries:
            if not re.fullmatch(r"[A-Za-z]{2}", code):
                raise ValueError(f"skip_countries: {code!r} is not a two-letter ISO country code")
        TextList(self.only_os, "only_os")


class GreylistCheck(Check[Options]):
    name: ClassVar[str] = "greylist"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("greylist.status", "greylist.delayed")
    timeout: ClassVar[float] = 2.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        state = services.state
        self._ns = state.namespace(self.name)
        max_age = format_duration(options.max_age)
        state.declare(
            self.name,
            "{NET}:t:SENDER/RECIPIENT",
            f"{format_duration(options.delay + options.retry_window)} until passed, then {max_age}",
            "greylist triplet: first, last, passes, seen, s (sender), r (recipient)",
        )
        state.declare(self.name, "{NET}:c", max_age, "auto-allow counter: count, counted, last")
        ns = self._ns
        self._triplets = Triplets(
            options=options,
            prefix=ns.prefix,
            run=ns.run,
            script=state.script(_SCRIPT),
            now=services.clock.now,
            hostname=services.hostname,
            validate_tag=lambda tag: ns.key(tag=tag),
        )
        # Every request goes straight to the compiled work (greylist_triplet.py), without a
        # coroutine of this class around it; check() below says the same for readers and tools.
        self.check = self._triplets.check  # type: ignore[method-assign]

    def normalise(self, sender: str) -> str:
        """The sender as this check's triplets keep it (its options' normalisation)."""
        return self._triplets.normalise(sender)

    def triplet_keys(self, net: str, sender: str, recipient: str) -> tuple[str, str]:
        """The triplet's key and its client's, as ``ns.key`` builds them."""
        return self._triplets.keys(net, sender, recipient)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        return await self._triplets.check(stage, tx)


@dataclass(frozen=True)
class Entry:
    """One greylisting record, as ``mxward greylist list`` shows it."""

    network: str
    kind: str  # "triplet" or "client"
    sender: str = ""
    recipient: str = ""
    first: int = 0
    last: int = 0
    passes: int = 0
    seen: int = 0
    count: int = 0
    ttl: int = -1

    def line(self, now: float) -> str:
        def ago(ts: int) -> str:
            return f"{format_duration(max(0, int(now) - ts))} ago" if ts else "-"

        expires = format_duration(self.ttl) if self.ttl > 0 else "-"
        if self.kind == "client":
            return (
                f"client  {self.network:<20} passes counted={self.count} last={ago(self.last)}"
                f" expires in {expires}"
            )
        status = f"passed x{self.passes}" if self.passes else f"waiting (tried {self.seen}x)"
        return (
            f"triplet {self.network:<20} <{self.sender}> -> <{self.recipient}> {status}"
            f" first={ago(self.first)} last={ago(self.last)} expires in {expires}"
        )


class GreylistAdmin:
    """What ``mxward greylist`` does: list, allow and remove entries (same keys as the check)."""

    def __init__(self, options: Options, services: Services) -> None:
        self.check = GreylistCheck(options, services)
        self.options = options
        self.services = services
        self.ns = services.state.namespace(GreylistCheck.name)

    def _net(self, client: str) -> str:
        from mxward.shared.netutil import parse_ip

        ip = parse_ip(client)
        if ip is None:
            raise ValueError(f"{client!r} is not an IP address")
        return str(mask_address(ip, self.options.ipv4_prefix, self.options.ipv6_prefix))

    def _norm(self, sender: str) -> str:
        return self.check.normalise(sender)

    async def entries(self, client: str | None = None) -> Any:
        """Yield :class:`Entry` objects, for one client network or all."""
        match = f"{{{self._net(client)}}}:*" if client else "*"
        async for key in self.ns.scan(match):
            data = await self.ns.hgetall(key)
            if not data:
                continue
            net = key[key.index("{") + 1 : key.index("}")]
            ttl = await self.ns.ttl(key)
            if key.endswith("}:c"):
                yield Entry(
                    net, "client", count=int(data.get("count", 0)), last=int(data.get("last", 0)), ttl=ttl
                )
            else:
                yield Entry(
                    net,
                    "triplet",
                    sender=data.get("s", ""),
                    recipient=data.get("r", ""),
                    first=int(data.get("first", 0)),
                    last=int(data.get("last", 0)),
                    passes=int(data.get("passes", 0)),
                    seen=int(data.get("seen", 0)),
                    ttl=ttl,
                )

    async def allow(self, client: str, sender: str | None, recipient: str | None) -> str:
        """Mark a triplet as passed, or (without sender/recipient) allow the client network."""
        net = self._net(client)
        now = int(self.services.clock.now())
        ttl = int(self.options.max_age)
        if sender is None or recipient is None:
            key = self.ns.key("c", tag=net)
            count = max(self.options.auto_allow_clients, 1)
            await self.ns.hset(key, {"count": count, "counted": now, "last": now}, ttl)
            return f"client network {net} allowed for {format_duration(ttl)} without mail"
        s, r = self._norm(sender), recipient.lower()
        key, _ = self.check.triplet_keys(net, s, r)
        first = now - int(self.options.delay)
        await self.ns.hset(key, {"first": first, "last": now, "passes": 1, "seen": 1, "s": s, "r": r}, ttl)
        return f"triplet {net} <{s}> -> <{r}> allowed"

    async def remove(self, client: str, sender: str | None, recipient: str | None) -> str:
        """Remove one triplet, or every record of the client network."""
        net = self._net(client)
        if sender is not None and recipient is not None:
            key, _ = self.check.triplet_keys(net, self._norm(sender), recipient.lower())
            removed = await self.ns.delete(key)
            return f"removed {removed} triplet(s)"
        keys = [key async for key in self.ns.scan(f"{{{net}}}:*")]
        removed = await self.ns.delete(*keys) if keys else 0
        return f"removed {removed} record(s) of client network {net}"

"""dnswl: ask DNS allow lists whether the client's IP address is a known good sender.

Stage: connect (with Postfix's default ``smtpd_delay_reject = yes`` it runs at the first RCPT,
once per message).

What and why
    Allow lists such as list.dnswl.org publish the addresses of known legitimate mail servers,
    with a trust level, in the same DNS format as block lists (RFC 5782): the reversed client
    address is asked under the zone, and an A record in 127.0.0.0/8 means "listed".
    list.dnswl.org answers ``127.0.<category>.<trust>``, trust 0 (none), 1 (low), 2 (medium)
    or 3 (high). A listing adds the entry's negative ``score`` (a good sign), and the facts
    let later checks trust the client: dnsbl can skip its lookups (``skip_if_dnswl``) and
    greylisting can let the client through (fact ``dnswl.trusted``).

    Every zone is asked at the same time, each within ``zone_timeout``. One zone may appear
    in several entries with different ``codes`` (one entry per trust level, each with its own
    score); it is asked once.

Options ([checks.dnswl]), besides enabled/timeout (default "5s")/on_error/mode:
    zones            list of tables  []     the lists to ask, see "Zone tables"; none: skip
    trusted_level    int             2      fact ``dnswl.trusted`` is true when the highest
                                            level found is at least this (2 = medium)
    zone_timeout     duration        "3s"   budget for one zone
    health_check     bool            true   probe the RFC 5782 test entries of every zone at
                                            start and every ``health_interval``
    health_interval  duration        "10m"  time between health probes

Zone tables ([[checks.dnswl.zones]])
    zone         string  (required)        the DNS zone, e.g. "list.dnswl.org"
    name         string  ""                name in logs and facts (default: the zone)
    codes        list    []                answers that count, e.g. ["127.0.*.3"]; empty:
                                           any answer in 127.0.0.0/8 that is not an error
    error_codes  list    ["127.0.0.255", "127.255.255.*"]
                                           answers that mean "query refused / over limit"
                                           (list.dnswl.org answers 127.0.0.255): an error,
                                           never a listing
    score        float   -5.0              added when listed (negative: a good sign)
    level        int     -1                the trust level this entry stands for; -1 takes
                                           it from the last octet of the answer (the
                                           list.dnswl.org encoding)
    ipv6         bool    true              ask this zone for IPv6 clients too

    Answer codes are written as for dnsbl: ``127.0.0.2`` exact; per octet ``*``,
    ``[2..11]`` or ``[2;4]``; ``&N`` a bitmask. For list.dnswl.org, one entry per level:
    ``codes = ["127.0.*.3"]``, ``score = -5`` (high); ``["127.0.*.2"]``, ``-3``; and so on.

Zone health (RFC 5782 section 5)
    As for dnsbl: a zone that lists 127.0.0.1 (``::1``) lists everyone and is ignored, with a
    warning, until a later probe finds it sane; a missing 127.0.0.2 test entry only warns.

Facts provided
    ``dnswl.listed``: names of the listing entries, comma-separated ("" when none);
    ``dnswl.level``: the highest trust level found (-1 when not listed);
    ``dnswl.trusted``: true when that level is at least ``trusted_level``.

Log values
    ``listed=zone:code,...``, ``level=N``, ``errors=zone:why,...``, ``ignored=zone,...``.

Redis keys
    none.

Failure behaviour
    A zone that does not answer (SERVFAIL, timeout, refusal code, bad answer) counts as "not
    listed" and is logged; with no listing and a failed zone the verdict is ERROR with score 0
    (the client is only not trusted; with the default ``on_error = "ignore"`` nothing else
    happens).

RFCs: RFC 5782 (DNS blacklists and whitelists).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

from mxward.policyd.checks._dnslists import (
    Entry,
    IpListZone,
    ListAnswer,
    ListCheck,
    Outcome,
    ask_all,
    check_timing,
    ip_zone_probes,
    outcome_result,
    present,
)
from mxward.shared.dns import Resolver
from mxward.shared.plugin import Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

__all__ = ["DnswlCheck", "Options", "Zone"]


@dataclass(frozen=True, kw_only=True)
class Zone(IpListZone):
    """One ``[[checks.dnswl.zones]]`` table."""

    error_codes: tuple[str, ...] = ("127.0.0.255", "127.255.255.*")
    score: float = -5.0
    level: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1 <= self.level <= 255:
            raise ValueError(f"zone {self.zone}: level must be -1 (from the answer) or 0..255")


@dataclass(frozen=True, kw_only=True)
class Options:
    zones: tuple[Zone, ...] = ()
    trusted_level: int = 2
    zone_timeout: Duration = 3.0
    health_check: bool = True
    health_interval: Duration = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.trusted_level <= 255:
            raise ValueError("trusted_level must be 0..255")
        check_timing(self.zone_timeout, self.health_interval)


def _level(entry: Entry[Zone], outcome: Outcome) -> int:
    if entry.options.level >= 0:
        return entry.options.level
    return max(ipaddress.IPv4Address(code).packed[3] for code in outcome.codes)


class DnswlCheck(ListCheck[Options]):
    name: ClassVar[str] = "dnswl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("dnswl.listed", "dnswl.level", "dnswl.trusted")
    timeout: ClassVar[float] = 5.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._entries = tuple(Entry.compile(zone) for zone in options.zones)
        self.watch(ip_zone_probes(self._entries))

    def _facts(self, listed: str = "", level: int = -1) -> dict[str, str | int | bool]:
        return {
            "dnswl.listed": listed,
            "dnswl.level": level,
            "dnswl.trusted": level >= self.options.trusted_level,
        }

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        return (tx.client_address, self.health.changes)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        ip = tx.client_ip
        if ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        if not self._entries:
            return self.result(Verdict.SKIP, facts=self._facts(), note="no zones")
        family = "ipv4" if ip.version == 4 else "ipv6"
        applicable = [e for e in self._entries if family == "ipv4" or e.options.ipv6]
        active = [e for e in applicable if self.health.usable(e.zone, family)]
        ignored = ",".join(dict.fromkeys(e.zone for e in applicable if e not in active))
        if not active:
            note = "no zone for IPv6" if not applicable else "every zone ignored"
            log = present(note=note, ignored=ignored)
            return outcome_result(self.name, Verdict.SKIP, log, facts=self._facts())
        names = {e.zone: Resolver.reverse_name(ip, e.zone) for e in active}
        answers = await ask_all(
            self.services.dns, dict.fromkeys(names.values(), False), budget=self.options.zone_timeout
        )
        return self._verdict(active, {zone: answers[name] for zone, name in names.items()}, ignored)

    def _verdict(self, entries: list[Entry[Zone]], answers: dict[str, ListAnswer], ignored: str) -> Result:
        """The result from the answers of each zone (``answers`` is keyed by zone)."""
        hits: list[tuple[Entry[Zone], Outcome]] = []
        errors: dict[str, str] = {}
        for entry in entries:
            outcome = entry.judge(answers[entry.zone])
            if outcome.status == "error":
                errors.setdefault(entry.zone, outcome.error)
            elif outcome.status == "listed":
                hits.append((entry, outcome))
        level = max((_level(entry, outcome) for entry, outcome in hits), default=-1)
        listed = ",".join(dict.fromkeys(entry.label for entry, _ in hits))
        log = present(
            listed=",".join(f"{entry.label}:{'+'.join(outcome.codes)}" for entry, outcome in hits),
            errors=",".join(f"{zone}:{why}" for zone, why in errors.items()),
            ignored=ignored,
        )
        facts = self._facts(listed, level)
        if not hits:
            if errors:
                return outcome_result(self.name, Verdict.ERROR, log, facts=facts)
            return outcome_result(self.name, Verdict.SKIP, {"note": "not listed", **log}, facts=facts)
        score = sum(entry.options.score for entry, _ in hits)
        return outcome_result(self.name, Verdict.PASS, {**log, "level": level}, score=score, facts=facts)

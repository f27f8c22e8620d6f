"""What the DNS list checks (dnsbl, dnswl, rhsbl) share: answer codes, lookups, zone health.

Not a check itself (it has no ``name``); the manuals of the checks describe the behaviour.

Answer codes
    A DNS list answers a listed name with A records in 127.0.0.0/8 (RFC 5782 section 2.1).
    Which answers count is written as patterns:

    * ``127.0.0.2``: that address;
    * ``127.0.0.[2..11]``, ``127.0.0.[2;4;10..11]``: per octet a number, a ``[...]`` list of
      numbers and ``n..m`` ranges (Postfix's ``postscreen_dnsbl_sites`` syntax), or ``*``
      for any value (``127.0.*.3``);
    * ``&4``, ``&0x0c``: a bitmask, true when the answer (as a 32-bit number) shares a bit
      with it (SURBL-style lists that encode several lists in one answer).

    An answer outside 127.0.0.0/8 is never a listing: it comes from a resolver that rewrites
    "no such name" answers, or from a list that was given up and now answers everything;
    it is an error for that lookup. So is an answer that matches the zone's error codes
    (Spamhaus answers 127.255.255.252..255 when it refuses a query).

Zone health (RFC 5782 section 5)
    Every IP list must list 127.0.0.2 (and ``::FFFF:7F00:2`` if it lists IPv6) and must not
    list 127.0.0.1 (``::1``); a domain list must list ``test`` and must not list
    ``invalid``. A :class:`ZoneHealth` asks for these entries at start and every interval
    in the background (requests never wait for it). A zone that lists the entry it must not
    list answers "listed" for everything: its answers are ignored, with a warning, until a
    later probe finds it sane again. A zone that does not list its test entry only gets a
    warning (it may be gone, or not publish the entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import string
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar

from mxward.shared.aio import running_loop
from mxward.shared.dns import Answer, DnsError, DnsTempError, Resolver
from mxward.shared.plugin import Action, Check, LogValue, Result, Verdict

__all__ = [
    "LISTING_NETWORK",
    "CodeSet",
    "Entry",
    "IpListZone",
    "ListAnswer",
    "ListCheck",
    "ListZone",
    "Outcome",
    "Probe",
    "ZoneHealth",
    "ask",
    "ask_all",
    "check_codes",
    "check_template",
    "check_timing",
    "classify",
    "domain_probe",
    "error_codes_by_zone",
    "forced_action",
    "ip_probes",
    "ip_zone_probes",
    "normalise_zone",
    "outcome_result",
    "present",
    "render",
    "valid_domain",
]

LISTING_NETWORK: Final = ipaddress.IPv4Network("127.0.0.0/8")

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_OCTET_RANGE = re.compile(r"(\d{1,3})(?:\.\.(\d{1,3}))?")
_OCTET = r"(\[[^\]]*\]|[^.\[\]]+)"
_OCTETS = re.compile(r"\.".join([_OCTET] * 4))


# ------------------------------------------------------------------------------------------
# names


def valid_domain(name: str) -> bool:
    """True for a DNS name made of letters, digits, ``-`` and ``_`` (no address literals)."""
    if not name or len(name) > 253 or name.startswith(".") or name.endswith("."):
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def normalise_zone(zone: str) -> str:
    """The zone in lower case without surrounding dots; ValueError when it is not a DNS name."""
    text = zone.strip().strip(".").lower()
    if not text:
        raise ValueError("zone: a zone name is required")
    if not valid_domain(text) or "." not in text:
        raise ValueError(f"zone {zone!r} is not a DNS zone name such as bl.example.org")
    return text


# ------------------------------------------------------------------------------------------
# answer codes


def _octet_values(part: str, pattern: str) -> frozenset[int]:
    if part == "*":
        return frozenset(range(256))
    inner = part[1:-1] if part.startswith("[") and part.endswith("]") else part
    values: set[int] = set()
    for item in inner.split(";") if part.startswith("[") else [inner]:
        match = _OCTET_RANGE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"answer code {pattern!r}: {part!r} is not a number, [list], n..m or *")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if not low <= high <= 255:
            raise ValueError(
                f"answer code {pattern!r}: {item!r} is not a number or a range n..m within 0..255"
            )
        values.update(range(low, high + 1))
    return frozenset(values)


class _Octets:
    """``127.0.[0..3].*``: one set of allowed values per octet."""

    __slots__ = ("octets",)

    def __init__(self, pattern: str) -> None:
        match = _OCTETS.fullmatch(pattern)
        if match is None:
            raise ValueError(f"answer code {pattern!r}: expected four octets such as 127.0.0.[2..11]")
        self.octets = tuple(_octet_values(part, pattern) for part in match.groups())

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        return all(octet in allowed for octet, allowed in zip(address.packed, self.octets, strict=True))


class _Mask:
    """``&0x0c``: any bit in common."""

    __slots__ = ("mask",)

    def __init__(self, pattern: str) -> None:
        try:
            self.mask = int(pattern[1:].strip(), 0)
        except ValueError:
            raise ValueError(f"answer code {pattern!r}: a bitmask is written &4 or &0x0c") from None
        if not 0 < self.mask <= 0xFFFFFFFF:
            raise ValueError(f"answer code {pattern!r}: the bitmask must be 1..0xffffffff")

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        return bool(int(address) & self.mask)


class CodeSet:
    """Answer-code patterns (see the module docstring); an empty set matches every answer."""

    __slots__ = ("_patterns", "entries")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.entries = tuple(p.strip() for p in patterns)
        self._patterns = tuple(_Mask(p) if p.startswith("&") else _Octets(p) for p in self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        """True when ``address`` matches a pattern (always, for an empty set)."""
        return not self._patterns or any(p.matches(address) for p in self._patterns)

    def matches_any(self, address: ipaddress.IPv4Address) -> bool:
        """True when ``address`` matches a pattern (never, for an empty set)."""
        return any(p.matches(address) for p in self._patterns)


# ------------------------------------------------------------------------------------------
# zone entries


@dataclass(frozen=True, kw_only=True)
class ListZone:
    """The keys every zone table of a DNS list check has; each check adds its own."""

    zone: str = ""
    name: str = ""
    codes: tuple[str, ...] = ()
    error_codes: tuple[str, ...] = ("127.255.255.*",)
    score: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", normalise_zone(self.zone))
        CodeSet(self.codes)
        CodeSet(self.error_codes)
        if not math.isfinite(self.score):
            raise ValueError(f"zone {self.zone}: score must be a finite number")

    @property
    def label(self) -> str:
        """How logs and facts name this entry: ``name``, else the zone."""
        return self.name or self.zone


@dataclass(frozen=True, kw_only=True)
class IpListZone(ListZone):
    """A zone table of a list of client addresses (dnsbl, dnswl)."""

    ipv6: bool = True


ZoneT = TypeVar("ZoneT", bound=ListZone)
IpZoneT = TypeVar("IpZoneT", bound=IpListZone)


@dataclass(frozen=True, slots=True)
class Entry(Generic[ZoneT]):
    """A zone table with its code patterns compiled."""

    options: ZoneT
    codes: CodeSet
    error_codes: CodeSet

    @classmethod
    def compile(cls, options: ZoneT) -> Entry[ZoneT]:
        return cls(options, CodeSet(options.codes), CodeSet(options.error_codes))

    @property
    def zone(self) -> str:
        return self.options.zone

    @property
    def label(self) -> str:
        return self.options.label

    def judge(self, answer: ListAnswer) -> Outcome:
        return classify(answer, self.codes, self.error_codes)


def error_codes_by_zone(entries: Iterable[Entry[ZoneT]]) -> dict[str, CodeSet]:
    """Each zone (in order) with the error codes of all its entries, for its health probes."""
    codes: dict[str, list[str]] = {}
    for entry in entries:
        codes.setdefault(entry.zone, []).extend(entry.options.error_codes)
    return {zone: CodeSet(patterns) for zone, patterns in codes.items()}


def check_timing(zone_timeout: float, health_interval: float) -> None:
    """ValueError for a zone timeout that is not positive or a health interval under 10s."""
    if not (math.isfinite(zone_timeout) and zone_timeout > 0):
        raise ValueError("zone_timeout must be above 0")
    if health_interval < 10:
        raise ValueError("health_interval must be at least 10s")


# ------------------------------------------------------------------------------------------
# lookups


@dataclass(frozen=True, slots=True)
class ListAnswer:
    """What a list said about one name: its A records and TXT texts, or why it said nothing."""

    records: tuple[str, ...] = ()
    txt: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """One answer judged by one zone entry's codes."""

    status: Literal["listed", "clear", "error"]
    codes: tuple[str, ...] = ()
    error: str = ""


async def ask(resolver: Resolver, name: str, *, budget: float, want_txt: bool) -> ListAnswer:
    """The A records of ``name`` and, when there are any and ``want_txt``, its TXT texts.

    Both questions share ``budget`` seconds. A temporary DNS failure or running out of time is an
    error; a TXT question that fails leaves the listing without its text.
    """
    # Answers already cached need no timer (a timer per question costs more than the answer).
    # The TXT question is only asked for a listed name, so only then is its cache looked at.
    loop = running_loop()
    start = loop.time()
    deadline = None if resolver.is_cached(name, "A") else start + budget
    try:
        records = (await _within(deadline, resolver.query(name, "A"))).records
    except TimeoutError:
        return ListAnswer(error="timeout")
    except DnsTempError as exc:
        return ListAnswer(error=exc.reason)
    except DnsError:
        return ListAnswer(error="invalid-name")
    if not (records and want_txt):
        return ListAnswer(records=records)
    if resolver.is_cached(name, "TXT"):
        deadline = None
    elif deadline is None:
        deadline = start + budget
    try:
        texts = (await _within(deadline, resolver.query(name, "TXT"))).records
    except (TimeoutError, DnsError):
        texts = ()
    return ListAnswer(records=records, txt=tuple(sorted({t.strip() for t in texts if t.strip()})))


async def _within(deadline: float | None, question: Awaitable[Answer]) -> Answer:
    """``question``, cut off at ``deadline`` (a loop time); None: no limit needed."""
    if deadline is None:
        return await question
    async with asyncio.timeout_at(deadline):
        return await question


async def ask_all(resolver: Resolver, names: Mapping[str, bool], *, budget: float) -> dict[str, ListAnswer]:
    """Ask every name at the same time; ``names`` maps each name to whether its TXT is wanted.

    When every answer is cached they are simply read, one after the other (no tasks).
    """
    if all(resolver.is_cached(name, "A") for name in names):
        return {name: await ask(resolver, name, budget=budget, want_txt=txt) for name, txt in names.items()}
    answers = await asyncio.gather(
        *(ask(resolver, name, budget=budget, want_txt=txt) for name, txt in names.items())
    )
    return dict(zip(names, answers, strict=True))


def classify(answer: ListAnswer, codes: CodeSet, error_codes: CodeSet) -> Outcome:
    """Judge ``answer`` for one zone entry: listed with the matching codes, clear, or an error."""
    if answer.error:
        return Outcome("error", error=answer.error)
    listing: list[ipaddress.IPv4Address] = []
    for record in sorted(answer.records):
        try:
            address = ipaddress.IPv4Address(record)
        except ValueError:
            return Outcome("error", error=f"bad-answer:{record}")
        if address not in LISTING_NETWORK:
            return Outcome("error", error=f"bad-answer:{record}")
        if error_codes.matches_any(address):
            return Outcome("error", error=f"refused:{record}")
        if codes.matches(address):
            listing.append(address)
    if not listing:
        return Outcome("clear")
    # DNS gives records in no particular order: sorted, logs and replies do not vary.
    return Outcome("listed", codes=tuple(str(address) for address in sorted(listing)))


# ------------------------------------------------------------------------------------------
# replies


def _check_code(code: int, dsn: str, first: int, what: str) -> None:
    if not first * 100 <= code <= first * 100 + 99:
        raise ValueError(f"{what}_code must be {first}xx, got {code}")
    if not re.fullmatch(rf"{first}\.\d{{1,3}}\.\d{{1,3}}", dsn):
        raise ValueError(f"{what}_dsn {dsn!r} must be an enhanced status code {first}.x.y")


def check_codes(reject_code: int, reject_dsn: str, defer_code: int, defer_dsn: str) -> None:
    """ValueError unless the reject code is 5xx and the defer code 4xx, each with its 5.x.y / 4.x.y."""
    _check_code(reject_code, reject_dsn, 5, "reject")
    _check_code(defer_code, defer_dsn, 4, "defer")


def forced_action(
    hits: Iterable[tuple[str, str]], *, reject: tuple[int, str], defer: tuple[int, str]
) -> Action | None:
    """The reply forced by listings: ``hits`` are (action word, reply text) pairs.

    A "reject" entry wins over a "defer" one; only the texts of the winning kind are used.
    "score" entries force nothing. ``reject`` and ``defer`` are (code, enhanced code).
    """
    texts: dict[str, list[str]] = {"reject": [], "defer": []}
    for action, text in hits:
        if action in texts:
            texts[action].append(text)
    if texts["reject"]:
        return Action.reject("; ".join(dict.fromkeys(texts["reject"])), *reject)
    if texts["defer"]:
        return Action.defer("; ".join(dict.fromkeys(texts["defer"])), *defer)
    return None


def check_template(template: str, fields: Iterable[str], option: str = "reply") -> None:
    """ValueError when ``template`` uses a placeholder other than ``fields`` or is malformed."""
    allowed = set(fields)
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{option} {template!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    unknown = used - allowed
    if unknown:
        valid = ", ".join(f"{{{name}}}" for name in sorted(allowed))
        raise ValueError(f"{option}: unknown placeholder(s) {sorted(unknown)} (valid: {valid})")


def present(**values: str) -> dict[str, LogValue]:
    """The log values that are not empty (an empty list is not worth a key=value)."""
    return {key: value for key, value in values.items() if value}


def outcome_result(
    check: str,
    verdict: Verdict,
    log: Mapping[str, LogValue],
    *,
    score: float = 0.0,
    reason: str = "",
    facts: Mapping[str, LogValue] | None = None,
    action: Action | None = None,
) -> Result:
    """A check's Result with log values gathered beforehand (``Check.result`` takes them as keywords)."""
    return Result(
        check=check, verdict=verdict, score=score, reason=reason, log=log, facts=facts or {}, action=action
    )


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with its placeholders filled in (checked before by :func:`check_template`)."""
    return template.format_map(values)


# ------------------------------------------------------------------------------------------
# zone health (RFC 5782 section 5)

Family = Literal["ipv4", "ipv6", "domain"]
Health = Literal["unknown", "ok", "broken", "no-test-entry", "erring"]

_ANY: Final = CodeSet(())
_IPV4_LISTED: Final = ipaddress.IPv4Address("127.0.0.2")
_IPV4_UNLISTED: Final = ipaddress.IPv4Address("127.0.0.1")
_IPV6_LISTED: Final = ipaddress.IPv6Address("::ffff:7f00:2")
_IPV6_UNLISTED: Final = ipaddress.IPv6Address("::1")


@dataclass(frozen=True, slots=True)
class Probe:
    """The RFC 5782 test names of one zone and address family."""

    zone: str
    family: Family
    listed: str
    unlisted: str
    error_codes: CodeSet


def ip_probes(zone: str, error_codes: CodeSet, *, ipv6: bool) -> list[Probe]:
    """The IPv4 (and IPv6) test names of an IP list."""
    probes = [
        Probe(
            zone,
            "ipv4",
            Resolver.reverse_name(_IPV4_LISTED, zone),
            Resolver.reverse_name(_IPV4_UNLISTED, zone),
            error_codes,
        )
    ]
    if ipv6:
        probes.append(
            Probe(
                zone,
                "ipv6",
                Resolver.reverse_name(_IPV6_LISTED, zone),
                Resolver.reverse_name(_IPV6_UNLISTED, zone),
                error_codes,
            )
        )
    return probes


def domain_probe(zone: str, error_codes: CodeSet) -> Probe:
    """The test names of a domain list: ``test`` is listed, ``invalid`` is not."""
    return Probe(zone, "domain", f"test.{zone}", f"invalid.{zone}", error_codes)


def _judge(probe: Probe, listed: ListAnswer, unlisted: ListAnswer) -> tuple[Health, str]:
    """The health of one zone and family from the answers for its two test names."""
    if listed.error or unlisted.error:
        return "unknown", listed.error or unlisted.error
    wrong = classify(unlisted, _ANY, probe.error_codes)
    right = classify(listed, _ANY, probe.error_codes)
    if wrong.status == "listed":
        what = probe.unlisted.removesuffix(f".{probe.zone}")
        return "broken", f"lists the test entry {what} that must never be listed ({','.join(wrong.codes)})"
    errors = [o.error for o in (right, wrong) if o.status == "error"]
    if errors:
        return "erring", f"answers its test entries with errors ({', '.join(errors)})"
    if right.status != "listed":
        what = probe.listed.removesuffix(f".{probe.zone}")
        return "no-test-entry", f"does not list the test entry {what}"
    return "ok", ""


class ZoneHealth:
    """Probes the RFC 5782 test entries of some zones in the background and remembers the result.

    :meth:`usable` is what a request asks: False only for a zone found broken (listing what it
    must never list). Probing never delays a request; until the first probe answers, a zone
    counts as usable.
    """

    def __init__(
        self,
        check: str,
        resolver: Resolver,
        probes: Sequence[Probe],
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self.check = check
        self.probes = tuple(probes)
        self.interval = interval
        self.timeout = timeout
        self._resolver = resolver
        self._state: dict[tuple[str, str], Health] = {}
        # Counts changes of state: part of the checks' reuse keys, so that a result computed
        # while a zone was usable is not reused once it is found broken (or the other way).
        self.changes = 0
        self._task: asyncio.Task[None] | None = None
        self._log = logging.getLogger(f"mxward.checks.{check}")

    def usable(self, zone: str, family: str) -> bool:
        return self._state.get((zone, family)) != "broken"

    def state(self, zone: str, family: str) -> Health:
        return self._state.get((zone, family), "unknown")

    async def probe_all(self) -> None:
        """Ask every zone's test entries once and update the states (logging every change)."""
        await asyncio.gather(*(self._probe(probe) for probe in self.probes))

    async def _probe(self, probe: Probe) -> None:
        listed, unlisted = await asyncio.gather(
            ask(self._resolver, probe.listed, budget=self.timeout, want_txt=False),
            ask(self._resolver, probe.unlisted, budget=self.timeout, want_txt=False),
        )
        health, detail = _judge(probe, listed, unlisted)
        key = (probe.zone, probe.family)
        before = self._state.get(key, "unknown")
        if health == "unknown":
            self._log.debug("check=%s zone=%s family=%s health probe failed: %s", self.check, *key, detail)
            return
        self._state[key] = health
        if health == before:
            return
        self.changes += 1
        if health == "broken":
            self._log.warning(
                "check=%s zone=%s family=%s health=broken: the zone %s; its answers are ignored"
                " until it is sane again",
                self.check,
                *key,
                detail,
            )
        elif health == "ok":
            if before != "unknown":
                self._log.warning("check=%s zone=%s family=%s health=ok again", self.check, *key)
        else:
            self._log.warning(
                "check=%s zone=%s family=%s health=%s: the zone %s", self.check, *key, health, detail
            )

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:
                self._log.exception("check=%s zone health probe failed", self.check)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Probe now and then every ``interval``, in a background task."""
        if self._task is None and self.probes:
            self._task = running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop probing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def ip_zone_probes(entries: Sequence[Entry[IpZoneT]]) -> list[Probe]:
    """Health probes of the zones of client-address lists (IPv6 too where an entry asks it)."""
    return [
        probe
        for zone, error_codes in error_codes_by_zone(entries).items()
        for probe in ip_probes(zone, error_codes, ipv6=any(e.options.ipv6 for e in entries if e.zone == zone))
    ]


class _HealthOptions(Protocol):
    @property
    def health_check(self) -> bool: ...
    @property
    def health_interval(self) -> float: ...
    @property
    def zone_timeout(self) -> float: ...


OptionsT = TypeVar("OptionsT", bound=_HealthOptions)


class ListCheck(Check[OptionsT]):
    """What dnsbl, dnswl and rhsbl share: their zones' health, probed in the background from
    :meth:`start` until :meth:`aclose`."""

    health: ZoneHealth

    def watch(self, probes: Sequence[Probe]) -> None:
        opts = self.options
        self.health = ZoneHealth(
            self.name,
            self.services.dns,
            probes if opts.health_check else (),
            interval=opts.health_interval,
            timeout=opts.zone_timeout,
        )

    async def start(self) -> None:
        self.health.start()

    async def aclose(self) -> None:
        await self.health.aclose()

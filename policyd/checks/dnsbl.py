"""dnsbl: ask DNS block lists whether the client's IP address is listed.

Stage: connect (with Postfix's default ``smtpd_delay_reject = yes`` it runs at the first RCPT,
once per message; the result is reused for every recipient).

What and why
    Block lists such as Spamhaus ZEN publish the addresses of spam sources, botnets and
    dynamic ranges as DNS zones: the client address, reversed, is asked under the zone
    (``2.0.0.127.zen.example`` for 127.0.0.2; IPv6 as 32 reversed nibbles), and an A record
    in 127.0.0.0/8 means "listed", the value saying why (RFC 5782). Every configured zone is
    asked at the same time, each within ``zone_timeout``; for a listed address the zone's TXT
    record (the list's own explanation, usually with a lookup URL) goes into the reply.

    Each zone entry either only adds its ``score`` to the transaction (the default: the
    pipeline rejects at ``[policyd] reject_stage`` once the total reaches
    ``[policyd.scoring] reject``, with every reason in one reply, and karma books the score)
    or answers at once (``action = "reject"`` or ``"defer"``). One zone may appear in several
    entries with different ``codes``, like Postfix's ``postscreen_dnsbl_sites``: ZEN's
    127.0.0.2 (SBL) can reject while 127.0.0.10 (PBL) only scores; the zone is asked once.

Options ([checks.dnsbl]), besides enabled/timeout (default "5s")/on_error/mode:
    zones            list of tables  []     the lists to ask, see "Zone tables"; none: skip
    allow_networks   list            []     client networks never looked up (CIDR)
    skip_if_dnswl    bool            false  ask nothing for a client that dnswl found trusted
                                            (fact ``dnswl.trusted``); dnswl must then be
                                            listed before dnsbl in ``[policyd] checks``
    zone_timeout     duration        "3s"   budget for one zone (A, then TXT when listed)
    health_check     bool            true   probe the RFC 5782 test entries of every zone at
                                            start and every ``health_interval``
    health_interval  duration        "10m"  time between health probes
    reject_code      int             554    SMTP code of ``action = "reject"``
    reject_dsn       string          "5.7.1"
    defer_code       int             450    SMTP code of ``action = "defer"``
    defer_dsn        string          "4.7.1"

Zone tables ([[checks.dnsbl.zones]])
    zone         string  (required)        the DNS zone, e.g. "zen.spamhaus.org"
    name         string  ""                name in logs and facts (default: the zone)
    codes        list    []                answers that count, e.g. ["127.0.0.2",
                                           "127.0.0.[4..7]", "&0x04"]; empty: any answer in
                                           127.0.0.0/8 that is not an error code
    error_codes  list    ["127.255.255.*"] answers that mean "query refused / over limit"
                                           (Spamhaus): an error, never a listing
    score        float   10.0              added to the transaction when listed
    action       string  "score"           "score": only the score; "reject": answer
                                           reject_code at once; "defer": defer_code at once
    reply        string  ""                reply text; {ip} {zone} {name} {code} {txt} are
                                           replaced. Empty: "Client host [{ip}] blocked
                                           using {zone}; {txt}" (without "; {txt}" when the
                                           zone has no TXT record)
    txt          bool    true              ask for the TXT record of a listed address
    ipv6         bool    true              ask this zone for IPv6 clients too

    Answer codes: ``127.0.0.2`` exact; per octet ``*``, ``[2..11]`` or ``[2;4;10..11]``;
    ``&N`` a bitmask (true when the answer shares a bit with N). Answers outside
    127.0.0.0/8 (a resolver that rewrites NXDOMAIN, a list that was given up and now
    lists everything) and error codes are errors for that zone, never listings.

Zone health (RFC 5782 section 5)
    A list must list 127.0.0.2 and ``::FFFF:7F00:2`` and must not list 127.0.0.1 and ``::1``.
    With ``health_check`` these names are asked at start and every ``health_interval`` in the
    background (requests never wait). A zone (address family) that lists 127.0.0.1 or ``::1``
    would list every client: it is ignored, with a warning in the log, until a probe finds it
    sane again. A zone without the test entry, or answering it with an error code, only
    gets a warning.

Facts provided
    ``dnsbl.listed``: the names of the zone entries that list the client, comma-separated
    ("" when none).

Log values
    ``listed=zone:code,...`` the listing entries and their answers; ``errors=zone:why,...``
    zones that could not answer (``servfail``, ``timeout``, ``refused:127.255.255.254``,
    ``bad-answer:198.51.100.7``); ``ignored=zone,...`` zones left out as broken; ``allowed``,
    ``skipped`` and ``note`` say why nothing was asked.

Redis keys
    none.

Failure behaviour
    A zone that does not answer (SERVFAIL, timeout, refused, bad answer) is left out and
    logged; the others still count. No listing and at least one failed zone gives verdict
    ERROR with score 0: with the default ``on_error = "ignore"`` the mail is not held up by
    our resolver's trouble.

RFCs: RFC 5782 (DNS blacklists and whitelists: query format, IPv6 nibbles, test entries).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.policyd.checks._dnslists import (
    Entry,
    IpListZone,
    ListAnswer,
    ListCheck,
    Outcome,
    ask_all,
    check_codes,
    check_template,
    check_timing,
    forced_action,
    ip_zone_probes,
    outcome_result,
    present,
    render,
)
from mxward.shared.dns import Resolver
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import Action, IPAddress, Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

__all__ = ["DnsblCheck", "Options", "Zone"]

REPLY_FIELDS = ("ip", "zone", "name", "code", "txt")
DEFAULT_REPLY = "Client host [{ip}] blocked using {zone}"
DEFAULT_REPLY_TXT = "Client host [{ip}] blocked using {zone}; {txt}"


@dataclass(frozen=True, kw_only=True)
class Zone(IpListZone):
    """One ``[[checks.dnsbl.zones]]`` table."""

    action: Literal["score", "reject", "defer"] = "score"
    reply: str = ""
    txt: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_template(self.reply, REPLY_FIELDS)


@dataclass(frozen=True, kw_only=True)
class Options:
    zones: tuple[Zone, ...] = ()
    allow_networks: tuple[str, ...] = ()
    skip_if_dnswl: bool = False
    zone_timeout: Duration = 3.0
    health_check: bool = True
    health_interval: Duration = 600.0
    reject_code: int = 554
    reject_dsn: str = "5.7.1"
    defer_code: int = 450
    defer_dsn: str = "4.7.1"

    def __post_init__(self) -> None:
        NetworkList(self.allow_networks)
        check_timing(self.zone_timeout, self.health_interval)
        check_codes(self.reject_code, self.reject_dsn, self.defer_code, self.defer_dsn)


@dataclass(frozen=True, slots=True)
class _Hit:
    entry: Entry[Zone]
    outcome: Outcome
    text: str


class DnsblCheck(ListCheck[Options]):
    name: ClassVar[str] = "dnsbl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("dnsbl.listed",)
    timeout: ClassVar[float] = 5.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._entries = tuple(Entry.compile(zone) for zone in options.zones)
        self._allow = NetworkList(options.allow_networks)
        if options.skip_if_dnswl:
            # Only a configuration that asks for the skip makes dnsbl wait for dnswl (and
            # start-up fails if dnswl is not listed before it).
            self.needs = ("dnswl.trusted",)
        self.watch(ip_zone_probes(self._entries))

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        trusted = bool(tx.facts.get("dnswl.trusted")) if self.options.skip_if_dnswl else False
        return (tx.client_address, trusted, self.health.changes)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        ip = tx.client_ip
        if ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        if not self._entries:
            return self.result(Verdict.SKIP, note="no zones")
        if ip in self._allow:
            return self.result(Verdict.SKIP, facts={"dnsbl.listed": ""}, allowed="network")
        if self.options.skip_if_dnswl and tx.facts.get("dnswl.trusted"):
            return self.result(Verdict.SKIP, facts={"dnsbl.listed": ""}, skipped="dnswl")
        family = "ipv4" if ip.version == 4 else "ipv6"
        applicable = [e for e in self._entries if family == "ipv4" or e.options.ipv6]
        active = [e for e in applicable if self.health.usable(e.zone, family)]
        ignored = ",".join(dict.fromkeys(e.zone for e in applicable if e not in active))
        if not active:
            note = "no zone for IPv6" if not applicable else "every zone ignored"
            log = present(note=note, ignored=ignored)
            return outcome_result(self.name, Verdict.SKIP, log, facts={"dnsbl.listed": ""})
        names = {e.zone: Resolver.reverse_name(ip, e.zone) for e in active}
        questions = {
            name: any(e.options.txt for e in active if e.zone == zone) for zone, name in names.items()
        }
        answers = await ask_all(self.services.dns, questions, budget=self.options.zone_timeout)
        return self._verdict(ip, active, {zone: answers[name] for zone, name in names.items()}, ignored)

    def _verdict(
        self, ip: IPAddress, entries: list[Entry[Zone]], answers: dict[str, ListAnswer], ignored: str
    ) -> Result:
        """The result from the answers of each zone (``answers`` is keyed by zone)."""
        hits: list[_Hit] = []
        errors: dict[str, str] = {}
        for entry in entries:
            answer = answers[entry.zone]
            outcome = entry.judge(answer)
            if outcome.status == "error":
                errors.setdefault(entry.zone, outcome.error)
            elif outcome.status == "listed":
                hits.append(_Hit(entry, outcome, self._reply(entry, outcome, answer, ip)))
        log = present(
            listed=",".join(f"{h.entry.label}:{'+'.join(h.outcome.codes)}" for h in hits),
            errors=",".join(f"{zone}:{why}" for zone, why in errors.items()),
            ignored=ignored,
        )
        facts = {"dnsbl.listed": ",".join(dict.fromkeys(h.entry.label for h in hits))}
        if not hits:
            verdict = Verdict.ERROR if errors else Verdict.PASS
            return outcome_result(self.name, verdict, log, facts=facts)
        return outcome_result(
            self.name,
            Verdict.FAIL,
            log,
            score=sum(h.entry.options.score for h in hits),
            reason="; ".join(dict.fromkeys(h.text for h in hits)),
            facts=facts,
            action=self._action(hits),
        )

    def _reply(self, entry: Entry[Zone], outcome: Outcome, answer: ListAnswer, ip: IPAddress) -> str:
        txt = "; ".join(answer.txt) if entry.options.txt else ""
        template = entry.options.reply or (DEFAULT_REPLY_TXT if txt else DEFAULT_REPLY)
        values = {
            "ip": str(ip),
            "zone": entry.zone,
            "name": entry.label,
            "code": outcome.codes[0],
            "txt": txt,
        }
        return render(template, values)

    def _action(self, hits: list[_Hit]) -> Action | None:
        opts = self.options
        return forced_action(
            ((h.entry.options.action, h.text) for h in hits),
            reject=(opts.reject_code, opts.reject_dsn),
            defer=(opts.defer_code, opts.defer_dsn),
        )

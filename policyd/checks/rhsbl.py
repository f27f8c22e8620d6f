"""rhsbl: ask DNS domain block lists about the sender's domain (and the HELO and client names).

Stage: mail (with Postfix's default ``smtpd_delay_reject = yes`` it runs at the first RCPT,
once per message).

What and why
    Domain lists such as Spamhaus DBL publish domains used by spammers; a domain is asked by
    prefixing it to the zone (``spammer.example.dbl.example``) and an A record in
    127.0.0.0/8 means "listed" (RFC 5782 section 2.3). By default the envelope sender's
    domain is asked; a zone entry can also ask for the HELO name and the client's verified
    host name (Postfix's ``client_name``, which is forward-confirmed). The null sender has no
    domain and is never asked about; address literals and IP addresses are never asked.
    The name is asked as it is (a list that wants registered domains only answers for
    those). Every (zone, name) is asked at the same time, each within ``zone_timeout``, and a
    listed name's TXT record goes into the reply.

    Each zone entry either only adds its ``score`` (the default: the pipeline rejects at
    ``[policyd] reject_stage`` once the total reaches ``[policyd.scoring] reject``) or answers
    at once (``action = "reject"`` or ``"defer"``). An entry adds its score once, however
    many of its names are listed.

Options ([checks.rhsbl]), besides enabled/timeout (default "5s")/on_error/mode:
    zones            list of tables  []     the lists to ask, see "Zone tables"; none: skip
    allow_domains    list            []     names never asked about: "example.com" is it and
                                            its subdomains, ".example.com" subdomains only,
                                            "/regex/" a regular expression
    zone_timeout     duration        "3s"   budget for one question (A, then TXT when listed)
    health_check     bool            true   probe the RFC 5782 test entries of every zone at
                                            start and every ``health_interval``
    health_interval  duration        "10m"  time between health probes
    reject_code      int             554    SMTP code of ``action = "reject"``
    reject_dsn       string          "5.7.1"
    defer_code       int             450    SMTP code of ``action = "defer"``
    defer_dsn        string          "4.7.1"

Zone tables ([[checks.rhsbl.zones]])
    zone         string  (required)        the DNS zone, e.g. "dbl.spamhaus.org"
    name         string  ""                name in logs and facts (default: the zone)
    identities   list    ["sender"]        what to ask about: "sender" (the envelope
                                           sender's domain), "helo" (the HELO name),
                                           "client" (the verified client host name)
    codes        list    []                answers that count (syntax as for dnsbl); empty:
                                           any answer in 127.0.0.0/8 that is not an error
    error_codes  list    ["127.255.255.*", "127.0.1.255"]
                                           answers that mean "query refused / over limit"
                                           (Spamhaus): an error, never a listing
    score        float   10.0              added to the transaction when listed
    action       string  "score"           "score", "reject" (reject_code at once) or
                                           "defer" (defer_code at once)
    reply        string  ""                reply text; {what} {domain} {identity} {ip}
                                           {zone} {name} {code} {txt} are replaced. Empty:
                                           "{what} [{domain}] blocked using {zone}; {txt}"
                                           (without "; {txt}" when there is no TXT record),
                                           {what} being "Sender address", "Helo command" or
                                           "Client host"
    txt          bool    true              ask for the TXT record of a listed name

Zone health (RFC 5782 section 5)
    A domain list must list ``test`` and must not list ``invalid``. With ``health_check``
    both are asked at start and every ``health_interval`` in the background (requests
    never wait); a zone that lists ``invalid`` lists everything and is ignored, with a
    warning, until a probe finds it sane again. A zone without the ``test`` entry only gets
    a warning.

Facts provided
    ``rhsbl.listed``: the names of the listing zone entries, comma-separated ("" when none).

Log values
    ``listed=zone:identity=domain:code,...``, ``errors=zone:domain:why,...``,
    ``ignored=zone,...``; ``note`` when nothing was asked.

Redis keys
    none.

Failure behaviour
    A question that fails (SERVFAIL, timeout, refusal code, bad answer) is left out and
    logged; the others still count. No listing and a failed question gives verdict ERROR
    with score 0: with the default ``on_error = "ignore"`` our resolver's trouble never
    holds mail up.

RFCs: RFC 5782 section 2.3 (domain name lists) and section 5 (test entries).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.policyd.checks._dnslists import (
    Entry,
    ListAnswer,
    ListCheck,
    ListZone,
    Outcome,
    ask_all,
    check_codes,
    check_template,
    check_timing,
    domain_probe,
    error_codes_by_zone,
    forced_action,
    outcome_result,
    present,
    render,
    valid_domain,
)
from mxward.shared.matchers import DomainList, split_address
from mxward.shared.plugin import Action, Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

__all__ = ["Options", "RhsblCheck", "Zone"]

Identity = Literal["sender", "helo", "client"]

REPLY_FIELDS = ("what", "domain", "identity", "ip", "zone", "name", "code", "txt")
DEFAULT_REPLY = "{what} [{domain}] blocked using {zone}"
DEFAULT_REPLY_TXT = "{what} [{domain}] blocked using {zone}; {txt}"
WHAT: dict[str, str] = {"sender": "Sender address", "helo": "Helo command", "client": "Client host"}


@dataclass(frozen=True, kw_only=True)
class Zone(ListZone):
    """One ``[[checks.rhsbl.zones]]`` table."""

    identities: tuple[Identity, ...] = ("sender",)
    error_codes: tuple[str, ...] = ("127.255.255.*", "127.0.1.255")
    action: Literal["score", "reject", "defer"] = "score"
    reply: str = ""
    txt: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.identities:
            raise ValueError(f"zone {self.zone}: identities must name at least one of sender, helo, client")
        check_template(self.reply, REPLY_FIELDS)


@dataclass(frozen=True, kw_only=True)
class Options:
    zones: tuple[Zone, ...] = ()
    allow_domains: tuple[str, ...] = ()
    zone_timeout: Duration = 3.0
    health_check: bool = True
    health_interval: Duration = 600.0
    reject_code: int = 554
    reject_dsn: str = "5.7.1"
    defer_code: int = 450
    defer_dsn: str = "4.7.1"

    def __post_init__(self) -> None:
        DomainList(self.allow_domains)
        check_timing(self.zone_timeout, self.health_interval)
        check_codes(self.reject_code, self.reject_dsn, self.defer_code, self.defer_dsn)


def _host_name(name: str) -> str:
    """``name`` lower-cased without a trailing dot if it can be asked about, else ""."""
    text = name.strip().lower().rstrip(".")
    if not valid_domain(text) or "." not in text:
        return ""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text
    return ""


def identities(tx: Transaction) -> dict[Identity, str]:
    """The names a transaction offers to ask about (the null sender offers none)."""
    names: dict[Identity, str] = {}
    sender = _host_name(split_address(tx.sender)[1]) if tx.sender else ""
    if sender:
        names["sender"] = sender
    helo = _host_name(tx.helo)
    if helo:
        names["helo"] = helo
    client = _host_name(tx.client_name) if tx.client_name != "unknown" else ""
    if client:
        names["client"] = client
    return names


@dataclass(frozen=True, slots=True)
class _Question:
    entry: Entry[Zone]
    identity: Identity
    domain: str

    @property
    def qname(self) -> str:
        return f"{self.domain}.{self.entry.zone}"


@dataclass(frozen=True, slots=True)
class _Hit:
    question: _Question
    outcome: Outcome
    text: str

    @property
    def log_text(self) -> str:
        q = self.question
        return f"{q.entry.label}:{q.identity}={q.domain}:{'+'.join(self.outcome.codes)}"


class RhsblCheck(ListCheck[Options]):
    name: ClassVar[str] = "rhsbl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("rhsbl.listed",)
    timeout: ClassVar[float] = 5.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._entries = tuple(Entry.compile(zone) for zone in options.zones)
        self._allow = DomainList(options.allow_domains)
        self.watch([domain_probe(zone, codes) for zone, codes in error_codes_by_zone(self._entries).items()])

    def _questions(self, tx: Transaction) -> tuple[list[_Question], str]:
        names = {
            identity: domain
            for identity, domain in identities(tx).items()
            if not (self._allow and self._allow.matches(domain))
        }
        questions: list[_Question] = []
        ignored: list[str] = []
        for entry in self._entries:
            if not self.health.usable(entry.zone, "domain"):
                ignored.append(entry.zone)
                continue
            for identity in entry.options.identities:
                domain = names.get(identity, "")
                question = _Question(entry, identity, domain)
                if domain and len(question.qname) <= 253:
                    questions.append(question)
        return questions, ",".join(dict.fromkeys(ignored))

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        return (tx.sender, tx.helo, tx.client_name, tx.client_address, self.health.changes)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if not self._entries:
            return self.result(Verdict.SKIP, note="no zones")
        questions, ignored = self._questions(tx)
        if not questions:
            note = "every zone ignored" if ignored else "nothing to look up"
            log = present(note=note, ignored=ignored)
            return outcome_result(self.name, Verdict.SKIP, log, facts={"rhsbl.listed": ""})
        wanted: dict[str, bool] = {}
        for q in questions:
            wanted[q.qname] = wanted.get(q.qname, False) or q.entry.options.txt
        answers = await ask_all(self.services.dns, wanted, budget=self.options.zone_timeout)
        return self._verdict(tx, questions, answers, ignored)

    def _verdict(
        self, tx: Transaction, questions: list[_Question], answers: dict[str, ListAnswer], ignored: str
    ) -> Result:
        hits: list[_Hit] = []
        errors: dict[str, str] = {}
        for q in questions:
            answer = answers[q.qname]
            outcome = q.entry.judge(answer)
            if outcome.status == "error":
                errors.setdefault(f"{q.entry.zone}:{q.domain}", outcome.error)
            elif outcome.status == "listed":
                hits.append(_Hit(q, outcome, self._reply(tx, q, outcome, answer)))
        log = present(
            listed=",".join(h.log_text for h in hits),
            errors=",".join(f"{where}:{why}" for where, why in errors.items()),
            ignored=ignored,
        )
        listing = list(dict.fromkeys(h.question.entry for h in hits))
        facts = {"rhsbl.listed": ",".join(dict.fromkeys(entry.label for entry in listing))}
        if not hits:
            return outcome_result(self.name, Verdict.ERROR if errors else Verdict.PASS, log, facts=facts)
        return outcome_result(
            self.name,
            Verdict.FAIL,
            log,
            score=sum(entry.options.score for entry in listing),
            reason="; ".join(dict.fromkeys(h.text for h in hits)),
            facts=facts,
            action=self._action(hits),
        )

    def _reply(self, tx: Transaction, q: _Question, outcome: Outcome, answer: ListAnswer) -> str:
        options = q.entry.options
        txt = "; ".join(answer.txt) if options.txt else ""
        template = options.reply or (DEFAULT_REPLY_TXT if txt else DEFAULT_REPLY)
        values = {
            "what": WHAT[q.identity],
            "domain": q.domain,
            "identity": q.identity,
            "ip": tx.client_address,
            "zone": q.entry.zone,
            "name": q.entry.label,
            "code": outcome.codes[0],
            "txt": txt,
        }
        return render(template, values)

    def _action(self, hits: list[_Hit]) -> Action | None:
        opts = self.options
        return forced_action(
            ((h.question.entry.options.action, h.text) for h in hits),
            reject=(opts.reject_code, opts.reject_dsn),
            defer=(opts.defer_code, opts.defer_dsn),
        )

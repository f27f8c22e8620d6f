"""badmailfrom: envelope senders this site refuses, from local lists.

Stage: mail (with Postfix's default ``smtpd_delay_reject = yes`` it runs at the first RCPT,
once per message).

What and why
    Some senders are known to be unwanted: a spammer's address, a domain that only ever sends
    junk, a pattern of forged addresses. This check compares the envelope sender (MAIL FROM)
    with a list kept in the configuration and/or a file, and reports a match with the entry's
    own reason. The null sender ``<>`` (bounces) is never checked: refusing it would refuse
    bounces of our own mail.

Entries
    ``user@example.com``   that address
    ``@example.com``       every address at example.com (not at its subdomains)
    ``@.example.com``      every address at a subdomain of example.com (not example.com
                           itself: write both entries for both)
    ``/regex/``            a Python regular expression searched in the lower-cased
                           ``user@domain`` (``/^postmaster@/``, ``/\\d{6,}@/``)
    Matching is case-insensitive. When several entries match, exact addresses win over
    domains, domains over subdomain entries, and those over regular expressions (in
    order); the winner's reason is used.

Options ([checks.badmailfrom]), besides enabled/timeout (default "1s")/on_error/mode:
    senders      list            []      entries as text, ``"entry [reason]"`` (the file's
                                         line syntax): ``"@spam.example Go away"``
    entries      list of tables  []      entries as tables: ``{match = "...", reason =
                                         "..."}``; an empty reason means ``reason``
    file         string          ""      a file with one ``entry [reason]`` per line (``#``
                                         starts a comment line); re-read when it changes
    score        float           10.0    added to the transaction for a listed sender
    action       string          "score" "score": only the score (the pipeline rejects at
                                         ``[policyd] reject_stage`` with every reason);
                                         "reject": answer reject_code at once
    reason       string          "Your envelope sender is in my badmailfrom list"
                                         reply text of entries without a reason of their own
    reject_code  int             550     SMTP code of ``action = "reject"``
    reject_dsn   string          "5.7.1" its enhanced status code

The file
    Read at start and again whenever its modification time, size or inode changes (checked
    at every request: one ``stat``). Write it atomically (write a new file, then rename it).
    Configuration entries come first, then the file's. A line whose regular expression does
    not compile is skipped with a warning naming the line.

Facts provided
    ``badmailfrom.listed``: true when the sender matched an entry.

Log values
    ``match=<entry>`` and ``source=config`` or ``source=file:<line>``.

Redis keys
    none.

Failure behaviour
    A file that cannot be read (missing, no permission) is logged as a warning; the last
    list read is kept (at start: only the configuration's entries). The check itself needs
    no network and cannot fail for the sender.

RFCs: RFC 5321 section 4.5.5 (the null reverse-path of bounces).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.shared.matchers import split_address
from mxward.shared.plugin import Action, Check, Result, Services, Stage, Transaction, Verdict

__all__ = ["BadmailfromCheck", "Entry", "Options", "Rule", "RuleSet", "parse_line"]

log = logging.getLogger("mxward.checks.badmailfrom")

_LINE = re.compile(r"(/.+?/|\S+)(?:\s+(.*))?")


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One ``entries`` table: the entry and its reason."""

    match: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        Rule.parse(self.match, self.reason, "config")


@dataclass(frozen=True, kw_only=True)
class Options:
    senders: tuple[str, ...] = ()
    entries: tuple[Entry, ...] = ()
    file: str = ""
    score: float = 10.0
    action: Literal["score", "reject"] = "score"
    reason: str = "Your envelope sender is in my badmailfrom list"
    reject_code: int = 550
    reject_dsn: str = "5.7.1"

    def __post_init__(self) -> None:
        for line in self.senders:
            parse_line(line, "config")
        if not self.reason.strip():
            raise ValueError("reason must not be empty: it is the reply text")
        if not 500 <= self.reject_code <= 599:
            raise ValueError(f"reject_code must be 5xx, got {self.reject_code}")
        if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", self.reject_dsn):
            raise ValueError(f"reject_dsn {self.reject_dsn!r} must be an enhanced status code 5.x.y")


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry, parsed: what it matches and the reason it gives."""

    entry: str
    kind: Literal["address", "domain", "subdomains", "regex"]
    value: str
    reason: str
    source: str
    regex: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, entry: str, reason: str, source: str) -> Rule:
        """The rule of ``entry``; ValueError naming ``source`` when it is not valid."""
        text = entry.strip()
        lowered = text.lower().rstrip(".")
        if len(text) > 2 and text.startswith("/") and text.endswith("/"):
            try:
                regex = re.compile(text[1:-1], re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"{source}: {text!r} is not a valid regular expression: {exc}") from None
            return cls(text, "regex", text, reason, source, regex)
        if lowered.startswith("@."):
            kind: Literal["address", "domain", "subdomains"] = "subdomains"
            value = lowered[2:]
        elif lowered.startswith("@"):
            kind, value = "domain", lowered[1:]
        else:
            kind, value = "address", lowered
        local, at, domain = value.rpartition("@") if kind == "address" else ("", "@", value)
        if not at or (kind == "address" and not local) or not domain or "@" in domain or " " in value:
            raise ValueError(
                f"{source}: {text!r} is not an entry (user@domain, @domain, @.domain or /regex/)"
            )
        return cls(text, kind, value, reason, source)


def parse_line(line: str, source: str) -> Rule | None:
    """The rule of one ``entry [reason]`` line; None for a blank or ``#`` comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    match = _LINE.fullmatch(text)
    if match is None:  # pragma: no cover - every non-blank line matches
        raise ValueError(f"{source}: cannot read {text!r}")
    return Rule.parse(match.group(1), (match.group(2) or "").strip(), source)


class RuleSet:
    """Entries indexed for matching: exact addresses and domains by dictionary lookup."""

    __slots__ = ("_addresses", "_domains", "_regexes", "_subdomains", "rules")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        self._addresses: dict[str, Rule] = {}
        self._domains: dict[str, Rule] = {}
        self._subdomains: dict[str, Rule] = {}
        regexes: list[Rule] = []
        for rule in self.rules:
            if rule.kind == "address":
                self._addresses.setdefault(rule.value, rule)
            elif rule.kind == "domain":
                self._domains.setdefault(rule.value, rule)
            elif rule.kind == "subdomains":
                self._subdomains.setdefault(rule.value, rule)
            else:
                regexes.append(rule)
        self._regexes = tuple(regexes)

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, sender: str) -> Rule | None:
        """The rule that ``sender`` matches (see the precedence in the manual), or None."""
        local, domain = split_address(sender)
        address = f"{local}@{domain}" if domain else local
        rule = self._addresses.get(address) or self._domains.get(domain)
        if rule is not None:
            return rule
        if self._subdomains and domain:
            labels = domain.split(".")
            for start in range(1, len(labels)):
                rule = self._subdomains.get(".".join(labels[start:]))
                if rule is not None:
                    return rule
        return next((r for r in self._regexes if r.regex is not None and r.regex.search(address)), None)


def read_rules(path: str) -> list[Rule]:
    """The rules of the file at ``path``; bad lines are skipped with a warning. OSError if unreadable."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    rules: list[Rule] = []
    for number, line in enumerate(lines, 1):
        try:
            rule = parse_line(line, f"file:{number}")
        except ValueError as exc:
            log.warning("check=badmailfrom file=%s line %d skipped: %s", path, number, exc)
            continue
        if rule is not None:
            rules.append(rule)
    return rules


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class BadmailfromCheck(Check[Options]):
    name: ClassVar[str] = "badmailfrom"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("badmailfrom.listed",)
    timeout: ClassVar[float] = 1.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        configured: list[Rule] = [r for line in options.senders if (r := parse_line(line, "config"))]
        configured.extend(Rule.parse(e.match, e.reason, "config") for e in options.entries)
        self._configured = tuple(configured)
        self._file_rules: tuple[Rule, ...] = ()
        self._file_signature: tuple[int, int, int] | None = None
        self._file_problem = ""
        self.rules = RuleSet(self._configured)

    async def start(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file if it changed since it was last read (one ``stat`` otherwise)."""
        path = self.options.file
        if not path:
            return
        try:
            signature = _signature(os.stat(path))
            if signature == self._file_signature:
                return
            rules = read_rules(path)
        except OSError as exc:
            problem = f"{type(exc).__name__}: {exc.strerror or exc}"
            if problem != self._file_problem:
                log.warning(
                    "check=badmailfrom file=%s cannot be read (%s); keeping %d entries",
                    path,
                    problem,
                    len(self.rules),
                )
                self._file_problem = problem
            return
        self._file_problem = ""
        self._file_signature = signature
        self._file_rules = tuple(rules)
        self.rules = RuleSet((*self._configured, *self._file_rules))
        log.info("check=badmailfrom file=%s read: %d entries", path, len(self._file_rules))

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if not tx.sender:
            return self.result(Verdict.SKIP, facts={"badmailfrom.listed": False}, note="null sender")
        self.refresh()
        if not self.rules:
            return self.result(Verdict.SKIP, facts={"badmailfrom.listed": False}, note="no entries")
        rule = self.rules.match(tx.sender)
        if rule is None:
            return self.result(Verdict.PASS, facts={"badmailfrom.listed": False})
        opts = self.options
        reason = rule.reason or opts.reason
        action = Action.reject(reason, opts.reject_code, opts.reject_dsn) if opts.action == "reject" else None
        return self.result(
            Verdict.FAIL,
            opts.score,
            reason,
            facts={"badmailfrom.listed": True},
            action=action,
            match=rule.entry,
            source=rule.source,
        )

"""headers: is the message's header section what RFC 5322 requires?

Stage: content (the content filter, once per message, on the parsed header section).

What and why
    RFC 5322 section 3.6 requires an origination date (Date) and an originator (From) in every
    message, and allows most other fields at most once. Mail user agents and real mail servers
    follow that; spam software and broken scripts often do not: no Date, a second Subject or
    From that one reader shows and another hides, a Date far in the future to stay on top of
    the inbox, or a From that no client can answer. qpsmtpd's ``headers`` plugin looked for
    these; this check does what it meant to do (qpsmtpd replied with a bare number for missing
    and duplicate headers, and noted problems even when told not to reject). The problems, in
    the order they are reported:

    no_headers   the message has no header fields at all (nothing else is looked at then)
    missing      a header in ``required`` is absent
    duplicate    a header in ``singular`` appears more than once
    bad_from     the first From field is not a valid RFC 5322 mailbox list (section 3.4), or
                 it is a group (``undisclosed-recipients:;``): RFC 6854 allows groups in From
                 only in closed environments, never for Internet mail
    from_count   the first From field has no address, or several without a Sender header
                 (RFC 5322 section 3.6.2: several authors need one Sender)
    bad_date     the first Date field is not a valid date-time (RFC 5322 sections 3.3 and 4.3)
    future_date  Date is more than ``future`` ahead of our clock
    past_date    Date is more than ``past`` behind our clock

    From is checked only when present (its absence is ``missing`` when From is required), and
    Date likewise. The From syntax follows RFC 5322 with its obsolete forms (comments, quoted
    display names, ``obs-route``, empty list members); one leniency: a local part may contain
    empty words (``a..b@``, ``a.@``), which a few old Japanese mobile providers still issue.
    Non-ASCII text (RFC 6532, or undeclared 8-bit bytes) is accepted where RFC 5322 takes
    atoms or quoted text; control characters and NUL are not.
    The date may use any RFC 5322 form, obsolete ones too: no day of week, two-digit years,
    seconds left out, comments, named zones (``EST``, ``GMT``; unknown names and a missing zone
    count as ``-0000``, i.e. UTC, as RFC 5322 section 4.3 asks), and leniently full English
    day and month names. Anything else (ISO 8601, day 32, hour 25, zone +9999, text after the
    zone) is ``bad_date``. A day of the week that does not match
    the date is not held against the message.

Defaults: why a Date window of 2 days ahead and 15 days behind
    qpsmtpd has no window unless one is configured; its tests and examples use ``future 2``
    and ``past 2``..``5`` days. Ahead: a sender's clock set to local time but labelled UTC is up
    to 14 hours wrong, so 2 days leave room for that and never let a "pinned to the top" date
    through for long. Behind: a message may legitimately wait 5 days in a sender's queue
    (Postfix's and sendmail's ``maximal_queue_lifetime``), more in a laptop's outbox or a
    mailing list's moderation queue (which keeps the author's Date); 15 days cover that with
    margin, while spam dated months or years back (to sink below newer mail) still fails.
    ``0`` turns either side off.

Result and reply
    Every problem adds its score from ``scores`` (a missing and a duplicate header count once
    per header). The reason names each problem, in the order above, joined with "; "::

        missing Date header; duplicate Subject header; Date is 10 days in the future

    Texts: "message has no header fields", "missing <Name> header", "duplicate <Name>
    header", "From header is not a valid address list", "From header is a group, not a
    mailbox", "From header has no address", "From header has <n> addresses and no Sender
    header", "Date header is not a valid date", "Date is <n days|hours|minutes> in the
    future|past". Names are written as configured; no text from the message goes into a reply.
    With ``action = "reject"`` (the default) a failing message is refused with ``reject_code``
    ``reject_dsn`` and that reason: 554 because RFC 5321 section 4.3.2 lists it for a refused
    DATA, and 5.6.0 ("other or undefined media error", RFC 3463) because the problem lies in
    the message's content, not in a policy about its sender (5.7.x). A 4xx code defers
    instead. The filter turns a refusal into its ``reject_action`` (quarantine by default) in
    after-queue mode and into this SMTP reply in proxy mode. With ``action = "score"`` only
    the scores count, towards the filter's ``tag_score`` and ``reject_score``.

Options ([checks.headers]), besides enabled/timeout/on_error/mode:
    required     list      ["From", "Date"]
                           header fields that must be present (case-insensitive)
    singular     list      ["From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "Date",
                            "Message-ID", "In-Reply-To", "References"]
                           header fields allowed at most once (RFC 5322 section 3.6's table)
    future       duration  "2d"      how far Date may be ahead of our clock; 0 = no limit
    past         duration  "15d"     how far Date may be behind our clock; 0 = no limit
    skip_tests   list      []        problems not looked for, by name (see above)
    action       string    "reject"  "reject": a problem refuses the message; "score": the
                                     scores only
    reject_code  int       554       code of the refusal; a 4xx code defers instead
    reject_dsn   string    "5.6.0"   its enhanced status code ("4.6.0" with a 4xx code)
    scores       table               score per problem: no_headers 5, missing 3,
                                     duplicate 3, bad_from 3, from_count 3, bad_date 2,
                                     future_date 3, past_date 2

Facts provided
    ``headers.problems``: the problems found, comma-separated (``missing:Date,duplicate:
    Subject,future_date``), ``""`` when none.

Log
    ``problems=<as the fact>`` when something failed, ``date_offset=<seconds>`` (positive:
    ahead of our clock) when Date was read, ``from_addresses=<n>`` when From was read.

Failure behaviour
    Nothing here waits for the network, and no input makes the check raise: a field that cannot
    be read is a problem, never an error. Without a message (not the content stage) the
    verdict is skip. Exempt clients are the pipeline's business.

Redis keys
    none.

RFCs: RFC 5322 sections 3.3 (date and time), 3.4 (addresses), 3.6 (field counts), 4.3
(obsolete date forms), 4.4 (obsolete addressing); RFC 6854 (groups in From); RFC 6532
(UTF-8 headers); RFC 5321 section 4.3.2 and RFC 3463 (reply codes).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from mxward.shared.headers import comment_end
from mxward.shared.plugin import (
    Action,
    Check,
    LogValue,
    Result,
    Services,
    Stage,
    Transaction,
    Verdict,
)
from mxward.shared.units import Duration

if TYPE_CHECKING:
    from mxward.contentfilter.message import Message

__all__ = [
    "PROBLEMS",
    "HeadersCheck",
    "MailboxList",
    "Options",
    "Problem",
    "Scores",
    "parse_date",
    "parse_mailbox_list",
]

Problem = Literal[
    "no_headers",
    "missing",
    "duplicate",
    "bad_from",
    "from_count",
    "bad_date",
    "future_date",
    "past_date",
]
PROBLEMS: tuple[Problem, ...] = get_args(Problem)

_SINGULAR = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: printable ASCII but ":"
_DAY = 86400.0


@dataclass(frozen=True, kw_only=True)
class Scores:
    """``[checks.headers.scores]``: the score of each problem."""

    no_headers: float = 5.0
    missing: float = 3.0
    duplicate: float = 3.0
    bad_from: float = 3.0
    from_count: float = 3.0
    bad_date: float = 2.0
    future_date: float = 3.0
    past_date: float = 2.0


@dataclass(frozen=True, kw_only=True)
class Options:
    required: tuple[str, ...] = ("From", "Date")
    singular: tuple[str, ...] = _SINGULAR
    future: Duration = 2 * _DAY
    past: Duration = 15 * _DAY
    skip_tests: tuple[Problem, ...] = ()
    action: Literal["reject", "score"] = "reject"
    reject_code: int = 554
    reject_dsn: str = "5.6.0"
    scores: Scores = field(default_factory=Scores)

    def __post_init__(self) -> None:
        for key in ("required", "singular"):
            for name in getattr(self, key):
                if not _FIELD_NAME.fullmatch(name):
                    raise ValueError(f"{key}: {name!r} is not a header field name")
        unknown = [p for p in self.skip_tests if p not in PROBLEMS]
        if unknown:
            raise ValueError(f"skip_tests: unknown problem(s) {unknown} (problems: {', '.join(PROBLEMS)})")
        if self.action not in ("reject", "score"):
            raise ValueError(f'action {self.action!r}: use "reject" or "score"')
        if not 400 <= self.reject_code <= 599:
            raise ValueError(f"reject_code {self.reject_code} must be a 4xx (defer) or 5xx (reject) code")
        first = str(self.reject_code)[0]
        if not re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", self.reject_dsn) or self.reject_dsn[0] != first:
            raise ValueError(f"reject_dsn {self.reject_dsn!r} must be an enhanced code {first}.x.y")


@dataclass(frozen=True, slots=True)
class _Finding:
    problem: Problem
    reason: str
    detail: str = ""  # the header name for missing/duplicate, for the log and the fact

    @property
    def code(self) -> str:
        return f"{self.problem}:{self.detail}" if self.detail else self.problem


class HeadersCheck(Check[Options]):
    name: ClassVar[str] = "headers"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONTENT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("headers.problems",)
    timeout: ClassVar[float] = 2.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._tests = frozenset(p for p in PROBLEMS if p not in options.skip_tests)
        self._required = _unique(options.required)
        self._singular = _unique(options.singular)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        message = tx.message
        if message is None:
            return self.result(Verdict.SKIP, note="no message")
        log: dict[str, LogValue] = {}
        findings = self._examine(message, log)
        codes = ",".join(f.code for f in findings)
        if not findings:
            return Result(check=self.name, verdict=Verdict.PASS, log=log, facts={"headers.problems": ""})
        scores = self.options.scores
        score = sum(getattr(scores, f.problem) for f in findings)
        reason = "; ".join(f.reason for f in findings)
        action = None
        if self.options.action == "reject":
            code, dsn = self.options.reject_code, self.options.reject_dsn
            action = Action.reject(reason, code, dsn) if code >= 500 else Action.defer(reason, code, dsn)
        return Result(
            check=self.name,
            verdict=Verdict.FAIL,
            score=score,
            reason=reason,
            log={"problems": codes, **log},
            facts={"headers.problems": codes},
            action=action,
        )

    def _examine(self, message: Message, log: dict[str, LogValue]) -> list[_Finding]:
        tests = self._tests
        if not message.headers:
            if "no_headers" in tests:
                return [_Finding("no_headers", "message has no header fields")]
            return []
        findings: list[_Finding] = []
        if "missing" in tests:
            findings.extend(
                _Finding("missing", f"missing {name} header", name)
                for name in self._required
                if not message.count(name)
            )
        if "duplicate" in tests:
            findings.extend(
                _Finding("duplicate", f"duplicate {name} header", name)
                for name in self._singular
                if message.count(name) > 1
            )
        from_value = message.get("From")
        if from_value is not None and tests & {"bad_from", "from_count"}:
            findings.extend(self._from(from_value, message.count("Sender") > 0, log))
        date_value = message.get("Date")
        if date_value is not None and tests & {"bad_date", "future_date", "past_date"}:
            findings.extend(self._date(date_value, log))
        return findings

    def _from(self, value: str, has_sender: bool, log: dict[str, LogValue]) -> list[_Finding]:
        parsed = parse_mailbox_list(value)
        if parsed.error:
            return _only("bad_from", self._tests, "From header is not a valid address list")
        if parsed.group:
            return _only("bad_from", self._tests, "From header is a group, not a mailbox")
        log["from_addresses"] = parsed.mailboxes
        if parsed.mailboxes == 0:
            return _only("from_count", self._tests, "From header has no address")
        if parsed.mailboxes > 1 and not has_sender:
            reason = f"From header has {parsed.mailboxes} addresses and no Sender header"
            return _only("from_count", self._tests, reason)
        return []

    def _date(self, value: str, log: dict[str, LogValue]) -> list[_Finding]:
        when = parse_date(value)
        if when is None:
            return _only("bad_date", self._tests, "Date header is not a valid date")
        offset = when - self.services.clock.now()
        log["date_offset"] = round(offset)
        future, past = self.options.future, self.options.past
        if future and offset > future:
            return _only("future_date", self._tests, f"Date is {_span(offset)} in the future")
        if past and -offset > past:
            return _only("past_date", self._tests, f"Date is {_span(-offset)} in the past")
        return []


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names without repeats (case-insensitive), first spelling kept."""
    seen: dict[str, str] = {}
    for name in names:
        seen.setdefault(name.lower(), name)
    return tuple(seen.values())


def _only(problem: Problem, tests: frozenset[Problem], reason: str) -> list[_Finding]:
    return [_Finding(problem, reason)] if problem in tests else []


def _span(seconds: float) -> str:
    """A time span for people, rounded down: "10 days", "1 day", "5 hours", "3 minutes"."""
    for unit, size in (("day", _DAY), ("hour", 3600.0), ("minute", 60.0), ("second", 1.0)):
        count = int(seconds // size)
        if count >= 1 or unit == "second":
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return ""  # pragma: no cover - the loop always returns


# ---------------------------------------------------------------------------------------------
# Dates (RFC 5322 sections 3.3 and 4.3)

_MAX_FIELD = 2000
_DATE = re.compile(
    r"(?:(?P<dow>[A-Za-z]+)\s*,\s*)?"
    r"(?P<day>[0-9]{1,2})\s+(?P<month>[A-Za-z]+)\s+(?P<year>[0-9]{2,4})\s+"
    r"(?P<hour>[0-9]{1,2})\s*:\s*(?P<minute>[0-9]{1,2})(?:\s*:\s*(?P<second>[0-9]{1,2}))?"
    r"(?:\s*(?P<zone>[+-][0-9]{4}|[A-Za-z]{1,5}))?",
    re.ASCII,
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
_DAYS = {name: number for number, name in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))}
_FULL_NAMES = {
    name[:3]: name
    for name in (
        *("january", "february", "march", "april", "may", "june", "july", "august"),
        *("september", "october", "november", "december", "monday", "tuesday", "wednesday"),
        *("thursday", "friday", "saturday", "sunday"),
    )
}
# RFC 5322 section 4.3; military letters and unknown names count as -0000 (UTC).
_ZONES = {
    "ut": 0,
    "gmt": 0,
    "z": 0,
    "edt": -4,
    "est": -5,
    "cdt": -5,
    "cst": -6,
    "mdt": -6,
    "mst": -7,
    "pdt": -7,
    "pst": -8,
}


def parse_date(value: str) -> float | None:
    """Seconds since the epoch of an RFC 5322 date-time (obsolete forms too), or None."""
    if len(value) > _MAX_FIELD:
        return None
    text = _strip_comments(value)
    if text is None:
        return None
    match = _DATE.fullmatch(text.strip())
    if match is None:
        return None
    dow = match.group("dow")
    month = _name_index(match.group("month"), _MONTHS)
    if month is None or (dow is not None and _name_index(dow, _DAYS) is None):
        return None
    digits = match.group("year")
    year = int(digits)
    if len(digits) == 2:
        year += 2000 if year < 50 else 1900
    elif len(digits) == 3:
        year += 1900
    second = int(match.group("second") or 0)
    if year < 1900 or second > 60:
        return None
    try:
        stamp = dt.datetime(
            year,
            month,
            int(match.group("day")),
            int(match.group("hour")),
            int(match.group("minute")),
            min(second, 59),  # a leap second is the last second of its minute here
            tzinfo=dt.UTC,
        )
    except ValueError:
        return None
    offset = _zone_offset(match.group("zone"))
    if offset is None:
        return None
    return stamp.timestamp() - offset


def _name_index(name: str, names: dict[str, int]) -> int | None:
    """The number of a month or day name: its three letters, or the whole English name."""
    key = name.lower()
    if len(key) < 3:
        return None
    number = names.get(key[:3])
    if number is None or not _FULL_NAMES[key[:3]].startswith(key):
        return None
    return number


def _zone_offset(zone: str | None) -> int | None:
    """Seconds east of UTC (0 for no zone, ``-0000`` and names RFC 5322 does not define);
    None for a numeric zone that is no offset (``+9999``)."""
    if zone is None:
        return 0
    if zone[0] in "+-":
        hours, minutes = int(zone[1:3]), int(zone[3:5])
        if hours > 23 or minutes > 59:
            return None
        sign = -1 if zone[0] == "-" else 1
        return sign * (hours * 3600 + minutes * 60)
    return _ZONES.get(zone.lower(), 0) * 3600


def _strip_comments(text: str) -> str | None:
    """``text`` with (nested) comments replaced by a space; None when one is not closed."""
    if "(" not in text and ")" not in text:
        return text
    out: list[str] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "(":
            pos = comment_end(text, pos)
            if pos < 0:
                return None
            out.append(" ")
        elif char == ")":
            return None
        else:
            out.append(char)
            pos += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Addresses (RFC 5322 sections 3.4 and 4.4)


@dataclass(frozen=True, slots=True)
class MailboxList:
    """What :func:`parse_mailbox_list` found: the mailboxes, whether a group was seen, or an
    error (then the other fields mean nothing)."""

    mailboxes: int = 0
    group: bool = False
    error: str = ""


_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_SPECIALS = frozenset('<>@,;:."')
_WSP = frozenset(" \t\r\n")

# Token kinds: "atom", "quoted", "literal" (a domain literal), or the special character itself.
_Token = tuple[str, str]


class _SyntaxError(Exception):
    pass


def _is_atext(char: str) -> bool:
    return char in _ATEXT or ord(char) >= 0x80


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char in _WSP:
            pos += 1
        elif char == "(":
            close = comment_end(text, pos)
            if any(_is_control(c) for c in text[pos : close if close >= 0 else end]):
                raise _SyntaxError("control character in a comment")
            if close < 0:
                raise _SyntaxError("unclosed comment")
            pos = close
        elif char == '"':
            pos += 1
            start = pos
            while pos < end and text[pos] != '"':
                step = 2 if text[pos] == "\\" else 1
                if any(_is_control(c) for c in text[pos : pos + step]):
                    raise _SyntaxError("control character in a quoted string")
                pos += step
            if pos >= end:
                raise _SyntaxError("unclosed quoted string")
            tokens.append(("quoted", text[start:pos]))
            pos += 1
        elif char == "[":
            close = text.find("]", pos)
            if close < 0 or any(c in "[\\" or _is_control(c) for c in text[pos + 1 : close]):
                raise _SyntaxError("bad domain literal")
            tokens.append(("literal", text[pos : close + 1]))
            pos = close + 1
        elif char in _SPECIALS:
            tokens.append((char, char))
            pos += 1
        elif _is_atext(char):
            start = pos
            while pos < end and _is_atext(text[pos]):
                pos += 1
            tokens.append(("atom", text[start:pos]))
        else:
            raise _SyntaxError(f"unexpected character {char!r}")
    return tokens


def _is_control(char: str) -> bool:
    return (ord(char) < 0x20 and char not in _WSP) or char == "\x7f"


class _Parser:
    """An address list as RFC 5322 section 3.4 (with section 4.4's obsolete forms) reads it."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def kind(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.tokens[index][0] if index < len(self.tokens) else ""

    def expect(self, kind: str) -> None:
        if self.kind() != kind:
            raise _SyntaxError(f"expected {kind!r}")
        self.pos += 1

    def address_list(self) -> MailboxList:
        mailboxes = 0
        group = False
        while self.kind():
            if self.kind() == ",":  # obs-addr-list: empty members
                self.pos += 1
                continue
            phrase = self.words()
            if self.kind() == ":":
                self.pos += 1
                group = True
                mailboxes += self.group_members()
            else:
                self.mailbox(phrase)
                mailboxes += 1
            if self.kind() not in ("", ","):
                raise _SyntaxError("expected ',' between addresses")
        return MailboxList(mailboxes=mailboxes, group=group)

    def words(self) -> int:
        """Skip a phrase (words and obs-phrase dots); return how many tokens it had."""
        start = self.pos
        while self.kind() in ("atom", "quoted", "."):
            self.pos += 1
        return self.pos - start

    def mailbox(self, phrase: int) -> None:
        if self.kind() == "<":
            self.pos += 1
            self.angle_addr()
        elif self.kind() == "@" and phrase:
            self.pos -= phrase
            self.addr_spec()
        else:
            raise _SyntaxError("not an address")

    def group_members(self) -> int:
        count = 0
        while self.kind() not in (";", ""):
            if self.kind() == ",":
                self.pos += 1
                continue
            self.mailbox(self.words())
            count += 1
            if self.kind() not in (",", ";"):
                raise _SyntaxError("expected ',' or ';' in a group")
        self.expect(";")
        return count

    def angle_addr(self) -> None:
        if self.kind() == "@":  # obs-route: @domain,@domain:
            while self.kind() in ("@", ","):
                if self.kind() == "@":
                    self.pos += 1
                    self.domain()
                else:
                    self.pos += 1
            self.expect(":")
        self.addr_spec()
        self.expect(">")

    def addr_spec(self) -> None:
        # word *("." word), leniently with empty words ("a..b", "a.")
        words = 0
        after_word = False
        while self.kind() in ("atom", "quoted", "."):
            is_word = self.kind() != "."
            if is_word and after_word:
                raise _SyntaxError("words of a local part must be joined by dots")
            words += is_word
            after_word = is_word
            self.pos += 1
        if not words:
            raise _SyntaxError("empty local part")
        self.expect("@")
        self.domain()

    def domain(self) -> None:
        if self.kind() == "literal":
            self.pos += 1
            return
        self.expect("atom")
        while self.kind() == "." and self.kind(1) == "atom":
            self.pos += 2
        if self.kind() == ".":
            raise _SyntaxError("bad domain")


def parse_mailbox_list(value: str) -> MailboxList:
    """Count the mailboxes of a From-style field value; ``error`` says why it cannot be read."""
    if len(value) > 16 * _MAX_FIELD:
        return MailboxList(error="field too long")
    try:
        return _Parser(_tokenize(value)).address_list()
    except _SyntaxError as exc:
        return MailboxList(error=str(exc))

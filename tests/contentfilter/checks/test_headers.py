"""headers: RFC 5322's required, singular, From and Date rules on parsed messages.

Messages are built as bytes and parsed by the filter's own Message; "now" is a FrozenClock,
moved by the tests, never the system clock.
"""

from __future__ import annotations

import asyncio
import random
from typing import NamedTuple

import pytest

from mxward.contentfilter.checks.headers import (
    HeadersCheck,
    Options,
    Scores,
    parse_date,
    parse_mailbox_list,
)
from mxward.contentfilter.message import Message
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW_DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
DAY = 86400


def services(clock: FrozenClock) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",))),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=clock,
        hostname="mx.test.example",
    )


def message(*fields: str, body: str = "Hello.\r\n") -> bytes:
    return ("".join(f"{f}\r\n" for f in fields) + "\r\n" + body).encode("utf-8", "surrogateescape")


def clean(*extra: str, date: str = NOW_DATE, sender: str = "Alice <alice@example.com>") -> bytes:
    return message(
        f"From: {sender}",
        "To: bob@example.org",
        "Subject: lunch",
        f"Date: {date}",
        "Message-ID: <1@example.com>",
        *extra,
    )


async def run(data: bytes, options: Options | None = None, clock: FrozenClock | None = None) -> Result:
    check = HeadersCheck(options or Options(), services(clock or FrozenClock(NOW)))
    tx = Transaction(stage=Stage.CONTENT, message=Message.parse(data), recipients=("bob@example.org",))
    return await check.check(Stage.CONTENT, tx)


# ---------------------------------------------------------------------------------------------
# Clean messages


async def test_a_clean_message_passes() -> None:
    """From, Date and the usual fields once each: pass, no score, no action, empty fact."""
    result = await run(clean())
    assert result.verdict is Verdict.PASS
    assert result.score == 0
    assert result.action is None
    assert result.reason == ""
    assert result.facts == {"headers.problems": ""}
    assert result.log == {"from_addresses": 1, "date_offset": 0}


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.com",
        "<alice@example.com>",
        '"Doe, Jane" <jane@example.com>',
        "Jane Doe <jane@example.com> (the boss)",
        "=?utf-8?q?J=C3=B6rg?= <joerg@example.com>",
        "Jörg Müller <joerg@example.com>",
        "J\udcf6rg <joerg@example.com>",  # undeclared Latin-1 byte, as the parser decodes it
        "jörg@bücher.example",
        '"quoted local"@example.com',
        "a..b@docomo.example.jp",
        "user@[192.0.2.1]",
        "<@relay.example,@other.example:alice@example.com>",
        "alice@example.com,",
        "  alice@example.com  ",
    ],
)
async def test_valid_from_forms_pass(sender: str) -> None:
    """RFC 5322 mailboxes, obsolete forms and 8-bit display names are accepted."""
    result = await run(clean(sender=sender))
    assert result.verdict is Verdict.PASS, result.reason


async def test_several_authors_with_a_sender_pass() -> None:
    """RFC 5322 3.6.2: several From addresses are fine when Sender names the one who sent."""
    data = clean("Sender: alice@example.com", sender="alice@example.com, carol@example.com")
    result = await run(data)
    assert result.verdict is Verdict.PASS
    assert result.log["from_addresses"] == 2


# ---------------------------------------------------------------------------------------------
# Every problem, with its reason


class Case(NamedTuple):
    data: bytes
    reason: str
    problems: str
    score: float


CASES = {
    "no headers": Case(b"\r\nJust a body.\r\n", "message has no header fields", "no_headers", 5.0),
    "empty message": Case(b"", "message has no header fields", "no_headers", 5.0),
    "missing From": Case(
        message("To: bob@example.org", f"Date: {NOW_DATE}"), "missing From header", "missing:From", 3.0
    ),
    "missing Date": Case(message("From: alice@example.com"), "missing Date header", "missing:Date", 3.0),
    "missing both": Case(
        message("Subject: hi"),
        "missing From header; missing Date header",
        "missing:From,missing:Date",
        6.0,
    ),
    "duplicate Subject": Case(clean("Subject: again"), "duplicate Subject header", "duplicate:Subject", 3.0),
    "duplicate in another case": Case(
        clean("SUBJECT: again", "message-id: <2@example.com>"),
        "duplicate Subject header; duplicate Message-ID header",
        "duplicate:Subject,duplicate:Message-ID",
        6.0,
    ),
    "duplicate From": Case(
        clean("From: mallory@example.net"), "duplicate From header", "duplicate:From", 3.0
    ),
    "duplicate Date": Case(clean(f"Date: {NOW_DATE}"), "duplicate Date header", "duplicate:Date", 3.0),
    "missing and duplicate and future": Case(
        message("From: a@example.com", "Subject: a", "Subject: b", "Date: Fri, 24 Nov 2023 22:13:20 +0000"),
        "duplicate Subject header; Date is 10 days in the future",
        "duplicate:Subject,future_date",
        6.0,
    ),
    "From with a space in the local part": Case(
        clean(sender="John Smith@example.com"),
        "From header is not a valid address list",
        "bad_from",
        3.0,
    ),
    "From empty angle address": Case(
        clean(sender="<>"), "From header is not a valid address list", "bad_from", 3.0
    ),
    "From with unclosed comment": Case(
        clean(sender="alice@example.com (who"), "From header is not a valid address list", "bad_from", 3.0
    ),
    "From with unclosed quote": Case(
        clean(sender='"Alice <alice@example.com>'), "From header is not a valid address list", "bad_from", 3.0
    ),
    "From without a domain": Case(
        clean(sender="alice"), "From header is not a valid address list", "bad_from", 3.0
    ),
    "From with a trailing dot domain": Case(
        clean(sender="alice@example.com."), "From header is not a valid address list", "bad_from", 3.0
    ),
    "From with two addresses glued": Case(
        clean(sender="a@example.com b@example.com"),
        "From header is not a valid address list",
        "bad_from",
        3.0,
    ),
    "From with NUL": Case(
        clean(sender="alice\x00@example.com"), "From header is not a valid address list", "bad_from", 3.0
    ),
    "From with an escape sequence": Case(
        clean(sender="\x1b[31mAlice <alice@example.com>"),
        "From header is not a valid address list",
        "bad_from",
        3.0,
    ),
    "From as an empty group": Case(
        clean(sender="undisclosed-recipients:;"), "From header is a group, not a mailbox", "bad_from", 3.0
    ),
    "From as a group with members": Case(
        clean(sender="Team: a@example.com, b@example.com;"),
        "From header is a group, not a mailbox",
        "bad_from",
        3.0,
    ),
    "From empty": Case(clean(sender=""), "From header has no address", "from_count", 3.0),
    "From only a comment": Case(clean(sender="(nobody)"), "From header has no address", "from_count", 3.0),
    "From with two authors and no Sender": Case(
        clean(sender="a@example.com, Bee <b@example.com>"),
        "From header has 2 addresses and no Sender header",
        "from_count",
        3.0,
    ),
    "Date in ISO 8601": Case(
        clean(date="2023-11-14T22:13:20Z"), "Date header is not a valid date", "bad_date", 2.0
    ),
    "Date on day 32": Case(
        clean(date="Tue, 32 Nov 2023 22:13:20 +0000"), "Date header is not a valid date", "bad_date", 2.0
    ),
    "Date with hour 25": Case(
        clean(date="Tue, 14 Nov 2023 25:13:20 +0000"), "Date header is not a valid date", "bad_date", 2.0
    ),
    "Date with zone +9999": Case(
        clean(date="Tue, 14 Nov 2023 22:13:20 +9999"), "Date header is not a valid date", "bad_date", 2.0
    ),
    "Date with words after the zone": Case(
        clean(date="Tue, 14 Nov 2023 22:13:20 +0000 tomorrow"),
        "Date header is not a valid date",
        "bad_date",
        2.0,
    ),
    "Date empty": Case(clean(date=""), "Date header is not a valid date", "bad_date", 2.0),
    "Date of 8-bit junk": Case(
        clean(date="\udcff\udcfe 14 Nov 2023"), "Date header is not a valid date", "bad_date", 2.0
    ),
    "Date with Unicode digits": Case(
        clean(date="Tue, \u0661\u0664 Nov 2023 22:13:20 +0000"),
        "Date header is not a valid date",
        "bad_date",
        2.0,
    ),
    "Date in the future": Case(
        clean(date="Fri, 24 Nov 2023 22:13:20 +0000"), "Date is 10 days in the future", "future_date", 3.0
    ),
    "Date in the past": Case(
        clean(date="Sat, 14 Oct 2023 22:13:20 +0000"), "Date is 31 days in the past", "past_date", 2.0
    ),
    "Date years in the past": Case(
        clean(date="Thu, 01 Jan 1970 00:00:00 +0000"), "Date is 19675 days in the past", "past_date", 2.0
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_each_problem_is_found_with_its_reason(case: Case) -> None:
    """Verdict fail, the exact reason, the problem list as fact and log, the summed score."""
    result = await run(case.data)
    assert result.verdict is Verdict.FAIL
    assert result.reason == case.reason
    assert result.facts == {"headers.problems": case.problems}
    assert result.log["problems"] == case.problems
    assert result.score == case.score
    assert result.action is not None
    assert result.action.reply == f"554 5.6.0 {case.reason}"


async def test_the_reason_never_quotes_the_message() -> None:
    """Header names come from the configuration, not the message: its text never reaches a reply."""
    result = await run(clean("Subject: <script>\r\n injected", sender="Evil\x00 <e@example.com>"))
    assert result.reason == "duplicate Subject header; From header is not a valid address list"
    assert "script" not in result.reason and "Evil" not in result.reason


# ---------------------------------------------------------------------------------------------
# The Date window, with a moving clock


async def test_the_future_limit_is_inclusive() -> None:
    """Exactly `future` ahead passes; one second more fails."""
    clock = FrozenClock(NOW - 2 * DAY)
    assert (await run(clean(), clock=clock)).verdict is Verdict.PASS
    clock.advance(-1)
    result = await run(clean(), clock=clock)
    assert result.reason == "Date is 2 days in the future"
    assert result.log["date_offset"] == 2 * DAY + 1


async def test_the_past_limit_is_inclusive() -> None:
    """Exactly `past` (15 days) behind passes; one second more fails."""
    clock = FrozenClock(NOW + 15 * DAY)
    assert (await run(clean(), clock=clock)).verdict is Verdict.PASS
    clock.advance(1)
    result = await run(clean(), clock=clock)
    assert result.reason == "Date is 15 days in the past"
    assert result.log["date_offset"] == -(15 * DAY + 1)


@pytest.mark.parametrize(
    ("ahead", "text"),
    [
        (DAY + 1, "1 day"),
        (3 * 3600 + 59, "3 hours"),
        (3600, "1 hour"),
        (5 * 60 + 30, "5 minutes"),
        (61, "1 minute"),
        (45, "45 seconds"),
    ],
)
async def test_spans_are_written_for_people(ahead: int, text: str) -> None:
    """Small limits give hours, minutes or seconds, rounded down."""
    result = await run(clean(), Options(future=30.0), FrozenClock(NOW - ahead))
    assert result.reason == f"Date is {text} in the future"


async def test_qpsmtpd_limits_of_two_days() -> None:
    """qpsmtpd's own test: limits of 2 days; dates 1, 3 and 6 days off."""
    options = Options(future=2 * DAY, past=2 * DAY)
    for days, verdict in ((1, Verdict.PASS), (3, Verdict.FAIL), (6, Verdict.FAIL)):
        assert (await run(clean(), options, FrozenClock(NOW + days * DAY))).verdict is verdict
        assert (await run(clean(), options, FrozenClock(NOW - days * DAY))).verdict is verdict


async def test_zero_turns_a_side_of_the_window_off() -> None:
    """future = 0 and past = 0: any valid date passes."""
    options = Options(future=0, past=0)
    assert (await run(clean(), options, FrozenClock(NOW + 9000 * DAY))).verdict is Verdict.PASS
    assert (await run(clean(), options, FrozenClock(NOW - 9000 * DAY))).verdict is Verdict.PASS


async def test_the_zone_is_applied() -> None:
    """The same instant in two zones has the same offset from now."""
    east = await run(clean(date="Wed, 15 Nov 2023 00:13:20 +0200"))
    west = await run(clean(date="Tue, 14 Nov 2023 17:13:20 EST"))
    assert east.log["date_offset"] == west.log["date_offset"] == 0


# ---------------------------------------------------------------------------------------------
# Options


async def test_score_only_has_no_action() -> None:
    """action = "score": the problem is scored and reported, nothing is forced."""
    result = await run(clean("Subject: again"), Options(action="score"))
    assert result.verdict is Verdict.FAIL
    assert result.score == 3.0
    assert result.action is None
    assert result.reason == "duplicate Subject header"


async def test_a_4xx_code_defers() -> None:
    """qpsmtpd's reject_type temp: a 4xx code makes a DEFER with that code."""
    result = await run(clean("Subject: again"), Options(reject_code=451, reject_dsn="4.6.0"))
    assert result.action is not None
    assert result.action.kind is ActionKind.DEFER
    assert result.action.reply == "451 4.6.0 duplicate Subject header"


async def test_another_reject_code() -> None:
    """reject_code and reject_dsn make the reply."""
    result = await run(message("From: a@example.com"), Options(reject_code=550, reject_dsn="5.7.1"))
    assert result.action is not None
    assert result.action.kind is ActionKind.REJECT
    assert result.action.reply == "550 5.7.1 missing Date header"


async def test_scores_are_configurable() -> None:
    """Each problem adds its own score, once per header for missing and duplicate."""
    scores = Scores(missing=1.5, duplicate=0.25, future_date=7.0)
    data = message(
        "Subject: a",
        "Subject: b",
        "To: x@example.com",
        "To: y@example.com",
        "Date: Fri, 24 Nov 2023 22:13:20 +0000",
    )
    result = await run(data, Options(scores=scores))
    assert result.reason == (
        "missing From header; duplicate To header; duplicate Subject header; Date is 10 days in the future"
    )
    assert result.score == 1.5 + 0.25 + 0.25 + 7.0


@pytest.mark.parametrize(
    ("skip", "data"),
    [
        ("no_headers", b"\r\nbody\r\n"),
        ("missing", message("Subject: x")),
        ("duplicate", clean("Subject: again")),
        ("bad_from", clean(sender="undisclosed-recipients:;")),
        ("from_count", clean(sender="a@example.com, b@example.com")),
        ("bad_date", clean(date="yesterday")),
        ("future_date", clean(date="Fri, 24 Nov 2023 22:13:20 +0000")),
        ("past_date", clean(date="Sat, 14 Oct 2023 22:13:20 +0000")),
    ],
)
async def test_skip_tests_turns_single_problems_off(skip: str, data: bytes) -> None:
    """A problem in skip_tests is not looked for; the same message fails without the skip."""
    assert (await run(data)).verdict is Verdict.FAIL
    options = build_settings(Options, {"skip_tests": [skip]}, source="t.toml", table="checks.headers")
    assert (await run(data, options)).verdict is Verdict.PASS


async def test_required_and_singular_lists_are_configurable() -> None:
    """Own lists, matched case-insensitively, reported with the configured spelling."""
    options = Options(required=("From", "Date", "message-id", "To"), singular=("x-mailer",))
    data = message(
        "From: a@example.com", f"Date: {NOW_DATE}", "To: b@example.org", "X-Mailer: a", "X-MAILER: b"
    )
    result = await run(data, options)
    assert result.reason == "missing message-id header; duplicate x-mailer header"
    assert (await run(clean("Subject: two"), Options(singular=()))).verdict is Verdict.PASS


async def test_repeated_names_in_the_lists_are_reported_once() -> None:
    """ "Subject" and "SUBJECT" in singular are one rule."""
    result = await run(clean("Subject: two"), Options(singular=("Subject", "SUBJECT")))
    assert result.reason == "duplicate Subject header"


async def test_without_required_from_a_missing_from_is_not_a_problem() -> None:
    """From is looked at only when present; an absent From fails only when required."""
    data = message("To: b@example.org", f"Date: {NOW_DATE}")
    assert (await run(data, Options(required=("Date",)))).verdict is Verdict.PASS


async def test_the_defaults_match_the_manual() -> None:
    """The defaults the docstring and the example configuration describe."""
    options = Options()
    assert options.required == ("From", "Date")
    assert options.singular == (
        "From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "Date",
        "Message-ID", "In-Reply-To", "References",
    )  # fmt: skip
    assert (options.future, options.past) == (2 * DAY, 15 * DAY)
    assert (options.action, options.reject_code, options.reject_dsn) == ("reject", 554, "5.6.0")


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"required": ["From:"]}, "not a header field name"),
        ({"singular": ["Reply To"]}, "not a header field name"),
        ({"required": [""]}, "not a header field name"),
        ({"skip_tests": ["dates"]}, "skip_tests"),
        ({"action": "quarantine"}, "action"),
        ({"reject_code": 250}, "reject_code"),
        ({"reject_code": 554, "reject_dsn": "4.6.0"}, "reject_dsn"),
        ({"reject_dsn": "5.6"}, "reject_dsn"),
        ({"future": "-1d"}, "future"),
        ({"past": "soon"}, "past"),
        ({"scores": {"missng": 1.0}}, "missng"),
        ({"reject": ["missing"]}, "reject"),
    ],
)
def test_bad_options_are_configuration_errors(table: dict[str, object], error: str) -> None:
    """Every bad value is refused at load time, naming what is wrong."""
    with pytest.raises(ConfigError, match=error):
        build_settings(Options, table, source="mxward.toml", table="checks.headers")


def test_options_from_toml_values() -> None:
    """Durations and lists as written in the file."""
    options = build_settings(
        Options,
        {"future": "6h", "past": "30d", "required": ["From"], "scores": {"missing": 1.0}},
        source="mxward.toml",
        table="checks.headers",
    )
    assert (options.future, options.past, options.required) == (6 * 3600, 30 * DAY, ("From",))
    assert options.scores.missing == 1.0


# ---------------------------------------------------------------------------------------------
# Malformed input never raises


async def test_without_a_message_the_check_skips() -> None:
    """A transaction with no message (not the content stage) is a skip."""
    check = HeadersCheck(Options(), services(FrozenClock(NOW)))
    result = await check.check(Stage.CONTENT, Transaction(stage=Stage.CONTENT))
    assert result.verdict is Verdict.SKIP


@pytest.mark.parametrize(
    "data",
    [
        b"From: \xff\xfe\x00\x01 <a@\xc3\x28.example>\r\nDate: \xff\xff\xff\r\n\r\n",
        b"From: a@example.com\x00\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\x00\r\n\r\nbo\x00dy",
        b"\x00\x00\x00",
        b"From a@b Tue Nov 14 22:13:20 2023\nFrom: a@example.com\nDate: " + NOW_DATE.encode() + b"\n\nbody\n",
        b"From:\r\nDate:\r\n\r\n",
        b": no name\r\n\r\n",
        b"From: " + b"(" * 100_000 + b"\r\n\r\n",
        b"From: " + b"\\" * 100_001 + b"\r\n\r\n",
        b"From: " + b'"' * 100_001 + b"\r\n\r\n",
        b"From: " + b"a@example.com, " * 50_000 + b"\r\nDate: " + b"1 " * 50_000 + b"\r\n\r\n",
        b"From: <" * 10_000 + b"\r\n\r\n",
        b"Subject: x\r\n" * 100_000 + b"\r\n",
        b"X: " + b"y" * 2_000_000 + b"\r\n\r\n",
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000 " + b"(" * 5000 + b")" * 5000 + b"\r\n\r\n",
        b"Date: Tue, 14 Nov 99999 22:13:20 +0000\r\nFrom: a@example.com\r\n\r\n",
        b"Date: Tue, 14 Nov 0000 22:13:20 +0000\r\nFrom: a@example.com\r\n\r\n",
    ],
)
async def test_malformed_messages_never_raise(data: bytes) -> None:
    """NUL bytes, 8-bit junk, huge and deeply nested fields: a verdict, never an exception."""
    result = await asyncio.wait_for(run(data), timeout=10)
    assert result.verdict in (Verdict.PASS, Verdict.FAIL)


async def test_random_bytes_never_raise() -> None:
    """Fuzz: random header bytes from a hostile alphabet always give a verdict."""
    rng = random.Random(5322)
    alphabet = b'From:Date: <>@,;:."()[]\\\r\n\t\x00\xff\xc3\xa9aZ09+-'
    for _ in range(400):
        data = b"From: " + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        data += b"\r\nDate: " + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) + b"\r\n\r\n"
        result = await run(data)
        assert result.verdict in (Verdict.PASS, Verdict.FAIL)


async def test_a_huge_header_section_is_checked_in_reasonable_time() -> None:
    """20 000 fields, a From of 500 kB, a From list of 1500 addresses: linear work, well within
    the check's budget."""
    filler = [f"X-Filler-{i}: {i}" for i in range(20_000)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await run(message(*filler, "From: " + "a" * 500_000 + "@example.com"))
    assert result.reason == "missing Date header; From header is not a valid address list"
    many = ", ".join(f"user{i}@example.com" for i in range(1500))
    result = await run(message(*filler, f"From: {many}", f"Date: {NOW_DATE}"))
    assert result.reason == "From header has 1500 addresses and no Sender header"
    assert loop.time() - start < HeadersCheck.timeout


# ---------------------------------------------------------------------------------------------
# The date and address readers


@pytest.mark.parametrize(
    ("text", "stamp"),
    [
        ("Tue, 14 Nov 2023 22:13:20 +0000", NOW),
        ("14 Nov 2023 22:13:20 +0000", NOW),
        ("Tue,14 Nov 2023 22:13:20 +0000", NOW),
        ("tue, 14 nov 2023 22:13:20 +0000", NOW),
        ("Tuesday, 14 November 2023 22:13:20 +0000", NOW),
        ("Tue, 14 Nov 2023 22:13 +0000", NOW - 20),
        ("Tue, 14 Nov 23 22:13:20 GMT", NOW),
        ("Tue, 14 Nov 2023 22:13:20 UT", NOW),
        ("Tue, 14 Nov 2023 22:13:20 Z", NOW),
        ("Tue, 14 Nov 2023 22:13:20 -0000", NOW),
        ("Tue, 14 Nov 2023 22:13:20", NOW),
        ("Tue, 14 Nov 2023 22:13:20 CET", NOW),
        ("Tue, 14 Nov 2023 17:13:20 EST", NOW),
        ("Tue, 14 Nov 2023 18:13:20 EDT", NOW),
        ("Tue, 14 Nov 2023 14:13:20 PST", NOW),
        ("Wed, 15 Nov 2023 07:43:20 +0930", NOW),
        ("Tue, 14 Nov 2023 12:13:20 -1000", NOW),
        ("Tue, 14 Nov 2023 22:13:20 +0000 (UTC)", NOW),
        ("(sent) Tue, 14 Nov 2023 (a (nested) comment) 22:13:20 +0000", NOW),
        ("  Tue ,  14  Nov  2023  22 : 13 : 20  +0000  ", NOW),
        ("Tue, 14 Nov 2023 22:13:60 +0000", NOW + 39),
        ("Mon, 14 Nov 2023 22:13:20 +0000", NOW),  # wrong day of week: not our business
        ("Thu, 01 Jan 1970 00:00:00 +0000", 0.0),
        ("Sat, 1 Jan 00 00:00:00 +0000", 946684800.0),
        ("Fri, 1 Jan 99 00:00:00 +0000", 915148800.0),
        ("Fri, 1 Jan 099 00:00:00 +0000", 915148800.0),
    ],
)
def test_dates_in_every_rfc_5322_form(text: str, stamp: float) -> None:
    """Current and obsolete RFC 5322 forms give the right instant."""
    assert parse_date(text) == stamp


@pytest.mark.parametrize(
    "text",
    [
        "",
        "now",
        "2023-11-14 22:13:20",
        "Tue, 14 Nov 2023",
        "Tue, 14 Nov 2023 22:13:20 +00000",
        "Tue, 14 Nov 2023 22:13:20 +00",
        "Tue, 14 Nov 2023 22:13:20 +0060",
        "Tue, 14 Nov 2023 22:13:20 GMT+0100",
        "Tue, 14 Nov 2023 22:13:20 PST8PDT",
        "Xyz, 14 Nov 2023 22:13:20 +0000",
        "Tu, 14 Nov 2023 22:13:20 +0000",
        "Tue, 14 Nvm 2023 22:13:20 +0000",
        "Tue, 29 Feb 2023 22:13:20 +0000",
        "Tue, 14 Nov 1899 22:13:20 +0000",
        "Tue, 14 Nov 2023 22:13:61 +0000",
        "Tue, 14 Nov 2023 22:60:20 +0000",
        "Tue, 14 Nov 2023 22:13:20 +0000 (unclosed",
        "Tue, 14 Nov 2023 22:13:20 +0000 )",
        "Tue 14 Nov 2023 22:13:20 +0000 extra",
        "Tue, 14 Nov 2023 22:13:20 +0000\x00",
        "x" * 5000,
    ],
)
def test_dates_that_are_not_dates(text: str) -> None:
    """Anything outside RFC 5322's forms is None, never an exception."""
    assert parse_date(text) is None


@pytest.mark.parametrize(
    ("text", "mailboxes", "group", "valid"),
    [
        ("a@example.com", 1, False, True),
        ("a@example.com, b@example.com", 2, False, True),
        ("A <a@example.com>, ,, B <b@example.com>", 2, False, True),
        ("Team: a@example.com, b@example.com;", 2, True, True),
        ("Team:;, c@example.com", 1, True, True),
        ("first.last@example.com", 1, False, True),
        ("first . last @ example . com", 1, False, True),
        ("A. B. <ab@example.com>", 1, False, True),
        ("", 0, False, True),
        ("(just a comment)", 0, False, True),
        (".a@example.com", 1, False, True),
        ("a@example..com", 0, False, False),
        ("a@.example.com", 0, False, False),
        ("a@", 0, False, False),
        ("@example.com", 0, False, False),
        ("<a@example.com", 0, False, False),
        ("a@example.com>", 0, False, False),
        ("Team: a@example.com", 0, True, False),
        ("a@[192.0.2.1", 0, False, False),
        ("a@[192.0.[2.1]", 0, False, False),
        ("a\\b@example.com", 0, False, False),
        ('"a\x07"@example.com', 0, False, False),
        ('"a\\\x00"@example.com', 0, False, False),
        ("(a\x00) a@example.com", 0, False, False),
        ("a@example.com\x7f", 0, False, False),
    ],
)
def test_address_lists(text: str, mailboxes: int, group: bool, valid: bool) -> None:
    """Mailbox counts, groups and errors of RFC 5322 address lists."""
    parsed = parse_mailbox_list(text)
    assert (parsed.error == "") is valid, parsed.error
    if valid:
        assert (parsed.mailboxes, parsed.group) == (mailboxes, group)


# ---------------------------------------------------------------------------------------------
# Through the pipeline


async def test_the_pipeline_refuses_with_every_reason_at_the_content_stage() -> None:
    """The forced action wins at CONTENT: 554 5.6.0 with the problems, in order."""
    check = HeadersCheck(Options(), services(FrozenClock(NOW)))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=2.0)], PipelineSettings(reject_stage=Stage.CONTENT))
    data = message("From: a@example.com, b@example.com", "Subject: a", "Subject: b")
    tx = Transaction(stage=Stage.CONTENT, message=Message.parse(data))
    deadline = asyncio.get_running_loop().time() + 5
    results = await pipeline.run([Stage.CONTENT], tx, deadline)
    decision = pipeline.decide(Stage.CONTENT, results)
    assert decision.action.reply == (
        "554 5.6.0 missing Date header; duplicate Subject header; "
        "From header has 2 addresses and no Sender header"
    )
    assert decision.score == 9.0
    assert tx.facts["headers.problems"] == "missing:Date,duplicate:Subject,from_count"


async def test_the_pipeline_scores_a_message_in_score_mode() -> None:
    """With action = "score" the summed score decides: below the threshold nothing happens."""
    check = HeadersCheck(Options(action="score"), services(FrozenClock(NOW)))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=2.0)], PipelineSettings(reject_stage=Stage.CONTENT))
    tx = Transaction(stage=Stage.CONTENT, message=Message.parse(clean("Subject: two")))
    results = await pipeline.run([Stage.CONTENT], tx, asyncio.get_running_loop().time() + 5)
    decision = pipeline.decide(Stage.CONTENT, results)
    assert decision.action.kind is ActionKind.DUNNO
    assert decision.score == 3.0

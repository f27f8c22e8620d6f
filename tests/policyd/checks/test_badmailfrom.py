"""badmailfrom: local sender lists from the configuration and from a file."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from mxward.policyd.checks.badmailfrom import BadmailfromCheck, Entry, Options, parse_line
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import ActionKind, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

SENDERS = (
    "spammer@bad.test Go away",
    "@bad.test",
    "@.sub.test Subdomains only",
    "/^[0-9]{6,}@/ Numbered senders are not welcome",
)
ENTRIES = (Entry(match="boss@example.com", reason="Not you"), Entry(match="@plain.test"))


def services() -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",))),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(),
    )


def tx(sender: str) -> Transaction:
    return Transaction(stage=Stage.MAIL, client_address="127.0.3.2", sender=sender)


async def run(sender: str, **kw: Any) -> Result:
    kw.setdefault("senders", SENDERS)
    kw.setdefault("entries", ENTRIES)
    check = BadmailfromCheck(Options(**kw), services())
    await check.start()
    return await check.check(Stage.MAIL, tx(sender))


DEFAULT = "Your envelope sender is in my badmailfrom list"


@pytest.mark.parametrize(
    ("sender", "entry", "reason"),
    [
        ("spammer@bad.test", "spammer@bad.test", "Go away"),
        ("other@bad.test", "@bad.test", DEFAULT),
        ("Other@BAD.test.", "@bad.test", DEFAULT),
        ("x@mail.bad.test", None, ""),
        ("x@a.sub.test", "@.sub.test", "Subdomains only"),
        ("x@deep.a.sub.test", "@.sub.test", "Subdomains only"),
        ("x@sub.test", None, ""),
        ("1234567@any.example", "/^[0-9]{6,}@/", "Numbered senders are not welcome"),
        ("12345@any.example", None, ""),
        ("BOSS@Example.COM", "boss@example.com", "Not you"),
        ("anyone@plain.test", "@plain.test", DEFAULT),
        ("alice@example.com", None, ""),
    ],
)
async def test_entries(sender: str, entry: str | None, reason: str) -> None:
    """Exact addresses, whole domains, subdomains only, regular expressions; case-insensitive."""
    r = await run(sender)
    if entry is None:
        assert (r.verdict, r.score, r.facts) == (Verdict.PASS, 0.0, {"badmailfrom.listed": False})
        return
    assert (r.verdict, r.score, r.reason) == (Verdict.FAIL, 10.0, reason)
    assert r.log == {"match": entry, "source": "config"}
    assert r.facts == {"badmailfrom.listed": True}
    assert r.action is None


async def test_the_null_sender_is_never_checked() -> None:
    """<> is skipped even when a regex would match everything."""
    r = await run("", senders=("/.*/",))
    assert (r.verdict, r.score, dict(r.log)) == (Verdict.SKIP, 0.0, {"note": "null sender"})


async def test_no_entries_skips() -> None:
    """An empty list has nothing to say."""
    r = await run("a@b.test", senders=(), entries=())
    assert (r.verdict, dict(r.log)) == (Verdict.SKIP, {"note": "no entries"})


async def test_reject_at_once() -> None:
    """action = reject answers 550 5.7.1 with the entry's reason; score and reason stay."""
    r = await run("spammer@bad.test", action="reject", score=3.0)
    assert r.action is not None
    assert (r.action.kind, r.action.code, r.action.dsn, r.action.text) == (
        ActionKind.REJECT,
        550,
        "5.7.1",
        "Go away",
    )
    assert r.score == 3.0


@pytest.mark.parametrize(
    ("line", "entry", "reason"),
    [
        ("user@example.com", "user@example.com", ""),
        ("  @example.com   Go  away  ", "@example.com", "Go  away"),
        ("/a b/ spaces in a regex", "/a b/", "spaces in a regex"),
        ("/a/b/ slash inside", "/a/b/", "slash inside"),
    ],
)
def test_line_syntax(line: str, entry: str, reason: str) -> None:
    """ "entry [reason]": the first word (or /regex/) is the entry, the rest its reason."""
    rule = parse_line(line, "config")
    assert rule is not None and (rule.entry, rule.reason) == (entry, reason)


@pytest.mark.parametrize("line", ["", "   ", "# a comment"])
def test_blank_and_comment_lines(line: str) -> None:
    """Blank lines and # comments are no entries."""
    assert parse_line(line, "file:1") is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"senders": ["user@"]}, "is not an entry"),
        ({"senders": ["example.com"]}, "is not an entry"),
        ({"senders": ["/[/ bad"]}, "not a valid regular expression"),
        ({"entries": [{"match": "@"}]}, "is not an entry"),
        ({"entries": [{"reason": "no match"}]}, "is not an entry"),
        ({"reason": " "}, "reason must not be empty"),
        ({"reject_code": 450}, "reject_code must be 5xx"),
        ({"action": "defer"}, "is not valid"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Mistakes in [checks.badmailfrom] are reported at start."""
    with pytest.raises(ConfigError, match=message):
        build_settings(Options, table, source="mxward.toml", table="checks.badmailfrom")


def test_entries_come_from_toml_tables_and_strings() -> None:
    """senders = [strings], entries = [{match, reason}] both load."""
    opts = build_settings(
        Options,
        {"senders": "@bad.test Go away", "entries": [{"match": "/^x/", "reason": "No x"}]},
        source="mxward.toml",
        table="checks.badmailfrom",
    )
    assert opts.senders == ("@bad.test Go away",)
    assert opts.entries == (Entry(match="/^x/", reason="No x"),)


# ------------------------------------------------------------------------------------------
# the file


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_the_file_is_read_and_reread_when_it_changes(tmp_path: Path) -> None:
    """Entries from the file count; a new version is picked up at the next request."""
    path = tmp_path / "badmailfrom"
    write_atomically(path, "# senders we refuse\n@first.test First\n")
    check = BadmailfromCheck(Options(file=str(path)), services())
    await check.start()
    first = await check.check(Stage.MAIL, tx("a@first.test"))
    assert (first.reason, first.log["source"]) == ("First", "file:2")
    write_atomically(path, "@second.test Second\n")
    assert (await check.check(Stage.MAIL, tx("a@first.test"))).verdict is Verdict.PASS
    assert (await check.check(Stage.MAIL, tx("a@second.test"))).reason == "Second"


async def test_configuration_entries_come_before_the_files(tmp_path: Path) -> None:
    """The same entry in both: the configuration's reason is used."""
    path = tmp_path / "badmailfrom"
    path.write_text("@bad.test From the file\n@file.test Only in the file\n")
    r = await run("x@bad.test", senders=("@bad.test From the config",), entries=(), file=str(path))
    assert r.reason == "From the config"
    assert (await run("x@file.test", file=str(path))).reason == "Only in the file"


async def test_a_bad_line_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A regex that does not compile loses its line only."""
    path = tmp_path / "badmailfrom"
    path.write_text("/[unclosed/ Broken\n@good.test Good\n")
    with caplog.at_level(logging.WARNING, logger="mxward.checks.badmailfrom"):
        r = await run("x@good.test", senders=(), entries=(), file=str(path))
    assert r.reason == "Good"
    assert "line 1 skipped" in caplog.text


async def test_an_unreadable_file_keeps_the_last_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file disappearing is a warning, once; the entries read before stay."""
    path = tmp_path / "badmailfrom"
    path.write_text("@gone.test Still refused\n")
    check = BadmailfromCheck(Options(file=str(path)), services())
    await check.start()
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="mxward.checks.badmailfrom"):
        first = await check.check(Stage.MAIL, tx("x@gone.test"))
        await check.check(Stage.MAIL, tx("x@gone.test"))
    assert first.reason == "Still refused"
    assert caplog.text.count("cannot be read") == 1


async def test_a_missing_file_at_start_leaves_the_configured_entries(tmp_path: Path) -> None:
    """No file yet: the configuration's entries still work, and the file is read once it exists."""
    path = tmp_path / "badmailfrom"
    check = BadmailfromCheck(Options(senders=("@bad.test",), file=str(path)), services())
    await check.start()
    assert (await check.check(Stage.MAIL, tx("x@bad.test"))).verdict is Verdict.FAIL
    assert (await check.check(Stage.MAIL, tx("x@late.test"))).verdict is Verdict.PASS
    path.write_text("@late.test\n")
    assert (await check.check(Stage.MAIL, tx("x@late.test"))).verdict is Verdict.FAIL

"""The decision line: one key=value line per request that a log reader can split back apart."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mxward.shared.logs import _SAFE, _safe, decision_line, kv
from mxward.shared.plugin import DUNNO, Action, Decision, Result, Stage, Transaction, Verdict

_TOKEN = re.compile(r' ?([a-z]+)=("(?:[^"\\]|\\.)*"|[^ "]*)')


_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)")
_NAMED = {"t": "\t", "n": "\n", "r": "\r"}


def _unescape(match: re.Match[str]) -> str:
    code = match.group(1)
    if len(code) > 1:
        return chr(int(code[1:], 16))
    return _NAMED.get(code, code)


def parse_line(line: str) -> dict[str, str]:
    """Split a decision line into its values: what a log reader (or a grep) does with it."""
    assert line.startswith("decision ")
    values: dict[str, str] = {}
    pos = len("decision")
    while pos < len(line):
        match = _TOKEN.match(line, pos)
        assert match is not None, f"cannot split {line[pos:]!r}"
        key, raw = match.groups()
        if raw.startswith('"'):
            raw = _ESCAPE.sub(_unescape, raw[1:-1])
        values[key] = raw
        pos = match.end()
    return values


def line_for(**fields: str) -> str:
    tx = Transaction(
        stage=Stage.RCPT,
        client_address=fields.get("address", "192.0.2.7"),
        client_name=fields.get("name", "mx.example.net"),
        helo=fields.get("helo", "mx.example.net"),
        sender=fields.get("sender", "alice@example.net"),
        recipient=fields.get("recipient", "bob@example.com"),
        instance=fields.get("instance", "5499.6b059fa5.c0eb7.0"),
        protocol_state="RCPT",
    )
    action = Action.defer_if_permit("Greylisted, please try again in 300 seconds")
    result = Result(check="greylist", verdict=Verdict.FAIL, action=action, log={"status": "new", "wait": 300})
    decision = Decision(action=action, score=0.0, results=(result,), stage=Stage.RCPT, elapsed_ms=0.6)
    return decision_line(tx, decision, f"DEFER_IF_PERMIT 4.7.1 {action.text}")


def test_a_plain_request_is_logged_bare() -> None:
    line = line_for()
    assert line == (
        "decision instance=5499.6b059fa5.c0eb7.0 queue=- client=mx.example.net[192.0.2.7]"
        " helo=mx.example.net from=<alice@example.net> rcpt=<bob@example.com> state=RCPT"
        ' action=DEFER_IF_PERMIT score=0 checks="greylist:fail(forced,0.0ms)[status=new wait=300]"'
        ' ms=0.6 reply="DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in 300 seconds"'
    )


@pytest.mark.parametrize(
    ("field", "value", "key", "logged"),
    [
        ("helo", "", "helo", "-"),
        ("sender", "", "from", "<>"),
        ("recipient", "", "rcpt", "-"),
        ("instance", "", "instance", "-"),
        ("helo", "two words", "helo", '"two words"'),
        ("helo", 'say "hi"', "helo", r'"say \"hi\""'),
        ("helo", "back\\slash", "helo", r'"back\\slash"'),
        ("helo", "tab\there", "helo", r'"tab\there"'),
        ("helo", "nul\x00byte", "helo", r'"nul\x00byte"'),
        ("helo", "ümlaut.example", "helo", '"ümlaut.example"'),
        ("sender", "a b@example.net", "from", '"<a b@example.net>"'),
    ],
)
def test_one_unusual_value_is_quoted_and_the_others_stay_bare(
    field: str, value: str, key: str, logged: str
) -> None:
    line = line_for(**{field: value})
    assert f" {key}={logged} " in line
    assert " client=mx.example.net[192.0.2.7] " in line
    assert "\t" not in line and "\x00" not in line and "\n" not in line


@given(
    helo=st.text(max_size=40),
    sender=st.text(max_size=40),
    name=st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=20),
)
def test_every_value_comes_back_from_the_line(helo: str, sender: str, name: str) -> None:
    """Whatever the client sends, the line splits into the same keys and printable values."""
    line = line_for(helo=helo, sender=sender, name=name)
    assert line.isprintable()
    values = parse_line(line)
    keys = "instance queue client helo from rcpt state action score checks ms reply"
    assert list(values) == keys.split()
    assert values["helo"] == (helo or "-")
    assert values["from"] == f"<{sender}>"
    assert values["client"] == f"{name}[192.0.2.7]"


@pytest.mark.parametrize(
    ("value", "logged"),
    [
        (None, "-"),
        ("", "-"),
        (True, "yes"),
        (False, "no"),
        (0.25, "0.25"),
        (3, "3"),
        ("a " * 151, '"' + "a " * 150 + '..."'),
        ("x" * 400, "x" * 400),  # safe characters only: bare, however long
    ],
)
def test_kv(value: object, logged: str) -> None:
    assert kv(value) == logged  # type: ignore[arg-type]


def test_a_reused_result_shows_reused_instead_of_a_time() -> None:
    tx = Transaction(stage=Stage.RCPT, client_address="192.0.2.7", recipient="bob@example.com")
    reused = Result(check="spf", verdict=Verdict.PASS, log={"result": "pass"}, reused=True)
    timed = Result(check="greylist", verdict=Verdict.PASS, elapsed_ms=0.42)
    decision = Decision(action=DUNNO, score=0.0, results=(reused, timed), stage=Stage.RCPT)
    line = decision_line(tx, decision, "DUNNO")
    assert ' checks="spf:pass(reused)[result=pass] greylist:pass(0.4ms)" ' in line


def test_the_part_of_a_reused_result_is_the_same_each_time_and_forced_still_shows() -> None:
    tx = Transaction(stage=Stage.RCPT, client_address="192.0.2.7", recipient="bob@example.com")
    reused = Result(check="helo", verdict=Verdict.PASS, log={"tests": "rfc"}, reused=True)
    reject = Action.reject("listed", 554, "5.7.1")
    listed = Result(check="dnsbl", verdict=Verdict.FAIL, action=reject, log={"zone": "bl"}, reused=True)
    other = Result(check="helo", verdict=Verdict.PASS, log={"tests": "strict"}, reused=True)
    for _ in range(3):
        decision = Decision(action=reject, score=0.0, results=(reused, listed), stage=Stage.RCPT)
        line = decision_line(tx, decision, "554 5.7.1 listed")
        assert ' checks="helo:pass(reused)[tests=rfc] dnsbl:fail(forced,reused)[zone=bl]" ' in line
        decision = Decision(action=DUNNO, score=0.0, results=(other,), stage=Stage.RCPT)
        assert " checks=helo:pass(reused)[tests=strict] " in decision_line(tx, decision, "DUNNO")


def test_a_long_log_value_is_cut_within_its_check_and_the_later_checks_still_show() -> None:
    tx = Transaction(stage=Stage.RCPT, client_address="192.0.2.7", recipient="bob@example.com")
    wordy = Result(check="dnsbl", verdict=Verdict.PASS, log={"reason": "x" * 1000})
    results = (wordy, *(Result(check=f"check{n}", verdict=Verdict.PASS, log={"n": n}) for n in range(30)))
    decision = Decision(action=DUNNO, score=0.0, results=results, stage=Stage.RCPT)
    checks = parse_line(decision_line(tx, decision, "DUNNO"))["checks"].split(" ")
    assert len(checks) == 31
    assert checks[0].startswith("dnsbl:pass(0.0ms)[reason=xxx") and checks[0].endswith("...]")
    assert len(checks[0]) == 300
    assert checks[-1] == "check29:pass(0.0ms)[n=29]"


def test_the_kept_part_of_a_reused_result_changes_nothing_the_result_compares_or_shows() -> None:
    tx = Transaction(stage=Stage.RCPT, client_address="192.0.2.7", recipient="bob@example.com")
    reused = Result(check="spf", verdict=Verdict.PASS, log={"result": "pass"}, reused=True)
    twin = Result(check="spf", verdict=Verdict.PASS, log={"result": "pass"}, reused=True)
    decision = Decision(action=DUNNO, score=0.0, results=(reused,), stage=Stage.RCPT)
    first = decision_line(tx, decision, "DUNNO")
    assert decision_line(tx, decision, "DUNNO") == first
    assert reused == twin and repr(reused) == repr(twin)
    assert dataclasses.replace(reused, score=-1.0).score == -1.0
    assert " checks=spf:pass(-1,reused)[result=pass] " in decision_line(
        tx,
        Decision(
            action=DUNNO, score=-1.0, results=(dataclasses.replace(reused, score=-1.0),), stage=Stage.RCPT
        ),
        "DUNNO",
    )


def test_the_quick_safety_test_matches_the_safe_characters_for_every_code_point_up_to_0x3ff() -> None:
    """_safe() (string methods) and _SAFE (the definition) agree on every single character."""
    for code in range(0x400):
        ch = chr(code)
        assert _safe(ch) == (_SAFE.fullmatch(ch) is not None), repr(ch)
        assert _safe(f"a{ch}b") == (_SAFE.fullmatch(f"a{ch}b") is not None), repr(ch)


@given(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=60))
def test_the_quick_safety_test_matches_the_safe_characters_for_any_text(text: str) -> None:
    assert _safe(text) == (_SAFE.fullmatch(text) is not None)


def test_a_reply_text_is_quoted_the_same_from_the_memo() -> None:
    """The decision line keeps the logged form of reply texts: the second line equals the first."""
    tx = Transaction(stage=Stage.RCPT, client_address="192.0.2.7", instance="i1", protocol_state="RCPT")
    action = Action.defer_if_permit('Greylisted "now", retry in 300 seconds')
    decision = Decision(action=action, score=0.0, results=(), stage=Stage.RCPT)
    text = f"DEFER_IF_PERMIT 4.7.1 {action.text}"
    first = decision_line(tx, decision, text)
    assert first == decision_line(tx, decision, text)
    assert first.endswith(' reply="DEFER_IF_PERMIT 4.7.1 Greylisted \\"now\\", retry in 300 seconds"')

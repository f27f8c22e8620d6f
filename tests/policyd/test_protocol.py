"""The policy protocol codec: framing, limits, malformed input and reply formatting."""

from __future__ import annotations

import pytest

from mxward.policyd.protocol import Limits, ProtocolError, RequestParser, action_text, format_reply
from mxward.shared.plugin import DUNNO, Action

REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\n"
    b"sender=alice@example.net\nrecipient=bob@example.com\ninstance=1.2.3.0\n\n"
)


def test_one_request_is_parsed_into_attributes() -> None:
    """A complete request yields its name=value attributes."""
    [attrs] = RequestParser().feed(REQUEST)
    assert attrs["protocol_state"] == "RCPT"
    assert attrs["recipient"] == "bob@example.com"


def test_many_requests_in_one_read_come_out_in_order() -> None:
    """Several requests in one read are returned in the order sent."""
    second = REQUEST.replace(b"bob@", b"carol@")
    out = RequestParser().feed(REQUEST + second)
    assert [a["recipient"] for a in out] == ["bob@example.com", "carol@example.com"]


@pytest.mark.parametrize("cut", [1, 10, 40, len(REQUEST) - 2, len(REQUEST) - 1])
def test_a_request_split_across_reads_is_reassembled(cut: int) -> None:
    """A request arriving in two pieces is parsed once the empty line arrives."""
    parser = RequestParser()
    assert parser.feed(REQUEST[:cut]) == []
    assert parser.pending == cut
    [attrs] = parser.feed(REQUEST[cut:])
    assert attrs["sender"] == "alice@example.net"
    assert parser.pending == 0


def test_crlf_line_ends_are_accepted_even_split_between_cr_and_lf() -> None:
    """Requests typed by hand with CR LF work, also when a read ends between CR and LF."""
    crlf = REQUEST.replace(b"\n", b"\r\n")
    parser = RequestParser()
    cut = crlf.index(b"\r\n") + 1
    assert parser.feed(crlf[:cut]) == []
    [attrs] = parser.feed(crlf[cut:])
    assert attrs["client_address"] == "192.0.2.7"


def test_empty_values_and_equals_signs_in_values_are_kept() -> None:
    """``sender=`` is the null sender, and a value may itself contain '='."""
    [attrs] = RequestParser().feed(b"request=smtpd_access_policy\nsender=\nccert_subject=CN=x=y\n\n")
    assert attrs["sender"] == ""
    assert attrs["ccert_subject"] == "CN=x=y"


def test_utf8_values_are_decoded_and_invalid_bytes_survive() -> None:
    """SMTPUTF8 addresses decode; bytes that are not UTF-8 do not crash the parser."""
    [attrs] = RequestParser().feed(
        "request=smtpd_access_policy\nsender=zoë@exämple.net\nhelo_name=\xff\n\n".encode().replace(
            b"\xc3\xbf", b"\xff"
        )
    )
    assert attrs["sender"] == "zoë@exämple.net"
    assert attrs["helo_name"] == "\udcff"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"request=smtpd_access_policy\ngarbage line\n\n", "not name=value"),
        (b"request=smtpd_access_policy\n=value\n\n", "not name=value"),
        (b"request=other\n\n", "expected smtpd_access_policy"),
        (b"protocol_state=RCPT\n\n", "expected smtpd_access_policy"),
        (b"\n\n", "empty line"),
        (b"request=smtpd_access_policy\nsender=a\x00b\n\n", "NUL"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not name=value"),
        # As many "=" as lines, but one line has two and another none: still line 3's fault.
        (b"request=smtpd_access_policy\nsender=prvs=a@b\nnoequals\n\n", "line 3 is not name=value"),
        (b"noequals\nrequest=smtpd_access_policy\nsasl_method=a=b\n\n", "line 1 is not name=value"),
    ],
)
def test_malformed_requests_raise_protocol_error(data: bytes, message: str) -> None:
    """Input Postfix would never send is refused with a reason."""
    with pytest.raises(ProtocolError, match=message):
        RequestParser().feed(data)


def test_overlong_line_is_refused_before_the_request_ends() -> None:
    """A line over the limit is refused as soon as it is seen, without waiting for more."""
    parser = RequestParser(Limits(max_line_length=100))
    with pytest.raises(ProtocolError, match="line longer"):
        parser.feed(b"request=smtpd_access_policy\nsender=" + b"a" * 200)


def test_too_many_attributes_are_refused() -> None:
    """More attributes than the limit make the request invalid."""
    body = b"".join(b"a%d=x\n" % i for i in range(20))
    with pytest.raises(ProtocolError, match="more than 10 attributes"):
        RequestParser(Limits(max_attributes=10)).feed(b"request=smtpd_access_policy\n" + body + b"\n")


def test_oversized_request_is_refused_without_terminator() -> None:
    """A request growing past the size limit is refused even before it is complete."""
    parser = RequestParser(Limits(max_request_size=1000, max_line_length=100))
    with pytest.raises(ProtocolError, match="larger than 1000"):
        for _ in range(50):
            parser.feed(b"name=" + b"v" * 50 + b"\n")


@pytest.mark.parametrize(
    ("action", "header", "expected"),
    [
        (DUNNO, "", "DUNNO"),
        (DUNNO, "X-Greylist: delayed 300 seconds", "PREPEND X-Greylist: delayed 300 seconds"),
        (
            Action.defer_if_permit("Greylisted, try in 300 seconds"),
            "",
            "DEFER_IF_PERMIT 4.7.1 Greylisted, try in 300 seconds",
        ),
        (Action.defer("Try later", 451, "4.3.0"), "", "451 4.3.0 Try later"),
        (Action.reject("Go away"), "x", "550 5.7.1 Go away"),
    ],
)
def test_action_text_always_has_code_enhanced_code_and_text(
    action: Action, header: str, expected: str
) -> None:
    """Each decision kind becomes the right action; a header is only prepended to DUNNO."""
    assert action_text(action, header) == expected


def test_reply_text_is_one_printable_line() -> None:
    """CR, LF and other control characters in a text never reach Postfix."""
    text = action_text(Action.reject("bad\r\naction=OK\n\nx\x00y"))
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert format_reply(text).count(b"\n") == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"code": 0, "dsn": "4.7.1", "text": "x"}, "needs a code"),
        ({"code": 450, "dsn": "", "text": "x"}, "needs a code"),
        ({"code": 450, "dsn": "4.7.1", "text": ""}, "needs a code"),
        ({"code": 450, "dsn": "5.7.1", "text": "x"}, "disagree"),
    ],
)
def test_actions_without_code_dsn_or_text_cannot_be_built(kwargs: dict[str, object], message: str) -> None:
    """An empty or bare-code action would silently accept, so it is refused at construction."""
    from mxward.shared.plugin import ActionKind

    with pytest.raises(ValueError, match=message):
        Action(ActionKind.DEFER, **kwargs)  # type: ignore[arg-type]


def test_long_reply_text_is_bounded() -> None:
    """A check's long reason is cut to fit Postfix's 510-byte reply, whatever made the action."""
    text = action_text(Action.reject("x" * 2000))
    assert text.startswith("550 5.7.1 xxx") and text.endswith("...")
    assert len(text) <= len("550 5.7.1 ") + 400

"""The message view: header fields split once, MIME parts, text and URLs computed on demand,
and rewrite() that changes nothing but the fields it is told to.

Messages are written out in each test, so the bytes under test are in view. Fuzzing and the
limits on hostile input are in test_message_fuzz.py.
"""

from __future__ import annotations

import base64
import dataclasses
import time

import pytest

from mxward.contentfilter import message as message_module
from mxward.contentfilter.message import (
    MAX_DEPTH,
    MAX_PARTS,
    MAX_TEXT,
    MAX_URLS,
    Header,
    Message,
    Part,
    decode_words,
)


def crlf(text: str) -> bytes:
    """A message written with \\n line ends, sent with CRLF ones."""
    return text.replace("\n", "\r\n").encode()


SIMPLE = crlf(
    "Received: from a.example (a.example [192.0.2.1])\n"
    "\tby mx.example.org; Mon, 1 Jan 2024 10:00:00 +0000\n"
    "Received: from b.example by a.example\n"
    "From: Alice <alice@example.com>\n"
    "To: bob@example.org\n"
    "Subject: Hello\n"
    "\n"
    "Body line 1\n"
    "Body line 2\n"
)


# ---------------------------------------------------------------------------------------------
# Header fields


def test_fields_are_split_with_name_value_and_raw_bytes() -> None:
    """Each field keeps its name as written, its unfolded value and its exact bytes."""
    m = Message.parse(SIMPLE)
    assert [h.name for h in m.headers] == ["Received", "Received", "From", "To", "Subject"]
    assert m.headers[0].value == (
        "from a.example (a.example [192.0.2.1])\tby mx.example.org; Mon, 1 Jan 2024 10:00:00 +0000"
    )
    assert m.headers[0].raw == (
        b"Received: from a.example (a.example [192.0.2.1])\r\n"
        b"\tby mx.example.org; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
    )
    assert m.headers[4] == Header("Subject", "Hello", b"Subject: Hello\r\n")
    assert b"".join(h.raw for h in m.headers) + b"\r\n" + m.body == SIMPLE
    assert m.body == b"Body line 1\r\nBody line 2\r\n"
    assert m.body_offset == SIMPLE.index(b"Body")
    assert m.size == len(SIMPLE)
    assert m.raw is SIMPLE
    assert m.defects == ()


def test_header_is_frozen() -> None:
    """Header values cannot be changed by one check under another's feet."""
    header = Message.parse(SIMPLE).headers[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        header.value = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "name", "value"),
    [
        (b"Subject: plain\r\n", "Subject", "plain"),
        (b"Subject:no space\r\n", "Subject", "no space"),
        (b"Subject:   many spaces  \r\n", "Subject", "many spaces  "),
        (b"Subject:\r\n starts on the next line\r\n", "Subject", "starts on the next line"),
        (b"Subject: one\r\n two\r\n\tthree\r\n", "Subject", "one two\tthree"),
        (b"Subject : space before the colon\r\n", "Subject", "space before the colon"),
        (b"X-Empty:\r\n", "X-Empty", ""),
        (b"X-Colons: a:b::c\r\n", "X-Colons", "a:b::c"),
        (b"x-lower-CASE: v\r\n", "x-lower-CASE", "v"),
        (b"Subject: bare\n lf folding\n", "Subject", "bare lf folding"),
        (b"Subject: stray\rcr\r\n", "Subject", "stray\rcr"),
    ],
)
def test_field_forms(field: bytes, name: str, value: str) -> None:
    """Folding, spacing and odd but valid forms give the unfolded value."""
    m = Message.parse(field + b"\r\nbody")
    assert len(m.headers) == 1
    assert (m.headers[0].name, m.headers[0].value, m.headers[0].raw) == (name, value, field)
    assert m.body == b"body"


def test_lookups_ignore_case() -> None:
    """get, get_all, count and indexes find fields by name in any case."""
    m = Message.parse(SIMPLE)
    assert m.get("SUBJECT") == "Hello"
    assert m.get("received") == m.headers[0].value
    assert m.get_all("ReCeIvEd") == [m.headers[0].value, "from b.example by a.example"]
    assert m.count("received") == 2
    assert m.indexes("RECEIVED") == [0, 1]
    assert m.headers[2].lname == "from"
    assert m.get("X-Missing") is None
    assert m.get_all("X-Missing") == []
    assert m.count("X-Missing") == 0
    assert m.indexes("X-Missing") == []
    assert m.decoded("X-Missing") is None


def test_indexes_returns_a_copy() -> None:
    """Changing a returned list does not change later answers."""
    m = Message.parse(SIMPLE)
    m.indexes("received").append(99)
    assert m.indexes("received") == [0, 1]


def test_8bit_junk_in_values_is_kept_losslessly() -> None:
    """UTF-8 reads as text; other bytes survive as surrogate escapes, so no byte is lost."""
    junk = b"Subject: caf\xc3\xa9 \xff\xfe\x80 end\r\nX-\xe9t\xe9: latin-1 name\r\n\r\nbody"
    m = Message.parse(junk)
    assert m.headers[0].value.startswith("café ")
    assert m.headers[0].value.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff\xfe\x80 end"
    assert m.headers[1].name.encode("ascii", "surrogateescape") == b"X-\xe9t\xe9"
    assert m.rewrite() == junk


def test_nul_bytes() -> None:
    """NUL bytes are kept; in the header they are a header defect, in the body a body one."""
    in_header = Message.parse(b"Subject: a\x00b\r\n\r\nbody")
    assert in_header.get("subject") == "a\x00b"
    assert in_header.header_defects == ("nul-byte",)
    in_body = Message.parse(b"Subject: a\r\n\r\nbo\x00dy")
    assert in_body.header_defects == ()
    assert in_body.defects == ("nul-byte",)
    assert in_body.parts[0].payload == b"bo\x00dy"


def test_bare_lf_line_ends() -> None:
    """A message with LF line ends parses like one with CRLF, with the defect noted."""
    data = SIMPLE.replace(b"\r\n", b"\n")
    m = Message.parse(data)
    assert [h.value for h in m.headers] == [h.value for h in Message.parse(SIMPLE).headers]
    assert m.headers[4].raw == b"Subject: Hello\n"
    assert m.body == b"Body line 1\nBody line 2\n"
    assert m.header_defects == ("bare-lf",)
    assert m.rewrite() == data


def test_bare_lf_in_the_body_only() -> None:
    """A bare LF in the body is a defect of the message, not of its header."""
    m = Message.parse(b"Subject: x\r\n\r\nline\nline\r\n")
    assert m.header_defects == ()
    assert m.defects == ("bare-lf",)


def test_mixed_line_ends_find_the_empty_line() -> None:
    """The header ends at the first empty line, whichever line ends surround it."""
    for data in (b"A: 1\r\nB: 2\n\nbody", b"A: 1\nB: 2\r\n\r\nbody", b"A: 1\r\nB: 2\n\r\nbody"):
        m = Message.parse(data)
        assert [h.name for h in m.headers] == ["A", "B"]
        assert m.body == b"body"


def test_empty_message() -> None:
    """An empty message has no fields, an empty body and one empty text part."""
    m = Message.parse(b"")
    assert m.headers == ()
    assert m.body_offset == 0
    assert m.body == b""
    assert m.defects == ()
    assert m.parts == (Part("text/plain", "", "", "", 0, b""),)
    assert m.text == ""
    assert m.urls == ()
    assert m.rewrite() == b""
    assert m.rewrite(prepend=["X-Spam-Flag: YES"]) == b"X-Spam-Flag: YES\r\n"


@pytest.mark.parametrize("data", [b"Subject: x\r\nFrom: y\r\n", b"Subject: x\r\nFrom: y"])
def test_header_without_body_separator(data: bytes) -> None:
    """A message that is all header has its fields and an empty body."""
    m = Message.parse(data)
    assert [h.name for h in m.headers] == ["Subject", "From"]
    assert m.get("from") == "y"
    assert m.body_offset == len(data)
    assert m.body == b""
    assert m.header_defects == ("no-body-separator",)
    assert m.rewrite() == data


def test_message_starting_with_the_empty_line_has_only_a_body() -> None:
    """An empty first line means no header at all."""
    for data, offset in ((b"\r\nSubject: not a field\r\n", 2), (b"\nbody", 1)):
        m = Message.parse(data)
        assert m.headers == ()
        assert m.body_offset == offset


def test_line_that_is_no_field_ends_the_header() -> None:
    """The first line that is neither a field nor a continuation starts the body, as in
    Postfix; nothing after it is read as a field, and every byte is kept."""
    data = crlf("Subject: x\nthis line has no colon\nFrom: hidden@example.com\n\nbody\n")
    m = Message.parse(data)
    assert [h.name for h in m.headers] == ["Subject"]
    assert m.body_offset == data.index(b"this line")
    assert m.get("from") is None
    assert m.header_defects == ("malformed-header-line",)
    assert m.rewrite() == data
    assert m.rewrite(prepend=["X-A: 1"]) == b"X-A: 1\r\n" + data


@pytest.mark.parametrize(
    "line",
    [b" starts with a space", b"\tstarts with a tab", b"Two words: no", b"Bad\x01name: x", b": no name"],
)
def test_lines_that_are_not_fields(line: bytes) -> None:
    """A leading continuation, a name with space, control character or no name at all is not a
    field."""
    data = line + b"\r\nSubject: x\r\n\r\nbody"
    m = Message.parse(data)
    assert m.headers == ()
    assert m.body_offset == 0
    assert m.header_defects == ("malformed-header-line",)
    assert m.rewrite() == data


def test_mbox_from_line_is_skipped_and_kept() -> None:
    """An mbox "From " first line is not a field; new fields go below it."""
    data = b"From alice@example.com Mon Jan  1 10:00:00 2024\r\n" + SIMPLE
    m = Message.parse(data)
    assert [h.name for h in m.headers] == ["Received", "Received", "From", "To", "Subject"]
    assert m.get("from") == "Alice <alice@example.com>"
    assert m.header_defects == ("mbox-from-line",)
    assert m.rewrite() == data
    assert m.rewrite(prepend=["X-A: 1"]) == data.replace(b"\r\nReceived", b"\r\nX-A: 1\r\nReceived", 1)


def test_from_field_with_space_before_colon_is_a_field() -> None:
    """ "From : x" on the first line is a (obsolete-syntax) field, not an mbox line."""
    m = Message.parse(b"From : alice@example.com\r\n\r\n")
    assert m.get("from") == "alice@example.com"
    assert m.header_defects == ()


def test_huge_header_block_is_parsed_up_to_the_limit() -> None:
    """5 MB of header: the fields within max_header_size are parsed, the rest kept as bytes,
    and the body still starts after the empty line."""
    field = b"X-Filler: " + b"x" * 90 + b"\r\n"
    count = 5 * 1024 * 1024 // len(field)
    data = b"Subject: first\r\n" + field * count + b"To: last@example.org\r\n\r\nthe body"
    started = time.perf_counter()
    m = Message.parse(data)
    assert time.perf_counter() - started < 2.0
    assert m.headers[0].value == "first"
    assert 1 < len(m.headers) < count
    assert sum(len(h.raw) for h in m.headers) <= 1_048_576
    assert m.get("to") is None
    assert m.body == b"the body"
    assert m.header_defects == ("header-too-large",)
    assert m.rewrite() == data
    assert m.rewrite(remove=[0]) == data[len(b"Subject: first\r\n") :]


def test_field_across_the_limit_is_not_parsed() -> None:
    """A field that does not end within max_header_size is left unparsed, with all after it."""
    data = b"A: 1\r\nB: " + b"b" * 100 + b"\r\nC: 3\r\n\r\nbody"
    m = Message.parse(data, max_header_size=50)
    assert [h.name for h in m.headers] == ["A"]
    assert m.header_defects == ("header-too-large",)
    assert m.body == b"body"
    assert m.rewrite(replace={0: "A: one"}) == data.replace(b"A: 1", b"A: one")
    exact = Message.parse(data, max_header_size=len(b"A: 1\r\nB: ") + 102)
    assert [h.name for h in exact.headers] == ["A", "B"]
    assert exact.header_defects == ("header-too-large",)
    assert [h.name for h in Message.parse(data, max_header_size=0).headers] == []


def test_overlong_lines() -> None:
    """A 1 MB header line and a 1 MB body line are read whole."""
    subject = b"Subject: " + b"s" * 1_000_000 + b"\r\n"
    body = b"b" * 1_000_000
    m = Message.parse(subject + b"\r\n" + body)
    assert len(m.get("subject") or "") == 1_000_000
    assert m.body == body
    assert m.parts[0].size == 1_000_000
    endless = Message.parse(b"X: " + b"v" * 2_000_000)
    assert endless.header_defects == ("header-too-large", "no-body-separator")
    assert endless.rewrite() == b"X: " + b"v" * 2_000_000


def test_parse_is_cheap() -> None:
    """Parsing splits the header only: a 50 KB message with 30 fields takes far less than a
    millisecond (about 40 µs on the development machines; the bound leaves room for load)."""
    fields = b"".join(b"X-Field-%d: a value of moderate length, as most are\r\n" % i for i in range(30))
    data = fields + b"\r\n" + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 850
    started = time.perf_counter()
    for _ in range(1000):
        m = Message.parse(data)
    assert time.perf_counter() - started < 1.0
    assert len(m.headers) == 30
    assert "_mime" not in vars(m)


def test_parse_accepts_bytes_like_and_refuses_text() -> None:
    """bytearray and memoryview are read as bytes; a str is a programming error."""
    assert Message.parse(bytearray(SIMPLE)).get("subject") == "Hello"
    assert Message.parse(memoryview(SIMPLE)).raw == SIMPLE
    with pytest.raises(TypeError, match="bytes, not str"):
        Message.parse("Subject: x\r\n\r\n")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# RFC 2047


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        ("plain text", "plain text"),
        ("=?utf-8?q?caf=C3=A9_au_lait?=", "café au lait"),
        ("=?UTF-8?B?Y2Fmw6k=?=", "café"),
        ("=?iso-8859-1?q?caf=E9?=", "café"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),
        ("=?utf-8?q?a?=\t =?utf-8?q?b?=", "ab"),
        ("=?utf-8?q?a?= and =?utf-8?q?b?=", "a and b"),
        ("Re: =?utf-8?b?w6k=?= !", "Re: é !"),
        ("=?utf-8*en?q?lang?=", "lang"),
        ("=?utf-8?B?Y2Fmw6k?=", "café"),  # missing padding
        ("=?x-bogus?q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8
        ("=?x-bogus?q?caf=E9?=", "café"),  # unknown charset, not UTF-8: Latin-1
        ("=?utf-8?q?broken", "=?utf-8?q?broken"),
        ("=?utf-8?x?bad encoding?=", "=?utf-8?x?bad encoding?="),
        ("=?utf-8?B?!!!?=", "=?utf-8?B?!!!?="),
        ("=?punycode?q?abc-?=", "abc-"),  # a codec that is not a mail charset: UTF-8
        ("=?gb2312?b?1tDOxA==?=", "中文"),
        ("=?utf-8?q?=FF=FE?=", "\ufffd\ufffd"),
    ],
)
def test_encoded_words(value: str, decoded: str) -> None:
    """RFC 2047 words are decoded, spaces between two of them dropped, bad ones kept."""
    assert decode_words(value) == decoded
    m = Message.parse(b"Subject: " + value.encode() + b"\r\n\r\n")
    assert m.decoded("subject") == decoded
    assert m.get("subject") == value


# ---------------------------------------------------------------------------------------------
# MIME


def test_plain_message_is_one_text_part() -> None:
    """A message that is not MIME is one text/plain part holding the body."""
    m = Message.parse(SIMPLE)
    assert m.parts == (Part("text/plain", "", "", "", len(m.body), m.body),)
    assert m.attachments == ()
    assert m.text == "Body line 1\r\nBody line 2\r\n"


NESTED = crlf(
    "From: alice@example.com\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "This is the preamble, not a part.\n"
    "--outer\n"
    'Content-Type: multipart/alternative; boundary="inner"\n'
    "\n"
    "--inner\n"
    "Content-Type: text/plain; charset=UTF-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Caf=C3=A9 at http://plain.example.com/menu.\n"
    "--inner\n"
    "Content-Type: text/html; charset=utf-8\n"
    "\n"
    '<p>Caf&eacute; at <a href="http://html.example.com/menu?a=1&amp;b=2">the menu</a></p>\n'
    "--inner--\n"
    "--outer\n"
    'Content-Type: application/pdf; name="=?utf-8?q?r=C3=A9sum=C3=A9.pdf?="\n'
    "Content-Transfer-Encoding: base64\n"
    "\n"
    "JVBERi0xLjQK\n"
    "--outer\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "Subject: forwarded\n"
    'Content-Type: multipart/mixed; boundary="fwd"\n'
    "\n"
    "--fwd\n"
    "Content-Type: text/plain\n"
    "\n"
    "inner text www.forwarded.example.net\n"
    "--fwd\n"
    "Content-Type: application/octet-stream\n"
    "Content-Disposition: attachment; filename=run.exe\n"
    "\n"
    "MZ\n"
    "--fwd--\n"
    "--outer--\n"
    "The epilogue, not a part either.\n"
)


def test_nested_multipart_leaves_in_order() -> None:
    """Multiparts and attached messages are opened; the leaves are listed in order."""
    m = Message.parse(NESTED)
    assert [(p.content_type, p.charset, p.filename, p.disposition) for p in m.parts] == [
        ("text/plain", "utf-8", "", ""),
        ("text/html", "utf-8", "", ""),
        ("application/pdf", "", "résumé.pdf", ""),
        ("text/plain", "", "", ""),
        ("application/octet-stream", "", "run.exe", "attachment"),
    ]
    assert m.parts[0].payload == "Café at http://plain.example.com/menu.".encode()
    assert m.parts[0].text == "Café at http://plain.example.com/menu."
    assert m.parts[2].payload == b"%PDF-1.4\n"
    assert m.parts[2].size == 9
    assert m.parts[2].text is None
    assert m.parts[4].payload == b"MZ"
    assert [p.filename for p in m.attachments] == ["résumé.pdf", "run.exe"]
    assert m.defects == ()


def test_nested_multipart_text_and_urls() -> None:
    """Text joins the plain and rendered HTML parts; URLs come from text and links."""
    m = Message.parse(NESTED)
    assert m.text == (
        "Café at http://plain.example.com/menu.\nCafé at the menu\ninner text www.forwarded.example.net"
    )
    assert m.urls == (
        "http://plain.example.com/menu",
        "http://html.example.com/menu?a=1&b=2",
        "www.forwarded.example.net",
    )
    assert "preamble" not in m.text
    assert "epilogue" not in m.text


def test_parse_does_not_read_mime() -> None:
    """Parsing computes no MIME structure; it is read once, on first use, and kept."""
    m = Message.parse(NESTED)
    assert "_mime" not in vars(m)
    assert "parts" not in vars(m)
    parts = m.parts
    assert "_mime" in vars(m)
    assert m.parts is parts


def test_base64_attachment_with_rfc2231_filename() -> None:
    """RFC 2231 sections (charset, percent-encoding, continuations) make the filename."""
    content = bytes(range(256)) * 4
    encoded = base64.encodebytes(content).decode().replace("\n", "\r\n")
    data = (
        crlf(
            "Content-Type: multipart/mixed; boundary=b1\n\n--b1\n"
            "Content-Type: application/octet-stream\n"
            "Content-Disposition: attachment;\n"
            " filename*0*=utf-8'en'%E2%82%AC%20report;\n"
            ' filename*1="-2024 (final)";\n'
            " filename*2*=%2Epdf\n"
            "Content-Transfer-Encoding: base64\n\n"
        )
        + encoded.encode()
        + b"--b1--\r\n"
    )
    m = Message.parse(data)
    (part,) = m.parts
    assert part.filename == "€ report-2024 (final).pdf"
    assert part.disposition == "attachment"
    assert part.payload == content
    assert part.size == 1024
    assert part.is_attachment
    assert m.attachments == (part,)
    assert m.defects == ()


@pytest.mark.parametrize(
    ("params", "filename"),
    [
        ("attachment; filename*=iso-8859-1''caf%E9.txt", "café.txt"),
        ("attachment; filename*=''plain%20name.txt", "plain name.txt"),
        ('attachment; filename="quoted \\"name\\".txt"', 'quoted "name".txt'),
        ('attachment; filename="semi;colon.txt"; size=3', "semi;colon.txt"),
        ("attachment; FILENAME=upper.txt", "upper.txt"),
        ("attachment; filename=\"a.txt\"; filename*=utf-8''b%C3%A9.txt", "bé.txt"),
        ('attachment; filename="=?utf-8?b?w6k=?=.txt"', "é.txt"),
        ('attachment; filename="unterminated.txt', "unterminated.txt"),
        ("attachment; filename", ""),
        ("attachment; =x; filename=ok.txt", "ok.txt"),
    ],
)
def test_disposition_filenames(params: str, filename: str) -> None:
    """Quoted, encoded and broken filename parameters."""
    data = crlf(f"Content-Type: text/plain\nContent-Disposition: {params}\n\nx")
    (part,) = Message.parse(data).parts
    assert part.filename == filename
    assert part.disposition == "attachment"


def test_content_type_name_is_the_fallback_filename() -> None:
    """Without a Content-Disposition filename, Content-Type's name parameter names the part."""
    (part,) = Message.parse(b'Content-Type: image/png; name="logo.png"\r\n\r\nx').parts
    assert (part.content_type, part.filename, part.disposition) == ("image/png", "logo.png", "")
    assert part.is_attachment


@pytest.mark.parametrize(
    ("header", "disposition", "attachment"),
    [
        ("inline", "inline", False),
        ("INLINE", "inline", False),
        ("attachment", "attachment", True),
        ("x-unknown", "attachment", True),  # RFC 2183 section 2.8
        ("", "", False),
        ('inline; filename="pic.jpg"', "inline", True),
    ],
)
def test_dispositions(header: str, disposition: str, attachment: bool) -> None:
    """Content-Disposition is inline, attachment (also for unknown values) or empty."""
    (part,) = Message.parse(crlf(f"Content-Disposition: {header}\n\nx")).parts
    assert part.disposition == disposition
    assert part.is_attachment is attachment


def test_quoted_printable_part() -> None:
    """Quoted-printable soft line breaks and escapes are undone."""
    data = crlf(
        "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: Quoted-Printable\n\n"
        "a long line that was=\nbroken, =E2=82=AC5 =3D five euros\n"
    )
    (part,) = Message.parse(data).parts
    assert part.text == "a long line that wasbroken, €5 = five euros\r\n"


@pytest.mark.parametrize(
    ("charset", "payload", "text"),
    [
        ("utf-8", "café".encode(), "café"),
        ("UTF-8", b"caf\xe9", "caf\ufffd"),  # invalid UTF-8 in a UTF-8 part: replaced
        ("iso-8859-1", b"caf\xe9 \x80", "café €"),  # read as windows-1252, like mail readers
        ("windows-1251", "привет".encode("cp1251"), "привет"),
        ("us-ascii", "café".encode(), "café"),  # mislabelled UTF-8 is common
        ("", b"caf\xe9", "café"),  # no charset, not UTF-8: Latin-1
        ('"koi8-r"', "мир".encode("koi8-r"), "мир"),
    ],
)
def test_part_text_charsets(charset: str, payload: bytes, text: str) -> None:
    """Part.text decodes with the part's charset, falling back to UTF-8 then Latin-1."""
    ctype = f"text/plain; charset={charset}" if charset else "text/plain"
    (part,) = Message.parse(f"Content-Type: {ctype}\r\n\r\n".encode() + payload).parts
    assert part.text == text


def test_bogus_charset() -> None:
    """An unknown charset is a defect, and the text is still read."""
    m = Message.parse(b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\ncaf\xc3\xa9")
    assert m.parts[0].charset == "x-no-such-charset"
    assert m.parts[0].text == "café"
    assert m.text == "café"
    assert m.defects == ("unknown-charset",)


def test_missing_close_boundary() -> None:
    """Without the closing delimiter the last part runs to the end of the message."""
    data = crlf("Content-Type: multipart/mixed; boundary=zz\n\n--zz\n\nfirst\n--zz\n\nsecond\n")
    m = Message.parse(data)
    assert [p.payload for p in m.parts] == [b"first", b"second\r\n"]
    assert m.defects == ("missing-close-boundary",)


def test_boundary_not_found_reads_the_body_as_text() -> None:
    """A multipart whose boundary never occurs is one text part, so its text is scanned."""
    data = crlf("Content-Type: multipart/mixed; boundary=zz\n\nvisit http://spam.example/\n")
    m = Message.parse(data)
    assert [p.content_type for p in m.parts] == ["text/plain"]
    assert m.urls == ("http://spam.example/",)
    assert m.defects == ("boundary-not-found",)


def test_multipart_without_boundary_parameter() -> None:
    """A multipart without a boundary is one text part."""
    m = Message.parse(crlf("Content-Type: multipart/mixed\n\nhello\n"))
    assert [p.content_type for p in m.parts] == ["text/plain"]
    assert m.text == "hello\r\n"
    assert m.defects == ("missing-boundary",)


def test_boundary_lines_need_the_line_to_themselves() -> None:
    """Only the delimiter (and trailing whitespace) on its own line separates parts."""
    data = crlf(
        "Content-Type: multipart/mixed; boundary=zz\n\n"
        "--zz \t\n\nfirst --zz in the middle\n--zzz is another boundary\n"
        "--zz\n\nsecond\n--zz--  \nepilogue\n--zz\n\nnot a part\n"
    )
    m = Message.parse(data)
    assert [p.payload for p in m.parts] == [
        b"first --zz in the middle\r\n--zzz is another boundary",
        b"second",
    ]
    assert m.defects == ()


def test_bad_base64() -> None:
    """Broken base64 is decoded as far as it goes and noted."""
    data = crlf(
        "Content-Type: multipart/mixed; boundary=zz\n\n"
        "--zz\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29ybGQ\n"  # padding missing
        "--zz\nContent-Transfer-Encoding: base64\n\naGVs!!bG8=\n"  # junk: skipped
        "--zz\nContent-Transfer-Encoding: base64\n\naGk=aGk=\n"  # pieces padded apart
        "--zz\nContent-Transfer-Encoding: base64\n\nx\n"  # nothing to decode
        "--zz--\n"
    )
    m = Message.parse(data)
    assert [p.payload for p in m.parts] == [b"hello world", b"hello", b"hihi", b""]
    assert m.defects == ("bad-base64",)


def test_unknown_transfer_encoding_keeps_the_bytes() -> None:
    """Transfer encodings other than base64 and quoted-printable are kept as they are."""
    (part,) = Message.parse(b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n").parts
    assert part.payload == b"begin 644 a\r\n"


@pytest.mark.parametrize("value", ["text", "/plain", "text/plain/x", "text/pl ain", "téxt/plain"])
def test_invalid_content_type_is_text_plain(value: str) -> None:
    """An invalid Content-Type reads as text/plain (RFC 2045 section 5.2)."""
    m = Message.parse(f"Content-Type: {value}; charset=utf-8\r\n\r\nx".encode())
    assert m.parts[0].content_type == "text/plain"
    assert m.defects == ("bad-content-type",)


def test_content_type_is_lowercased() -> None:
    """Types and charsets compare in lower case."""
    (part,) = Message.parse(b"Content-Type: Text/HTML; Charset=UTF-8\r\n\r\n<b>x</b>").parts
    assert (part.content_type, part.charset) == ("text/html", "utf-8")


def test_digest_parts_default_to_messages() -> None:
    """Parts of a multipart/digest without Content-Type are messages (RFC 2046 section 5.1.5)."""
    data = crlf(
        "Content-Type: multipart/digest; boundary=d\n\n"
        "--d\n\nSubject: one\n\nfirst body\n"
        "--d\nContent-Type: text/plain\n\nnot a message\n--d--\n"
    )
    m = Message.parse(data)
    assert [p.payload for p in m.parts] == [b"first body", b"not a message"]


def test_base64_encoded_attached_message_is_opened() -> None:
    """A message/rfc822 part sent in base64 (not allowed, but seen) is decoded and opened."""
    inner = crlf("Subject: inner\nContent-Type: text/html\n\n<a href='https://inner.example/'>x</a>")
    encoded = base64.encodebytes(inner).replace(b"\n", b"\r\n")
    data = b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded
    m = Message.parse(data)
    assert [p.content_type for p in m.parts] == ["text/html"]
    assert m.urls == ("https://inner.example/",)


def test_too_many_parts() -> None:
    """At most MAX_PARTS entities are read; the rest is left out and noted."""
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(3 * MAX_PARTS))
    m = Message.parse(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + body + b"--b--\r\n")
    assert len(m.parts) == MAX_PARTS - 1  # the multipart itself counts
    assert m.parts[0].payload == b"part 0"
    assert m.defects == ("too-many-parts",)


def test_deep_nesting_is_cut_off() -> None:
    """Multiparts nested deeper than MAX_DEPTH become one leaf."""
    levels = 5 * MAX_DEPTH
    head = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(levels)
    )
    data = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + head + b"--b%d\r\n\r\ndeep\r\n" % levels
    m = Message.parse(data)
    (part,) = m.parts
    assert part.content_type == "multipart/mixed"
    assert b"deep" in part.payload
    assert "mime-too-deep" in m.defects
    assert "missing-close-boundary" in m.defects


def test_decoded_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Payloads beyond MAX_DECODED_SIZE in total are cut and noted."""
    monkeypatch.setattr(message_module, "MAX_DECODED_SIZE", 1000)
    data = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n\n") + b"a" * 800
    data += crlf("\n--b\n\n") + b"b" * 800 + crlf("\n--b\n\nc\n--b--\n")
    m = Message.parse(data)
    assert [p.size for p in m.parts] == [800, 200, 0]
    assert m.defects == ("decoded-size-limit",)


def test_part_headers_too_large() -> None:
    """A part's header is bounded too."""
    part_header = b"X-Big: " + b"x" * (300 * 1024) + b"\r\n"
    data = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + part_header + b"\r\nbody\r\n--b--"
    m = Message.parse(data)
    assert m.parts[0].payload == b"body"
    assert m.defects == ("header-too-large",)


# ---------------------------------------------------------------------------------------------
# Text and URLs


HTML = crlf(
    "Content-Type: text/html; charset=utf-8\n\n"
    "<html><head><title>Offer</title><style>p { color: red }</style>\n"
    "<script type='text/javascript'>location='http://script.example/'</script></head>\n"
    "<body><!-- http://comment.example/ --><p>Hello&nbsp;&amp; w<b>el</b>come!</p>\n"
    "<div>Visit <A HREF = 'HTTP://Upper.Example/Path'>here</A> or\n"
    '<a href="\n  https://spaced.example/a\tb  ">there</a>, <a href=https://bare.example/>x</a>\n'
    '<a href="mailto:x@example.com">mail</a> <a href="javascript:void(0)">js</a>\n'
    '<a href="http://html.example/?q=1&amp;r=2">same as text</a></div>\n'
    "<p>Or type http://html.example/?q=1&amp;r=2 or www.typed.example.org/offer.</p>\n"
    "<SCRIPT>var x = 'http://script2.example/';</sCrIpT></body></html>\n"
)


def test_html_text() -> None:
    """HTML becomes its visible text: no scripts, styles or comments, entities decoded,
    inline tags joined, block tags on their own lines."""
    text = Message.parse(HTML).text
    assert "Hello\xa0& welcome!" not in text  # non-breaking spaces read as spaces
    assert "Hello & welcome!" in text
    assert "Offer" in text
    assert "color" not in text
    assert "script" not in text
    assert "comment.example" not in text
    assert "\nVisit here or\nthere, x\nmail js\nsame as text\n" in text


def test_html_urls() -> None:
    """Links and URLs typed in the text, once each, in order; mailto and javascript left out."""
    assert Message.parse(HTML).urls == (
        "HTTP://Upper.Example/Path",
        "https://spaced.example/ab",
        "https://bare.example/",
        "http://html.example/?q=1&r=2",
        "www.typed.example.org/offer",
    )


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        ("see http://a.example/x.", ("http://a.example/x",)),
        ("(http://a.example/x)", ("http://a.example/x",)),
        ("http://en.example/wiki/A_(b)", ("http://en.example/wiki/A_(b)",)),
        ('"https://q.example/z"', ("https://q.example/z",)),
        ("<http://angle.example/>", ("http://angle.example/",)),
        ("ftp://files.example/pub", ("ftp://files.example/pub",)),
        ("www.host.example, www.host.example", ("www.host.example",)),
        ("a@www.mail.example notwww.x.example xwww.y.example", ()),
        ("www.nodot http:// https://x", ("https://x",)),
        ("HtTpS://MiXeD.example", ("HtTpS://MiXeD.example",)),
        ("http://ünïcode.example/päth", ("http://ünïcode.example/päth",)),
    ],
)
def test_text_urls(text: str, urls: tuple[str, ...]) -> None:
    """URLs end at spaces and quotes, trailing punctuation is not part of them."""
    assert Message.parse(b"\r\n" + text.encode()).urls == urls


def test_attachments_are_not_text() -> None:
    """Text parts sent as attachments are not in text or urls."""
    data = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n--b\n\nbody http://body.example/\n"
        "--b\nContent-Disposition: attachment; filename=notes.txt\n\nhttp://attached.example/\n--b--\n"
    )
    m = Message.parse(data)
    assert m.text == "body http://body.example/"
    assert m.urls == ("http://body.example/",)
    assert len(m.attachments) == 1


def test_text_and_urls_are_bounded() -> None:
    """Text stops at MAX_TEXT characters and urls at MAX_URLS entries."""
    body = b"".join(b"http://host%d.example/ " % i for i in range(3 * MAX_URLS)) + b"x" * (2 * MAX_TEXT)
    m = Message.parse(b"Subject: many\r\n\r\n" + body)
    assert len(m.text) == MAX_TEXT
    assert len(m.urls) == MAX_URLS
    assert m.urls[0] == "http://host0.example/"


# ---------------------------------------------------------------------------------------------
# rewrite


def test_rewrite_without_changes_is_identical() -> None:
    """No changes give the very bytes received."""
    for data in (SIMPLE, NESTED, HTML, b"", b"junk\x00\xff", b"From x\r\nA: 1\r\n\r\n"):
        assert Message.parse(data).rewrite() == data


def test_rewrite_prepends_at_the_top() -> None:
    """New fields go first, in order, as UTF-8 with CRLF."""
    m = Message.parse(SIMPLE)
    out = m.rewrite(prepend=["X-Spam-Flag: YES", "X-Spam-Score: 7.5 (é)"])
    assert out == b"X-Spam-Flag: YES\r\nX-Spam-Score: 7.5 (\xc3\xa9)\r\n" + SIMPLE


def test_rewrite_folded_and_terminated_fields() -> None:
    """Folding is kept (LF folding written as CRLF) and a final line end is not doubled."""
    m = Message.parse(SIMPLE)
    assert m.rewrite(prepend=["X-A: one\r\n\ttwo"]) == b"X-A: one\r\n\ttwo\r\n" + SIMPLE
    assert m.rewrite(prepend=["X-A: one\n two\n"]) == b"X-A: one\r\n two\r\n" + SIMPLE
    assert m.rewrite(prepend=["X-A: done\r\n"]) == b"X-A: done\r\n" + SIMPLE


def test_rewrite_removes_and_replaces_by_index() -> None:
    """Removed fields are left out, replaced ones substituted in place, the rest unchanged."""
    m = Message.parse(SIMPLE)
    out = m.rewrite(prepend=["X-New: 1"], remove=[0, 3], replace={4: "Subject: [SPAM] Hello"})
    assert out == (
        b"X-New: 1\r\n"
        b"Received: from b.example by a.example\r\n"
        b"From: Alice <alice@example.com>\r\n"
        b"Subject: [SPAM] Hello\r\n"
        b"\r\nBody line 1\r\nBody line 2\r\n"
    )
    again = Message.parse(out)
    assert again.get("x-new") == "1"
    assert again.get("subject") == "[SPAM] Hello"
    assert again.count("received") == 1


def test_rewrite_replace_with_the_same_value_is_lossless() -> None:
    """Writing a field back from its name and value gives its bytes back, junk included."""
    data = b"Subject: caf\xc3\xa9 \xff\r\nTo: x\r\n\r\nbody"
    m = Message.parse(data)
    header = m.headers[0]
    assert m.rewrite(replace={0: f"{header.name}: {header.value}"}) == data


def test_rewrite_keeps_unparsed_bytes() -> None:
    """The mbox line, a malformed header rest and the body without separator stay as they were."""
    data = b"From a Mon\r\nA: 1\r\nB: 2\r\nno colon here\r\nC: 3\r\n\r\nbody"
    m = Message.parse(data)
    assert [h.name for h in m.headers] == ["A", "B"]
    assert m.rewrite(prepend=["X: y"], remove=[1]) == (
        b"From a Mon\r\nX: y\r\nA: 1\r\nno colon here\r\nC: 3\r\n\r\nbody"
    )


def test_rewrite_of_a_last_field_without_line_end() -> None:
    """Replacing a field that ended the message without a line end ends it with CRLF."""
    m = Message.parse(b"A: 1\r\nB: 2")
    assert m.rewrite(replace={1: "B: two"}) == b"A: 1\r\nB: two\r\n"
    assert m.rewrite(remove=[1]) == b"A: 1\r\n"


@pytest.mark.parametrize(
    "field",
    [
        "no colon",
        ": no name",
        "Two words: x",
        "X-A: one\r\nX-B: injected",
        "X-A: one\r\n\r\nbody",
        "X-A: bare\rcr",
        "X-A: nul\x00",
        "X-A: trailing\r\n\r\n",
        "X-Ä: non-ascii name",
        "X-A: lone surrogate \ud800",
        "",
    ],
)
def test_rewrite_refuses_what_is_not_one_field(field: str) -> None:
    """A new field that is not exactly one field (no header injection) is a ValueError."""
    m = Message.parse(SIMPLE)
    with pytest.raises(ValueError, match="header field"):
        m.rewrite(prepend=[field])
    with pytest.raises(ValueError, match="header field"):
        m.rewrite(replace={0: field})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"remove": [5]}, "remove: 5 is not the index of one of the 5 header fields"),
        ({"remove": [-1]}, "remove: -1"),
        ({"remove": [True]}, "remove: True"),
        ({"replace": {7: "X: y"}}, "replace: 7"),
        ({"remove": [1], "replace": {1: "X: y"}}, "header 1 is both removed and replaced"),
    ],
)
def test_rewrite_refuses_bad_indexes(kwargs: dict[str, object], message: str) -> None:
    """Indexes must name one of the parsed fields, and a field cannot be removed and replaced."""
    with pytest.raises(ValueError, match=message):
        Message.parse(SIMPLE).rewrite(**kwargs)  # type: ignore[arg-type]


def test_rewrite_refuses_non_text_fields() -> None:
    """A field given as bytes is a TypeError naming the type."""
    with pytest.raises(TypeError, match="str, not bytes"):
        Message.parse(SIMPLE).rewrite(prepend=[b"X: y"])  # type: ignore[list-item]

"""The message view under hostile input: arbitrary bytes, random MIME trees, a seeded corpus of
damaged messages, and inputs built to make a naive parser slow.

Whatever the input, parsing and every lazy property finish quickly without raising, stay within
their documented bounds, report only documented defect words, and rewrite() with no changes
gives back the input byte for byte.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxward.contentfilter.message import (
    MAX_PARTS,
    MAX_TEXT,
    MAX_URLS,
    Message,
    Part,
    decode_words,
)

# Every word the module's manual documents.
DEFECTS = frozenset(
    {
        "no-body-separator",
        "malformed-header-line",
        "header-too-large",
        "mbox-from-line",
        "bare-lf",
        "nul-byte",
        "missing-boundary",
        "boundary-not-found",
        "missing-close-boundary",
        "bad-content-type",
        "bad-base64",
        "unknown-charset",
        "too-many-parts",
        "mime-too-deep",
        "decoded-size-limit",
        "mime-parse-error",
    }
)
MARKER = "X-Fuzz-Marker: 1"
CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
# MXWARD_FUZZ_EXAMPLES=100000 runs a longer campaign by hand.
FUZZ = settings(
    max_examples=int(os.environ.get("MXWARD_FUZZ_EXAMPLES", "400")),
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Recorder(logging.Handler):
    """Keeps the warnings the module logs when one of its guards caught an exception (a bug)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True, scope="module")
def guard_warnings() -> Iterator[Recorder]:
    recorder = Recorder()
    logger = logging.getLogger("mxward.contentfilter.message")
    logger.addHandler(recorder)
    yield recorder
    logger.removeHandler(recorder)


def exercise(data: bytes, max_header_size: int = 1_048_576) -> Message:
    """Parse, read every property, rewrite, and check the invariants that always hold (among
    them: no guard had to catch an exception, which would be a bug hidden from the caller)."""
    logger = logging.getLogger("mxward.contentfilter.message")
    recorder = next(h for h in logger.handlers if isinstance(h, Recorder))
    recorder.records.clear()
    m = exercise_view(data, max_header_size)
    assert "mime-parse-error" not in m.defects
    assert not recorder.records, [r.getMessage() for r in recorder.records]
    return m


def exercise_view(data: bytes, max_header_size: int) -> Message:
    m = Message.parse(data, max_header_size=max_header_size)
    assert m.raw == data
    assert m.size == len(data)
    assert 0 <= m.body_offset <= len(data)
    assert m.body == data[m.body_offset :]
    fields = b"".join(h.raw for h in m.headers)
    assert fields in data
    assert data.index(fields) + len(fields) <= m.body_offset or not fields
    for index, header in enumerate(m.headers[:50]):  # enough to check, linear for huge headers
        assert header.raw.startswith(header.name.encode("ascii", "surrogateescape"))
        assert header.value.encode("utf-8", "surrogateescape") in header.raw.replace(b"\r\n", b"").replace(
            b"\n", b""
        )
        assert index in m.indexes(header.name)
        assert m.get(header.name.upper()) == m.headers[m.indexes(header.name)[0]].value
        assert m.count(header.name) == len(m.get_all(header.name))
        assert isinstance(m.decoded(header.name), str)
        assert isinstance(decode_words(header.value), str)

    assert len(m.parts) <= MAX_PARTS
    for part in m.parts:
        assert isinstance(part, Part)
        assert CONTENT_TYPE.fullmatch(part.content_type)
        assert part.charset == part.charset.lower()
        assert part.disposition in ("", "inline", "attachment")
        assert part.size == len(part.payload)
        assert isinstance(part.filename, str)
        text = part.text
        assert (text is not None) == part.content_type.startswith("text/")
    assert all(part.is_attachment for part in m.attachments)
    assert len(m.text) <= MAX_TEXT + len(m.parts)  # the parts' texts and the newlines joining them
    assert len(m.urls) <= MAX_URLS
    assert len(set(m.urls)) == len(m.urls)
    assert set(m.defects) <= DEFECTS, set(m.defects) - DEFECTS
    assert set(m.header_defects) <= set(m.defects)

    assert m.rewrite() == data
    marked = m.rewrite(prepend=[MARKER])
    assert marked.replace(MARKER.encode() + b"\r\n", b"", 1) == data
    head = marked[: marked.index(MARKER.encode()) + 100]
    assert Message.parse(head).headers[0].name == "X-Fuzz-Marker"
    emptied = m.rewrite(remove=range(len(m.headers)))
    assert len(emptied) == len(data) - len(fields)
    if m.headers:
        last = len(m.headers) - 1
        replaced = m.rewrite(replace={last: "X-Replaced: yes"})
        assert b"X-Replaced: yes\r\n" in replaced
    return m


# ---------------------------------------------------------------------------------------------
# Arbitrary bytes


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    """Any bytes at all parse, and every property can be read."""
    exercise(data)


HEADERISH = st.lists(
    st.sampled_from(
        [
            b"Subject: ",
            b"From: ",
            b"Content-Type: ",
            b"multipart/mixed; boundary=",
            b"\r\n",
            b"\n",
            b"\r",
            b" ",
            b"\t",
            b":",
            b"--",
            b"=?",
            b"?=",
            b"?q?",
            b"?b?",
            b"utf-8",
            b"\x00",
            b"\xff",
            b"From ",
            b"Content-Transfer-Encoding: base64",
            b"quoted-printable",
            b"text/html",
            b"<a href=",
            b"http://",
            b"www.",
            b'"',
            b";",
            b"*0*=",
            b"''",
            b"%",
            b"=",
            b"message/rfc822",
            b"filename",
            b"<!--",
            b"x",
        ]
    ),
    max_size=200,
)


@FUZZ
@given(HEADERISH, st.integers(min_value=0, max_value=200))
def test_arbitrary_message_like_bytes(pieces: list[bytes], limit: int) -> None:
    """Byte soup made of the tokens the parser looks for, with small header limits too."""
    exercise(b"".join(pieces), max_header_size=limit if limit < 100 else 1_048_576)


# ---------------------------------------------------------------------------------------------
# Random MIME trees


@dataclass(frozen=True)
class Leaf:
    ctype: str
    charset: str
    encoding: str
    disposition: str
    payload: bytes

    def render(self, eol: bytes) -> bytes:
        head = [f"Content-Type: {self.ctype}{self.charset}".encode()]
        if self.encoding:
            head.append(b"Content-Transfer-Encoding: " + self.encoding.encode())
        if self.disposition:
            head.append(b"Content-Disposition: " + self.disposition.encode())
        if self.encoding == "base64":
            body = base64.encodebytes(self.payload).replace(b"\n", eol)
        else:
            body = self.payload
        return eol.join(head) + eol + eol + body


@dataclass(frozen=True)
class Multi:
    subtype: str
    boundary: str
    children: tuple[Leaf | Multi | Attached, ...]
    closed: bool
    preamble: bytes

    def render(self, eol: bytes) -> bytes:
        delimiter = b"--" + self.boundary.encode()
        out = [
            f'Content-Type: multipart/{self.subtype}; boundary="{self.boundary}"'.encode(),
            b"",
            self.preamble,
        ]
        for child in self.children:
            out += [delimiter, child.render(eol)]
        if self.closed:
            out.append(delimiter + b"--")
        return eol.join(out)


@dataclass(frozen=True)
class Attached:
    inner: Leaf | Multi | Attached

    def render(self, eol: bytes) -> bytes:
        return eol.join([b"Content-Type: message/rfc822", b"", b"Subject: attached", self.inner.render(eol)])


leaves = st.builds(
    Leaf,
    ctype=st.sampled_from(["text/plain", "text/html", "application/pdf", "image/png", "bogus", "TEXT/HTML"]),
    charset=st.sampled_from(
        ["", "; charset=utf-8", "; charset=iso-8859-1", "; charset=x-bogus", "; charset="]
    ),
    encoding=st.sampled_from(["", "base64", "quoted-printable", "7bit", "x-junk"]),
    disposition=st.sampled_from(
        [
            "",
            "inline",
            'attachment; filename="a.pdf"',
            "attachment; filename*=utf-8''%E2%82%AC.txt",
            "attachment; filename*0*=utf-8''a; filename*1=b",
            'attachment; filename="=?utf-8?b?w6k=?="',
            "weird; filename=",
        ]
    ),
    payload=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from(
            [
                b"<p>hi <a href='http://x.example/'>x</a></p><!-- y -->",
                b"see www.example.org and https://a.example/b?c=d.",
                b"=E2=82=AC =\r\nsoft",
                b"--boundary-0\r\n",
            ]
        ),
    ),
)


def trees() -> st.SearchStrategy[Leaf | Multi | Attached]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.builds(
                Multi,
                subtype=st.sampled_from(["mixed", "alternative", "related", "digest"]),
                boundary=st.sampled_from(["boundary-0", "boundary-1", "b", "=_x", "boundary-0"]),
                children=st.lists(children, max_size=4).map(tuple),
                closed=st.booleans(),
                preamble=st.sampled_from([b"", b"preamble", b"--boundary-0"]),
            ),
            st.builds(Attached, children),
        ),
        max_leaves=12,
    )


@FUZZ
@given(
    trees(),
    st.lists(
        st.sampled_from(
            [
                b"Subject: =?utf-8?q?hello_w=C3=B6rld?=",
                b"From: =?iso-8859-1?b?QWxpY2U=?= <a@example.com>",
                b"Received: from x\r\n\tby y",
                b"X-Junk: \xff\xfe\x00",
                b"MIME-Version: 1.0",
                b"To: bob@example.org",
            ]
        ),
        max_size=6,
    ),
    st.sampled_from([b"\r\n", b"\n"]),
    st.one_of(st.none(), st.integers(min_value=0, max_value=20000)),
)
def test_random_mime_trees(
    tree: Leaf | Multi | Attached, fields: list[bytes], eol: bytes, cut: int | None
) -> None:
    """Random MIME structures, whole or cut short anywhere, parse within bounds."""
    data = eol.join([*fields, tree.render(eol)])
    if cut is not None:
        data = data[:cut]
    m = exercise(data)
    if cut is None and isinstance(tree, Leaf):
        assert m.parts[0].content_type in (tree.ctype.lower(), "text/plain")


# ---------------------------------------------------------------------------------------------
# A seeded corpus of damaged messages


def well_formed(rng: random.Random) -> bytes:
    """A plausible message: header, and a body that is plain, HTML or multipart."""
    subject = rng.choice(["Hello", "=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Invoice #" + str(rng.randrange(10**6))])
    head = (
        "Received: from mail.example.com (mail.example.com [192.0.2.1])\r\n\tby mx.example.org\r\n"
        f"From: sender{rng.randrange(100)}@example.com\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode()
    text = " ".join(
        rng.choice(["lorem", "ipsum", "http://u.example/p", "www.w.example", "dolor"]) for _ in range(40)
    )
    kind = rng.randrange(3)
    if kind == 0:
        return head + b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode() + b"\r\n"
    if kind == 1:
        return (
            head
            + b"Content-Type: text/html\r\n\r\n<html><body><p>"
            + text.encode()
            + b"</p></body></html>\r\n"
        )
    attachment = base64.encodebytes(rng.randbytes(rng.randrange(2000))).replace(b"\n", b"\r\n")
    return head + (
        b'Content-Type: multipart/mixed; boundary="=_outer"\r\n\r\n--=_outer\r\n'
        b'Content-Type: multipart/alternative; boundary="=_inner"\r\n\r\n--=_inner\r\n'
        b"Content-Type: text/plain\r\n\r\n" + text.encode() + b"\r\n--=_inner\r\n"
        b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b'<a href=3D"http://h.example/">link</a>\r\n--=_inner--\r\n--=_outer\r\n'
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.bin\r\n\r\n"
        + attachment
        + b"--=_outer--\r\n"
    )


JUNK = [
    b"--=_outer",
    b"--=_inner--",
    b'--=_outer\r\nContent-Type: multipart/mixed; boundary="=_outer"\r\n\r\n',
    b"\x00",
    b"\xff\xfe",
    b"\r",
    b"\n",
    b"\r\n\r\n",
    b" ",
    b":",
    b"=?",
    b"Content-Transfer-Encoding: base64\r\n",
    b"<!--",
    b"<script>",
    b'href="',
]


def damaged(rng: random.Random) -> bytes:
    """A well-formed message with a few random injuries."""
    data = bytearray(well_formed(rng))
    for _ in range(rng.randrange(1, 5)):
        action = rng.randrange(7)
        at = rng.randrange(len(data) + 1)
        if action == 0:  # truncate
            del data[at:]
        elif action == 1:  # flip bytes
            for _ in range(rng.randrange(1, 10)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
        elif action == 2:  # boundary and other junk
            data[at:at] = rng.choice(JUNK) * rng.randrange(1, 4)
        elif action == 3:  # duplicate a stretch
            data[at:at] = data[at : at + rng.randrange(1, 500)]
        elif action == 4:  # delete a stretch
            del data[at : at + rng.randrange(1, 200)]
        elif action == 5:  # CRLF to LF
            data = bytearray(bytes(data).replace(b"\r\n", b"\n"))
        else:  # an overlong line
            data[at:at] = b"y" * rng.randrange(1000, 200_000)
    return bytes(data)


def test_seeded_corpus_of_damaged_messages() -> None:
    """Four hundred damaged messages (fixed seed) parse quickly with every property readable."""
    rng = random.Random(20240611)
    slowest = 0.0
    for _ in range(400):
        data = damaged(rng)
        started = time.perf_counter()
        exercise(data)
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 2.0


# ---------------------------------------------------------------------------------------------
# Inputs that make naive parsers slow: each must stay roughly linear.

SIZE = 1_000_000
HTML = b"Content-Type: text/html\r\n\r\n"
MULTI = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
HOSTILE = {
    "long line without colon": b"A: 1\r\n" + b"a" * SIZE + b"\r\n\r\n",
    "many lines without colon": b"A: 1\r\n" + b"abcdefghij\r\n" * (SIZE // 12),
    "whitespace-only line": b"A: 1\r\n" + b" " * SIZE + b"\r\n\r\n",
    "many tiny fields": b"A: b\r\n" * (SIZE // 6) + b"\r\n",
    "one field folded many times": b"A: b\r\n" + b" c\r\n" * (SIZE // 4) + b"\r\n",
    "LF only": b"A: b\n" * (SIZE // 5),
    "unclosed comments": HTML + b"<!--" * (SIZE // 4),
    "unclosed tags": HTML + b"<a" * (SIZE // 2),
    "unclosed script ends": HTML + b"<script>" + b"</script " * (SIZE // 9),
    "unterminated href": HTML + b'<a href="' + b"x" * SIZE,
    "href and spaces": HTML + b"href" + b" " * SIZE,
    "many quotes": HTML + b"href='" * (SIZE // 6),
    "less-than signs": HTML + b"<" * SIZE,
    "unicode whitespace": HTML + " \n\u2003".encode() * (SIZE // 5),
    "ampersands": HTML + b"&#" * (SIZE // 2),
    "www runs": b"\r\n" + (b" www." + b"a" * 10000) * (SIZE // 10005),
    "scheme runs": b"\r\n" + b"http://" * (SIZE // 7),
    "encoded-word starts": b"Subject: " + b"=?" * (SIZE // 2) + b"\r\n\r\n",
    "encoded word with long text": b"Subject: =?a?q?" + b"b" * SIZE + b"\r\n\r\n",
    "many encoded words": b"Subject: " + b"=?a?q?b?= " * (SIZE // 10) + b"\r\n\r\n",
    "unterminated parameters": b"Content-Type: text/plain" + b'; a="' * (SIZE // 5) + b"\r\n\r\nx",
    "RFC 2231 sections": b"Content-Type: text/plain" + b"; a*1*=%" * (SIZE // 8) + b"\r\n\r\nx",
    "backslashes": b'Content-Type: text/plain; a="' + b"\\" * SIZE + b"\r\n\r\nx",
    "base64 padded pieces": b"Content-Transfer-Encoding: base64\r\n\r\n" + b"YQ==" * (SIZE // 4),
    "base64 junk": b"Content-Transfer-Encoding: base64\r\n\r\n" + b"!" * SIZE + b"Y",
    "quoted-printable junk": b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + b"=" * SIZE,
    "delimiter lines": MULTI + b"--b\r\n" * (SIZE // 5),
    "delimiters in one line": MULTI + b"--b" * (SIZE // 3),
    "nested multiparts": MULTI + b"--b\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" * 20000,
    "nested messages": b"Content-Type: message/rfc822\r\n\r\n" * 30000,
    "NUL bytes": b"\x00" * SIZE,
    "carriage returns": b"\r" * SIZE,
    "line feeds": b"\n" * SIZE,
    "colons": b":" * SIZE,
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("data", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("max_header_size", [1_048_576, 4 * SIZE], ids=["default-limit", "large-limit"])
def test_hostile_input_stays_linear(data: bytes, max_header_size: int) -> None:
    """About 1 MB built to trigger quadratic behaviour is handled in well under five seconds
    (a quadratic parser needs minutes)."""
    started = time.perf_counter()
    exercise(data, max_header_size=max_header_size)
    assert time.perf_counter() - started < 5.0

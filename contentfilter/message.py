"""The message view shared by the content checks: parsed once, the rest computed on demand.

The content filter receives each message as bytes, exactly as it came over SMTP (after dot
unstuffing). :meth:`Message.parse` does only the work every check needs: it finds the header
block and splits it into fields, with plain bytes operations and no ``email`` package. Checks
share the one :class:`Message`; everything else (the MIME parts, attachments, the decoded text,
the URLs, the body's defects) is computed the first time a check asks for it and kept.

Nothing here raises on message content, however broken: parsing and every lazy property finish
in time linear in the message size, and the work is bounded (``MAX_PARTS``, ``MAX_DEPTH``,
``MAX_DECODED_SIZE``, ``MAX_TEXT``, ``MAX_URLS``). What was wrong is reported as short words
in :attr:`Message.defects`, for the operator and for checks that score malformed mail.

Header block
    A field starts at a line that begins with a name (printable ASCII or 8-bit bytes, no space,
    control character or colon), optional spaces or tabs, and a colon (RFC 5322 section 2.2 and
    the obsolete space before the colon, section 4.5). Lines that start with a space or a tab
    continue the field before them (folding; also a line of whitespace only). Lines may end in
    CRLF or in a bare LF. The block ends at the first empty line; the body starts after it.

    A first line ``From ...`` that is not a field (an mbox separator, as in a file saved from a
    mailbox) is skipped and kept in ``raw``. Any other line that is neither a field nor a
    continuation (including a continuation with no field before it) ends the header block there
    and starts the body, without a separator: this is how Postfix's cleanup and Python's own
    parser read such a message, so the checks see the same header the MTA saw and the
    recipient's program will show, and a junk line cannot hide later "headers" from either.

    The fields parsed are bounded by ``max_header_size`` (bytes from the start of the message):
    a field that does not end within it, and every field after it, is left unparsed. The body
    still starts after the first empty line, wherever it is.

:class:`Header` values are unfolded (the line ends before folding whitespace removed), with
leading whitespace and the trailing CR and LF stripped, and decoded as UTF-8 with
``surrogateescape``, so ``value.encode("utf-8", "surrogateescape")`` gives the bytes back.
:meth:`Message.decoded` and :func:`decode_words` also decode RFC 2047 encoded words.

MIME parts (on first access to ``parts``, ``attachments``, ``text``, ``urls`` or ``defects``)
    Multiparts are split at their boundary lines (RFC 2046 section 5.1.1: ``--boundary``,
    optionally ``--`` for the last one, then only whitespace to the line end); the preamble
    and epilogue are skipped. ``message/rfc822`` parts are opened and their parts listed too.
    The children of ``multipart/digest`` default to ``message/rfc822``, everything else to
    ``text/plain`` (RFC 2045 section 5.2, also for an invalid Content-Type). A multipart with
    no boundary parameter, or whose boundary never occurs, is read as one text/plain part, so
    its content is still scanned. Transfer encodings base64 and quoted-printable are decoded
    leniently (junk characters skipped, missing padding added); any other encoding is kept as
    it is. Parameters follow RFC 2045 and RFC 2231 (``filename*=utf-8''...`` and numbered
    continuations), and RFC 2047 encoded words in a filename are decoded too. A
    Content-Disposition other than inline or attachment counts as attachment (RFC 2183
    section 2.8).

``text`` joins the text/plain parts and the text/html parts rendered to plain text (comments,
scripts and styles dropped, tags removed, block tags as line breaks, entities decoded), except
parts sent as attachments, up to ``MAX_TEXT`` characters. ``urls`` lists the http, https and
ftp URLs and the bare ``www.`` host names in those parts' text and in the ``href`` attributes of
their HTML, each once, in the order found, at most ``MAX_URLS``.

Defect words
    header:  no-body-separator (no empty line after the header), malformed-header-line,
             header-too-large, mbox-from-line, bare-lf, nul-byte (also in the body)
    MIME:    missing-boundary (multipart without a boundary parameter), boundary-not-found,
             missing-close-boundary, bad-content-type, bad-base64, unknown-charset,
             too-many-parts, mime-too-deep, decoded-size-limit, mime-parse-error (a part
             could not be read at all; the parts found so far are kept)

:meth:`Message.rewrite` builds the message to pass on: new fields at the top of the header
(below an mbox ``From`` line, so that the result reads the same way), fields removed or
replaced by index, and every other byte as received (the mbox line, unparsed header bytes, the
separator and the body).
"""

from __future__ import annotations

import binascii
import codecs
import functools
import html
import itertools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from urllib.parse import unquote_to_bytes

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE",
    "MAX_DECODED_SIZE",
    "MAX_DEPTH",
    "MAX_PARTS",
    "MAX_TEXT",
    "MAX_URLS",
    "Header",
    "Message",
    "Part",
    "decode_words",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_HEADER_SIZE = 1_048_576
"""Bytes of header parsed by default; the rest of a larger header block is kept, not split."""
MAX_PARTS = 1000
"""MIME entities (containers and leaves) read per message; beyond: ``too-many-parts``."""
MAX_DEPTH = 30
"""Nesting of multiparts and attached messages; deeper ones are one leaf (``mime-too-deep``)."""
MAX_DECODED_SIZE = 128 * 1024 * 1024
"""Decoded payload bytes kept for all parts together; beyond: ``decoded-size-limit``."""
MAX_TEXT = 1024 * 1024
"""Characters of ``Message.text``."""
MAX_URLS = 1000
"""Entries of ``Message.urls``."""

_MAX_PART_HEADER = 256 * 1024  # header bytes parsed per MIME part
_MAX_HTML = 4 * 1024 * 1024  # bytes of one HTML part rendered to text
_MAX_PARAMS_TEXT = 16 * 1024  # characters of a Content-Type / Content-Disposition value read
_MAX_PARAMS = 64  # parameters read per value
_MAX_CONTINUATIONS = 100  # RFC 2231 sections per parameter
_MAX_BASE64_PIECES = 2000  # separately padded base64 pieces decoded one by one

# One header field at a position: the name, optional WSP, the colon, then the rest of the line
# and any continuation lines (each line ends in LF, or at the end of the block).
_FIELD = re.compile(rb"([^\x00-\x20\x7f:]+)[ \t]*:([^\n]*\n?(?:[ \t][^\n]*\n?)*)")
# The same for findall; "^" keeps its search to line starts (linear on lines that are not fields).
_FIELDS = re.compile(rb"^(([^\x00-\x20\x7f:]+)[ \t]*:([^\n]*\n?(?:[ \t][^\n]*\n?)*))", re.MULTILINE)
_FIELD_TEXT = re.compile(r"[!-9;-~]+[ \t]*:[^\r\n\x00]*(?:\r?\n[ \t][^\r\n\x00]*)*")


@dataclass(frozen=True, slots=True)
class Header:
    """One header field: ``name`` as written, the unfolded ``value``, and the ``raw`` bytes."""

    name: str
    value: str
    raw: bytes

    @property
    def lname(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Part:
    """One leaf MIME part, its transfer encoding undone."""

    content_type: str
    charset: str
    filename: str
    disposition: str
    size: int
    payload: bytes

    @property
    def is_attachment(self) -> bool:
        return bool(self.filename) or self.disposition == "attachment"

    @property
    def text(self) -> str | None:
        """The payload as text for text/* parts (its charset, else UTF-8, else Latin-1)."""
        if not self.content_type.startswith("text/"):
            return None
        return _decode_bytes(self.payload, self.charset)


class _Scan:
    """What splitting one header block found (see :func:`_scan_header`)."""

    __slots__ = ("body_offset", "defects", "fields", "fields_end", "first")

    def __init__(
        self, fields: list[Header], first: int, fields_end: int, body_offset: int, defects: list[str]
    ) -> None:
        self.fields = fields
        self.first = first  # where the first field starts (after an mbox line)
        self.fields_end = fields_end  # where the last parsed field ends
        self.body_offset = body_offset
        self.defects = defects


def _scan_header(data: bytes, start: int, end: int, limit: int, mbox: bool) -> _Scan:
    """Split the header block of the entity ``data[start:end]`` into fields."""
    defects: list[str] = []
    # The block ends at the first empty line: a line end followed by CRLF or LF.
    if data.startswith(b"\n", start, end):
        sep, body = start, start + 1
    elif data.startswith(b"\r\n", start, end):
        sep, body = start, start + 2
    else:
        crlf = data.find(b"\n\r\n", start, end)
        lf = data.find(b"\n\n", start, end if crlf == -1 else crlf + 1)
        if lf != -1:
            sep, body = lf + 1, lf + 2
        elif crlf != -1:
            sep, body = crlf + 1, crlf + 3
        else:
            sep = body = end
    pos = start
    if mbox and data.startswith(b"From ", pos, sep) and _FIELD.match(data, pos, sep) is None:
        nl = data.find(b"\n", pos, end)
        if nl != -1:  # a line of its own (without a line end it is just a malformed line)
            pos = nl + 1
            defects.append("mbox-from-line")
    first = pos
    cap = start + max(limit, 0)
    if sep <= cap:
        # The common case: the whole block is fields. findall splits it in one C call; the
        # fields tile the block exactly when their lengths add up to its length.
        found = _FIELDS.findall(data, pos, sep)
        if sum(len(raw) for raw, _, _ in found) == sep - pos:
            fields = [
                Header(
                    name.decode("ascii", "surrogateescape"),
                    _unfold(value).decode("utf-8", "surrogateescape"),
                    raw,
                )
                for raw, name, value in found
            ]
            return _Scan(fields, first, sep, body, _separator_defect(defects, sep, body, start, end))
    stop = min(sep, cap)
    fields = []
    match = _FIELD.match
    while pos < sep:
        if pos >= cap:
            defects.append("header-too-large")
            break
        m = match(data, pos, stop)
        if m is None:
            if stop < sep and match(data, pos, sep) is not None:
                defects.append("header-too-large")
            else:
                defects.append("malformed-header-line")
                body = pos  # the body starts at the line that is not a field
            break
        e = m.end()
        if e == stop and stop < sep and not (data[e - 1] == 0x0A and data[e] not in b" \t"):
            defects.append("header-too-large")  # the field goes on past the limit
            break
        fields.append(
            Header(
                m.group(1).decode("ascii", "surrogateescape"),
                _unfold(m.group(2)).decode("utf-8", "surrogateescape"),
                m.group(0),
            )
        )
        pos = e
    return _Scan(fields, first, pos, body, _separator_defect(defects, sep, body, start, end))


def _unfold(value: bytes) -> bytes:
    """A field's value: trailing CR/LF, the line ends of folding and leading WSP removed."""
    return value.rstrip(b"\r\n").replace(b"\r\n", b"").replace(b"\n", b"").lstrip(b" \t")


def _separator_defect(defects: list[str], sep: int, body: int, start: int, end: int) -> list[str]:
    if sep == end and body == end and end > start:
        defects.append("no-body-separator")
    return defects


class Message:
    """A received message: its header fields, parsed at once, and lazily its MIME content."""

    raw: bytes
    size: int
    headers: tuple[Header, ...]
    body_offset: int
    header_defects: tuple[str, ...]
    """The defects found by :meth:`parse` alone (the header block); cheap, unlike ``defects``."""

    def __init__(
        self, data: bytes | bytearray | memoryview, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    ) -> None:
        if not isinstance(data, bytes):
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"a message is bytes, not {type(data).__name__}")
            data = bytes(data)
        self.raw = data
        self.size = len(data)
        try:
            scan = _scan_header(data, 0, len(data), max_header_size, mbox=True)
        except Exception:  # a bug here must not lose the message: keep it all as body
            _log.exception("header parsing failed; treating the message as body only")
            scan = _Scan([], 0, 0, 0, ["malformed-header-line"])
        self.headers = tuple(scan.fields)
        self.body_offset = scan.body_offset
        self._first = scan.first
        self._fields_end = scan.fields_end
        defects = scan.defects
        head = scan.body_offset
        if data.count(b"\n", 0, head) != data.count(b"\r\n", 0, head):
            defects.append("bare-lf")
        if data.find(b"\x00", 0, head) != -1:
            defects.append("nul-byte")
        self.header_defects = tuple(defects)

    @classmethod
    def parse(
        cls, data: bytes | bytearray | memoryview, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    ) -> Message:
        """Split the header of ``data``; never raises on content (only on a non-bytes type)."""
        return cls(data, max_header_size=max_header_size)

    def __repr__(self) -> str:
        return f"<Message size={self.size} headers={len(self.headers)} body_offset={self.body_offset}>"

    # -- header lookups -------------------------------------------------------------------

    @cached_property
    def _index(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for i, header in enumerate(self.headers):
            index.setdefault(header.name.lower(), []).append(i)
        return index

    def indexes(self, name: str) -> list[int]:
        """Positions in :attr:`headers` of the fields called ``name`` (any case)."""
        return list(self._index.get(name.lower(), ()))

    def get(self, name: str) -> str | None:
        """The value of the first field called ``name`` (any case), or None."""
        found = self._index.get(name.lower())
        return self.headers[found[0]].value if found else None

    def get_all(self, name: str) -> list[str]:
        return [self.headers[i].value for i in self._index.get(name.lower(), ())]

    def count(self, name: str) -> int:
        return len(self._index.get(name.lower(), ()))

    def decoded(self, name: str) -> str | None:
        """The first field called ``name`` with its RFC 2047 encoded words decoded."""
        value = self.get(name)
        return None if value is None else decode_words(value)

    @cached_property
    def body(self) -> bytes:
        return self.raw[self.body_offset :]

    # -- lazily computed content ----------------------------------------------------------

    @cached_property
    def _mime(self) -> tuple[tuple[Part, ...], tuple[str, ...]]:
        walk = _Walk()
        try:
            walk.dispatch(
                self.raw, self.headers, self.body_offset, len(self.raw), depth=0, default="text/plain"
            )
        except Exception:  # a part the walk could not read: keep what was found
            _log.warning("MIME structure not read to the end", exc_info=True)
            walk.defects.append("mime-parse-error")
            if not walk.parts:
                body = self.raw[self.body_offset : self.body_offset + MAX_DECODED_SIZE]
                walk.parts.append(Part("text/plain", "", "", "", len(body), body))
        return tuple(walk.parts), tuple(walk.defects)

    @cached_property
    def parts(self) -> tuple[Part, ...]:
        """The leaf MIME parts in order; a message that is not MIME is one text/plain part,
        a multipart with nothing between its delimiters has none."""
        return self._mime[0]

    @cached_property
    def attachments(self) -> tuple[Part, ...]:
        """The parts with a filename or sent as attachments."""
        return tuple(part for part in self.parts if part.is_attachment)

    @cached_property
    def defects(self) -> tuple[str, ...]:
        """Every defect word: the header's, the body's and the MIME structure's (this reads
        the MIME structure; ``header_defects`` has the header's alone)."""
        words = list(self.header_defects)
        raw, start = self.raw, self.body_offset
        if raw.find(b"\x00", start) != -1:
            words.append("nul-byte")
        if raw.count(b"\n", start) != raw.count(b"\r\n", start):
            words.append("bare-lf")
        words.extend(self._mime[1])
        return tuple(dict.fromkeys(words))

    @cached_property
    def _texts(self) -> tuple[tuple[str, str], ...]:
        """(plain text, HTML source or "") of each text part that is not an attachment."""
        found: list[tuple[str, str]] = []
        total = 0
        try:
            for part in self.parts:
                if total >= MAX_TEXT:
                    break
                if part.disposition == "attachment":
                    continue
                if part.content_type == "text/plain":
                    text = _decode_bytes(part.payload[: (MAX_TEXT - total) * 4], part.charset)
                    source = ""
                elif part.content_type == "text/html":
                    source = _drop_invisible(_decode_bytes(part.payload[:_MAX_HTML], part.charset))
                    text = _html_to_text(source)
                else:
                    continue
                text = text[: MAX_TEXT - total]
                total += len(text)
                found.append((text, source))
        except Exception:
            _log.warning("text extraction failed", exc_info=True)
        return tuple(found)

    @cached_property
    def text(self) -> str:
        """The decoded text of the text/plain and text/html parts (HTML as plain text)."""
        return "\n".join(text for text, _ in self._texts)

    @cached_property
    def urls(self) -> tuple[str, ...]:
        """http(s)/ftp URLs and bare www. hosts in the text and in HTML links, each once."""
        seen: dict[str, None] = {}
        try:
            for text, source in self._texts:
                if source:
                    for url in _hrefs(source):
                        seen.setdefault(url)
                        if len(seen) >= MAX_URLS:
                            return tuple(seen)
                for url in _text_urls(text):
                    seen.setdefault(url)
                    if len(seen) >= MAX_URLS:
                        return tuple(seen)
        except Exception:
            _log.warning("URL extraction failed", exc_info=True)
        return tuple(seen)

    # -- output ---------------------------------------------------------------------------

    def rewrite(
        self,
        *,
        prepend: Sequence[str] = (),
        remove: Iterable[int] = (),
        replace: Mapping[int, str] = MappingProxyType({}),
    ) -> bytes:
        """The message with ``prepend`` fields at the top of the header, the fields at the
        indexes in ``remove`` left out and those in ``replace`` substituted; every other
        byte as received. Each new field is ``"Name: value"`` (folding with ``"\\r\\n\\t"``
        allowed), written as UTF-8 and ended with CRLF. Raises ValueError for a field that
        is not one header field, or an index that is not one of :attr:`headers`."""
        count = len(self.headers)
        dropped: set[int] = set()
        for index in remove:
            dropped.add(self._check_index(index, count, "remove"))
        substitutes: dict[int, bytes] = {}
        for index, text in replace.items():
            if self._check_index(index, count, "replace") in dropped:
                raise ValueError(f"header {index} is both removed and replaced")
            substitutes[index] = _field_bytes(text)
        added = [_field_bytes(text) for text in prepend]
        if not added and not dropped and not substitutes:
            return self.raw
        raw = memoryview(self.raw)
        out: list[bytes | memoryview] = [raw[: self._first], *added]
        if not dropped and not substitutes:
            out.append(raw[self._first :])
        else:
            for index, header in enumerate(self.headers):
                if index in substitutes:
                    out.append(substitutes[index])
                elif index not in dropped:
                    out.append(header.raw)
            out.append(raw[self._fields_end :])
        return b"".join(out)

    @staticmethod
    def _check_index(index: int, count: int, what: str) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"{what}: {index!r} is not the index of one of the {count} header fields")
        return index


def _field_bytes(text: str) -> bytes:
    """``"Name: value"`` as one CRLF-terminated field, or ValueError."""
    if not isinstance(text, str):
        raise TypeError(f"a header field is a str, not {type(text).__name__}")
    body = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    if _FIELD_TEXT.fullmatch(body) is None:
        raise ValueError(
            f"not one header field: {text[:80]!r} (want 'Name: value', continuation lines "
            "starting with a space or tab, no bare CR and no NUL)"
        )
    try:
        data = body.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise ValueError(f"header field {text[:80]!r} cannot be written as UTF-8: {exc}") from exc
    return data + b"\r\n"


# -- MIME -------------------------------------------------------------------------------------

_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_IDENTITY_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


class _Walk:
    """The state of one walk through a message's MIME tree."""

    __slots__ = ("budget", "defects", "entities", "full", "parts")

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.defects: list[str] = []
        self.budget = MAX_DECODED_SIZE
        self.entities = 0
        self.full = False

    def entity(self, data: bytes, start: int, end: int, depth: int, default: str) -> None:
        """A MIME entity (header and body) at ``data[start:end]``."""
        scan = _scan_header(data, start, end, _MAX_PART_HEADER, mbox=False)
        for word in scan.defects:
            if word != "no-body-separator":  # a part holding only a header is common enough
                self.defects.append(word)
        self.dispatch(data, scan.fields, min(scan.body_offset, end), end, depth=depth, default=default)

    def dispatch(
        self, data: bytes, fields: Sequence[Header], body: int, end: int, *, depth: int, default: str
    ) -> None:
        if self.full:
            return
        self.entities += 1
        if self.entities > MAX_PARTS:
            self.defects.append("too-many-parts")
            self.full = True
            return
        ctype_value = encoding = disposition_value = None
        for header in fields:
            lname = header.name.lower()
            if lname == "content-type" and ctype_value is None:
                ctype_value = header.value
            elif lname == "content-transfer-encoding" and encoding is None:
                encoding = header.value
            elif lname == "content-disposition" and disposition_value is None:
                disposition_value = header.value
        ctype, params = default, dict[str, str]()
        if ctype_value is not None:
            main, params = _parse_params(ctype_value)
            if _CONTENT_TYPE.fullmatch(main):
                ctype = main
            else:
                ctype = "text/plain"
                if main:
                    self.defects.append("bad-content-type")
        cte = (encoding or "").strip().lower()
        if ctype.startswith("multipart/"):
            if depth >= MAX_DEPTH:
                self.defects.append("mime-too-deep")
            elif not params.get("boundary"):
                self.defects.append("missing-boundary")
                ctype = "text/plain"
            else:
                delimiter = b"--" + params["boundary"].encode("utf-8", "surrogateescape")
                bodies = self._split(data, body, end, delimiter)
                if bodies is not None:
                    child = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                    for part_start, part_end in bodies:
                        self.entity(data, part_start, part_end, depth + 1, child)
                        if self.full:
                            break
                    return
                self.defects.append("boundary-not-found")
                ctype = "text/plain"
        elif ctype == "message/rfc822":
            if depth >= MAX_DEPTH:
                self.defects.append("mime-too-deep")
            elif cte in _IDENTITY_ENCODINGS:
                self.entity(data, body, end, depth + 1, "text/plain")
                return
            else:
                inner = self._decode(data, body, end, cte)
                self.entity(inner, 0, len(inner), depth + 1, "text/plain")
                return
        disposition, disposition_params = "", dict[str, str]()
        if disposition_value is not None:
            main, disposition_params = _parse_params(disposition_value)
            if main in ("inline", "attachment"):
                disposition = main
            elif main:
                disposition = "attachment"  # RFC 2183 section 2.8
        filename = disposition_params.get("filename") or params.get("name") or ""
        if "=?" in filename:
            filename = decode_words(filename)
        charset = params.get("charset", "").strip().lower()
        if charset and ctype.startswith("text/") and _codec(charset) is None:
            self.defects.append("unknown-charset")
        payload = self._decode(data, body, end, cte)
        self.parts.append(Part(ctype, charset, filename, disposition, len(payload), payload))

    def _decode(self, data: bytes, start: int, end: int, cte: str) -> bytes:
        """The body ``data[start:end]`` with its transfer encoding undone, within the budget."""
        if self.budget <= 0:
            self.defects.append("decoded-size-limit")
            return b""
        if end - start > 2 * self.budget + 16:
            end = start + 2 * self.budget + 16
        encoded = data[start:end]
        if cte == "base64":
            payload, ok = _base64(encoded)
            if not ok:
                self.defects.append("bad-base64")
        elif cte == "quoted-printable":
            payload = binascii.a2b_qp(encoded)
        else:
            payload = encoded
        if len(payload) > self.budget:
            payload = payload[: self.budget]
            self.defects.append("decoded-size-limit")
        self.budget -= len(payload)
        return payload

    def _split(self, data: bytes, start: int, end: int, delimiter: bytes) -> list[tuple[int, int]] | None:
        """The (start, end) of each body part between the delimiter lines, or None if none."""
        lines: list[tuple[int, int]] = []  # (where the delimiter line starts, where it ends)
        closed = False
        size = len(delimiter)
        find = data.find
        at = find(delimiter, start, end)
        while at != -1:
            if len(lines) > MAX_PARTS:  # the walk stops there anyway (too-many-parts)
                closed = True
                break
            if at == start or data[at - 1] == 0x0A:
                after = at + size
                last = data.startswith(b"--", after, end)
                nl = find(b"\n", after, end)
                line_end = end if nl == -1 else nl + 1
                if not data[after + 2 if last else after : line_end].strip():
                    lines.append((at, line_end))
                    if last:
                        closed = True
                        break
            at = find(delimiter, at + 1, end)
        if not lines:
            return None
        if not closed:
            self.defects.append("missing-close-boundary")
        bodies: list[tuple[int, int]] = []
        for (_, part_start), (next_at, _) in itertools.pairwise(lines):
            part_end = next_at - 1  # the line end before a delimiter belongs to the delimiter
            if part_end > part_start and data[part_end - 1] == 0x0D:
                part_end -= 1
            bodies.append((part_start, max(part_start, part_end)))
        if not closed:
            bodies.append((lines[-1][1], end))
        return bodies


def _base64(data: bytes) -> tuple[bytes, bool]:
    """Leniently decoded base64 and whether it was well formed."""
    trimmed = data.rstrip()
    if b"=" in trimmed.rstrip(b"=") and trimmed.count(b"=") <= _MAX_BASE64_PIECES:
        # Padding in the middle: separately encoded pieces glued together.
        pieces = [_base64_loose(piece) for piece in re.findall(rb"[^=]+=*", trimmed)]
        return b"".join(pieces), True
    try:
        return binascii.a2b_base64(data), True
    except (binascii.Error, ValueError):
        return _base64_loose(data), False


_B64_DELETE = bytes(c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/")))


def _base64_loose(data: bytes) -> bytes:
    clean = data.translate(None, _B64_DELETE)
    extra = len(clean) % 4
    if extra == 1:
        clean = clean[:-1]
    elif extra:
        clean += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return data


_QUOTED = re.compile(r'"((?:[^"\\]|\\.?)*)(?:"|\Z)', re.DOTALL)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _parse_params(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; key=value; ...`` → (main value lowercased, parameters by lowercase
    name), with RFC 2231 sections joined and decoded."""
    value = value[:_MAX_PARAMS_TEXT]
    semi = value.find(";")
    main = (value if semi == -1 else value[:semi]).strip().lower()
    plain: dict[str, str] = {}
    sections: dict[str, dict[int, tuple[str, bool]]] = {}
    extended: dict[str, str] = {}
    n = len(value)
    i = n if semi == -1 else semi + 1
    for _ in range(_MAX_PARAMS):
        while i < n and value[i] in " \t\r\n;":
            i += 1
        if i >= n:
            break
        eq = value.find("=", i)
        sc = value.find(";", i)
        if eq == -1 or (sc != -1 and sc < eq):  # a parameter without a value
            i = n if sc == -1 else sc + 1
            continue
        name = value[i:eq].strip().lower()
        j = eq + 1
        while j < n and value[j] in " \t":
            j += 1
        if j < n and value[j] == '"':
            m = _QUOTED.match(value, j)
            text = _ESCAPE.sub(r"\1", m.group(1)) if m else value[j + 1 :]
            i = m.end() if m else n
            sc = value.find(";", i)
            i = n if sc == -1 else sc + 1
        else:
            sc = value.find(";", j)
            text = (value[j:] if sc == -1 else value[j:sc]).strip()
            i = n if sc == -1 else sc + 1
        if not name:
            continue
        star = name.find("*")
        if star == -1:
            plain.setdefault(name, text)
            continue
        base, rest = name[:star], name[star + 1 :]
        if rest == "":
            extended.setdefault(base, _rfc2231([(text, True)]))
            continue
        number = rest.removesuffix("*")
        if number.isascii() and number.isdigit() and int(number) < _MAX_CONTINUATIONS:
            sections.setdefault(base, {}).setdefault(int(number), (text, rest.endswith("*")))
    for base, found in sections.items():
        extended.setdefault(base, _rfc2231([found[k] for k in sorted(found)]))
    plain.update(extended)  # RFC 2231 values win over plain ones
    return main, plain


def _rfc2231(sections: list[tuple[str, bool]]) -> str:
    """Join RFC 2231 sections (text, percent-encoded?); the first encoded one names the charset."""
    charset = ""
    data = bytearray()
    for index, (section, encoded) in enumerate(sections):
        text = section
        if encoded:
            if index == 0 and text.count("'") >= 2:
                charset, _, rest = text.partition("'")
                text = rest.partition("'")[2]
            data += unquote_to_bytes(text.encode("utf-8", "surrogateescape"))
        else:
            data += text.encode("utf-8", "surrogateescape")
    return _decode_bytes(bytes(data), charset.lower())


# -- charsets and RFC 2047 ----------------------------------------------------------------------

_CHARSET_ALIASES = {
    "x-sjis": "shift_jis",
    "windows-874": "cp874",
    "iso-8859-8-i": "iso8859-8",
    "iso-8859-6-i": "iso8859-6",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "iso-8859-1": "cp1252",  # what browsers and mail readers show for it
    "latin1": "cp1252",
    "x-mac-roman": "mac_roman",
}
_AUTO_CHARSETS = frozenset({"us-ascii", "ascii", "unknown", "unknown-8bit", "x-unknown", "x-user-defined"})
_UNSAFE_CODECS = frozenset({"idna", "punycode", "undefined", "unicode-escape", "raw-unicode-escape"})


@functools.lru_cache(maxsize=512)
def _codec(charset: str) -> str | None:
    """The Python codec for a MIME charset name, or None (unknown, or not a plain text codec)."""
    name = _CHARSET_ALIASES.get(charset, charset)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    if info.name in _UNSAFE_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_bytes(data: bytes, charset: str) -> str:
    """Text in ``charset``; UTF-8, then Latin-1, when it is missing, unknown or ASCII."""
    charset = charset.strip().strip('"').lower()
    codec = _codec(charset) if charset and charset not in _AUTO_CHARSETS else None
    if codec is not None:
        try:
            return data.decode(codec, "replace")
        except Exception:  # a codec that fails even in "replace" mode
            _log.debug("charset %r failed to decode", charset, exc_info=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_BASE64_WORD = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?]*)\?=")


def decode_words(text: str) -> str:
    """``text`` with its RFC 2047 encoded words decoded (whitespace between two encoded words
    dropped); a word that cannot be decoded is kept as written. Never raises."""
    if "=?" not in text:
        return text
    try:
        out: list[str] = []
        last = 0
        after_word = False
        for m in _ENCODED_WORD.finditer(text):
            gap = text[last : m.start()]
            if not (after_word and not gap.strip(" \t\r\n")):
                out.append(gap)
            word = _decode_word(m.group(1), m.group(2), m.group(3))
            out.append(m.group(0) if word is None else word)
            after_word = word is not None
            last = m.end()
        out.append(text[last:])
        return "".join(out)
    except Exception:
        _log.warning("encoded words not decoded", exc_info=True)
        return text


def _decode_word(charset: str, encoding: str, encoded: str) -> str | None:
    data = encoded.encode("utf-8", "surrogateescape")
    if encoding in "bB":
        if _BASE64_WORD.fullmatch(data) is None:
            return None
        decoded, _ = _base64(data)
    else:
        decoded = binascii.a2b_qp(data, header=True)
    return _decode_bytes(decoded, charset.partition("*")[0].lower())


# -- text and URLs ------------------------------------------------------------------------------

_INVISIBLE = re.compile(r"<!--.*?(?:-->|\Z)|<(script|style)\b.*?(?:</\1\s*>|\Z)", re.DOTALL | re.IGNORECASE)
_BLOCK_TAG = re.compile(
    r"</?(?:br|p|div|tr|li|h[1-6]|table|blockquote|hr|title|ul|ol|pre|td|th|section|article|header|footer)"
    r"\b[^>]*(?:>|\Z)",
    re.IGNORECASE,
)
_TAG = re.compile(r"<[a-zA-Z/!?][^>]*(?:>|\Z)")
_SPACES = re.compile(r"[^\S\n]+")
_LINE_END_SPACE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_HREF = re.compile(r"""\bhref\s*=\s*(?:"([^"]*)(?:"|\Z)|'([^']*)(?:'|\Z)|([^\s"'>]+))""", re.IGNORECASE)
# The first letter is matched alone so that the search can skip to the next h, f or w quickly.
_URL = re.compile(
    r"[hHfFwW](?:(?<=[hH])[tT][tT][pP][sS]?://|(?<=[fF])[tT][pP]://"
    r"|(?<![\w.@/-][wW])(?<=[wW])[wW][wW]\.(?=[\w-]+\.[\w-]))"
    r"[^\s<>\"'`{}|\\^\[\]]+"
)
_URL_SCHEME = re.compile(r"(?:https?|ftp)://.|www\.[\w-]+\.[\w-]", re.IGNORECASE)
_URL_TRAILING = ".,;:!?'\")>*"
_URL_WHITESPACE = str.maketrans("", "", "\t\r\n")


def _drop_invisible(source: str) -> str:
    """HTML without comments, scripts and styles."""
    return _INVISIBLE.sub("", source)


def _html_to_text(source: str) -> str:
    """Visible text of HTML (already without comments, scripts and styles)."""
    text = _TAG.sub("", _BLOCK_TAG.sub("\n", source))
    text = _LINE_END_SPACE.sub("\n", _SPACES.sub(" ", html.unescape(text)))
    return _BLANK_LINES.sub("\n\n", text).strip()


def _hrefs(source: str) -> Iterable[str]:
    for m in _HREF.finditer(source):
        value = m.group(1) if m.group(1) is not None else m.group(2) if m.group(2) is not None else m.group(3)
        url = html.unescape(value).strip().translate(_URL_WHITESPACE)
        if _URL_SCHEME.match(url):
            yield url


def _text_urls(text: str) -> Iterable[str]:
    for m in _URL.finditer(text):
        url = m.group(0)
        while url and url[-1] in _URL_TRAILING:
            if url[-1] == ")" and url.count("(") >= url.count(")"):
                break
            url = url[:-1]
        if _URL_SCHEME.match(url):
            yield url

"""Authentication-Results (RFC 8601): build our one header field, and find the ones that claim us.

The content filter collects what its checks found (SPF, iprev, DKIM, DMARC, ...) as
:class:`AuthResult` entries and writes ONE field per message::

    Authentication-Results: mx.example.org;
            spf=pass smtp.mailfrom=example.com;
            dkim=fail reason="signature did not verify" header.d=example.com
              header.s=sel header.b=abcdEFGH

(each continuation line starts with a TAB).

A message that arrives with fields carrying our authserv-id was forged or replayed: downstream
filters and mail clients trust our id, so :func:`ours` lists them for removal before ours is
added (RFC 8601 section 5 says remove or rename; mxward removes).

Building is safe for any input, because several values come from the client (the MAIL FROM
domain, a DKIM ``d=``, a HELO name):

* method, result, ptype and property names must match ``[A-Za-z0-9._-]+``. An entry whose method
  or result does not is dropped whole; a property whose ptype or name does not is dropped alone
  (the rest of its entry is still written). Each drop is logged as a warning: these names come
  from the checks' code, so a drop is a bug there, never a client's doing;
* every value is one line of printable ASCII: CR, LF, TAB and other white space become one
  space, and any other control character or non-ASCII character becomes ``?`` (a domain name in
  Unicode is written as its ASCII form, ``xn--...``, first). A value longer than
  :data:`MAX_VALUE` characters is cut and ends in ``...``;
* a property value that is an RFC 2045 token, or a ``local-part@domain`` address with a
  dot-atom local part and a host name, is written as it is; anything else (a cut value, one with
  ``;``, ``(``, ``"`` or spaces) becomes a quoted-string with ``\\`` and ``"`` escaped. A reason
  is always a quoted-string;
* the authserv-id (from the configuration) must be an RFC 2045 token: :func:`build_header`
  raises ``ValueError`` for anything else.

The field is folded with CRLF TAB before each entry, and inside an entry before a word that
would take the line past 78 characters; no word is longer than a few hundred characters, so no
line gets near RFC 5322's limit of 998. The null sender's ``smtp.mailfrom`` (RFC 8601 section
2.7.2 asks for the HELO domain then) is the caller's business: values are written as given.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mxward.shared.headers import comment_end

__all__ = [
    "FIELD_NAME",
    "MAX_VALUE",
    "AuthResult",
    "HeaderField",
    "authserv_id_of",
    "build_header",
    "claims_authserv_id",
    "ours",
]

log = logging.getLogger(__name__)

FIELD_NAME = "Authentication-Results"
MAX_VALUE = 256
"""Longest value written (characters before quoting); longer ones are cut and end in ``...``."""

_LINE = 78
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME = 64
# RFC 2045 token: printable ASCII except SPACE and tspecials ()<>@,;:\"/[]?=
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS = re.compile(rf"(?:{_ATEXT}(?:\.{_ATEXT})*)?@{_DOMAIN}")
_WHITESPACE = re.compile(r"\s+")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One resinfo: ``method=result reason="..." ptype.property=value ...``.

    ``properties`` are ``("ptype.property", value)`` pairs in the order written, e.g.
    ``(("smtp.mailfrom", "example.com"),)`` or ``(("header.d", "example.com"),)``.
    """

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()


class HeaderField(Protocol):
    """What :func:`ours` reads of a header field (the content filter's ``Header``)."""

    @property
    def lname(self) -> str: ...

    @property
    def value(self) -> str: ...


# ---------------------------------------------------------------------------------------------
# building


def build_header(authserv_id: str, results: Sequence[AuthResult]) -> str:
    """The whole field, ``Authentication-Results: <authserv-id>; ...``, without a final CRLF.

    Entries are written in the order given; with none left (or none given) the field says
    ``; none``. Raises ``ValueError`` when ``authserv_id`` is not an RFC 2045 token.
    """
    if len(authserv_id) > 255 or not _TOKEN.fullmatch(authserv_id):
        raise ValueError(f"authserv-id {authserv_id!r} must be a host name or another RFC 2045 token")
    entries = [words for words in (_resinfo(r) for r in results) if words]
    head = f"{FIELD_NAME}: {authserv_id};"
    if not entries:
        return f"{head} none"
    lines = [head]
    for number, words in enumerate(entries, start=1):
        if number < len(entries):
            words[-1] += ";"
        line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > _LINE:
                lines.append(line)
                line = "\t  " + word
            else:
                line += " " + word
        lines.append(line)
    return "\r\n".join(lines)


def _resinfo(result: AuthResult) -> list[str]:
    """The words of one entry, or [] when its method or result name is not valid."""
    if not _valid_name(result.method) or not _valid_name(result.result):
        log.warning(
            "Authentication-Results: entry dropped, invalid method or result %r=%r",
            result.method[:_MAX_NAME],
            result.result[:_MAX_NAME],
        )
        return []
    words = [f"{result.method.lower()}={result.result.lower()}"]
    reason, _ = _clean(result.reason)
    if reason:
        words.append(f"reason={_quote(reason)}")
    for name, value in result.properties:
        ptype, dot, prop = name.partition(".")
        if not (dot and _valid_name(ptype) and _valid_name(prop)):
            log.warning(
                "Authentication-Results: %s property dropped, invalid name %r",
                result.method,
                name[:_MAX_NAME],
            )
            continue
        words.append(f"{ptype.lower()}.{prop.lower()}={_pvalue(value)}")
    return words


def _valid_name(name: str) -> bool:
    return len(name) <= _MAX_NAME and _NAME.fullmatch(name) is not None


def _pvalue(value: str) -> str:
    """A property value: as it is when a token or an address, else a quoted-string."""
    text, cut = _clean(_ascii_domain(value))
    if not cut and (_TOKEN.fullmatch(text) or _ADDRESS.fullmatch(text)):
        return text
    return _quote(text)


def _ascii_domain(value: str) -> str:
    """A Unicode domain name (after an ``@`` or as the whole value) in its ASCII form."""
    if value.isascii() or len(value) > MAX_VALUE:
        return value
    local, at, domain = value.rpartition("@")
    try:
        ascii_name = domain.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        return value
    return f"{local}{at}{ascii_name}"


def _clean(text: str) -> tuple[str, bool]:
    """One line of printable ASCII, at most MAX_VALUE characters, and whether it was cut.

    A cut value ends in ``...`` (and is always quoted, so it cannot pass for a whole token).
    """
    long_input = len(text) > 8 * MAX_VALUE  # bound the work on huge input
    text = _WHITESPACE.sub(" ", text[: 8 * MAX_VALUE]).strip()
    text = _NOT_PRINTABLE.sub("?", text)
    if len(text) > MAX_VALUE or long_input:
        return text[: MAX_VALUE - 3] + "...", True
    return text, False


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
# reading


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results field value, lowercased; ``""`` if none.

    Leading white space, line breaks and comments (nested, with quoted-pairs) are skipped; the
    id is the first RFC 2045 token, or the content of a quoted-string. What follows it (a
    version number, the first ``;``) is not examined: a broken field that still starts with
    our id counts as ours, so it is removed rather than passed on.
    """
    pos = _skip_cfws(value, 0)
    if pos is None or pos >= len(value):
        return ""
    if value[pos] == '"':
        content = _quoted_string(value, pos)
        return content.strip().lower() if content else ""
    match = _TOKEN.match(value, pos)
    return match.group().lower() if match else ""


def claims_authserv_id(value: str, authserv_id: str) -> bool:
    """Whether the field value's authserv-id is ``authserv_id`` (case-insensitive, exact).

    A trailing dot is ignored on both sides (``mx.example.org.`` is the same host name); a
    longer name that ends in ours (``evil.mx.example.org``) does not claim it.
    """
    wanted = authserv_id.strip().lower().removesuffix(".")
    found = authserv_id_of(value).removesuffix(".")
    return bool(wanted) and found == wanted


def ours(message_headers: Iterable[HeaderField], authserv_id: str) -> list[int]:
    """Indexes of the Authentication-Results fields that claim ``authserv_id``, to remove.

    Only ``Authentication-Results`` itself: ARC-Authentication-Results belong to ARC sets
    (RFC 8617) and are sealed, never removed.
    """
    wanted = FIELD_NAME.lower()
    return [
        index
        for index, header in enumerate(message_headers)
        if header.lname.strip() == wanted and claims_authserv_id(header.value, authserv_id)
    ]


def _skip_cfws(text: str, pos: int) -> int | None:
    """The position after white space and comments from ``pos``; None for an unclosed comment."""
    end = len(text)
    while pos < end:
        char = text[pos]
        if char in " \t\r\n":
            pos += 1
        elif char == "(":
            pos = comment_end(text, pos)
            if pos < 0:
                return None
        else:
            break
    return pos


def _quoted_string(text: str, pos: int) -> str | None:
    """The unescaped content of the quoted-string that starts at ``pos``; None if unclosed."""
    content: list[str] = []
    pos += 1
    end = len(text)
    while pos < end:
        char = text[pos]
        if char == "\\" and pos + 1 < end:
            content.append(text[pos + 1])
            pos += 2
            continue
        if char == '"':
            return "".join(content)
        content.append(char)
        pos += 1
    return None

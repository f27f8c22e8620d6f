"""Header fields: built from values a client or a database supplied (one safe line each), and
the one piece of RFC 5322 lexing every header parser needs (comments)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from mxward.shared.plugin import LogValue

__all__ = ["comment_end", "header_params"]

_TOKEN = re.compile(r"[A-Za-z0-9.\-_:/+]+")
_HEADER_DROP = re.compile(r'[\x00-\x1f\x7f";\\]')


def header_params(name: str, fields: Iterable[tuple[str, LogValue]]) -> str:
    """``Name: key=value; key="two words"`` with known fields only, as printable ASCII.

    Accents are folded (``São Paulo`` → ``Sao Paulo``); quotes, semicolons, backslashes and
    control characters are dropped, so a value can never end the parameter or the line.
    Values are cut at 100 characters; empty ones are left out, and so is a header with none.
    """
    parts: list[str] = []
    for key, value in fields:
        if value is None or value == "":
            continue
        text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode("ascii")
        text = " ".join(_HEADER_DROP.sub("", text).split())[:100]
        if not text:
            continue
        parts.append(f"{key}={text}" if _TOKEN.fullmatch(text) else f'{key}="{text}"')
    return f"{name}: {'; '.join(parts)}" if parts else ""


def comment_end(text: str, pos: int) -> int:
    """Where the comment opening at ``text[pos]`` (a "(") ends: the index after its ")", or -1.

    RFC 5322 section 3.2.2: comments nest, and a backslash quotes the character after it.
    """
    depth = 0
    end = len(text)
    while pos < end:
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    return -1

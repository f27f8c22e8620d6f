"""RESP encoding of command batches for the state store's auto-pipeline (compiled: see setup.py).

Every policy request that touches Redis goes through :func:`pack_commands`, so it lives apart from
:mod:`mxward.shared.state` (which setup.py cannot compile: it has async generators) and imports
nothing from redis-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

__all__ = ["pack_commands"]

# Encoded short strings: script SHAs, command names and fixed arguments recur on every call.
# Cleared when full, so one-off values (senders, keys) cannot crowd the recurring ones out.
_PACKED: dict[str, bytes] = {}
_PACKED_MAX_LEN: Final = 64
_PACKED_MAX_ENTRIES: Final = 4096
# The headers of arrays and bulk strings of the usual sizes, made once.
_ARRAY: Final = tuple(b"*%d\r\n" % n for n in range(64))
_BULK: Final = tuple(b"$%d\r\n" % n for n in range(1024))


def pack_commands(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """RESP for a batch of commands whose arguments are str, bytes, int or float.

    The same bytes redis-py's ``pack_commands`` makes, for the argument types mxward sends, at
    a fraction of its cost (it is on every request's path). Strings are UTF-8; the surrogate
    escapes that stand for undecodable bytes in a Postfix attribute become those bytes again.
    Anything else (bool included) raises TypeError.
    """
    out: list[bytes] = []
    cache = _PACKED
    for args in commands:
        count = len(args)
        out.append(_ARRAY[count] if count < len(_ARRAY) else b"*%d\r\n" % count)
        for arg in args:
            if type(arg) is str:
                text: str = arg
                if len(text) <= _PACKED_MAX_LEN:
                    piece = cache.get(text)
                    if piece is None:
                        data = text.encode("utf-8", "surrogateescape")
                        piece = b"$%d\r\n%s\r\n" % (len(data), data)
                        if len(cache) >= _PACKED_MAX_ENTRIES:
                            cache.clear()
                        cache[text] = piece
                    out.append(piece)
                    continue
                data = text.encode("utf-8", "surrogateescape")
            elif isinstance(arg, str):  # a str subclass
                data = arg.encode("utf-8", "surrogateescape")
            elif isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, int) and not isinstance(arg, bool):
                data = b"%d" % arg
            elif isinstance(arg, float):
                data = repr(arg).encode()
            else:
                raise TypeError(f"cannot send {type(arg).__name__} to Redis")
            # (Three pieces joined once at the end cost less than a bytes %-format per value.)
            size = len(data)
            out.append(_BULK[size] if size < len(_BULK) else b"$%d\r\n" % size)
            out.append(data)
            out.append(b"\r\n")
    return b"".join(out)

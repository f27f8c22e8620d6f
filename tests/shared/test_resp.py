"""pack_commands: the state store's RESP encoder gives redis-py's bytes for what mxward sends."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection  # noqa: TID251 (the reference encoder)

from mxward.shared.resp import pack_commands

_ARG = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


def _redis_py(commands: list[tuple[Any, ...]]) -> bytes:
    return b"".join(Connection().pack_commands(commands))


# A command name first, as the store sends them (redis-py splits a first argument at spaces).
_COMMAND = st.tuples(st.sampled_from(["EVALSHA", "HSET", "GET", "EXPIRE"]), st.lists(_ARG, max_size=8)).map(
    lambda c: (c[0], *c[1])
)


@given(st.lists(_COMMAND, min_size=1, max_size=6))
def test_same_bytes_as_redis_py(commands: list[tuple[Any, ...]]) -> None:
    """Any batch of str, bytes, int and float arguments encodes exactly as redis-py encodes it."""
    assert pack_commands(commands) == _redis_py(commands)
    assert pack_commands(commands) == _redis_py(commands)  # again, from the cache of short strings


def test_a_postfix_attribute_with_undecodable_bytes_is_sent_as_those_bytes() -> None:
    """The surrogate escapes that stand for bytes Postfix sent in no valid UTF-8 become the bytes."""
    sender = b"caf\xe9@example.com".decode("utf-8", "surrogateescape")
    expected = b"*3\r\n$3\r\nSET\r\n$16\r\ncaf\xe9@example.com\r\n$1\r\n1\r\n"
    assert pack_commands([("SET", sender, 1)]) == expected


def test_long_and_many_strings_do_not_grow_the_cache_without_bound() -> None:
    """One-off values are encoded each time; the cache of short strings is cleared when full."""
    from mxward.shared import resp

    for n in range(10_000):
        assert pack_commands([(f"k{n}", "x" * 100)]) == _redis_py([(f"k{n}", "x" * 100)])
    assert len(resp._PACKED) <= resp._PACKED_MAX_ENTRIES
    assert all(len(key) <= resp._PACKED_MAX_LEN for key in resp._PACKED)


@pytest.mark.parametrize("value", [True, None, 1j, object(), ["list"]])
def test_other_types_are_refused(value: object) -> None:
    """bool, None and the rest raise TypeError (the store then lets redis-py report them)."""
    with pytest.raises(TypeError, match="cannot send"):
        pack_commands([("SET", "key", value)])

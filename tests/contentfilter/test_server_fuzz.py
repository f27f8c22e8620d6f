"""Fuzzing the filter's SMTP side: garbage never crashes it, never hangs it, never delivers.

Each example opens a connection, sends random or half-valid SMTP, reads what comes back for a
moment and hangs up; after the examples the filter must still relay a normal message, and the
sink must have received nothing but well-formed transactions with recipients.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.filter_inproc import RunningFilter, Talk, filter_config, message, running_filter, stuffed
from support.postfix import SmtpSink

VERBS = [
    "EHLO",
    "HELO",
    "MAIL FROM:",
    "RCPT TO:",
    "DATA",
    "RSET",
    "NOOP",
    "QUIT",
    "XFORWARD",
    "VRFY",
    "BDAT",
    "AUTH",
]


@pytest.fixture(scope="module")
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink(xforward=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def flt(tmp_path: Path, redis_server: Any, sink: SmtpSink) -> AsyncIterator[RunningFilter]:
    config = filter_config(
        tmp_path, redis_server.url, sink.port, {"max_message_size": 65536, "idle_timeout": "5s"}
    )
    async with running_filter(config, sink) as running:
        yield running


def command_lines() -> st.SearchStrategy[bytes]:
    verb = st.sampled_from(VERBS)
    arg = st.one_of(
        st.just(""),
        st.sampled_from(["<a@b.example>", "<>", "<bob@sink.test> NOTIFY=NEVER", "ADDR=192.0.2.1", "<x"]),
        st.text(min_size=0, max_size=80),
    )
    line = st.builds(lambda v, a: f"{v}{a}".encode("utf-8", "surrogatepass") + b"\r\n", verb, arg)
    junk = st.binary(min_size=0, max_size=600)
    return st.one_of(line, line, junk, st.builds(lambda n: b"A" * n + b"\r\n", st.integers(500, 5000)))


async def _exchange(port: int, chunks: list[bytes]) -> None:
    talk = await Talk.open(port)
    try:
        for chunk in chunks:
            talk.writer.write(chunk)
        with contextlib.suppress(ConnectionError):
            await talk.writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(0.05):
                while await talk.reader.read(65536):
                    pass
    finally:
        talk.writer.transport.abort()


async def _still_works(flt: RunningFilter, rcpt: str) -> None:
    talk = await flt.talk()
    assert (await talk.cmd("MAIL FROM:<alice@sender.example>"))[0] == 250
    assert (await talk.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message()))
    assert (await talk.reply())[0] == 250
    await talk.close()


async def test_random_sessions_never_break_the_filter(flt: RunningFilter, sink: SmtpSink) -> None:
    examples: list[list[bytes]] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(command_lines(), min_size=1, max_size=12))
    def collect(chunks: list[bytes]) -> None:
        examples.append(chunks)

    collect()
    for chunks in examples:
        await _exchange(flt.port, chunks)
    await _still_works(flt, "after-fuzz@sink.test")
    assert sink.wait_delivered("after-fuzz@sink.test")
    for delivered in sink.messages:
        assert delivered.rcpt_tos  # nothing half-done was ever delivered


async def test_random_data_sections(flt: RunningFilter, sink: SmtpSink) -> None:
    """Random message bytes (NULs, bare CR/LF, dots, 8-bit) after DATA: relayed or refused cleanly."""
    rng = random.Random(4711)
    alphabet = [b"\r\n", b"\n", b"\r", b".", b"..", b"\x00", b"\xff", b"a", b" ", b"\r\n.", b"From: x\r\n"]
    talk = await flt.talk()
    for number in range(60):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        assert (await talk.cmd("MAIL FROM:<alice@sender.example>"))[0] == 250
        assert (await talk.cmd(f"RCPT TO:<r{number}@sink.test>"))[0] == 250
        assert (await talk.cmd("DATA"))[0] == 354
        await talk.send(stuffed(body.replace(b"\r\n.\r\n", b"\r\n..\r\n")))
        code, _ = await talk.reply()
        assert code in (250, 451, 500, 552), code
    await talk.close()
    await _still_works(flt, "after-data-fuzz@sink.test")

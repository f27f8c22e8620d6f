"""An in-process `mxward filter` worker on a free loopback port, reinjecting into a test sink."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxward.contentfilter.daemon import FilterRuntime, open_filter
from mxward.shared.cli import resolve_check
from mxward.shared.config import Config, parse_config
from support.postfix import SmtpSink


def filter_config(
    tmp_path: Path, state_url: str, sink_port: int, filter_table: dict[str, Any] | None = None, **tables: Any
) -> Config:
    data: dict[str, Any] = {
        "mxward": {"data_dir": str(tmp_path / "data"), "hostname": "mx.test.example"},
        "state": {"url": state_url, "key_prefix": f"t{uuid.uuid4().hex[:10]}"},
        # only the checks that ask no DNS unless the test names its own (never the real DNS)
        "filter": {
            "reinject": f"127.0.0.1:{sink_port}",
            "reinject_timeout": "5s",
            "checks": ["headers"],
            **(filter_table or {}),
        },
        **tables,
    }
    return parse_config(data, source="test", resolve_check=resolve_check)


class Talk:
    """A raw SMTP client: send bytes, read replies (several lines each)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.2") -> Talk:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        """The next reply: (code, text of all lines joined by newlines); (0, "") at EOF."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    return 0, "\n".join(lines)
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text[4:])
                if len(text) < 4 or text[3] == " ":
                    return int(text[:3]), "\n".join(lines)

    async def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
        await self.writer.drain()

    async def cmd(self, line: str) -> tuple[int, str]:
        await self.send(line + "\r\n")
        return await self.reply()

    async def hello(self) -> str:
        code, _ = await self.reply()
        assert code == 220
        code, text = await self.cmd("EHLO client.test.example")
        assert code == 250
        return text

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class RunningFilter:
    runtime: FilterRuntime
    port: int
    sink: SmtpSink
    server: asyncio.AbstractServer

    async def talk(self, source: str = "127.0.0.2") -> Talk:
        talk = await Talk.open(self.port, source)
        await talk.hello()
        return talk


@contextlib.asynccontextmanager
async def running_filter(config: Config, sink: SmtpSink) -> AsyncIterator[RunningFilter]:
    runtime = await open_filter(config, None)
    server = await asyncio.get_running_loop().create_server(runtime.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield RunningFilter(runtime=runtime, port=port, sink=sink, server=server)
    finally:
        server.close()
        await runtime.service.drain(2.0)
        await runtime.aclose()


def message(subject: str = "hello", body: str = "Body line.\r\n", extra: str = "") -> bytes:
    return (
        "From: <alice@sender.example>\r\nTo: <bob@sink.test>\r\n"
        f"Subject: {subject}\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@client.test.example>\r\n{extra}\r\n{body}"
    ).encode()


def stuffed(data: bytes) -> bytes:
    """``data`` as sent after DATA: dots doubled, the end marker added."""
    out = data.replace(b"\r\n.", b"\r\n..")
    if out.startswith(b"."):
        out = b"." + out
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"

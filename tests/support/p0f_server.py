"""p0f for tests: a real p0f on the loopback interface, and a protocol-level p0f 3 API server.

Fixtures:

``real_p0f`` (session)
    ``p0f -i lo -s <tmp>/p0f.sock 'tcp and (net 127.0.4.0/24 or host ::1)'``, as root. Skips
    with the reason when p0f is not installed, we are not root, or p0f cannot capture here.
    ``await real_p0f.fingerprint("127.0.4.2")`` makes a TCP connection from that address and
    waits until p0f's API knows the host.
``fake_p0f`` (function)
    :class:`FakeP0f`, an asyncio unix-socket server speaking the p0f 3 API (README section
    4) with its own encoding of the reply, so a layout mistake in the client cannot cancel out.
    ``fake_p0f.hosts[ip] = FakeHost(...)`` sets answers; ``fake_p0f.mode`` injects faults:
    ``"bad_magic"``, ``"short"`` (100 bytes, then close), ``"silent"`` (never answers),
    ``"close"`` (closes without answering), ``"bad_status"`` (status 0x77); ``queries`` records
    every query as ``(magic, address type, 16 address bytes)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

__all__ = ["FakeHost", "FakeP0f", "RealP0f", "fake_p0f", "raw_query", "real_p0f", "short_socket_dir"]

MAGIC_QUERY = 0x50304601
MAGIC_REPLY = 0x50304602
BAD_QUERY, OK, NO_MATCH = 0x00, 0x10, 0x20
FINGERPRINTS = Path("/etc/p0f/p0f.fp")
# Only our own range (and ::1 for the IPv6 test): others' loopback traffic stays out of it.
CAPTURE_FILTER = "tcp and (net 127.0.4.0/24 or host ::1)"
SERVER_ADDRESS = "127.0.4.1"


def short_socket_dir() -> Path:
    """A fresh directory with a short path (unix socket paths are limited to 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="mxp0f-", dir="/tmp"))


@dataclass
class FakeHost:
    os_name: str = ""
    os_flavor: str = ""
    link_type: str = ""
    distance: int = -1
    uptime_min: int = 0
    first_seen: int = 1_700_000_000
    last_seen: int = 1_700_000_100
    total_conn: int = 3
    http_name: str = ""
    language: str = ""

    def encode(self) -> bytes:
        """The body after magic and status: 7 u32, s16, 2 u8, 6 strings of 32 bytes."""
        numbers = struct.pack(
            "=7I", self.first_seen, self.last_seen, self.total_conn, self.uptime_min, 0, 0, 0
        )
        small = struct.pack("=hBB", self.distance, 0, 0)
        strings = (self.os_name, self.os_flavor, self.http_name, "", self.link_type, self.language)
        return numbers + small + b"".join(s.encode()[:31].ljust(32, b"\0") for s in strings)


def _decode_address(kind: int, data: bytes) -> str | None:
    if kind == 4:
        return str(ipaddress.IPv4Address(data[:4]))
    if kind == 6:
        return str(ipaddress.IPv6Address(data))
    return None


@dataclass
class FakeP0f:
    path: Path
    hosts: dict[str, FakeHost] = field(default_factory=dict)
    mode: str = "normal"
    queries: list[tuple[int, int, bytes]] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.AbstractServer | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def reply(self, query: bytes) -> bytes:
        magic, kind, address = struct.unpack("=IB16s", query)
        self.queries.append((magic, kind, address))
        ip = _decode_address(kind, address)
        header_magic = 0x12345678 if self.mode == "bad_magic" else MAGIC_REPLY
        if self.mode == "bad_status":
            return struct.pack("=II", header_magic, 0x77) + FakeHost().encode()
        if magic != MAGIC_QUERY or ip is None:
            return struct.pack("=II", header_magic, BAD_QUERY) + FakeHost().encode()
        host = self.hosts.get(ip)
        if host is None:
            return struct.pack("=II", header_magic, NO_MATCH) + FakeHost().encode()
        return struct.pack("=II", header_magic, OK) + host.encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    query = await reader.readexactly(21)
                except asyncio.IncompleteReadError:
                    return
                answer = self.reply(query)
                if self.mode == "silent":
                    await asyncio.sleep(3600)
                if self.mode == "close":
                    return
                if self.mode == "short":
                    writer.write(answer[:100])
                    await writer.drain()
                    return
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()


@pytest.fixture
async def fake_p0f() -> AsyncIterator[FakeP0f]:
    directory = short_socket_dir()
    server = FakeP0f(directory / "p0f.sock")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def raw_query(path: Path, ip: str) -> tuple[int, bytes]:
    """Status and raw reply of one query, with plain sockets (independent of the client)."""
    addr = ipaddress.ip_address(ip)
    kind = 4 if addr.version == 4 else 6
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(str(path))
        sock.sendall(struct.pack("=IB16s", MAGIC_QUERY, kind, addr.packed.ljust(16, b"\0")))
        data = b""
        while len(data) < 232:
            chunk = sock.recv(232 - len(data))
            if not chunk:
                break
            data += chunk
    return struct.unpack("=II", data[:8])[1], data


@dataclass
class RealP0f:
    socket: Path
    process: subprocess.Popen[bytes]
    log: Path

    async def fingerprint(self, client: str, server: str = SERVER_ADDRESS, timeout: float = 10.0) -> None:
        """Connect from ``client`` to a listener on ``server`` and wait until p0f knows ``client``."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"220 hello\r\n")
            await writer.drain()
            writer.close()

        listener = await asyncio.start_server(answer, server, 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(server, port, local_addr=(client, 0))
            writer.write(b"EHLO test.example\r\n")
            await writer.drain()
            await reader.read(100)
            writer.close()
            await writer.wait_closed()
        finally:
            listener.close()
            await listener.wait_closed()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = await asyncio.to_thread(raw_query, self.socket, client)
            if status == OK:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"p0f did not learn {client} within {timeout}s: {self.log.read_text()[-2000:]}")


def _start_p0f() -> tuple[RealP0f | None, str]:
    binary = shutil.which("p0f") or ("/usr/sbin/p0f" if os.path.exists("/usr/sbin/p0f") else None)
    if binary is None:
        return None, "p0f is not installed (apt-get install p0f)"
    if os.geteuid() != 0:
        return None, "p0f needs root to capture packets on the loopback interface"
    directory = short_socket_dir()
    sock, log = directory / "p0f.sock", directory / "p0f.log"
    args = [binary, "-i", "lo", "-s", str(sock)]
    if FINGERPRINTS.exists():
        args += ["-f", str(FINGERPRINTS)]
    with log.open("wb") as out:
        process = subprocess.Popen([*args, CAPTURE_FILTER], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None, f"p0f cannot run here (exit {process.returncode}): {log.read_text()[-500:]}"
        if sock.exists():
            with contextlib.suppress(OSError):
                raw_query(sock, "127.0.4.254")
                return RealP0f(sock, process, log), ""
        time.sleep(0.05)
    process.kill()
    process.wait()
    return None, f"p0f did not open its API socket within 10s: {log.read_text()[-500:]}"


@pytest.fixture(scope="session")
def real_p0f() -> Iterator[RealP0f]:
    """A real p0f on the loopback interface.

    Outside the test command (a developer's machine without p0f or root) the tests that need
    it are skipped with the reason. tests/run.sh installs p0f and runs as root, and sets
    MXWARD_TESTS_STRICT=1: there a p0f that cannot start fails the tests instead.
    """
    p0f, why = _start_p0f()
    if p0f is None:
        if os.environ.get("MXWARD_TESTS_STRICT") == "1":
            pytest.fail(f"the test command installed p0f, but {why}")
        pytest.skip(why)
    try:
        yield p0f
    finally:
        p0f.process.terminate()
        try:
            p0f.process.wait(5)
        except subprocess.TimeoutExpired:
            p0f.process.kill()
            p0f.process.wait()
        shutil.rmtree(p0f.socket.parent, ignore_errors=True)

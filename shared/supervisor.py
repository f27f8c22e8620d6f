"""The supervisor: binds the listening sockets, runs the embedded state server and the workers.

``mxward policyd``, ``mxward filter`` and ``mxward run`` (both) are the same supervisor with
one or two *roles*. For each role it binds the listen addresses (a SO_REUSEPORT group per TCP
address, one socket per worker, so the kernel spreads connections evenly; a unix socket is
shared), starts the embedded state server when no ``[state] url`` is configured, and forks
the role's workers. Then it only watches:

* SIGTERM / SIGINT: tell the workers to stop accepting and finish what is in progress (each
  role's shutdown grace), then stop the embedded state server;
* SIGHUP: read the configuration again; a file with an error is logged and the running
  configuration kept; a good one is handed to the workers, which swap their pipeline between
  requests (listen addresses, worker counts, data_dir and the state URL take effect at restart);
* a worker that dies is restarted (at most once per second).

Each worker builds its own services after the fork (Redis connections and sockets must not be
shared across processes) and runs one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mxward.shared.buildinfo import build
from mxward.shared.config import EX_CONFIG, Config, ConfigError, parse_listen
from mxward.shared.embedded import EmbeddedServer

if TYPE_CHECKING:
    from mxward.shared.pipeline import Pipeline
    from mxward.shared.plugin import Check, Services

__all__ = [
    "ConfigLoader",
    "Role",
    "bind_sockets",
    "reload_pipeline",
    "run_worker",
    "supervise",
    "usable_cores",
]

log = logging.getLogger("mxward")

ConfigLoader = Callable[[], Config]
# A worker: (config, loader, its sockets, the embedded state server's socket) -> coroutine.
WorkerMain = Callable[
    [Config, ConfigLoader, Sequence[socket.socket], "str | None"], Coroutine[Any, Any, None]
]

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


@dataclass(frozen=True)
class Role:
    """One kind of worker: ``policyd`` or ``filter``."""

    name: str
    listen: tuple[str, ...]
    workers: int
    main: WorkerMain
    event_loop: str
    grace: float
    socket_mode: str = "0660"


class Reloadable(Protocol):
    """What a worker keeps that a reload swaps: the configuration, the checks, the pipeline."""

    config: Config
    services: Services
    checks: list[Check[Any]]

    @property
    def service(self) -> Any: ...  # has a ``pipeline`` attribute the requests read


PipelineBuilder = Callable[[Config, "Services"], Coroutine[Any, Any, "tuple[Pipeline, list[Check[Any]]]"]]


async def reload_pipeline(runtime: Reloadable, load: ConfigLoader, build: PipelineBuilder) -> Config | None:
    """SIGHUP in a worker: read the configuration, start the new checks, swap the pipeline.

    Requests in progress finish with the pipeline they started with. A file with an error, or
    checks that fail to start, are logged and the running configuration is kept (None).
    """
    try:
        new = load()
    except ConfigError as exc:
        log.error("reload: keeping the running configuration: %s", exc)  # noqa: TRY400
        return None
    try:
        pipeline, checks = await build(new, runtime.services)
    except Exception as exc:
        log.error("reload: keeping the running configuration: checks failed to start: %s", exc)  # noqa: TRY400
        return None
    old = runtime.checks
    runtime.service.pipeline = pipeline
    runtime.checks = checks
    runtime.config = new
    for check in old:
        with contextlib.suppress(Exception):
            await check.aclose()
    log.info("reloaded configuration from %s", new.path or "built-in defaults")
    return new


def usable_cores() -> int:
    """The CPU cores this process may run on (taskset, cgroups' cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bind_sockets(
    listen: Sequence[str], copies: int = 1, socket_mode: str = "0660"
) -> list[list[socket.socket]]:
    """Create the listening sockets (in the supervisor, before forking): one list per worker.

    A TCP address gets ``copies`` sockets in one SO_REUSEPORT group, one per worker (with one
    shared socket, whichever worker wakes first takes a whole burst). A unix socket is shared.
    """
    slots: list[list[socket.socket]] = [[] for _ in range(copies)]
    for address in listen:
        group = _bind_one(address, copies, socket_mode)
        for slot, sock in zip(slots, group if len(group) == copies else group * copies, strict=True):
            slot.append(sock)
    return slots


def _bind_one(address: str, copies: int, socket_mode: str) -> list[socket.socket]:
    kind, host, port = parse_listen(address)
    if kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(host).st_mode):
                os.unlink(host)
        os.makedirs(os.path.dirname(host) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(host)
        os.chmod(host, int(socket_mode, 8))
        sock.listen(1024)
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        return [sock]
    if copies == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [_bind_inet(address, host, port, reuseport=False)]
    # A probe without SO_REUSEPORT first: if anyone holds the port (another mxward, a Postfix
    # listener), this fails, instead of our group silently sharing the port with it.
    _bind_inet(address, host, port, reuseport=False).close()
    return [_bind_inet(address, host, port, reuseport=True) for _ in range(copies)]


def _bind_inet(address: str, host: str, port: int, *, reuseport: bool) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
    return sock


def _event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            log.warning('event_loop = "uvloop" but uvloop is not installed; using asyncio')
        return None
    return uvloop.new_event_loop


def run_worker(
    role: Role, config: Config, load: ConfigLoader, sockets: Sequence[socket.socket], embedded: str | None
) -> int:
    """The body of a forked worker process: its own event loop running ``role.main``."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory(role.event_loop)) as runner:
            runner.run(role.main(config, load, sockets, embedded))
    except ConfigError as exc:
        # A check refused its settings at start (an unreadable key, say): restarting cannot help.
        log.error("%s worker cannot start: configuration error: %s", role.name, exc)  # noqa: TRY400
        return EX_CONFIG
    except Exception:
        log.exception("%s worker failed", role.name)
        return 1
    return 0


def _restart_only_fields(old: Config, new: Config) -> list[str]:
    changed: list[str] = []
    for table in ("policyd", "filter"):
        before, after = getattr(old, table), getattr(new, table)
        changed.extend(
            f"[{table}] {name}"
            for name in ("listen", "workers")
            if getattr(before, name) != getattr(after, name)
        )
    if old.state != new.state:
        changed.append("[state]")
    if old.general.data_dir != new.general.data_dir:
        changed.append("[mxward] data_dir")
    return changed


def supervise(config: Config, load: ConfigLoader, roles: Sequence[Role], name: str) -> int:
    """Run the roles' workers until SIGTERM/SIGINT; returns the exit status."""
    counts = {role.name: role.workers or usable_cores() for role in roles}
    slots = {role.name: bind_sockets(role.listen, counts[role.name], role.socket_mode) for role in roles}
    embedded: EmbeddedServer | None = None
    embedded_socket: str | None = None
    if not config.state.url:
        embedded = EmbeddedServer(config.data_dir, config.state.embedded_binary)
        embedded_socket = embedded.start()
        log.info("embedded state server on %s", embedded_socket)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: dict[int, tuple[float, Role, int]] = {}

    def spawn(role: Role, slot: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_worker(role, config, load, slots[role.name][slot], embedded_socket)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (time.monotonic(), role, slot)

    for role in roles:
        log.info(
            "mxward %s starting (%s): %d workers, listening on %s, config %s",
            role.name,
            build(),
            counts[role.name],
            ", ".join(role.listen),
            config.path or "built-in defaults",
        )
        for slot in range(counts[role.name]):
            spawn(role, slot)
    grace = max(role.grace for role in roles)
    stopping = False
    status = 0
    kill_at = 0.0
    try:
        while children:
            info = signal.sigtimedwait(_SIGNALS, 1.0)
            signo = info.si_signo if info is not None else 0
            if signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping = True
                log.info("stopping: waiting for workers to finish what is in progress")
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                kill_at = time.monotonic() + grace + 5.0
            elif signo == signal.SIGHUP and not stopping:
                try:
                    new = load()
                except ConfigError as exc:
                    log.error("SIGHUP: configuration not reloaded: %s", exc)  # noqa: TRY400
                else:
                    for field in _restart_only_fields(config, new):
                        log.warning("SIGHUP: a change of %s takes effect at the next restart", field)
                    for pid in children:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGHUP)
            while children:
                try:
                    pid, wstatus = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                child = children.pop(pid, None)
                if child is None:
                    continue
                born, role, slot = child
                code = os.waitstatus_to_exitcode(wstatus)
                if stopping:
                    continue
                if code == EX_CONFIG:
                    log.error("stopping: a %s worker found a configuration error (see above)", role.name)
                    stopping, status = True, EX_CONFIG
                    for pid in children:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGTERM)
                    kill_at = time.monotonic() + grace + 5.0
                    continue
                log.error("%s worker %d exited with status %d; starting a new one", role.name, pid, code)
                if time.monotonic() - born < 1.0:
                    time.sleep(1.0)
                spawn(role, slot)
            if stopping and children and time.monotonic() > kill_at:
                for pid in list(children):
                    log.warning("worker %d did not stop in time; killing it", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                kill_at = time.monotonic() + 5.0
    finally:
        for role_slots in slots.values():
            for sock in {id(sock): sock for slot in role_slots for sock in slot}.values():
                if sock.family == socket.AF_UNIX:
                    with contextlib.suppress(OSError):
                        os.unlink(sock.getsockname())
                sock.close()
        if embedded is not None:
            embedded.stop()
        log.info("mxward %s stopped", name)
    return status

"""``mxward policyd``: the supervisor and its worker processes.

The supervisor (this process) binds the listening sockets, starts the embedded state server
when no ``[state] url`` is configured, and forks ``[policyd] workers`` processes (default: one
per core it may run on). Each worker accepts on its own socket of a SO_REUSEPORT group per TCP address, so
the kernel spreads connections evenly (a unix socket is shared). It then only watches:

* SIGTERM / SIGINT: tell the workers to stop accepting and finish the requests in progress
  (``shutdown_grace``), then stop the embedded state server;
* SIGHUP: read the configuration again; a file with an error is logged and the running
  configuration kept; a good one is handed to the workers, which swap their pipeline between
  requests (listen addresses, worker count, data_dir and the state URL take effect at restart);
* a worker that dies is restarted (at most once per second).

Each worker builds its own services after the fork (Redis connections and sockets must not be
shared across processes) and runs one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mxward.policyd.protocol import Limits, action_text
from mxward.policyd.server import PolicyServer, ServerLimits
from mxward.policyd.service import PolicyService
from mxward.shared.clock import SystemClock
from mxward.shared.config import Config, ConfigError, parse_listen
from mxward.shared.dns import Resolver
from mxward.shared.embedded import EmbeddedServer
from mxward.shared.matchers import AddressList
from mxward.shared.netutil import NetworkList
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import Action, Check, Services
from mxward.shared.state import StateStore

__all__ = ["Runtime", "bind_sockets", "build_pipeline", "open_runtime", "run_policyd"]

log = logging.getLogger("mxward.policyd")

ConfigLoader = Callable[[], Config]


def usable_cores() -> int:
    """The CPU cores this process may run on (taskset, cgroups' cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bind_sockets(config: Config, copies: int = 1) -> list[list[socket.socket]]:
    """Create the listening sockets of ``[policyd] listen`` (in the supervisor, before forking).

    Returns one list per worker slot. A TCP address gets ``copies`` sockets in one
    SO_REUSEPORT group, one per worker, so the kernel spreads new connections evenly over the
    workers (with one shared socket, whichever worker wakes first takes a whole burst). A unix
    socket is shared by all workers.
    """
    slots: list[list[socket.socket]] = [[] for _ in range(copies)]
    for address in config.policyd.listen:
        group = _bind_one(config, address, copies)
        for slot, sock in zip(slots, group if len(group) == copies else group * copies, strict=True):
            slot.append(sock)
    return slots


def _bind_one(config: Config, address: str, copies: int) -> list[socket.socket]:
    """The sockets of one listen address: ``copies`` for TCP (SO_REUSEPORT), else one."""
    kind, host, port = parse_listen(address)
    if kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(host).st_mode):
                os.unlink(host)
        os.makedirs(os.path.dirname(host) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(host)
        os.chmod(host, int(config.policyd.socket_mode, 8))
        sock.listen(1024)
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        return [sock]
    if copies == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [_bind_inet(address, host, port, reuseport=False)]
    # A probe without SO_REUSEPORT first: if anyone holds the port (another mxward, say), this
    # fails, instead of our group silently sharing the port with it.
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


@dataclasses.dataclass
class Runtime:
    """What one process needs to decide requests: services, checks, pipeline, service."""

    config: Config
    services: Services
    service: PolicyService
    checks: list[Check[Any]]

    async def aclose(self) -> None:
        for check in self.checks:
            with contextlib.suppress(Exception):
                await check.aclose()
        await self.services.state.aclose()


def pipeline_settings(config: Config) -> PipelineSettings:
    p = config.policyd
    return PipelineSettings(
        deadline=p.request_deadline,
        reject_stage=p.stage,
        reject_score=p.scoring.reject,
        defer_score=p.scoring.defer,
        reject_code=p.scoring.reject_code,
        reject_dsn=p.scoring.reject_dsn,
        defer_code=p.scoring.defer_code,
        defer_dsn=p.scoring.defer_dsn,
        exempt_authenticated=p.exempt.authenticated,
        exempt_networks=NetworkList(p.exempt.networks),
        exempt_recipients=AddressList(p.exempt.recipients),
        tempfail_text=p.tempfail_text,
    )


async def build_pipeline(config: Config, services: Services) -> tuple[Pipeline, list[Check[Any]]]:
    """Instantiate and start the enabled checks in configuration order."""
    active: list[ActiveCheck] = []
    started: list[Check[Any]] = []
    try:
        for name in config.policyd.checks:
            cfg = config.checks[name]
            if not cfg.common.enabled:
                continue
            check = cfg.cls(cfg.options, services)
            await check.start()
            started.append(check)
            active.append(
                ActiveCheck(
                    check=check,
                    timeout=cfg.common.timeout,
                    on_error=cfg.common.on_error,
                    observe=cfg.common.mode == "observe",
                )
            )
        return Pipeline(active, pipeline_settings(config)), started
    except BaseException:
        for check in started:
            with contextlib.suppress(Exception):
                await check.aclose()
        raise


def hostname(config: Config) -> str:
    return config.general.hostname or socket.getfqdn()


async def open_runtime(config: Config, embedded_socket: str | None) -> Runtime:
    """Connect the services and build the pipeline (once per worker, after the fork)."""
    clock = SystemClock()
    state = StateStore(config.state, unix_socket=embedded_socket)
    try:
        await state.connect()
    except Exception as exc:
        # Keep serving: each check's on_error decides what an unavailable store means.
        log.warning("state store not reachable at start-up (%s); will keep trying", exc)
    services = Services(
        dns=Resolver(config.dns, clock=clock), state=state, clock=clock, hostname=hostname(config)
    )
    pipeline, checks = await build_pipeline(config, services)
    return Runtime(config=config, services=services, service=PolicyService(pipeline), checks=checks)


def tempfail_reply(config: Config) -> str:
    return action_text(Action.defer(config.policyd.tempfail_text, 451, "4.3.0"))


async def _worker(
    config: Config, load: ConfigLoader, sockets: Sequence[socket.socket], embedded_socket: str | None
) -> None:
    runtime = await open_runtime(config, embedded_socket)
    p = config.policyd
    limits = ServerLimits(
        allowed=NetworkList(p.allowed_clients),
        protocol=Limits(p.max_line_length, p.max_attributes, p.max_request_size),
        idle_timeout=p.idle_timeout,
        read_timeout=p.read_timeout,
        tempfail=tempfail_reply(config),
    )
    server = PolicyServer(runtime.service, limits, sockets)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_lock = asyncio.Lock()

    async def reload() -> None:
        async with reload_lock:
            try:
                new = load()
            except ConfigError as exc:
                log.error("reload: keeping the running configuration: %s", exc)  # noqa: TRY400
                return
            try:
                pipeline, checks = await build_pipeline(new, runtime.services)
            except Exception as exc:
                log.error("reload: keeping the running configuration: checks failed to start: %s", exc)  # noqa: TRY400
                return
            old_checks = runtime.checks
            runtime.service.pipeline = pipeline
            runtime.checks = checks
            runtime.config = new
            server.limits.tempfail = tempfail_reply(new)
            for check in old_checks:
                with contextlib.suppress(Exception):
                    await check.aclose()
            log.info("reloaded configuration from %s", new.path or "built-in defaults")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    # Everything built so far lives as long as the worker: keep it out of the collector's
    # scans, and let short-lived request objects pile up longer between young collections.
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    log.info("worker ready on %s", ", ".join(p.listen))
    await stop.wait()
    log.info("worker stopping: finishing requests in progress")
    await server.stop(runtime.config.policyd.shutdown_grace)
    await runtime.aclose()


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


def _worker_main(
    config: Config, load: ConfigLoader, sockets: Sequence[socket.socket], embedded_socket: str | None
) -> int:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    factory = _event_loop_factory(config.policyd.event_loop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_worker(config, load, sockets, embedded_socket))
    except Exception:
        log.exception("worker failed")
        return 1
    return 0


_GC_THRESHOLDS = (20000, 20, 20)
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


def _restart_only_fields(old: Config, new: Config) -> list[str]:
    changed = []
    if old.policyd.listen != new.policyd.listen:
        changed.append("[policyd] listen")
    if old.policyd.workers != new.policyd.workers:
        changed.append("[policyd] workers")
    if old.state != new.state:
        changed.append("[state]")
    if old.general.data_dir != new.general.data_dir:
        changed.append("[mxward] data_dir")
    return changed


def run_policyd(config: Config, load: ConfigLoader) -> int:
    """Run the supervisor until SIGTERM/SIGINT; returns the exit status."""
    workers = config.policyd.workers or usable_cores()
    slots = bind_sockets(config, workers)
    embedded: EmbeddedServer | None = None
    embedded_socket: str | None = None
    if not config.state.url:
        embedded = EmbeddedServer(config.data_dir, config.state.embedded_binary)
        embedded_socket = embedded.start()
        log.info("embedded state server on %s", embedded_socket)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: dict[int, tuple[float, int]] = {}

    def spawn(slot: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker_main(config, load, slots[slot], embedded_socket)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (time.monotonic(), slot)

    log.info(
        "mxward policyd starting: %d workers, listening on %s, config %s",
        workers,
        ", ".join(config.policyd.listen),
        config.path or "built-in defaults",
    )
    for slot in range(workers):
        spawn(slot)
    stopping = False
    status = 0
    kill_at = 0.0
    try:
        while children:
            info = signal.sigtimedwait(_SIGNALS, 1.0)
            signo = info.si_signo if info is not None else 0
            if signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
                stopping = True
                log.info("stopping: waiting for workers to finish requests in progress")
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                kill_at = time.monotonic() + config.policyd.shutdown_grace + 5.0
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
                born, slot = child
                code = os.waitstatus_to_exitcode(wstatus)
                if stopping:
                    continue
                log.error("worker %d exited with status %d; starting a new one", pid, code)
                if time.monotonic() - born < 1.0:
                    time.sleep(1.0)
                spawn(slot)
            if stopping and children and time.monotonic() > kill_at:
                for pid in list(children):
                    log.warning("worker %d did not stop in time; killing it", pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                kill_at = time.monotonic() + 5.0
    finally:
        for sock in {id(sock): sock for slot in slots for sock in slot}.values():
            if sock.family == socket.AF_UNIX:
                with contextlib.suppress(OSError):
                    os.unlink(sock.getsockname())
            sock.close()
        if embedded is not None:
            embedded.stop()
        log.info("mxward policyd stopped")
    return status

"""``mxward policyd``: the policy daemon's worker (the supervisor is :mod:`mxward.shared.supervisor`).

Each worker connects its own services after the fork, builds the pipeline of
``[policyd] checks`` and serves the policy protocol on its sockets until SIGTERM, finishing
the requests in progress (``shutdown_grace``). On SIGHUP it reads the configuration again and
swaps its pipeline between requests; a file with an error keeps the running configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import socket
from collections.abc import Sequence
from typing import Any

from mxward.policyd.protocol import Limits, action_text
from mxward.policyd.server import PolicyServer, ServerLimits
from mxward.policyd.service import PolicyService
from mxward.shared.aio import running_loop
from mxward.shared.clock import SystemClock
from mxward.shared.config import Config
from mxward.shared.dns import Resolver
from mxward.shared.matchers import AddressList
from mxward.shared.msgfacts import MessageFacts
from mxward.shared.netutil import NetworkList
from mxward.shared.pipeline import Pipeline, PipelineSettings, start_pipeline
from mxward.shared.plugin import Action, Check, Services
from mxward.shared.state import StateStore
from mxward.shared.supervisor import ConfigLoader, Role, reload_pipeline, supervise

__all__ = ["Runtime", "build_pipeline", "open_runtime", "policyd_role", "run_policyd"]

log = logging.getLogger("mxward.policyd")


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
    """Instantiate and start the enabled ``[policyd] checks`` in configuration order."""
    return await start_pipeline(
        [config.checks[name] for name in config.policyd.checks], pipeline_settings(config), services
    )


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
        dns=Resolver(config.dns, clock=clock),
        state=state,
        clock=clock,
        hostname=config.hostname,
        config=config,
    )
    pipeline, checks = await build_pipeline(config, services)
    facts = MessageFacts(state, config.policyd.message_facts_ttl) if config.policyd.message_facts else None
    return Runtime(config=config, services=services, service=PolicyService(pipeline, facts), checks=checks)


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
    loop = running_loop()
    stop = asyncio.Event()
    reload_lock = asyncio.Lock()

    async def reload() -> None:
        async with reload_lock:
            new = await reload_pipeline(runtime, load, build_pipeline)
            if new is not None:
                server.limits.tempfail = tempfail_reply(new)

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


_GC_THRESHOLDS = (20000, 20, 20)


def policyd_role(config: Config) -> Role:
    p = config.policyd
    return Role(
        name="policyd",
        listen=p.listen,
        workers=p.workers,
        main=_worker,
        event_loop=p.event_loop,
        grace=p.shutdown_grace,
        socket_mode=p.socket_mode,
    )


def run_policyd(config: Config, load: ConfigLoader) -> int:
    """Run the policy daemon's supervisor until SIGTERM/SIGINT; returns the exit status."""
    return supervise(config, load, [policyd_role(config)], "policyd")

"""``mxward filter``: the content filter's worker (the supervisor is :mod:`mxward.shared.supervisor`).

Each worker connects its own services after the fork (state store, resolver), builds the
pipeline of ``[filter] checks`` and serves SMTP on its sockets. SIGTERM stops accepting and
lets the messages in progress finish (``shutdown_grace``); SIGHUP swaps the pipeline between
messages (a configuration with an error keeps the running one).
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

from mxward.contentfilter.quarantine import Quarantine
from mxward.contentfilter.reinject import Downstream
from mxward.contentfilter.server import FilterSMTP
from mxward.contentfilter.service import FilterService
from mxward.shared.aio import running_loop
from mxward.shared.clock import SystemClock
from mxward.shared.config import Config, parse_listen
from mxward.shared.dns import Resolver
from mxward.shared.karma import KarmaRules
from mxward.shared.msgfacts import MessageFacts
from mxward.shared.netutil import NetworkList
from mxward.shared.pipeline import Pipeline, PipelineSettings, start_pipeline
from mxward.shared.plugin import Check, Services, Stage
from mxward.shared.state import StateStore
from mxward.shared.supervisor import ConfigLoader, Role, reload_pipeline, supervise

__all__ = ["FilterRuntime", "build_filter_pipeline", "filter_role", "open_filter", "run_filter"]

log = logging.getLogger("mxward.filter")


def filter_pipeline_settings(config: Config) -> PipelineSettings:
    f = config.filter
    return PipelineSettings(
        deadline=f.deadline,
        reject_stage=Stage.CONTENT,
        reject_score=f.reject_score,
        reject_code=f.reject_code,
        reject_dsn=f.reject_dsn,
        exempt_authenticated=False,
        tempfail_text=f.tempfail_text,
    )


async def build_filter_pipeline(config: Config, services: Services) -> tuple[Pipeline, list[Check[Any]]]:
    return await start_pipeline(
        [config.filter_checks[name] for name in config.filter.checks],
        filter_pipeline_settings(config),
        services,
    )


def karma_rules(config: Config) -> KarmaRules | None:
    """The karma rules of ``[checks.karma]`` (defaults when absent); None if ``[filter] karma`` is off."""
    if not config.filter.karma:
        return None
    cfg = config.checks.get("karma") or config.inactive.get("karma")
    if cfg is not None and isinstance(cfg.options, KarmaRules):
        fields = {f.name for f in dataclasses.fields(KarmaRules)}
        return KarmaRules(**{name: getattr(cfg.options, name) for name in fields})
    return KarmaRules()


@dataclasses.dataclass
class FilterRuntime:
    """What one process needs to filter messages."""

    config: Config
    services: Services
    service: FilterService
    checks: list[Check[Any]]

    def downstream(self) -> Downstream:
        _, host, port = parse_listen(self.config.filter.reinject)
        return Downstream(
            host, port, helo=self.services.hostname, timeout=self.config.filter.reinject_timeout
        )

    def protocol(self) -> FilterSMTP:
        f = self.config.filter
        return FilterSMTP(
            self.service,
            f,
            hostname=self.services.hostname,
            downstream=self.downstream,
            allowed=NetworkList(f.allowed_clients),
            xforward_hosts=NetworkList(f.xforward_hosts),
        )

    async def aclose(self) -> None:
        for check in self.checks:
            with contextlib.suppress(Exception):
                await check.aclose()
        await self.services.state.aclose()


async def open_filter(config: Config, embedded_socket: str | None) -> FilterRuntime:
    """Connect the services and build the filter (once per worker, after the fork)."""
    clock = SystemClock()
    state = StateStore(config.state, unix_socket=embedded_socket)
    try:
        await state.connect()
    except Exception as exc:
        log.warning("state store not reachable at start-up (%s); will keep trying", exc)
    name = config.hostname
    services = Services(
        dns=Resolver(config.dns, clock=clock), state=state, clock=clock, hostname=name, config=config
    )
    pipeline, checks = await build_filter_pipeline(config, services)
    quarantine = Quarantine(
        config.data_dir / "quarantine",
        state,
        node=name,
        retention=config.filter.quarantine_retention,
        clock=clock,
    )
    service = FilterService(
        config.filter,
        services,
        pipeline,
        facts=MessageFacts(state, config.policyd.message_facts_ttl),
        quarantine=quarantine,
        karma_rules=karma_rules(config),
        authserv_id=config.filter.authserv_id or name,
    )
    return FilterRuntime(config=config, services=services, service=service, checks=checks)


async def _worker(
    config: Config, load: ConfigLoader, sockets: Sequence[socket.socket], embedded_socket: str | None
) -> None:
    # aiosmtpd logs every command at INFO; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    runtime = await open_filter(config, embedded_socket)
    loop = running_loop()
    servers = [await loop.create_server(runtime.protocol, sock=sock) for sock in sockets]
    stop = asyncio.Event()
    reload_lock = asyncio.Lock()

    async def reload() -> None:
        async with reload_lock:
            new = await reload_pipeline(runtime, load, build_filter_pipeline)
            if new is not None:  # thresholds, actions and headers of the new [filter] table
                runtime.service.settings = new.filter
                runtime.service.authserv_id = new.filter.authserv_id or runtime.services.hostname

    async def purge() -> None:
        while True:
            await asyncio.sleep(3600)
            if runtime.service.quarantine is None:
                continue
            try:
                removed = await runtime.service.quarantine.purge()
            except Exception as exc:  # logged; the next hour tries again
                log.warning("quarantine purge failed: %s", exc)
            else:
                if removed:
                    log.info("quarantine purge removed %d expired messages", removed)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    purger = loop.create_task(purge())
    gc.freeze()
    log.info("filter worker ready on %s (%s mode)", ", ".join(config.filter.listen), config.filter.mode)
    await stop.wait()
    log.info("filter worker stopping: finishing messages in progress")
    purger.cancel()
    for server in servers:
        server.close()
    await runtime.service.stop(runtime.config.filter.shutdown_grace)
    await runtime.aclose()


def filter_role(config: Config) -> Role:
    f = config.filter
    return Role(
        name="filter",
        listen=f.listen,
        workers=f.workers,
        main=_worker,
        event_loop=f.event_loop,
        grace=f.shutdown_grace,
    )


def run_filter(config: Config, load: ConfigLoader) -> int:
    """Run the content filter's supervisor until SIGTERM/SIGINT; returns the exit status."""
    return supervise(config, load, [filter_role(config)], "filter")

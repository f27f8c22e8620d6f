"""Reused results: a DNS-only check's result is given again while its cached answers are valid.

Against the suite's DNS server (test.zone: mail.test.example has a TTL of 300 s,
short.test.example 30 s) with a FrozenClock, so expiry is exact and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import math
import os
from collections.abc import Hashable
from typing import Any, ClassVar, cast

import pytest
from support.dnsserver import DnsServer

from mxward.policyd.checks.fcrdns import FcrdnsCheck
from mxward.policyd.checks.fcrdns import Options as FcrdnsOptions
from mxward.shared.aio import running_loop
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import Check, NoOptions, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateStore


class Lookup(Check[NoOptions]):
    """Looks up the HELO name's A records; its result depends on the HELO name and DNS only."""

    name: ClassVar[str] = "lookup"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})

    def __init__(self, options: NoOptions, services: Services, *, error: bool = False) -> None:
        super().__init__(options, services)
        self.runs = 0
        self.error = error

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        return tx.helo or None

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        self.runs += 1
        records = await self.services.dns.a(tx.helo) if tx.helo else []
        verdict = Verdict.ERROR if self.error else Verdict.PASS
        return self.result(verdict, facts={"lookup.found": bool(records)}, records=",".join(records))


def resolver(server: DnsServer, clock: FrozenClock, **settings: Any) -> Resolver:
    values: dict[str, Any] = {"timeout": 0.5, "lifetime": 1.0, "nameservers": (server.nameserver,)} | settings
    return Resolver(DnsSettings(**values), clock=clock)


def services(dns: Resolver, clock: FrozenClock) -> Services:
    return Services(dns=dns, state=cast("StateStore", None), clock=clock)


def tx(helo: str, client: str = "127.0.0.2", **attrs: str) -> Transaction:
    return Transaction(
        stage=Stage.RCPT,
        client_address=client,
        client_ip=ipaddress.ip_address(client),
        helo=helo,
        attrs={"client_address": client, **attrs},
    )


async def run(pipeline: Pipeline, request: Transaction, stage: Stage = Stage.RCPT) -> Result:
    deadline = asyncio.get_running_loop().time() + 5
    (result,) = await pipeline.run([stage], request, deadline)
    return result


async def test_a_result_from_cached_answers_is_reused_until_the_first_answer_expires(
    dns_server: DnsServer,
) -> None:
    """Run 1 waits for DNS (not kept), run 2 reads the cache (kept), runs 3.. reuse it until the TTL."""
    clock = FrozenClock()
    dns = resolver(dns_server, clock)
    check = Lookup(NoOptions(), services(dns, clock))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=5.0)], PipelineSettings(), dns=dns)

    first = await run(pipeline, tx("short.test.example"))
    second = await run(pipeline, tx("short.test.example"))
    third = await run(pipeline, tx("short.test.example"))
    assert check.runs == 2
    assert first.log == second.log == third.log == {"records": "127.0.0.2"}
    assert third.facts == {"lookup.found": True}
    # Run 3 is given the kept result itself: marked as reused, no time of its own, and what the
    # decision line and `mxward check` show for it.
    assert third.reused and not second.reused
    assert third.elapsed_ms == 0.0
    assert (await run(pipeline, tx("short.test.example"))) is third

    clock.advance(29.0)
    await run(pipeline, tx("short.test.example"))
    assert check.runs == 2
    clock.advance(2.0)  # the 30 s TTL has passed: the answer and the result are gone
    await run(pipeline, tx("short.test.example"))
    assert check.runs == 3
    assert dns_server.queries[("short.test.example", "A")] == 2


async def test_the_key_decides_what_is_reused(dns_server: DnsServer) -> None:
    """Another HELO name is another key; a check that offers no key always runs."""
    clock = FrozenClock()
    dns = resolver(dns_server, clock)
    check = Lookup(NoOptions(), services(dns, clock))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=5.0)], PipelineSettings(), dns=dns)
    for _ in range(3):
        await run(pipeline, tx("mail.test.example"))
        assert (await run(pipeline, tx("nowhere.test.example"))).log == {"records": ""}
    assert check.runs == 4  # two names: each run once waiting, once from the cache
    for _ in range(3):
        await run(pipeline, tx(""))  # no key
    assert check.runs == 7


async def test_errors_are_not_reused_and_reuse_can_be_off(dns_server: DnsServer) -> None:
    clock = FrozenClock()
    dns = resolver(dns_server, clock)
    failing = Lookup(NoOptions(), services(dns, clock), error=True)
    pipeline = Pipeline([ActiveCheck(check=failing, timeout=5.0)], PipelineSettings(), dns=dns)
    for _ in range(3):
        await run(pipeline, tx("mail.test.example"))
    assert failing.runs == 3

    plain = Lookup(NoOptions(), services(dns, clock))
    without = Pipeline([ActiveCheck(check=plain, timeout=5.0)], PipelineSettings())  # no resolver
    for _ in range(3):
        await run(without, tx("mail.test.example"))
    assert plain.runs == 3


async def test_reuse_holds_at_most_cache_size_results(dns_server: DnsServer) -> None:
    clock = FrozenClock()
    dns = resolver(dns_server, clock, cache_size=2)
    check = Lookup(NoOptions(), services(dns, clock))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=5.0)], PipelineSettings(), dns=dns)
    names = ["mail.test.example", "short.test.example", "loopback.test.example"]
    for name in names:
        await run(pipeline, tx(name))  # waits
    runs = check.runs
    await run(pipeline, tx(names[2]))  # from the cache: kept
    await run(pipeline, tx(names[2]))  # reused
    assert check.runs == runs + 1


async def test_fcrdns_results_are_reused_per_client(dns_server: DnsServer) -> None:
    """A real check: each client's iprev result is its own, and stays what a fresh run gives."""
    clock = FrozenClock()
    dns = resolver(dns_server, clock)
    check = FcrdnsCheck(FcrdnsOptions(), services(dns, clock))
    pipeline = Pipeline(
        [ActiveCheck(check=cast("Check[object]", check), timeout=5.0)], PipelineSettings(), dns=dns
    )
    fresh = {}
    for client in ("127.0.0.2", "127.0.0.6", "127.0.0.7"):
        await run(pipeline, tx("x", client), Stage.CONNECT)
        fresh[client] = await run(pipeline, tx("x", client), Stage.CONNECT)
    asked = dict(dns_server.queries)
    for client, result in fresh.items():
        again = await run(pipeline, tx("x", client), Stage.CONNECT)
        assert (again.verdict, again.log, again.facts) == (result.verdict, result.log, result.facts)
    assert dict(dns_server.queries) == asked
    assert fresh["127.0.0.2"].facts["iprev.result"] == "pass"
    assert fresh["127.0.0.6"].facts["iprev.result"] == "fail"
    # Postfix's view of the client name is part of the key (it is compared in the log).
    request = tx("x", "127.0.0.2", client_name="other.example")
    named = await run(pipeline, dataclasses.replace(request, client_name="other.example"), Stage.CONNECT)
    assert named.log != fresh["127.0.0.2"].log


async def test_watch_reports_the_earliest_expiry_of_cached_answers(dns_server: DnsServer) -> None:
    clock = FrozenClock()
    dns = resolver(dns_server, clock)
    await dns.a("mail.test.example")  # TTL 300
    await dns.a("short.test.example")  # TTL 30
    start = clock.monotonic()
    outer = dns.watch()
    assert dns.unwatch(outer) == math.inf  # nothing read
    outer = dns.watch()
    await dns.a("mail.test.example")
    inner = dns.watch()
    await dns.a("short.test.example")
    assert dns.unwatch(inner) == start + 30
    assert dns.unwatch(outer) == start + 30  # the inner watch's answers count for the outer one
    await dns.a("short.test.example")  # not watching: nothing noted
    assert dns.unwatch(dns.watch()) == math.inf


async def test_start_pipeline_reuses_only_when_configured(dns_server: DnsServer) -> None:
    from mxward.shared.config import CheckCommon, CheckConfig
    from mxward.shared.pipeline import start_pipeline

    clock = FrozenClock()
    for reuse, runs in ((True, 2), (False, 4)):
        dns = resolver(dns_server, clock, reuse_results=reuse)
        made: list[Lookup] = []

        def factory(options: NoOptions, svc: Services, made: list[Lookup] = made) -> Lookup:
            made.append(Lookup(options, svc))
            return made[-1]

        config = CheckConfig(
            name="lookup", cls=cast("Any", factory), options=NoOptions(), common=CheckCommon()
        )
        pipeline, _ = await start_pipeline([config], PipelineSettings(), services(dns, clock))
        for _ in range(4):
            await run(pipeline, tx("mail.test.example"))
        assert made[0].runs == runs


def test_running_loop_follows_the_loop_that_runs() -> None:
    """Each new loop is found; none running is asyncio's RuntimeError; a forked child asks anew."""
    seen = []

    async def which() -> asyncio.AbstractEventLoop:
        return running_loop()

    for _ in range(2):
        loop = asyncio.new_event_loop()
        try:
            seen.append((loop.run_until_complete(which()), loop))
        finally:
            loop.close()
    assert all(found is loop for found, loop in seen)
    with pytest.raises(RuntimeError):
        running_loop()

    async def fork_inside() -> int:
        running_loop()
        pid = os.fork()
        if pid == 0:  # the child: the parent's loop must not be taken for a running one
            try:
                running_loop()
            except RuntimeError:
                os._exit(0)
            os._exit(1)
        return os.waitpid(pid, 0)[1]  # noqa: ASYNC222 - the child exits at once

    assert asyncio.run(fork_inside()) == 0


def test_a_reused_result_copies_every_field_but_the_time() -> None:
    """The kept copy carries every field a check sets (a new Result field must be copied too),
    and the pipeline's own marks: reused, no time."""
    import dataclasses as dc

    from mxward.shared.authresults import AuthResult
    from mxward.shared.pipeline import _kept
    from mxward.shared.plugin import Action

    original = Result(
        check="lookup",
        verdict=Verdict.FAIL,
        score=2.5,
        reason="why",
        log={"k": "v"},
        facts={"lookup.found": True},
        action=Action.reject("no", 550, "5.7.1"),
        header="X-Test: 1",
        auth=(AuthResult(method="spf", result="fail"),),
        elapsed_ms=3.0,
    )
    copy = _kept(original)
    assert copy is not original
    assert (copy.reused, copy.elapsed_ms, copy.observed) == (True, 0.0, False)
    stamped_by_the_pipeline = {"elapsed_ms", "observed", "reused"}
    set_here = {"check", "verdict", "score", "reason", "log", "facts", "action", "header", "auth"}
    # A new Result field fails here until this test sets it (and _kept copies it).
    assert {field.name for field in dc.fields(Result)} == set_here | stamped_by_the_pipeline
    for field in dc.fields(Result):
        if field.name not in stamped_by_the_pipeline:
            assert getattr(copy, field.name) == getattr(original, field.name), field.name

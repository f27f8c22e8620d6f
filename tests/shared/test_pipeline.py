"""The pipeline: budgets, error isolation, observe mode, exemptions and deferred rejection."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import pytest

from mxward.shared.clock import FrozenClock
from mxward.shared.netutil import NetworkList
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import (
    Action,
    ActionKind,
    Check,
    Result,
    Services,
    Stage,
    Transaction,
    Verdict,
)
from mxward.shared.state import StateUnavailableError


@dataclass(frozen=True)
class Behaviour:
    verdict: Verdict = Verdict.PASS
    score: float = 0.0
    reason: str = ""
    action: Action | None = None
    sleep: float = 0.0
    raises: type[BaseException] | None = None
    stages: frozenset[Stage] = frozenset({Stage.RCPT})


def make_check(
    name: str, behaviour: Behaviour, *, needs: tuple[str, ...] = (), provides: tuple[str, ...] = ()
) -> Check[Any]:
    class Scripted(Check[Behaviour]):
        stages: ClassVar[frozenset[Stage]] = behaviour.stages
        calls: ClassVar[list[dict[str, Any]]] = []

        async def check(self, stage: Stage, tx: Transaction) -> Result:
            self.calls.append(dict(tx.facts))
            b = self.options
            if b.sleep:
                await asyncio.sleep(b.sleep)
            if b.raises is not None:
                raise b.raises("boom")
            return self.result(
                b.verdict, b.score, b.reason, action=b.action, facts=dict.fromkeys(provides, name)
            )

    Scripted.name = name
    Scripted.needs = needs
    Scripted.provides = provides
    return Scripted(behaviour, cast("Services", None))


def pipeline(*checks: ActiveCheck, **settings: Any) -> Pipeline:
    return Pipeline(checks, PipelineSettings(**settings))


def tx(**kw: Any) -> Transaction:
    values: dict[str, Any] = {
        "stage": Stage.RCPT,
        "client_address": "192.0.2.7",
        "client_ip": ipaddress.ip_address("192.0.2.7"),
        "sender": "a@example.net",
        "recipient": "b@example.com",
    }
    values.update(kw)
    return Transaction(**values)


async def decide(p: Pipeline, t: Transaction | None = None, stage: Stage = Stage.RCPT):
    t = t or tx()
    deadline = asyncio.get_running_loop().time() + p.settings.deadline
    results = await p.run((stage,), t, deadline)
    return p.decide(stage, results)


async def test_clean_results_give_dunno() -> None:
    """Checks that pass and score nothing leave the decision to Postfix."""
    p = pipeline(ActiveCheck(make_check("a", Behaviour()), timeout=1))
    d = await decide(p)
    assert d.action.kind is ActionKind.DUNNO
    assert [r.verdict for r in d.results] == [Verdict.PASS]


async def test_a_check_over_its_timeout_becomes_an_error_and_mail_flows() -> None:
    """A slow check is cut off at its own timeout; with on_error=ignore nothing is deferred."""
    p = pipeline(ActiveCheck(make_check("slow", Behaviour(sleep=5)), timeout=0.05))
    d = await decide(p)
    [r] = d.results
    assert r.verdict is Verdict.ERROR and r.log == {"error": "timeout"}
    assert d.action.kind is ActionKind.DUNNO
    assert r.elapsed_ms < 1000


async def test_the_request_deadline_caps_every_check() -> None:
    """The overall deadline wins over a longer per-check timeout."""
    p = pipeline(ActiveCheck(make_check("slow", Behaviour(sleep=5)), timeout=30), deadline=0.05)
    d = await decide(p)
    assert d.results[0].log["error"] in ("timeout", "deadline")


async def test_an_exception_becomes_an_error_result(caplog: pytest.LogCaptureFixture) -> None:
    """A check that raises is logged with its traceback and reported as ERROR."""
    p = pipeline(ActiveCheck(make_check("bad", Behaviour(raises=RuntimeError)), timeout=1))
    d = await decide(p)
    assert d.results[0].verdict is Verdict.ERROR
    assert "exception RuntimeError" in str(d.results[0].log["error"])
    assert any("check=bad raised RuntimeError" in r.message for r in caplog.records)


async def test_state_unavailable_is_an_error_without_blame() -> None:
    """Redis trouble is our problem: ERROR, no score, and mail passes by default."""
    p = pipeline(ActiveCheck(make_check("grey", Behaviour(raises=StateUnavailableError)), timeout=1))
    d = await decide(p)
    assert d.results[0].log["error"] == "state unavailable"
    assert d.score == 0 and d.action.kind is ActionKind.DUNNO


async def test_on_error_tempfail_defers_with_451() -> None:
    """A check configured to fail closed turns its ERROR into 451 4.3.0."""
    p = pipeline(
        ActiveCheck(make_check("bad", Behaviour(raises=RuntimeError)), timeout=1, on_error="tempfail")
    )
    d = await decide(p)
    assert (d.action.kind, d.action.code, d.action.dsn) == (ActionKind.DEFER, 451, "4.3.0")


async def test_cancellation_propagates() -> None:
    """Cancelling a request cancels its checks instead of turning into an ERROR result."""
    p = pipeline(ActiveCheck(make_check("slow", Behaviour(sleep=5)), timeout=10))
    task = asyncio.ensure_future(decide(p))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_forced_action_wins_and_its_reason_is_the_reply() -> None:
    """A check's forced action decides even when the score is low."""
    grey = Action.defer_if_permit("Greylisted")
    p = pipeline(
        ActiveCheck(make_check("grey", Behaviour(Verdict.FAIL, action=grey, reason="Greylisted")), timeout=1)
    )
    d = await decide(p)
    assert d.action is grey and d.reasons == ("Greylisted",)


async def test_strongest_forced_action_wins() -> None:
    """REJECT beats DEFER beats DEFER_IF_PERMIT, whatever the order of the checks."""
    p = pipeline(
        ActiveCheck(make_check("a", Behaviour(action=Action.defer_if_permit("x"))), timeout=1),
        ActiveCheck(make_check("b", Behaviour(action=Action.reject("no"))), timeout=1),
        ActiveCheck(make_check("c", Behaviour(action=Action.defer("later"))), timeout=1),
    )
    assert (await decide(p)).action.kind is ActionKind.REJECT


async def test_scores_add_up_and_reject_collects_every_reason() -> None:
    """Scores of several checks are summed; the reject names every reason once."""
    p = pipeline(
        ActiveCheck(make_check("a", Behaviour(Verdict.FAIL, 6, "no reverse DNS")), timeout=1),
        ActiveCheck(make_check("b", Behaviour(Verdict.FAIL, 5, "listed in a DNSBL")), timeout=1),
        ActiveCheck(make_check("c", Behaviour(Verdict.PASS, -0.5)), timeout=1),
        reject_score=10,
    )
    d = await decide(p)
    assert d.score == 10.5
    assert (d.action.code, d.action.dsn) == (550, "5.7.1")
    assert d.action.text == "no reverse DNS; listed in a DNSBL"


async def test_score_rejection_waits_for_the_reject_stage() -> None:
    """Below the configured stage a high score does not reject yet (deferred rejection)."""
    check = make_check("a", Behaviour(Verdict.FAIL, 20, "bad", stages=frozenset(Stage)))
    p = pipeline(ActiveCheck(check, timeout=1), reject_stage=Stage.RCPT, reject_score=10)
    assert (await decide(p, tx(stage=Stage.MAIL), Stage.MAIL)).action.kind is ActionKind.DUNNO
    assert (await decide(p, tx(), Stage.RCPT)).action.kind is ActionKind.REJECT
    assert (await decide(p, tx(stage=Stage.DATA), Stage.DATA)).action.kind is ActionKind.REJECT


async def test_defer_threshold_gives_a_temporary_failure() -> None:
    """A score between the defer and reject thresholds defers with 450 4.7.1."""
    p = pipeline(
        ActiveCheck(make_check("a", Behaviour(Verdict.FAIL, 7, "suspicious")), timeout=1),
        reject_score=10,
        defer_score=5,
    )
    d = await decide(p)
    assert (d.action.kind, d.action.code, d.action.text) == (ActionKind.DEFER, 450, "suspicious")


async def test_observe_mode_logs_but_changes_nothing() -> None:
    """A check in observe mode runs and is reported, but neither its action nor score count."""
    p = pipeline(
        ActiveCheck(
            make_check("a", Behaviour(Verdict.FAIL, 50, "x", action=Action.reject("x"))),
            timeout=1,
            observe=True,
        )
    )
    d = await decide(p)
    assert d.action.kind is ActionKind.DUNNO and d.score == 0
    assert d.results[0].observed
    assert p.observed[("a", "REJECT")] == 1


async def test_facts_flow_to_checks_that_need_them() -> None:
    """A check with needs sees the facts of the checks before it."""
    first = make_check("first", Behaviour(), provides=("first.fact",))
    second = make_check("second", Behaviour(), needs=("first.fact",))
    p = pipeline(ActiveCheck(first, timeout=1), ActiveCheck(second, timeout=1))
    await decide(p)
    assert type(second).calls[-1] == {"first.fact": "first"}  # type: ignore[attr-defined]


def test_a_need_nobody_provides_fails_at_start_up() -> None:
    """Ordering mistakes are found when the pipeline is built, not at the first mail."""
    lonely = make_check("lonely", Behaviour(), needs=("nobody.provides",))
    with pytest.raises(ValueError, match="needs"):
        pipeline(ActiveCheck(lonely, timeout=1))


async def test_independent_checks_run_concurrently() -> None:
    """Two slow checks without needs take the time of one, not of both."""
    p = pipeline(
        ActiveCheck(make_check("a", Behaviour(sleep=0.2)), timeout=1),
        ActiveCheck(make_check("b", Behaviour(sleep=0.2)), timeout=1),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await decide(p)
    assert loop.time() - started < 0.35


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"sasl_username": "alice"}, "sasl"),
        ({"client_ip": ipaddress.ip_address("10.1.2.3")}, "network"),
        ({}, ""),
    ],
)
def test_exemptions_are_decided_once(kw: dict[str, Any], expected: str) -> None:
    """Authenticated clients and allow-listed networks are exempt; others are not."""
    p = pipeline(exempt_networks=NetworkList(["10.0.0.0/8"]))
    assert p.exemption(tx(**kw)) == expected


def test_frozen_clock_only_moves_when_told() -> None:
    """The injected clock is what makes time-based tests deterministic."""
    clock = FrozenClock(1000.0)
    clock.advance(300)
    assert clock.now() == 1300.0


class _Waiting(Check[Behaviour]):
    """Waits the ways a real check does: a future that fails, a yield to the loop, a sleep."""

    name: ClassVar[str] = "waiting"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        loop = asyncio.get_running_loop()
        failing: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.01, failing.set_exception, LookupError("no such thing"))
        try:
            await failing
        except LookupError as exc:
            note = str(exc)
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return self.result(Verdict.PASS, note=note)


async def test_a_check_that_finishes_without_waiting_arms_no_budget() -> None:
    """Checks answered from memory cost no timer; a check that waits gets its budget."""
    p = pipeline(ActiveCheck(make_check("quick", Behaviour()), timeout=1))
    await decide(p)
    assert p._watchdog.pending == 0
    p = pipeline(ActiveCheck(make_check("slow", Behaviour(sleep=0.01)), timeout=1))
    await decide(p)
    assert p._watchdog.pending == 1  # finished, cleaned up lazily


async def test_a_waiting_check_sees_its_futures_exceptions_and_finishes() -> None:
    """After its first step the check is driven like a task: exceptions of what it waits for
    reach it, yields to the loop and sleeps work, and its result is kept."""
    p = pipeline(ActiveCheck(_Waiting(Behaviour(), cast("Services", None)), timeout=1))
    d = await decide(p)
    [r] = d.results
    assert r.verdict is Verdict.PASS and r.log == {"note": "no such thing"}


async def test_a_check_runs_only_at_the_stages_its_options_leave_active() -> None:
    """active_stages() narrows the class's stages; the idle stage neither runs nor logs it."""
    both = frozenset({Stage.CONNECT, Stage.RCPT})
    idle_at_rcpt = make_check("narrow", Behaviour(stages=both))
    idle_at_rcpt.active_stages = lambda: frozenset({Stage.CONNECT})  # type: ignore[method-assign]
    p = pipeline(
        ActiveCheck(idle_at_rcpt, timeout=1),
        ActiveCheck(make_check("wide", Behaviour(stages=both)), timeout=1),
    )
    assert p.has_checks(Stage.CONNECT) and p.has_checks(Stage.RCPT)
    assert [r.check for r in (await decide(p, stage=Stage.CONNECT)).results] == ["narrow", "wide"]
    assert [r.check for r in (await decide(p, stage=Stage.RCPT)).results] == ["wide"]

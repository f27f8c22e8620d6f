"""The pipeline: runs the configured checks and turns their results into one decision.

Everything checks must not repeat lives here:

* **Order**: checks run in configuration order within a stage. Neighbouring checks that need no
  facts from others run concurrently; a check with ``needs`` waits for the ones before it.
* **Budgets**: each check runs under its own ``timeout``, and the whole request under the
  request deadline; running out of time gives an ERROR result (``error=timeout``).
* **Failures**: any exception becomes an ERROR result with the traceback logged (state and DNS
  unavailability are logged without one); ``on_error = "tempfail"`` turns a check's ERROR into
  ``451 4.3.0``, ``"ignore"`` (the default) lets the mail through. Cancellation propagates.
* **Exemptions**: authenticated clients and allow-listed networks are decided once, here; no
  check runs for them.
* **Observe mode**: the check runs and is logged (``greylist:fail(observe)``) and counted, but its
  score and action are left out of the decision.
* **Decisions**: a forced action wins; otherwise the summed score meets the thresholds, but only
  from the configured reject stage on (qpsmtpd's deferred "naughty" rejection), so all reasons
  are collected into one reply. The strongest action wins: REJECT over DEFER over
  DEFER_IF_PERMIT over DUNNO.
* **Reuse**: a check that names the values its result depends on (``Check.reuse_key``) and
  finished without waiting, from cached DNS answers, gets that result again for the same values
  until the first of those answers expires; the check's code does not run again, and the
  decision line shows ``(reused)`` instead of its time.
* **Replies**: only the pipeline builds reply text, from ``Result.reason`` (never ``log``); the
  daemon's reply formatter makes it one printable, bounded line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

from mxward.shared.aio import running_loop
from mxward.shared.dns import DnsError, Resolver
from mxward.shared.matchers import AddressList
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import (
    DUNNO,
    Action,
    ActionKind,
    Check,
    Decision,
    LogValue,
    Result,
    Stage,
    Transaction,
    Verdict,
)
from mxward.shared.records import assemble
from mxward.shared.state import StateError

if TYPE_CHECKING:
    from mxward.shared.config import CheckConfig
    from mxward.shared.plugin import Services
from mxward.shared.timeouts import Watchdog

__all__ = ["EARLY_STAGES", "ActiveCheck", "Pipeline", "PipelineSettings", "start_pipeline"]

# Stages whose results hold for the whole transaction (policyd computes them once per message).
EARLY_STAGES = (Stage.CONNECT, Stage.HELO, Stage.MAIL)

log = logging.getLogger("mxward.pipeline")

_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class PipelineSettings:
    """What the pipeline needs from the configuration."""

    deadline: float = 10.0
    reject_stage: Stage = Stage.RCPT
    reject_score: float = 10.0
    defer_score: float = float("inf")
    reject_code: int = 550
    reject_dsn: str = "5.7.1"
    defer_code: int = 450
    defer_dsn: str = "4.7.1"
    exempt_authenticated: bool = True
    exempt_networks: NetworkList = dataclasses.field(default_factory=lambda: NetworkList(()))
    exempt_recipients: AddressList = dataclasses.field(default_factory=lambda: AddressList(()))
    tempfail_text: str = "Temporary local problem, please try again later"


@dataclass(frozen=True, slots=True)
class ActiveCheck:
    """A check instance with the common settings from its ``[checks.<name>]`` table."""

    check: Check[object]
    timeout: float
    on_error: str = "ignore"
    observe: bool = False

    @property
    def name(self) -> str:
        return self.check.name


class Pipeline:
    """Runs checks by stage and decides. One instance per process, shared by all requests."""

    def __init__(
        self, checks: Sequence[ActiveCheck], settings: PipelineSettings, *, dns: Resolver | None = None
    ) -> None:
        self.settings = settings
        self.checks = tuple(checks)
        # Reused results (see Check.reuse_key), per check that offers a key; needs the resolver
        # to learn when the answers behind a result expire.
        self._dns = dns
        self._reuse_size = dns.settings.cache_size if dns is not None else 0
        self._reuse: dict[str, collections.OrderedDict[Hashable, tuple[float, Result]]] = {
            c.name: collections.OrderedDict()
            for c in self.checks
            if self._reuse_size and type(c.check).reuse_key is not Check.reuse_key
        }
        self._by_stage: dict[Stage, tuple[ActiveCheck, ...]] = {
            stage: tuple(c for c in self.checks if stage in c.check.active_stages()) for stage in Stage
        }
        # Each stage's checks in groups that run concurrently: a check with ``needs`` starts a
        # new group, which runs once the ones before it have finished and provided their facts.
        self._groups: dict[Stage, tuple[tuple[ActiveCheck, ...], ...]] = {
            stage: _groups(checks) for stage, checks in self._by_stage.items()
        }
        self.observed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._watchdog = Watchdog()
        # Only checks that override after() get a bookkeeping call (saves a task per request).
        self._with_after = tuple(c for c in self.checks if type(c.check).after is not Check.after)
        self.outgoing = tuple(c for c in self.checks if type(c.check).outgoing is not Check.outgoing)
        self._early = {
            stage: [s for s in EARLY_STAGES if s.order <= stage.order and self._by_stage[s]]
            for stage in Stage
        }
        self._early_names = {
            stage: frozenset(a.name for s in self._early[stage] for a in self._by_stage[s]) for stage in Stage
        }
        self._verify_facts()

    def _verify_facts(self) -> None:
        provided: set[str] = set()
        for active in self.checks:
            missing = [fact for fact in active.check.needs if fact not in provided]
            if missing:
                raise ValueError(f"check {active.name!r} needs {missing}, which no check before it provides")
            provided.update(active.check.provides)

    def has_checks(self, stage: Stage) -> bool:
        return bool(self._by_stage[stage])

    def early_stages(self, stage: Stage) -> list[Stage]:
        """The connect/helo/mail stages up to ``stage`` that have checks (computed once)."""
        return self._early[stage]

    def early_checks(self, stage: Stage) -> frozenset[str]:
        """Names of the checks of the connect/helo/mail stages up to ``stage`` (computed once)."""
        return self._early_names[stage]

    # ----------------------------------------------------------------------------------------
    # exemptions

    def exemption(self, tx: Transaction) -> str:
        """Why no check runs for this request (``"sasl"``, ``"network"``, ``"recipient"``), or ``""``.

        A recipient in ``exempt_recipients`` (postmaster@, abuse@) is never refused at RCPT,
        whatever the client's other results say.
        """
        settings = self.settings
        if settings.exempt_authenticated and tx.sasl_username:
            return "sasl"
        if tx.client_ip is not None and tx.client_ip in settings.exempt_networks:
            return "network"
        recipients = settings.exempt_recipients
        if tx.stage is Stage.RCPT and recipients and recipients.matches(tx.recipient):
            return "recipient"
        return ""

    # ----------------------------------------------------------------------------------------
    # running checks

    async def run(self, stages: Iterable[Stage], tx: Transaction, deadline: float) -> list[Result]:
        """Run every enabled check of ``stages`` (in order) and return their results.

        ``deadline`` is a ``loop.time()`` value; checks still running then are cut off.

        The checks of a group (see ``_groups``) run concurrently. Each check's first step runs
        at once in this task (see :meth:`_start`); most finish there, and a group whose checks
        all do costs no coroutine at all. Of those that have to wait, the first continues in
        this task and each other one in a task of its own (:meth:`_wait`).
        """
        results: list[Result | None] = []
        # The transaction's facts dict is updated in place as checks finish (no copy of the
        # transaction per stage): the checks of a later group or stage see the earlier facts.
        if isinstance(tx.facts, dict):
            facts: dict[str, LogValue] = tx.facts
        else:
            facts = dict(tx.facts)
            tx = tx.with_facts(facts)
        for stage in stages:
            for group in self._groups[stage]:
                first = len(results)
                waiting: list[tuple[int, _Started]] | None = None
                for active in group:
                    started = self._start(active, stage, tx, deadline)
                    if isinstance(started, Result):
                        results.append(started)
                        continue
                    if waiting is None:
                        waiting = []
                    waiting.append((len(results), started))
                    results.append(None)
                if waiting is not None and len(waiting) == 1:
                    index, started = waiting[0]
                    results[index] = await self._complete(started)
                elif waiting is not None:
                    await self._wait(waiting, results)
                for index in range(first, len(results)):
                    result = results[index]
                    if result is not None and result.facts:
                        facts.update(result.facts)
        return cast("list[Result]", results)

    async def _wait(self, waiting: list[tuple[int, _Started]], results: list[Result | None]) -> None:
        """Finish the checks of a group that wait, concurrently; put their results in place."""
        loop = running_loop()
        others = [(index, loop.create_task(self._complete(started))) for index, started in waiting[1:]]
        try:
            index, started = waiting[0]
            results[index] = await self._complete(started)
            for index, task in others:
                results[index] = await task
        finally:
            for _, task in others:
                task.cancel()

    def _start(
        self, active: ActiveCheck, stage: Stage, tx: Transaction, deadline: float
    ) -> Result | _Started:
        """Run the check's first step now: its result, or what it is waiting for.

        A check that finishes without waiting (a cached DNS answer, a computation) costs no
        task and no timer. One that waits is finished by :meth:`_complete` under its budget.
        A kept result (see :meth:`_reused`) is given before anything else, past the deadline too:
        it costs nothing.
        """
        reuse = self._reuse.get(active.name) if self._reuse else None
        key: Hashable | None = None
        if reuse is not None:
            try:
                values = active.check.reuse_key(stage, tx)
            except Exception as exc:
                return self._finish(active, self._failure(active, exc), time.perf_counter())
            if values is not None:
                key = (stage, values)
                kept = self._reused(reuse, key)
                if kept is not None:
                    # The kept object itself (frozen, marked reused): no copy, no time stamp.
                    return self._finish(active, kept, time.perf_counter()) if active.observe else kept
        began = time.perf_counter()
        budget = min(active.timeout, deadline - running_loop().time())
        if budget <= 0:
            return self._finish(active, _error(active.name, "deadline"), began)
        if reuse is not None:
            return self._start_reusing(active, stage, tx, budget, began, reuse=reuse, key=key)
        coro = active.check.check(stage, tx)
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            return self._finish(active, cast("Result", done.value), began)
        except Exception as exc:
            return self._finish(active, self._failure(active, exc), began)
        return _Started(active, coro, waiting, budget, began)

    def _reused(
        self, reuse: collections.OrderedDict[Hashable, tuple[float, Result]], key: Hashable
    ) -> Result | None:
        """The kept result for ``key`` while its answers are cached (and drop an expired one)."""
        kept = reuse.get(key)
        if kept is None:
            return None
        if kept[0] > cast("Resolver", self._dns).now():
            reuse.move_to_end(key)
            return kept[1]
        del reuse[key]
        return None

    def _start_reusing(
        self,
        active: ActiveCheck,
        stage: Stage,
        tx: Transaction,
        budget: float,
        began: float,
        *,
        reuse: collections.OrderedDict[Hashable, tuple[float, Result]],
        key: Hashable | None,
    ) -> Result | _Started:
        """:meth:`_start` for a check whose result may be kept: run it, keep what it gives."""
        dns = cast("Resolver", self._dns)
        now = dns.now()
        outer = dns.watch()
        coro = active.check.check(stage, tx)
        try:
            waiting = coro.send(None)
        except StopIteration as done:
            result = cast("Result", done.value)
            expires = dns.unwatch(outer)
            if key is not None and result.verdict is not Verdict.ERROR and expires > now:
                reuse[key] = (min(expires, now + dns.settings.max_ttl), _kept(result))
                if len(reuse) > self._reuse_size:
                    reuse.popitem(last=False)
            return self._finish(active, result, began)
        except Exception as exc:
            dns.unwatch(outer)
            return self._finish(active, self._failure(active, exc), began)
        dns.unwatch(outer)
        return _Started(active, coro, waiting, budget, began)

    async def _complete(self, started: _Started) -> Result:
        """Drive a check that waits to its end, under its budget (asyncio.timeout semantics)."""
        active = started.active
        remaining = max(0.0, started.budget - (time.perf_counter() - started.began))
        # The budget's enter/leave rather than "async with": the same semantics, without two
        # awaited coroutines on every check that waits.
        budget = self._watchdog.budget(remaining).enter()
        try:
            result = await _resume(started.coro, started.waiting)
        except BaseException as exc:
            expired = budget.leave()
            if isinstance(exc, asyncio.CancelledError):
                if not expired:
                    raise  # cancelled from elsewhere: not ours to turn into a result
                result = _error(active.name, "timeout")
            elif isinstance(exc, TimeoutError):
                result = _error(active.name, "timeout")
            elif isinstance(exc, Exception):
                result = self._failure(active, exc)
            else:
                raise
        else:
            budget.leave()
        return self._finish(active, result, started.began)

    @staticmethod
    def _failure(active: ActiveCheck, exc: Exception) -> Result:
        """The ERROR result for a check that raised (state and DNS trouble without a traceback)."""
        if isinstance(exc, StateError):
            log.warning("check=%s error: state store: %s", active.name, exc)
            return _error(active.name, "state unavailable")
        if isinstance(exc, DnsError):
            log.warning("check=%s error: dns: %s", active.name, exc)
            return _error(active.name, "dns temporary failure")
        log.error("check=%s raised %s", active.name, type(exc).__name__, exc_info=exc)
        return _error(active.name, f"exception {type(exc).__name__}")

    def _finish(self, active: ActiveCheck, result: Result, began: float) -> Result:
        """Stamp the time taken; apply observe mode and on_error."""
        elapsed = (time.perf_counter() - began) * 1000.0
        if active.observe:
            if result.action is not None or result.score:
                what = result.action.kind.name if result.action else f"score {result.score:g}"
                self.observed[(active.name, what)] += 1
            return dataclasses.replace(result, elapsed_ms=elapsed, observed=True)
        if result.verdict is Verdict.ERROR and active.on_error == "tempfail" and result.action is None:
            result = dataclasses.replace(
                result, action=Action.defer(self.settings.tempfail_text, 451, "4.3.0")
            )
        # Stamped in place: a check returns a new Result per call (Check.result() makes one),
        # and replace() would cost more than the rest of this function on the hot path.
        object.__setattr__(result, "elapsed_ms", elapsed)
        return result

    # ----------------------------------------------------------------------------------------
    # deciding

    def decide(
        self, stage: Stage, results: Sequence[Result], *, exempt: str = "", elapsed_ms: float = 0.0
    ) -> Decision:
        """Turn the results gathered so far for this transaction into one decision at ``stage``."""
        settings = self.settings
        counted = [r for r in results if not r.observed]
        score = 0.0
        action = DUNNO
        reasons: list[str] = []
        for result in counted:
            score += result.score
            if result.action is not None and result.action.kind > action.kind:
                action = result.action
                reasons = [result.reason or result.action.text]
        if stage.order >= settings.reject_stage.order and action.kind < ActionKind.DEFER:
            scored: Action | None = None
            if score >= settings.reject_score:
                scored = Action(ActionKind.REJECT, settings.reject_code, settings.reject_dsn, "x")
            elif score >= settings.defer_score:
                scored = Action(ActionKind.DEFER, settings.defer_code, settings.defer_dsn, "x")
            if scored is not None:
                reasons = [r.reason for r in counted if r.score > 0 and r.reason] or ["policy score too high"]
                # The reply formatter makes the text one bounded printable line.
                action = dataclasses.replace(scored, text="; ".join(dict.fromkeys(reasons)))
        headers: tuple[str, ...] = ()
        if action.kind is ActionKind.DUNNO:
            headers = tuple([r.header for r in counted if r.header])
        return assemble(
            Decision,
            {
                "action": action,
                "score": score,
                "results": tuple(results),
                "stage": stage,
                "exempt": exempt,
                "headers": headers,
                "reasons": tuple(reasons),
                "elapsed_ms": elapsed_ms,
            },
        )

    @property
    def has_after_hooks(self) -> bool:
        return bool(self._with_after)

    async def after(self, tx: Transaction, decision: Decision) -> None:
        """Run every check's bookkeeping hook; failures are logged, never raised."""
        rest = self.start_after(tx, decision)
        if rest is not None:
            await rest

    def start_after(self, tx: Transaction, decision: Decision) -> Coroutine[Any, Any, None] | None:
        """Take each bookkeeping hook's first step now; what finishes those that wait, or None.

        Most hooks find nothing to book and return at once: they cost no task. The hooks that
        wait (a Redis write) are finished by the returned coroutine, each under its budget.
        """
        waiting: list[tuple[ActiveCheck, Coroutine[Any, Any, None], object]] = []
        results = decision.results
        for active in self._with_after:
            name = active.name
            if not any(r.check == name for r in results):
                continue
            coro = active.check.after(tx, decision)
            try:
                waiting.append((active, coro, coro.send(None)))
            except StopIteration:
                continue
            except Exception as exc:
                _after_failed(active, exc)
        return self._finish_after(waiting) if waiting else None

    async def _finish_after(
        self, waiting: list[tuple[ActiveCheck, Coroutine[Any, Any, None], object]]
    ) -> None:
        for active, coro, first in waiting:
            try:
                async with self._watchdog.budget(active.timeout):
                    await _resume(coro, first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _after_failed(active, exc)


async def start_pipeline(
    configs: Sequence[CheckConfig], settings: PipelineSettings, services: Services
) -> tuple[Pipeline, list[Check[Any]]]:
    """Instantiate and start the enabled checks in order; the pipeline and the started checks.

    If one fails to start, those already started are closed again and the error propagates.
    """
    active: list[ActiveCheck] = []
    started: list[Check[Any]] = []
    try:
        for cfg in configs:
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
        dns = services.dns if services.dns.settings.reuse_results else None
        return Pipeline(active, settings, dns=dns), started
    except BaseException:
        for check in started:
            with contextlib.suppress(Exception):
                await check.aclose()
        raise


class _Started:
    """A check whose first step is done and which now waits for ``waiting``.

    A plain class: a frozen dataclass costs a microsecond more to build, on every wait.
    """

    __slots__ = ("active", "began", "budget", "coro", "waiting")

    def __init__(
        self,
        active: ActiveCheck,
        coro: Coroutine[Any, Any, Result],
        waiting: object,
        budget: float,
        began: float,
    ) -> None:
        self.active = active
        self.coro = coro
        self.waiting = waiting
        self.budget = budget
        self.began = began


async def _resume(coro: Coroutine[Any, Any, _T], waiting: object) -> _T:
    """Drive ``coro``, which has just yielded ``waiting``, to its end in the current task.

    What a Task does for its coroutine: wait for the future it yielded (``None`` means "let
    the loop run once"), then send the coroutine on, or throw in what the wait raised (the
    future's exception, or this task's cancellation).
    """
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)
            elif asyncio.isfuture(waiting):
                # The check's own await marked the future as waited for; a Task clears that
                # mark before it waits on the future itself, and so do we.
                waiting._asyncio_future_blocking = False  # noqa: SLF001 - asyncio's future protocol
                await waiting
            else:
                raise RuntimeError(f"a check yielded {waiting!r}, not an asyncio future")  # noqa: TRY301
        except BaseException as exc:  # everything, cancellation included, goes back into the check
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return cast("_T", done.value)
        else:
            try:
                waiting = coro.send(None)
            except StopIteration as done:
                return cast("_T", done.value)


def _groups(checks: Sequence[ActiveCheck]) -> tuple[tuple[ActiveCheck, ...], ...]:
    """Split a stage's checks (in order) where a check needs facts from those before it."""
    groups: list[tuple[ActiveCheck, ...]] = []
    group: list[ActiveCheck] = []
    for active in checks:
        if active.check.needs and group:
            groups.append(tuple(group))
            group = []
        group.append(active)
    if group:
        groups.append(tuple(group))
    return tuple(groups)


def _after_failed(active: ActiveCheck, exc: Exception) -> None:
    log.warning("check=%s after-hook failed: %s: %s", active.name, type(exc).__name__, exc)


def _kept(result: Result) -> Result:
    """The copy of ``result`` that the pipeline keeps for reuse: marked reused, no time or observe mark."""
    return Result(
        check=result.check,
        verdict=result.verdict,
        score=result.score,
        reason=result.reason,
        log=result.log,
        facts=result.facts,
        action=result.action,
        header=result.header,
        auth=result.auth,
        reused=True,
    )


def _error(name: str, what: str) -> Result:
    return Result(check=name, verdict=Verdict.ERROR, log={"error": what})

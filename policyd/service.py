"""The policy service: one policy request in, one action out (no sockets here).

For each request it builds the :class:`Transaction`, decides exemptions once, runs the checks
of every stage that is complete at this ``protocol_state`` and has not run yet for this
transaction, asks the pipeline for the decision, logs the one decision line and returns the
``action=`` text. The server (:mod:`mxward.policyd.server`) and ``mxward check`` both use it.

Stages and ``protocol_state``
    With Postfix's default ``smtpd_delay_reject = yes`` every restriction list runs at RCPT, so
    a RCPT request completes the connect, helo, mail and rcpt stages at once. Results of the
    connect/helo/mail stages are kept per transaction (keyed by ``instance``, or by the client
    endpoint before MAIL FROM) in a bounded in-process memo, so they are computed once across
    the recipients of a message; rcpt-stage results are per recipient. The memo is only an
    optimisation: Postfix may send the requests of one message over different connections, to
    different worker processes, and each request carries everything needed to recompute.
    VRFY and ETRN requests run no checks and get DUNNO. Facts that connect/helo/mail-stage
    checks provide are in ``tx.facts`` for the checks of later stages.

Headers
    A policy reply can PREPEND one header, so the headers that checks ask for (X-Greylist,
    Received-SPF, ...) are queued per message (``instance``) and sent one per request, each
    name once per message, at the RCPT requests and at DATA (``check_policy_service`` in
    ``smtpd_data_restrictions``; ``mxward postfix-config`` prints it). A deferring or rejecting
    reply sends none. Like the memo, this is kept per process: Postfix asks over one connection
    per smtpd process, so the requests of one message reach one worker.

Message facts for the content filter
    At DATA and END-OF-MESSAGE (when the request carries a queue id), the envelope facts of the
    message (client, HELO, sender, SASL login, every check's facts, the decisions per
    recipient) are stored under the queue id (:mod:`mxward.shared.msgfacts`) before the reply
    goes out, so the content filter finds them when Postfix hands it the message.

Exempt recipients
    A recipient in ``[policyd.exempt] recipients`` (postmaster@, abuse@) is accepted whatever the
    checks say; the DATA and END-OF-MESSAGE requests of that message are exempt too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from typing import Final

from mxward.policyd.protocol import STATE_STAGES, action_text
from mxward.shared.aio import running_loop
from mxward.shared.logs import decision_line, info_line
from mxward.shared.msgfacts import MessageFacts
from mxward.shared.netutil import parse_ip
from mxward.shared.pipeline import EARLY_STAGES, Pipeline
from mxward.shared.plugin import ActionKind, Decision, Result, Stage, Transaction
from mxward.shared.records import assemble
from mxward.shared.state import StateError

__all__ = ["PolicyService"]

log = logging.getLogger("mxward.policyd")

_MEMO_SIZE: Final = 20000
_MEMO_TTL: Final = 900.0


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0


def transaction(attrs: Mapping[str, str], stage: Stage) -> Transaction:
    """The checks' view of a policy request."""
    # (Typed as a dict, the compiled lookups below skip a method call each.)
    a: dict[str, str] = attrs if type(attrs) is dict else dict(attrs)
    address = a.get("client_address", "")
    # Every field of Transaction, by name (records.assemble refuses fewer or more).
    return assemble(
        Transaction,
        {
            "stage": stage,
            "client_address": address,
            "client_ip": parse_ip(address) if address else None,
            "client_name": a.get("client_name") or "unknown",
            "reverse_client_name": a.get("reverse_client_name") or "unknown",
            "helo": a.get("helo_name", ""),
            "sender": a.get("sender", ""),
            "recipient": a.get("recipient", ""),
            "recipient_count": _int(a.get("recipient_count", "0")),
            "sasl_username": a.get("sasl_username", ""),
            "instance": a.get("instance", ""),
            "queue_id": a.get("queue_id", ""),
            "protocol_state": a.get("protocol_state", "").upper(),
            "attrs": attrs,
            "facts": {},
            "recipients": (),
            "message": None,
        },
    )


class _Message:
    """What the service remembers about one message (by ``instance``) between its requests."""

    __slots__ = ("decisions", "expires", "pending", "sent", "spared")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        # Made when the message first has a header to send: most messages never do, and every
        # container here is one more object for the garbage collector to scan.
        self.sent: set[str] | None = None
        self.pending: dict[str, str] | None = None
        self.spared = False
        self.decisions: list[str] = []


def _header_name(header: str) -> str:
    return header.split(":", 1)[0].strip().lower()


class PolicyService:
    """Decides policy requests with one pipeline; swap :attr:`pipeline` to reload."""

    def __init__(self, pipeline: Pipeline, facts: MessageFacts | None = None) -> None:
        self.pipeline = pipeline
        self.facts = facts
        self._memo: collections.OrderedDict[tuple[str, ...], tuple[float, tuple[Result, ...]]] = (
            collections.OrderedDict()
        )
        self._messages: collections.OrderedDict[str, _Message] = collections.OrderedDict()
        self.after_tasks: set[asyncio.Task[None]] = set()

    async def decide(self, attrs: Mapping[str, str]) -> tuple[str, Transaction, Decision]:
        """Decide one request; returns the action text, the transaction and the decision."""
        started = time.perf_counter()
        pipeline = self.pipeline
        loop = running_loop()
        deadline = loop.time() + pipeline.settings.deadline
        state = attrs.get("protocol_state", "").upper()
        stage = STATE_STAGES.get(state)
        tx = transaction(attrs, stage or Stage.RCPT)
        if stage is None:
            # VRFY, ETRN or a state this version does not know: no check applies.
            decision = pipeline.decide(Stage.CONNECT, (), exempt="", elapsed_ms=0.0)
            return "DUNNO", tx, decision
        exempt = pipeline.exemption(tx)
        if tx.instance and self._messages:
            exempt = self._recipient_exemption(tx.instance, stage, exempt)
        results: list[Result] = []
        if not exempt:
            early = pipeline.early_stages(stage)
            if early:
                results.extend(await self._early_results(early, tx, deadline))
            if stage not in EARLY_STAGES and pipeline.has_checks(stage):
                results.extend(await pipeline.run((stage,), tx, deadline))
        elif exempt == "recipient" and tx.instance:
            self._message(tx.instance).spared = True
        elapsed = (time.perf_counter() - started) * 1000.0
        decision = pipeline.decide(stage, results, exempt=exempt, elapsed_ms=elapsed)
        header = ""
        if decision.action.kind is not ActionKind.DUNNO:
            pass  # a deferral or rejection carries no header; queued ones wait
        elif tx.instance:
            if decision.headers or tx.instance in self._messages:
                header = self._next_header(tx.instance, decision.headers)
        elif decision.headers:
            header = decision.headers[0]
        text = action_text(decision.action, header)
        return text, tx, decision

    async def handle(self, attrs: Mapping[str, str]) -> str:
        """Decide, log the decision line, schedule the after-hooks; return the action text."""
        text, tx, decision = await self.decide(attrs)
        if log.isEnabledFor(logging.INFO):
            info_line(log, decision_line(tx, decision, text))
        if self.facts is not None and tx.instance:
            await self._record(tx, decision, text)
        if decision.results and self.pipeline.has_after_hooks:
            rest = self.pipeline.start_after(tx, decision)
            if rest is not None:
                task = running_loop().create_task(rest)
                self.after_tasks.add(task)
                task.add_done_callback(self.after_tasks.discard)
        return text

    async def _record(self, tx: Transaction, decision: Decision, text: str) -> None:
        """Remember this request's decision; at DATA/END-OF-MESSAGE store the message's facts."""
        if decision.stage is Stage.RCPT:
            message = self._message(tx.instance)
            if len(message.decisions) < 100:
                word = text.split(" ", 1)[0]
                recipient: str = tx.recipient
                message.decisions.append("rcpt=<" + recipient + "> " + word + f" score={decision.score:g}")
            return
        if decision.stage not in (Stage.DATA, Stage.END_OF_MESSAGE) or not tx.queue_id or self.facts is None:
            return
        known = self._messages.get(tx.instance)
        get = tx.attrs.get
        record = {
            "client_address": tx.client_address,
            "client_name": tx.client_name,
            "reverse_client_name": tx.reverse_client_name,
            "helo": tx.helo,
            "sender": tx.sender,
            "sasl_username": tx.sasl_username,
            "sasl_method": get("sasl_method", ""),
            "recipient_count": tx.recipient_count,
            "size": get("size", ""),
            "instance": tx.instance,
            "stage": tx.protocol_state,
            "decisions": [
                *(known.decisions if known else ()),
                f"{tx.protocol_state} {text.split(' ', 1)[0]}",
            ],
            "facts": dict(tx.facts),
        }
        try:
            async with asyncio.timeout(1.0):
                await self.facts.save(tx.queue_id, record)
        except (StateError, TimeoutError) as exc:
            log.warning("queue=%s message facts not stored: %s", tx.queue_id, exc)

    async def _early_results(
        self, stages: list[Stage], tx: Transaction, deadline: float
    ) -> tuple[Result, ...]:
        if tx.instance:
            key: tuple[str, ...] = ("i", tx.instance)
        else:
            key = ("c", tx.client_address, tx.attrs.get("client_port", ""), tx.helo)
        now = time.monotonic()
        memo = self._memo
        hit = memo.get(key)
        if (
            hit is not None
            and hit[0] > now
            and self.pipeline.early_checks(stages[-1]) <= {r.check for r in hit[1]}
        ):
            # Remembered: give the later stages' checks the facts a fresh run would have.
            if isinstance(tx.facts, dict):
                for result in hit[1]:
                    if result.facts:
                        tx.facts.update(result.facts)
            return hit[1]
        results = tuple(await self.pipeline.run(stages, tx, deadline))
        memo[key] = (now + _MEMO_TTL, results)
        memo.move_to_end(key)
        while len(memo) > _MEMO_SIZE:
            memo.popitem(last=False)
        return results

    def _message(self, instance: str) -> _Message:
        now = time.monotonic()
        messages = self._messages
        message = messages.get(instance)
        if message is None or message.expires <= now:
            message = messages[instance] = _Message(now + _MEMO_TTL)
            messages.move_to_end(instance)
            while len(messages) > _MEMO_SIZE:
                messages.popitem(last=False)
        return message

    def _recipient_exemption(self, instance: str, stage: Stage, exempt: str) -> str:
        """DATA and END-OF-MESSAGE of a message to an exempt recipient are exempt too."""
        if exempt or stage not in (Stage.DATA, Stage.END_OF_MESSAGE):
            return exempt
        message = self._messages.get(instance)
        return "recipient" if message is not None and message.spared else exempt

    def _next_header(self, instance: str, headers: tuple[str, ...]) -> str:
        """Queue ``headers`` for this message; return the next one to PREPEND (or ``""``).

        Each header name is sent once per message; the rest wait for the next request.
        """
        message = self._message(instance)
        sent = message.sent
        if sent is None:
            sent = message.sent = set()
        pending = message.pending
        if pending is None:
            pending = message.pending = {}
        for header in headers:
            name = _header_name(header)
            if name not in sent and name not in pending:
                pending[name] = header
        if not pending:
            return ""
        name = next(iter(pending))
        sent.add(name)
        return pending.pop(name)

    async def drain(self, grace: float) -> None:
        """Wait for running after-hooks (at shutdown)."""
        if self.after_tasks:
            await asyncio.wait(set(self.after_tasks), timeout=grace)

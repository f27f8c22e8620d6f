"""The filter's decision for one message, and what it does with it (no sockets here).

For each message: parse it once (:class:`~mxward.contentfilter.message.Message`), read the
policy daemon's envelope facts by queue id (:mod:`mxward.shared.msgfacts`), run the CONTENT
checks on the shared pipeline, map the decision to one of the filter's actions, carry it out
and only then answer the upstream:

========== ===================================================================================
action     when, and what happens
========== ===================================================================================
pass       score below ``tag_score``: reinjected with Authentication-Results (and
           X-Spam-Status when ``spam_headers``)
tag        score at or above ``tag_score``: reinjected with X-Spam-Flag: YES, X-Spam-Status
           and the ``subject_prefix``
reject     a check forced a rejection, or the score reached ``reject_score``. Before-queue
           (``mode = "proxy"``): the client gets ``reject_code reject_dsn reasons``.
           After-queue the sender can no longer be told without backscatter, so this becomes
           ``reject_action``: quarantine (default), discard or tag
quarantine stored under the data dir and indexed in Redis (``mxward quarantine``), then 250
discard    250 and nothing delivered (only when configured as ``reject_action``)
tempfail   a check asked to defer (or failed with ``on_error = "tempfail"``): 451, Postfix
           keeps the mail and retries
========== ===================================================================================

The upstream gets 250 only after the reinjection smtpd said 250 to the final dot (or the
quarantine copy is on disk and indexed); any exception, time-out or downstream trouble gives
``451 4.3.0`` and the downstream transaction is reset, so nothing is delivered twice on retry.

Afterwards the verdict goes into the sender IP's karma (``[filter] karma``): tagged,
quarantined, rejected or discarded mail and any DMARC fail count as naughty; clean mail from a
client policyd already knew, or with a first-party DKIM pass (DKIM aligned with the From
domain), as nice; once per queue id.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mxward.contentfilter.message import Message
from mxward.shared.aio import running_loop
from mxward.shared.authresults import AuthResult, build_header, ours
from mxward.shared.karma import KarmaRules, KarmaStore, Outcome
from mxward.shared.logs import bound_part, checks_value, info_line, kv
from mxward.shared.netutil import parse_ip
from mxward.shared.plugin import ActionKind, Decision, LogValue, Result, Stage, Transaction
from mxward.shared.state import StateError

if TYPE_CHECKING:
    from mxward.contentfilter.envelope import Envelope
    from mxward.contentfilter.quarantine import Quarantine
    from mxward.contentfilter.reinject import Downstream
    from mxward.shared.config import FilterSettings
    from mxward.shared.msgfacts import MessageFacts
    from mxward.shared.pipeline import Pipeline
    from mxward.shared.plugin import Services

__all__ = ["FilterService", "Judgement", "Verdict"]

log = logging.getLogger("mxward.filter")

# The actions the filter can take (see the module docstring).
Verdict = str
PASS, TAG, REJECT, QUARANTINE, DISCARD, TEMPFAIL = (
    "pass",
    "tag",
    "reject",
    "quarantine",
    "discard",
    "tempfail",
)


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the checks decided, before anything was done with the message."""

    tx: Transaction
    decision: Decision
    verdict: Verdict
    policy: str  # found | missing | none | unavailable: the policyd record for this queue id


class FilterService:
    """Judges and delivers messages with one pipeline; swap :attr:`pipeline` to reload."""

    def __init__(
        self,
        settings: FilterSettings,
        services: Services,
        pipeline: Pipeline,
        *,
        facts: MessageFacts | None,
        quarantine: Quarantine | None,
        karma_rules: KarmaRules | None,
        authserv_id: str,
    ) -> None:
        self.settings = settings
        self.services = services
        self.pipeline = pipeline
        self.facts = facts
        self.quarantine = quarantine
        self.karma = KarmaStore(services.state, karma_rules) if karma_rules is not None else None
        self.karma_rules = karma_rules
        self.authserv_id = authserv_id
        self._tasks: set[asyncio.Future[Any]] = set()
        # Open upstream connections (FilterSMTP), for a graceful stop.
        self.connections: set[Any] = set()

    def background(self, task: asyncio.Future[Any]) -> None:
        """Keep a reference to a task that must finish on its own (bookkeeping, closing)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def stop(self, grace: float) -> None:
        """Let transactions in progress finish (up to ``grace``), then close every connection.

        A connection closed between transactions loses nothing; one cut in a transaction is
        answered by nobody, so Postfix keeps the mail and retries.
        """
        loop = running_loop()
        until = loop.time() + grace
        while any(c.busy for c in self.connections) and loop.time() < until:  # noqa: ASYNC110 - polls at shutdown only
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self.drain(5.0)

    # ----------------------------------------------------------------------------------------
    # judging

    async def judge(
        self,
        message: Message,
        *,
        sender: str,
        recipients: Sequence[str],
        xforward: Mapping[str, str],
    ) -> Judgement:
        """Run the content checks and decide (also used offline by ``mxward check``)."""
        started = time.perf_counter()
        queue_id = xforward.get("IDENT", "")
        record: dict[str, Any] | None = None
        policy = "none"
        if queue_id and self.facts is not None:
            try:
                record = await self.facts.load(queue_id)
            except StateError as exc:
                log.warning("queue=%s policy facts unavailable: %s", queue_id, exc)
                policy = "unavailable"
            else:
                policy = "found" if record is not None else "missing"
        tx = self._transaction(message, sender, recipients, xforward, record)
        results: list[Result] = []
        if self.pipeline.has_checks(Stage.CONTENT):
            deadline = running_loop().time() + self.settings.deadline
            results = await self.pipeline.run((Stage.CONTENT,), tx, deadline)
        elapsed = (time.perf_counter() - started) * 1000.0
        decision = self.pipeline.decide(Stage.CONTENT, results, elapsed_ms=elapsed)
        return Judgement(tx=tx, decision=decision, verdict=self.verdict(decision), policy=policy)

    def verdict(self, decision: Decision) -> Verdict:
        kind = decision.action.kind
        if kind in (ActionKind.DEFER, ActionKind.DEFER_IF_PERMIT):
            return TEMPFAIL
        if kind is ActionKind.REJECT:
            return REJECT if self.settings.mode == "proxy" else self.settings.reject_action
        if decision.score >= self.settings.tag_score:
            return TAG
        return PASS

    @staticmethod
    def _transaction(
        message: Message,
        sender: str,
        recipients: Sequence[str],
        xforward: Mapping[str, str],
        record: Mapping[str, Any] | None,
    ) -> Transaction:
        get = xforward.get
        address = get("ADDR", "").removeprefix("IPv6:")
        facts: dict[str, LogValue] = {}
        policy: Mapping[str, Any] = record or {}
        raw_facts = policy.get("facts")
        if isinstance(raw_facts, dict):
            facts.update({str(k): v for k, v in raw_facts.items() if isinstance(v, str | int | float | bool)})
        return Transaction(
            stage=Stage.CONTENT,
            client_address=address or str(policy.get("client_address", "")),
            client_ip=parse_ip(address) if address else parse_ip(str(policy.get("client_address", ""))),
            client_name=get("NAME", "") or str(policy.get("client_name", "")) or "unknown",
            reverse_client_name=str(policy.get("reverse_client_name", "")) or "unknown",
            helo=get("HELO", "") or str(policy.get("helo", "")),
            sender=sender,
            recipient_count=len(recipients),
            recipients=tuple(recipients),
            sasl_username=str(policy.get("sasl_username", "")),
            instance=str(policy.get("instance", "")),
            queue_id=get("IDENT", ""),
            protocol_state="CONTENT",
            facts=facts,
            message=message,
        )

    # ----------------------------------------------------------------------------------------
    # delivering

    async def deliver(self, env: Envelope, content: bytes, downstream: Downstream) -> str:
        """Judge and deliver one message; the reply for the upstream's final dot."""
        started = time.perf_counter()
        message = Message.parse(content)
        judgement: Judgement | None = None
        detail = ""
        try:
            judgement = await self.judge(
                message, sender=env.sender, recipients=env.addresses, xforward=env.xforward
            )
            reply, detail = await self._carry_out(judgement, env, message, downstream)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("message from <%s>: %s", env.sender, type(exc).__name__)
            await downstream.reset()
            reply, detail = f"451 4.3.0 {self.settings.tempfail_text}", f"error={kv(type(exc).__name__)}"
        elapsed = (time.perf_counter() - started) * 1000.0
        if judgement is not None:
            self._log(judgement, env, message, reply, detail, elapsed)
            if reply.startswith("2") or judgement.verdict == REJECT:
                self._after(judgement)
        return reply

    async def _carry_out(
        self, judgement: Judgement, env: Envelope, message: Message, downstream: Downstream
    ) -> tuple[str, str]:
        verdict = judgement.verdict
        decision = judgement.decision
        if verdict in (PASS, TAG):
            out = await self.finish(self.render(message, judgement), judgement)
            reply = await downstream.send_data(out)
            if reply.ok:
                text = (
                    reply.text if re.match(r"2\.\d{1,3}\.\d{1,3} ", reply.text) else f"2.0.0 Ok: {reply.text}"
                )
                return f"250 {text}"[:400], f"downstream={kv(reply.text)}"
            await downstream.reset()
            if reply.code >= 500 and self.settings.relay_downstream_rejects:
                return reply.relay(), f"downstream={kv(reply.relay())}"
            log.warning("reinjection smtpd refused the message: %s", reply.relay())
            return f"451 4.3.0 {self.settings.tempfail_text}", f"downstream={kv(reply.relay())}"
        await downstream.reset()
        if verdict == TEMPFAIL:
            return decision.action.reply or f"451 4.3.0 {self.settings.tempfail_text}", ""
        if verdict == REJECT:
            text = "; ".join(decision.reasons) or "Message content rejected"
            action = decision.action
            code, dsn = (action.code, action.dsn) if action.code >= 500 else (554, "5.7.1")
            return f"{code} {dsn} {_one_line(text)}", ""
        if verdict == DISCARD:
            return "250 2.0.0 Ok: discarded", ""
        if verdict == QUARANTINE:
            if self.quarantine is None:
                raise RuntimeError("quarantine is not available")
            entry = await self.quarantine.store(
                message.raw,
                sender=env.sender,
                recipients=env.addresses,
                client_address=judgement.tx.client_address,
                queue_id=judgement.tx.queue_id,
                subject=message.decoded("subject") or "",
                reason="; ".join(decision.reasons) or f"score {decision.score:g}",
                score=decision.score,
                mail_options=env.mail_params,
                rcpt_options=[params for _, params in env.recipients],
            )
            return f"250 2.0.0 Ok: quarantined as {entry.id}", f"quarantine={kv(entry.id)}"
        raise RuntimeError(f"unknown verdict {verdict!r}")

    def render(self, message: Message, judgement: Judgement) -> bytes:
        """The message as reinjected: our A-R on top, spam headers, ours-claiming A-R removed."""
        decision = judgement.decision
        tagged = judgement.verdict == TAG or (judgement.verdict == REJECT and self.settings.mode != "proxy")
        prepend = [build_header(self.authserv_id, self.auth_results(judgement))]
        if self.settings.spam_headers:
            tests = ",".join(r.check for r in decision.results if r.score) or "none"
            prepend.append(
                f"X-Spam-Status: {'Yes' if tagged else 'No'}, score={decision.score:.1f}"
                f" required={self.settings.tag_score:g} tests={tests}"
            )
            if tagged:
                prepend.append("X-Spam-Flag: YES")
        own = len(prepend)
        prepend.extend(r.header for r in decision.results if r.header and not r.observed)
        replace: dict[int, str] = {}
        prefix = self.settings.subject_prefix
        if tagged and prefix:
            found = message.indexes("subject")
            if found:
                current = "".join(c for c in message.headers[found[0]].value if c not in "\r\n\0")
                if not current.startswith(prefix.strip()):
                    replace[found[0]] = f"Subject: {prefix}{current}"
            else:
                prepend.append(f"Subject: {prefix.strip()}")
        remove = ours(message.headers, self.authserv_id)
        try:
            return message.rewrite(prepend=prepend, remove=remove, replace=replace)
        except (ValueError, UnicodeError) as exc:
            # A check's header or the received Subject was not one clean field: deliver with
            # our own headers only, never hold the mail back for it.
            log.warning("queue=%s header left out: %s", judgement.tx.queue_id, exc)
            return message.rewrite(prepend=prepend[:own], remove=remove)

    async def finish(self, out: bytes, judgement: Judgement) -> bytes:
        """Let signing checks (``Check.outgoing``) add their fields on top, each in turn.

        A check that fails with ``on_error = "tempfail"`` defers the message (the exception
        reaches :meth:`deliver`, which answers 451); otherwise the message goes without.
        """
        for active in self.pipeline.outgoing:
            if active.observe:
                continue
            try:
                async with asyncio.timeout(active.timeout):
                    fields = await active.check.outgoing(judgement.tx, out)
            except Exception as exc:
                if active.on_error == "tempfail":
                    raise
                log.warning(
                    "queue=%s check=%s outgoing step failed, delivering without it: %s: %s",
                    judgement.tx.queue_id,
                    active.name,
                    type(exc).__name__,
                    exc,
                )
                continue
            if fields:
                out = b"".join(_field_bytes(f) for f in fields) + out
        return out

    def auth_results(self, judgement: Judgement) -> list[AuthResult]:
        """iprev and spf from the policy daemon's facts, then every content check's results."""
        tx = judgement.tx
        facts = tx.facts
        out: list[AuthResult] = []
        iprev = facts.get("iprev.result")
        if isinstance(iprev, str) and iprev and tx.client_address:
            out.append(AuthResult("iprev", iprev, properties=(("policy.iprev", tx.client_address),)))
        spf = facts.get("spf.result")
        if isinstance(spf, str) and spf:
            if facts.get("spf.identity") == "helo" or not tx.sender:
                out.append(AuthResult("spf", spf, properties=(("smtp.helo", tx.helo),)))
            else:
                out.append(AuthResult("spf", spf, properties=(("smtp.mailfrom", tx.sender),)))
        for result in judgement.decision.results:
            out.extend(result.auth)
        return out

    # ----------------------------------------------------------------------------------------
    # afterwards

    def _after(self, judgement: Judgement) -> None:
        loop = running_loop()
        if self.pipeline.has_after_hooks:
            self.background(loop.create_task(self.pipeline.after(judgement.tx, judgement.decision)))
        if self.karma is not None:
            self.background(loop.create_task(self._book_karma(judgement)))

    async def _book_karma(self, judgement: Judgement) -> None:
        tx = judgement.tx
        if self.karma is None or tx.client_ip is None or not tx.queue_id or tx.sasl_username:
            return
        facts = tx.facts
        if judgement.verdict in (TAG, REJECT, QUARANTINE, DISCARD) or facts.get("dmarc.result") == "fail":
            outcome = Outcome.NAUGHTY  # a DMARC fail counts even under p=none
        elif judgement.verdict == PASS and (
            facts.get("karma.known") is True or facts.get("dmarc.dkim_aligned") is True
        ):
            outcome = Outcome.NICE  # clean mail from a known client, or with a first-party DKIM pass
        else:
            return
        try:
            await self.karma.book(tx.client_ip, f"filter:{tx.queue_id}", outcome, self.services.clock.now())
        except StateError as exc:
            log.warning("queue=%s karma not booked: %s", tx.queue_id, exc)

    def _log(  # noqa: PLR0917 - one line from everything that happened to the message
        self, judgement: Judgement, env: Envelope, message: Message, reply: str, detail: str, elapsed: float
    ) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        tx = judgement.tx
        decision = judgement.decision
        parts = []
        for r in decision.results:
            notes = ["observe"] if r.observed else []
            if r.score:
                notes.append(f"{r.score:+g}")
            notes.append(f"{r.elapsed_ms:.1f}ms")
            extra = " ".join(f"{k}={v}" for k, v in r.log.items())
            parts.append(
                bound_part(
                    f"{r.check}:{r.verdict.value}({','.join(notes)})" + (f"[{extra}]" if extra else "")
                )
            )
        record_view = ""
        if judgement.policy == "found":
            facts = tx.facts
            shown = [
                f"{k}={facts[k]}"
                for k in ("spf.result", "iprev.result", "karma.history", "geoip.country", "p0f.genre")
                if k in facts
            ]
            record_view = " ".join(shown)
        info_line(
            log,
            f"filter queue={kv(tx.queue_id)} client={kv(f'{tx.client_name}[{tx.client_address}]')}"
            f" helo={kv(tx.helo)} from={kv(f'<{env.sender}>')} rcpts={len(env.recipients)}"
            f" size={message.size} policyd={judgement.policy}"
            + (f"[{kv(record_view)}]" if record_view else "")
            + f" action={judgement.verdict} score={decision.score:g} checks={checks_value(parts)}"
            f" ms={elapsed:.1f} reply={kv(reply)}" + (f" {detail}" if detail else ""),  # already key=value
        )


def _field_bytes(field: str) -> bytes:
    """A header field from a check, as bytes with CRLF line ends (folding kept)."""
    if "\0" in field or not field.strip():
        raise ValueError("a header field must be non-empty and free of NUL")
    lines = field.replace("\r\n", "\n").split("\n")
    if any(not line or line[0] not in " \t" for line in lines[1:]):
        raise ValueError(f"header field {field[:40]!r}: a continuation line must start with white space")
    return "\r\n".join(lines).encode("utf-8") + b"\r\n"


def _one_line(text: str) -> str:
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return cleaned[:400]

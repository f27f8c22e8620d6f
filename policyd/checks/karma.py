"""karma: remember how each client behaved, and keep repeat offenders out for a while.

Stage: connect (history, penalty box), rcpt (recipient limit for unknown clients; only when
``max_recipients_unknown`` is set); bookkeeping after each refusal and at END-OF-MESSAGE.

What and why
    qpsmtpd's karma keeps a per-IP history of *nice* and *naughty* sessions and refuses clients
    whose history is bad (the "penalty box"). A policy server gets no disconnect event, so the
    books are closed where Postfix shows us the outcome:

    * when our answer refuses the message (a REJECT from any other check, or a score at or above
      ``[policyd.scoring] reject``): *naughty*;
    * at END-OF-MESSAGE (``check_policy_service`` in ``smtpd_end_of_data_restrictions``, which
      ``mxward postfix-config`` prints): the message's total score decides: at or above
      ``naughty_score`` *naughty*, at or below ``nice_score`` *nice*, else *neutral*;
    * later the content filter books its own verdicts (spam, virus, DMARC fail) through the same
      store (mxward.shared.karma), so the next connection is judged with them.

    Each message is booked once (by its ``instance``), however often Postfix asks. When naughty
    minus nice reaches ``negative``, the client is boxed for ``penalty`` times the number of
    times it was boxed before plus one (at most ``max_penalty``), and refused at every
    connection until then. A client with a good history (nice − naughty ≥ ``good_history``) gets
    ``good_score`` (a bonus) and the fact ``karma.history`` lets greylisting skip it. Temporary
    refusals (greylisting) are not judged.

    The score every check adds to is the pipeline's score: karma books the sum. Deferred mail,
    exempt clients (SMTP AUTH, [policyd.exempt] networks) and exempt recipients are not booked.

Options
    nice_score              float     -3.0    a message's total score at or below this is nice
    naughty_score           float     5.0     at or above this it is naughty (refused: always)
    negative                int       1       box the client when naughty − nice reaches this
    penalty                 duration  1d      first sentence; the n-th is n × penalty
    max_penalty             duration  30d     longest sentence
    history_ttl             duration  180d    history is forgotten this long after the last booking
    good_history            int       5       nice − naughty at which a client counts as good (0 = off)
    good_score              float     -2.0    score for a good client (a bonus: negative)
    penalty_action          string    reject  reject (550), defer (450), disconnect (521: reply
                                              and close) or tempdisconnect (421)
    penalty_text            string    ...     reply text; {client} and {remaining} are filled in
    max_recipients_unknown  int       0       recipients per message for clients without a good
                                              history; more get 452 4.5.3 (0 = no limit)
    ipv4_prefix             int       32      IPv4 clients are judged per address
    ipv6_prefix             int       64      IPv6 clients per /64 (one customer's network)

Facts
    karma.known (bool), karma.good (bool: history ≥ good_history; greylisting skips such
    clients), karma.history (nice − naughty), karma.nice, karma.naughty,
    karma.penalty_until (epoch seconds, 0 = none).

Failure behaviour
    Redis unreachable: the check reports an error (mail flows unless ``on_error = "tempfail"``);
    bookkeeping that fails is logged and lost (never retried into a double count). The penalty
    box never applies to exempt clients or to ``[policyd.exempt] recipients`` (postmaster@).

Redis keys
    karma:{NET}:h (history hash, TTL history_ttl from the last booking, at least the sentence),
    karma:{NET}:m:ID (booking marker, 1d), karma:{NET}:c:PORT (connection marker, 1h),
    karma:{NET}:r:INSTANCE (recipient set, 1h); see ``mxward state keys``.

Administration
    ``mxward karma show IP``, ``mxward karma list [--boxed]``, ``mxward karma allow IP``
    (release and mark good), ``mxward karma box IP [--for 2d]``, ``mxward karma reset IP``.

References
    RFC 5321 §4.5.3.1.10 (452 too many recipients), §3.8 (421 closes the session).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.shared.karma import KarmaRules, KarmaStore
from mxward.shared.plugin import (
    Action,
    ActionKind,
    Check,
    Decision,
    Result,
    Services,
    Stage,
    Transaction,
    Verdict,
)
from mxward.shared.units import format_remaining

__all__ = ["KarmaCheck", "Options"]

_ACTIONS: dict[str, tuple[ActionKind, int, str]] = {
    "reject": (ActionKind.REJECT, 550, "5.7.1"),
    "defer": (ActionKind.DEFER, 450, "4.7.1"),
    "disconnect": (ActionKind.REJECT, 521, "5.7.1"),
    "tempdisconnect": (ActionKind.DEFER, 421, "4.7.1"),
}


@dataclass(frozen=True, kw_only=True)
class Options(KarmaRules):
    """The judging rules (shared with the content filter) plus what only this check uses."""

    good_history: int = 5
    good_score: float = -2.0
    penalty_action: Literal["reject", "defer", "disconnect", "tempdisconnect"] = "reject"
    penalty_text: str = "Too much bad mail from {client}; refused for {remaining}"
    max_recipients_unknown: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.good_history < 0 or self.max_recipients_unknown < 0:
            raise ValueError("good_history and max_recipients_unknown must be 0 (off) or more")
        fields = {name for _, name, _, _ in string.Formatter().parse(self.penalty_text) if name}
        unknown = sorted(fields - {"client", "remaining"})
        if unknown:
            raise ValueError(f"penalty_text: unknown placeholder(s) {unknown}")


class KarmaCheck(Check[Options]):
    name: ClassVar[str] = "karma"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.RCPT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = (
        "karma.known",
        "karma.good",
        "karma.history",
        "karma.nice",
        "karma.naughty",
        "karma.penalty_until",
    )
    timeout: ClassVar[float] = 2.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self.store = KarmaStore(services.state, options)
        kind, code, dsn = _ACTIONS[options.penalty_action]
        self._penalty = (kind, code, dsn)

    def active_stages(self) -> frozenset[Stage]:
        # Without a recipient limit there is nothing to do at RCPT: not run, not logged.
        return self.stages if self.options.max_recipients_unknown else frozenset({Stage.CONNECT})

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if tx.client_ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        if stage is Stage.CONNECT:
            return await self._connect(tx)
        return await self._recipient(tx)

    async def _connect(self, tx: Transaction) -> Result:
        assert tx.client_ip is not None
        connection = tx.attrs.get("client_port", "") or tx.instance
        record = await self.store.connect(tx.client_ip, connection)
        good = self.options.good_history
        is_good = bool(good) and record.history >= good
        facts = {
            "karma.known": record.known,
            "karma.good": is_good,
            "karma.history": record.history,
            "karma.nice": record.nice,
            "karma.naughty": record.naughty,
            "karma.penalty_until": record.penalty_until,
        }
        if not record.known:
            return self.result(Verdict.PASS, facts=facts, history="new")
        left = record.penalty_left(self.services.clock.now())
        if left:
            kind, code, dsn = self._penalty
            text = self.options.penalty_text.format(
                client=tx.client_address, remaining=format_remaining(left)
            )
            return self.result(
                Verdict.FAIL,
                reason=text,
                facts=facts,
                action=Action(kind, code, dsn, text),
                history=record.history,
                boxed=format_remaining(left),
            )
        if is_good:
            return self.result(Verdict.PASS, self.options.good_score, facts=facts, history=record.history)
        return self.result(Verdict.PASS, facts=facts, history=record.history)

    async def _recipient(self, tx: Transaction) -> Result:
        limit = self.options.max_recipients_unknown
        if not limit or not tx.instance or not tx.recipient:
            return self.result(Verdict.SKIP)
        good = self.options.good_history
        history = tx.facts.get("karma.history", 0)
        if isinstance(history, int) and good and history >= good:
            return self.result(Verdict.SKIP, note="good history")
        assert tx.client_ip is not None
        count = await self.store.count_recipient(tx.client_ip, tx.instance, tx.recipient)
        if count <= limit:
            return self.result(Verdict.PASS, recipients=count)
        text = f"Too many recipients for a sender without history here (limit {limit}); send the rest later"
        return self.result(
            Verdict.FAIL,
            reason=text,
            action=Action.defer(text, 452, "4.5.3"),
            recipients=count,
            limit=limit,
        )

    async def after(self, tx: Transaction, decision: Decision) -> None:
        """Book refusals and finished messages into the client's history."""
        if tx.client_ip is None:
            return
        refused = decision.action.kind is ActionKind.REJECT and not _own_refusal(decision)
        if refused:
            booking = tx.instance or f"{tx.client_address}:{tx.attrs.get('client_port', '')}"
        elif decision.stage is Stage.END_OF_MESSAGE and decision.action.kind is ActionKind.DUNNO:
            if not tx.instance:
                return
            booking = tx.instance
        else:
            return
        outcome = self.store.rules.outcome(decision.score, refused=refused)
        await self.store.book(tx.client_ip, booking, outcome, self.services.clock.now())


def _own_refusal(decision: Decision) -> bool:
    """A refusal that karma itself caused (the penalty box) is not booked again."""
    action = decision.action
    return any(r.check == KarmaCheck.name and r.action is action for r in decision.results)

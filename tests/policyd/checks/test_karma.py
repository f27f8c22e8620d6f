"""karma: history, penalty box, recipient limit and bookkeeping, on a real Redis with a frozen clock."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from mxward.policyd.checks.karma import KarmaCheck, Options
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.karma import KarmaRules, Outcome
from mxward.shared.plugin import (
    DUNNO,
    Action,
    ActionKind,
    Decision,
    Result,
    Services,
    Stage,
    Transaction,
    Verdict,
)
from mxward.shared.state import StateStore

DAY = 86400


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(1_700_000_000.0)


def make(store: StateStore, clock: FrozenClock, **options: Any) -> KarmaCheck:
    services = Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",))), state=store, clock=clock, hostname="mx.test"
    )
    return KarmaCheck(Options(**options), services)


def tx(
    client: str = "127.0.5.2", instance: str = "i1", stage: Stage = Stage.CONNECT, **kw: Any
) -> Transaction:
    port = kw.pop("port", "40000")
    return Transaction(
        stage=stage,
        client_address=client,
        client_ip=ipaddress.ip_address(client),
        instance=instance,
        attrs={"client_port": port},
        **kw,
    )


def decision(
    stage: Stage, score: float = 0.0, action: Action = DUNNO, results: tuple[Result, ...] = ()
) -> Decision:
    return Decision(action=action, score=score, results=results, stage=stage)


async def finish(check: KarmaCheck, score: float, *, client: str = "127.0.5.2", instance: str = "i1") -> None:
    """A message from ``client`` that reached END-OF-MESSAGE with ``score``."""
    await check.after(tx(client, instance), decision(Stage.END_OF_MESSAGE, score))


async def test_an_unknown_client_passes_without_a_record(state_store: StateStore, clock: FrozenClock) -> None:
    c = make(state_store, clock)
    r = await c.check(Stage.CONNECT, tx())
    assert r.verdict is Verdict.PASS and r.action is None and r.score == 0
    assert r.facts["karma.known"] is False and r.facts["karma.history"] == 0
    assert not (await c.store.show("127.0.5.2")).known, "looking does not create history"


@pytest.mark.parametrize(
    ("score", "outcome"),
    [
        (-3.0, Outcome.NICE),
        (-10.0, Outcome.NICE),
        (-2.9, Outcome.NEUTRAL),
        (0.0, Outcome.NEUTRAL),
        (4.9, Outcome.NEUTRAL),
        (5.0, Outcome.NAUGHTY),
        (12.0, Outcome.NAUGHTY),
    ],
)
def test_a_transaction_is_judged_by_its_total_score(score: float, outcome: Outcome) -> None:
    assert KarmaRules().outcome(score) is outcome
    assert KarmaRules().outcome(score, refused=True) is Outcome.NAUGHTY


async def test_a_naughty_message_boxes_a_client_without_nice_history(
    state_store: StateStore, clock: FrozenClock
) -> None:
    """Score >= naughty_score at END-OF-MESSAGE: refused at the next connection for a day."""
    c = make(state_store, clock)
    await finish(c, 6.0)
    clock.advance(60)
    r = await c.check(Stage.CONNECT, tx(instance="i2", port="40001"))
    assert r.verdict is Verdict.FAIL and r.action is not None
    assert (r.action.kind, r.action.code, r.action.dsn) == (ActionKind.REJECT, 550, "5.7.1")
    assert r.action.text == "Too much bad mail from 127.0.5.2; refused for 23h59m"
    clock.advance(DAY)
    later = await c.check(Stage.CONNECT, tx(instance="i3", port="40002"))
    assert later.action is None and later.facts["karma.history"] == -1


async def test_each_message_is_booked_once(state_store: StateStore, clock: FrozenClock) -> None:
    """Postfix may ask twice: the same instance never counts twice."""
    c = make(state_store, clock)
    for _ in range(3):
        await finish(c, -5.0)
    record = await c.store.show("127.0.5.2")
    assert (record.nice, record.messages) == (1, 1)


async def test_nice_history_keeps_a_client_out_of_the_box_until_naughty_outweighs_it(
    state_store: StateStore, clock: FrozenClock
) -> None:
    """1 nice + 1 naughty: not boxed; a second naughty (2 - 1 >= negative 1): boxed."""
    c = make(state_store, clock)
    await finish(c, -4.0, instance="a")
    await finish(c, 8.0, instance="b")
    assert not (await c.store.show("127.0.5.2")).penalty_left(clock.now())
    await finish(c, 8.0, instance="c")
    record = await c.store.show("127.0.5.2")
    assert (record.nice, record.naughty, record.boxed) == (1, 2, 1)
    assert record.penalty_left(clock.now()) == DAY


async def test_repeat_offenders_get_longer_sentences_up_to_the_maximum(
    state_store: StateStore, clock: FrozenClock
) -> None:
    """The n-th sentence is n x penalty, capped at max_penalty."""
    c = make(state_store, clock, max_penalty=3 * DAY)
    sentences = []
    for n in range(5):
        await finish(c, 9.0, instance=f"m{n}")
        record = await c.store.show("127.0.5.2")
        sentences.append(record.penalty_left(clock.now()) // DAY)
        clock.advance(record.penalty_left(clock.now()) + 1)
    assert sentences == [1, 2, 3, 3, 3]


async def test_a_good_history_earns_a_bonus(state_store: StateStore, clock: FrozenClock) -> None:
    c = make(state_store, clock, good_history=2)
    await finish(c, -3.0, instance="a")
    assert (await c.check(Stage.CONNECT, tx(instance="x"))).score == 0
    await finish(c, -3.0, instance="b")
    r = await c.check(Stage.CONNECT, tx(instance="y"))
    assert r.score == -2.0 and r.facts["karma.history"] == 2


async def test_connections_of_known_clients_are_counted_once_each(
    state_store: StateStore, clock: FrozenClock
) -> None:
    c = make(state_store, clock)
    await c.check(Stage.CONNECT, tx(port="1"))  # unknown: not counted
    await finish(c, 0.0)
    for port in ("2", "2", "3"):
        await c.check(Stage.CONNECT, tx(port=port, instance=f"p{port}"))
    record = await c.store.show("127.0.5.2")
    assert (record.connections, record.messages, record.neutral) == (2, 1, 1)


@pytest.mark.parametrize(
    "case",
    [
        ("reject", ActionKind.REJECT, 550, "5.7.1"),
        ("defer", ActionKind.DEFER, 450, "4.7.1"),
        ("disconnect", ActionKind.REJECT, 521, "5.7.1"),
        ("tempdisconnect", ActionKind.DEFER, 421, "4.7.1"),
    ],
)
async def test_the_penalty_reply_is_configurable(
    state_store: StateStore, clock: FrozenClock, case: tuple[str, ActionKind, int, str]
) -> None:
    penalty_action, kind, code, dsn = case
    c = make(state_store, clock, penalty_action=penalty_action, penalty_text="go away {client}")
    await c.store.box("127.0.5.2", clock.now(), 3600)
    r = await c.check(Stage.CONNECT, tx())
    assert r.action == Action(kind, code, dsn, "go away 127.0.5.2")


@pytest.mark.parametrize(
    "case",
    [
        (Action.reject("listed"), Stage.RCPT, 0.0, "naughty"),  # another check refused
        (Action.reject("x"), Stage.RCPT, 12.0, "naughty"),  # the score refused
        (Action.defer_if_permit("greylisted"), Stage.RCPT, 0.0, None),  # temporary: not judged
        (Action.defer("later"), Stage.RCPT, 0.0, None),
        (DUNNO, Stage.RCPT, 0.0, None),  # the message is not finished yet
        (DUNNO, Stage.END_OF_MESSAGE, 0.0, "neutral"),
        (DUNNO, Stage.END_OF_MESSAGE, -4.0, "nice"),
        (DUNNO, Stage.END_OF_MESSAGE, 7.0, "naughty"),
    ],
)
async def test_bookkeeping_happens_where_the_outcome_is_known(
    state_store: StateStore, clock: FrozenClock, case: tuple[Action, Stage, float, str | None]
) -> None:
    action, stage, score, booked = case
    c = make(state_store, clock)
    await c.after(tx(), decision(stage, score, action))
    record = await c.store.show("127.0.5.2")
    counts = {"nice": record.nice, "naughty": record.naughty, "neutral": record.neutral}
    assert counts == {k: int(k == booked) for k in counts}


async def test_the_penalty_box_refusal_itself_is_not_booked_again(
    state_store: StateStore, clock: FrozenClock
) -> None:
    """Otherwise one bad message would extend its own sentence at every retry."""
    c = make(state_store, clock)
    await finish(c, 9.0)
    r = await c.check(Stage.CONNECT, tx(instance="again"))
    assert r.action is not None
    await c.after(tx(instance="again"), decision(Stage.RCPT, 0.0, r.action, (r,)))
    record = await c.store.show("127.0.5.2")
    assert (record.naughty, record.boxed) == (1, 1)


async def test_unknown_clients_can_be_limited_to_a_few_recipients(
    state_store: StateStore, clock: FrozenClock
) -> None:
    """limit 2: third distinct recipient gets 452 4.5.3; a repeated RCPT is not a new one."""
    c = make(state_store, clock, max_recipients_unknown=2)
    replies = []
    for rcpt in ("a@x.test", "b@x.test", "A@x.test", "c@x.test"):
        r = await c.check(Stage.RCPT, tx(stage=Stage.RCPT, recipient=rcpt, facts={"karma.history": 0}))
        replies.append(r.action.reply[:9] if r.action else "ok")
    assert replies == ["ok", "ok", "ok", "452 4.5.3"]
    good = tx(stage=Stage.RCPT, recipient="d@x.test", facts={"karma.history": 9})
    assert (await c.check(Stage.RCPT, good)).action is None


async def test_ipv6_clients_share_the_history_of_their_64(
    state_store: StateStore, clock: FrozenClock
) -> None:
    c = make(state_store, clock)
    await finish(c, 9.0, client="2001:db8:5:1::25")
    r = await c.check(Stage.CONNECT, tx("2001:db8:5:1:abcd::9", instance="other"))
    assert r.action is not None and r.action.kind is ActionKind.REJECT
    other_net = await c.check(Stage.CONNECT, tx("2001:db8:5:2::25", instance="third"))
    assert other_net.action is None


async def test_admin_allow_releases_and_box_sentences(state_store: StateStore, clock: FrozenClock) -> None:
    c = make(state_store, clock)
    await finish(c, 9.0)
    released = await c.store.allow("127.0.5.2", clock.now(), good=5)
    assert released.history == 5 and not released.penalty_left(clock.now())
    assert (await c.check(Stage.CONNECT, tx(instance="n"))).action is None
    boxed = await c.store.box("127.0.5.2", clock.now(), 2 * DAY)
    assert boxed.penalty_left(clock.now()) == 2 * DAY
    assert await c.store.reset("127.0.5.2") >= 1
    assert not (await c.store.show("127.0.5.2")).known


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"nice_score": 5.0, "naughty_score": 5.0}, "nice_score must be below"),
        ({"negative": 0}, "negative must be 1"),
        ({"penalty": 40 * DAY}, "at most max_penalty"),
        ({"penalty_text": "{ip} go away"}, "unknown placeholder"),
        ({"ipv6_prefix": 8}, "ipv6_prefix"),
    ],
)
def test_bad_options_are_refused_with_a_reason(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Options(**options)


@pytest.mark.parametrize(("limit", "stages"), [(0, {Stage.CONNECT}), (3, {Stage.CONNECT, Stage.RCPT})])
def test_karma_runs_at_rcpt_only_with_a_recipient_limit(
    state_store: StateStore, clock: FrozenClock, limit: int, stages: set[Stage]
) -> None:
    assert make(state_store, clock, max_recipients_unknown=limit).active_stages() == stages

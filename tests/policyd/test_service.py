"""The policy service: facts across stages, headers once per message, exempt recipients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import pytest

from mxward.policyd.service import PolicyService
from mxward.shared.matchers import AddressList
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import Action, Check, Result, Services, Stage, Transaction, Verdict


@dataclass(frozen=True)
class Script:
    stages: frozenset[Stage]
    score: float = 0.0
    header: str = ""
    action: Action | None = None
    facts: tuple[tuple[str, str], ...] = ()


def scripted(name: str, script: Script) -> ActiveCheck:
    class Scripted(Check[Script]):
        stages: ClassVar[frozenset[Stage]] = script.stages
        seen: ClassVar[list[dict[str, Any]]] = []

        async def check(self, stage: Stage, tx: Transaction) -> Result:
            self.seen.append(dict(tx.facts))
            s = self.options
            return self.result(
                Verdict.FAIL if s.score > 0 else Verdict.PASS,
                s.score,
                f"{name} says no",
                facts=dict(s.facts),
                header=s.header,
                action=s.action,
            )

    Scripted.name = name
    return ActiveCheck(Scripted(script, cast("Services", None)), timeout=1.0)


def service(*checks: ActiveCheck, **settings: Any) -> PolicyService:
    settings.setdefault("exempt_recipients", AddressList(["postmaster@", "abuse@"]))
    return PolicyService(Pipeline(checks, PipelineSettings(**settings)))


def request(
    state: str, rcpt: str = "bob@example.com", instance: str = "a1.b2.c3", **kw: str
) -> dict[str, str]:
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": state,
        "client_address": "192.0.2.7",
        "client_name": "mail.example.net",
        "helo_name": "mail.example.net",
        "sender": "alice@example.net",
        "recipient": rcpt if state == "RCPT" else "",
        "instance": instance,
    }
    attrs.update(kw)
    return attrs


async def test_facts_of_early_stages_reach_rcpt_stage_checks() -> None:
    """A MAIL-stage fact (spf.result) is visible to a RCPT-stage check at the same request."""
    early = scripted("early", Script(frozenset({Stage.MAIL}), facts=(("spf.result", "pass"),)))
    late = scripted("late", Script(frozenset({Stage.RCPT})))
    svc = service(early, late)
    await svc.handle(request("RCPT"))
    assert type(late.check).seen[-1] == {"spf.result": "pass"}  # type: ignore[attr-defined]


async def test_each_header_is_prepended_once_per_message_one_per_request() -> None:
    """Two headers for a message with three recipients: one per request, then nothing more."""
    spf = scripted("spf", Script(frozenset({Stage.MAIL}), header="Received-SPF: pass (test)"))
    grey = scripted("grey", Script(frozenset({Stage.RCPT}), header="X-Greylist: delayed 300 seconds"))
    svc = service(spf, grey)
    replies = [await svc.handle(request("RCPT", rcpt=f"r{i}@example.com")) for i in range(3)]
    assert replies == [
        "PREPEND Received-SPF: pass (test)",
        "PREPEND X-Greylist: delayed 300 seconds",
        "DUNNO",
    ]
    # A new message starts over.
    again = await svc.handle(request("RCPT", instance="other"))
    assert again == "PREPEND Received-SPF: pass (test)"


async def test_queued_headers_wait_for_data_when_there_is_one_recipient() -> None:
    """With one recipient, the second header goes out with the DATA request."""
    spf = scripted("spf", Script(frozenset({Stage.MAIL}), header="Received-SPF: pass (test)"))
    grey = scripted("grey", Script(frozenset({Stage.RCPT}), header="X-Greylist: delayed 300 seconds"))
    svc = service(spf, grey)
    assert await svc.handle(request("RCPT")) == "PREPEND Received-SPF: pass (test)"
    assert await svc.handle(request("DATA")) == "PREPEND X-Greylist: delayed 300 seconds"
    assert await svc.handle(request("END-OF-MESSAGE")) == "DUNNO"


async def test_a_deferral_sends_no_header_and_keeps_it_queued() -> None:
    """A header is never attached to a deferral; it goes out with the next accepted request."""
    spf = scripted("spf", Script(frozenset({Stage.MAIL}), header="Received-SPF: pass (test)"))
    defer = scripted("deferring", Script(frozenset({Stage.RCPT}), action=Action.defer_if_permit("wait")))
    svc = service(spf, defer)
    assert (await svc.handle(request("RCPT"))).startswith("DEFER_IF_PERMIT 4.7.1 wait")
    assert await svc.handle(request("DATA")) == "PREPEND Received-SPF: pass (test)"


@pytest.mark.parametrize("rcpt", ["postmaster@example.com", "Abuse@example.com", "postmaster"])
async def test_exempt_recipients_are_accepted_from_a_refused_client(rcpt: str) -> None:
    """postmaster@ and abuse@ reach a human even when the client scored a rejection."""
    bad = scripted("bad", Script(frozenset({Stage.CONNECT}), score=20.0))
    svc = service(bad)
    assert (await svc.handle(request("RCPT"))).startswith("550 5.7.1 bad says no")
    assert await svc.handle(request("RCPT", rcpt=rcpt)) == "DUNNO"
    # ... and the DATA request of that message is exempt too.
    text, _, decision = await svc.decide(request("DATA"))
    assert (text, decision.exempt) == ("DUNNO", "recipient")


async def test_data_of_an_ordinary_message_is_not_exempt() -> None:
    """Only messages that went to an exempt recipient are spared at DATA."""
    bad = scripted("bad", Script(frozenset({Stage.CONNECT}), score=20.0))
    svc = service(bad)
    assert (await svc.handle(request("DATA", instance="plain"))).startswith("550 5.7.1")

"""records.assemble: the request path's records equal what their constructors make."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mxward.policyd.greylist_triplet import _result
from mxward.policyd.service import transaction
from mxward.shared.plugin import Action, Decision, Result, Stage, Transaction, Verdict
from mxward.shared.records import assemble


def test_assemble_makes_the_same_frozen_record_as_the_constructor() -> None:
    made = assemble(Decision, {f.name: None for f in dataclasses.fields(Decision)} | {"score": 1.5})
    assert made == Decision(
        action=None,  # type: ignore[arg-type]
        score=1.5,
        results=None,  # type: ignore[arg-type]
        stage=None,  # type: ignore[arg-type]
        exempt=None,  # type: ignore[arg-type]
        headers=None,  # type: ignore[arg-type]
        reasons=None,  # type: ignore[arg-type]
        elapsed_ms=None,  # type: ignore[arg-type]
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.score = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"check": "x"}, r"missing \['action'"),
        ({f.name: None for f in dataclasses.fields(Result)} | {"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_assemble_refuses_fields_that_are_not_exactly_the_records(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        assemble(Result, fields)


def test_transaction_from_a_request_equals_the_constructed_one() -> None:
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": "rcpt",
        "client_address": "192.0.2.7",
        "client_name": "",
        "helo_name": "mx.example.net",
        "sender": "a@example.net",
        "recipient": "b@example.com",
        "recipient_count": "2",
        "instance": "1.2.3",
    }
    tx = transaction(attrs, Stage.RCPT)
    assert tx == Transaction(
        stage=Stage.RCPT,
        client_address="192.0.2.7",
        client_ip=tx.client_ip,
        client_name="unknown",
        reverse_client_name="unknown",
        helo="mx.example.net",
        sender="a@example.net",
        recipient="b@example.com",
        recipient_count=2,
        instance="1.2.3",
        protocol_state="RCPT",
        attrs=attrs,
    )
    assert str(tx.client_ip) == "192.0.2.7"
    assert tx.facts == {} and tx.facts is not transaction(attrs, Stage.RCPT).facts


def test_a_greylist_result_equals_what_check_result_makes() -> None:
    action = Action.defer_if_permit("wait")
    made = _result(Verdict.FAIL, {"greylist.status": "new"}, {"status": "new"}, reason="wait", action=action)
    assert made == Result(
        check="greylist",
        verdict=Verdict.FAIL,
        reason="wait",
        log={"status": "new"},
        facts={"greylist.status": "new"},
        action=action,
    )

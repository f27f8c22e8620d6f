"""The contract objects built on every request keep their dataclass behaviour with the quick __init__."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from mxward.shared.plugin import Decision, Result, Stage, Transaction, Verdict


@pytest.mark.parametrize("cls", [Result, Transaction, Decision])
def test_init_takes_every_field_as_keyword_with_its_default(cls: type) -> None:
    params = inspect.signature(cls).parameters
    fields = dataclasses.fields(cls)
    assert list(params) == [f.name for f in fields]
    for f in fields:
        param = params[f.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY
        if f.default is not dataclasses.MISSING:
            assert param.default is f.default
        elif f.default_factory is dataclasses.MISSING:
            assert param.default is inspect.Parameter.empty


def test_objects_are_frozen_compare_and_replace_like_dataclasses() -> None:
    a = Result(check="dnsbl", verdict=Verdict.FAIL, score=2.5, log={"zone": "bl.test"})
    assert a == Result(check="dnsbl", verdict=Verdict.FAIL, score=2.5, log={"zone": "bl.test"})
    assert a != Result(check="dnsbl", verdict=Verdict.FAIL, score=2.0, log={"zone": "bl.test"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.score = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del a.score  # type: ignore[misc]
    b = dataclasses.replace(a, observed=True)
    assert (b.observed, b.score, b.log, a.observed) == (True, 2.5, {"zone": "bl.test"}, False)
    assert repr(a).startswith("Result(check='dnsbl', verdict=<Verdict.FAIL: 'fail'>, score=2.5,")
    assert dataclasses.asdict(Transaction(stage=Stage.MAIL))["client_name"] == "unknown"


def test_default_factories_give_each_object_its_own_dict() -> None:
    one, two = Transaction(stage=Stage.RCPT), Transaction(stage=Stage.RCPT)
    assert one.facts == {} and one.attrs == {}
    assert one.facts is not two.facts and one.attrs is not two.attrs
    r1, r2 = Result(check="a", verdict=Verdict.PASS), Result(check="a", verdict=Verdict.PASS)
    assert r1.log is not r2.log and r1.facts is not r2.facts
    shared = {"x": 1}
    assert Result(check="a", verdict=Verdict.PASS, facts=shared).facts is shared


def test_missing_or_unknown_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="verdict"):
        Result(check="a")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="colour"):
        Result(check="a", verdict=Verdict.PASS, colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Result("a", Verdict.PASS)  # type: ignore[misc]

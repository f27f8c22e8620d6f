"""earlytalker: a configuration-only check; its options become Postfix settings, never request work."""

from __future__ import annotations

import ipaddress
from typing import Any, cast

import pytest
from support.policy_client import request

from mxward.policyd.checks.earlytalker import (
    EarlytalkerCheck,
    Options,
    data_restriction,
    main_cf_settings,
)
from mxward.policyd.service import PolicyService
from mxward.shared.cli import resolve_check
from mxward.shared.config import ConfigError, parse_config
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Check, Services, Stage, Transaction, Verdict


def load(table: dict[str, Any]) -> Options:
    config = parse_config(
        {"policyd": {"checks": ["earlytalker"]}, "checks": {"earlytalker": table}},
        source="test.toml",
        resolve_check=resolve_check,
    )
    options = config.checks["earlytalker"].options
    assert isinstance(options, Options)
    return options


def settings(options: Options, **kw: Any) -> dict[str, str]:
    return {s.name: s.value for s in main_cf_settings(options, **kw)}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"greet_wait": "1500ms"}, "greet_wait must be whole seconds"),
        ({"greet_wait": "0s"}, "greet_wait must be whole seconds"),
        ({"greet_wait": "2m"}, "greet_wait must be whole seconds from 1s to 60s"),
        ({"greet_wait": "3s", "stress_greet_wait": "4s"}, "stress_greet_wait must not be longer than"),
        ({"stress_greet_wait": "0s"}, "stress_greet_wait must be whole seconds"),
        ({"greet_ttl": "0.5s"}, "greet_ttl must be whole seconds"),
        ({"greet_action": "reject"}, "expected one of 'enforce', 'drop', 'ignore'"),
        ({"greet_banner_text": " "}, "greet_banner_text is empty"),
        ({"greet_banner_text": "mx ESMTP\r\n220 forged"}, "one line of printable ASCII"),
        ({"exempt_networks": ["192.0.2.0/33"]}, "'192.0.2.0/33' is not an IP network"),
        ({"postscreen_wait": "6s"}, "unknown key 'postscreen_wait'"),
    ],
)
def test_bad_options_are_config_errors(table: dict[str, Any], message: str) -> None:
    """Values Postfix would refuse, or that make no sense, stop at config load with a clear text."""
    with pytest.raises(ConfigError, match=f"checks.earlytalker.*{message}"):
        load(table)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({}, {"postscreen_greet_wait": "${stress?{2}:{6}}s", "postscreen_greet_ttl": "1d"}),
        ({"greet_wait": "4s", "stress_greet_wait": "4s"}, {"postscreen_greet_wait": "4s"}),
        ({"greet_wait": "10s", "stress_greet_wait": "1s"}, {"postscreen_greet_wait": "${stress?{1}:{10}}s"}),
        ({"greet_ttl": "36h"}, {"postscreen_greet_ttl": "36h"}),
        ({"greet_banner": False, "greet_banner_text": ""}, {"postscreen_greet_banner": ""}),
        ({"greet_banner_text": "mx.example.com ESMTP"}, {"postscreen_greet_banner": "mx.example.com ESMTP"}),
        ({"greet_action": "drop"}, {"postscreen_greet_action": "drop"}),
        ({"greet_action": "ignore"}, {"postscreen_greet_action": "ignore"}),
    ],
)
def test_options_become_postscreen_settings(table: dict[str, Any], expected: dict[str, str]) -> None:
    """Each option lands in the main.cf parameter Postfix reads, in Postfix's time syntax."""
    printed = settings(load(table))
    for name, value in expected.items():
        assert printed[name] == value


def test_exempt_networks_are_normalised_merged_and_deduplicated() -> None:
    """[policyd.exempt] networks and exempt_networks form one inline cidr table after mynetworks."""
    options = load({"exempt_networks": ["198.51.100.7", "192.0.2.9/24", "2001:DB8::/32"]})
    printed = settings(options, exempt_networks=("192.0.2.0/24", "203.0.113.0/24"))
    assert printed["postscreen_access_list"] == (
        "permit_mynetworks, cidr:{ {192.0.2.0/24 permit}, {203.0.113.0/24 permit}, "
        "{198.51.100.7/32 permit}, {2001:db8::/32 permit} }"
    )


@pytest.mark.parametrize(
    ("table", "observe", "forbid", "data"),
    [
        ({}, False, "yes", "reject_unauth_pipelining"),
        ({}, True, "no", "warn_if_reject reject_unauth_pipelining"),
        ({"forbid_unauth_pipelining": False}, False, None, "reject_unauth_pipelining"),
        ({"data_pipelining_check": False}, False, "yes", ""),
        ({"forbid_unauth_pipelining": False, "data_pipelining_check": False}, True, None, ""),
    ],
)
def test_pipelining_settings(table: dict[str, Any], observe: bool, forbid: str | None, data: str) -> None:
    """smtpd's disconnect and the DATA-time restriction follow the options; observe only logs."""
    options = load(table)
    assert settings(options, observe=observe).get("smtpd_forbid_unauth_pipelining") == forbid
    assert data_restriction(options, observe=observe) == data


def test_observe_mode_turns_the_pregreet_test_into_logging() -> None:
    """In observe mode postscreen only logs PREGREET, whatever greet_action says."""
    assert settings(load({"greet_action": "drop"}), observe=True)["postscreen_greet_action"] == "ignore"


def test_without_postscreen_no_postscreen_parameter_is_printed() -> None:
    """postscreen = false leaves only smtpd's pipelining settings."""
    assert list(settings(load({"postscreen": False}))) == ["smtpd_forbid_unauth_pipelining"]


async def test_the_check_has_no_stages_and_skips_if_called() -> None:
    """It runs on no request; called anyway, it reports skip (its only verdict) and nothing else."""
    check = EarlytalkerCheck(Options(), cast("Services", None))
    assert EarlytalkerCheck.stages == frozenset()
    done = await check.check(Stage.RCPT, Transaction(stage=Stage.RCPT))
    assert (done.verdict, done.score, done.action, dict(done.facts)) == (Verdict.SKIP, 0.0, None, {})


async def test_a_pipeline_with_only_earlytalker_answers_dunno_at_every_stage() -> None:
    """The pipeline and the policy service accept a check without stages: nothing runs, DUNNO."""
    check: Check[Any] = EarlytalkerCheck(Options(), cast("Services", None))
    pipeline = Pipeline([ActiveCheck(check=check, timeout=5.0)], PipelineSettings())
    assert not any(pipeline.has_checks(stage) for stage in Stage)
    service = PolicyService(pipeline)
    for state in ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"):
        text, tx, decision = await service.decide(request(protocol_state=state, client_address="127.0.6.9"))
        assert text == "DUNNO", state
        assert tx.client_ip == ipaddress.ip_address("127.0.6.9")
        assert decision.results == ()
        assert decision.action.kind is ActionKind.DUNNO

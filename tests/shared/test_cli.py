"""The `mxward` command line: check, greylist, state, postfix-config, version, entry points."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.policy_client import MXWARD, PLUGINS, encode, request
from support.postfix import PostfixConfig, parse_postfix_config

from mxward.shared.cli import main


def run(
    tmp_path: Path, redis_url: str, *args: str, stdin: str = "", extra: str = "", checks: str = '["greylist"]'
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mxward.toml"
    if not config.exists():
        config.write_text(
            f'[mxward]\ndata_dir = "{tmp_path}/data"\n[state]\nurl = "{redis_url}"\n'
            f'key_prefix = "cli{abs(hash(str(tmp_path))) % 10**8}"\n'
            f"[policyd]\nchecks = {checks}\n{extra}"
            # the content checks that ask no DNS (the default list would ask the real one)
            + ("" if "[filter]" in extra else '\n[filter]\nchecks = ["headers"]\n')
        )
    env = dict(os.environ, PYTHONPATH=str(PLUGINS))
    return subprocess.run(
        [MXWARD, "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_version_prints_the_package_version() -> None:
    """`mxward --version` names the installed version and the build (compiled or pure Python)."""
    out = subprocess.run([MXWARD, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"mxward 0\.\S+ \((compiled|pure Python)\)\n", out.stdout), out.stdout


def test_check_prints_the_full_decision_trace(tmp_path: Path, redis_server: Any) -> None:
    """`mxward check` decides requests from stdin and shows each check, its facts and the action."""
    stdin = (
        encode(request(recipient="trace@example.com")).decode()
        + encode(request(recipient="postmaster@example.com")).decode()
    )
    out = run(tmp_path, redis_server.url, "check", stdin=stdin)
    assert out.returncode == 0, out.stderr
    assert "request 1: state=RCPT client=unknown[192.0.2.7]" in out.stdout
    assert "greylist     fail  score=0 forces DEFER_IF_PERMIT" in out.stdout
    assert "fact greylist.status=new" in out.stdout
    assert "action=DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in 300 seconds" in out.stdout
    assert "request 2:" in out.stdout and "exempt (recipient): no check runs" in out.stdout


def test_check_refuses_input_that_is_not_name_value(tmp_path: Path, redis_server: Any) -> None:
    """Garbage on stdin is a usage error naming the line, not a traceback."""
    out = run(tmp_path, redis_server.url, "check", stdin="hello world\n")
    assert out.returncode == 2
    assert "stdin line 1: expected name=value" in out.stderr


def test_a_third_party_check_registered_by_entry_point_runs(tmp_path: Path, redis_server: Any) -> None:
    """A package registering under mxward.checks is loaded when the config names it, and runs."""
    out = run(
        tmp_path,
        redis_server.url,
        "check",
        stdin=encode(request(recipient="x@example.com")).decode(),
        checks='["sample"]',
        extra='[checks.sample]\nverdict = "fail"\nscore = 12.5\n',
    )
    assert out.returncode == 0, out.stderr
    assert "sample       fail  score=12.5" in out.stdout
    assert "action=550 5.7.1 sample reason" in out.stdout


def test_an_unknown_check_is_a_config_error(tmp_path: Path, redis_server: Any) -> None:
    """Naming a check nobody provides exits 78 with the known names."""
    out = run(tmp_path, redis_server.url, "config-check", checks='["nosuch"]')
    assert out.returncode == 78
    assert "unknown check 'nosuch': not built in (" in out.stderr
    assert "greylist" in out.stderr and "karma" in out.stderr


def test_greylist_command_lists_allows_and_removes(tmp_path: Path, redis_server: Any) -> None:
    """`mxward greylist` shows what policyd stored and can change it."""
    run(tmp_path, redis_server.url, "check", stdin=encode(request(recipient="g@example.com")).decode())
    listed = run(tmp_path, redis_server.url, "greylist", "list")
    assert (
        "triplet 192.0.2.0/24" in listed.stdout and "<alice@example.net> -> <g@example.com>" in listed.stdout
    )
    assert "waiting (tried 1x)" in listed.stdout
    allowed = run(
        tmp_path,
        redis_server.url,
        "greylist",
        "allow",
        "--client",
        "192.0.2.7",
        "--sender",
        "alice@example.net",
        "--recipient",
        "g@example.com",
    )
    assert allowed.returncode == 0 and "allowed" in allowed.stdout
    again = run(
        tmp_path, redis_server.url, "check", stdin=encode(request(recipient="g@example.com")).decode()
    )
    assert "action=DUNNO" in again.stdout
    removed = run(tmp_path, redis_server.url, "greylist", "remove", "--client", "192.0.2.99")
    # the triplet and the auto-allow counter its pass started
    assert "removed 2 record(s) of client network 192.0.2.0/24" in removed.stdout
    assert "(no entries)" in run(tmp_path, redis_server.url, "greylist", "list").stdout
    bad = run(tmp_path, redis_server.url, "greylist", "allow", "--client", "not-an-ip")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr


def test_karma_command_shows_boxes_allows_and_resets(tmp_path: Path, redis_server: Any) -> None:
    """`mxward karma` inspects and fixes client history with the same keys the check uses."""
    out = run(tmp_path, redis_server.url, "karma", "show", "127.0.5.9", checks='["karma"]')
    assert out.returncode == 0, out.stderr
    assert "127.0.5.9/32" in out.stdout and "(no history)" in out.stdout
    boxed = run(tmp_path, redis_server.url, "karma", "box", "127.0.5.9", "--for", "2d")
    assert "naughty=1" in boxed.stdout and "BOXED for 2d" in boxed.stdout, boxed.stdout + boxed.stderr
    listed = run(tmp_path, redis_server.url, "karma", "list", "--boxed")
    assert "127.0.5.9/32" in listed.stdout
    # The policy daemon's view agrees: the boxed client is refused.
    stdin = encode(request(client_address="127.0.5.9", recipient="bob@example.com")).decode()
    decided = run(tmp_path, redis_server.url, "check", stdin=stdin)
    assert re.search(
        r"action=550 5\.7\.1 Too much bad mail from 127\.0\.5\.9; refused for (2d|1d23h)\n", decided.stdout
    )
    allowed = run(tmp_path, redis_server.url, "karma", "allow", "127.0.5.9")
    assert "history=+5" in allowed.stdout and "BOXED" not in allowed.stdout
    reset = run(tmp_path, redis_server.url, "karma", "reset", "127.0.5.9")
    assert reset.stdout.startswith("removed ")
    assert "(no history)" in run(tmp_path, redis_server.url, "karma", "show", "127.0.5.9").stdout
    bad = run(tmp_path, redis_server.url, "karma", "show", "not-an-ip")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr


def test_state_keys_lists_the_key_layout(tmp_path: Path, redis_server: Any) -> None:
    """`mxward state keys` prints each namespace's keys with TTLs and tests the connection."""
    out = run(tmp_path, redis_server.url, "state", "keys")
    assert out.returncode == 0, out.stderr
    assert "greylist" in out.stdout and "{NET}:t:SENDER/RECIPIENT" in out.stdout
    assert "state store reachable" in out.stdout


def test_postfix_config_prints_the_policy_service_line(tmp_path: Path, redis_server: Any) -> None:
    """`mxward postfix-config` gives main.cf lines with the check after the relay check."""
    out = run(
        tmp_path,
        redis_server.url,
        "postfix-config",
        extra='listen = ["127.0.0.1:10077"]\nrequest_deadline = "8s"\n',
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout
    assert lines.index("reject_unauth_destination") < lines.index("check_policy_service")
    assert "check_policy_service { inet:127.0.0.1:10077, timeout=13s, { default_action = DUNNO } }" in lines


# ---- postfix-config for the earlytalker check (postscreen and pipelining settings)

POLICY = "check_policy_service { inet:127.0.0.1:10040, timeout=15s, { default_action = DUNNO } }"
EARLYTALKER_DEFAULTS = {
    "postscreen_access_list": "permit_mynetworks",
    "postscreen_greet_action": "enforce",
    "postscreen_greet_wait": "${stress?{2}:{6}}s",
    "postscreen_greet_banner": "$smtpd_banner",
    "postscreen_greet_ttl": "1d",
    "smtpd_forbid_unauth_pipelining": "yes",
    "smtpd_data_restrictions": f"reject_unauth_pipelining, {POLICY}",
}
POSTSCREEN_SERVICES = (
    "smtp      inet  n       -       n       -       1       postscreen",
    "smtpd     pass  -       -       n       -       -       smtpd",
    "dnsblog   unix  -       -       n       -       0       dnsblog",
    "tlsproxy  unix  -       -       n       -       0       tlsproxy",
)


def earlytalker_postfix_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, *, checks: str = '["earlytalker"]'
) -> tuple[str, PostfixConfig]:
    """Run `mxward postfix-config` in-process on a config with this [checks.earlytalker] table."""
    config = tmp_path / "mxward.toml"
    config.write_text(f"[policyd]\nchecks = {checks}\n{table}")
    assert main(["--config", str(config), "postfix-config"]) == 0
    out = capsys.readouterr().out
    return out, parse_postfix_config(out)


@dataclass(frozen=True)
class EarlytalkerCase:
    table: str  # TOML after [policyd] checks = ["earlytalker"]
    expected: dict[str, str]  # main.cf settings printed with these values
    absent: tuple[str, ...] = ()  # main.cf settings not printed
    services: tuple[str, ...] = POSTSCREEN_SERVICES  # master.cf services printed


EARLYTALKER_CASES = {
    "defaults": EarlytalkerCase("", EARLYTALKER_DEFAULTS),
    "drop-short-wait-no-teaser": EarlytalkerCase(
        '[checks.earlytalker]\ngreet_action = "drop"\ngreet_wait = "3s"\nstress_greet_wait = "3s"\n'
        'greet_banner = false\ngreet_ttl = "12h"\n',
        {
            "postscreen_greet_action": "drop",
            "postscreen_greet_wait": "3s",
            "postscreen_greet_banner": "",
            "postscreen_greet_ttl": "12h",
        },
    ),
    "observe-only-logs": EarlytalkerCase(
        '[checks.earlytalker]\ngreet_action = "drop"\nmode = "observe"\n',
        {
            "postscreen_greet_action": "ignore",
            "smtpd_forbid_unauth_pipelining": "no",
            "smtpd_data_restrictions": f"warn_if_reject reject_unauth_pipelining, {POLICY}",
        },
    ),
    "smtpd-only-old-postfix": EarlytalkerCase(
        "[checks.earlytalker]\npostscreen = false\nforbid_unauth_pipelining = false\n",
        {"smtpd_data_restrictions": f"reject_unauth_pipelining, {POLICY}"},
        ("postscreen_greet_action", "postscreen_access_list", "smtpd_forbid_unauth_pipelining"),
        (),
    ),
    "no-data-check": EarlytalkerCase(
        "[checks.earlytalker]\ndata_pipelining_check = false\n",
        {"smtpd_forbid_unauth_pipelining": "yes", "smtpd_data_restrictions": POLICY},
    ),
    "exempt-networks": EarlytalkerCase(
        '[policyd.exempt]\nnetworks = ["192.0.2.0/24"]\n'
        '[checks.earlytalker]\nexempt_networks = ["2001:db8::/32", "198.51.100.7"]\n',
        {
            "postscreen_access_list": "permit_mynetworks, cidr:{ {192.0.2.0/24 permit}, "
            "{2001:db8::/32 permit}, {198.51.100.7/32 permit} }"
        },
    ),
    "disabled": EarlytalkerCase(
        "[checks.earlytalker]\nenabled = false\n",
        {"smtpd_data_restrictions": POLICY},
        tuple(k for k in EARLYTALKER_DEFAULTS if k != "smtpd_data_restrictions"),
        (),
    ),
}


@pytest.mark.parametrize("case", EARLYTALKER_CASES.values(), ids=EARLYTALKER_CASES.keys())
def test_postfix_config_prints_the_earlytalker_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: EarlytalkerCase
) -> None:
    """With earlytalker listed, the output has postscreen/pipelining main.cf lines and master.cf services."""
    out, printed = earlytalker_postfix_config(tmp_path, capsys, case.table)
    for name, value in case.expected.items():
        assert printed.main_cf.get(name) == value, name
    for name in case.absent:
        assert name not in printed.main_cf, name
    assert printed.master_cf == case.services
    # the policy service lines stay as they are
    assert printed.main_cf["smtpd_recipient_restrictions"] == (
        "reject_unauth_destination, check_policy_service "
        "{ inet:127.0.0.1:10040, timeout=15s, { default_action = DUNNO } }"
    )
    if case.services:
        assert "replace the public" in out and '"smtpd pass" service' in out


def test_postfix_config_without_earlytalker_prints_no_postscreen_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A configuration that does not list earlytalker gets the policy lines only."""
    out, printed = earlytalker_postfix_config(
        tmp_path, capsys, "[checks.earlytalker]\n", checks='["greylist"]'
    )
    assert "postscreen" not in out
    assert printed.master_cf == ()
    assert printed.main_cf["smtpd_data_restrictions"] == POLICY
    assert printed.main_cf["smtpd_end_of_data_restrictions"] == POLICY


def test_postfix_config_shows_the_combined_data_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The DATA hook puts reject_unauth_pipelining before the policy service."""
    out, _ = earlytalker_postfix_config(tmp_path, capsys, "")
    assert f"smtpd_data_restrictions =\n    reject_unauth_pipelining,\n    {POLICY}\n" in out


def test_deploy_snippets_match_the_default_earlytalker_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """deploy/postfix/main.cf.earlytalker and master.cf.postscreen are what postfix-config prints."""
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "postfix"
    _, printed = earlytalker_postfix_config(tmp_path, capsys, "")
    snippet = parse_postfix_config((deploy / "main.cf.earlytalker").read_text())
    assert snippet.main_cf == EARLYTALKER_DEFAULTS
    policyd = parse_postfix_config((deploy / "main.cf.policyd").read_text())
    for hook in ("smtpd_data_restrictions", "smtpd_end_of_data_restrictions"):
        assert policyd.main_cf[hook] == POLICY, hook
    assert {k: printed.main_cf[k] for k in EARLYTALKER_DEFAULTS} == EARLYTALKER_DEFAULTS
    master = [
        line
        for line in (deploy / "master.cf.postscreen").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert tuple(master) == printed.master_cf


def test_check_runs_no_per_request_work_for_earlytalker(tmp_path: Path, redis_server: Any) -> None:
    """`mxward check` with only earlytalker configured: no check runs, the request gets DUNNO."""
    out = run(
        tmp_path,
        redis_server.url,
        "check",
        stdin=encode(request(recipient="early@example.com")).decode(),
        checks='["earlytalker"]',
    )
    assert out.returncode == 0, out.stderr
    assert "action=DUNNO" in out.stdout
    assert "earlytalker " not in out.stdout


def test_check_runs_the_content_checks_on_a_message_file(tmp_path: Path, redis_server: Any) -> None:
    """`mxward check message.eml`: every content check's result, the score and the action."""
    good = tmp_path / "good.eml"
    good.write_bytes(
        b"From: <a@sender.example>\nTo: <b@example.org>\nSubject: hi\n"
        b"Date: Tue, 24 Nov 2026 10:00:00 +0000\nMessage-ID: <1@x>\n\nbody\n"
    )
    bad = tmp_path / "bad.eml"
    bad.write_bytes(b"From: <a@sender.example>\nSubject: one\nSubject: two\n\nbody\n")
    out = run(
        tmp_path,
        redis_server.url,
        "check",
        str(good),
        "--from",
        "a@sender.example",
        "--to",
        "b@example.org",
        "--client-ip",
        "192.0.2.7",
        "--headers",
    )
    assert out.returncode == 0, out.stderr
    assert "headers      pass" in out.stdout
    assert "action=pass (after-queue mode)" in out.stdout
    assert "Authentication-Results:" in out.stdout
    out = run(tmp_path, redis_server.url, "check", str(bad))
    assert out.returncode == 0, out.stderr
    assert "headers      fail" in out.stdout
    assert "duplicate Subject header" in out.stdout and "missing Date header" in out.stdout
    assert "action=quarantine (after-queue mode)" in out.stdout
    missing = run(tmp_path, redis_server.url, "check", str(tmp_path / "nope.eml"))
    assert missing.returncode == 2 and "nope.eml" in missing.stderr

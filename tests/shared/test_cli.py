"""The `mxward` command line: check, greylist, state, postfix-config, version, entry points."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from support.policy_client import MXWARD, PLUGINS, encode, request


def run(
    tmp_path: Path, redis_url: str, *args: str, stdin: str = "", extra: str = "", checks: str = '["greylist"]'
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mxward.toml"
    if not config.exists():
        config.write_text(
            f'[mxward]\ndata_dir = "{tmp_path}/data"\n[state]\nurl = "{redis_url}"\n'
            f'key_prefix = "cli{abs(hash(str(tmp_path))) % 10**8}"\n'
            f"[policyd]\nchecks = {checks}\n{extra}"
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
    """`mxward --version` names the installed version."""
    out = subprocess.run([MXWARD, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("mxward 0.")


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
    assert "unknown check 'nosuch': not built in (greylist)" in out.stderr


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

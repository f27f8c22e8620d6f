"""Configuration loading: strict tables, clear errors, durations, the documented example."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mxward.shared.cli import builtin_checks, main, resolve_check
from mxward.shared.config import (
    EX_CONFIG,
    CheckCommon,
    Config,
    ConfigError,
    load_config,
    option_docs,
    parse_config,
)
from mxward.shared.units import format_duration, parse_duration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "mxward.example.toml"


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mxward.toml"
    path.write_text(text)
    return load_config(str(path), resolve_check)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("5m", 300),
        ("12h", 43200),
        ("35d", 3024000),
        ("1w", 604800),
        ("1h30m", 5400),
        ("90", 90),
        (90, 90),
        (1.5, 1.5),
        ("2 d", 172800),
    ],
)
def test_durations_are_converted_to_seconds(text: object, seconds: float) -> None:
    """Every documented duration spelling gives seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m5", "-5m", "five minutes", True, [5]])
def test_bad_durations_are_refused(text: object) -> None:
    """A duration that cannot be read is an error, never a silent zero."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(300, "5m"), (3024000, "5w"), (86400, "1d"), (0.25, "250ms"), (90, "90s")]
)
def test_durations_are_formatted_shortest_exact(seconds: float, text: str) -> None:
    """Logs and docs show durations the way they are written in the file."""
    assert format_duration(seconds) == text


def test_no_file_at_the_default_path_means_built_in_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config or MXWARD_CONFIG a missing default file gives the safe defaults."""
    monkeypatch.delenv("MXWARD_CONFIG", raising=False)
    monkeypatch.setattr("mxward.shared.config.DEFAULT_PATH", "/nonexistent/mxward.toml")
    config = load_config(None, resolve_check)
    assert config.path == ""
    assert config.policyd.listen == ("127.0.0.1:10040",)
    assert config.state.url == ""
    assert list(config.checks) == ["karma", "helo", "fcrdns", "spf", "greylist"]


def test_environment_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MXWARD_CONFIG is used when no --config is given."""
    path = tmp_path / "env.toml"
    path.write_text('[policyd]\nlisten = ["127.0.0.1:10999"]\n')
    monkeypatch.setenv("MXWARD_CONFIG", str(path))
    assert load_config(None, resolve_check).policyd.listen == ("127.0.0.1:10999",)


def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    """Asking for a file that does not exist never falls back to defaults."""
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.toml"), resolve_check)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[policyd]\nlisen = []\n", r"\[policyd\] unknown key 'lisen' \(valid keys: .*listen"),
        ("[checks.greylist]\ndelay = 300\ndelays = 5\n", r"\[checks.greylist\] unknown key 'delays'"),
        ('[checks.greylist]\ndelay = "5 minutes"\n', r"\[checks.greylist\] delay: .*not a duration"),
        ('[policyd]\nworkers = "two"\n', r"\[policyd\] workers: 'two' is not valid: expected an integer"),
        ("[policyd]\nworkers = 1.5\n", r"expected an integer"),
        (
            '[checks.greylist]\nadd_header = "yes"\n',
            r"add_header: 'yes' is not valid: expected true or false",
        ),
        (
            '[checks.greylist]\nmode = "enforcing"\n',
            r"mode: 'enforcing' is not valid: expected one of 'enforce', 'observe'",
        ),
        ('[policyd]\nreject_stage = "queue"\n', r"unknown stage 'queue'"),
        ('[policyd]\nlisten = ["localhost"]\n', r"write host:port"),
        ('[policyd]\nallowed_clients = ["300.0.0.0/8"]\n', r"not an IP network"),
        ("[policyd.scoring]\nreject_code = 450\n", r"reject_code must be 5xx"),
        ("[greylist]\ndelay = 5\n", r"unknown table or key 'greylist' at top level \(valid tables: .*checks"),
        ("[checks.nosuch]\nx = 1\n", r"\[checks.nosuch\]: unknown check 'nosuch'"),
        ("[checks.karma]\nnegative = 0\n", r"\[checks.karma\] negative must be 1 or more"),
        ('[policyd]\nchecks = ["nosuchcheck"]\n', r"unknown check 'nosuchcheck'"),
        ('[checks.greylist]\nreply_text = "wait {minutes}"\n', r"unknown placeholder"),
        ('[checks.greylist]\ndelay = "1d"\nmax_age = "2d"\n', r"max_age must be at least"),
        ('[policyd]\nrequest_deadline = "2m"\n', r"below Postfix's 100s"),
        ('[mxward]\nlog_target = "journal"\n', r"log_target"),
        ("[policyd\n", r"TOML syntax error"),
    ],
)
def test_errors_name_file_table_key_and_what_is_valid(tmp_path: Path, text: str, message: str) -> None:
    """Every mistake is reported with where it is and what would be valid."""
    with pytest.raises(ConfigError, match=message) as info:
        load_text(tmp_path, text)
    assert str(tmp_path / "mxward.toml") in str(info.value)


def test_a_table_for_a_check_no_pipeline_runs_is_validated_and_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """[checks.dnsbl] without dnsbl in [policyd] checks: kept, checked, and named by config-check."""
    config = load_text(tmp_path, '[checks.dnsbl]\nallow_networks = ["192.0.2.0/24"]\n')
    assert "dnsbl" not in config.checks
    assert config.inactive["dnsbl"].options.allow_networks == ("192.0.2.0/24",)
    assert main(["--config", str(tmp_path / "mxward.toml"), "config-check"]) == 0
    assert "configured but not run (not in [policyd] checks): dnsbl" in capsys.readouterr().out


def test_a_single_string_is_accepted_where_a_list_is_expected(tmp_path: Path) -> None:
    """listen = "host:port" means a list of one, as an administrator would expect."""
    assert load_text(tmp_path, '[policyd]\nlisten = "127.0.0.1:10041"\n').policyd.listen == (
        "127.0.0.1:10041",
    )


def test_common_check_keys_and_options_are_split(tmp_path: Path) -> None:
    """enabled/timeout/on_error/mode go to the pipeline, the rest to the check's options."""
    config = load_text(tmp_path, '[checks.greylist]\ntimeout = "500ms"\nmode = "observe"\ndelay = "1m"\n')
    check = config.checks["greylist"]
    assert check.common == CheckCommon(enabled=True, timeout=0.5, on_error="ignore", mode="observe")
    assert check.options.delay == 60


def test_settings_objects_are_frozen(tmp_path: Path) -> None:
    """Loaded settings cannot be changed by accident at run time."""
    config = load_text(tmp_path, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policyd.workers = 3  # type: ignore[misc]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _defaults(config: Config) -> dict[str, Any]:
    tables: dict[str, Any] = {
        "mxward": config.general,
        "state": config.state,
        "dns": config.dns,
        "policyd": config.policyd,
        "filter": config.filter,
        "dmarc_reports": config.dmarc_reports,
    }
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for name, _, default in option_docs(type(obj)):
            value = getattr(obj, name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{name}.", value)
            else:
                out[f"{prefix}{name}"] = default

    for table, obj in tables.items():
        walk(f"{table}.", obj)
    for name, check in {**config.checks, **config.filter_checks, **config.inactive}.items():
        walk(f"checks.{name}.", check.common)
        walk(f"checks.{name}.", check.options)
        out[f"checks.{name}.timeout"] = check.cls.timeout
    return out


def test_the_example_documents_every_option_with_its_default() -> None:
    """config/mxward.example.toml sets every key, each to its built-in default."""
    example = load_config(str(EXAMPLE), resolve_check)
    every_check = {"checks": {name: {} for name in builtin_checks()}}
    defaults = _defaults(parse_config(every_check, source="", resolve_check=resolve_check))
    written = _flatten(tomllib.loads(EXAMPLE.read_text()))
    assert set(written) == set(defaults), "example and settings disagree on the keys"
    assert _defaults(example) == defaults
    for key, default in defaults.items():
        value = written[key]
        if isinstance(default, float) and isinstance(value, str):
            value = parse_duration(value)
        if isinstance(default, tuple):
            value = tuple(value)
        assert value == default or (math.isinf(default) and math.isinf(value)), key


def test_config_check_exits_78_on_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`mxward config-check FILE` reports the error on stderr and exits with EX_CONFIG."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[policyd]\nworkers = -1\n")
    assert main(["config-check", str(bad)]) == EX_CONFIG
    assert "workers must be between" in capsys.readouterr().err


def test_config_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example passes `mxward config-check`."""
    assert main(["config-check", str(EXAMPLE)]) == 0
    assert "OK" in capsys.readouterr().out

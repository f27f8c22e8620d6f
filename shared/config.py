"""Configuration: one TOML file parsed into frozen, typed settings objects.

The file is ``/etc/mxward/mxward.toml`` unless ``--config PATH`` or the environment variable
``MXWARD_CONFIG`` names another. Every table maps to a frozen dataclass whose fields are the
valid keys; the loader is strict:

* an unknown key or table is an error that names the file, the table, the key and the valid keys;
* a value of the wrong type is an error that says what was expected;
* durations are written ``"250ms"``, ``"30s"``, ``"5m"``, ``"12h"``, ``"35d"``, ``"1w"`` (or a
  bare number of seconds), converted here and nowhere else;
* every ``[checks.<name>]`` table takes the common keys ``enabled``, ``timeout``, ``on_error``
  (``ignore`` | ``tempfail``) and ``mode`` (``enforce`` | ``observe``) plus the keys of that
  check's ``Options`` dataclass.

A configuration error makes every command exit with status 78 (``EX_CONFIG``). When no file is
named and the default file does not exist, the built-in defaults are used (safe for a single
MX: loopback listener, embedded state, greylisting).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from mxward.contentfilter.dmarcreports import ReportSettings
from mxward.shared.dns import DnsSettings
from mxward.shared.matchers import AddressList
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import Check, CheckLoadError, Stage
from mxward.shared.state import StateSettings
from mxward.shared.units import Duration, DurationMarker, parse_duration

__all__ = [
    "DEFAULT_PATH",
    "EX_CONFIG",
    "CheckCommon",
    "CheckConfig",
    "Config",
    "ConfigError",
    "Duration",
    "ExemptSettings",
    "FilterSettings",
    "GeneralSettings",
    "PolicydSettings",
    "ScoringSettings",
    "build_settings",
    "config_path",
    "load_config",
    "parse_duration",
]

DEFAULT_PATH = "/etc/mxward/mxward.toml"
EX_CONFIG = 78


class ConfigError(Exception):
    """The configuration is not valid; the message names file, table and key."""


# --------------------------------------------------------------------------------------------
# Settings tables


@dataclass(frozen=True, kw_only=True)
class GeneralSettings:
    """``[mxward]``: process-wide settings."""

    data_dir: str = "/var/lib/mxward"
    hostname: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_target: str = "stderr"
    syslog_facility: str = "mail"
    debug_checks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        target = self.log_target
        if not (target in ("stderr", "syslog") or target.startswith(("file:", "syslog:"))):
            raise ValueError(
                f'log_target {target!r}: use "stderr", "syslog", "syslog:/dev/log" or "file:/path"'
            )


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    """``[policyd.scoring]``: total score thresholds (negative scores are good)."""

    reject: float = 10.0
    defer: float = math.inf
    reject_code: int = 550
    reject_dsn: str = "5.7.1"
    defer_code: int = 450
    defer_dsn: str = "4.7.1"

    def __post_init__(self) -> None:
        if not (500 <= self.reject_code <= 599 and self.reject_dsn.startswith("5.")):
            raise ValueError("reject_code must be 5xx and reject_dsn 5.x.y")
        if not (400 <= self.defer_code <= 499 and self.defer_dsn.startswith("4.")):
            raise ValueError("defer_code must be 4xx and defer_dsn 4.x.y")


@dataclass(frozen=True, kw_only=True)
class ExemptSettings:
    """``[policyd.exempt]``: clients no check is run for (decided once, by the pipeline), and
    recipients that no envelope check may refuse (RFC 5321 §4.5.1: mail to postmaster must be
    accepted, so a blocked sender can still reach a human)."""

    authenticated: bool = True
    networks: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ("postmaster@", "abuse@")

    def __post_init__(self) -> None:
        NetworkList(self.networks)
        AddressList(self.recipients)


@dataclass(frozen=True, kw_only=True)
class PolicydSettings:
    """``[policyd]``: the policy server."""

    listen: tuple[str, ...] = ("127.0.0.1:10040",)
    workers: int = 0
    allowed_clients: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    socket_mode: str = "0660"
    # Checks that work without site data (no DNS lists, databases or daemons to choose).
    checks: tuple[str, ...] = ("karma", "helo", "fcrdns", "spf", "greylist")
    reject_stage: str = "rcpt"
    request_deadline: Duration = 10.0
    idle_timeout: Duration = 600.0
    read_timeout: Duration = 30.0
    shutdown_grace: Duration = 10.0
    max_line_length: int = 8192
    max_attributes: int = 256
    max_request_size: int = 65536
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    tempfail_text: str = "Temporary local problem, please try again later"
    message_facts: bool = True
    message_facts_ttl: Duration = 6 * 3600.0
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    exempt: ExemptSettings = field(default_factory=ExemptSettings)

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen: at least one address is needed")
        for address in self.listen:
            parse_listen(address)
        NetworkList(self.allowed_clients)
        Stage.parse(self.reject_stage)
        if self.workers < 0 or self.workers > 256:
            raise ValueError("workers must be between 0 (= number of cores) and 256")
        if not (0 < self.request_deadline < 100):
            raise ValueError("request_deadline must be above 0 and below Postfix's 100s policy timeout")
        if min(self.max_line_length, self.max_attributes, self.max_request_size) <= 0:
            raise ValueError("max_line_length, max_attributes and max_request_size must be positive")
        if not re.fullmatch(r"0?[0-7]{3}", self.socket_mode):
            raise ValueError(f'socket_mode {self.socket_mode!r} is not an octal mode like "0660"')
        if len(set(self.checks)) != len(self.checks):
            raise ValueError("checks: a check is listed twice")
        if not 60 <= self.message_facts_ttl <= 7 * 86400:
            raise ValueError("message_facts_ttl must be between 1m and 7d")

    @property
    def stage(self) -> Stage:
        return Stage.parse(self.reject_stage)


@dataclass(frozen=True, kw_only=True)
class FilterSettings:
    """``[filter]``: the SMTP content filter (after-queue ``content_filter`` or before-queue
    ``smtpd_proxy_filter``)."""

    listen: tuple[str, ...] = ("127.0.0.1:10025",)
    mode: Literal["after-queue", "proxy"] = "after-queue"
    reinject: str = "127.0.0.1:10026"
    workers: int = 0
    allowed_clients: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    xforward_hosts: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    # Message authentication and header sanity: what a receiving MX checks today (no keys of
    # our own are needed: signing and sealing start only when keys are configured).
    checks: tuple[str, ...] = ("headers", "dkim", "arc", "dmarc")
    authserv_id: str = ""
    max_message_size: int = 52428800
    max_line_length: int = 65536
    max_recipients: int = 1000
    idle_timeout: Duration = 300.0
    deadline: Duration = 60.0
    reinject_timeout: Duration = 120.0
    relay_downstream_rejects: bool = False
    shutdown_grace: Duration = 30.0
    tag_score: float = 5.0
    reject_score: float = 10.0
    reject_action: Literal["quarantine", "discard", "tag"] = "quarantine"
    reject_code: int = 554
    reject_dsn: str = "5.7.1"
    spam_headers: bool = True
    subject_prefix: str = ""
    quarantine_retention: Duration = 30 * 86400.0
    karma: bool = True
    tempfail_text: str = "Temporary local problem, please try again later"
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("listen: at least one address is needed")
        for address in self.listen:
            parse_listen(address)
        kind, _, _ = parse_listen(self.reinject)
        if kind != "inet":
            raise ValueError("reinject: write host:port of the reinjection smtpd")
        NetworkList(self.allowed_clients)
        NetworkList(self.xforward_hosts)
        if self.workers < 0 or self.workers > 256:
            raise ValueError("workers must be between 0 (= number of cores) and 256")
        if len(set(self.checks)) != len(self.checks):
            raise ValueError("checks: a check is listed twice")
        if self.max_message_size < 1024 or self.max_line_length < 1000 or self.max_recipients < 1:
            raise ValueError("max_message_size must be >= 1024, max_line_length >= 1000, max_recipients >= 1")
        limit = 100.0 if self.mode == "proxy" else 600.0
        if not 0 < self.deadline < limit:
            raise ValueError(
                f"deadline must be above 0 and below Postfix's {limit:g}s "
                + ("smtpd_proxy_timeout" if self.mode == "proxy" else "smtp_data_done_timeout")
            )
        if self.tag_score > self.reject_score:
            raise ValueError("tag_score must not be above reject_score")
        if not (500 <= self.reject_code <= 599 and self.reject_dsn.startswith("5.")):
            raise ValueError("reject_code must be 5xx and reject_dsn 5.x.y")
        if any(c in self.subject_prefix for c in "\r\n\0"):
            raise ValueError("subject_prefix must be one line")
        if self.authserv_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", self.authserv_id):
            raise ValueError(f"authserv_id {self.authserv_id!r} is not a host name")


def parse_listen(address: str) -> tuple[str, str, int]:
    """``("unix", path, 0)`` or ``("inet", host, port)``.

    From ``unix:/path``, ``host:port`` or ``[::1]:port``.
    """
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            raise ValueError(f"listen {address!r}: a unix socket path must be absolute")
        return ("unix", path, 0)
    text = address.removeprefix("inet:")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if match is None:
        raise ValueError(f"listen {address!r}: write host:port, [ipv6]:port or unix:/path")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"listen {address!r}: port out of range")
    return ("inet", host, port)


@dataclass(frozen=True, kw_only=True)
class CheckCommon:
    """Keys every ``[checks.<name>]`` table accepts; the pipeline applies them."""

    enabled: bool = True
    timeout: Duration = 5.0
    on_error: Literal["ignore", "tempfail"] = "ignore"
    mode: Literal["enforce", "observe"] = "enforce"


@dataclass(frozen=True)
class CheckConfig:
    """One configured check: its class, the common settings and its own options."""

    name: str
    cls: type[Check[Any]]
    common: CheckCommon
    options: Any


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration, as loaded from ``path`` (``""`` for built-in defaults)."""

    path: str = ""
    general: GeneralSettings = field(default_factory=GeneralSettings)
    state: StateSettings = field(default_factory=StateSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    policyd: PolicydSettings = field(default_factory=PolicydSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    dmarc_reports: ReportSettings = field(default_factory=ReportSettings)
    checks: Mapping[str, CheckConfig] = field(default_factory=dict)
    # The content filter's checks ([filter] checks), same [checks.<name>] tables.
    filter_checks: Mapping[str, CheckConfig] = field(default_factory=dict)
    # [checks.<name>] tables of checks that no pipeline lists: validated, not run.
    inactive: Mapping[str, CheckConfig] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return Path(self.general.data_dir)

    @property
    def hostname(self) -> str:
        """``[mxward] hostname``, else this machine's fully qualified name."""
        return self.general.hostname or socket.getfqdn()


_TOP_TABLES: dict[str, tuple[str, type[Any]]] = {
    "mxward": ("general", GeneralSettings),
    "state": ("state", StateSettings),
    "dns": ("dns", DnsSettings),
    "policyd": ("policyd", PolicydSettings),
    "filter": ("filter", FilterSettings),
    "dmarc_reports": ("dmarc_reports", ReportSettings),
}


# --------------------------------------------------------------------------------------------
# Generic dataclass builder


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        args = typing.get_args(tp)
        if DurationMarker in args[1:]:
            return 'a duration such as "30s", "5m", "35d"'
        return _describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}s"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str, build_table: Callable[[type[Any], Any, str], Any]) -> Any:
    """Convert one TOML value to ``tp`` or raise ValueError saying what was expected."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        args = typing.get_args(tp)
        if DurationMarker in args[1:]:
            return parse_duration(value)
        return _convert(args[0], value, where, build_table)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"{value!r} is not valid: expected {_describe(tp)}")
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if isinstance(value, str):  # a single value where a list is expected: accept it
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"expected {_describe(tp)}")
        return tuple(_convert(item_type, item, where, build_table) for item in value)
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"{where}: union types are not supported in settings")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ValueError("expected a table")
        return build_table(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            pass
    else:
        raise TypeError(f"{where}: unsupported settings type {tp!r}")
    shown = value if not isinstance(value, dict) else "a table"
    raise ValueError(f"{shown!r} is not valid: expected {_describe(tp)}")


def build_settings(cls: type[Any], data: Mapping[str, Any], *, source: str, table: str) -> Any:
    """Build the frozen dataclass ``cls`` from a TOML table, strictly.

    ``source`` is the file name and ``table`` the dotted table name used in error messages.
    """

    def build_table(tp: type[Any], value: Mapping[str, Any], where: str) -> Any:
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        kwargs: dict[str, Any] = {}
        for key, raw in value.items():
            if key not in fields:
                valid = ", ".join(sorted(fields)) or "(none: this table takes no keys)"
                raise ConfigError(f"{source}: [{where}] unknown key {key!r} (valid keys: {valid})")
            sub = f"{where}.{key}"
            try:
                kwargs[key] = _convert(hints[key], raw, sub, build_table)
            except ValueError as exc:
                raise ConfigError(f"{source}: [{where}] {key}: {exc}") from None
        try:
            return tp(**kwargs)
        except ValueError as exc:
            raise ConfigError(f"{source}: [{where}] {exc}") from None

    return build_table(cls, data, table)


def option_docs(cls: type[Any]) -> list[tuple[str, str, Any]]:
    """``(name, type description, default)`` for every field of a settings dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: list[tuple[str, str, Any]] = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append((f.name, _describe(hints[f.name]), default))
    return out


# --------------------------------------------------------------------------------------------
# Loading


def config_path(explicit: str | None) -> tuple[str, bool]:
    """The file to read and whether it was asked for (``--config`` or ``MXWARD_CONFIG``)."""
    if explicit:
        return explicit, True
    env = os.environ.get("MXWARD_CONFIG", "")
    if env:
        return env, True
    return DEFAULT_PATH, False


CheckResolver = Callable[[str], type[Check[Any]]]


def load_config(path: str | None, resolve_check: CheckResolver) -> Config:
    """Read and validate the configuration; raise :class:`ConfigError` on any problem.

    ``path`` None means: ``MXWARD_CONFIG``, else the default path, else built-in defaults.
    ``resolve_check`` maps a check name to its class (built-ins, then entry points).
    """
    file, asked = config_path(path)
    try:
        text = Path(file).read_bytes()
    except FileNotFoundError:
        if asked:
            raise ConfigError(f"{file}: no such file") from None
        return parse_config({}, source="", resolve_check=resolve_check)
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: TOML syntax error: {exc}") from None
    return parse_config(data, source=file, resolve_check=resolve_check)


def parse_config(data: Mapping[str, Any], *, source: str, resolve_check: CheckResolver) -> Config:
    """Build a :class:`Config` from already-parsed TOML data."""
    label = source or "<built-in defaults>"
    valid_tables = [*_TOP_TABLES, "checks"]
    kwargs: dict[str, Any] = {"path": source}
    for key, value in data.items():
        if key == "checks":
            continue
        if key not in _TOP_TABLES:
            raise ConfigError(
                f"{label}: unknown table or key {key!r} at top level"
                f" (valid tables: {', '.join(valid_tables)})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: {key!r} must be a table ([{key}])")
        attr, cls = _TOP_TABLES[key]
        kwargs[attr] = build_settings(cls, value, source=label, table=key)
    policyd: PolicydSettings = kwargs.get("policyd") or PolicydSettings()

    check_tables = data.get("checks", {})
    if not isinstance(check_tables, dict):
        raise ConfigError(f"{label}: 'checks' must be a table of [checks.<name>] tables")
    listed = list(policyd.checks)
    checks: dict[str, CheckConfig] = {}
    for name in listed:
        try:
            cls = resolve_check(name)
        except CheckLoadError as exc:
            raise ConfigError(f"{label}: [policyd] checks: {exc}") from None
        checks[name] = _build_check(cls, check_tables.get(name, {}), label)
        _stages_fit(cls, label, "policyd", content=False)
    filter_settings: FilterSettings = kwargs.get("filter") or FilterSettings()
    filter_checks: dict[str, CheckConfig] = {}
    for name in filter_settings.checks:
        try:
            cls = resolve_check(name)
        except CheckLoadError as exc:
            raise ConfigError(f"{label}: [filter] checks: {exc}") from None
        filter_checks[name] = checks.get(name) or _build_check(cls, check_tables.get(name, {}), label)
        _stages_fit(cls, label, "filter", content=True)
    # A table for a check that no pipeline lists is still validated (a typo in it is an error
    # now, not when the check is switched on), and reported by `mxward config-check`.
    inactive: dict[str, CheckConfig] = {}
    for name, table in check_tables.items():
        if name in checks or name in filter_checks:
            continue
        try:
            cls = resolve_check(name)
        except CheckLoadError as exc:
            raise ConfigError(f"{label}: [checks.{name}]: {exc}") from None
        inactive[name] = _build_check(cls, table, label)
    kwargs["checks"] = checks
    kwargs["filter_checks"] = filter_checks
    kwargs["inactive"] = inactive
    try:
        return Config(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from None


def _stages_fit(cls: type[Check[Any]], label: str, table: str, *, content: bool) -> None:
    """A check runs where its stages are: the envelope stages in policyd, CONTENT in the filter."""
    has_content = Stage.CONTENT in cls.stages
    if content and not has_content:
        raise ConfigError(
            f"{label}: [{table}] checks: {cls.name!r} is an envelope check; list it in [policyd] checks"
        )
    if not content and cls.stages == {Stage.CONTENT}:
        raise ConfigError(
            f"{label}: [{table}] checks: {cls.name!r} is a content check; list it in [filter] checks"
        )


def _build_check(cls: type[Check[Any]], table: Any, label: str) -> CheckConfig:
    where = f"checks.{cls.name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: [{where}] must be a table")
    common_keys = {f.name for f in dataclasses.fields(CheckCommon)}
    option_keys = {f.name for f in dataclasses.fields(cls.options_type)}
    clash = common_keys & option_keys
    if clash:  # a check author's mistake, reported as such
        raise ConfigError(f"check {cls.name!r}: options {sorted(clash)} clash with the common keys")
    common_data = {k: v for k, v in table.items() if k in common_keys}
    option_data = {k: v for k, v in table.items() if k not in common_keys}
    common_data.setdefault("timeout", cls.timeout)
    unknown = set(option_data) - option_keys
    if unknown:
        valid = ", ".join(sorted(common_keys | option_keys))
        raise ConfigError(f"{label}: [{where}] unknown key {min(unknown)!r} (valid keys: {valid})")
    common = build_settings(CheckCommon, common_data, source=label, table=where)
    if common.timeout <= 0:
        raise ConfigError(f"{label}: [{where}] timeout must be above 0")
    options = build_settings(cls.options_type, option_data, source=label, table=where)
    return CheckConfig(name=cls.name, cls=cls, common=common, options=options)

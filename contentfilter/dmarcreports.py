"""DMARC reports: aggregate reports (RFC 9990) and, when enabled, failure reports (RFC 9991).

The dmarc check evaluates each message; its ``after()`` hook hands the evaluation to
:func:`record_evaluation`, which counts it in Redis, cluster-wide. ``mxward dmarc report``
(from cron, once an hour or once a day) turns the counts of each policy domain and reporting
period into one aggregate report, an XML document valid against the schema of RFC 9990
Appendix A, compressed with gzip, and writes it to a directory or mails it to the domain's
``rua`` addresses. ``docs/dmarc-reports.md`` is the operator's manual; this docstring is the
developer's.

Recording (:func:`record_evaluation`, called once per message)
    Reads the dmarc check's facts ``dmarc.result``, ``dmarc.from_domain``,
    ``dmarc.policy_domain``, ``dmarc.policy``, ``dmarc.disposition``, ``dmarc.override``,
    ``dmarc.testing``, ``dmarc.spf_aligned``, ``dmarc.dkim_aligned``, ``dmarc.rua`` (URIs
    separated by spaces or commas), ``dmarc.mode``, the published values ``dmarc.p``,
    ``dmarc.sp``, ``dmarc.np``, ``dmarc.adkim``, ``dmarc.aspf``, ``dmarc.fo`` (and
    ``dmarc.record``, the record's text, if a check provides it), the SPF the check used
    (``dmarc.spf_result``, ``dmarc.spf_domain``), and from the transaction's facts
    ``dkim.results`` and policyd's ``spf.result``, ``spf.domain``, ``spf.identity``, plus the
    client address, envelope sender and queue id. Only messages with a DMARC result of
    ``pass`` or ``fail`` and at least one ``rua`` URI are counted (RFC 9989: no ``rua``, no
    aggregate report). Facts that are absent are left out of the report, never guessed.
    Nothing here raises on message content; a Redis failure is logged and the message is not
    counted. ``settings`` (the ``[dmarc_reports]`` table) gives the retention (TTLs),
    ``envelope_to`` and the failure report switches; without it the defaults apply.

    One row is one distinct combination of source IP, disposition, DKIM and SPF alignment,
    override reasons, header From, envelope From (and envelope To if configured) and the DKIM
    and SPF results (RFC 9990 section 3.1: one record per such tuple). Counts are kept per
    UTC hour, the finest reporting period, so the configured period can be any number of
    hours dividing 24 and can change without losing data: reports add up the hours of their
    period. The policy published and the ``rua`` list are kept per hour too, with the time
    they were seen; a report shows the last ones seen in its period (RFC 9990 section 3.3).

    Postfix can hand the same message to the filter twice (a 4xx during the first attempt):
    a marker per queue id (with the client, sender and Message-ID, as queue ids are reused
    after a while) makes the count idempotent. Without a queue id (before-queue proxy mode)
    every evaluation counts.

Redis (namespace ``dmarcreport``; ``<day>`` is ``YYYYMMDD``, ``<hour>`` ``YYYYMMDDHH``, UTC)::

    dmarcreport:{d:<domain>}:r:<hour>       hash: row (JSON) -> count            TTL keep
    dmarcreport:{d:<domain>}:m:<hour>       hash: seen, policy, p, rua, mode,
                                            record, published, dropped           TTL keep
    dmarcreport:{d:<domain>}:q:<digest>     marker: message already counted      TTL keep
    dmarcreport:{d:<domain>}:f:<hour>       list: failure reports (JSON)         TTL keep
    dmarcreport:{d:<domain>}:s:<begin>:<end>  hash: destination -> time sent      TTL keep + 1d
    dmarcreport:{d:<domain>}:fs:<hour>      hash: failure id|destination -> time  TTL keep + 1d
    dmarcreport:{d:<domain>}:lock:<name>    one sender at a time                  15m
    dmarcreport:{i:<day>}:domains           set: policy domains with data that day  TTL keep

    "keep" is until ``retention`` after the end of the UTC day the data belongs to. The keys
    of one policy domain share the hash tag ``{d:<domain>}``: the Lua script that counts a
    message touches its marker, rows, policy and failure list together, so Redis Cluster
    works; the day index has a tag of its own and is written by a separate one-key script.
    Rows per domain and hour are capped at 50000 (more distinct rows are counted in
    ``dropped`` and logged when the report is built), which bounds what a flood of forged
    mail from many addresses can cost.

Reports (:class:`AggregateReport`)
    One per policy domain and ended period. ``report_id`` is 32 hex digits derived from the
    submitter, the domain and the period: stable, so a report sent again carries the same id
    and file name (RFC 9990 section 3.5), and unique among the reports to one domain. The file
    name is ``<submitter>!<policy domain>!<begin>!<end>!<report_id>.xml.gz``; ``end`` is the
    last second of the period. The submitter is the domain of the reporting address. The
    policy published is the record the check saw (``dmarc.record``, else rebuilt from
    ``dmarc.p`` ... ``dmarc.testing``) or, when the facts do not tell, the record found by a
    DNS lookup of ``_dmarc.<domain>`` when the report is built; if there is none, ``p`` is
    the policy the check applied. ``pct`` and ``psd`` have no place in the RFC 9990 schema
    and are not reported; ``discovery_method`` is ``treewalk`` (RFC 9989 mode) or ``psl``
    (RFC 7489 mode).

Delivery (:class:`Reporter`)
    ``--dir`` writes each report file (mode 0600, written to a temporary name and renamed).
    ``--send`` mails it through the filter's reinjection smtpd (``[filter] reinject``), from
    the reporting address, to each ``mailto:`` URI of ``rua`` in turn, after the external
    destination check of RFC 9990 section 4 (RFC 9991 section 5 for ``ruf``): when the
    organizational domain (RFC 9989 tree walk) of the destination differs from the policy
    domain's, ``<policy domain>._report._dmarc.<destination host>`` must publish a TXT record
    starting with ``v=DMARC1``; a ``rua`` (``ruf``) tag there replaces the destination if it
    names the same host. A size limit (``mailto:...!10m``) smaller than the report message
    skips that destination. Only periods that have ended are sent; each destination is marked
    in Redis once the reinjection smtpd accepted the report, and a lock per domain and period
    keeps two nodes from sending the same report at once. A temporary DNS failure or a
    delivery failure leaves the destination unmarked: the next run tries again.

Failure reports (RFC 9991; ``failure_reports``, off by default)
    For a DMARC ``fail``, :func:`record_evaluation` stores a redacted copy of the message's
    facts: header fields From, Sender, Reply-To, To, Cc, Date, Message-ID, Received,
    Return-Path, MIME-Version and DKIM-Signature only, every address's local part replaced by
    ``redacted``, non-ASCII as ``?``; no body, no Subject. At most ``failure_limit`` per policy
    domain and hour are kept (RFC 9991 section 2 asks for rate limits). ``mxward dmarc report
    --send`` mails each as an AFRF report (RFC 6591, ``multipart/report; report-type=
    feedback-report``, ``Auth-Failure: dmarc``, ``Identity-Alignment``) to the ``ruf``
    addresses of the domain's DMARC record if its ``fo`` asks for DMARC failures (``0`` or
    ``1``), never for a record with ``psd=y``, with the same destination check.

Command line: ``mxward dmarc report [--period YYYY-MM-DD] [--domain D] [--dir PATH | --send]
[--dry-run]`` (:func:`add_parser`, :func:`run_command`).
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import contextlib
import email.policy
import email.utils
import gzip
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.message import EmailMessage
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from mxward.shared.authresults import AuthResult, build_header
from mxward.shared.dns import DnsTempError, normalize_domain
from mxward.shared.state import Script, StateError, StateStore
from mxward.shared.units import Duration, format_duration

if TYPE_CHECKING:
    from mxward.shared.config import Config
    from mxward.shared.dns import Resolver
    from mxward.shared.plugin import LogValue, Services, Transaction

__all__ = [
    "NAMESPACE",
    "XML_NAMESPACE",
    "AggregateReport",
    "DeliveryError",
    "Evaluation",
    "FailureReport",
    "PolicyPublished",
    "ReinjectSender",
    "ReportError",
    "ReportSettings",
    "ReportURI",
    "Reporter",
    "Row",
    "Sender",
    "add_parser",
    "authorized_destinations",
    "declare_keys",
    "evaluation_from_facts",
    "organizational_domain",
    "parse_dmarc_record",
    "parse_report_uris",
    "record_evaluation",
    "run_command",
]

log = logging.getLogger(__name__)

NAMESPACE = "dmarcreport"
XML_NAMESPACE = "urn:ietf:params:xml:ns:dmarc-2.0"
HOUR = 3600
DAY = 86400
MAX_ROWS_PER_HOUR = 50_000  # distinct rows per policy domain and hour
MAX_DKIM = 100  # signatures per row (RFC 9990 section 3.1.2)
LOCK_TTL = 900
_DISPOSITIONS = ("none", "quarantine", "reject")
_DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror", "permerror"})
_SPF_RESULTS = frozenset({"none", "pass", "fail", "softfail", "policy", "neutral", "temperror", "permerror"})
# dmarc.override -> (RFC 9990 PolicyOverrideType, comment)
_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "forwarded": ("trusted_forwarder", "known forwarder"),
    "trusted_arc": ("trusted_forwarder", "ARC chain sealed by a trusted sealer"),
    "local_policy": ("local_policy", ""),
    "mailing_list": ("mailing_list", ""),
    "sampled_out": ("other", "sampled out (pct)"),
}
_OVERRIDE_TYPES = ("local_policy", "mailing_list", "other", "policy_test_mode", "trusted_forwarder")
_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
_SIZE = re.compile(r"(\d{1,12})([kmgt]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_FO = re.compile(r"[01ds](?::[01ds])*")
_ADDRESS_IN_TEXT = re.compile(r"[^\s<>()\[\]\",;:@=]+@(?=[A-Za-z0-9\[])")
_FAILURE_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "date",
    "message-id",
    "received",
    "return-path",
    "mime-version",
    "dkim-signature",
)
_MAX_HEADER_TEXT = 16_384
_PERIOD_ARG = re.compile(r"\d{4}-\d{2}-\d{2}")


class ReportError(Exception):
    """A report could not be built or delivered; the message says why."""


class DeliveryError(ReportError):
    """The reinjection smtpd did not accept a report (try again later)."""


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, kw_only=True)
class ReportSettings:
    """The ``[dmarc_reports]`` table.

    org_name         str       ""      reporting organization; empty = the reporting address's domain
    email            str       ""      reporting address (From of the reports, contact in them);
                                       empty = postmaster@<host name>
    period           duration  "1d"    reporting period: whole hours dividing 24 ("1h" ... "12h", "1d")
    retention        duration  "7d"    keep counts this long after the end of their UTC day
    envelope_to      bool      false   report the recipients' domain (when they share one)
    failure_reports  bool      false   store and send RFC 9991 failure reports (privacy: off)
    failure_limit    int       10      failure reports kept per policy domain and hour
    max_size         int       10485760  largest report message sent, in bytes
    """

    org_name: str = ""
    email: str = ""
    period: Duration = float(DAY)
    retention: Duration = 7.0 * DAY
    envelope_to: bool = False
    failure_reports: bool = False
    failure_limit: int = 10
    max_size: int = 10 * 1024 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.org_name, str) or not self.org_name.isprintable() or len(self.org_name) > 200:
            raise ValueError("org_name must be one printable line of at most 200 characters")
        if self.email and _split_address(self.email) is None:
            raise ValueError(f"email {self.email!r} is not an address like dmarc-reports@example.com")
        for name in ("period", "retention"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a duration, not {value!r}")
        hours = self.period / HOUR
        if hours != int(hours) or hours < 1 or 24 % int(hours):
            raise ValueError(
                f"period must be a whole number of hours that divides 24 (1h, 2h, 3h, 4h, 6h, 8h, 12h"
                f" or 1d), not {format_duration(self.period)}"
            )
        if self.retention < DAY:
            raise ValueError(f"retention must be at least 1d, not {format_duration(self.retention)}")
        if isinstance(self.failure_limit, bool) or not 0 <= self.failure_limit <= 1000:
            raise ValueError("failure_limit must be between 0 and 1000")
        if isinstance(self.max_size, bool) or self.max_size < 4096:
            raise ValueError("max_size must be at least 4096 bytes")

    def address(self, hostname: str) -> str:
        """The reporting address: ``email``, or postmaster@ the host name."""
        return self.email or f"postmaster@{hostname}"

    def submitter(self, hostname: str) -> str:
        """The domain that submits the reports: the reporting address's domain."""
        parts = _split_address(self.address(hostname))
        return parts[1] if parts is not None else hostname.lower()

    def organization(self, hostname: str) -> str:
        return self.org_name or self.submitter(hostname)


# --------------------------------------------------------------------------------------------
# Names, addresses, URIs, DMARC records


def _domain(text: object) -> str | None:
    """A domain name in lower case ASCII (A-labels), without a final dot; None if it is none."""
    return normalize_domain(text) if isinstance(text, str) else None


def _split_address(address: str) -> tuple[str, str] | None:
    """(local part, domain) of an address fit for an SMTP envelope without SMTPUTF8 (ASCII
    dot-atom local part); None otherwise."""
    if not isinstance(address, str):
        return None
    local, at, host = address.rpartition("@")
    domain = _domain(host)  # an internationalized domain becomes its A-labels
    if not at or domain is None or not _LOCAL.fullmatch(local) or ".." in local:
        return None
    if local.startswith(".") or local.endswith("."):
        return None
    return local, domain


def parse_dmarc_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record (names lowercased); None unless it starts with ``v=DMARC1``.

    Follows RFC 9989 section 4.7: tag=value pairs separated by ``;``, the first being
    ``v=DMARC1`` (value case-sensitive); a trailing ``;`` is allowed, a later duplicate tag
    is ignored.
    """
    if not isinstance(text, str):
        return None
    parts = [p.strip() for p in text.split(";")]
    if parts and not parts[-1]:
        parts.pop()
    tags: dict[str, str] = {}
    for index, part in enumerate(parts):
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if index == 0:
            if name != "v" or not eq or value != "DMARC1":
                return None
        elif not eq or not name.isalpha():
            continue
        tags.setdefault(name, value)
    return tags or None


@dataclass(frozen=True, slots=True)
class ReportURI:
    """One ``mailto:`` destination of ``rua``/``ruf``: the address and its size limit in bytes."""

    address: str
    limit: int | None = None

    @property
    def host(self) -> str:
        return self.address.rpartition("@")[2]

    def __str__(self) -> str:
        return f"mailto:{self.address}"


def parse_report_uris(value: str) -> tuple[list[ReportURI], list[str]]:
    """The ``mailto:`` URIs of a ``rua``/``ruf`` value, and the URIs that cannot be used.

    URIs are separated by commas (RFC 9989 section 4.6; white space too, as in the dmarc
    check's ``dmarc.rua`` fact); ``!<size>[kmgt]`` sets a size limit
    (units are powers of two); commas and ``!`` inside a URI are percent-encoded; ``?...``
    header fields are ignored. Only plain ASCII addresses are used, so nothing from a DNS
    record can inject into an SMTP command.
    """
    usable: list[ReportURI] = []
    ignored: list[str] = []
    for raw in re.split(r"[,\s]+", value) if isinstance(value, str) else ():
        uri = raw.strip()
        if not uri:
            continue
        body, bang, size = uri.partition("!")
        limit = None
        if bang:
            match = _SIZE.fullmatch(size.strip())
            if match is None:
                ignored.append(uri)
                continue
            limit = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        scheme, colon, target = body.partition(":")
        if not colon or scheme.strip().lower() != "mailto":
            ignored.append(uri)
            continue
        address = unquote(target.partition("?")[0].strip())
        parts = _split_address(address)
        if parts is None:
            ignored.append(uri)
            continue
        found = ReportURI(f"{parts[0]}@{parts[1]}", limit)
        if found not in usable:
            usable.append(found)
    return usable, ignored


async def _dmarc_tags(dns: Resolver, domain: str) -> dict[str, str] | None:
    """The one DMARC record at ``_dmarc.<domain>``; None if there is none or more than one."""
    found = [tags for text in await dns.txt(f"_dmarc.{domain}") if (tags := parse_dmarc_record(text))]
    return found[0] if len(found) == 1 else None


async def organizational_domain(dns: Resolver, domain: str) -> str:
    """The Organizational Domain of ``domain`` by the DNS tree walk of RFC 9989 section 4.10
    (the dmarc check's own walk); raises :class:`DnsTempError` when DNS fails temporarily."""
    from mxward.contentfilter.dmarclib import Discovery

    return await Discovery(dns).organizational_domain(domain.lower().rstrip("."))


async def authorized_destinations(
    dns: Resolver, policy_domain: str, uri: ReportURI, *, tag: str = "rua"
) -> tuple[list[ReportURI], str]:
    """Where ``uri`` may receive reports about ``policy_domain`` (RFC 9990 section 4).

    Returns the destinations (``[uri]``, or the ``rua``/``ruf`` of the authorizing record
    when it names the same host; ``[]`` when not authorized) and a note for people. Raises
    :class:`DnsTempError` when DNS cannot answer now.
    """
    host = uri.host
    if host == policy_domain or (
        await organizational_domain(dns, host) == await organizational_domain(dns, policy_domain)
    ):
        return [uri], "same organizational domain"
    name = f"{policy_domain}._report._dmarc.{host}"
    if len(name) > 253 or any(len(label) > 63 for label in name.split(".")):
        return [], f"{name} is too long to be authorized"
    records = [tags for text in await dns.txt(name) if (tags := parse_dmarc_record(text))]
    if not records:
        return [], f"{host} does not accept reports for {policy_domain} (no v=DMARC1 record at {name})"
    override = records[0].get(tag, "")
    if override:
        replaced = [u for u in parse_report_uris(override)[0] if u.host == host]
        if replaced:
            return replaced, f"authorized by {name}, which names its own {tag}"
    return [uri], f"authorized by {name}"


# --------------------------------------------------------------------------------------------
# What one evaluation contributes


@dataclass(frozen=True, slots=True)
class Row:
    """One record of a report, without its count: the tuple RFC 9990 counts messages by."""

    source_ip: str
    disposition: str  # none | pass | quarantine | reject
    dkim_aligned: bool
    spf_aligned: bool
    policy: str  # the policy the check applied (p, sp or np), "" if unknown
    overrides: tuple[tuple[str, str], ...]  # (RFC 9990 override type, comment)
    header_from: str
    envelope_from: str  # "" for the null sender
    envelope_to: str | None
    dkim: tuple[tuple[str, str, str], ...]  # (domain, selector, result), preferred first
    spf: tuple[str, str] | None  # (domain, result), scope mfrom

    def key(self) -> str:
        """The row as the JSON text that is its Redis hash field (keys sorted: one text per row)."""
        data: dict[str, Any] = {
            "ip": self.source_ip,
            "disp": self.disposition,
            "da": self.dkim_aligned,
            "sa": self.spf_aligned,
            "pol": self.policy,
            "ov": [list(o) for o in self.overrides],
            "hf": self.header_from,
            "ef": self.envelope_from,
            "dkim": [list(d) for d in self.dkim],
            "spf": list(self.spf) if self.spf else None,
        }
        if self.envelope_to is not None:
            data["et"] = self.envelope_to
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_key(cls, text: str) -> Row | None:
        """Parse :meth:`key`'s output; None (the caller logs it) when it is not a valid row."""
        try:
            data = json.loads(text)
            row = cls(
                source_ip=str(ipaddress.ip_address(data["ip"])),
                disposition=_one_of(data["disp"], ("none", "pass", *_DISPOSITIONS[1:])),
                dkim_aligned=_bool(data["da"]),
                spf_aligned=_bool(data["sa"]),
                policy=_one_of(data.get("pol", ""), ("", *_DISPOSITIONS)),
                overrides=tuple((_one_of(t, _OVERRIDE_TYPES), _text(c)) for t, c in data["ov"]),
                header_from=_required_domain(data["hf"]),
                envelope_from=_text(data["ef"]),
                envelope_to=None if data.get("et") is None else _text(data["et"]),
                dkim=tuple(_dkim_entry(item) for item in data["dkim"])[:MAX_DKIM],
                spf=None if data["spf"] is None else _spf_entry(data["spf"]),
            )
        except (ValueError, TypeError, KeyError, IndexError):
            return None
        return row

    def reasons(self, testing: bool) -> list[tuple[str, str]]:
        """The override reasons to report: the check's, or why a failing message got less
        than its policy (RFC 9990 section 3.1.2: the reason MUST then be given)."""
        reasons = list(self.overrides)
        if reasons or self.disposition == "pass" or (self.dkim_aligned or self.spf_aligned):
            return reasons
        if self.policy and _DISPOSITIONS.index(self.disposition) < _DISPOSITIONS.index(self.policy):
            reasons.append(("policy_test_mode", "") if testing else ("local_policy", ""))
        return reasons


def _one_of(value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{value!r} not allowed")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("not a boolean")
    return value


def _text(value: object, limit: int = 255) -> str:
    """One line of text fit for XML, at most ``limit`` characters."""
    if not isinstance(value, str):
        raise TypeError("not a string")
    return _xml_text(value)[:limit]


def _required_domain(value: object) -> str:
    domain = _domain(value)
    if domain is None:
        raise ValueError(f"{value!r} is not a domain")
    return domain


def _xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry (controls, surrogates, U+FFFE/F)."""
    return "".join(
        c
        for c in text
        if c in "\t\n\r" or (" " <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd") or c > "\uffff"
    )


def _fact_bool(value: LogValue | None) -> bool:
    if isinstance(value, bool):
        return value
    return isinstance(value, str) and value.lower() in ("true", "yes", "1", "pass")


def _fact_str(facts: Mapping[str, LogValue], name: str) -> str:
    value = facts.get(name)
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What :func:`record_evaluation` stores for one message."""

    policy_domain: str
    row: Row
    result: str  # pass | fail
    policy: str
    rua: str
    mode: str
    record: str  # the DMARC record's text, when the check gave it (dmarc.record)
    published: str  # the record as far as the facts tell (dmarc.p, dmarc.sp, ...), or ""


def evaluation_from_facts(
    tx: Transaction, facts: Mapping[str, LogValue], *, envelope_to: bool = False
) -> Evaluation | None:
    """The evaluation of one message from the facts; None when there is nothing to report.

    ``facts`` are the dmarc check's; the transaction's facts (``spf.*``, ``dkim.results``)
    are read too, the check's winning where both have a name.
    """
    facts = {**tx.facts, **facts}
    result = _fact_str(facts, "dmarc.result").lower()
    if result not in ("pass", "fail"):
        return None
    policy_domain = _domain(facts.get("dmarc.policy_domain"))
    header_from = _domain(facts.get("dmarc.from_domain"))
    if policy_domain is None or header_from is None:
        return None
    try:
        source_ip = str(ipaddress.ip_address(tx.client_address.strip()))
    except ValueError:
        return None
    policy = _fact_str(facts, "dmarc.policy").lower()
    policy = policy if policy in _DISPOSITIONS else ""
    dkim_aligned = _fact_bool(facts.get("dmarc.dkim_aligned"))
    spf_aligned = _fact_bool(facts.get("dmarc.spf_aligned"))
    if result == "pass":
        disposition = "none" if policy in ("", "none") else "pass"
        overrides: tuple[tuple[str, str], ...] = ()
    else:
        disposition = _fact_str(facts, "dmarc.disposition").lower()
        disposition = disposition if disposition in _DISPOSITIONS else "none"
        override = _OVERRIDES.get(_fact_str(facts, "dmarc.override").lower())
        if override is None and _fact_bool(facts.get("dmarc.testing")):
            override = ("policy_test_mode", "")
        overrides = (override,) if override else ()
    sender = tx.sender.strip()
    envelope_from = ""
    if sender:
        envelope_from = _domain(sender.rpartition("@")[2]) or _text(sender.rpartition("@")[2])
    to: str | None = None
    if envelope_to:
        domains = {_domain(r.rpartition("@")[2]) for r in tx.recipients}
        if len(domains) == 1 and None not in domains:
            to = domains.pop()
    row = Row(
        source_ip=source_ip,
        disposition=disposition,
        dkim_aligned=dkim_aligned,
        spf_aligned=spf_aligned,
        policy=policy,
        overrides=overrides,
        header_from=header_from,
        envelope_from=envelope_from,
        envelope_to=to,
        dkim=_dkim_results(_fact_str(facts, "dkim.results"), header_from),
        spf=_spf_result(facts, bool(sender)),
    )
    record = _fact_str(facts, "dmarc.record")
    record = record if parse_dmarc_record(record) else ""
    return Evaluation(
        policy_domain=policy_domain,
        row=row,
        result=result,
        policy=policy,
        rua=_fact_str(facts, "dmarc.rua"),
        mode=_fact_str(facts, "dmarc.mode"),
        record=record,
        published=record or _published(facts),
    )


def _published(facts: Mapping[str, LogValue]) -> str:
    """The policy record rebuilt from the check's facts ``dmarc.p``, ``dmarc.sp``, ``dmarc.np``,
    ``dmarc.adkim``, ``dmarc.aspf``, ``dmarc.fo`` and ``dmarc.testing``; "" without them."""
    if "dmarc.p" not in facts:
        return ""
    tags = ["v=DMARC1"]
    for name in ("p", "sp", "np", "adkim", "aspf", "fo"):
        value = _fact_str(facts, f"dmarc.{name}").strip()
        if value and ";" not in value:
            tags.append(f"{name}={value}")
    if _fact_bool(facts.get("dmarc.testing")):
        tags.append("t=y")
    return "; ".join(tags)


def _dkim_results(text: str, header_from: str) -> tuple[tuple[str, str, str], ...]:
    """``dkim.results`` entries in RFC 9990's order of preference: passing and strictly
    aligned, passing and relaxed aligned, other passing, the rest; at most 100."""
    entries: list[tuple[int, int, tuple[str, str, str]]] = []
    for index, item in enumerate(text.split()):
        parts = item.rsplit(":", 2)
        if len(parts) != 3:
            continue
        domain = _domain(parts[0])
        result = parts[2].lower()
        if domain is None or result not in _DKIM_RESULTS:
            continue
        selector = _xml_text(parts[1])[:63]
        if result != "pass":
            rank = 3
        elif domain == header_from:
            rank = 0
        elif header_from.endswith("." + domain) or domain.endswith("." + header_from):
            rank = 1
        else:
            rank = 2
        entries.append((rank, index, (domain, selector, result)))
    entries.sort()
    return tuple(entry for _, _, entry in entries[:MAX_DKIM])


def _spf_result(facts: Mapping[str, LogValue], has_sender: bool) -> tuple[str, str] | None:
    """The SPF result of the MAIL FROM identity (RFC 7208 section 2.4: with a null sender that
    is postmaster@<HELO>): the one the dmarc check used (``dmarc.spf_result``), else policyd's;
    None when there is none, or when only the HELO of a sender was checked."""
    result = _fact_str(facts, "dmarc.spf_result").lower()
    domain = _domain(facts.get("dmarc.spf_domain"))
    if result in _SPF_RESULTS and domain is not None:
        return domain, result
    result = _fact_str(facts, "spf.result").lower()
    domain = _domain(facts.get("spf.domain"))
    if result not in _SPF_RESULTS or domain is None:
        return None
    if _fact_str(facts, "spf.identity").lower() == "helo" and has_sender:
        return None
    return domain, result


# --------------------------------------------------------------------------------------------
# Redis


_RECORD = Script(
    "mxward.dmarcreport.record",
    """
if ARGV[1] == '1' then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
end
if ARGV[4] ~= '' then
  if redis.call('HEXISTS', KEYS[2], ARGV[4]) == 1 or redis.call('HLEN', KEYS[2]) < tonumber(ARGV[5]) then
    redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  else
    redis.call('HINCRBY', KEYS[3], 'dropped', 1)
  end
end
if #ARGV > 7 then
  redis.call('HSET', KEYS[3], unpack(ARGV, 8))
end
redis.call('EXPIRE', KEYS[3], ARGV[3])
if ARGV[6] ~= '' and redis.call('LLEN', KEYS[4]) < tonumber(ARGV[7]) then
  redis.call('RPUSH', KEYS[4], ARGV[6])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
return 1
""",
)
# KEYS[1]: a set. ARGV: ttl, member.
_INDEX = Script(
    "mxward.dmarcreport.index",
    """
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""",
)
_SMEMBERS = Script("mxward.dmarcreport.members", "return redis.call('SMEMBERS', KEYS[1])")
_LRANGE = Script("mxward.dmarcreport.lrange", "return redis.call('LRANGE', KEYS[1], 0, -1)")
# KEYS[1]: lock. ARGV: token, ttl.
_LOCK = Script(
    "mxward.dmarcreport.lock",
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end return 0",
)
_UNLOCK = Script(
    "mxward.dmarcreport.unlock",
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
)


def _hour_name(t: float) -> str:
    return time.strftime("%Y%m%d%H", time.gmtime(t))


def _day_name(t: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(t))


def _day_start(t: float) -> int:
    return int(t // DAY) * DAY


def _keep_ttl(bucket: float, now: float, retention: float) -> int:
    """Seconds until ``retention`` after the end of the UTC day of ``bucket``."""
    return max(1, math.ceil(_day_start(bucket) + DAY + retention - now))


def declare_keys(state: StateStore, settings: ReportSettings) -> None:
    """Record the key shapes for ``mxward state keys`` (see the module docstring)."""
    ns = state.namespace(NAMESPACE)
    keep = f"{format_duration(settings.retention)} after their UTC day"
    ns.declare("{d:<domain>}:r:<hour>", keep, "DMARC aggregate rows: row -> message count")
    ns.declare("{d:<domain>}:m:<hour>", keep, "DMARC policy and rua seen that hour")
    ns.declare("{d:<domain>}:q:<digest>", keep, "DMARC report: message already counted")
    ns.declare("{d:<domain>}:f:<hour>", keep, "DMARC failure reports (redacted) waiting")
    ns.declare("{d:<domain>}:s:<begin>:<end>", keep + " + 1d", "DMARC report sent: destination -> time")
    ns.declare("{d:<domain>}:fs:<hour>", keep + " + 1d", "DMARC failure report sent")
    ns.declare("{d:<domain>}:lock:<name>", format_duration(LOCK_TTL), "one DMARC report sender at a time")
    ns.declare("{i:<day>}:domains", keep, "policy domains with DMARC report data that day")


async def record_evaluation(
    state: StateStore,
    tx: Transaction,
    facts: Mapping[str, LogValue],
    *,
    now: float,
    settings: ReportSettings | None = None,
) -> None:
    """Count one DMARC evaluation for the aggregate reports (and keep a failure report if
    they are enabled). Never raises on message content; Redis failures are logged."""
    settings = settings or ReportSettings()
    evaluation = evaluation_from_facts(tx, facts, envelope_to=settings.envelope_to)
    if evaluation is None:
        return
    record_tags = parse_dmarc_record(evaluation.record) if evaluation.record else None
    want_aggregate = bool(parse_report_uris(evaluation.rua)[0])
    want_failure = (
        settings.failure_reports
        and settings.failure_limit > 0
        and evaluation.result == "fail"
        and (record_tags is None or bool(record_tags.get("ruf")))
    )
    if not want_aggregate and not want_failure:
        return
    ns = state.namespace(NAMESPACE)
    tag = f"d:{evaluation.policy_domain}"
    hour = _hour_name(now)
    ttl = _keep_ttl(now, now, settings.retention)
    marker = ""
    if tx.queue_id:
        message_id = (tx.message.get("message-id") if tx.message is not None else None) or ""
        identity = f"{tx.queue_id}\0{tx.client_address}\0{tx.sender}\0{message_id}"
        digest = hashlib.sha256(identity.encode("utf-8", "replace")).hexdigest()[:24]
        marker = ns.key("q", digest, tag=tag)
    meta: dict[str, str | float] = {
        "seen": now,
        "policy": evaluation.policy,
        "rua": evaluation.rua[:1000],
        "mode": evaluation.mode[:10],
    }
    if evaluation.row.header_from == evaluation.policy_domain and evaluation.policy:
        meta["p"] = evaluation.policy  # the record's own p (not sp or np)
    if evaluation.record:
        meta["record"] = evaluation.record[:2000]
    if evaluation.published:
        meta["published"] = evaluation.published[:2000]
    failure = ""
    if want_failure:
        failure = json.dumps(_failure_entry(tx, evaluation, now), separators=(",", ":"))
    try:
        counted = await ns.run(
            _RECORD,
            [marker or ns.key("m", hour, tag=tag), ns.key("r", hour, tag=tag), ns.key("m", hour, tag=tag),
             ns.key("f", hour, tag=tag)],
            ["1" if marker else "0", ttl, ttl, evaluation.row.key() if want_aggregate else "",
             MAX_ROWS_PER_HOUR, failure, settings.failure_limit, *(x for kv in meta.items() for x in kv)],
        )  # fmt: skip
        if counted:
            await ns.run(
                _INDEX, [ns.key("domains", tag=f"i:{_day_name(now)}")], [ttl, evaluation.policy_domain]
            )
    except StateError as exc:
        log.warning("dmarc report: not counted for %s: %s", evaluation.policy_domain, exc)


# --------------------------------------------------------------------------------------------
# Failure reports (RFC 9991)


def _redact(text: str) -> str:
    """One header value with every address's local part replaced, printable ASCII only."""
    return _ascii_line(_ADDRESS_IN_TEXT.sub("redacted@", text))


def _ascii_line(text: str) -> str:
    """One line of printable ASCII: white space runs become one space, anything else ``?``."""
    return "".join(c if " " <= c <= "~" else "?" for c in " ".join(text.split()))


def _failure_entry(tx: Transaction, evaluation: Evaluation, now: float) -> dict[str, Any]:
    lines: list[str] = []
    size = 0
    if tx.message is not None:
        for header in tx.message.headers:
            name = header.lname
            if name not in _FAILURE_HEADERS:
                continue
            if name in ("from", "sender", "reply-to", "to", "cc", "return-path"):
                addresses = [a for _, a in email.utils.getaddresses([header.value]) if "@" in a]
                value = ", ".join(_redact(a) for a in addresses) or "redacted"
            elif name == "message-id":
                value = _ascii_line(header.value)
            else:
                value = _redact(header.value)
            line = f"{header.name}: {value}"[:998]
            size += len(line) + 2
            if size > _MAX_HEADER_TEXT:
                break
            lines.append(line)
    row = evaluation.row
    sender = _redact(tx.sender) if tx.sender else ""
    return {
        "id": secrets.token_hex(8),
        "time": now,
        "ip": row.source_ip,
        "hf": row.header_from,
        "mf": sender,
        "disp": row.disposition,
        "dkim": [list(d) for d in row.dkim[:10]],
        "spf": list(row.spf) if row.spf else None,
        "headers": lines,
    }


@dataclass(frozen=True, slots=True)
class FailureReport:
    """One RFC 9991 failure report (an AFRF message, RFC 6591), built from a stored entry."""

    id: str
    arrival: float
    source_ip: str
    header_from: str
    mail_from: str  # redacted; "" for the null sender
    disposition: str
    dkim: tuple[tuple[str, str, str], ...]
    spf: tuple[str, str] | None
    headers: tuple[str, ...]

    @classmethod
    def from_json(cls, text: str) -> FailureReport | None:
        try:
            data = json.loads(text)
            return cls(
                id=_report_id(data["id"]),
                arrival=float(data["time"]),
                source_ip=str(ipaddress.ip_address(data["ip"])),
                header_from=_required_domain(data["hf"]),
                mail_from=_redact(_text(data["mf"], 320)),
                disposition=_one_of(data["disp"], ("none", "pass", *_DISPOSITIONS[1:])),
                dkim=tuple(_dkim_entry(item) for item in data["dkim"]),
                spf=None if data["spf"] is None else _spf_entry(data["spf"]),
                headers=tuple(_ascii_line(_text(h, 998)) for h in data["headers"]),
            )
        except (ValueError, TypeError, KeyError, IndexError):
            return None

    def message(self, *, sender: str, org_name: str, submitter: str, recipient: str, now: float) -> bytes:
        """The AFRF message to ``recipient``, CRLF line ends."""
        boundary = f"=_mxward_{hashlib.sha256(f'{self.id}{recipient}'.encode()).hexdigest()[:24]}"
        delivery = {"none": "delivered", "pass": "delivered", "quarantine": "spam", "reject": "reject"}
        results = [AuthResult("dmarc", "fail", properties=(("header.from", self.header_from),))]
        results += [
            AuthResult("dkim", r, properties=(("header.d", d), ("header.s", s))) for d, s, r in self.dkim
        ]
        if self.spf is not None:
            results.append(AuthResult("spf", self.spf[1], properties=(("smtp.mailfrom", self.spf[0]),)))
        feedback = [
            "Feedback-Type: auth-failure",
            "Version: 1",
            f"User-Agent: {_generator()}",
            "Auth-Failure: dmarc",
            build_header(submitter, results),
            "Identity-Alignment: dkim, spf",
            f"Original-Mail-From: <{self.mail_from}>",
            f"Arrival-Date: {email.utils.formatdate(self.arrival, usegmt=True)}",
            f"Source-IP: {self.source_ip}",
            f"Reported-Domain: {self.header_from}",
            f"Delivery-Result: {delivery.get(self.disposition, 'other')}",
        ]
        aligned = [
            (d, s)
            for d, s, r in self.dkim
            if r != "pass" and (d == self.header_from or self.header_from.endswith("." + d))
        ]
        if aligned:
            feedback += [
                f"DKIM-Domain: {aligned[0][0]}",
                f"DKIM-Identity: @{aligned[0][0]}",
                f"DKIM-Selector: {aligned[0][1]}",
            ]
        human = (
            f"This is a DMARC failure report (RFC 9991) from {org_name} for a message received\r\n"
            f"from {self.source_ip} on {email.utils.formatdate(self.arrival, usegmt=True)} with\r\n"
            f"From: domain {self.header_from}. Addresses are redacted; the body is not included.\r\n"
        )
        head = [
            f"From: {email.utils.formataddr((org_name, sender))}",
            f"Date: {email.utils.formatdate(now, usegmt=True)}",
            f"Subject: DMARC failure report for {self.header_from}",
            f"Message-ID: <failure.{self.id}@{submitter}>",
            "Auto-Submitted: auto-generated",
            *([f"To: <{recipient}>"] if recipient else []),
            "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=feedback-report;\r\n\tboundary="{boundary}"',
        ]
        parts = [
            "\r\n".join(head),
            "",
            "This is a MIME-formatted message.",
            "",
            f"--{boundary}",
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
            "",
            human,
            f"--{boundary}",
            "Content-Type: message/feedback-report",
            "Content-Transfer-Encoding: 7bit",
            "",
            "\r\n".join(feedback),
            "",
            f"--{boundary}",
            "Content-Type: text/rfc822-headers; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
            "",
            "\r\n".join(self.headers),
            "",
            f"--{boundary}--",
            "",
        ]
        return "\r\n".join(parts).encode("ascii", "replace")


def _dkim_entry(item: object) -> tuple[str, str, str]:
    if not isinstance(item, list) or len(item) != 3:
        raise ValueError("bad DKIM entry")
    return _required_domain(item[0]), _text(item[1], 63), _one_of(item[2], tuple(_DKIM_RESULTS))


def _spf_entry(item: object) -> tuple[str, str]:
    if not isinstance(item, list) or len(item) != 2:
        raise ValueError("bad SPF entry")
    return _required_domain(item[0]), _one_of(item[1], tuple(_SPF_RESULTS))


def _report_id(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16}", value):
        raise ValueError("bad failure report id")
    return value


# --------------------------------------------------------------------------------------------
# Aggregate reports (RFC 9990)


@dataclass(frozen=True, slots=True)
class PolicyPublished:
    """The ``policy_published`` element: the DMARC record of the policy domain."""

    domain: str
    p: str
    sp: str = ""
    np: str = ""
    adkim: str = ""
    aspf: str = ""
    discovery_method: str = ""
    fo: str = ""
    testing: str = ""

    @classmethod
    def from_record(
        cls, domain: str, tags: Mapping[str, str] | None, *, fallback_p: str, mode: str
    ) -> PolicyPublished:
        """From a parsed DMARC record (None: unknown, ``p`` is ``fallback_p``)."""
        tags = tags or {}

        def pick(name: str, allowed: Iterable[str]) -> str:
            value = tags.get(name, "").lower()
            return value if value in allowed else ""

        p = pick("p", _DISPOSITIONS) or (fallback_p if fallback_p in _DISPOSITIONS else "none")
        fo = tags.get("fo", "").replace(" ", "")
        return cls(
            domain=domain,
            p=p,
            sp=pick("sp", _DISPOSITIONS),
            np=pick("np", _DISPOSITIONS),
            adkim=pick("adkim", ("r", "s")),
            aspf=pick("aspf", ("r", "s")),
            discovery_method={"9989": "treewalk", "7489": "psl"}.get(mode, ""),
            fo=fo if _FO.fullmatch(fo) else "",
            testing=pick("t", ("y", "n")),
        )


def _generator() -> str:
    try:
        return f"mxward {version('mxward')}"
    except PackageNotFoundError:
        return "mxward"


@dataclass(frozen=True, slots=True)
class AggregateReport:
    """One aggregate report: one policy domain, one period, its rows with their counts."""

    org_name: str
    email: str
    submitter: str
    policy: PolicyPublished
    begin: int
    end: int  # exclusive; the report says end - 1, the last second of the period
    rows: tuple[tuple[Row, int], ...]

    @property
    def domain(self) -> str:
        return self.policy.domain

    @property
    def messages(self) -> int:
        return sum(count for _, count in self.rows)

    @property
    def report_id(self) -> str:
        """Stable and unique per submitter, domain and period: 32 hex digits."""
        seed = f"{self.submitter}\0{self.domain}\0{self.begin}\0{self.end}"
        return hashlib.sha256(seed.encode()).hexdigest()[:32]

    @property
    def filename(self) -> str:
        """``receiver!policy-domain!begin!end!unique-id.xml.gz`` (RFC 9990 section 3.5.2)."""
        return f"{self.submitter}!{self.domain}!{self.begin}!{self.end - 1}!{self.report_id}.xml.gz"

    def xml(self) -> bytes:
        """The report, UTF-8, valid against the RFC 9990 schema."""
        root = ET.Element(_q("feedback"))
        _sub(root, "version", "1.0")
        meta = _sub(root, "report_metadata")
        _sub(meta, "org_name", self.org_name)
        _sub(meta, "email", self.email)
        _sub(meta, "report_id", self.report_id)
        dates = _sub(meta, "date_range")
        _sub(dates, "begin", str(self.begin))
        _sub(dates, "end", str(self.end - 1))
        _sub(meta, "generator", _generator())
        published = _sub(root, "policy_published")
        policy = self.policy
        _sub(published, "domain", policy.domain)
        if policy.discovery_method:
            _sub(published, "discovery_method", policy.discovery_method)
        _sub(published, "p", policy.p)
        for name in ("sp", "np", "fo", "adkim", "aspf", "testing"):
            value = getattr(policy, name)
            if value:
                _sub(published, name, value)
        testing = policy.testing == "y"
        for row, count in self.rows:
            record = _sub(root, "record")
            xrow = _sub(record, "row")
            _sub(xrow, "source_ip", row.source_ip)
            _sub(xrow, "count", str(count))
            evaluated = _sub(xrow, "policy_evaluated")
            _sub(evaluated, "disposition", row.disposition)
            _sub(evaluated, "dkim", "pass" if row.dkim_aligned else "fail")
            _sub(evaluated, "spf", "pass" if row.spf_aligned else "fail")
            for kind, comment in row.reasons(testing):
                reason = _sub(evaluated, "reason")
                _sub(reason, "type", kind)
                if comment:
                    _sub(reason, "comment", comment)
            identifiers = _sub(record, "identifiers")
            _sub(identifiers, "header_from", row.header_from)
            _sub(identifiers, "envelope_from", row.envelope_from)
            if row.envelope_to:
                _sub(identifiers, "envelope_to", row.envelope_to)
            auth = _sub(record, "auth_results")
            for domain, selector, result in row.dkim:
                dkim = _sub(auth, "dkim")
                _sub(dkim, "domain", domain)
                _sub(dkim, "selector", selector)
                _sub(dkim, "result", result)
            if row.spf is not None:
                spf = _sub(auth, "spf")
                _sub(spf, "domain", row.spf[0])
                _sub(spf, "scope", "mfrom")
                _sub(spf, "result", row.spf[1])
        ET.indent(root)
        text: bytes = ET.tostring(
            root, encoding="utf-8", xml_declaration=True, default_namespace=XML_NAMESPACE
        )
        return text + b"\n"

    def compressed(self) -> bytes:
        """The XML compressed with gzip (no name, time 0: the same report gives the same bytes)."""
        return gzip.compress(self.xml(), mtime=0)

    def message(self, *, recipient: str, now: float, data: bytes | None = None) -> bytes:
        """The report mail to ``recipient`` (RFC 9990 section 3.5.2), CRLF line ends."""
        msg = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
        msg["From"] = Address(display_name=self.org_name, addr_spec=self.email)
        msg["To"] = recipient
        msg["Date"] = email.utils.formatdate(now, usegmt=True)
        msg["Subject"] = (
            f"Report Domain: {self.domain} Submitter: {self.submitter} Report-ID: <{self.report_id}>"
        )
        msg["Message-ID"] = f"<{self.report_id}@{self.submitter}>"
        msg["Auto-Submitted"] = "auto-generated"
        first, last = _utc(self.begin), _utc(self.end - 1)
        msg.set_content(
            f"This is a DMARC aggregate report (RFC 9990) from {self.org_name} for {self.domain}.\n"
            f"Reporting period: {first} to {last} UTC.\n"
            f"Records: {len(self.rows)}, messages: {self.messages}.\n"
            f"Report-ID: {self.report_id}\n",
            charset="utf-8",
            cte="7bit" if self.org_name.isascii() else "quoted-printable",
        )
        msg.add_attachment(
            data if data is not None else self.compressed(),
            maintype="application",
            subtype="gzip",
            filename=self.filename,
        )
        return msg.as_bytes()


def _q(name: str) -> str:
    return f"{{{XML_NAMESPACE}}}{name}"


def _sub(parent: ET.Element, name: str, text: str | None = None) -> ET.Element:
    element = ET.SubElement(parent, _q(name))
    if text is not None:
        element.text = _xml_text(text)
    return element


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _period_label(begin: int, end: int) -> str:
    """``2024-05-01 00:00-24:00 UTC``."""
    last = "24:00" if end % DAY == 0 else time.strftime("%H:%M", time.gmtime(end))
    return f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(begin))}-{last} UTC"


# --------------------------------------------------------------------------------------------
# Reading what was recorded, and sending


class Sender(Protocol):
    """Delivers one message (the reinjection smtpd); raises :class:`DeliveryError`."""

    async def send(self, sender: str, recipient: str, message: bytes) -> None: ...


@dataclass
class _Period:
    """What Redis holds for one policy domain and period."""

    rows: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    dropped: int = 0
    bad: int = 0


@dataclass
class _Tally:
    done: int = 0
    already: int = 0
    skipped: int = 0
    failed: int = 0


class Reporter:
    """Builds, lists, writes and sends the reports of what :func:`record_evaluation` counted."""

    def __init__(self, settings: ReportSettings, services: Services, *, out: Any = None) -> None:
        self.settings = settings
        self.services = services
        self.state: StateStore = services.state
        self.ns = services.state.namespace(NAMESPACE)
        self.dns = services.dns
        self.email = settings.address(services.hostname)
        self.submitter = settings.submitter(services.hostname)
        self.org_name = settings.organization(services.hostname)
        self.out = out if out is not None else sys.stdout
        self._records: dict[str, dict[str, str] | None] = {}
        declare_keys(services.state, settings)

    def _say(self, text: str) -> None:
        print(text, file=self.out)

    # -- reading ---------------------------------------------------------------------------

    async def domains(self, day: int) -> list[str]:
        """The policy domains with data on the UTC day starting at ``day``."""
        members = await self.ns.run(_SMEMBERS, [self.ns.key("domains", tag=f"i:{_day_name(day)}")])
        return sorted(d for d in members if isinstance(d, str) and _domain(d) == d)

    async def period(self, domain: str, begin: int, end: int) -> _Period:
        data = _Period()
        seen = -1.0
        tag = f"d:{domain}"
        for hour in range(begin, end, HOUR):
            rows, meta = await asyncio.gather(
                self.ns.hgetall(self.ns.key("r", _hour_name(hour), tag=tag)),
                self.ns.hgetall(self.ns.key("m", _hour_name(hour), tag=tag)),
            )
            for key, count in rows.items():
                try:
                    data.rows[key] = data.rows.get(key, 0) + int(count)
                except ValueError:
                    data.bad += 1
            with contextlib.suppress(ValueError):
                data.dropped += int(meta.get("dropped", "0"))
                when = float(meta.get("seen", "-1"))
                if when > seen:
                    seen, data.meta = when, meta
        return data

    async def report(self, domain: str, begin: int, end: int) -> AggregateReport | None:
        """The aggregate report of ``domain`` for the period; None if nothing was counted.

        Raises :class:`DnsTempError` when the policy must be looked up and DNS fails now.
        """
        return (await self._load(domain, begin, end))[0]

    async def _load(
        self, domain: str, begin: int, end: int, *, lookup: bool = True
    ) -> tuple[AggregateReport | None, _Period]:
        """The report and the data behind it; ``lookup=False`` skips DNS (the policy may be
        incomplete: for listings)."""
        data = await self.period(domain, begin, end)
        rows: list[tuple[Row, int]] = []
        for key, count in sorted(data.rows.items()):
            row = Row.from_key(key)
            if row is None or count <= 0:
                data.bad += 1
                continue
            rows.append((row, count))
        if data.bad:
            log.warning("dmarc report %s %s: %d malformed row(s) left out", domain, _utc(begin), data.bad)
        if data.dropped:
            log.warning(
                "dmarc report %s %s: %d message(s) not counted (more than %d distinct rows in an hour)",
                domain,
                _utc(begin),
                data.dropped,
                MAX_ROWS_PER_HOUR,
            )
        if not rows:
            return None, data
        tags = await self._record(domain, data.meta, published=True) if lookup else None
        policy = PolicyPublished.from_record(
            domain,
            tags,
            fallback_p=data.meta.get("p") or data.meta.get("policy", ""),
            mode=data.meta.get("mode", ""),
        )
        report = AggregateReport(
            org_name=self.org_name,
            email=self.email,
            submitter=self.submitter,
            policy=policy,
            begin=begin,
            end=end,
            rows=tuple(rows),
        )
        return report, data

    async def _record(
        self, domain: str, meta: Mapping[str, str], *, published: bool = False
    ) -> dict[str, str] | None:
        """The DMARC record seen by the check (with ``published``: or the policy its facts
        tell), else the one in DNS now (cached per run)."""
        stored = parse_dmarc_record(meta.get("record", ""))
        if stored is None and published:
            stored = parse_dmarc_record(meta.get("published", ""))
        if stored is not None:
            return stored
        if domain not in self._records:
            self._records[domain] = await _dmarc_tags(self.dns, domain)
        return self._records[domain]

    # -- the command -----------------------------------------------------------------------

    async def run(
        self,
        *,
        day: int | None = None,
        domain: str | None = None,
        directory: Path | None = None,
        sender: Sender | None = None,
        send: bool = False,
        dry_run: bool = False,
    ) -> int:
        """``mxward dmarc report``: list (default), write (``directory``) or send (``send``)."""
        now = self.services.clock.now()
        if day is not None:
            days = [day]
        else:
            first = _day_start(now - self.settings.retention - DAY)
            days = list(range(first, _day_start(now) + DAY, DAY))
        tally = _Tally()
        step = int(self.settings.period)
        for start in days:
            names = await self.domains(start)
            for name in names:
                if domain is not None and name != domain:
                    continue
                for begin in range(start, start + DAY, step):
                    end = begin + step
                    if begin > now:
                        break
                    await self._one(
                        domain=name, begin=begin, end=end, now=now, directory=directory,
                        sender=sender, send=send, dry_run=dry_run, tally=tally,
                    )  # fmt: skip
                if self.settings.failure_reports and (send or directory is not None):
                    await self._failures(
                        domain=name, day=start, now=now, directory=directory, sender=sender,
                        dry_run=dry_run, tally=tally,
                    )  # fmt: skip
        would = "to be " if dry_run else ""
        if send:
            self._say(
                f"{tally.done} report(s) {would}sent, {tally.already} already sent,"
                f" {tally.skipped} skipped, {tally.failed} failed"
            )
        elif directory is not None:
            self._say(f"{tally.done} report(s) {would}written, {tally.failed} failed")
        elif tally.done == 0:
            self._say("(no DMARC report data)")
        return 1 if tally.failed else 0

    async def _one(
        self,
        *,
        domain: str,
        begin: int,
        end: int,
        now: float,
        directory: Path | None,
        sender: Sender | None,
        send: bool,
        dry_run: bool,
        tally: _Tally,
    ) -> None:
        ended = end <= now
        label = f"{domain} {_period_label(begin, end)}"
        if not ended and (send or directory is not None):
            data = await self.period(domain, begin, end)
            if data.rows:
                self._say(f"{label}: period not ended yet (ends {_utc(end)} UTC)")
            return
        try:
            report, data = await self._load(domain, begin, end, lookup=send or directory is not None)
        except DnsTempError as exc:
            self._say(f"{label}: DMARC record lookup failed ({exc}); will try again")
            tally.failed += 1
            return
        if report is None:
            return
        summary = f"{len(report.rows)} record(s), {report.messages} message(s)"
        if directory is not None:
            path = directory / report.filename
            if dry_run:
                self._say(f"{label}: would write {path} ({summary})")
            else:
                try:
                    await asyncio.to_thread(_write_file, path, report.compressed())
                except OSError as exc:
                    self._say(f"{label}: cannot write {path}: {exc.strerror or exc}")
                    tally.failed += 1
                    return
                self._say(f"{label}: wrote {path} ({summary})")
            tally.done += 1
            return
        if not send:
            tally.done += 1
            sent = await self.ns.hgetall(self._sent_key(domain, begin, end))
            state = (
                "in progress" if not ended else ("sent to " + ", ".join(sorted(sent))) if sent else "not sent"
            )
            rua = " ".join(str(u) for u in parse_report_uris(data.meta.get("rua", ""))[0]) or "-"
            self._say(f"{label}: {summary}; rua {rua}; {state}")
            return
        await self._send_report(
            report=report, rua=data.meta.get("rua", ""), label=label, now=now, sender=sender,
            dry_run=dry_run, tally=tally,
        )  # fmt: skip

    def _sent_key(self, domain: str, begin: int, end: int) -> str:
        return self.ns.key("s", str(begin), str(end), tag=f"d:{domain}")

    async def _destinations(
        self, policy_domain: str, value: str, tag: str, label: str, tally: _Tally
    ) -> list[ReportURI] | None:
        """The verified destinations of a rua/ruf value; None after a temporary DNS failure."""
        uris, ignored = parse_report_uris(value)
        for text in ignored:
            self._say(f"{label}: {tag} {text[:100]!r} is not a usable mailto: URI; ignored")
        out: list[ReportURI] = []
        for uri in uris:
            try:
                allowed, note = await authorized_destinations(self.dns, policy_domain, uri, tag=tag)
            except DnsTempError as exc:
                self._say(f"{label}: cannot verify {uri} now ({exc}); will try again")
                tally.failed += 1
                return None
            if not allowed:
                self._say(f"{label}: not sending to {uri}: {note}")
                tally.skipped += 1
            out += [u for u in allowed if u not in out]
        return out

    async def _send_report(
        self,
        *,
        report: AggregateReport,
        rua: str,
        label: str,
        now: float,
        sender: Sender | None,
        dry_run: bool,
        tally: _Tally,
    ) -> None:
        destinations = await self._destinations(report.domain, rua, "rua", label, tally)
        if destinations is None:
            return
        if not destinations:
            self._say(f"{label}: no usable rua destination")
            return
        sent_key = self._sent_key(report.domain, report.begin, report.end)
        lock = self.ns.key("lock", f"{report.begin}:{report.end}", tag=f"d:{report.domain}")
        token = secrets.token_hex(8)
        if not dry_run and not await self.ns.run(_LOCK, [lock], [token, LOCK_TTL]):
            self._say(f"{label}: another node is sending this report now; skipped")
            tally.skipped += 1
            return
        try:
            sent = await self.ns.hgetall(sent_key)
            compressed = report.compressed()
            for uri in destinations:
                if str(uri) in sent:
                    tally.already += 1
                    continue
                message = report.message(recipient=uri.address, now=now, data=compressed)
                if len(message) > self.settings.max_size:
                    self._say(f"{label}: report is {len(message)} bytes, above max_size; not sent to {uri}")
                    tally.skipped += 1
                    continue
                if uri.limit is not None and len(message) > uri.limit:
                    self._say(
                        f"{label}: report is {len(message)} bytes, above the {uri.limit} bytes {uri} accepts"
                    )
                    tally.skipped += 1
                    continue
                if dry_run or sender is None:
                    self._say(f"{label}: would send to {uri} ({len(message)} bytes)")
                    tally.done += 1
                    continue
                try:
                    await sender.send(self.email, uri.address, message)
                except DeliveryError as exc:
                    self._say(f"{label}: sending to {uri} failed: {exc}; will try again")
                    tally.failed += 1
                    continue
                ttl = _keep_ttl(report.begin, now, self.settings.retention) + DAY
                await self.ns.hset(sent_key, {str(uri): now}, ttl)
                self._say(
                    f"{label}: sent to {uri} ({len(report.rows)} record(s), {report.messages} message(s))"
                )
                tally.done += 1
        finally:
            if not dry_run:
                await self.ns.run(_UNLOCK, [lock], [token])

    async def _failures(
        self,
        *,
        domain: str,
        day: int,
        now: float,
        directory: Path | None,
        sender: Sender | None,
        dry_run: bool,
        tally: _Tally,
    ) -> None:
        """Send (or write) the failure reports of ``domain`` stored on ``day``."""
        tag = f"d:{domain}"
        label = f"{domain} failure reports"
        for hour in range(day, min(day + DAY, int(now) + 1), HOUR):
            entries = await self.ns.run(_LRANGE, [self.ns.key("f", _hour_name(hour), tag=tag)])
            reports = [
                r for e in entries if isinstance(e, str) and (r := FailureReport.from_json(e)) and r.id
            ]
            if not reports:
                continue
            try:
                meta = (await self.period(domain, hour, hour + HOUR)).meta
                tags = await self._record(domain, meta)
            except DnsTempError as exc:
                self._say(f"{label}: DMARC record lookup failed ({exc}); will try again")
                tally.failed += 1
                return
            if tags is None or not tags.get("ruf"):
                continue
            if tags.get("psd", "").lower() == "y":
                continue  # RFC 9991 section 2: no failure reports for a public suffix's record
            fo = set(tags.get("fo", "0").replace(" ", "").split(":"))
            if not fo & {"0", "1"}:
                continue
            if directory is not None:
                for report in reports:
                    path = directory / f"{self.submitter}!{domain}!failure!{report.id}.eml"
                    message = report.message(
                        sender=self.email,
                        org_name=self.org_name,
                        submitter=self.submitter,
                        recipient="",
                        now=now,
                    )
                    if not dry_run:
                        try:
                            await asyncio.to_thread(_write_file, path, message)
                        except OSError as exc:
                            self._say(f"{label}: cannot write {path}: {exc.strerror or exc}")
                            tally.failed += 1
                            continue
                    self._say(f"{label}: {'would write' if dry_run else 'wrote'} {path}")
                    tally.done += 1
                continue
            destinations = await self._destinations(domain, tags["ruf"], "ruf", label, tally)
            if not destinations:
                continue
            sent_key = self.ns.key("fs", _hour_name(hour), tag=tag)
            lock = self.ns.key("lock", f"f{_hour_name(hour)}", tag=tag)
            token = secrets.token_hex(8)
            if not dry_run and not await self.ns.run(_LOCK, [lock], [token, LOCK_TTL]):
                tally.skipped += 1
                continue
            try:
                sent = await self.ns.hgetall(sent_key)
                for report in reports:
                    for uri in destinations:
                        mark = f"{report.id}|{uri}"
                        if mark in sent:
                            tally.already += 1
                            continue
                        message = report.message(
                            sender=self.email,
                            org_name=self.org_name,
                            submitter=self.submitter,
                            recipient=uri.address,
                            now=now,
                        )
                        if uri.limit is not None and len(message) > uri.limit:
                            tally.skipped += 1
                            continue
                        if dry_run or sender is None:
                            self._say(f"{label}: would send {report.id} to {uri}")
                            tally.done += 1
                            continue
                        try:
                            await sender.send(self.email, uri.address, message)
                        except DeliveryError as exc:
                            self._say(f"{label}: sending {report.id} to {uri} failed: {exc}; will try again")
                            tally.failed += 1
                            continue
                        await self.ns.hset(
                            sent_key, {mark: now}, _keep_ttl(hour, now, self.settings.retention) + DAY
                        )
                        self._say(f"{label}: sent {report.id} to {uri}")
                        tally.done += 1
            finally:
                if not dry_run:
                    await self.ns.run(_UNLOCK, [lock], [token])


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename), mode 0600."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Delivery through the reinjection smtpd


class ReinjectSender:
    """Mails reports through the filter's reinjection smtpd, one SMTP session per message."""

    def __init__(self, reinject: str, *, helo: str, timeout: float) -> None:
        from mxward.shared.config import parse_listen

        kind, host, port = parse_listen(reinject)
        if kind != "inet":
            raise ValueError("[filter] reinject must be host:port")
        self.host, self.port, self.helo, self.timeout = host, port, helo, timeout

    async def send(self, sender: str, recipient: str, message: bytes) -> None:
        from mxward.contentfilter.reinject import Downstream, DownstreamError

        downstream = Downstream(self.host, self.port, helo=self.helo, timeout=self.timeout)
        try:
            await downstream.connect()
            for line in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>"):
                reply = await downstream.command(line)
                if not reply.ok:
                    raise DeliveryError(f"{line.split(':')[0]} refused: {reply.relay()}")
            reply = await downstream.send_data(message)
            if not reply.ok:
                raise DeliveryError(f"message refused: {reply.relay()}")
        except DownstreamError as exc:
            raise DeliveryError(str(exc)) from None
        finally:
            await downstream.close()


# --------------------------------------------------------------------------------------------
# Command line


def _period_arg(text: str) -> int:
    if not _PERIOD_ARG.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2024-05-01")
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2024-05-01") from None


def _domain_arg(text: str) -> str:
    domain = _domain(text)
    if domain is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain name")
    return domain


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``mxward dmarc report``."""
    top = subparsers.add_parser(
        "dmarc",
        help="DMARC aggregate and failure reports",
        description="DMARC reports about the mail this cluster received (RFC 9990, RFC 9991).",
    )
    actions = top.add_subparsers(dest="action", metavar="ACTION", required=True)
    report = actions.add_parser(
        "report",
        help="list, write or send the aggregate reports of ended periods",
        description="Without --dir or --send: list the reports the state store holds data for.",
    )
    report.add_argument(
        "--period", type=_period_arg, metavar="YYYY-MM-DD", help="only the periods of this UTC day"
    )
    report.add_argument("--domain", type=_domain_arg, metavar="DOMAIN", help="only this policy domain")
    where = report.add_mutually_exclusive_group()
    where.add_argument("--dir", type=Path, metavar="PATH", help="write the report files (.xml.gz) there")
    where.add_argument(
        "--send", action="store_true", help="mail them to the rua addresses (through [filter] reinject)"
    )
    report.add_argument(
        "--dry-run", action="store_true", help="say what would be written or sent; do nothing"
    )


def _settings_of(config: Config) -> ReportSettings:
    """The ``[dmarc_reports]`` settings of ``config`` (the defaults until it has the table)."""
    value = getattr(config, "dmarc_reports", None)
    return value if isinstance(value, ReportSettings) else ReportSettings()


async def run_command(
    args: argparse.Namespace, config: Config, services: Services, *, settings: ReportSettings | None = None
) -> int:
    """Run ``mxward dmarc report``: 0 on success, 1 when something must be tried again, 2 for
    bad arguments."""
    if getattr(args, "action", "report") != "report":
        print(f"mxward dmarc: unknown action {args.action!r}", file=sys.stderr)
        return 2
    settings = settings if settings is not None else _settings_of(config)
    now = services.clock.now()
    if args.period is not None and args.period > now:
        print(f"mxward dmarc report: {_utc(args.period)[:10]} has not begun yet", file=sys.stderr)
        return 2
    directory: Path | None = args.dir
    if directory is not None and not await asyncio.to_thread(directory.is_dir):
        print(f"mxward dmarc report: {directory} is not a directory", file=sys.stderr)
        return 2
    sender: ReinjectSender | None = None
    if args.send and not args.dry_run:
        sender = ReinjectSender(
            config.filter.reinject, helo=services.hostname, timeout=config.filter.reinject_timeout
        )
    reporter = Reporter(settings, services)
    try:
        return await reporter.run(
            day=args.period,
            domain=args.domain,
            directory=directory,
            sender=sender,
            send=args.send,
            dry_run=args.dry_run,
        )
    except StateError as exc:
        print(f"mxward dmarc report: state store: {exc}", file=sys.stderr)
        return 1

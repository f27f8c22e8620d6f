"""arc: Authenticated Received Chain (RFC 8617): verify the chain of incoming mail, seal what we pass on.

Stage: content (the content filter, once per message). Sealing happens afterwards, in the
filter's outgoing step, over the message as it is delivered.

What and why
    A forwarder or mailing list that changes a message (a subject tag, a footer) breaks its DKIM
    signatures, and a forwarder's address breaks SPF, so the author domain's DMARC policy fails
    at the final receiver. ARC lets each intermediary record what it saw: an ARC set of three
    header fields with an instance number ``i=`` (1 for the first intermediary, then 2, 3 ...):

    ARC-Authentication-Results   a copy of the intermediary's Authentication-Results
    ARC-Message-Signature (AMS)  a DKIM-like signature over the message as it left
    ARC-Seal (AS)                a signature over all ARC sets so far, with ``cv=``: the
                                 chain's state as the intermediary received it (none for the
                                 first set, pass for the others)

    A receiver that trusts a sealer can believe the authentication results it recorded (the
    dmarc check's trusted sealers). This check verifies the chain and reports ``arc=pass``,
    ``arc=fail`` or ``arc=none`` (no ARC header at all) in Authentication-Results. A pass says
    only that the chain is intact: anyone can seal, so a pass from an unknown sealer is no
    sign of good mail, and a broken chain (a sealer whose own modification went wrong, an
    intermediary that rewrote ARC headers) is no proof of forgery; by default neither changes
    the message's fate much (``pass_score`` 0, ``fail_score`` 1).

Verification (RFC 8617 section 5.2)
    1. No ARC header field: ``none``. More than 50 sets (an instance outside 1..50), a field
       without a readable instance, or a field larger than 32 KiB: ``fail``.
    2. The newest ARC-Seal already says ``cv=fail``: ``fail`` (the chain was ended upstream).
    3. Structure (section 4.2): exactly one field of each kind per instance, instances 1..N
       without gaps, ``cv=none`` at instance 1 and ``cv=pass`` above it; else ``fail``.
    4.-6. Cryptography, by dkimpy (``dkim.ARC``): the newest AMS must verify, and every
       ARC-Seal; RSA-SHA256 only (RFC 8617 defines no other algorithm; dkimpy refuses
       others), keys of at least ``min_key_bits``; ``t=`` more than 10 hours ahead fails.
    The structure is checked by mxward before any DNS question is asked, so a malformed
    chain costs nothing. dkimpy asks for keys through a synchronous callback; mxward first
    collects the key names of every AMS and AS (``<s>._domainkey.<d>``), asks them of its
    resolver concurrently (the ``[dns]`` settings, cache and time limits), then runs dkimpy
    with a callback that answers from those results, so the event loop never waits on
    dkimpy's own resolver. A name dkimpy asks for that was not collected is fetched and the
    verification run again (at most twice more). For a large message with many sets
    (message bytes x sets above 1 MB) dkimpy runs in a worker thread, so the filter keeps
    serving other connections meanwhile. Malformed input of any kind gives ``fail`` with a
    reason, never an error.

    ``oldest-pass`` (section 5.2 step 5): walking down from the newest set, the lowest
    instance from which every AMS up to the newest still verifies: the hop after which
    nothing of the message was changed.

    DNS trouble (SERVFAIL, timeout) on a key the result depends on is our problem, not the
    sender's: the result is still written as ``arc=fail`` (RFC 8617 section 10.1 registers only
    none, pass and fail for ``arc``) with the reason ``temporary DNS failure``, but the verdict is
    ERROR with score 0 (``on_error = "tempfail"`` defers such mail, so Postfix retries), the
    fact ``arc.temperror`` is true and the message is not sealed (a seal would record
    ``cv=fail`` for good).

Authentication-Results
    ``arc=pass|fail|none`` with a reason for fail, ``smtp.remote-ip`` (the client that handed
    us the message) and, for pass, ``header.oldest-pass``: the two properties RFC 8617
    section 10.2 registers for ``arc``. Note the registry's meaning of oldest-pass: ``0``
    when every AMS verifies, else the lowest verifying instance (the fact ``arc.oldest_pass``
    below is 1 in the first case).

Sealing (RFC 8617 section 5.1)
    With ``seal = true`` and a key, mxward adds its own ARC set on top of each message it
    delivers inbound, after its own Authentication-Results field (and after the checks before
    arc in ``[filter] checks`` added theirs), so the next hop (a mailbox provider the mail is
    forwarded to) can see what mxward found. Not sealed: mail from an authenticated
    submitter or from ``internal_networks`` (outgoing mail: a DKIM signature serves there),
    mail without a known client address (local submission), mail whose verification did not
    finish (no ``arc.cv`` fact: the check failed, timed out or is in observe mode) or hit a
    temporary DNS failure, a chain whose newest seal says ``cv=fail`` (step 1: ended), and a
    chain that already has 50 sets. The new set gets ``i=N+1`` and the ``cv=`` this check
    found (none, pass or fail), and consists of

    ARC-Authentication-Results  ``i=N+1;`` and a copy of our Authentication-Results field:
                                the one whose authserv-id is ``authserv_id``, or with
                                ``authserv_id = ""`` the top-most one of the message, which
                                is the filter's own (it puts it on top); without one, the
                                message is not sealed
    ARC-Message-Signature       rsa-sha256, relaxed/relaxed, over the body and the fields in
                                ``seal_headers`` that the message has (each as often as it
                                occurs; From always)
    ARC-Seal                    rsa-sha256 over the ARC sets 1..N+1 in order; for
                                ``cv=fail`` over the new set alone (section 5.1.2)

    Ed25519 (``ed25519-sha256``) is not defined for ARC: RFC 8617 names no algorithm besides
    RSA-SHA256, dkimpy's verifier accepts rsa-sha256 only and Perl's Mail::DKIM ARC code has
    no Ed25519, so ``seal_algorithm`` accepts ``"rsa-sha256"`` alone. The key is a PEM RSA
    private key (PKCS#1 or PKCS#8, at least 1024 bits, 2048 recommended) read at start-up;
    its public half is published as ``<seal_selector>._domainkey.<seal_domain>`` like a DKIM
    key (``mxward dkim keygen`` makes both). Put arc after a DKIM signer in ``[filter]
    checks`` when both apply, so that the AMS covers the signature.

Options ([checks.arc]), besides enabled/timeout/on_error/mode:
    pass_score         float   0.0     added when the chain verifies (anyone can seal: no sign
                                       of good mail by itself)
    fail_score         float   1.0     added when it does not (not by itself a reason to
                                       reject); 0 on temporary DNS failures, always
    min_key_bits       int     1024    RSA keys shorter than this do not verify
    seal               bool    false   add our own ARC set to inbound mail we deliver
    seal_domain        string  ""      d= of our seal (required with seal = true)
    seal_selector      string  ""      s= of our seal (required with seal = true)
    seal_key_file      string  ""      PEM RSA private key file (required with seal = true)
    seal_algorithm     string  "rsa-sha256"
                                       the only algorithm ARC defines (see above)
    seal_headers       list    ["from", "to", "cc", "subject", "date", "message-id",
                                "reply-to", "in-reply-to", "references", "mime-version",
                                "content-type", "content-transfer-encoding",
                                "dkim-signature"]
                                       fields our ARC-Message-Signature covers (when present)
    authserv_id        string  ""      authserv-id of our Authentication-Results field to copy;
                                       "" = the top-most Authentication-Results field
    internal_networks  list    []      clients whose mail is outgoing (our submission hosts,
                                       relays): never sealed

Facts provided
    ``arc.cv``: pass | fail | none; ``arc.sealers``: the d= of each ARC-Seal, lower case,
    space-separated, in instance order (``?`` for one that is not a domain name);
    ``arc.oldest_pass``: the lowest instance from which every AMS up to the newest verifies,
    0 if the newest does not (or no chain); ``arc.aar``: the ARC-Authentication-Results of
    instance 1..N, unfolded, joined by `` | ``, at most 4096 characters;
    ``arc.instance``: the highest instance found (0: none); ``arc.temperror``: true when a
    temporary DNS failure decided the result. The seal reads these from the same message.

Log fields
    ``cv``, ``sets`` (N), ``sealers``, ``oldest_pass``, ``problem`` (why a chain failed),
    ``dns`` (``temperror`` when DNS failed).

Redis keys: none.

Failure behaviour
    A chain that cannot be read or verified is ``fail``, never an exception. DNS trouble:
    see above (verdict ERROR, score 0, not sealed). A seal key that cannot be read or is no
    RSA key of at least 1024 bits stops the filter at start-up with an error naming the file.
    Sealing never raises on message content; an internal failure there follows the check's
    ``on_error`` (ignore: delivered without our seal; tempfail: deferred).

RFCs: RFC 8617 (ARC: 4.1 header fields, 4.2 structure, 5.1 sealing, 5.1.2 cv=fail, 5.2
validation, 10.1 and 10.2 Authentication-Results result names and properties), RFC 6376
(DKIM: 3.2 tag lists, 3.4.2 relaxed canonicalisation, 3.5 signature tags, 3.6 key records),
RFC 8601 (Authentication-Results).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import dkim  # type: ignore[import-untyped]
from dkim.canonicalization import Relaxed  # type: ignore[import-untyped]
from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key  # type: ignore[import-untyped]

from mxward.contentfilter.message import Header, Message
from mxward.shared.authresults import FIELD_NAME, AuthResult, claims_authserv_id
from mxward.shared.dns import DnsError, DnsTempError, Resolver
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import Check, LogValue, Result, Services, Stage, Transaction, Verdict

__all__ = [
    "DEFAULT_SEAL_HEADERS",
    "MAX_SETS",
    "ArcCheck",
    "ArcField",
    "ArcKeyError",
    "Chain",
    "Options",
    "SealKey",
    "load_seal_key",
    "parse_tags",
    "read_chain",
]

log = logging.getLogger(__name__)

MAX_SETS: Final = 50
"""Most ARC sets a chain may have (RFC 8617 section 4.2.1: instances 1 to 50)."""
MAX_FIELD: Final = 32 * 1024
"""Bytes of one ARC header field that are read; a longer one makes the chain fail."""
MAX_AAR_FACT: Final = 4096
_THREAD_WORK: Final = 1_000_000  # message bytes x ARC sets above which dkimpy runs in a thread
_PASSES: Final = 3  # dkimpy runs at most: the first, and two more for keys it alone asked for

DEFAULT_SEAL_HEADERS: Final = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "dkim-signature",
)

_KINDS: Final = {
    "arc-authentication-results": "aar",
    "arc-message-signature": "ams",
    "arc-seal": "as",
}
_FIELD_NAMES: Final = {
    "aar": "ARC-Authentication-Results",
    "ams": "ARC-Message-Signature",
    "as": "ARC-Seal",
}
_SET_ORDER: Final = ("aar", "ams", "as")
_AAR_INSTANCE = re.compile(r"[ \t]*i[ \t]*=[ \t]*([0-9]{1,6})[ \t]*;")
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_INSTANCE = re.compile(r"[0-9]{1,6}")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_WHITESPACE = re.compile(r"\s+")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_LINE_END = re.compile(rb"\r?\n")


class _DebugOnly(logging.LoggerAdapter[logging.Logger]):
    """dkimpy logs every signature that does not verify as an error; here that is debug detail."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


_DKIMPY_LOG = _DebugOnly(logging.getLogger(f"{__name__}.dkimpy"), {})


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True, kw_only=True)
class Options:
    pass_score: float = 0.0
    fail_score: float = 1.0
    min_key_bits: int = 1024
    seal: bool = False
    seal_domain: str = ""
    seal_selector: str = ""
    seal_key_file: str = ""
    seal_algorithm: str = "rsa-sha256"
    seal_headers: tuple[str, ...] = DEFAULT_SEAL_HEADERS
    authserv_id: str = ""
    internal_networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 512 <= self.min_key_bits <= 16384:
            raise ValueError(f"min_key_bits {self.min_key_bits} must be between 512 and 16384")
        if self.seal_algorithm == "ed25519-sha256":
            raise ValueError(
                'seal_algorithm "ed25519-sha256" is not defined for ARC: RFC 8617 uses rsa-sha256'
                " only, and ARC verifiers (dkimpy, Mail::DKIM) reject other algorithms"
            )
        if self.seal_algorithm != "rsa-sha256":
            raise ValueError(f'seal_algorithm {self.seal_algorithm!r}: use "rsa-sha256"')
        for key in ("seal_domain", "seal_selector"):
            value = getattr(self, key)
            if value and _domain_or_mark(value) == "?":
                raise ValueError(f"{key} {value!r} is not a domain name")
        if self.seal and not (self.seal_domain and self.seal_selector and self.seal_key_file):
            raise ValueError("seal = true needs seal_domain, seal_selector and seal_key_file")
        for name in self.seal_headers:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"seal_headers: {name!r} is not a header field name")
            if name.lower() == "arc-seal":
                raise ValueError("seal_headers: an ARC-Message-Signature must not cover ARC-Seal")
        if self.authserv_id and not re.fullmatch(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+", self.authserv_id):
            raise ValueError(f"authserv_id {self.authserv_id!r} is not a host name or token")
        NetworkList(self.internal_networks)


# ---------------------------------------------------------------------------------------------
# Reading the chain (no DNS, no cryptography)


def parse_tags(text: str) -> dict[str, str]:
    """A DKIM tag list (RFC 6376 section 3.2) as a dict; ValueError when it is not one.

    Tag names are case-sensitive; values have their surrounding white space removed.
    """
    parts = text.split(";")
    if parts and not parts[-1].strip():
        parts.pop()
    tags: dict[str, str] = {}
    for part in parts:
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not _TAG_NAME.fullmatch(name):
            raise ValueError(f"not a tag=value pair: {_show(part.strip(), 40)!r}")
        if name in tags:
            raise ValueError(f"tag {name}= appears twice")
        tags[name] = value.strip()
    return tags


@dataclass(frozen=True, slots=True)
class ArcField:
    """One ARC header field: its kind (``aar``, ``ams``, ``as``), instance (0 when it has no
    readable one), the field, its tags (AMS and AS) and what was wrong with it."""

    kind: str
    instance: int
    header: Header
    tags: Mapping[str, str]
    error: str = ""

    @property
    def name(self) -> str:
        return _FIELD_NAMES[self.kind]


@dataclass(frozen=True, slots=True)
class Chain:
    """The ARC header fields of a message and what their structure says.

    ``problem`` says why the chain fails before any signature is looked at (RFC 8617 section
    5.2 steps 1-3), ``""`` when it does not; ``sets`` then holds each instance's three fields.
    ``highest`` is the highest instance read (0 without any); ``terminated`` is true when the
    newest ARC-Seal says ``cv=fail``.
    """

    fields: tuple[ArcField, ...]
    highest: int
    problem: str
    terminated: bool
    sets: Mapping[int, Mapping[str, ArcField]]

    def sealers(self) -> list[str]:
        """The d= of each ARC-Seal in instance order (then field order), lower case."""
        seals = sorted((f for f in self.fields if f.kind == "as"), key=lambda f: f.instance)
        return [_domain_or_mark(f.tags.get("d", "")) for f in seals]

    def aar_text(self) -> str:
        texts = sorted((f for f in self.fields if f.kind == "aar"), key=lambda f: f.instance)
        joined = " | ".join(_one_line(f.header.value) for f in texts)
        return joined if len(joined) <= MAX_AAR_FACT else joined[: MAX_AAR_FACT - 3] + "..."


def _read_field(header: Header, kind: str) -> ArcField:
    if len(header.raw) > MAX_FIELD:
        return ArcField(kind, 0, header, {}, f"longer than {MAX_FIELD} bytes")
    if kind == "aar":
        match = _AAR_INSTANCE.match(header.value)
        if match is None:
            return ArcField(kind, 0, header, {}, "does not start with i=<instance>;")
        return ArcField(kind, int(match.group(1)), header, {})
    try:
        tags = parse_tags(header.value)
    except ValueError as exc:
        return ArcField(kind, 0, header, {}, str(exc))
    instance = tags.get("i", "")
    if not _INSTANCE.fullmatch(instance):
        return ArcField(kind, 0, header, tags, "has no valid i= tag")
    return ArcField(kind, int(instance), header, tags)


def read_chain(message: Message) -> Chain:
    """The ARC header fields of ``message`` and the structural verdict on them."""
    fields = tuple(
        _read_field(header, kind)
        for header in message.headers
        if (kind := _KINDS.get(header.lname.strip())) is not None
    )
    instances = [f.instance for f in fields if f.instance]
    highest = max(instances, default=0)
    terminated = any(
        f.kind == "as" and f.instance == highest and f.tags.get("cv", "").lower() == "fail" for f in fields
    )
    sets: dict[int, dict[str, ArcField]] = {}
    problem = ""
    for f in fields:
        if f.error:
            problem = f"{f.name} {f.error}"
            break
        if not 1 <= f.instance <= MAX_SETS:
            problem = f"{f.name} i={f.instance} is outside 1..{MAX_SETS}"
            break
        found = sets.setdefault(f.instance, {})
        if f.kind in found:
            problem = f"{f.name} i={f.instance} appears twice"
            break
        found[f.kind] = f
    if fields and not problem and terminated:
        problem = f"the chain was ended upstream (ARC-Seal i={highest} says cv=fail)"
    if fields and not problem:
        for instance in range(1, highest + 1):
            found = sets.get(instance, {})
            absent = [_FIELD_NAMES[k] for k in _SET_ORDER if k not in found]
            if absent:
                problem = f"ARC set i={instance} has no {' and no '.join(absent)}"
                break
            cv = found["as"].tags.get("cv", "").lower()
            wanted = "none" if instance == 1 else "pass"
            if cv != wanted:
                problem = f"ARC-Seal i={instance} says cv={_show(cv, 20) or '(nothing)'}, not {wanted}"
                break
    return Chain(
        fields=fields,
        highest=highest,
        problem=problem,
        terminated=terminated,
        sets=sets if not problem else {},
    )


def key_name(selector: str, domain: str) -> str | None:
    """``<selector>._domainkey.<domain>`` in lower case, or None when either is no DNS name."""
    selector = selector.strip().lower().removesuffix(".")
    domain = domain.strip().lower().removesuffix(".")
    if not (_DOMAIN.fullmatch(selector) and _DOMAIN.fullmatch(domain)):
        return None
    name = f"{selector}._domainkey.{domain}"
    return name if len(name) <= 253 else None


def _domain_or_mark(value: str) -> str:
    value = value.strip().lower().removesuffix(".")
    return value if _DOMAIN.fullmatch(value) and len(value) <= 253 else "?"


def _one_line(text: str) -> str:
    return _NOT_PRINTABLE.sub("?", _WHITESPACE.sub(" ", text[: 2 * MAX_AAR_FACT]).strip())


def _show(text: str, limit: int) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Keys from our resolver, answered to dkimpy's synchronous callback


class _Keys:
    """TXT answers for key names, fetched ahead; ``lookup`` is dkimpy's ``dnsfunc``."""

    def __init__(self) -> None:
        self.records: dict[str, str | None] = {}
        self.failed: set[str] = set()
        self.missing: set[str] = set()
        self.temp_used = False

    async def fetch(self, dns: Resolver, names: Iterable[str]) -> None:
        todo = sorted({n for n in names if n not in self.records and n not in self.failed})
        if todo:
            await asyncio.gather(*(self._one(dns, name) for name in todo))

    async def _one(self, dns: Resolver, name: str) -> None:
        try:
            records = await dns.txt(name)
        except DnsTempError:
            self.failed.add(name)
            return
        except DnsError:
            records = []
        keys = [r for r in records if "p=" in r] or records
        self.records[name] = keys[0] if keys else None

    def lookup(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        try:
            text = name.decode("ascii").strip().lower().removesuffix(".")
        except (UnicodeDecodeError, AttributeError):
            return None
        if text in self.failed:
            self.temp_used = True
            raise dkim.DnsTimeoutError(f"temporary DNS failure for {text}")
        if text not in self.records:
            if _DOMAIN.fullmatch(text) and len(text) <= 253:
                self.missing.add(text)
            return None
        record = self.records[text]
        return None if record is None else record.encode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class _Outcome:
    cv: str
    reason: str = ""
    oldest_pass: int = 0
    temperror: bool = False


def _run_dkimpy(raw: bytes, keys: _Keys, min_key_bits: int) -> _Outcome:
    """dkimpy's chain validation; any exception on malformed input is a failed chain."""
    try:
        arc = dkim.ARC(raw, logger=_DKIMPY_LOG, minkey=min_key_bits)
        cv, data, why = arc.verify(dnsfunc=keys.lookup)
    except Exception as exc:
        log.debug("ARC verification stopped: %s: %s", type(exc).__name__, exc)
        return _Outcome("fail", f"ARC set cannot be verified ({type(exc).__name__})")
    oldest = 0
    for entry in sorted(data, key=lambda e: -int(e.get("instance", 0))):
        if not entry.get("ams-valid"):
            break
        oldest = int(entry["instance"])
    reason = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
    if cv == dkim.CV_Pass:
        return _Outcome("pass", oldest_pass=oldest)
    return _Outcome("fail", reason or "the chain did not verify", oldest)


# ---------------------------------------------------------------------------------------------
# Sealing


class ArcKeyError(ValueError):
    """The sealing key cannot be used (unreadable, not an RSA key, too short)."""


@dataclass(frozen=True, slots=True)
class SealKey:
    """A parsed RSA private key (dkimpy's form) and its size in bits."""

    key: Mapping[str, int]
    bits: int


def load_seal_key(path: str) -> SealKey:
    """Read a PEM RSA private key (PKCS#1 or PKCS#8) of at least 1024 bits."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1024 * 1024)
    except OSError as exc:
        raise ArcKeyError(f"seal_key_file {path}: cannot read it: {exc.strerror or exc}") from None
    try:
        key = parse_pem_private_key(data)
        bits = int(key["modulus"]).bit_length()
    except Exception as exc:
        raise ArcKeyError(f"seal_key_file {path}: not a PEM RSA private key ({exc})") from None
    if bits < 1024:
        raise ArcKeyError(
            f"seal_key_file {path}: the RSA key has {bits} bits; ARC verifiers need 1024 or more"
        )
    return SealKey(key=key, bits=bits)


def _split_field(text: str | bytes) -> tuple[bytes, bytes]:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    name, _, value = data.partition(b":")
    return name, value


def _signed_hash(fields: Sequence[tuple[bytes, bytes]], signature: str) -> Any:
    """SHA-256 over the fields and the signature field (its b= empty) in relaxed form."""
    digest = hashlib.sha256()
    for name, value in Relaxed.canonicalize_headers(list(fields)):
        digest.update(name + b":" + value)
    name, value = Relaxed.canonicalize_headers([_split_field(signature)])[0]
    digest.update(name + b":" + value.rstrip(b"\r\n"))
    return digest


def _bottom_up(fields: Sequence[tuple[bytes, bytes]], names: Sequence[str]) -> list[tuple[bytes, bytes]]:
    """The fields named in ``names``, each name taking the next instance from the bottom up
    (RFC 6376 section 5.4.2)."""
    chosen: list[tuple[bytes, bytes]] = []
    below: dict[str, int] = {}
    for name in names:
        index = below.get(name, len(fields))
        while index > 0:
            index -= 1
            if fields[index][0].strip().lower() == name.encode("ascii"):
                chosen.append(fields[index])
                break
        below[name] = index
    return chosen


def _fold_list(items: Sequence[str], sep: str, width: int = 70) -> str:
    lines: list[str] = []
    line = ""
    for number, item in enumerate(items):
        piece = item + (sep if number < len(items) - 1 else "")
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    lines.append(line)
    return "\r\n\t ".join(lines)


def _fold_b64(data: bytes) -> str:
    text = base64.b64encode(data).decode("ascii")
    return "\r\n\t ".join(text[i : i + 70] for i in range(0, len(text), 70))


def _relaxed_body(body: bytes) -> bytes:
    body = _LINE_END.sub(b"\r\n", body)
    return bytes(Relaxed.canonicalize_body(body))


# ---------------------------------------------------------------------------------------------
# The check


class ArcCheck(Check[Options]):
    name: ClassVar[str] = "arc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONTENT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = (
        "arc.cv",
        "arc.sealers",
        "arc.oldest_pass",
        "arc.aar",
        "arc.instance",
        "arc.temperror",
    )
    timeout: ClassVar[float] = 10.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._internal = NetworkList(options.internal_networks)
        self._seal_names = tuple(dict.fromkeys(name.lower() for name in options.seal_headers))
        self._key: SealKey | None = None

    async def start(self) -> None:
        if self.options.seal:
            self._key = load_seal_key(self.options.seal_key_file)

    # -- verifying ----------------------------------------------------------------------------

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        message = tx.message
        if message is None:
            return self.result(Verdict.SKIP, note="no message")
        chain = read_chain(message)
        if not chain.fields:
            outcome = _Outcome("none")
        elif chain.problem:
            outcome = _Outcome("fail", chain.problem)
        else:
            outcome = await self._verify(message, chain)
        return self._report(tx, chain, outcome)

    async def _verify(self, message: Message, chain: Chain) -> _Outcome:
        names = [
            name
            for f in chain.fields
            if f.kind in ("ams", "as") and (name := key_name(f.tags.get("s", ""), f.tags.get("d", "")))
        ]
        keys = _Keys()
        await keys.fetch(self.services.dns, names)
        threaded = len(message.raw) * max(chain.highest, 1) > _THREAD_WORK
        outcome = _Outcome("fail")
        for _ in range(_PASSES):
            keys.missing.clear()
            keys.temp_used = False
            if threaded:
                outcome = await asyncio.to_thread(_run_dkimpy, message.raw, keys, self.options.min_key_bits)
            else:
                outcome = _run_dkimpy(message.raw, keys, self.options.min_key_bits)
            if not keys.missing:
                break
            await keys.fetch(self.services.dns, keys.missing)
        if outcome.cv != "pass" and keys.temp_used:
            return dataclasses.replace(outcome, reason="temporary DNS failure", temperror=True)
        return outcome

    def _report(self, tx: Transaction, chain: Chain, outcome: _Outcome) -> Result:
        cv = outcome.cv
        sealers = " ".join(chain.sealers())
        facts: dict[str, LogValue] = {
            "arc.cv": cv,
            "arc.sealers": sealers,
            "arc.oldest_pass": outcome.oldest_pass,
            "arc.aar": chain.aar_text(),
            "arc.instance": chain.highest,
            "arc.temperror": outcome.temperror,
        }
        properties: list[tuple[str, str]] = []
        if tx.client_ip is not None:
            properties.append(("smtp.remote-ip", str(tx.client_ip)))
        if cv == "pass":
            oldest = 0 if outcome.oldest_pass <= 1 else outcome.oldest_pass
            properties.append(("header.oldest-pass", str(oldest)))
        auth = AuthResult("arc", cv, reason=outcome.reason, properties=tuple(properties))
        log_fields: dict[str, LogValue] = {"cv": cv, "sets": chain.highest}
        if sealers:
            log_fields["sealers"] = sealers
        if cv == "pass":
            log_fields["oldest_pass"] = outcome.oldest_pass
        if outcome.reason:
            log_fields["problem"] = outcome.reason
        if outcome.temperror:
            log_fields["dns"] = "temperror"
        if cv == "pass":
            verdict, score = Verdict.PASS, self.options.pass_score
        elif cv == "none":
            verdict, score = Verdict.SKIP, 0.0
        elif outcome.temperror:
            verdict, score = Verdict.ERROR, 0.0
        else:
            verdict, score = Verdict.FAIL, self.options.fail_score
        reason = "ARC chain did not verify" if cv == "fail" and score > 0 else ""
        return Result(
            check=self.name,
            verdict=verdict,
            score=score,
            reason=reason,
            log=log_fields,
            facts=facts,
            auth=(auth,),
        )

    # -- sealing ------------------------------------------------------------------------------

    async def outgoing(self, tx: Transaction, message: bytes) -> tuple[str, ...]:
        key = self._key
        if not self.options.seal or key is None:
            return ()
        why_not = self._why_not_seal(tx)
        if why_not:
            log.debug("queue=%s not sealed: %s", tx.queue_id, why_not)
            return ()
        parsed = Message.parse(message)
        chain = read_chain(parsed)
        plan = _plan(chain, tx.facts)
        if isinstance(plan, str):
            log.debug("queue=%s not sealed: %s", tx.queue_id, plan)
            return ()
        instance, cv = plan
        results = self._our_results(parsed)
        if results is None:
            log.warning("queue=%s not sealed: no Authentication-Results field to copy", tx.queue_id)
            return ()
        if len(message) > _THREAD_WORK:
            return await asyncio.to_thread(self._seal, parsed, chain, instance, cv, results, key)
        return self._seal(parsed, chain, instance, cv, results, key)

    def _why_not_seal(self, tx: Transaction) -> str:
        if tx.sasl_username:
            return "authenticated submission"
        if tx.client_ip is None:
            return "no client address"
        if tx.client_ip in self._internal:
            return "internal network"
        return ""

    def _our_results(self, message: Message) -> str | None:
        """The value of our Authentication-Results field, folding kept, or None."""
        wanted = FIELD_NAME.lower()
        for header in message.headers:
            if header.lname.strip() != wanted:
                continue
            if self.options.authserv_id and not claims_authserv_id(header.value, self.options.authserv_id):
                continue
            text = header.raw.decode("utf-8", "surrogateescape")
            value = text.partition(":")[2].lstrip(" \t").rstrip("\r\n")
            if not value.isascii() or "\0" in value:
                return None
            return value.replace("\r\n", "\n").replace("\n", "\r\n")
        return None

    def _seal(  # noqa: PLR0917 - the parts of one seal, computed together
        self, message: Message, chain: Chain, instance: int, cv: str, results: str, key: SealKey
    ) -> tuple[str, ...]:
        opts = self.options
        stamp = int(self.services.clock.now())
        domain, selector = opts.seal_domain.lower(), opts.seal_selector.lower()
        aar = f"ARC-Authentication-Results: i={instance}; {results}"

        fields = [_split_field(h.raw) for h in message.headers]
        present: dict[str, int] = {}
        for name, _ in fields:
            lname = name.strip().lower().decode("ascii", "replace")
            present[lname] = present.get(lname, 0) + 1
        signed: list[str] = []
        for wanted in self._seal_names:
            signed.extend([wanted] * max(present.get(wanted, 0), 1 if wanted == "from" else 0))
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(message.body)).digest()).decode("ascii")
        ams = (
            f"ARC-Message-Signature: i={instance}; a=rsa-sha256; c=relaxed/relaxed;\r\n"
            f"\td={domain}; s={selector}; t={stamp};\r\n"
            f"\th={_fold_list(signed, ':')};\r\n"
            f"\tbh={body_hash};\r\n"
            "\tb="
        )
        digest = _signed_hash(_bottom_up(fields, signed), ams)
        ams += _fold_b64(bytes(RSASSA_PKCS1_v1_5_sign(digest, key.key)))

        covered: list[tuple[bytes, bytes]] = []
        if cv != "fail":
            for number in range(1, instance):
                covered.extend(_split_field(chain.sets[number][k].header.raw) for k in _SET_ORDER)
        covered.extend((_split_field(aar), _split_field(ams)))
        seal = (
            f"ARC-Seal: i={instance}; a=rsa-sha256; t={stamp}; cv={cv};\r\n"
            f"\td={domain}; s={selector};\r\n"
            "\tb="
        )
        digest = _signed_hash(covered, seal)
        seal += _fold_b64(bytes(RSASSA_PKCS1_v1_5_sign(digest, key.key)))
        log.debug("sealed i=%d cv=%s", instance, cv)
        return (seal, ams, aar)


def _plan(chain: Chain, facts: Mapping[str, LogValue]) -> tuple[int, str] | str:
    """(instance, cv) of the set to add, or why none is added."""
    cv = facts.get("arc.cv")
    found = facts.get("arc.instance")
    if cv not in ("pass", "fail", "none") or not isinstance(found, int) or isinstance(found, bool):
        return "the chain was not verified"
    if facts.get("arc.temperror") is True:
        return "verification hit a temporary DNS failure"
    if found != chain.highest:
        return "the ARC header fields changed after verification"
    if chain.terminated:
        return "the chain was ended upstream (cv=fail)"
    if chain.highest >= MAX_SETS:
        return f"the chain has {MAX_SETS} sets already"
    if cv == "none":
        return (1, "none") if not chain.fields else "ARC fields but no verification result"
    if chain.highest == 0:
        return "no ARC set has a readable instance"
    if cv == "pass" and (chain.problem or not chain.sets):
        return "the chain's structure changed after verification"
    return chain.highest + 1, str(cv)

"""dkim: verify the DKIM signatures of every message, and sign the mail that is ours to sign.

Stage: content (the content filter, once per message); signing in the filter's outgoing step,
over the message as it leaves (after the filter's own header changes).

What and why
    DKIM (RFC 6376) lets a domain sign a message; a receiver that verifies the signature knows
    that the domain in ``d=`` took responsibility for it and that the signed header fields and
    the body arrived unchanged. DMARC builds on it (a pass for the From domain), and so does
    karma (a first-party pass is a good sign about the sending host). Spammers sign as well,
    and mailing lists break signatures by the thousand, so a single result is a small score,
    not a verdict: what matters is which domain passed, and that is a fact for the checks after
    this one.

Verifying
    Every DKIM-Signature field, top first, up to ``max_signatures``, is verified on its own
    (RSA-SHA256, Ed25519-SHA256 of RFC 8463, and RSA-SHA1, which RFC 8301 retired). The key
    records (``<s>._domainkey.<d>`` TXT) of all signatures are asked of mxward's resolver at
    the same time, within ``lookup_time``; parsed keys are kept (per selector, domain and
    record text) so a busy sender's key is parsed once. The message is read once for all
    signatures (from the filter's own parse of the header), and a body canonicalized and hashed
    the same way by several signatures is hashed once. dkimpy reads the signature and key tags
    and canonicalizes the header fields; the body canonicalization is a faster equivalent of
    dkimpy's, the RSA check is RFC 8017's RSASSA-PKCS1-v1_5 verification (exact signature
    length, whole encoded message compared) done by OpenSSL through ``cryptography`` (Python's
    arithmetic for the odd keys OpenSSL refuses), Ed25519 is PyNaCl's. The result of one
    signature:

    pass       the signature verified (rsa-sha1 only with ``allow_sha1``)
    fail       the body hash or the signature did not verify, or ``l=`` is longer than the body
    policy     an rsa-sha1 signature verified, but SHA-1 is not accepted (RFC 8301 section 3.1)
    neutral    the signature field cannot be read: not a tag list, a required tag missing,
               a bad value (``v``, ``a``, ``c``, ``q``, ``l``, base64, ``i=`` outside ``d=``),
               an unknown algorithm or canonicalization, expired (``x=``) or from the future
               (``t=``, more than 10 hours ahead)
    permerror  no key record (NXDOMAIN, no TXT), a key record that cannot be read, a revoked
               key (empty ``p=``), a key of the wrong type for ``a=``, a key whose ``h=``
               excludes the hash, a key limited to its exact domain (``t=s``) used for a
               subdomain ``i=``, a key not for e-mail (``s=``), an RSA key shorter than
               ``min_key_bits``, ``d=`` or ``s=`` that is no domain name, or ``h=`` without From
               (RFC 6376 section 6.1.1)
    temperror  the key could not be looked up now (SERVFAIL, timeout, out of ``lookup_time``)
    none       (the message) has no DKIM-Signature at all

    The message's result (``dkim.result``) is the best of its signatures: pass, then fail,
    policy, neutral and permerror (in that order), then temperror, then none. A signature whose
    key is in testing mode (``t=y``) is reported as it verified, but scores 0, since RFC 6376
    section 3.6.1 asks to treat such mail like unsigned mail.

Authentication-Results
    One ``dkim=`` entry per verified signature, in header order, with ``header.d``,
    ``header.s``, ``header.a`` and ``header.b`` (the first 8 characters of ``b=``, more when two
    signatures share them, RFC 6008), and a reason for everything but pass; ``dkim=none`` for an
    unsigned message.

Signing
    A message is ours to sign when it came from an authenticated submitter (the SASL user that
    policyd stored for the message, with ``sign_authenticated``), or from a client in
    ``sign_networks`` (then, when ``sign_domains`` is set, only if its From domain is one of
    them or below one). It is signed when its only From field names a domain of the key table
    ``keys``, or (``sign_subdomains``) a name below one: mail from ``a@sub.example.com`` is
    signed with ``example.com``'s keys and ``d=example.com``, which DMARC's relaxed alignment
    accepts. Every key of that domain signs (one DKIM-Signature each: RSA and Ed25519 side by
    side, as RFC 8463 suggests, or an old and a new key during a rollover). Signatures use
    relaxed/relaxed canonicalization and cover each field of ``sign_headers`` that is present,
    as many times as present; the fields of ``oversign_headers`` are named once more than they
    are present (RFC 6376 section 8.15), so nobody can add a second From, To, Subject or Date
    without breaking the signature. The field is the one dkimpy's signer writes (its tag
    order, folding and header hashing), with the private-key operation done by OpenSSL for RSA
    (a fraction of a millisecond instead of dkimpy's several, which would hold up the event
    loop) and PyNaCl for Ed25519. Which submitter may use which From address is Postfix's
    business (``reject_sender_login_mismatch``); this check signs what it is given. Messages
    whose header the filter could not read whole are not signed.

Keys
    The key table is a TOML array of tables::

        [[checks.dkim.keys]]
        domain = "example.com"
        selector = "rsa2024"
        key_file = "/etc/mxward/dkim/example.com.rsa2024.key"
        algorithm = "rsa-sha256"         # or "ed25519-sha256"

    ``mxward dkim keygen DOMAIN SELECTOR [--type rsa|ed25519]`` writes a key file and prints
    its DNS record (see :mod:`mxward.contentfilter.dkimkeys` for the file formats). Keys are
    read at start-up (and at every reload): a file that cannot be read, that other users may
    read, or that holds no key of the configured algorithm stops the start with a
    configuration error. Then, with ``check_published_keys``, the published record of each
    key is looked up and a WARNING logged when it is missing or does not match the private
    key (DNS trouble is logged too, and never stops the start).

Options ([checks.dkim]), besides enabled/timeout/on_error/mode:
    max_signatures        int       5       signatures verified per message (1..50); the
                                            rest are ignored
    min_key_bits          int       1024    shortest RSA key accepted (1024..8192, RFC 8301)
    allow_sha1            bool      false   count a verified rsa-sha1 signature as pass
                                            (else it is "policy")
    lookup_time           duration  "4s"    budget for the key lookups of one message (keep
                                            the check's timeout, 6s, above it)
    pass_score            float     -0.2    score when the best result is pass
    fail_score            float     1.0     ... fail
    policy_score          float     0.0     ... policy
    neutral_score         float     0.5     ... neutral
    permerror_score       float     0.5     ... permerror
    temperror_score       float     0.0     ... temperror (our DNS trouble: 0 or below)
    none_score            float     0.0     ... none (unsigned)
    keys                  list      []      the key table: tables of domain, selector,
                                            key_file (an absolute path) and algorithm
                                            ("rsa-sha256" or "ed25519-sha256")
    sign_authenticated    bool      true    sign mail of authenticated submitters
    sign_networks         list      []      sign mail from these client networks
    sign_domains          list      []      with sign_networks: only these From domains
                                            (and their subdomains); empty = any with a key
    sign_subdomains       bool      true    sign a subdomain's mail with its parent's keys
    sign_headers          list      RFC 6376 section 5.4.1's list: From, Sender, Reply-To,
                                    Subject, Date, Message-ID, To, Cc, MIME-Version,
                                    Content-Type, Content-Transfer-Encoding, Content-ID,
                                    Content-Description, Resent-Date, Resent-From,
                                    Resent-Sender, Resent-To, Resent-Cc, Resent-Message-ID,
                                    In-Reply-To, References, List-Id, List-Help,
                                    List-Unsubscribe, List-Subscribe, List-Post, List-Owner,
                                    List-Archive
                                            fields signed when present (From must be among
                                            them or in oversign_headers; Received,
                                            Return-Path, Bcc and the like cannot be)
    oversign_headers      list      ["From", "To", "Subject", "Date"]
                                            fields named once more than present
    check_published_keys  bool      true    compare the published key records with the keys
                                            at start-up and warn

Facts provided
    ``dkim.result``: the best result (above); ``dkim.pass_domains``: the ``d=`` domains of the
    passing signatures, lower case, space-separated, in header order (for DMARC and karma);
    ``dkim.results``: one ``domain:selector:result`` per verified signature, space-separated
    (a domain or selector that cannot be read is empty).

Log
    ``result``, ``signatures`` (how many there are), ``skipped`` (beyond ``max_signatures``),
    ``pass_domains``, ``details`` (``d/s=result: reason`` per signature that did not pass).

Failure behaviour
    Nothing in a message makes the check raise: a signature that cannot be read is neutral or
    permerror, never an error. DNS trouble gives temperror for the signatures concerned, with
    ``temperror_score`` (0, and no positive value is allowed): the sender is never scored down
    for our resolver. When the best result is temperror the verdict is ERROR, so
    ``on_error = "tempfail"`` defers such mail. The check itself never refuses a message; DMARC
    decides what a failure means. Signing never holds up mail on its own: a key that cannot
    sign raises, and the filter then follows ``on_error`` (``ignore``: the message goes
    unsigned, with a WARNING; ``tempfail``: it stays queued).
    Expiry (``x=``) and future timestamps (``t=``) are judged by the system clock.

Redis keys
    none.

RFCs: RFC 6376 (DKIM: 3.4 canonicalization, 3.5 the signature, 3.6 key records, 5.4 signed
fields, 6.1 verification, 8.15 oversigning), RFC 8301 (rsa-sha1, key sizes), RFC 8463
(Ed25519), RFC 8601 (Authentication-Results: 2.7.1 dkim results), RFC 6008 (header.b).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import TYPE_CHECKING, Any, ClassVar, Final

import dkim  # type: ignore[import-untyped]
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (  # type: ignore[import-untyped]
    CanonicalizationPolicy,
    InvalidCanonicalizationPolicyError,
)
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]

from mxward.contentfilter.dkimkeys import (
    Algorithm,
    DkimKeyError,
    PrivateKey,
    check_published,
    dns_name,
    domain_name,
    load_private_key,
    selector_name,
)
from mxward.contentfilter.message import Message
from mxward.shared.authresults import AuthResult
from mxward.shared.config import ConfigError
from mxward.shared.dns import DnsError, DnsTempError
from mxward.shared.matchers import DomainList
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import Check, LogValue, Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "RESULTS",
    "DkimCheck",
    "Options",
    "SigningKey",
    "canonical_body",
    "rsa_verify",
]

log = logging.getLogger("mxward.checks.dkim")

RESULTS: Final = ("pass", "fail", "policy", "neutral", "permerror", "temperror", "none")
_RANK: Final = {result: len(RESULTS) - index for index, result in enumerate(RESULTS)}

_SIGN_HEADERS: Final = (
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
# RFC 6376 section 5.4.1's fields that should not be signed (dkimpy refuses them).
_NEVER_SIGN: Final = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
_KEY_CACHE_SIZE: Final = 2048
_MAX_REASON: Final = 100
_MAX_DETAILS: Final = 600


@dataclass(frozen=True, kw_only=True)
class SigningKey:
    """One entry of the key table: sign ``domain``'s mail with ``key_file`` as ``selector``."""

    domain: str = ""
    selector: str = ""
    key_file: str = ""
    algorithm: Algorithm = "rsa-sha256"

    def __post_init__(self) -> None:
        if not self.domain or not self.selector or not self.key_file:
            raise ValueError("every key needs domain, selector and key_file")
        object.__setattr__(self, "domain", domain_name(self.domain))
        object.__setattr__(self, "selector", selector_name(self.selector))
        if not self.key_file.startswith("/"):
            raise ValueError(f"key_file {self.key_file!r} must be an absolute path")


@dataclass(frozen=True, kw_only=True)
class Options:
    max_signatures: int = 5
    min_key_bits: int = 1024
    allow_sha1: bool = False
    lookup_time: Duration = 4.0
    pass_score: float = -0.2
    fail_score: float = 1.0
    policy_score: float = 0.0
    neutral_score: float = 0.5
    permerror_score: float = 0.5
    temperror_score: float = 0.0
    none_score: float = 0.0
    keys: tuple[SigningKey, ...] = ()
    sign_authenticated: bool = True
    sign_networks: tuple[str, ...] = ()
    sign_domains: tuple[str, ...] = ()
    sign_subdomains: bool = True
    sign_headers: tuple[str, ...] = _SIGN_HEADERS
    oversign_headers: tuple[str, ...] = ("From", "To", "Subject", "Date")
    check_published_keys: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_signatures <= 50:
            raise ValueError("max_signatures must be from 1 to 50")
        if not 1024 <= self.min_key_bits <= 8192:
            raise ValueError("min_key_bits must be from 1024 (RFC 8301) to 8192")
        if not (math.isfinite(self.lookup_time) and 0 < self.lookup_time <= 60):
            raise ValueError("lookup_time must be more than 0 and at most 60 seconds")
        for result in RESULTS:
            if not math.isfinite(self.score(result)):
                raise ValueError(f"{result}_score must be a finite number")
        if self.temperror_score > 0:
            raise ValueError("temperror_score must not be above 0: our DNS trouble is not the sender's fault")
        NetworkList(self.sign_networks)
        DomainList(self.sign_domains)
        seen: set[tuple[str, str]] = set()
        for key in self.keys:
            if (key.domain, key.selector) in seen:
                raise ValueError(f"keys: selector {key.selector!r} of {key.domain} is listed twice")
            seen.add((key.domain, key.selector))
        for option in ("sign_headers", "oversign_headers"):
            for name in getattr(self, option):
                if not _FIELD_NAME.fullmatch(name):
                    raise ValueError(f"{option}: {name!r} is not a header field name")
                if name.lower() in _NEVER_SIGN:
                    raise ValueError(f"{option}: {name} must not be signed (RFC 6376 section 5.4.1)")
        if "from" not in {n.lower() for n in (*self.sign_headers, *self.oversign_headers)}:
            raise ValueError("sign_headers: From must be signed (RFC 6376 section 5.4)")

    def score(self, result: str) -> float:
        return float(getattr(self, f"{result}_score"))


# ---------------------------------------------------------------------------------------------
# The message as dkimpy reads it


_LINE_END = re.compile(rb"\r?\n")


def _crlf(data: bytes) -> bytes:
    """``data`` with every line ending in CRLF (what SMTP carries; a bare LF becomes CRLF)."""
    if b"\n" not in data or data.count(b"\n") == data.count(b"\r\n"):
        return data
    return _LINE_END.sub(b"\r\n", data)


class _View:
    """The message as DKIM reads it: header fields as (name, value) bytes with CRLF line ends,
    and the body, from the filter's own parse of the header.

    dkimpy's parser refuses a message with a line in its header that is no field; the filter's
    parser ends the header there (as Postfix does), so every check sees the same header.
    """

    __slots__ = ("body", "headers", "names")

    def __init__(self, message: Message) -> None:
        headers: list[tuple[bytes, bytes]] = []
        bare_lf = "bare-lf" in message.header_defects
        for header in message.headers:
            raw = header.raw
            colon = raw.index(b":")
            value = _crlf(raw[colon + 1 :]) if bare_lf else raw[colon + 1 :]
            if not value.endswith(b"\r\n"):
                value += b"\r\n"
            headers.append((raw[:colon], value))
        self.headers = headers
        self.names = [name.rstrip().lower() for name, _ in headers]
        self.body = _crlf(message.raw[message.body_offset :])

    def signatures(self) -> list[tuple[bytes, bytes]]:
        """The DKIM-Signature fields, top first."""
        return [h for h, name in zip(self.headers, self.names, strict=True) if name == b"dkim-signature"]

    def select(self, include: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
        """The fields ``h=`` names, each name taking the next instance from the bottom up
        (RFC 6376 section 5.4.2); a name with no instance left selects nothing."""
        names = self.names
        used: dict[bytes, int] = {}
        out = []
        for name in include:
            index = used.get(name, len(names))
            while index > 0:
                index -= 1
                if names[index] == name:
                    out.append(self.headers[index])
                    break
            used[name] = index
        return out


_TRAILING_WSP = re.compile(rb"[ \t]+(?=\r\n)")
_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")
_FINAL_CRLFS = re.compile(rb"(?:\n\r)*")


def canonical_body(body: bytes, relaxed: bool) -> bytes:
    """The body in the ``simple`` or ``relaxed`` canonical form (RFC 6376 section 3.4.3, 3.4.4).

    ``body`` has CRLF line ends. The same bytes as dkimpy's canonicalization, in fewer passes
    over the body (only the white space that changes is rewritten).
    """
    if relaxed:
        if b" \r\n" in body or b"\t\r\n" in body:
            body = _TRAILING_WSP.sub(b"", body)
        if b"\t" in body or b"  " in body:
            body = _WSP_RUN.sub(b" ", body)
    kept = body.rstrip(b"\r\n")
    tail = body[len(kept) :]
    # The empty lines at the end go: the final run of CRLF pairs (read backwards, "\n\r" pairs).
    run = _FINAL_CRLFS.match(tail[::-1])
    end = len(body) - (run.end() if run else 0)
    canon = body[:end] + b"\r\n"
    if relaxed and canon == b"\r\n":
        return b""
    return canon


class _Bodies:
    """Body hashes of one message, each computed once: per canonicalization, hash and ``l=``."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._canonical: dict[bool, bytes] = {}
        self._digests: dict[tuple[bool, str, int | None], bytes] = {}

    def digest(self, relaxed: bool, hash_name: str, length: int | None) -> bytes | None:
        """The hash of the canonical body (its first ``length`` bytes); None if it is shorter."""
        key = (relaxed, hash_name, length)
        found = self._digests.get(key)
        if found is not None:
            return found
        canon = self._canonical.get(relaxed)
        if canon is None:
            canon = self._canonical[relaxed] = canonical_body(self._body, relaxed)
        if length is not None:
            if length > len(canon):
                return None
            canon = canon[:length]
        digest = self._digests[key] = hashlib.new(hash_name, canon).digest()
        return digest


# ---------------------------------------------------------------------------------------------
# Keys from DNS


@dataclass(frozen=True, slots=True)
class _PublicKey:
    """A parsed key record: what dkimpy verifies with, and the record's limits."""

    pk: Any
    bits: int
    kind: str  # "rsa" | "ed25519"
    hashes: frozenset[str] | None  # the key's h= (None: any)
    strict: bool  # t=s: i= must be in d= itself
    testing: bool  # t=y
    revoked: bool = False


def _parse_key(name: str, record: str) -> _PublicKey | str:
    """A key record's key, or why it cannot be used."""
    data = record.encode("utf-8", "replace")
    try:
        tags = parse_tag_value(data)
    except (InvalidTagValueList, ValueError):
        return "key record is not a tag list"
    public = tags.get(b"p")
    if public is None:
        return "key record has no p= tag"
    if not b"".join(public.split()):
        return _PublicKey(None, 0, "", None, strict=False, testing=False, revoked=True)
    services = {s.strip() for s in tags.get(b"s", b"*").split(b":")}
    if not services & {b"*", b"email"}:
        return "key is not for e-mail (s=)"
    # dkimpy reads s= itself and gives no key for a list of service types: leave it out.
    plain = b"; ".join(k + b"=" + v for k, v in tags.items() if k != b"s")
    try:
        pk, bits, kind, _ = dkim.evaluate_pk(name, plain)
    except (dkim.DKIMException, ValueError, TypeError, IndexError, KeyError, binascii.Error) as exc:
        return f"key record cannot be read: {_clean(str(exc))}"
    if pk is None:
        return "key record cannot be read"
    hashes = None
    if b"h" in tags:
        hashes = frozenset(h.strip().decode("ascii", "replace").lower() for h in tags[b"h"].split(b":"))
    flags = {f.strip().lower() for f in tags.get(b"t", b"").split(b":")}
    return _PublicKey(
        pk,
        int(bits),
        kind.decode("ascii"),
        hashes,
        strict=b"s" in flags,
        testing=b"y" in flags,
    )


class _KeyCache:
    """Parsed key records by (selector, domain, record text), the least recently used going first."""

    def __init__(self, size: int = _KEY_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[str, str, str], _PublicKey | str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, selector: str, domain: str, record: str) -> _PublicKey | str:
        key = (selector, domain, record)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            return found
        parsed = self._entries[key] = _parse_key(dns_name(selector, domain), record)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return parsed


# ---------------------------------------------------------------------------------------------
# One signature


@dataclass(slots=True)
class _Signature:
    index: int
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b: str = ""
    result: str = ""
    reason: str = ""
    testing: bool = False
    tags: dict[bytes, bytes] = field(default_factory=dict)
    include: list[bytes] = field(default_factory=list)
    header: tuple[bytes, bytes] = (b"", b"")
    key_name: str = ""

    def done(self, result: str, reason: str = "") -> None:
        self.result, self.reason = result, reason

    @property
    def entry(self) -> str:
        return f"{_fact_word(self.domain)}:{_fact_word(self.selector)}:{self.result}"


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


_NOT_FACT = re.compile(r"[^a-z0-9._-]")


def _fact_word(text: str) -> str:
    return _NOT_FACT.sub("?", text.lower())[:253]


def _clean(text: str) -> str:
    """A dkimpy message without the bytes of the message it quotes."""
    text = re.sub(r"b'(\w+)'", r"\1", text).split(" (", 1)[0]
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:_MAX_REASON]


def _lenient_tags(value: bytes) -> dict[bytes, bytes]:
    """d=, s=, a= and b= of a signature field that dkimpy could not read, where they can be found."""
    found: dict[bytes, bytes] = {}
    for part in value.split(b";"):
        tag, eq, rest = part.partition(b"=")
        tag = tag.strip()
        if eq and tag in (b"d", b"s", b"a", b"b") and tag not in found:
            found[tag] = b"".join(rest.split())
    return found


def _header_b(signatures: Sequence[_Signature]) -> dict[int, str]:
    """header.b per signature: 8 characters of b=, more until it differs from the others'."""
    out: dict[int, str] = {}
    for sig in signatures:
        if not sig.b:
            continue
        size = 8
        others = [o.b for o in signatures if o is not sig and o.b and o.b != sig.b]
        while size < len(sig.b) and any(o.startswith(sig.b[:size]) for o in others):
            size += 1
        out[sig.index] = sig.b[: min(size, 128)]
    return out


def _header_digest(view: _View, sig: _Signature, policy: Any, hash_name: str) -> bytes:
    """The hash of the signed header fields and the signature field with b= empty (RFC 6376
    section 3.7).

    As dkimpy does, ``h=`` naming From is read as naming it once more: a second From field
    added above the signed one (the one mail programs show) then breaks the signature.
    """
    include = [*sig.include, b"from"] if b"from" in sig.include else sig.include
    hasher = hashlib.new(hash_name)
    for name, value in policy.canonicalize_headers(view.select(include)):
        hasher.update(name + b":" + value)
    name, value = sig.header
    ((name, value),) = policy.canonicalize_headers([(name, dkim.RE_BTAG.sub(b"\\1", value))])
    hasher.update(name + b":" + value.rstrip())
    return hasher.digest()


# DigestInfo DER prefixes of RFC 8017 section 9.2, note 1.
_DIGEST_INFO: Final = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
}


_HASHES: Final = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}  # noqa: S303 (rsa-sha1 is still verified)


@functools.lru_cache(maxsize=_KEY_CACHE_SIZE)
def _openssl_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    """The key as OpenSSL's, or None for numbers OpenSSL refuses or limits (an even or tiny
    exponent, one over 64 bits, an even modulus, one over 16384 bits); those few are checked
    in Python, so that every key record gives the same result as before."""
    if not (3 <= exponent < modulus and exponent & modulus & 1) or exponent.bit_length() > 64:
        return None
    if modulus.bit_length() > 16384:
        return None
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        return None


def rsa_verify(digest: bytes, hash_name: str, signature: bytes, modulus: int, exponent: int) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 section 8.2.2) of a precomputed digest.

    The signature must be exactly as long as the modulus; the whole encoded message is
    compared with the expected one, never parsed. OpenSSL (through ``cryptography``) does
    the RSA operation and the comparison, which it makes the same way; keys it cannot take
    are checked with Python's own arithmetic.
    """
    size = (modulus.bit_length() + 7) // 8
    if len(signature) != size:
        return False
    number = int.from_bytes(signature, "big")
    if number >= modulus:
        return False
    info = _DIGEST_INFO[hash_name] + digest
    if size < len(info) + 11:
        return False
    algorithm = _HASHES[hash_name]
    key = _openssl_key(modulus, exponent) if len(digest) == algorithm.digest_size else None
    if key is not None:
        try:
            key.verify(signature, digest, padding.PKCS1v15(), Prehashed(algorithm))
        except InvalidSignature:
            return False
        return True
    expected = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
    return hmac.compare_digest(pow(number, exponent, modulus).to_bytes(size, "big"), expected)


# ---------------------------------------------------------------------------------------------
# Signing


@dataclass(frozen=True, slots=True)
class _Signer:
    domain: str
    selector: str
    key: PrivateKey


_RELAXED: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_FIELD: Final = b"DKIM-Signature"


def _fold(value: bytes) -> bytes:
    """A DKIM-Signature value folded as dkimpy folds it (lines of at most 72 characters)."""
    folded: bytes = dkim.fold(value, namelen=len(_FIELD), linesep=b"\r\n")
    return folded


def _signature_field(
    signer: _Signer,
    headers: Sequence[tuple[bytes, bytes]],
    include: Sequence[bytes],
    body_hash: bytes,
    now: bytes,
) -> str:
    """The DKIM-Signature field (name and value, no final CRLF), as dkimpy's signer writes it.

    ``headers`` are the message's fields in relaxed canonical form. The tags come in dkimpy's
    order, folded by dkimpy's rule; ``b=`` starts as a placeholder long enough to be folded
    onto a line of its own, so putting the signature in its place leaves the signed part of
    the field as it was hashed. dkimpy selects and hashes the fields; the private-key
    operation is :meth:`PrivateKey.sign_digest` (OpenSSL for RSA, PyNaCl for Ed25519).
    """
    domain = signer.domain.encode("ascii")
    tags = [
        (b"v", b"1"),
        (b"a", signer.key.algorithm.encode("ascii")),
        (b"c", b"relaxed/relaxed"),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", signer.selector.encode("ascii")),
        (b"t", now),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),
    ]
    value = _fold(b"; ".join(b"=".join(tag) for tag in tags))
    unsigned = (_FIELD, b" " + dkim.RE_BTAG.sub(b"\\1", value))
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, _RELAXED, headers, include, unsigned, None)
    tags[-1] = (b"b", base64.b64encode(signer.key.sign_digest(hasher.digest())))
    value = _fold(b"; ".join(b"=".join(tag) for tag in tags) + b"\r\n")
    return (_FIELD + b": " + value).decode("ascii").rstrip("\r\n")


def _from_domain(message: Message) -> str | None:
    """The domain of the only From field's (first) address, as a signing domain, or None."""
    if message.count("from") != 1:
        return None
    value = message.get("from") or ""
    if len(value) > 4000:
        return None
    try:
        pairs = getaddresses([value])
    except (ValueError, IndexError, TypeError):
        return None
    for _, address in pairs:
        local, at, domain = address.rpartition("@")
        if at and local:
            try:
                return domain_name(domain)
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------------------
# The check


_VERDICTS: Final = {"pass": Verdict.PASS, "none": Verdict.SKIP, "temperror": Verdict.ERROR}


class DkimCheck(Check[Options]):
    name: ClassVar[str] = "dkim"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONTENT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("dkim.result", "dkim.pass_domains", "dkim.results")
    timeout: ClassVar[float] = 6.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._keys = _KeyCache()
        self._signers: dict[str, tuple[_Signer, ...]] = {}
        self._paths: dict[tuple[str, str], str] = {}
        self._networks = NetworkList(options.sign_networks)
        self._sign_domains = DomainList(options.sign_domains) if options.sign_domains else None
        oversign = {name.lower() for name in options.oversign_headers}
        names = dict.fromkeys(n.lower() for n in (*options.sign_headers, *options.oversign_headers))
        self._sign_list = tuple((name, name in oversign) for name in names)

    # -- start-up: the key table ---------------------------------------------------------------

    async def start(self) -> None:
        signers: dict[str, list[_Signer]] = {}
        for entry in self.options.keys:
            try:
                key = load_private_key(entry.key_file)
            except DkimKeyError as exc:
                raise ConfigError(f"[checks.dkim] keys: {exc}") from None
            if key.algorithm != entry.algorithm:
                raise ConfigError(
                    f"[checks.dkim] keys: {entry.key_file} holds an {key.kind} key, "
                    f"but the entry for {entry.selector}._domainkey.{entry.domain} says {entry.algorithm}"
                )
            if key.kind == "rsa" and key.bits < 2048:
                log.warning(
                    "key %s: a %d-bit RSA key; RFC 8301 asks signers for 2048 bits or more",
                    entry.key_file,
                    key.bits,
                )
            signers.setdefault(entry.domain, []).append(_Signer(entry.domain, entry.selector, key))
            self._paths[entry.domain, entry.selector] = entry.key_file
        self._signers = {domain: tuple(keys) for domain, keys in signers.items()}
        if self._signers and self.options.check_published_keys:
            await self._check_published()

    async def _check_published(self) -> None:
        """Warn about every key whose DNS record is missing or differs (never fails the start)."""
        signers = [s for keys in self._signers.values() for s in keys]
        try:
            async with asyncio.timeout(self.options.lookup_time):
                problems = await asyncio.gather(
                    *(check_published(self.services.dns, s.selector, s.domain, s.key) for s in signers)
                )
        except TimeoutError:
            log.warning("could not check the published DKIM keys within %gs", self.options.lookup_time)
            return
        for signer, problem in zip(signers, problems, strict=True):
            if problem:
                log.warning(
                    "DKIM key %s (%s, %s): %s; receivers cannot verify its signatures",
                    dns_name(signer.selector, signer.domain),
                    signer.key.kind,
                    self._paths.get((signer.domain, signer.selector), "?"),
                    problem,
                )

    # -- verifying --------------------------------------------------------------------------

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        message = tx.message
        if message is None:
            return self.result(Verdict.SKIP, note="no message")
        view = _View(message) if message.count("dkim-signature") else None
        fields = view.signatures() if view is not None else []
        if view is None or not fields:
            return Result(
                check=self.name,
                verdict=Verdict.SKIP,
                score=self.options.none_score,
                log={"result": "none"},
                facts={"dkim.result": "none", "dkim.pass_domains": "", "dkim.results": ""},
                auth=(AuthResult("dkim", "none"),),
            )
        signatures = [
            self._prepare(index, header) for index, header in enumerate(fields[: self.options.max_signatures])
        ]
        records = await self._fetch({s.key_name for s in signatures if not s.result})
        bodies = _Bodies(view.body)
        for sig in signatures:
            if not sig.result:
                self._verify(view, sig, records.get(sig.key_name), bodies)
        return self._report(signatures, len(fields))

    def _prepare(self, index: int, header: tuple[bytes, bytes]) -> _Signature:
        """Read one DKIM-Signature field; one that cannot be verified gets its result here."""
        sig = _Signature(index, header=header)
        try:
            tags = parse_tag_value(header[1])
        except (InvalidTagValueList, ValueError) as exc:
            loose = _lenient_tags(header[1])
            sig.domain, sig.selector = _text(loose.get(b"d")).lower(), _text(loose.get(b"s")).lower()
            sig.algorithm, sig.b = _text(loose.get(b"a")).lower(), _text(loose.get(b"b"))
            sig.done("neutral", f"not a tag list ({_clean(str(exc))})" if str(exc) else "not a tag list")
            return sig
        sig.tags = tags
        sig.domain = _text(tags.get(b"d")).lower()
        sig.selector = _text(tags.get(b"s")).lower()
        sig.algorithm = _text(tags.get(b"a")).lower()
        sig.b = "".join(_text(tags.get(b"b")).split())
        try:
            dkim.validate_signature_fields(tags)
        except (dkim.DKIMException, ValueError, TypeError, IndexError, KeyError) as exc:
            sig.done("neutral", _clean(str(exc)) or "malformed signature")
            return sig
        sig.include = [name.lower() for name in re.split(rb"\s*:\s*", tags[b"h"].strip())]
        try:
            CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError:
            sig.done("neutral", "unknown canonicalization (c=)")
            return sig
        if b"l" in tags and not tags[b"l"]:
            sig.done("neutral", "l= value is empty")
            return sig
        if b"from" not in sig.include:
            sig.done("permerror", "From is not signed (h=)")
            return sig
        try:
            sig.selector, sig.domain = selector_name(sig.selector), domain_name(sig.domain)
            sig.key_name = dns_name(sig.selector, sig.domain)
        except ValueError:
            sig.done("permerror", "d= or s= is not a domain name")
        return sig

    async def _fetch(self, names: Iterable[str]) -> dict[str, list[str] | BaseException]:
        """The TXT records at ``names``, asked at the same time; an exception where none came."""
        dns = self.services.dns
        names = list(names)
        out: dict[str, list[str] | BaseException] = {}
        if all(dns.is_cached(name, "TXT") for name in names):
            # All answered at once: a task per question would cost more than it saves.
            for name in names:
                try:
                    out[name] = await dns.txt(name)
                except DnsError as exc:
                    out[name] = exc
            return out
        tasks = {name: asyncio.ensure_future(dns.txt(name)) for name in names}
        _, pending = await asyncio.wait(tasks.values(), timeout=self.options.lookup_time)
        for task in pending:
            task.cancel()
        for name, task in tasks.items():
            if task in pending:
                out[name] = DnsTempError("no answer within lookup_time", reason="timeout")
            elif task.exception() is not None:
                out[name] = task.exception()  # type: ignore[assignment]
            else:
                out[name] = task.result()
        return out

    def _verify(
        self, view: _View, sig: _Signature, answer: list[str] | BaseException | None, bodies: _Bodies
    ) -> None:
        if isinstance(answer, DnsTempError):
            sig.done("temperror", f"key lookup failed ({answer.reason})")
            return
        if answer is None or isinstance(answer, BaseException):
            if answer is not None and not isinstance(answer, DnsError):
                log.warning("key lookup %s failed: %s: %s", sig.key_name, type(answer).__name__, answer)
            sig.done("permerror", "key cannot be looked up")
            return
        if not answer:
            sig.done("permerror", "no key for signature")
            return
        key: _PublicKey | str = "no key for signature"
        for record in answer:
            parsed = self._keys.get(sig.selector, sig.domain, record)
            if isinstance(parsed, _PublicKey):
                key = parsed
                break
            if key == "no key for signature":
                key = parsed
        if isinstance(key, str):
            sig.done("permerror", key)
            return
        sig.testing = key.testing
        problem = self._key_problem(sig, key)
        if problem:
            sig.done("permerror", problem)
            return
        self._check_signature(view, sig, key, bodies)

    def _key_problem(self, sig: _Signature, key: _PublicKey) -> str:
        if key.revoked:
            return "key revoked (empty p=)"
        wanted = "ed25519" if sig.algorithm == "ed25519-sha256" else "rsa"
        if key.kind != wanted:
            return f"key type {key.kind} does not match a={sig.algorithm}"
        hash_name = sig.algorithm.rpartition("-")[2]
        if key.hashes is not None and hash_name not in key.hashes:
            return f"key does not allow {hash_name} (h=)"
        if key.strict:
            identity = _text(sig.tags.get(b"i", b"@" + sig.domain.encode())).rpartition("@")[2].lower()
            if identity != sig.domain:
                return "key allows no subdomain in i= (t=s)"
        if key.kind == "rsa" and key.bits < self.options.min_key_bits:
            return f"key too short ({key.bits} bits)"
        return ""

    def _check_signature(self, view: _View, sig: _Signature, key: _PublicKey, bodies: _Bodies) -> None:
        tags = sig.tags
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        relaxed = policy.body_algorithm.name == b"relaxed"
        hash_name = sig.algorithm.rpartition("-")[2]
        length = int(tags[b"l"]) if b"l" in tags else None
        digest = bodies.digest(relaxed, hash_name, length)
        if digest is None:
            sig.done("fail", "l= is longer than the body")
            return
        try:
            expected = base64.b64decode(b"".join(tags[b"bh"].split()), validate=True)
        except (binascii.Error, ValueError):
            sig.done("neutral", "bh= value is not valid base64")
            return
        if digest != expected:
            sig.done("fail", "body hash did not verify")
            return
        try:
            signature = base64.b64decode(b"".join(tags[b"b"].split()), validate=True)
        except (binascii.Error, ValueError):
            sig.done("neutral", "b= value is not valid base64")
            return
        digest = _header_digest(view, sig, policy, hash_name)
        if key.kind == "ed25519":
            try:
                key.pk.verify(digest, signature)
                valid = True
            except (nacl.exceptions.CryptoError, ValueError, TypeError):
                valid = False
        else:
            valid = rsa_verify(digest, hash_name, signature, key.pk["modulus"], key.pk["publicExponent"])
        if not valid:
            sig.done("fail", "signature did not verify")
        elif sig.algorithm == "rsa-sha1" and not self.options.allow_sha1:
            sig.done("policy", "rsa-sha1 is not accepted (RFC 8301)")
        else:
            sig.done("pass")

    def _report(self, signatures: list[_Signature], total: int) -> Result:
        best = max(signatures, key=lambda s: _RANK[s.result])
        pass_domains = [s.domain for s in signatures if s.result == "pass"]
        bs = _header_b(signatures)
        auth = []
        for sig in signatures:
            properties = [("header.d", sig.domain), ("header.s", sig.selector)]
            if sig.algorithm:
                properties.append(("header.a", sig.algorithm))
            if sig.index in bs:
                properties.append(("header.b", bs[sig.index]))
            reason = "" if sig.result == "pass" else sig.reason
            if sig.testing:
                reason = f"{reason}; key in testing mode (t=y)" if reason else "key in testing mode (t=y)"
            auth.append(AuthResult("dkim", sig.result, reason, tuple(properties)))
        logged: dict[str, LogValue] = {"result": best.result, "signatures": total}
        if total > len(signatures):
            logged["skipped"] = total - len(signatures)
        if pass_domains:
            logged["pass_domains"] = " ".join(dict.fromkeys(pass_domains))
        details = "; ".join(
            f"{s.domain or '?'}/{s.selector or '?'}={s.result}: {s.reason}" for s in signatures if s.reason
        )
        if details:
            logged["details"] = details[:_MAX_DETAILS]
        score = 0.0 if best.testing else self.options.score(best.result)
        reason = "" if best.result == "pass" else f"DKIM {best.result}: {best.reason}"
        return Result(
            check=self.name,
            verdict=_VERDICTS.get(best.result, Verdict.FAIL),
            score=score,
            reason=reason,
            log=logged,
            facts={
                "dkim.result": best.result,
                "dkim.pass_domains": " ".join(_fact_word(d) for d in dict.fromkeys(pass_domains)),
                "dkim.results": " ".join(s.entry for s in signatures),
            },
            auth=tuple(auth),
        )

    # -- signing ----------------------------------------------------------------------------

    async def outgoing(self, tx: Transaction, message: bytes) -> tuple[str, ...]:
        if not self._signers:
            return ()
        by_login = bool(tx.sasl_username) and self.options.sign_authenticated
        by_network = tx.client_ip is not None and tx.client_ip in self._networks
        if not (by_login or by_network):
            return ()
        parsed = Message.parse(message)
        domain = _from_domain(parsed)
        if domain is None:
            log.info("queue=%s not signed: no single From address with a domain", tx.queue_id)
            return ()
        if not by_login and self._sign_domains is not None and not self._sign_domains.matches(domain):
            return ()
        signers = self.signers_for(domain)
        if not signers:
            return ()
        if {"malformed-header-line", "header-too-large"} & set(parsed.header_defects):
            log.warning("queue=%s not signed: the header could not be read whole", tx.queue_id)
            return ()
        return self.sign(parsed, signers)

    def signers_for(self, domain: str) -> tuple[_Signer, ...]:
        """The keys that sign mail from ``domain``: its own, else (sign_subdomains) a parent's."""
        name = domain
        while True:
            found = self._signers.get(name)
            if found:
                return found
            if not self.options.sign_subdomains:
                return ()
            _, dot, parent = name.partition(".")
            if not dot or "." not in parent:
                return ()
            name = parent

    def header_list(self, message: Message) -> list[bytes]:
        """The h= list: each field to sign as often as present, oversigned ones once more."""
        names: list[bytes] = []
        for name, oversign in self._sign_list:
            times = message.count(name) + (1 if oversign else 0)
            names.extend([name.encode("ascii")] * times)
        return names

    def sign(
        self, message: Message, signers: Sequence[_Signer], timestamp: int | None = None
    ) -> tuple[str, ...]:
        """One DKIM-Signature field per signer, each over ``message`` as it is, made at
        ``timestamp`` (``t=``, seconds since the epoch; now when None)."""
        include = self.header_list(message)
        if b"from" not in include:
            raise ValueError("the message has no From field to sign")
        view = _View(message)
        headers = _RELAXED.canonicalize_headers(view.headers)
        body_hash = base64.b64encode(hashlib.sha256(canonical_body(view.body, relaxed=True)).digest())
        now = str(int(time.time()) if timestamp is None else timestamp).encode("ascii")
        return tuple(_signature_field(signer, headers, include, body_hash, now) for signer in signers)

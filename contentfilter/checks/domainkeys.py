"""domainkeys: verify the historic DomainKey-Signature (RFC 4870), for the record only.

Stage: content (the content filter, once per message).

What and why
    DomainKeys was Yahoo!'s signature scheme before DKIM; RFC 4870 documents it and RFC 4871
    (DKIM) replaced it in 2007. A few old senders and appliances still add a
    ``DomainKey-Signature``; dkimpy dropped support for it, so mxward verifies it itself.
    The result is written to Authentication-Results as ``domainkeys=`` (RFC 8601 keeps the
    method registered) for people and tools that read it, and that is all: the check is off by
    default (add ``"domainkeys"`` to ``[filter] checks`` to run it), its scores are small, and
    its results NEVER count for DMARC, which knows only DKIM (RFC 7489 section 4.1, RFC 9989):
    the dmarc check reads ``dkim.*`` facts, never ``domainkeys.*``.

Verifying one signature (RFC 4870 section 3.4)
    Tags (section 3.3): ``a=`` rsa-sha1 (the default and the only algorithm), ``b=`` the
    signature (base64), ``c=`` simple (default) or nofws, ``d=`` the signing domain, ``h=``
    the signed header fields (optional), ``q=`` dns (default, the only query method), ``s=``
    the selector. The key is the TXT record ``<s>._domainkey.<d>`` (section 3.2.3): ``k=rsa``
    (default), ``p=`` the public key (empty: revoked), ``g=`` granularity (a local part,
    ``*`` once as wildcard; absent or empty: any), ``t=y`` testing.

    The sending address is the first address of Sender when the message has one, else of
    From (section 3.2). Its domain must be ``d=`` or a subdomain of it, its local part must
    match ``g=``, and the field it came from must be signed.

    Signed data: every header field below the signature (those named in ``h=`` when it is
    given, every occurrence, in message order), then the empty line and the body, with all
    empty lines at the end left out. ``simple`` takes the lines as they are; ``nofws``
    removes every space, tab and stray CR or LF from each line and unfolds header fields
    (section 3.4.2). SHA-1 over that, then RSA (PKCS#1 v1.5) with dkimpy's RSA code, which
    mxward uses for DKIM already (no further dependency).

Results (RFC 8601 section 2.7.1's words, as for DKIM), each with ``header.d`` and
``header.from`` or ``header.sender`` (the sending address and the field it came from):
    none       no DomainKey-Signature
    pass       the signature verifies
    fail       it does not (altered in transit, or forged)
    neutral    the signature cannot be processed (malformed, unknown algorithm,
               canonicalisation or query method), or it failed with a key in testing mode
               (``t=y``: the domain asks that such failures not count)
    policy     the signature is not acceptable for this sender: ``d=`` is not the sending
               domain or a parent of it, ``g=`` does not cover the local part, or the Sender
               or From field is not signed
    permerror  no sending address, no key record, a revoked, malformed, non-RSA or too
               short key
    temperror  the key could not be fetched now (SERVFAIL, timeout): never scored
    A pass with a testing key stays pass (the reason says ``testing mode``).

    Up to ``max_signatures`` signatures are verified, top first, each one A-R entry; the
    verdict and score follow the best result (pass, fail, policy, neutral, permerror,
    temperror, none in that order).

Options ([checks.domainkeys]), besides enabled/timeout/on_error/mode:
    max_signatures   int     3       signatures verified per message (the rest are ignored)
    min_key_bits     int     1024    shorter RSA keys give permerror
    pass_score       float   0.0     added for pass
    fail_score       float   1.0     added for fail
    neutral_score    float   0.0     added for neutral
    policy_score     float   0.0     added for policy
    permerror_score  float   0.0     added for permerror

Facts provided
    ``domainkeys.result``: the best result (as above); ``domainkeys.pass_domains``: the d=
    of passing signatures, lower case, space-separated. For information only: no built-in
    check reads them, and DMARC never does.

Log fields
    ``result``, ``results`` (``domain:selector:result`` per signature, space-separated).

Redis keys: none.

Failure behaviour
    Malformed signatures, keys and messages give a result word, never an exception. DNS
    trouble is ``temperror``: verdict ERROR, score 0 (never the sender's fault). Without a
    message the verdict is skip.

RFCs: RFC 4870 (DomainKeys: 3.2 keys and sender, 3.3 tags, 3.4 verification, 3.4.2
canonicalisation), RFC 8601 (Authentication-Results: 2.7.1 result words; domainkeys
properties header.d, header.from, header.sender), RFC 8017 (RSASSA-PKCS1-v1_5).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import math
import re
from dataclasses import dataclass
from email.utils import getaddresses
from typing import Any, ClassVar, Final

from dkim.crypto import (  # type: ignore[import-untyped]
    DigestTooLargeError,
    RSASSA_PKCS1_v1_5_verify,
    parse_public_key,
)

from mxward.contentfilter.checks.arc import key_name, parse_tags
from mxward.contentfilter.message import Message
from mxward.shared.authresults import AuthResult
from mxward.shared.dns import DnsError, DnsTempError, Resolver
from mxward.shared.plugin import Check, LogValue, Result, Stage, Transaction, Verdict

__all__ = ["FIELD", "RESULTS", "DomainkeysCheck", "Options", "SignatureResult", "canonical_data"]

FIELD: Final = "DomainKey-Signature"
RESULTS: Final = ("pass", "fail", "policy", "neutral", "permerror", "temperror", "none")
"""Result words, best first (the order that picks the message's verdict)."""

_VERDICTS: Final = {
    "pass": Verdict.PASS,
    "fail": Verdict.FAIL,
    "policy": Verdict.FAIL,
    "permerror": Verdict.FAIL,
    "neutral": Verdict.SKIP,
    "none": Verdict.SKIP,
    "temperror": Verdict.ERROR,
}
_NOFWS = re.compile(rb"[ \t\r\n]")
_LINE_END = re.compile(rb"\r?\n")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_WSP = re.compile(r"\s+")


@dataclass(frozen=True, kw_only=True)
class Options:
    max_signatures: int = 3
    min_key_bits: int = 1024
    pass_score: float = 0.0
    fail_score: float = 1.0
    neutral_score: float = 0.0
    policy_score: float = 0.0
    permerror_score: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_signatures <= 20:
            raise ValueError(f"max_signatures {self.max_signatures} must be between 1 and 20")
        if not 512 <= self.min_key_bits <= 16384:
            raise ValueError(f"min_key_bits {self.min_key_bits} must be between 512 and 16384")
        for result in ("pass", "fail", "neutral", "policy", "permerror"):
            if not math.isfinite(self.score(result)):
                raise ValueError(f"{result}_score must be a finite number")

    def score(self, result: str) -> float:
        """The configured score of a result word (temperror and none: 0)."""
        return float(getattr(self, f"{result}_score", 0.0))


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """What one DomainKey-Signature came to."""

    result: str
    reason: str = ""
    domain: str = ""
    selector: str = ""
    identity: str = ""  # the sending address
    identity_field: str = ""  # "from" or "sender"
    testing: bool = False


@dataclass(frozen=True, slots=True)
class _Identity:
    address: str
    local: str
    domain: str
    field: str  # "from" | "sender"
    index: int  # of the header field it came from


@dataclass(frozen=True, slots=True)
class _Signature:
    """A parsed signature, or the result that ends its verification early."""

    index: int
    tags: dict[str, str]
    key: str  # the key's DNS name
    done: SignatureResult | None = None


def canonical_data(message: Message, index: int, signed: frozenset[str] | None, method: str) -> bytes:
    """The data a DomainKey-Signature at header position ``index`` covers (RFC 4870 3.4.2).

    ``signed``: the lower-case names of ``h=``, None without ``h=``; ``method``: simple or nofws.
    """
    nofws = method == "nofws"
    out = bytearray()
    for header in message.headers[index + 1 :]:
        if signed is not None and header.lname.strip() not in signed:
            continue
        if nofws:
            out += _NOFWS.sub(b"", header.raw) + b"\r\n"
        else:
            out += _LINE_END.sub(b"\r\n", header.raw.rstrip(b"\r\n")) + b"\r\n"
    lines = _LINE_END.sub(b"\r\n", message.body).split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()  # the body's last line end, not a line
    lines.insert(0, b"")  # the empty line between the header and the body
    if nofws:
        lines = [_NOFWS.sub(b"", line) for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    for line in lines:
        out += line + b"\r\n"
    return bytes(out)


def _identity(message: Message) -> _Identity | None:
    """The sending address: the first of Sender, or else of From (RFC 4870 section 3.2)."""
    for name in ("sender", "from"):
        found = message.indexes(name)
        if not found:
            continue
        value = message.headers[found[0]].value
        for _, address in getaddresses([value[:4096]]):
            local, at, domain = address.rpartition("@")
            if at and local and domain:
                domain = domain.strip().lower().removesuffix(".")
                return _Identity(f"{local}@{domain}", local, domain, name, found[0])
        return None  # the field is there but holds no address: no fallback to From
    return None


def _granularity_matches(pattern: str, local: str) -> bool:
    """Whether the key's g= (one ``*`` wildcard at most) covers the local part."""
    pattern = pattern.strip()
    if pattern in ("", "*"):
        return True
    begins, star, ends = pattern.partition("*")
    if not star:
        return local == pattern
    return len(local) >= len(begins) + len(ends) and local.startswith(begins) and local.endswith(ends)


class DomainkeysCheck(Check[Options]):
    name: ClassVar[str] = "domainkeys"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONTENT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("domainkeys.result", "domainkeys.pass_domains")
    timeout: ClassVar[float] = 8.0

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        message = tx.message
        if message is None:
            return self.result(Verdict.SKIP, note="no message")
        indexes = message.indexes(FIELD)[: self.options.max_signatures]
        if not indexes:
            return self._report([])
        identity = _identity(message)
        parsed = [self._parse(message, index, identity) for index in indexes]
        keys = await _fetch_keys(self.services.dns, {p.key for p in parsed if p.done is None})
        results = [p.done or self._verify(message, p, identity, keys[p.key]) for p in parsed]
        return self._report(results)

    def _parse(self, message: Message, index: int, identity: _Identity | None) -> _Signature:
        header = message.headers[index]

        def early(result: str, reason: str, tags: dict[str, str] | None = None) -> _Signature:
            tags = tags or {}
            return _Signature(index, tags, "", self._done(result, reason, tags, identity))

        try:
            tags = parse_tags(header.value)
        except ValueError as exc:
            return early("neutral", f"malformed signature: {exc}")
        for required in ("b", "d", "s"):
            if not tags.get(required):
                return early("neutral", f"signature has no {required}= tag", tags)
        if tags.get("a", "rsa-sha1").lower() != "rsa-sha1":
            return early("neutral", f"unknown algorithm a={_show(tags['a'])}", tags)
        if tags.get("q", "dns").lower() != "dns":
            return early("neutral", f"unknown query method q={_show(tags['q'])}", tags)
        if tags.get("c", "simple").lower() not in ("simple", "nofws"):
            return early("neutral", f"unknown canonicalization c={_show(tags['c'])}", tags)
        if not _is_base64(tags["b"]):
            return early("neutral", "b= is not base64", tags)
        name = key_name(tags["s"], tags["d"])
        if name is None:
            return early("neutral", "d= or s= is not a domain name", tags)
        if identity is None:
            return early("permerror", "no sending address in Sender or From", tags)
        domain = tags["d"].strip().lower().removesuffix(".")
        if identity.domain != domain and not identity.domain.endswith("." + domain):
            return early("policy", f"d={domain} is not the sender's domain", tags)
        if identity.index < index or not _signs(tags, identity.field):
            return early("policy", f"the {identity.field.title()} field is not signed", tags)
        return _Signature(index, tags, name)

    def _verify(
        self, message: Message, sig: _Signature, identity: _Identity | None, key: str | DnsError | None
    ) -> SignatureResult:
        tags = sig.tags
        if isinstance(key, DnsError):
            return self._done("temperror", "key not available now (DNS)", tags, identity)
        if key is None:
            return self._done("permerror", "no key record", tags, identity)
        try:
            record = parse_tags(key)
        except ValueError as exc:
            return self._done("permerror", f"malformed key record: {exc}", tags, identity)
        testing = "y" in (flag.strip().lower() for flag in record.get("t", "").split(":"))
        if record.get("k", "rsa").lower() != "rsa":
            return self._done("permerror", "key is not an RSA key", tags, identity, testing)
        encoded = _WSP.sub("", record.get("p", ""))
        if not encoded:
            return self._done("permerror", "key revoked", tags, identity, testing)
        try:
            public = parse_public_key(base64.b64decode(encoded, validate=True))
            bits = int(public["modulus"]).bit_length()
        except Exception:
            return self._done("permerror", "malformed public key", tags, identity, testing)
        if bits < self.options.min_key_bits:
            return self._done("permerror", f"key too short ({bits} bits)", tags, identity, testing)
        if identity is None or not _granularity_matches(record.get("g", "*"), identity.local):
            return self._done("policy", "key's g= does not cover the sender", tags, identity, testing)
        signature = base64.b64decode(_WSP.sub("", tags["b"]))
        h = tags.get("h")
        signed = None if h is None else frozenset(n.strip().lower() for n in h.split(":") if n.strip())
        data = canonical_data(message, sig.index, signed, tags.get("c", "simple").lower())
        try:
            valid = bool(RSASSA_PKCS1_v1_5_verify(hashlib.sha1(data), signature, public))  # noqa: S324 - RFC 4870 defines SHA-1 only
        except DigestTooLargeError:
            return self._done("permerror", "key too short for SHA-1", tags, identity, testing)
        except Exception:
            valid = False
        if valid:
            return self._done("pass", "testing mode" if testing else "", tags, identity, testing)
        if testing:
            return self._done(
                "neutral", "signature did not verify (key in testing mode)", tags, identity, testing
            )
        return self._done("fail", "signature did not verify", tags, identity, testing)

    @staticmethod
    def _done(
        result: str, reason: str, tags: dict[str, str], identity: _Identity | None, testing: bool = False
    ) -> SignatureResult:
        return SignatureResult(
            result=result,
            reason=reason,
            domain=tags.get("d", "").strip().lower().removesuffix("."),
            selector=tags.get("s", "").strip().lower(),
            identity=identity.address if identity else "",
            identity_field=identity.field if identity else "",
            testing=testing,
        )

    def _report(self, results: list[SignatureResult]) -> Result:
        best = min((r.result for r in results), key=RESULTS.index, default="none")
        auth: list[AuthResult] = []
        for r in results or [SignatureResult("none")]:
            properties: list[tuple[str, str]] = []
            if r.domain:
                properties.append(("header.d", r.domain))
            if r.identity:
                properties.append((f"header.{r.identity_field}", r.identity))
            auth.append(AuthResult("domainkeys", r.result, reason=r.reason, properties=tuple(properties)))
        passing = " ".join(dict.fromkeys(r.domain for r in results if r.result == "pass" and r.domain))
        log: dict[str, LogValue] = {"result": best}
        if results:
            log["results"] = " ".join(f"{r.domain or '-'}:{r.selector or '-'}:{r.result}" for r in results)
        score = self.options.score(best) if best not in ("temperror", "none") else 0.0
        return Result(
            check=self.name,
            verdict=_VERDICTS[best],
            score=score,
            reason="DomainKeys signature did not verify" if best == "fail" and score > 0 else "",
            log=log,
            facts={"domainkeys.result": best, "domainkeys.pass_domains": passing},
            auth=tuple(auth),
        )


def _is_base64(text: str) -> bool:
    text = _WSP.sub("", text)
    if not _B64.fullmatch(text):
        return False
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _signs(tags: dict[str, str], field: str) -> bool:
    h = tags.get("h")
    return h is None or field in {n.strip().lower() for n in h.split(":")}


def _show(text: str) -> str:
    text = _WSP.sub(" ", text[:64]).strip()
    return text if len(text) <= 32 else text[:29] + "..."


async def _fetch_keys(dns: Resolver, names: set[str]) -> dict[str, str | DnsError | None]:
    """The key record of each name (the first TXT record with ``p=``), None when there is none,
    the DnsError when the question failed for now."""

    async def one(name: str) -> str | DnsError | None:
        try:
            records = await dns.txt(name)
        except DnsTempError as exc:
            return exc
        except DnsError:
            return None
        keys = [r for r in records if "p=" in r] or records
        return keys[0] if keys else None

    ordered = sorted(names)
    answers = await asyncio.gather(*(one(name) for name in ordered))
    return dict(zip(ordered, answers, strict=True))

"""dkim: verification against keys served by the test DNS server, and signing.

Messages are signed by dkimpy's own signer (the reference for these tests; Perl's Mail::DKIM is
the independent one, in test_dkim_interop.py) with the keys in tests/data/dkim, whose public
halves tests/data/dkim/dkim.zone publishes (made with openssl, not with mxward).
"""

from __future__ import annotations

import base64
import logging
import os
import random
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from dkim.canonicalization import Relaxed, Simple  # type: ignore[import-untyped]
from support.dnsserver import DnsServer, parse_zones

from mxward.contentfilter.checks.dkim import DkimCheck, Options, SigningKey, canonical_body, rsa_verify
from mxward.contentfilter.dkimkeys import parse_private_key_text
from mxward.contentfilter.message import Message
from mxward.shared.authresults import AuthResult, build_header
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.plugin import Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

DATA = Path(__file__).resolve().parents[2] / "data" / "dkim"
ZONE = DATA / "dkim.zone"

MESSAGE = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: lunch\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"lunch  at noon?   \r\n"
    b"\r\n"
)


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer([ZONE]) as server:
        yield server


def services(server: DnsServer | None) -> Services:
    nameserver = server.nameserver if server is not None else "127.0.0.1:9"
    return Services(
        dns=Resolver(DnsSettings(nameservers=(nameserver,), timeout=1.0, lifetime=2.0)),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(1_700_000_000.0),
        hostname="mx.test.example",
    )


def key_material(name: str) -> bytes:
    """What dkimpy's signer takes for a key file of tests/data/dkim."""
    data = (DATA / name).read_bytes()
    return data if b"RSA PRIVATE KEY" in data else parse_private_key_text(data).material


def sign(
    message: bytes,
    selector: str = "rsa",
    *,
    domain: str = "example.com",
    key: str = "example.com.rsa.key",
    algorithm: bytes = b"rsa-sha256",
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    include: list[bytes] | None = None,
    identity: bytes | None = None,
    length: bool = False,
) -> bytes:
    """``message`` with a dkimpy signature on top."""
    field: bytes = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key_material(key),
        identity=identity,
        canonicalize=canonicalize,
        signature_algorithm=algorithm,
        include_headers=include,
        length=length,
    )
    return field + message


def zone_txt() -> dict[str, bytes]:
    """The TXT records of dkim.zone by name, for dkimpy's own verifier (one per name)."""
    records: dict[str, bytes] = {}
    for zone in parse_zones(ZONE):
        assert zone.origin is not None
        for name, rdataset in zone.iterate_rdatasets("TXT"):
            for rdata in rdataset:
                text = b"".join(rdata.strings)
                if text.startswith((b"v=DKIM1", b"p=")):
                    records[f"{name.derelativize(zone.origin).to_text(omit_final_dot=True)}"] = text
    return records


def dkimpy_verifies(message: bytes, index: int = 0) -> bool:
    """dkimpy's own verdict on signature ``index`` (its verifier raises for some failures)."""
    records = zone_txt()
    view = dkim.DKIM(message)
    try:
        return bool(
            view.verify(idx=index, dnsfunc=lambda name, timeout=5: records.get(name.decode().rstrip(".")))
        )
    except dkim.DKIMException:
        return False


async def verify(
    message: bytes, server: DnsServer | None, options: Options | None = None
) -> tuple[Result, DkimCheck]:
    check = DkimCheck(options or Options(), services(server))
    tx = Transaction(stage=Stage.CONTENT, message=Message.parse(message))
    return await check.check(Stage.CONTENT, tx), check


def entry(result: Result, index: int = 0) -> AuthResult:
    return result.auth[index]


def props(auth: AuthResult) -> dict[str, str]:
    return dict(auth.properties)


# ---------------------------------------------------------------------------------------------
# Verifying


async def test_a_valid_rsa_signature_passes(dns: DnsServer) -> None:
    """pass: verdict, score, the three facts and an A-R entry with d, s, a and b."""
    signed = sign(MESSAGE)
    result, _ = await verify(signed, dns)
    assert result.verdict is Verdict.PASS
    assert result.score == Options().pass_score
    assert result.reason == ""
    assert result.facts == {
        "dkim.result": "pass",
        "dkim.pass_domains": "example.com",
        "dkim.results": "example.com:rsa:pass",
    }
    b = re.search(rb"\bb=([^;]+)", signed.split(b"\r\n\r\n")[0].replace(b"\r\n ", b"")).group(1)  # type: ignore[union-attr]
    assert entry(result) == AuthResult(
        "dkim",
        "pass",
        "",
        (
            ("header.d", "example.com"),
            ("header.s", "rsa"),
            ("header.a", "rsa-sha256"),
            ("header.b", b.replace(b" ", b"").decode()[:8]),
        ),
    )
    assert result.log == {"result": "pass", "signatures": 1, "pass_domains": "example.com"}


@pytest.mark.parametrize(
    "canonicalize",
    [(b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed"), (b"relaxed", b"relaxed")],
    ids=lambda c: b"/".join(c).decode(),
)
async def test_every_canonicalization_verifies(dns: DnsServer, canonicalize: tuple[bytes, bytes]) -> None:
    """simple and relaxed, for header and body, each verify."""
    result, _ = await verify(sign(MESSAGE, canonicalize=canonicalize), dns)
    assert result.facts["dkim.result"] == "pass"


async def test_an_altered_body_fails(dns: DnsServer) -> None:
    """A body changed in transit: fail with the body hash reason, fail_score."""
    signed = sign(MESSAGE).replace(b"noon", b"one")
    result, _ = await verify(signed, dns)
    assert result.verdict is Verdict.FAIL
    assert result.score == Options().fail_score
    assert (entry(result).result, entry(result).reason) == ("fail", "body hash did not verify")
    assert result.facts["dkim.pass_domains"] == ""
    assert result.reason == "DKIM fail: body hash did not verify"
    assert not dkimpy_verifies(signed)


async def test_an_altered_header_fails(dns: DnsServer) -> None:
    """A signed header changed: the signature itself does not verify."""
    signed = sign(MESSAGE).replace(b"Subject: lunch", b"Subject: dinner")
    result, _ = await verify(signed, dns)
    assert (entry(result).result, entry(result).reason) == ("fail", "signature did not verify")
    assert not dkimpy_verifies(signed)


async def test_whitespace_changes_break_simple_but_not_relaxed(dns: DnsServer) -> None:
    """Re-spaced header and body: relaxed/relaxed still passes, simple/simple fails."""

    def respace(data: bytes) -> bytes:
        return data.replace(b"Subject: lunch", b"Subject:   lunch ").replace(b"Hello Bob,", b"Hello   Bob,\t")

    relaxed, _ = await verify(respace(sign(MESSAGE)), dns)
    simple, _ = await verify(respace(sign(MESSAGE, canonicalize=(b"simple", b"simple"))), dns)
    assert relaxed.facts["dkim.result"] == "pass"
    assert simple.facts["dkim.result"] == "fail"


async def test_unsigned_mail_is_none(dns: DnsServer) -> None:
    """No DKIM-Signature: verdict skip, dkim=none, empty pass list, none_score."""
    result, _ = await verify(MESSAGE, dns, Options(none_score=0.25))
    assert result.verdict is Verdict.SKIP
    assert result.score == 0.25
    assert result.auth == (AuthResult("dkim", "none"),)
    assert result.facts == {"dkim.result": "none", "dkim.pass_domains": "", "dkim.results": ""}
    assert dns.queries == {}


async def test_a_missing_key_is_permerror(dns: DnsServer) -> None:
    """A selector with no key record: permerror, permerror_score."""
    result, _ = await verify(sign(MESSAGE, "nokey"), dns, Options(permerror_score=0.7))
    assert (entry(result).result, entry(result).reason) == ("permerror", "no key for signature")
    assert result.verdict is Verdict.FAIL
    assert result.score == 0.7
    assert result.facts["dkim.results"] == "example.com:nokey:permerror"


async def test_servfail_is_temperror_and_never_scores(dns: DnsServer) -> None:
    """SERVFAIL for the key: temperror, verdict ERROR, score 0 whatever other scores say."""
    dns.servfail("rsa._domainkey.example.com")
    result, _ = await verify(sign(MESSAGE), dns, Options(fail_score=5, permerror_score=5))
    assert result.verdict is Verdict.ERROR
    assert result.score == 0
    assert (entry(result).result, entry(result).reason) == ("temperror", "key lookup failed (servfail)")
    assert result.facts["dkim.result"] == "temperror"


async def test_a_key_lookup_that_takes_too_long_is_temperror(dns: DnsServer) -> None:
    """No answer within lookup_time: temperror (timeout), and the check returns in time."""
    dns.drop("rsa._domainkey.example.com")
    result, _ = await verify(sign(MESSAGE), dns, Options(lookup_time=0.3))
    assert (entry(result).result, entry(result).reason) == ("temperror", "key lookup failed (timeout)")
    assert result.score == 0


def test_temperror_score_above_zero_is_refused() -> None:
    """Our DNS trouble must not score the sender down: a positive temperror_score is a config error."""
    with pytest.raises(ConfigError, match="temperror_score must not be above 0"):
        build_settings(Options, {"temperror_score": 1.0}, source="t.toml", table="checks.dkim")


async def test_rsa_sha1_is_policy_unless_allowed(dns: DnsServer) -> None:
    """A valid rsa-sha1 signature: policy (never pass) by default, pass with allow_sha1."""
    signed = sign(MESSAGE, algorithm=b"rsa-sha1")
    result, _ = await verify(signed, dns)
    assert (entry(result).result, entry(result).reason) == ("policy", "rsa-sha1 is not accepted (RFC 8301)")
    assert result.facts["dkim.pass_domains"] == ""
    assert result.verdict is Verdict.FAIL
    assert result.score == 0
    allowed, _ = await verify(signed, dns, Options(allow_sha1=True))
    assert allowed.facts["dkim.result"] == "pass"
    assert props(entry(allowed))["header.a"] == "rsa-sha1"
    broken, _ = await verify(signed.replace(b"noon", b"one"), dns)
    assert broken.facts["dkim.result"] == "fail"


async def test_short_keys_are_permerror(dns: DnsServer) -> None:
    """A 512-bit key: permerror; a 1024-bit key passes by default, not with min_key_bits 2048."""
    short, _ = await verify(sign(MESSAGE, "short", key="example.com.short.key"), dns)
    assert (entry(short).result, entry(short).reason) == ("permerror", "key too short (512 bits)")
    signed = sign(MESSAGE, "rsa1024", key="example.com.rsa1024.key")
    default, _ = await verify(signed, dns)
    assert default.facts["dkim.result"] == "pass"
    strict, _ = await verify(signed, dns, Options(min_key_bits=2048))
    assert (entry(strict).result, entry(strict).reason) == ("permerror", "key too short (1024 bits)")


async def test_ed25519_signatures_verify(dns: DnsServer) -> None:
    """Ed25519-SHA256 (RFC 8463): pass, and an altered copy fails."""
    signed = sign(MESSAGE, "ed", key="example.com.ed.key", algorithm=b"ed25519-sha256")
    result, _ = await verify(signed, dns)
    assert result.facts["dkim.results"] == "example.com:ed:pass"
    assert props(entry(result))["header.a"] == "ed25519-sha256"
    altered, _ = await verify(signed.replace(b"Subject: lunch", b"Subject: brunch"), dns)
    assert (entry(altered).result, entry(altered).reason) == ("fail", "signature did not verify")


async def test_every_signature_gets_its_own_result(dns: DnsServer) -> None:
    """Several signatures: one A-R entry each, in header order; the best one decides."""
    signed = sign(MESSAGE, "ed", key="example.com.ed.key", algorithm=b"ed25519-sha256")
    signed = sign(signed, "nokey")
    signed = sign(signed, "rsa", domain="example.net", key="example.net.rsa.key")
    signed = sign(signed)
    result, _ = await verify(signed, dns)
    assert [(a.result, props(a)["header.d"], props(a)["header.s"]) for a in result.auth] == [
        ("pass", "example.com", "rsa"),
        ("pass", "example.net", "rsa"),
        ("permerror", "example.com", "nokey"),
        ("pass", "example.com", "ed"),
    ]
    assert result.facts == {
        "dkim.result": "pass",
        "dkim.pass_domains": "example.com example.net",
        "dkim.results": (
            "example.com:rsa:pass example.net:rsa:pass example.com:nokey:permerror example.com:ed:pass"
        ),
    }
    assert result.score == Options().pass_score
    assert result.log["details"] == "example.com/nokey=permerror: no key for signature"


async def test_the_best_result_orders_fail_before_permerror_before_temperror(dns: DnsServer) -> None:
    """fail beats permerror, which beats temperror; the score follows the best one."""
    dns.servfail("ed._domainkey.example.com")
    signed = sign(MESSAGE, "ed", key="example.com.ed.key", algorithm=b"ed25519-sha256")
    result, _ = await verify(sign(signed, "nokey"), dns)
    assert result.facts["dkim.result"] == "permerror"
    failing = sign(sign(signed, "nokey")).replace(b"noon", b"one")
    result, _ = await verify(failing, dns)
    assert result.facts["dkim.result"] == "fail"
    assert result.score == Options().fail_score


async def test_max_signatures_bounds_the_work(dns: DnsServer) -> None:
    """Only the first max_signatures fields are verified and looked up; the rest are counted."""
    signed = sign(sign(sign(MESSAGE, "rsa1024", key="example.com.rsa1024.key"), "nokey"), "rsa")
    result, _ = await verify(signed, dns, Options(max_signatures=2))
    assert [props(a)["header.s"] for a in result.auth] == ["rsa", "nokey"]
    assert result.log["skipped"] == 1
    assert result.log["signatures"] == 3
    assert ("rsa1024._domainkey.example.com", "TXT") not in dns.queries


async def test_header_b_is_long_enough_to_tell_signatures_apart(dns: DnsServer) -> None:
    """RFC 6008: 8 characters of b=, more when another signature starts the same way."""
    signed = sign(MESSAGE)
    fields = signed.split(b"\r\nFrom:")[0].replace(b"\r\n", b"")
    b = re.search(rb"b=([A-Za-z0-9+/= ]+)$", fields).group(1).replace(b" ", b"")  # type: ignore[union-attr]
    twin = fields.replace(b"b=" + b[:11], b"b=" + b[:10] + (b"B" if b[10:11] != b"B" else b"C"), 1)
    assert twin != fields
    result, _ = await verify(twin + b"\r\n" + signed, dns)
    first, second = (props(a)["header.b"] for a in result.auth)
    assert first != second
    assert len(first) == len(second) == 11
    alone, _ = await verify(signed, dns)
    assert len(props(alone.auth[0])["header.b"]) == 8
    assert [a.result for a in result.auth] == ["fail", "pass"]


async def test_an_international_signing_domain_is_looked_up_and_reported_as_a_labels(dns: DnsServer) -> None:
    """d= in UTF-8 (RFC 8616): the key is asked under the A-label name, facts carry the A-labels."""
    zone = (
        "$ORIGIN xn--bcher-kva.example.\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\n"
        + ZONE.read_text()
        .split("rsa._domainkey TXT", 1)[1]
        .split("\n", 1)[0]
        .join(["rsa._domainkey TXT", "\n"])
    )
    dns.add_zone(zone)
    signed = sign(MESSAGE, domain="bücher.example")
    result, _ = await verify(signed, dns)
    assert result.facts["dkim.pass_domains"] == "xn--bcher-kva.example"
    assert props(entry(result))["header.d"] == "xn--bcher-kva.example"


async def test_the_key_record_is_parsed_once(dns: DnsServer) -> None:
    """Two messages from one signer: one DNS question (the resolver's cache), one parsed key."""
    check = DkimCheck(Options(), services(dns))
    for body in (b"one\r\n", b"two\r\n"):
        tx = Transaction(stage=Stage.CONTENT, message=Message.parse(sign(MESSAGE + body)))
        assert (await check.check(Stage.CONTENT, tx)).facts["dkim.result"] == "pass"
    assert dns.queries[("rsa._domainkey.example.com", "TXT")] == 1
    assert len(check._keys) == 1


async def test_l_tag_covers_a_prefix_of_the_body(dns: DnsServer) -> None:
    """l=: text appended after signing still passes; a body cut below l= fails."""
    signed = sign(MESSAGE, length=True)
    appended, _ = await verify(signed + b"-- \r\nmailing list footer\r\n", dns)
    assert appended.facts["dkim.result"] == "pass"
    cut, _ = await verify(signed.replace(b"lunch  at noon?   \r\n", b""), dns)
    assert (entry(cut).result, entry(cut).reason) == ("fail", "l= is longer than the body")


async def test_a_second_from_added_on_top_breaks_the_signature(dns: DnsServer) -> None:
    """A From field added above the signed one (the one readers see) makes the signature fail."""
    signed = sign(MESSAGE, include=[b"from", b"subject"])
    head, _, rest = signed.partition(b"From: Alice")
    forged = head + b"From: ceo@example.com\r\nFrom: Alice" + rest
    result, _ = await verify(forged, dns)
    assert result.facts["dkim.result"] == "fail"


async def test_bare_lf_line_ends_are_read_as_crlf(dns: DnsServer) -> None:
    """A message stored with LF line ends verifies like the CRLF original; so does an mbox copy."""
    signed = sign(MESSAGE)
    result, _ = await verify(signed.replace(b"\r\n", b"\n"), dns)
    assert result.facts["dkim.result"] == "pass"
    mbox, _ = await verify(b"From alice@example.com Tue Nov 14 22:13:20 2023\r\n" + signed, dns)
    assert mbox.facts["dkim.result"] == "pass"


@pytest.mark.parametrize(
    ("selector", "result", "reason"),
    [
        ("revoked", "permerror", "key revoked (empty p=)"),
        ("wrongtype", "permerror", "key type ed25519 does not match a=rsa-sha256"),
        ("hsha1", "permerror", "key does not allow sha256 (h=)"),
        ("tlsrpt", "permerror", "key is not for e-mail (s=)"),
        ("junk", "permerror", "key record cannot be read: could not parse RSA public key"),
        ("notags", "permerror", "key record is not a tag list"),
        ("emaillist", "pass", ""),
        ("noversion", "pass", ""),
        ("other", "pass", ""),
    ],
)
async def test_key_records(dns: DnsServer, selector: str, result: str, reason: str) -> None:
    """What the key record allows: revoked, wrong type, h=, s=, junk; a record among others."""
    got, _ = await verify(sign(MESSAGE, selector), dns)
    assert (entry(got).result, entry(got).reason) == (result, reason)


async def test_a_key_in_testing_mode_reports_but_does_not_score(dns: DnsServer) -> None:
    """t=y: the result stands, with a note, and the score is 0 (RFC 6376 section 3.6.1)."""
    passing, _ = await verify(sign(MESSAGE, "testing"), dns)
    assert (entry(passing).result, entry(passing).reason) == ("pass", "key in testing mode (t=y)")
    assert passing.score == 0
    failing, _ = await verify(sign(MESSAGE, "testing").replace(b"noon", b"one"), dns)
    assert entry(failing).reason == "body hash did not verify; key in testing mode (t=y)"
    assert failing.score == 0


async def test_a_strict_key_refuses_a_subdomain_identity(dns: DnsServer) -> None:
    """t=s: i= must be in d= itself, not in a subdomain."""
    same, _ = await verify(sign(MESSAGE, "strict", identity=b"alice@example.com"), dns)
    assert same.facts["dkim.result"] == "pass"
    sub, _ = await verify(sign(MESSAGE, "strict", identity=b"alice@mail.example.com"), dns)
    assert (entry(sub).result, entry(sub).reason) == ("permerror", "key allows no subdomain in i= (t=s)")


_GOOD = "v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=rsa; h=from:subject; bh=AAAA; b=AAAA"


@pytest.mark.parametrize(
    ("value", "result", "reason"),
    [
        ("", "neutral", "missing"),
        ("garbage", "neutral", "not a tag list"),
        ("v=1; a=rsa-sha256", "neutral", "missing"),
        ("v=1; v=1; a=rsa-sha256", "neutral", "not a tag list"),
        (_GOOD.replace("a=rsa-sha256", "a=rsa-md5"), "neutral", "unknown signature algorithm"),
        (_GOOD.replace("b=AAAA", "b=A*A"), "neutral", "b= value is not valid base64"),
        (_GOOD.replace("v=1", "v=2"), "neutral", "v= value is not 1"),
        (_GOOD + "; i=@example.org", "neutral", "i= domain is not a subdomain of d="),
        (_GOOD + "; i=example.com", "neutral", ""),
        (_GOOD + "; x=1000", "neutral", "x= value is past"),
        (_GOOD + "; t=99999999999", "neutral", "t= value is in the future"),
        (_GOOD + "; l=12x", "neutral", "l= value is not a decimal integer"),
        (_GOOD + "; l=", "neutral", "l= value is empty"),
        (_GOOD + "; q=http", "neutral", "q= value is not dns/txt"),
        (_GOOD.replace("relaxed/relaxed", "fancy/relaxed"), "neutral", "unknown canonicalization (c=)"),
        (_GOOD.replace("h=from:subject", "h=subject:date"), "permerror", "From is not signed (h=)"),
        (_GOOD.replace("d=example.com", "d=exa mple.com"), "permerror", "d= or s= is not a domain name"),
        (_GOOD.replace("d=example.com", "d=example.com(x)"), "neutral", "d= value is not valid"),
        (_GOOD.replace("s=rsa", "s=a..b"), "permerror", "d= or s= is not a domain name"),
        (_GOOD.replace("s=rsa", "s=" + "x" * 300), "permerror", "d= or s= is not a domain name"),
        (_GOOD.replace("d=example.com", "d=bücher.example.com"), "permerror", "no key for signature"),
        (_GOOD.replace("bh=AAAA", "bh=AAAA; bh=AAAA"), "neutral", "not a tag list"),
        (_GOOD + "; \udcff\udcfe=x", "neutral", "not a tag list"),
        (_GOOD.replace("b=AAAA", "b=" + "A" * 200_000), "fail", "body hash did not verify"),
    ],
)
async def test_malformed_signature_fields_never_crash(
    dns: DnsServer, value: str, result: str, reason: str
) -> None:
    """Broken DKIM-Signature fields get neutral or permerror with a reason, never an exception."""
    data = b"DKIM-Signature: " + value.encode("utf-8", "surrogateescape") + b"\r\n" + MESSAGE
    got, _ = await verify(data, dns)
    assert entry(got).result == result
    assert entry(got).reason.startswith(reason)
    assert "\udcff" not in entry(got).reason
    build_header("mx.test.example", got.auth)  # every entry can be written


async def test_random_junk_in_signatures_never_crashes(dns: DnsServer) -> None:
    """Fuzz: signature fields made of random tag soup always give a result."""
    rng = random.Random(5)
    alphabet = ["v=1", "a=rsa-sha256", "a=ed25519-sha256", "d=example.com", "s=rsa", "s=ed", "h=from",
                "bh=", "b=", "c=simple", "l=0", "i=@example.com", "t=1", "x=", ";", "=", " ", "\t",
                "\r\n ", "AAAA", "\x00", "\udcff", "q=dns/txt"]  # fmt: skip
    for _ in range(300):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        data = b"DKIM-Signature: " + value.encode("utf-8", "surrogateescape") + b"\r\n" + MESSAGE
        got, _ = await verify(data, dns)
        assert entry(got).result in ("neutral", "permerror", "fail", "temperror"), value


async def test_no_message_is_skipped() -> None:
    """Outside the content stage (no message) the check skips."""
    check = DkimCheck(Options(), services(None))
    result = await check.check(Stage.CONTENT, Transaction(stage=Stage.CONTENT))
    assert result.verdict is Verdict.SKIP


def test_canonical_bodies_match_dkimpys() -> None:
    """Our faster canonicalization gives dkimpy's bytes, over random bodies of white space and text."""
    rng = random.Random(7)
    pieces = [b" ", b"\t", b"  ", b"\r\n", b"a", b"bc", b"\r", b"\n", b"\xc3\xa9"]
    bodies = [b"", b"\r\n", b"\r\n\r\n", b"a", b"a \r\n", b" \t \r\n\r\n", b"\r\r\n", b"x\n\r\n"]
    bodies += [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for body in bodies:
        assert canonical_body(body, relaxed=False) == Simple.canonicalize_body(body), body
        assert canonical_body(body, relaxed=True) == Relaxed.canonicalize_body(body), body


def test_rsa_verification_needs_the_exact_signature_length() -> None:
    """A signature shorter or longer than the modulus, or not below it, never verifies."""
    modulus, exponent = (1 << 2047) + 12345, 65537
    digest = bytes(32)
    assert not rsa_verify(digest, "sha256", bytes(255), modulus, exponent)
    assert not rsa_verify(digest, "sha256", bytes(257), modulus, exponent)
    assert not rsa_verify(digest, "sha256", b"\xff" * 256, modulus, exponent)


# ---------------------------------------------------------------------------------------------
# Signing


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """The test keys, copied with mode 0600 (git checks them out world-readable)."""
    folder = tmp_path / "keys"
    folder.mkdir()
    for path in DATA.glob("*.key"):
        shutil.copy(path, folder / path.name)
        os.chmod(folder / path.name, 0o600)
    return folder


def signing_options(keydir: Path, **options: Any) -> Options:
    keys = (
        SigningKey(domain="example.com", selector="rsa", key_file=str(keydir / "example.com.rsa.key")),
        SigningKey(
            domain="example.com",
            selector="ed",
            key_file=str(keydir / "example.com.ed.key"),
            algorithm="ed25519-sha256",
        ),
        SigningKey(domain="example.net", selector="rsa", key_file=str(keydir / "example.net.rsa.key")),
    )
    return Options(keys=keys, check_published_keys=False, **options)


async def signer(dns: DnsServer | None, options: Options) -> DkimCheck:
    check = DkimCheck(options, services(dns))
    await check.start()
    return check


async def sign_out(check: DkimCheck, message: bytes, **tx: Any) -> bytes:
    """``message`` as the filter's outgoing step leaves it."""
    fields = await check.outgoing(Transaction(stage=Stage.CONTENT, **tx), message)
    return b"".join(f.encode("ascii") + b"\r\n" for f in fields) + message


async def test_authenticated_mail_is_signed_with_every_key_of_its_domain(
    dns: DnsServer, keydir: Path
) -> None:
    """RSA and Ed25519 side by side; both verify with mxward and with dkimpy."""
    check = await signer(dns, signing_options(keydir))
    signed = await sign_out(check, MESSAGE, sasl_username="alice")
    assert signed.count(b"DKIM-Signature:") == 2
    result, _ = await verify(signed, dns)
    assert result.facts["dkim.results"] == "example.com:rsa:pass example.com:ed:pass"
    assert dkimpy_verifies(signed, 0) and dkimpy_verifies(signed, 1)
    for field in signed.split(b"\r\nFrom:")[0].split(b"\r\nDKIM-Signature:"):
        assert b"c=relaxed/relaxed" in field.replace(b"\r\n ", b" ")
        assert all(len(line) <= 78 for line in field.split(b"\r\n"))


async def test_signed_fields_are_oversigned_and_counted(dns: DnsServer, keydir: Path) -> None:
    """h= names each present field as often as present, From/To/Subject/Date once more."""
    check = await signer(dns, signing_options(keydir))
    message = MESSAGE.replace(b"To: Bob <bob@example.org>\r\n", b"Cc: carol@example.org\r\nX-Other: 1\r\n")
    message = b"Received: from somewhere\r\n" + message
    signed = await sign_out(check, message, sasl_username="alice")
    first = signed.split(b"\r\nDKIM-Signature:")[0].replace(b"\r\n ", b" ").decode()
    names = [n.strip() for n in re.search(r"h=([^;]+);", first).group(1).split(":")]  # type: ignore[union-attr]
    counts = {name: names.count(name) for name in names}
    assert counts == {"from": 2, "subject": 2, "date": 2, "message-id": 1, "cc": 1, "to": 1}
    # Nobody can add a To (absent when signed) or a second Subject without breaking it.
    added_to, _ = await verify(signed.replace(b"Cc: carol", b"To: mallory@example.org\r\nCc: carol"), dns)
    assert added_to.facts["dkim.pass_domains"] == ""
    unsigned_field, _ = await verify(signed.replace(b"X-Other: 1", b"X-Other: 2"), dns)
    assert unsigned_field.facts["dkim.results"] == "example.com:rsa:pass example.com:ed:pass"


async def test_only_our_mail_is_signed(dns: DnsServer, keydir: Path) -> None:
    """Unauthenticated mail from elsewhere is not signed; sign_authenticated = false stops logins."""
    check = await signer(dns, signing_options(keydir))
    assert (
        await check.outgoing(Transaction(stage=Stage.CONTENT, client_ip=parse_ip("192.0.2.1")), MESSAGE) == ()
    )
    off = await signer(dns, signing_options(keydir, sign_authenticated=False))
    assert await off.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="alice"), MESSAGE) == ()


async def test_mail_from_sign_networks_is_signed(dns: DnsServer, keydir: Path) -> None:
    """A client in sign_networks is ours; sign_domains limits which From domains it may sign."""
    check = await signer(dns, signing_options(keydir, sign_networks=("192.0.2.0/24",)))
    inside = Transaction(stage=Stage.CONTENT, client_ip=parse_ip("192.0.2.7"))
    outside = Transaction(stage=Stage.CONTENT, client_ip=parse_ip("198.51.100.7"))
    assert len(await check.outgoing(inside, MESSAGE)) == 2
    assert await check.outgoing(outside, MESSAGE) == ()
    limited = await signer(
        dns, signing_options(keydir, sign_networks=("192.0.2.0/24",), sign_domains=("example.net",))
    )
    assert await limited.outgoing(inside, MESSAGE) == ()
    net = MESSAGE.replace(b"alice@example.com", b"alice@example.net")
    assert len(await limited.outgoing(inside, net)) == 1


async def test_subdomains_are_signed_with_the_parents_keys(dns: DnsServer, keydir: Path) -> None:
    """a@news.mail.example.com: d=example.com; not with sign_subdomains = false; no key: unsigned."""
    check = await signer(dns, signing_options(keydir))
    sub = MESSAGE.replace(b"alice@example.com", b"alice@news.mail.example.com")
    signed = await sign_out(check, sub, sasl_username="alice")
    result, _ = await verify(signed, dns)
    assert result.facts["dkim.results"] == "example.com:rsa:pass example.com:ed:pass"
    off = await signer(dns, signing_options(keydir, sign_subdomains=False))
    assert await off.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="alice"), sub) == ()
    other = MESSAGE.replace(b"alice@example.com", b"alice@example.org")
    assert await check.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="alice"), other) == ()
    assert check.signers_for("com") == ()


@pytest.mark.parametrize(
    "message",
    [
        MESSAGE.replace(b"From: Alice Example <alice@example.com>\r\n", b""),
        MESSAGE.replace(b"From: Alice", b"From: x@example.com\r\nFrom: Alice"),
        MESSAGE.replace(b"<alice@example.com>", b"undisclosed-recipients:;"),
        MESSAGE.replace(b"<alice@example.com>", b"<alice@-bad-.example.com>"),
        MESSAGE.replace(b"Subject: lunch\r\n", b"Subject: lunch\r\nthis line is no header field\r\n"),
    ],
    ids=["no-from", "two-froms", "group", "bad-domain", "broken-header"],
)
async def test_messages_without_one_clear_from_domain_are_not_signed(
    dns: DnsServer, keydir: Path, message: bytes
) -> None:
    """No From, two Froms, no address, a bad domain, a header that cannot be read whole."""
    check = await signer(dns, signing_options(keydir))
    assert await check.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="alice"), message) == ()


async def test_without_keys_nothing_is_signed(dns: DnsServer) -> None:
    """The default: no key table, no signature, no work."""
    check = await signer(dns, Options())
    assert await check.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="alice"), MESSAGE) == ()


async def test_a_key_file_anyone_can_read_stops_the_start(keydir: Path) -> None:
    """Mode 0644: a configuration error that says how to fix it."""
    os.chmod(keydir / "example.com.rsa.key", 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644 .* chmod 600"):
        await signer(None, signing_options(keydir))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing", r"example.com.rsa.key: No such file or directory"),
        ("junk", r"example.com.rsa.key: no PEM key block"),
        ("swap", r"holds an ed25519 key, but the entry for rsa._domainkey.example.com says rsa-sha256"),
    ],
)
async def test_unusable_keys_stop_the_start(keydir: Path, change: str, message: str) -> None:
    """A missing file, a file without a key, a key of the wrong algorithm: configuration errors."""
    path = keydir / "example.com.rsa.key"
    if change == "missing":
        path.unlink()
    elif change == "junk":
        path.write_bytes(b"hello\n")
    else:
        shutil.copy(keydir / "example.com.ed.key", path)
    with pytest.raises(ConfigError, match=message):
        await signer(None, signing_options(keydir))


async def test_published_keys_are_compared_at_start(
    dns: DnsServer, keydir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A matching record: quiet; missing, different or unreachable: a WARNING each, start goes on."""
    dns.servfail("rsa._domainkey.example.net")
    keys = (
        SigningKey(domain="example.com", selector="rsa", key_file=str(keydir / "example.com.rsa.key")),
        SigningKey(
            domain="example.com", selector="unpublished", key_file=str(keydir / "example.com.rsa.key")
        ),
        SigningKey(domain="example.com", selector="old", key_file=str(keydir / "example.com.rsa.key")),
        SigningKey(domain="example.net", selector="rsa", key_file=str(keydir / "example.net.rsa.key")),
    )
    with caplog.at_level(logging.WARNING, logger="mxward.checks.dkim"):
        check = await signer(dns, Options(keys=keys))
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 3
    assert "rsa._domainkey.example.net (rsa, " in warnings
    assert "the record could not be looked up (servfail); receivers cannot verify" in warnings
    assert (
        f"old._domainkey.example.com (rsa, {keydir}/example.com.rsa.key): the published key is not"
        in warnings
    )
    assert "unpublished._domainkey.example.com (rsa, " in warnings
    assert "): no DKIM key record; receivers" in warnings
    assert len(check.signers_for("example.com")) == 3


async def test_a_small_rsa_key_signs_with_a_warning(keydir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """1024-bit keys still sign (receivers accept them) but the start warns (RFC 8301 asks 2048)."""
    key = SigningKey(
        domain="example.com", selector="rsa1024", key_file=str(keydir / "example.com.rsa1024.key")
    )
    with caplog.at_level(logging.WARNING, logger="mxward.checks.dkim"):
        check = await signer(None, Options(keys=(key,), check_published_keys=False))
    assert "a 1024-bit RSA key" in caplog.text
    assert len(await check.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="a"), MESSAGE)) == 1


def test_key_table_entries_are_checked() -> None:
    """A key entry needs domain, selector and an absolute key_file; names are normalised."""
    with pytest.raises(ConfigError, match="every key needs domain, selector and key_file"):
        build_settings(Options, {"keys": [{"domain": "example.com"}]}, source="t", table="checks.dkim")
    with pytest.raises(ConfigError, match="must be an absolute path"):
        build_settings(
            Options,
            {"keys": [{"domain": "example.com", "selector": "s", "key_file": "k.key"}]},
            source="t",
            table="checks.dkim",
        )
    with pytest.raises(ConfigError, match="is listed twice"):
        entry = {"domain": "example.com", "selector": "s", "key_file": "/k"}
        build_settings(Options, {"keys": [entry, entry]}, source="t", table="checks.dkim")
    options = build_settings(
        Options,
        {
            "keys": [
                {"domain": "Example.COM.", "selector": "S1", "key_file": "/k", "algorithm": "ed25519-sha256"}
            ]
        },
        source="t",
        table="checks.dkim",
    )
    assert options.keys == (
        SigningKey(domain="example.com", selector="s1", key_file="/k", algorithm="ed25519-sha256"),
    )


def test_header_lists_are_checked() -> None:
    """Fields RFC 6376 says not to sign are refused, and From must be signed."""
    with pytest.raises(ConfigError, match="Received must not be signed"):
        build_settings(Options, {"sign_headers": ["From", "Received"]}, source="t", table="checks.dkim")
    with pytest.raises(ConfigError, match="From must be signed"):
        build_settings(
            Options, {"sign_headers": ["Subject"], "oversign_headers": []}, source="t", table="checks.dkim"
        )


def test_signature_values_decode_as_base64() -> None:
    """Sanity of the test helper: the zone's RSA record is the SubjectPublicKeyInfo of the key."""
    record = zone_txt()["rsa._domainkey.example.com"]
    der = base64.b64decode(record.split(b"p=")[1])
    assert der == parse_private_key_text((DATA / "example.com.rsa.key").read_bytes()).public

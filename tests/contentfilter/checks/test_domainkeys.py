"""domainkeys: DomainKey-Signatures (RFC 4870) made by Perl's Mail::DKIM verify, altered ones fail.

The signer is independent of mxward: Mail::DKIM's DomainKeys signer (Debian libmail-dkim-perl),
``simple`` and ``nofws``, with and without ``h=``. Keys and records are in tests/data/domainkeys
(domainkeys.zone on the test DNS server). Signatures that need not verify (malformed ones, the
wrong sender) are written by hand.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from support.dnsserver import DnsServer

from mxward.contentfilter.checks.domainkeys import DomainkeysCheck, Options, canonical_data
from mxward.contentfilter.message import Message
from mxward.shared.authresults import AuthResult
from mxward.shared.clock import SystemClock
from mxward.shared.config import ConfigError, build_settings
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateStore

DATA = Path(__file__).resolve().parents[2] / "data" / "domainkeys"
ZONE = DATA / "domainkeys.zone"
D = "dk.test.example"

MESSAGE = (
    f"From: Alice <alice@{D}>\r\n"
    "To: bob@example.org\r\n"
    "Subject:  lunch   on\r\n"
    "\tFriday\r\n"
    "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    "Message-ID: <lunch-1@dk.test.example>\r\n"
    "\r\n"
    "Shall we meet  at noon?\r\n"
    " \t \r\n"
    "Alice\t \r\n"
    "\r\n"
    "\r\n"
).encode()


def _have_perl_dk() -> bool:
    if shutil.which("perl") is None:
        return False
    probe = ["perl", "-MMail::DKIM::Signer", "-MMail::DKIM::DkSignature", "-MMail::DKIM::Verifier", "-e1"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


needs_perl = pytest.mark.skipif(
    not _have_perl_dk(), reason="Perl's Mail::DKIM is not installed (Debian libmail-dkim-perl)"
)

SIGN = r"""
use strict; use warnings;
use Mail::DKIM::Signer; use Mail::DKIM::DkSignature;
my ($keyfile, $domain, $selector, $method, $headers) = @ARGV;
my $signer = Mail::DKIM::Signer->new(
    KeyFile => $keyfile,
    Policy => sub {
        my $dkim = shift;
        my %sig = (Algorithm => 'rsa-sha1', Method => $method, Domain => $domain, Selector => $selector);
        $sig{Headers} = ($headers eq '*' ? $dkim->headers : $headers) if $headers ne '';
        $dkim->add_signature(Mail::DKIM::DkSignature->new(%sig));
        return;
    });
binmode STDIN; binmode STDOUT;
local $/; my $message = <STDIN>;
$signer->PRINT($message); $signer->CLOSE;
my $out = $signer->signature->as_string;
$out =~ s/\s+\z//;
print $out, "\015\012";
"""

VERIFY = r"""
use strict; use warnings;
use Net::DNS::Resolver; use Mail::DKIM::DNS; use Mail::DKIM::Verifier;
my $port = shift @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 0, retry => 1,
    udp_timeout => 5, tcp_timeout => 5));
foreach my $file (@ARGV) {
    open(my $fh, '<:raw', $file) or die "$file: $!";
    local $/; my $message = <$fh>; close $fh;
    my $dkim = Mail::DKIM::Verifier->new();
    $dkim->PRINT($message); $dkim->CLOSE;
    my $detail = $dkim->result_detail // '';
    $detail =~ s/\s+/ /g;
    print $dkim->result, "\t", $detail, "\n";
}
"""


def perl_sign(
    data: bytes = MESSAGE,
    *,
    selector: str = "s1",
    method: str = "simple",
    headers: str = "",
    key: str = "dk.pem",
    domain: str = D,
) -> bytes:
    """``data`` with a DomainKey-Signature by Mail::DKIM on top (``headers="*"``: h= of all)."""
    done = subprocess.run(
        ["perl", "-e", SIGN, str(DATA / key), domain, selector, method, headers],
        input=data,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout + data


@pytest.fixture
async def dns_dk(dns_server: DnsServer) -> DnsServer:
    dns_server.add_zone(ZONE)
    return dns_server


Factory = Callable[..., DomainkeysCheck]


@pytest.fixture
async def make(dns_dk: DnsServer) -> AsyncIterator[Factory]:
    def factory(**options: Any) -> DomainkeysCheck:
        resolver = Resolver(DnsSettings(nameservers=(dns_dk.nameserver,), timeout=1.0, lifetime=2.0))
        services = Services(dns=resolver, state=cast("StateStore", None), clock=SystemClock())
        return DomainkeysCheck(Options(**options), services)

    return factory  # type: ignore[return-value]


async def run(check: DomainkeysCheck, data: bytes) -> Result:
    tx = Transaction(stage=Stage.CONTENT, message=Message.parse(data))
    return await check.check(Stage.CONTENT, tx)


def entries(result: Result) -> list[AuthResult]:
    assert all(entry.method == "domainkeys" for entry in result.auth)
    return list(result.auth)


def signature(tags: str) -> bytes:
    """A hand-written DomainKey-Signature field (its b= need not verify)."""
    return f"DomainKey-Signature: {tags}\r\n".encode()


JUNK_B = "b=" + "QUJD" * 32


# ---------------------------------------------------------------------------------------------
# Signed by Mail::DKIM


async def test_an_unsigned_message_is_none(make: Factory, dns_dk: DnsServer) -> None:
    """No DomainKey-Signature: domainkeys=none, verdict skip, no DNS question."""
    result = await run(make(), MESSAGE)
    assert result.verdict is Verdict.SKIP
    assert result.score == 0
    assert entries(result) == [AuthResult("domainkeys", "none")]
    assert result.facts == {"domainkeys.result": "none", "domainkeys.pass_domains": ""}
    assert not dns_dk.queries


@needs_perl
@pytest.mark.parametrize("method", ["simple", "nofws"])
@pytest.mark.parametrize("headers", ["", "*", "from:subject:date"], ids=["all", "h-all", "h-some"])
async def test_signatures_by_mail_dkim_pass(make: Factory, method: str, headers: str) -> None:
    """Both canonicalisations, with and without h=: pass, with header.d and header.from."""
    result = await run(make(), perl_sign(method=method, headers=headers))
    assert result.verdict is Verdict.PASS
    assert result.score == 0
    assert entries(result) == [
        AuthResult("domainkeys", "pass", properties=(("header.d", D), ("header.from", f"alice@{D}")))
    ]
    assert result.facts == {"domainkeys.result": "pass", "domainkeys.pass_domains": D}
    assert result.log == {"result": "pass", "results": f"{D}:s1:pass"}


ALTERATIONS: dict[str, Callable[[bytes], bytes]] = {
    "body word": lambda d: d.replace(b"noon", b"one"),
    "body line added": lambda d: d.replace(b"Alice\t", b"Alice\t\r\nP.S. bring cash"),
    "signed header": lambda d: d.replace(b"lunch", b"dinner"),
    "header added below": lambda d: d.replace(b"To: bob", b"Cc: eve@example.org\r\nTo: bob"),
}


@needs_perl
@pytest.mark.parametrize("method", ["simple", "nofws"])
@pytest.mark.parametrize("change", list(ALTERATIONS), ids=list(ALTERATIONS))
async def test_altered_messages_fail(make: Factory, method: str, change: str) -> None:
    """Changed in transit: fail, fail_score added, a reason for the reply."""
    result = await run(make(), ALTERATIONS[change](perl_sign(method=method)))
    assert result.verdict is Verdict.FAIL
    assert result.score == 1.0
    assert result.reason == "DomainKeys signature did not verify"
    assert entries(result)[0].result == "fail"
    assert entries(result)[0].reason == "signature did not verify"


WHITESPACE_ONLY: dict[str, Callable[[bytes], bytes]] = {
    "spaces inside a line": lambda d: d.replace(b"meet  at", b"meet \t at"),
    "folding changed": lambda d: d.replace(b"  lunch   on\r\n\tFriday", b" lunch on Friday"),
    "a line of spaces at the end": lambda d: d + b"\r\n \t\r\n",
}


@needs_perl
@pytest.mark.parametrize("change", list(WHITESPACE_ONLY), ids=list(WHITESPACE_ONLY))
async def test_nofws_survives_white_space_changes_and_simple_does_not(make: Factory, change: str) -> None:
    """nofws ignores spaces, tabs and folding; simple does not."""
    alter = WHITESPACE_ONLY[change]
    nofws = await run(make(), alter(perl_sign(method="nofws")))
    simple = await run(make(), alter(perl_sign(method="simple")))
    assert nofws.facts["domainkeys.result"] == "pass"
    assert simple.facts["domainkeys.result"] == "fail"


@needs_perl
@pytest.mark.parametrize("method", ["simple", "nofws"])
async def test_empty_lines_added_at_the_end_do_not_matter(make: Factory, method: str) -> None:
    """Both methods leave out empty lines at the end of the body."""
    result = await run(make(), perl_sign(method=method) + b"\r\n\r\n\r\n")
    assert result.facts["domainkeys.result"] == "pass"


@needs_perl
async def test_fields_above_the_signature_are_not_covered(make: Factory) -> None:
    """A Received field added on top after signing changes nothing."""
    data = b"Received: from relay.example by mx.example; Tue, 14 Nov 2023 22:14:00 +0000\r\n" + perl_sign()
    assert (await run(make(), data)).facts["domainkeys.result"] == "pass"


@needs_perl
async def test_fields_not_in_h_may_change(make: Factory) -> None:
    """With h=from:subject:date, To and the Message-ID are not covered."""
    data = perl_sign(headers="from:subject:date").replace(b"To: bob@", b"To: carol@")
    assert (await run(make(), data)).facts["domainkeys.result"] == "pass"


@needs_perl
async def test_a_testing_key_turns_failure_into_neutral(make: Factory) -> None:
    """t=y: a pass says "testing mode", a failure is neutral and not scored."""
    good = await run(make(), perl_sign(selector="test"))
    assert entries(good)[0].result == "pass"
    assert entries(good)[0].reason == "testing mode"
    bad = await run(make(), perl_sign(selector="test").replace(b"noon", b"one"))
    assert bad.verdict is Verdict.SKIP
    assert bad.score == 0
    assert entries(bad)[0].result == "neutral"
    assert entries(bad)[0].reason == "signature did not verify (key in testing mode)"


@needs_perl
async def test_a_dkim_style_key_record_works(make: Factory) -> None:
    """A record with v=DKIM1 serves DomainKeys as well."""
    assert (await run(make(), perl_sign(selector="dkim1"))).facts["domainkeys.result"] == "pass"


@needs_perl
@pytest.mark.parametrize(
    ("selector", "sender", "result"),
    [
        ("alice", "alice", "pass"),
        ("alice", "bob", "policy"),
        ("star", "news-daily", "pass"),
        ("star", "news-", "pass"),
        ("star", "news", "policy"),
        ("star", "bob", "policy"),
    ],
)
async def test_granularity_limits_the_local_part(
    make: Factory, selector: str, sender: str, result: str
) -> None:
    """g=alice and g=news-*: the sending address's local part must match."""
    data = MESSAGE.replace(b"alice@", sender.encode() + b"@")
    got = await run(make(), perl_sign(data, selector=selector))
    assert entries(got)[0].result == result
    if result == "policy":
        assert entries(got)[0].reason == "key's g= does not cover the sender"


@needs_perl
async def test_a_subdomain_sender_may_be_signed_by_the_parent(make: Factory) -> None:
    """From alice@news.dk.test.example, d=dk.test.example: pass."""
    data = MESSAGE.replace(f"alice@{D}".encode(), f"alice@news.{D}".encode())
    got = await run(make(), perl_sign(data))
    assert entries(got)[0] == AuthResult(
        "domainkeys", "pass", properties=(("header.d", D), ("header.from", f"alice@news.{D}"))
    )


@needs_perl
async def test_the_sender_field_is_the_identity_when_present(make: Factory) -> None:
    """Sender names the sending address (header.sender); From may be another domain."""
    data = b"Sender: Alice <alice@dk.test.example>\r\n" + MESSAGE.replace(
        f"alice@{D}".encode(), b"carol@example.org"
    )
    got = await run(make(), perl_sign(data, method="nofws", headers="*"))
    assert entries(got)[0] == AuthResult(
        "domainkeys", "pass", properties=(("header.d", D), ("header.sender", f"alice@{D}"))
    )


@needs_perl
async def test_the_wrong_key_fails(make: Factory) -> None:
    """The record holds another key than the one that signed."""
    assert (await run(make(), perl_sign(selector="wrong"))).facts["domainkeys.result"] == "fail"


@needs_perl
async def test_a_short_key_is_a_permerror_unless_allowed(make: Factory) -> None:
    """768 bits: permerror at min_key_bits 1024, pass at 512."""
    data = perl_sign(selector="weak", key="weak768.pem")
    strict = await run(make(), data)
    assert entries(strict)[0].result == "permerror"
    assert entries(strict)[0].reason == "key too short (768 bits)"
    assert (await run(make(min_key_bits=512), data)).facts["domainkeys.result"] == "pass"


@needs_perl
async def test_the_best_of_several_signatures_counts(make: Factory) -> None:
    """A failing signature on top of a passing one: pass, both reported, in order."""
    data = perl_sign(perl_sign(), selector="wrong")
    result = await run(make(), data)
    assert result.verdict is Verdict.PASS
    assert [e.result for e in entries(result)] == ["fail", "pass"]
    assert result.log["results"] == f"{D}:wrong:fail {D}:s1:pass"
    only_first = await run(make(max_signatures=1), data)
    assert [e.result for e in entries(only_first)] == ["fail"]


@needs_perl
async def test_dns_trouble_is_a_temperror_never_scored(make: Factory, dns_dk: DnsServer) -> None:
    dns_dk.servfail(f"s1._domainkey.{D}")
    result = await run(make(fail_score=5.0, permerror_score=5.0), perl_sign())
    assert result.verdict is Verdict.ERROR
    assert result.score == 0
    assert entries(result)[0].result == "temperror"


# ---------------------------------------------------------------------------------------------
# Keys and signatures that cannot be used


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ("revoked", "key revoked"),
        ("ed", "key is not an RSA key"),
        ("garbage", "malformed public key"),
        ("broken", "malformed key record: not a tag=value pair: 'this is no key record'"),
        ("nokey", "no key record"),
    ],
)
async def test_unusable_keys_are_permerrors(make: Factory, selector: str, reason: str) -> None:
    data = signature(f"a=rsa-sha1; c=simple; d={D}; q=dns; s={selector}; {JUNK_B}") + MESSAGE
    result = await run(make(permerror_score=0.5), data)
    assert result.verdict is Verdict.FAIL
    assert result.score == 0.5
    assert entries(result)[0].result == "permerror"
    assert entries(result)[0].reason == reason


BAD_SIGNATURES = {
    "not a tag list": ("this is not a signature", "neutral", "malformed signature: not a tag=value pair:"),
    "no b=": (f"a=rsa-sha1; d={D}; s=s1", "neutral", "signature has no b= tag"),
    "empty b=": (f"a=rsa-sha1; d={D}; s=s1; b=", "neutral", "signature has no b= tag"),
    "no d=": (f"a=rsa-sha1; s=s1; {JUNK_B}", "neutral", "signature has no d= tag"),
    "no s=": (f"a=rsa-sha1; d={D}; {JUNK_B}", "neutral", "signature has no s= tag"),
    "rsa-sha256": (f"a=rsa-sha256; d={D}; s=s1; {JUNK_B}", "neutral", "unknown algorithm a=rsa-sha256"),
    "relaxed": (f"c=relaxed; d={D}; s=s1; {JUNK_B}", "neutral", "unknown canonicalization c=relaxed"),
    "q=http": (f"q=http; d={D}; s=s1; {JUNK_B}", "neutral", "unknown query method q=http"),
    "d= no domain": (f"d=dk test; s=s1; {JUNK_B}", "neutral", "d= or s= is not a domain name"),
    "b= not base64": (f"d={D}; s=s1; b=****", "neutral", "b= is not base64"),
    "tag twice": (f"d={D}; d={D}; s=s1; {JUNK_B}", "neutral", "malformed signature: tag d= appears twice"),
    "other domain": (f"d=example.net; s=s1; {JUNK_B}", "policy", "d=example.net is not the sender's domain"),
    "parent of the wrong kind": (
        f"d=test.example.dk; s=s1; {JUNK_B}",
        "policy",
        "d=test.example.dk is not the sender's domain",
    ),
    "From not in h=": (f"d={D}; s=s1; h=to:subject; {JUNK_B}", "policy", "the From field is not signed"),
}


@pytest.mark.parametrize("case", list(BAD_SIGNATURES), ids=list(BAD_SIGNATURES))
async def test_bad_signatures_get_a_result_and_a_reason(make: Factory, dns_dk: DnsServer, case: str) -> None:
    """Malformed: neutral; not acceptable for this sender: policy; no key is fetched for them."""
    tags, expected, reason = BAD_SIGNATURES[case]
    result = await run(make(), signature(tags) + MESSAGE)
    (entry,) = entries(result)
    assert entry.result == expected
    assert entry.reason.startswith(reason)
    assert not dns_dk.queries


async def test_a_from_above_the_signature_is_not_signed(make: Factory) -> None:
    """The signature covers only what is below it: a From above it gives policy."""
    lines = MESSAGE.split(b"\r\n")
    data = lines[0] + b"\r\n" + signature(f"d={D}; s=s1; {JUNK_B}") + b"\r\n".join(lines[1:])
    (entry,) = entries(await run(make(), data))
    assert (entry.result, entry.reason) == ("policy", "the From field is not signed")


@pytest.mark.parametrize(
    "data",
    [
        signature(f"d={D}; s=s1; {JUNK_B}") + b"To: bob@example.org\r\n\r\nbody\r\n",
        signature(f"d={D}; s=s1; {JUNK_B}") + b"From: undisclosed-recipients:;\r\n\r\nbody\r\n",
        signature(f"d={D}; s=s1; {JUNK_B}") + b"Sender: nobody\r\n" + MESSAGE,
    ],
    ids=["no From", "From without an address", "Sender without an address"],
)
async def test_no_sending_address_is_a_permerror(make: Factory, data: bytes) -> None:
    (entry,) = entries(await run(make(), data))
    assert (entry.result, entry.reason) == ("permerror", "no sending address in Sender or From")


async def test_random_damage_never_raises(make: Factory) -> None:
    """Signature bytes flipped, cut or repeated at random: a result word, never an exception."""
    rng = random.Random(4870)
    base = signature(f"a=rsa-sha1; c=nofws; d={D}; h=from:to:subject; q=dns; s=s1; {JUNK_B}") + MESSAGE
    check = make()
    for _ in range(80):
        damaged = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(160)
            action = rng.choice(("flip", "cut", "insert"))
            if action == "flip":
                damaged[pos] = rng.randrange(256)
            elif action == "cut":
                del damaged[pos : pos + rng.randint(1, 20)]
            else:
                damaged[pos:pos] = rng.choice((b";", b"=", b"\r\n", b"\r\n\t", b"\x00", b"s=", b"h=:"))
        result = await run(check, bytes(damaged))
        assert result.facts["domainkeys.result"] in ("pass", "fail", "policy", "neutral", "permerror", "none")


async def test_no_message_is_skipped(make: Factory) -> None:
    result = await make().check(Stage.CONTENT, Transaction(stage=Stage.CONTENT))
    assert result.verdict is Verdict.SKIP
    assert result.auth == ()


# ---------------------------------------------------------------------------------------------
# The signed data (RFC 4870 3.4.2), byte for byte


def _data(text: str, tags: str = "") -> tuple[Message, int]:
    message = Message.parse(signature(tags or f"d={D}; s=s1; b=x") + text.encode())
    return message, 0


def test_simple_keeps_lines_and_drops_empty_lines_at_the_end() -> None:
    message, index = _data("From: a@b.example\r\nSubject:  x\r\n\ty \r\n\r\nbody  \r\n\r\n \r\n\r\n")
    assert canonical_data(message, index, None, "simple") == (
        b"From: a@b.example\r\nSubject:  x\r\n\ty \r\n\r\nbody  \r\n\r\n \r\n"
    )


def test_nofws_removes_all_white_space_and_unfolds() -> None:
    message, index = _data("From: a@b.example\r\nSubject:  x\r\n\ty \r\n\r\nbo dy\t \r\n\r\n \r\n\r\n")
    assert canonical_data(message, index, None, "nofws") == b"From:a@b.example\r\nSubject:xy\r\n\r\nbody\r\n"


def test_an_empty_body_leaves_out_the_separator_too() -> None:
    message, index = _data("From: a@b.example\r\n\r\n")
    assert canonical_data(message, index, None, "simple") == b"From: a@b.example\r\n"
    message, index = _data("From: a@b.example\r\n")
    assert canonical_data(message, index, None, "nofws") == b"From:a@b.example\r\n"


def test_h_takes_every_occurrence_in_message_order() -> None:
    message, index = _data("Received: r1\r\nTo: t1\r\nFrom: f\r\nTo: t2\r\n\r\nb\r\n")
    signed = frozenset({"to", "from"})
    assert canonical_data(message, index, signed, "simple") == b"To: t1\r\nFrom: f\r\nTo: t2\r\n\r\nb\r\n"


def test_a_body_without_a_final_line_end_keeps_its_last_line() -> None:
    message, index = _data("From: f\r\n\r\nline one\r\nlast")
    assert canonical_data(message, index, None, "simple") == b"From: f\r\n\r\nline one\r\nlast\r\n"


# ---------------------------------------------------------------------------------------------
# Mail::DKIM's verifier agrees


async def perl_verify(server: DnsServer, tmp_path: Path, messages: list[bytes]) -> list[str]:
    files = []
    for number, data in enumerate(messages):
        path = tmp_path / f"dk{number}.eml"
        path.write_bytes(data)
        files.append(str(path))
    process = await asyncio.create_subprocess_exec(
        "perl",
        "-e",
        VERIFY,
        str(server.port),
        *files,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode("utf-8", "replace")
    lines = out.decode("utf-8", "replace").splitlines()
    assert len(lines) == len(messages)
    return [line.partition("\t")[0] for line in lines]


@needs_perl
async def test_mxward_and_mail_dkim_agree_on_a_corpus(
    make: Factory, dns_dk: DnsServer, tmp_path: Path
) -> None:
    """Signed, altered, wrong-key, testing and malformed messages: pass where Mail::DKIM passes,
    fail where it fails, and neither pass nor fail where it finds the signature invalid."""
    corpus = [
        perl_sign(method="simple"),
        perl_sign(method="nofws", headers="*"),
        perl_sign(method="nofws", headers="from:subject:date"),
        perl_sign(MESSAGE.replace(b"alice@", b"news-x@"), selector="star"),
        perl_sign(selector="dkim1"),
        ALTERATIONS["body word"](perl_sign()),
        ALTERATIONS["signed header"](perl_sign(method="nofws")),
        WHITESPACE_ONLY["spaces inside a line"](perl_sign()),
        perl_sign(selector="wrong"),
        perl_sign(MESSAGE.replace(b"alice@", b"bob@"), selector="alice"),
        signature(f"a=rsa-sha1; d={D}; s=revoked; {JUNK_B}") + MESSAGE,
        signature(f"a=rsa-sha1; d=example.net; s=s1; {JUNK_B}") + MESSAGE,
        signature(f"a=rsa-sha256; d={D}; s=s1; {JUNK_B}") + MESSAGE,
    ]
    theirs = await perl_verify(dns_dk, tmp_path, corpus)
    ours = [str((await run(make(), data)).facts["domainkeys.result"]) for data in corpus]
    pairs = list(zip(ours, theirs, strict=True))
    assert pairs[:5] == [("pass", "pass")] * 5
    for number, (mine, perl) in enumerate(pairs):
        if perl in ("pass", "fail"):
            assert mine == perl, (number, mine, perl)
        else:
            assert perl == "invalid", (number, perl)
            assert mine in ("neutral", "policy", "permerror"), (number, mine)


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_signatures": 0}, "max_signatures 0"),
        ({"min_key_bits": 100}, "min_key_bits 100"),
        ({"fail_score": float("nan")}, "fail_score must be a finite number"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=re.escape(message)):
        build_settings(Options, options, source="test.toml", table="checks.domainkeys")


def test_the_check_is_not_on_by_default() -> None:
    """DomainKeys runs only when listed in [filter] checks."""
    from mxward.shared.config import FilterSettings

    assert "domainkeys" not in FilterSettings().checks

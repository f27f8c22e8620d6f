"""dkim against an independent implementation: Perl's Mail::DKIM (Debian's libmail-dkim-perl).

Both directions over the corpus in tests/data/dkim/corpus (multipart, 8-bit, long lines, folded
headers, an empty body, trailing white space, no final line end; stored with LF line ends and
sent with CRLF, as SMTP carries them): what Mail::DKIM signs, with every canonicalization,
verifies with mxward and altered copies fail; what mxward signs (RSA-2048 and Ed25519) verifies
with Mail::DKIM. Mail::DKIM asks for keys only the test DNS server (tests/data/dkim/dkimverify.pl
takes its address), which serves tests/data/dkim/dkim.zone on loopback.

Debian 12's Mail::DKIM (1.20230212) has no Ed25519 (it came with a later release): where it is
missing, Mail::DKIM must call mxward's Ed25519 signatures unsupported (never "fail") and pass
the RSA signature beside them, and the Ed25519 direction from Mail::DKIM is not run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import dkim  # type: ignore[import-untyped]
import pytest
from support.dnsserver import ThreadedDnsServer
from support.filter_inproc import RunningFilter, filter_config, running_filter, stuffed
from support.postfix import SmtpSink

from mxward.contentfilter.checks.dkim import DkimCheck, Options, SigningKey
from mxward.contentfilter.message import Message
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import Services, Stage, Transaction
from mxward.shared.state import StateSettings, StateStore

DATA = Path(__file__).resolve().parents[2] / "data" / "dkim"
ZONE = DATA / "dkim.zone"
CORPUS = sorted((DATA / "corpus").glob("*.eml"))
_SIGN = ("perl", str(DATA / "dkimsign.pl"))
_ED = ("--selector", "ed", "--algorithm", "ed25519-sha256")
METHODS = ("simple/simple", "relaxed/relaxed", "relaxed/simple", "simple/relaxed")


def _perl_has(module: str) -> bool:
    return subprocess.run(["perl", f"-M{module}", "-e1"], capture_output=True, check=False).returncode == 0


if shutil.which("perl") is None or not _perl_has("Mail::DKIM"):
    pytest.fail(
        "Perl's Mail::DKIM is required for the DKIM interop tests: apt-get install libmail-dkim-perl",
        pytrace=False,
    )


def _perl_signs_ed25519() -> bool:
    """Whether this Mail::DKIM can make an Ed25519 signature (versions after Debian 12's)."""
    done = subprocess.run(
        [*_SIGN, "--key", str(DATA / "example.com.ed.key"), "--domain", "example.com", *_ED],
        input=b"From: a@example.com\r\n\r\nbody\r\n",
        capture_output=True,
        check=False,
        timeout=60,
    )
    return done.returncode == 0


PERL_ED25519 = _perl_signs_ed25519()


def dkimpy_sign_ed25519(message: bytes, key_file: Path) -> bytes:
    """``message`` signed by dkimpy with the Ed25519 key of selector "ed" (relaxed/relaxed)."""
    import dkim

    from mxward.contentfilter.dkimkeys import load_private_key

    key = load_private_key(key_file)  # material: the base64 seed, as dkimpy takes it
    field = dkim.sign(
        message,
        b"ed",
        b"example.com",
        key.material,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=b"ed25519-sha256",
        include_headers=[b"from", b"to", b"subject", b"date"],
    )
    return field + message


class Verdict(NamedTuple):
    result: str
    domain: str
    selector: str
    algorithm: str
    detail: str


@pytest.fixture(scope="module")
def dns() -> Iterator[ThreadedDnsServer]:
    with ThreadedDnsServer([ZONE]) as server:
        yield server


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    for path in DATA.glob("*.key"):
        shutil.copy(path, folder / path.name)
        os.chmod(folder / path.name, 0o600)
    return folder


def corpus(path: Path) -> bytes:
    return path.read_bytes().replace(b"\n", b"\r\n")


def perl_sign(
    message: bytes, key: Path, selector: str, *, method: str, algorithm: str = "rsa-sha256"
) -> bytes:
    done = subprocess.run(
        [
            *_SIGN,
            "--key",
            str(key),
            "--domain",
            "example.com",
            "--selector",
            selector,
            *("--method", method, "--algorithm", algorithm),
        ],
        input=message,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b"DKIM-Signature:")
    return done.stdout


def perl_verify(message: bytes, dns: ThreadedDnsServer) -> tuple[list[Verdict], str]:
    done = subprocess.run(
        ["perl", str(DATA / "dkimverify.pl"), "--dns", dns.nameserver],
        input=message,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert lines[-1].startswith("message "), lines
    signatures = [Verdict(*[*line.split(" ", 4), ""][:5]) for line in lines[:-1]]
    return signatures, lines[-1].split()[1]


def services(dns: ThreadedDnsServer) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=(dns.nameserver,), timeout=1.0, lifetime=3.0)),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(1_700_000_000.0),
        hostname="mx.test.example",
    )


async def mxward_results(message: bytes, dns: ThreadedDnsServer, **options: Any) -> list[str]:
    check = DkimCheck(Options(**options), services(dns))
    result = await check.check(
        Stage.CONTENT, Transaction(stage=Stage.CONTENT, message=Message.parse(message))
    )
    return [f"{dict(a.properties)['header.s']}:{a.result}" for a in result.auth]


def dkimpy_verifies(message: bytes) -> bool:
    """dkimpy's own verdict, with the key of tests/data/dkim/dkim.zone."""
    record = next(
        line.split("TXT ", 1)[1]
        for line in ZONE.read_text().splitlines()
        if line.startswith("rsa._domainkey TXT")
    )
    text = "".join(part for part in record.split('"')[1::2]).encode()
    try:
        return bool(dkim.verify(message, dnsfunc=lambda name, timeout=5: text))
    except dkim.DKIMException:
        return False


def alter_body(message: bytes) -> bytes:
    head, sep, body = message.partition(b"\r\n\r\n")
    return head + sep + b"An added first line.\r\n" + body


def alter_header(message: bytes) -> bytes:
    altered = message.replace(b"\r\nSubject: ", b"\r\nSubject: Re: ", 1)
    assert altered != message
    return altered


def test_the_corpus_has_what_it_claims() -> None:
    """The corpus files kept their awkward bytes (an editor that strips white space breaks this)."""
    data = {path.name: corpus(path) for path in CORPUS}
    assert b"last line  \r\n\r\n\r\n" in data["trailing-whitespace.eml"]
    assert data["empty-body.eml"].endswith(b"\r\n\r\n")
    assert not data["no-final-newline.eml"].endswith(b"\n")
    assert max(len(line) for line in data["long-lines.eml"].split(b"\r\n")) > 998
    assert b"\xe9 stays raw" in data["8bit.eml"]
    assert b"\r\n\tdave@example.org" in data["folded-headers.eml"]
    assert b"Content-Type: multipart/mixed" in data["multipart.eml"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
async def test_mail_dkim_signatures_verify_with_mxward(
    dns: ThreadedDnsServer, keydir: Path, path: Path, method: str
) -> None:
    """Mail::DKIM signs (RSA-2048): mxward says pass; altered body or header: both say fail."""
    signed = perl_sign(corpus(path), keydir / "example.com.rsa.key", "rsa", method=method)
    assert perl_verify(signed, dns)[1] == "pass"
    if path.name == "no-final-newline.eml" and method.endswith("/simple"):
        # RFC 6376 section 3.4.3: "simple" adds a CRLF to a body that does not end in one;
        # Mail::DKIM does not, so the two disagree (dkimpy sides with mxward). Such a message
        # cannot travel by SMTP anyway: the CRLF before the final dot ends its last line
        # (RFC 5321 section 4.1.1.4), and then both agree (the next assertion).
        assert await mxward_results(signed, dns) == ["rsa:fail"]
        assert not dkimpy_verifies(signed)
        assert await mxward_results(
            perl_sign(corpus(path) + b"\r\n", keydir / "example.com.rsa.key", "rsa", method=method), dns
        ) == ["rsa:pass"]
        return
    assert await mxward_results(signed, dns) == ["rsa:pass"]
    for altered in (alter_body(signed), alter_header(signed)):
        assert await mxward_results(altered, dns) == ["rsa:fail"]
        assert perl_verify(altered, dns)[1] == "fail"


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
async def test_independent_ed25519_signatures_verify_with_mxward(
    dns: ThreadedDnsServer, keydir: Path, path: Path
) -> None:
    """An independent signer signs with Ed25519: mxward says pass, and fail for an altered copy.

    Mail::DKIM when it can (Debian 12's 1.20230212 has no Ed25519 signer), else dkimpy.
    """
    if PERL_ED25519:
        signed = perl_sign(
            corpus(path),
            keydir / "example.com.ed.key",
            "ed",
            method="relaxed/relaxed",
            algorithm="ed25519-sha256",
        )
    else:
        signed = dkimpy_sign_ed25519(corpus(path), keydir / "example.com.ed.key")
    assert await mxward_results(signed, dns) == ["ed:pass"]
    assert await mxward_results(alter_body(signed), dns) == ["ed:fail"]


async def test_a_mail_dkim_sha1_signature_is_policy(dns: ThreadedDnsServer, keydir: Path) -> None:
    """rsa-sha1 from Mail::DKIM: it verifies (pass with allow_sha1) but is "policy" by default."""
    signed = perl_sign(
        corpus(CORPUS[0]),
        keydir / "example.com.rsa.key",
        "rsa",
        method="relaxed/relaxed",
        algorithm="rsa-sha1",
    )
    assert await mxward_results(signed, dns) == ["rsa:policy"]
    assert await mxward_results(signed, dns, allow_sha1=True) == ["rsa:pass"]


async def mxward_sign(message: bytes, dns: ThreadedDnsServer, keydir: Path) -> bytes:
    keys = (
        SigningKey(domain="example.com", selector="rsa", key_file=str(keydir / "example.com.rsa.key")),
        SigningKey(
            domain="example.com",
            selector="ed",
            key_file=str(keydir / "example.com.ed.key"),
            algorithm="ed25519-sha256",
        ),
    )
    check = DkimCheck(Options(keys=keys), services(dns))
    await check.start()
    fields = await check.outgoing(Transaction(stage=Stage.CONTENT, sasl_username="alice"), message)
    assert len(fields) == 2
    return b"".join(f.encode("ascii") + b"\r\n" for f in fields) + message


def assert_mail_dkim_passes(signed: bytes, dns: ThreadedDnsServer) -> None:
    signatures, overall = perl_verify(signed, dns)
    by_selector = {v.selector: v for v in signatures}
    assert overall == "pass"
    assert by_selector["rsa"].result == "pass", by_selector["rsa"]
    if PERL_ED25519:
        assert by_selector["ed"].result == "pass", by_selector["ed"]
    else:
        assert (by_selector["ed"].result, by_selector["ed"].detail) == (
            "invalid",
            "invalid (unsupported algorithm ed25519-sha256)",
        )


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
async def test_mxward_signatures_verify_with_mail_dkim(
    dns: ThreadedDnsServer, keydir: Path, path: Path
) -> None:
    """mxward signs with RSA-2048 and Ed25519: Mail::DKIM passes them; altered copies fail."""
    signed = await mxward_sign(corpus(path), dns, keydir)
    assert_mail_dkim_passes(signed, dns)
    assert await mxward_results(signed, dns) == ["rsa:pass", "ed:pass"]
    for altered in (alter_body(signed), alter_header(signed)):
        signatures, overall = perl_verify(altered, dns)
        assert overall == "fail"
        assert {v.selector: v.result for v in signatures}["rsa"] == "fail"
        assert await mxward_results(altered, dns) == ["rsa:fail", "ed:fail"]


# ---------------------------------------------------------------------------------------------
# Through the content filter


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink(xforward=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def flt(
    tmp_path: Path, redis_server: Any, sink: SmtpSink, dns: ThreadedDnsServer, keydir: Path
) -> AsyncIterator[RunningFilter]:
    keys = [
        {"domain": "example.com", "selector": "rsa", "key_file": str(keydir / "example.com.rsa.key")},
        {
            "domain": "example.com",
            "selector": "ed",
            "key_file": str(keydir / "example.com.ed.key"),
            "algorithm": "ed25519-sha256",
        },
    ]
    config = filter_config(
        tmp_path,
        redis_server.url,
        sink.port,
        {"checks": ["dkim"]},  # (the corpus' dates are old: headers would quarantine them)
        dns={"nameservers": [dns.nameserver]},
        checks={"dkim": {"keys": keys, "sign_networks": ["192.0.2.0/24"]}},
    )
    async with running_filter(config, sink) as running:
        yield running


async def send(flt: RunningFilter, data: bytes, client: str, rcpt: str) -> int:
    talk = await flt.talk()
    try:
        assert (await talk.cmd(f"XFORWARD ADDR={client}"))[0] == 250
        assert (await talk.cmd("MAIL FROM:<alice@example.com>"))[0] == 250
        assert (await talk.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await talk.cmd("DATA"))[0] == 354
        await talk.send(stuffed(data))
        return (await talk.reply())[0]
    finally:
        await talk.close()


async def test_the_filter_signs_outgoing_mail_over_its_final_form(
    flt: RunningFilter, sink: SmtpSink, dns: ThreadedDnsServer
) -> None:
    """Mail from sign_networks leaves with both signatures on top, valid for Mail::DKIM."""
    assert await send(flt, corpus(DATA / "corpus" / "multipart.eml"), "192.0.2.25", "out@sink.test") == 250
    delivered = (await sink.wait_delivered_async("out@sink.test")).data
    assert delivered.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert b"\r\nAuthentication-Results: mx.test.example;" in delivered.split(b"\r\n\r\n")[0]
    assert_mail_dkim_passes(delivered, dns)


async def test_the_filter_reports_mail_dkim_signatures(
    flt: RunningFilter, sink: SmtpSink, dns: ThreadedDnsServer, keydir: Path
) -> None:
    """Incoming mail signed by Mail::DKIM arrives with dkim=pass in Authentication-Results, unsigned."""
    signed = perl_sign(
        corpus(DATA / "corpus" / "plain.eml"), keydir / "example.com.rsa.key", "rsa", method="simple/simple"
    )
    assert await send(flt, signed, "198.51.100.9", "in@sink.test") == 250
    delivered = await sink.wait_delivered_async("in@sink.test")
    (results,) = delivered.headers("Authentication-Results")
    assert "dkim=pass header.d=example.com header.s=rsa header.a=rsa-sha256" in " ".join(results.split())
    assert delivered.data.count(b"DKIM-Signature:") == 1

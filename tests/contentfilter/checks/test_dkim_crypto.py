"""dkim: the RSA and Ed25519 operations (OpenSSL through cryptography, PyNaCl) give the results
of the pure-Python ones they replaced.

Verification is compared with dkimpy's own RSASSA-PKCS1-v1_5 check (plus the exact-length and
below-the-modulus rules), over good signatures and crafted bad encodings; signing is compared
byte for byte with dkimpy's signer (RSA-PKCS1-v1_5 and Ed25519 signatures are deterministic).
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.crypto import RSASSA_PKCS1_v1_5_verify  # type: ignore[import-untyped]

from mxward.contentfilter.checks.dkim import DkimCheck, Options, SigningKey, rsa_verify
from mxward.contentfilter.dkimkeys import DkimKeyError, parse_private_key_text
from mxward.contentfilter.message import Message
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import Services
from mxward.shared.state import StateSettings, StateStore

DATA = Path(__file__).resolve().parents[2] / "data" / "dkim"

_PREFIX = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
}
_SHA256_NO_NULL = bytes.fromhex("302f300b06096086480165030402010420")


def reference(digest: bytes, hash_name: str, signature: bytes, n: int, e: int) -> bool:
    """The pure-Python verdict: exact length, below the modulus, dkimpy's comparison."""
    size = (n.bit_length() + 7) // 8
    if len(signature) != size or int.from_bytes(signature, "big") >= n:
        return False

    class Hash:  # what dkimpy's check reads of a hash object
        name = hash_name

        @staticmethod
        def digest() -> bytes:
            return digest

    try:
        return bool(RSASSA_PKCS1_v1_5_verify(Hash, signature, {"modulus": n, "publicExponent": e}))
    except Exception:  # dkimpy's DigestTooLargeError: a modulus too short for the hash
        return False


def encodings(size: int, digest: bytes, hash_name: str) -> list[bytes]:
    """Encoded messages: the right one and near misses an RSA check must refuse."""
    info = _PREFIX[hash_name] + digest

    def em(block: bytes, body: bytes) -> bytes:
        return b"\x00" + block + b"\xff" * (size - len(body) - 3) + b"\x00" + body

    other = "sha1" if hash_name == "sha256" else "sha256"
    return [
        em(b"\x01", info),
        em(b"\x02", info),
        em(b"\x01", info + b"\x00"),  # trailing garbage after the digest
        em(b"\x01", _SHA256_NO_NULL + digest),  # DigestInfo without the NULL parameters
        em(b"\x01", info[:-1] + bytes([info[-1] ^ 1])),  # another digest
        em(b"\x01", _PREFIX[other] + hashlib.new(other, b"x").digest()),
        b"\x00\x01" + b"\xff" * 4 + b"\x00" * (size - len(info) - 7) + b"\x00" + info,  # short padding
    ]


@pytest.mark.parametrize(("bits", "exponent"), [(1024, 65537), (2048, 65537), (2048, 3), (3072, 65537)])
def test_rsa_verify_agrees_with_the_pure_python_check(bits: int, exponent: int) -> None:
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    numbers = key.private_numbers()
    n, e, d = numbers.public_numbers.n, numbers.public_numbers.e, numbers.d
    size = (n.bit_length() + 7) // 8
    rng = random.Random(bits + exponent)
    verdicts = []
    for hash_name in ("sha256", "sha1"):
        for text in (b"", b"a", b"lunch at noon?"):
            digest = hashlib.new(hash_name, text).digest()
            signatures = [
                pow(int.from_bytes(m, "big"), d, n).to_bytes(size, "big")
                for m in encodings(size, digest, hash_name)
            ]
            good = signatures[0]
            signatures += [
                good[:-1],
                good + b"\x00",
                b"\x00" + good[:-1],
                n.to_bytes(size, "big"),
                (n - 1).to_bytes(size, "big"),
                bytes(size),
                (1).to_bytes(size, "big"),
                rng.randbytes(size),
                bytes([good[0] ^ 0x80]) + good[1:],
            ]
            for signature in signatures:
                for name in ("sha256", "sha1"):
                    probe = digest if name == hash_name else hashlib.new(name, text).digest()
                    ours = rsa_verify(probe, name, signature, n, e)
                    assert ours == reference(probe, name, signature, n, e), (hash_name, name, signature.hex())
                    verdicts.append(ours)
    assert verdicts.count(True) == 6  # each good signature, for its own hash only


def test_keys_openssl_refuses_are_still_checked() -> None:
    """Odd keys (exponent 1, an exponent over 64 bits, an even modulus) keep their old results."""
    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers().public_numbers.n
    size = (n.bit_length() + 7) // 8
    digest = hashlib.sha256(b"x").digest()
    right = encodings(size, digest, "sha256")[0]
    for modulus, exponent in ((n, 1), (n, (1 << 70) + 1), (n + 1, 65537), (n, 2)):
        for signature in (right, encodings(size, digest, "sha256")[1], bytes(size)):
            ours = rsa_verify(digest, "sha256", signature, modulus, exponent)
            assert ours == reference(digest, "sha256", signature, modulus, exponent)
    assert rsa_verify(digest, "sha256", right, n, 1)  # exponent 1: the encoding is its own signature


def test_a_digest_of_the_wrong_size_never_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_numbers()
    size = (public.n.bit_length() + 7) // 8
    digest = hashlib.sha256(b"x").digest()
    good = pow(int.from_bytes(encodings(size, digest, "sha256")[0], "big"), key.private_numbers().d, public.n)
    assert rsa_verify(digest, "sha256", good.to_bytes(size, "big"), public.n, public.e)
    assert not rsa_verify(digest[:-1], "sha256", good.to_bytes(size, "big"), public.n, public.e)


# ---------------------------------------------------------------------------------------------
# Signing


MESSAGES = [
    (
        b"From: Alice Example <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: lunch\r\n"
        b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
        b"Hello Bob,\r\nlunch  at noon?   \r\n\r\n"
    ),
    (
        b"Received: from a\r\nFrom: alice@example.com\r\nSubject:  a folded\r\n\tsubject  line \r\n"
        b"Cc: c@example.org, d@example.org\r\nCc: e@example.org\r\nReply-To: r@example.com\r\n"
        b"List-Id: <x.example.com>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ),
    b"From: alice@example.com\r\nSubject: " + b"long " * 60 + b"\r\n\r\n" + b"x" * 5000 + b"\r\n",
]


@pytest.fixture
def check(tmp_path: Path) -> DkimCheck:
    keys = []
    for name, selector, algorithm in (
        ("example.com.rsa.key", "rsa", "rsa-sha256"),
        ("example.com.ed.key", "ed", "ed25519-sha256"),
        ("example.net.rsa.key", "rsa", "rsa-sha256"),
    ):
        shutil.copy(DATA / name, tmp_path / name)
        os.chmod(tmp_path / name, 0o600)
        domain = name.split(".rsa")[0].split(".ed")[0]
        keys.append(
            SigningKey(domain=domain, selector=selector, key_file=str(tmp_path / name), algorithm=algorithm)  # type: ignore[arg-type]
        )
    services = Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",), timeout=1.0, lifetime=2.0)),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(1_700_000_000.0),
        hostname="mx.test.example",
    )
    return DkimCheck(Options(keys=tuple(keys), check_published_keys=False), services)


@pytest.mark.parametrize("raw", MESSAGES)
async def test_signatures_are_byte_for_byte_dkimpys(check: DkimCheck, raw: bytes) -> None:
    await check.start()
    message = Message.parse(raw)
    include = check.header_list(message)
    signers = [*check.signers_for("example.com"), *check.signers_for("example.net")]
    assert len(signers) == 3
    for signer in signers:
        theirs = dkim.sign(
            raw,
            signer.selector.encode(),
            signer.domain.encode(),
            signer.key.material,
            signature_algorithm=signer.key.algorithm.encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=include,
        ).decode("ascii")
        timestamp = int(re.search(r"\bt=(\d+);", theirs).group(1))  # type: ignore[union-attr]
        (ours,) = check.sign(message, [signer], timestamp=timestamp)
        assert ours == theirs.rstrip("\r\n")
        b = base64.b64decode("".join(ours.split("b=")[-1].split()))
        assert len(b) == (256 if signer.key.kind == "rsa" else 64)


def test_a_message_without_from_is_not_signed(check: DkimCheck) -> None:
    message = Message.parse(b"Subject: x\r\n\r\nbody\r\n")
    no_from = DkimCheck(Options(oversign_headers=(), sign_headers=("From", "Subject")), check.services)
    with pytest.raises(ValueError, match="no From field"):
        no_from.sign(message, ())


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def test_an_rsa_key_whose_numbers_do_not_fit_is_refused() -> None:
    """A private key whose primes do not make its modulus would sign what nobody can verify."""
    key = parse_private_key_text((DATA / "example.com.rsa.key").read_bytes())
    assert key.handle is not None
    numbers = key.handle.private_numbers()  # type: ignore[union-attr]
    values = [
        0,
        numbers.public_numbers.n + 2,
        numbers.public_numbers.e,
        numbers.d,
        numbers.p,
        numbers.q,
        numbers.dmp1,
        numbers.dmq1,
        numbers.iqmp,
    ]
    der = _der(0x30, b"".join(_der(0x02, v.to_bytes(v.bit_length() // 8 + 1, "big")) for v in values))
    body = base64.b64encode(der)
    pem = b"-----BEGIN RSA PRIVATE KEY-----\n" + body + b"\n-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(DkimKeyError, match="not a valid RSA private key"):
        parse_private_key_text(pem)

"""DKIM keys: load private keys, make new ones, write and compare the DNS key records.

The dkim check signs with the keys of its key table (``[[checks.dkim.keys]]``) and
``mxward dkim`` manages them; both use this module. A key lives in one file, readable by the
daemon and by nobody else.

Private key files
    RSA: PEM, either PKCS#1 (``-----BEGIN RSA PRIVATE KEY-----``, what ``openssl genrsa
    -traditional``, OpenDKIM's ``opendkim-genkey`` and rspamd write) or unencrypted PKCS#8
    (``-----BEGIN PRIVATE KEY-----``, OpenSSL 3's default). Ed25519: unencrypted PKCS#8 PEM
    (``openssl genpkey -algorithm ed25519``), or a file holding only the base64 of the 32-byte
    seed (dkimpy's ``dknewkey`` format). Encrypted keys are refused: a daemon that starts by
    itself has nobody to type a passphrase. OpenSSL (through ``cryptography``) reads the RSA
    keys and refuses one whose numbers do not make a single RSA key.
    A key file must be a regular file that other users can neither read nor write, and that
    its group cannot write (``0600``, or ``0640`` with the daemon's group); anything else is
    refused with a message that says how to fix it.

``mxward dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--bits 2048] [--dir PATH]``
    Writes a new private key to ``PATH/DOMAIN.SELECTOR.key`` (PATH: ``/etc/mxward/dkim``) with
    mode ``0600``, creating PATH with mode ``0700`` when it does not exist; an existing file is
    never overwritten. RSA keys (2048 bits unless ``--bits`` says 1024 to 4096) are made by the
    ``openssl`` command (Debian's package of the same name; Postfix depends on it) and written
    as PKCS#1; Ed25519 keys are made with PyNaCl and written as PKCS#8. It prints the DNS
    record for the zone file on standard output (the TXT text cut into strings of at most 255
    characters, RFC 1035 section 3.3, as an RSA-2048 key needs), and the table entry for
    ``[checks.dkim]`` on standard error.
``mxward dkim record KEYFILE [--domain D --selector S]``
    Prints the DNS record of an existing key.
``mxward dkim check``
    Looks up the published record of every key in ``[checks.dkim] keys`` and says for each
    whether it matches the private key; exit status 1 when one does not.

Key records (RFC 6376 section 3.6.1, RFC 8463): ``v=DKIM1; k=rsa; p=<base64 of the
SubjectPublicKeyInfo>`` and ``v=DKIM1; k=ed25519; p=<base64 of the 32-byte public key>``.
A published record matches a private key when it is a DKIM key record whose key type and
public key are the same (an RSA key is compared by modulus and exponent, so a record that
carries the bare RSAPublicKey instead of the SubjectPublicKeyInfo matches too).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.crypto import UnparsableKeyError, parse_public_key  # type: ignore[import-untyped]
from dkim.util import InvalidTagValueList, parse_tag_value  # type: ignore[import-untyped]

from mxward.shared.dns import DnsError, DnsTempError, normalize_domain

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from mxward.shared.dns import Resolver

__all__ = [
    "ALGORITHMS",
    "DEFAULT_KEY_DIR",
    "Algorithm",
    "DkimKeyError",
    "PrivateKey",
    "add_parser",
    "check_published",
    "dns_name",
    "domain_name",
    "generate_key",
    "key_record",
    "load_private_key",
    "parse_private_key_text",
    "published_mismatch",
    "run_command",
    "selector_name",
    "txt_strings",
    "write_key_file",
    "zone_record",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
_Handle = rsa.RSAPrivateKey | nacl.signing.SigningKey
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("rsa-sha256", "ed25519-sha256")
DEFAULT_KEY_DIR: Final = "/etc/mxward/dkim"
MIN_RSA_BITS: Final = 1024
MAX_RSA_BITS: Final = 4096
_MAX_KEY_FILE: Final = 64 * 1024

# DER of a PKCS#8 Ed25519 key up to its 32-byte seed (RFC 8410 section 7): version 0, and
# version 1, which carries the public key after the seed.
_ED25519_PKCS8_V0: Final = bytes.fromhex("302e020100300506032b657004220420")
_ED25519_PKCS8_V1: Final = bytes.fromhex("3051020101300506032b657004220420")
_ED25519_PUBLIC_TAG: Final = bytes.fromhex("812100")
_RSA_OID: Final = bytes.fromhex("06092a864886f70d0101010500")  # rsaEncryption, NULL parameters
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)\r?\n?-----END \1-----", re.DOTALL)
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class DkimKeyError(Exception):
    """A key file cannot be used (unreadable, unsafe permissions, not a key); the text says why."""


@dataclass(frozen=True, slots=True)
class PrivateKey:
    """A private key ready for signing, and the public half that goes into DNS.

    ``material`` is what dkimpy's signer takes (PEM for RSA, the base64 seed for Ed25519);
    ``public`` is what ``p=`` carries (the SubjectPublicKeyInfo DER for RSA, the 32-byte key
    for Ed25519). :meth:`sign_digest` signs with the key loaded once: OpenSSL's RSA (through
    ``cryptography``), PyNaCl's Ed25519.
    """

    algorithm: Algorithm
    bits: int
    public: bytes
    material: bytes = field(repr=False)
    handle: _Handle | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.handle is None:
            object.__setattr__(self, "handle", _handle(self.algorithm, self.material))

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature of a SHA-256 ``digest`` (RSASSA-PKCS1-v1_5 for RSA, RFC 8017 section
        8.2.1; for Ed25519, RFC 8463 signs the digest itself as the message)."""
        handle = self.handle
        if isinstance(handle, rsa.RSAPrivateKey):
            return handle.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        if isinstance(handle, nacl.signing.SigningKey):
            return handle.sign(digest).signature
        raise DkimKeyError("the key cannot sign")

    @property
    def kind(self) -> Literal["rsa", "ed25519"]:
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    @property
    def record(self) -> str:
        """The TXT record text of this key."""
        return key_record(self)


# ---------------------------------------------------------------------------------------------
# Names


def domain_name(text: str) -> str:
    """``text`` as a signing domain: lower case, A-labels, no final dot; ValueError if it is none."""
    name = normalize_domain(text)
    if name is None or "." not in name:
        raise ValueError(f"{text!r} is not a domain name")
    return name


def selector_name(text: str) -> str:
    """``text`` as a selector (one or more DNS labels, RFC 6376 section 3.1); ValueError if not."""
    name = text.strip().lower()
    if not name or len(name) > 63 * 4 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r} is not a selector (DNS labels: letters, digits, '-', '_')")
    return name


def dns_name(selector: str, domain: str) -> str:
    """Where the key of ``selector`` and ``domain`` is published."""
    return f"{selector}._domainkey.{domain}"


# ---------------------------------------------------------------------------------------------
# Reading keys


def load_private_key(path: str | Path) -> PrivateKey:
    """Read and check a private key file; :class:`DkimKeyError` says what is wrong."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise DkimKeyError(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DkimKeyError(f"{path}: not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007 or mode & 0o020:
        raise DkimKeyError(
            f"{path}: mode {mode:04o} lets other users read or change the private key; "
            f"chmod 600 it (or 640 with the daemon's group)"
        )
    if info.st_size > _MAX_KEY_FILE:
        raise DkimKeyError(f"{path}: {info.st_size} bytes is too large for a key file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"{path}: {exc.strerror or exc}") from None
    try:
        return parse_private_key_text(data)
    except DkimKeyError as exc:
        raise DkimKeyError(f"{path}: {exc}") from None


def parse_private_key_text(data: bytes) -> PrivateKey:
    """A key from the bytes of a key file (see the module's "Private key files")."""
    match = _PEM.search(data)
    if match is None:
        return _raw_ed25519(data)
    label = match.group(1).decode("ascii")
    headers_and_body = match.group(2)
    if b"ENCRYPTED" in match.group(1) or b"Proc-Type:" in headers_and_body:
        raise DkimKeyError("the key is encrypted; store it unencrypted with mode 0600")
    try:
        der = base64.b64decode(b"".join(headers_and_body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DkimKeyError(f"the {label} block is not valid base64") from None
    if label == "RSA PRIVATE KEY":
        return _rsa_key(der, label)
    if label == "PRIVATE KEY":
        if der.startswith((_ED25519_PKCS8_V0, _ED25519_PKCS8_V1)):
            return _pkcs8_ed25519(der)
        if _RSA_OID in der[:32]:
            return _rsa_key(der, label)
        raise DkimKeyError("the PKCS#8 key is neither RSA nor Ed25519")
    raise DkimKeyError(f"a {label} block is not a private key (expected RSA PRIVATE KEY or PRIVATE KEY)")


def _rsa_key(der: bytes, label: str) -> PrivateKey:
    # OpenSSL reads PKCS#1 and PKCS#8 alike, and checks that the numbers make one RSA key
    # (a key whose primes do not give its modulus would sign what nobody can verify).
    try:
        handle = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DkimKeyError("not a valid RSA private key") from None
    if not isinstance(handle, rsa.RSAPrivateKey):
        raise DkimKeyError("not a valid RSA private key")
    numbers = handle.public_key().public_numbers()
    modulus, exponent = numbers.n, numbers.e
    bits = modulus.bit_length()
    if bits < MIN_RSA_BITS:
        raise DkimKeyError(f"a {bits}-bit RSA key is too short: receivers ignore keys under 1024 bits")
    if bits > 8192:
        raise DkimKeyError(f"a {bits}-bit RSA key is too long (at most 8192 bits)")
    return PrivateKey("rsa-sha256", bits, rsa_public_der(modulus, exponent), _pem(label, der), handle)


def _pkcs8_ed25519(der: bytes) -> PrivateKey:
    prefix = len(_ED25519_PKCS8_V0)
    seed = der[prefix : prefix + 32]
    if der.startswith(_ED25519_PKCS8_V0) and len(der) == prefix + 32:
        return _ed25519_key(seed)
    rest = der[prefix + 32 :]
    if len(rest) == 35 and rest.startswith(_ED25519_PUBLIC_TAG):
        key = _ed25519_key(seed)
        if rest[3:] != key.public:
            raise DkimKeyError("the Ed25519 key's public half does not belong to its private half")
        return key
    raise DkimKeyError("not a valid PKCS#8 Ed25519 key")


def _raw_ed25519(data: bytes) -> PrivateKey:
    text = data.strip()
    try:
        seed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise DkimKeyError("no PEM key block, and not the base64 of a 32-byte Ed25519 seed either")
    return _ed25519_key(seed)


def _ed25519_key(seed: bytes) -> PrivateKey:
    try:
        signing = nacl.signing.SigningKey(seed)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise DkimKeyError("not a valid Ed25519 seed") from None
    return PrivateKey("ed25519-sha256", 256, bytes(signing.verify_key), base64.b64encode(seed), signing)


def _handle(algorithm: Algorithm, material: bytes) -> _Handle:
    """The signing object of a key given only as its ``material``."""
    if algorithm == "ed25519-sha256":
        try:
            return nacl.signing.SigningKey(base64.b64decode(material, validate=True))
        except (nacl.exceptions.CryptoError, binascii.Error, ValueError, TypeError):
            raise DkimKeyError("not a valid Ed25519 seed") from None
    try:
        handle = serialization.load_pem_private_key(material, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DkimKeyError("not a valid RSA private key") from None
    if not isinstance(handle, rsa.RSAPrivateKey):
        raise DkimKeyError("not a valid RSA private key")
    return handle


def _pem(label: str, der: bytes) -> bytes:
    body = base64.b64encode(der)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([f"-----BEGIN {label}-----".encode(), *lines, f"-----END {label}-----".encode(), b""])


# ---------------------------------------------------------------------------------------------
# DER for the RSA public key (the SubjectPublicKeyInfo of RFC 5280, as p= carries it)


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


def _der_integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def rsa_public_der(modulus: int, exponent: int) -> bytes:
    """The DER SubjectPublicKeyInfo of an RSA public key."""
    rsa_public = _der(0x30, _der_integer(modulus) + _der_integer(exponent))
    return _der(0x30, _der(0x30, _RSA_OID) + _der(0x03, b"\x00" + rsa_public))


# ---------------------------------------------------------------------------------------------
# DNS records


def key_record(key: PrivateKey) -> str:
    """``v=DKIM1; k=...; p=...`` for the public half of ``key``."""
    return f"v=DKIM1; k={key.kind}; p={base64.b64encode(key.public).decode('ascii')}"


def txt_strings(text: str, size: int = 255) -> list[str]:
    """``text`` cut into character-strings of at most ``size`` bytes (RFC 1035 section 3.3)."""
    data = text.encode("ascii")
    return [data[i : i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def zone_record(selector: str, domain: str, key: PrivateKey, ttl: int = 3600) -> str:
    """The key's TXT record as a zone-file entry, one string per line when it needs several."""
    strings = [f'"{part}"' for part in txt_strings(key.record)]
    owner = f"{dns_name(selector, domain)}."
    if len(strings) == 1:
        return f"{owner} {ttl} IN TXT {strings[0]}"
    inner = "\n\t".join(strings)
    return f"{owner} {ttl} IN TXT (\n\t{inner} )"


def published_mismatch(key: PrivateKey, records: Iterable[str]) -> str:
    """Why none of ``records`` (the TXT texts at the key's name) publishes ``key``; "" if one does."""
    reason = "no DKIM key record"
    for record in records:
        try:
            tags = parse_tag_value(record.encode("utf-8", "replace"))
        except (InvalidTagValueList, ValueError):
            continue
        if b"p" not in tags:
            continue
        if tags.get(b"v", b"DKIM1") != b"DKIM1":
            continue
        kind = tags.get(b"k", b"rsa").decode("ascii", "replace")
        public = b"".join(tags[b"p"].split())
        if not public:
            reason = "the published key is revoked (empty p=)"
            continue
        if kind != key.kind:
            reason = f"the published key is of type {kind}, the private key is {key.kind}"
            continue
        if _same_public_key(key, public):
            return ""
        reason = "the published key is not the public half of the private key"
    return reason


def _same_public_key(key: PrivateKey, published_b64: bytes) -> bool:
    try:
        published = base64.b64decode(published_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    if key.kind == "ed25519":
        return published == key.public
    try:
        ours = parse_public_key(key.public)
        theirs = parse_public_key(published)
    except (UnparsableKeyError, IndexError, ValueError, TypeError):
        return False
    return bool(ours["modulus"] == theirs["modulus"] and ours["publicExponent"] == theirs["publicExponent"])


async def check_published(resolver: Resolver, selector: str, domain: str, key: PrivateKey) -> str:
    """Empty when DNS publishes ``key`` at its name, else what is wrong (DNS trouble included)."""
    name = dns_name(selector, domain)
    try:
        records = await resolver.txt(name)
    except DnsTempError as exc:
        return f"the record could not be looked up ({exc.reason})"
    except DnsError as exc:
        return f"the record cannot be looked up ({exc})"
    return published_mismatch(key, records)


# ---------------------------------------------------------------------------------------------
# Making keys


def generate_key(kind: Literal["rsa", "ed25519"], bits: int = 2048) -> bytes:
    """A new private key as the bytes of its file (PKCS#1 PEM for RSA, PKCS#8 PEM for Ed25519)."""
    if kind == "ed25519":
        seed = bytes(nacl.signing.SigningKey.generate())
        return _pem("PRIVATE KEY", _ED25519_PKCS8_V0 + seed)
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise DkimKeyError(f"RSA keys of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {bits}")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DkimKeyError("RSA keys are made by the openssl command: install Debian's openssl package")
    done = subprocess.run(
        [openssl, "genrsa", "-traditional", str(bits)], capture_output=True, check=False, timeout=120
    )
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise DkimKeyError(f"openssl genrsa failed: {message[-1] if message else done.returncode}")
    return done.stdout


def write_key_file(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/name`` with mode 0600; never over an existing file."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DkimKeyError(f"{path} exists; remove it first or choose another selector") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask was
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


# ---------------------------------------------------------------------------------------------
# mxward dkim


def _domain_arg(text: str) -> str:
    try:
        return domain_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _selector_arg(text: str) -> str:
    try:
        return selector_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bits_arg(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise argparse.ArgumentTypeError(f"RSA keys of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
    return bits


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``mxward dkim`` and its actions."""
    top = subparsers.add_parser(
        "dkim",
        help="make DKIM signing keys, print and check their DNS records",
        description="DKIM keys for [checks.dkim]: keygen writes a new private key and prints the "
        "DNS record to publish; record prints the record of a key file; check compares the "
        "published records of the configured keys with the private keys.",
    )
    actions = top.add_subparsers(dest="action", metavar="ACTION", required=True)
    keygen = actions.add_parser("keygen", help="write a new private key and print its DNS record")
    keygen.add_argument("domain", type=_domain_arg, metavar="DOMAIN", help="the signing domain (d=)")
    keygen.add_argument("selector", type=_selector_arg, metavar="SELECTOR", help="the selector (s=)")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="key type (rsa)")
    keygen.add_argument("--bits", type=_bits_arg, metavar="N", help="RSA key length (2048)")
    keygen.add_argument(
        "--dir", default=DEFAULT_KEY_DIR, metavar="PATH", help=f"where to write the key ({DEFAULT_KEY_DIR})"
    )
    record = actions.add_parser("record", help="print the DNS record of a private key file")
    record.add_argument("key_file", metavar="KEYFILE")
    record.add_argument("--domain", type=_domain_arg, default="example.com", help="the signing domain")
    record.add_argument("--selector", type=_selector_arg, default="selector", help="the selector")
    actions.add_parser("check", help="compare the published records of [checks.dkim] keys with the keys")


async def run_command(args: argparse.Namespace, config: Any, services: Any) -> int:
    """Carry out ``mxward dkim ACTION``; the exit status (1 when something is wrong)."""
    try:
        if args.action == "keygen":
            return _keygen(args)
        if args.action == "record":
            key = load_private_key(args.key_file)
            print(zone_record(args.selector, args.domain, key))
            return 0
        if args.action == "check":
            return await _check(config, services)
    except DkimKeyError as exc:
        print(f"mxward dkim {args.action}: {exc}", file=sys.stderr)
        return 1
    raise ValueError(f"unknown action {args.action!r}")


def _keygen(args: argparse.Namespace) -> int:
    if args.type == "ed25519" and args.bits is not None:
        raise DkimKeyError("--bits is for RSA keys; Ed25519 keys have one size")
    data = generate_key(args.type, args.bits or 2048)
    key = parse_private_key_text(data)
    path = write_key_file(Path(args.dir), f"{args.domain}.{args.selector}.key", data)
    print(zone_record(args.selector, args.domain, key))
    print(
        f"wrote {path} ({key.kind}, {key.bits} bits); publish the record above, then add to the "
        f'configuration:\n\n[[checks.dkim.keys]]\ndomain = "{args.domain}"\n'
        f'selector = "{args.selector}"\nkey_file = "{path}"\nalgorithm = "{key.algorithm}"',
        file=sys.stderr,
    )
    return 0


async def _check(config: Any, services: Any) -> int:
    entries = _configured_keys(config)
    if not entries:
        print("no keys in [checks.dkim] keys", file=sys.stderr)
        return 0
    status = 0
    loaded: list[tuple[str, str, PrivateKey]] = []
    for domain, selector, key_file in entries:
        try:
            loaded.append((selector, domain, load_private_key(key_file)))
        except DkimKeyError as exc:
            print(f"{dns_name(selector, domain)}: {exc}")
            status = 1
    problems = await asyncio.gather(
        *(check_published(services.dns, selector, domain, key) for selector, domain, key in loaded)
    )
    for (selector, domain, key), problem in zip(loaded, problems, strict=True):
        if problem:
            print(f"{dns_name(selector, domain)}: {key.kind}: MISMATCH: {problem}")
            status = 1
        else:
            print(f"{dns_name(selector, domain)}: {key.kind}: ok")
    return status


def _configured_keys(config: Any) -> Sequence[tuple[str, str, str]]:
    """(domain, selector, key_file) of every key in [checks.dkim], active or not."""
    for table in ("filter_checks", "checks", "inactive"):
        cfg = getattr(config, table, {}).get("dkim")
        if cfg is not None:
            return [(k.domain, k.selector, k.key_file) for k in getattr(cfg.options, "keys", ())]
    return []

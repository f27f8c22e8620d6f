"""DKIM keys: reading key files, making keys, their DNS records, and `mxward dkim`.

Public keys are compared with what the openssl command derives from the same private key,
an implementation independent of mxward's own DER code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from support.dnsserver import DnsServer, parse_zones

from mxward.contentfilter.dkimkeys import (
    DkimKeyError,
    add_parser,
    check_published,
    generate_key,
    load_private_key,
    parse_private_key_text,
    published_mismatch,
    run_command,
    txt_strings,
    zone_record,
)
from mxward.shared.cli import resolve_check
from mxward.shared.clock import FrozenClock
from mxward.shared.config import parse_config
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import Services
from mxward.shared.state import StateSettings, StateStore

DATA = Path(__file__).resolve().parents[2] / "data" / "dkim"
ZONE = DATA / "dkim.zone"


def openssl_public(path: Path) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key file, as openssl derives it."""
    done = subprocess.run(
        ["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"], capture_output=True, check=True
    )
    return done.stdout


def private(tmp_path: Path, data: bytes, mode: int = 0o600, name: str = "k.key") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], capture_output=True, check=True).stdout


# ---------------------------------------------------------------------------------------------
# Reading keys


@pytest.mark.parametrize(
    ("how", "algorithm", "bits"),
    [
        (("genrsa", "-traditional", "2048"), "rsa-sha256", 2048),
        (("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"), "rsa-sha256", 3072),
        (("genpkey", "-algorithm", "ed25519"), "ed25519-sha256", 256),
    ],
    ids=["pkcs1-rsa", "pkcs8-rsa", "pkcs8-ed25519"],
)
def test_openssl_keys_are_read(tmp_path: Path, how: tuple[str, ...], algorithm: str, bits: int) -> None:
    """PKCS#1 and PKCS#8 RSA, PKCS#8 Ed25519: the public half is what openssl says it is."""
    path = private(tmp_path, openssl(*how))
    key = load_private_key(path)
    assert (key.algorithm, key.bits) == (algorithm, bits)
    spki = openssl_public(path)
    assert key.public == (spki if key.kind == "rsa" else spki[-32:])


def test_a_dkimpy_ed25519_seed_file_is_read(tmp_path: Path) -> None:
    """dkimpy's dknewkey writes the base64 of the 32-byte seed: accepted, same key as its PKCS#8 form."""
    pkcs8 = parse_private_key_text((DATA / "example.com.ed.key").read_bytes())
    path = private(tmp_path, pkcs8.material + b"\n")
    assert load_private_key(path) == pkcs8


def test_signing_material_is_what_dkimpy_signs_with(tmp_path: Path) -> None:
    """A message signed with the material verifies against the key's own DNS record (dkimpy)."""
    message = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    for name in ("example.com.rsa.key", "example.com.ed.key"):
        key = parse_private_key_text((DATA / name).read_bytes())
        field = dkim.sign(
            message, b"s", b"example.com", key.material, signature_algorithm=key.algorithm.encode()
        )
        assert dkim.verify(field + message, dnsfunc=lambda _name, timeout=5, k=key: k.record.encode())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no PEM key block"),
        (b"hello world\n", "no PEM key block"),
        (
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "a CERTIFICATE block is not a private key",
        ),
        (b"-----BEGIN RSA PRIVATE KEY-----\n!!!!\n-----END RSA PRIVATE KEY-----\n", "not valid base64"),
        (
            b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            "not a valid RSA private key",
        ),
        (b"-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n", "neither RSA nor Ed25519"),
    ],
)
def test_files_that_hold_no_usable_key_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    """Junk, a certificate, bad base64, a truncated key: DkimKeyError naming the file and the problem."""
    path = private(tmp_path, data)
    with pytest.raises(DkimKeyError, match=message) as raised:
        load_private_key(path)
    assert str(raised.value).startswith(f"{path}: ")


def test_encrypted_keys_are_refused(tmp_path: Path) -> None:
    """A daemon has nobody to type a passphrase: an encrypted key is refused with the reason."""
    data = openssl("genpkey", "-algorithm", "ed25519", "-aes-128-cbc", "-pass", "pass:secret")
    with pytest.raises(DkimKeyError, match="the key is encrypted"):
        load_private_key(private(tmp_path, data))
    traditional = openssl("genrsa", "-traditional", "-aes128", "-passout", "pass:secret", "1024")
    with pytest.raises(DkimKeyError, match="the key is encrypted"):
        load_private_key(private(tmp_path, traditional, name="t.key"))


def test_short_rsa_keys_are_refused(tmp_path: Path) -> None:
    """A 512-bit private key cannot sign anything a receiver accepts."""
    with pytest.raises(DkimKeyError, match="a 512-bit RSA key is too short"):
        load_private_key(private(tmp_path, (DATA / "example.com.short.key").read_bytes()))


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o666])
def test_keys_others_can_read_or_change_are_refused(tmp_path: Path, mode: int) -> None:
    """World access or group write: refused, with the mode and the fix in the message."""
    path = private(tmp_path, (DATA / "example.com.ed.key").read_bytes(), mode)
    with pytest.raises(DkimKeyError, match=f"mode {mode:04o} lets other users .* chmod 600"):
        load_private_key(path)


def test_group_readable_keys_are_accepted(tmp_path: Path) -> None:
    """0640 (root:mxward) is a normal way to share a key with the daemon's group."""
    assert (
        load_private_key(private(tmp_path, (DATA / "example.com.ed.key").read_bytes(), 0o640)).kind
        == "ed25519"
    )


def test_missing_files_and_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DkimKeyError, match="No such file or directory"):
        load_private_key(tmp_path / "absent.key")
    with pytest.raises(DkimKeyError, match="not a regular file"):
        load_private_key(tmp_path)


# ---------------------------------------------------------------------------------------------
# Records


def test_records_are_cut_into_255_byte_strings() -> None:
    """An RSA-2048 record needs two character-strings; zone_record writes a zone file entry."""
    key = parse_private_key_text((DATA / "example.com.rsa.key").read_bytes())
    parts = txt_strings(key.record)
    assert len(parts) == 2
    assert [len(p) for p in parts] == [255, len(key.record) - 255]
    assert "".join(parts) == key.record
    head = "$ORIGIN example.com.\n@ 300 SOA ns hostmaster 1 3600 600 86400 300\n@ 300 NS ns\n"
    text = head + zone_record("rsa", "example.com", key) + "\n"
    (zone,) = parse_zones(text)
    rdataset = zone.find_rdataset("rsa._domainkey", "TXT")
    (rdata,) = list(rdataset)
    assert b"".join(rdata.strings).decode() == key.record
    assert rdataset.ttl == 3600


def test_records_agree_with_openssl() -> None:
    """The p= of each test key is openssl's public key (SPKI for RSA, the raw 32 bytes for Ed25519)."""
    rsa = parse_private_key_text((DATA / "example.com.rsa.key").read_bytes())
    assert (
        rsa.record
        == "v=DKIM1; k=rsa; p=" + base64.b64encode(openssl_public(DATA / "example.com.rsa.key")).decode()
    )
    ed = parse_private_key_text((DATA / "example.com.ed.key").read_bytes())
    raw = openssl_public(DATA / "example.com.ed.key")[-32:]
    assert ed.record == "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()


def test_published_records_are_compared_by_key() -> None:
    """Match on the key itself: a bare RSAPublicKey matches, other keys, types or revocations do not."""
    rsa = parse_private_key_text((DATA / "example.com.rsa.key").read_bytes())
    other = parse_private_key_text((DATA / "example.net.rsa.key").read_bytes())
    ed = parse_private_key_text((DATA / "example.com.ed.key").read_bytes())
    bare = base64.b64encode(rsa.public[24:]).decode()  # the RSAPublicKey inside the SPKI
    assert published_mismatch(rsa, [rsa.record]) == ""
    assert published_mismatch(rsa, ["v=spf1 -all", f"v=DKIM1; p={bare}"]) == ""
    assert published_mismatch(rsa, []) == "no DKIM key record"
    assert published_mismatch(rsa, ["v=spf1 -all"]) == "no DKIM key record"
    assert (
        published_mismatch(rsa, [other.record])
        == "the published key is not the public half of the private key"
    )
    assert published_mismatch(rsa, ["v=DKIM1; k=rsa; p="]) == "the published key is revoked (empty p=)"
    assert (
        published_mismatch(rsa, [ed.record]) == "the published key is of type ed25519, the private key is rsa"
    )
    assert published_mismatch(ed, [ed.record.replace("p=", "p= ")]) == ""


# ---------------------------------------------------------------------------------------------
# Making keys


def test_generated_keys_are_valid_and_fresh() -> None:
    """generate_key makes a new key each time, readable back, of the size asked."""
    first = parse_private_key_text(generate_key("rsa", 1024))
    second = parse_private_key_text(generate_key("rsa", 1024))
    assert (first.kind, first.bits) == ("rsa", 1024)
    assert first.public != second.public
    ed = parse_private_key_text(generate_key("ed25519"))
    assert ed.kind == "ed25519"
    with pytest.raises(DkimKeyError, match="RSA keys of 1024 to 4096 bits"):
        generate_key("rsa", 512)


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mxward")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_keygen_writes_a_private_key_and_prints_its_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new folder (0700), the key (0600) as DOMAIN.SELECTOR.key; the zone entry on stdout."""
    folder = tmp_path / "dkim"
    args = cli(["dkim", "keygen", "Example.COM", "sel1", "--dir", str(folder)])
    assert asyncio.run(run_command(args, None, None)) == 0
    path = folder / "example.com.sel1.key"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_private_key(path)
    assert (key.kind, key.bits) == ("rsa", 2048)
    out, err = capsys.readouterr()
    assert out.startswith("sel1._domainkey.example.com. 3600 IN TXT (")
    assert "".join(out.split('"')[1::2]) == key.record
    assert f'key_file = "{path}"' in err and 'algorithm = "rsa-sha256"' in err
    assert base64.b64decode(key.record.split("p=")[1]) == openssl_public(path)


def test_keygen_makes_ed25519_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--type ed25519: a PKCS#8 key openssl reads, and a one-string record."""
    args = cli(["dkim", "keygen", "example.com", "ed1", "--type", "ed25519", "--dir", str(tmp_path)])
    assert asyncio.run(run_command(args, None, None)) == 0
    path = tmp_path / "example.com.ed1.key"
    key = load_private_key(path)
    assert openssl_public(path)[-32:] == key.public
    out, _ = capsys.readouterr()
    assert out == f'ed1._domainkey.example.com. 3600 IN TXT "{key.record}"\n'


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An existing key file stays as it was; exit status 1 with the reason."""
    path = tmp_path / "example.com.sel1.key"
    path.write_bytes(b"precious")
    args = cli(["dkim", "keygen", "example.com", "sel1", "--type", "ed25519", "--dir", str(tmp_path)])
    assert asyncio.run(run_command(args, None, None)) == 1
    assert path.read_bytes() == b"precious"
    assert "exists; remove it first" in capsys.readouterr().err


def test_keygen_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad domain, selector or bit count: usage errors; --bits with Ed25519: a clear refusal."""
    for argv in (
        ["not a domain", "s"],
        ["example.com", "bad/selector"],
        ["example.com", "s", "--bits", "8192"],
    ):
        with pytest.raises(SystemExit):
            cli(["dkim", "keygen", *argv])
    args = cli(
        ["dkim", "keygen", "example.com", "s", "--type", "ed25519", "--bits", "2048", "--dir", str(tmp_path)]
    )
    assert asyncio.run(run_command(args, None, None)) == 1
    assert "--bits is for RSA keys" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_record_prints_the_record_of_a_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = private(tmp_path, (DATA / "example.com.ed.key").read_bytes())
    args = cli(["dkim", "record", str(path), "--domain", "example.org", "--selector", "x"])
    assert asyncio.run(run_command(args, None, None)) == 0
    key = load_private_key(path)
    assert capsys.readouterr().out == f'x._domainkey.example.org. 3600 IN TXT "{key.record}"\n'


# ---------------------------------------------------------------------------------------------
# Published keys


@pytest.fixture
async def dns() -> AsyncIterator[DnsServer]:
    async with DnsServer([ZONE]) as server:
        yield server


def services(server: DnsServer) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=(server.nameserver,), timeout=1.0, lifetime=2.0)),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
        clock=FrozenClock(0.0),
    )


async def test_check_published_looks_the_key_up(dns: DnsServer) -> None:
    """Published and equal: ""; else the name and what is wrong, DNS trouble included."""
    key = parse_private_key_text((DATA / "example.com.rsa.key").read_bytes())
    resolver = services(dns).dns
    assert await check_published(resolver, "rsa", "example.com", key) == ""
    assert await check_published(resolver, "nokey", "example.com", key) == "no DKIM key record"
    dns.servfail("rsa._domainkey.example.com")
    assert await check_published(services(dns).dns, "rsa", "example.com", key) == (
        "the record could not be looked up (servfail)"
    )


async def test_dkim_check_compares_the_configured_keys(
    dns: DnsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mxward dkim check`: ok per published key, MISMATCH and exit 1 for the others."""
    keys: list[dict[str, Any]] = []
    for name, selector in (
        ("example.com.rsa.key", "rsa"),
        ("example.com.ed.key", "ed"),
        ("example.com.rsa.key", "old"),
    ):
        path = tmp_path / f"{selector}.key"
        shutil.copy(DATA / name, path)
        os.chmod(path, 0o600)
        algorithm = "ed25519-sha256" if selector == "ed" else "rsa-sha256"
        keys.append(
            {"domain": "example.com", "selector": selector, "key_file": str(path), "algorithm": algorithm}
        )
    config = parse_config({"checks": {"dkim": {"keys": keys}}}, source="t", resolve_check=resolve_check)
    status = await run_command(cli(["dkim", "check"]), config, services(dns))
    lines = capsys.readouterr().out.splitlines()
    assert status == 1
    mismatch = "the published key is not the public half of the private key"
    assert lines == [
        "rsa._domainkey.example.com: rsa: ok",
        "ed._domainkey.example.com: ed25519: ok",
        f"old._domainkey.example.com: rsa: MISMATCH: {mismatch}",
    ]

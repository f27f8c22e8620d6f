"""The p0f 3 API client: query packing, reply parsing, faults, and a real p0f on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import struct
import time

import pytest
from support.p0f_server import FakeHost, FakeP0f, RealP0f, short_socket_dir

from mxward.shared.p0f import (
    REPLY_SIZE,
    HostInfo,
    P0fClient,
    P0fProtocolError,
    P0fUnavailableError,
    decode_reply,
    encode_query,
)

MAGIC = struct.pack("=I", 0x50304601)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("192.0.2.7", MAGIC + b"\x04" + bytes([192, 0, 2, 7]) + bytes(12)),
        ("127.0.4.2", MAGIC + b"\x04" + bytes([127, 0, 4, 2]) + bytes(12)),
        ("2001:db8::1", MAGIC + b"\x06" + bytes.fromhex("20010db8000000000000000000000001")),
        ("::1", MAGIC + b"\x06" + bytes(15) + b"\x01"),
        # A dual-stack listener reports IPv4 clients as mapped addresses; p0f saw IPv4.
        ("::ffff:192.0.2.7", MAGIC + b"\x04" + bytes([192, 0, 2, 7]) + bytes(12)),
    ],
)
def test_queries_are_21_bytes_with_the_address_left_aligned(ip: str, expected: bytes) -> None:
    """Magic (native order), type 4 or 6, 16 address bytes in network order."""
    query = encode_query(ipaddress.ip_address(ip))
    assert len(query) == 21
    assert query == expected


def reply(status: int, body: bytes | None = None, magic: int = 0x50304602) -> bytes:
    return struct.pack("=II", magic, status) + (body if body is not None else FakeHost().encode())


def test_a_reply_with_status_ok_gives_every_field() -> None:
    """Numbers, distance (signed) and the NUL-terminated strings are decoded."""
    host = FakeHost(
        os_name="Windows",
        os_flavor="7 or 8",
        link_type="Ethernet or modem",
        distance=11,
        uptime_min=4321,
        total_conn=9,
        http_name="Firefox",
        language="English",
    )
    info = decode_reply(reply(0x10, host.encode()))
    assert info == HostInfo(
        first_seen=1_700_000_000,
        last_seen=1_700_000_100,
        total_conn=9,
        uptime_min=4321,
        distance=11,
        os_name="Windows",
        os_flavor="7 or 8",
        http_name="Firefox",
        link_type="Ethernet or modem",
        language="English",
    )
    assert info.genre == "Windows 7 or 8"


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (reply(0x00), "bad query"),
        (reply(0x10, magic=0x50304601), "bad reply magic 0x50304601"),
        (reply(0x77), "unknown reply status 0x77"),
        (reply(0x10)[:100], "reply of 100 bytes"),
        (reply(0x10) + b"x", "reply of 233 bytes"),
    ],
)
def test_invalid_replies_are_protocol_errors(data: bytes, error: str) -> None:
    """Bad magic, a rejected query, an unknown status or a wrong length raise P0fProtocolError."""
    with pytest.raises(P0fProtocolError, match=error):
        decode_reply(data)


def test_no_match_is_none_and_an_unknown_distance_stays_minus_one() -> None:
    """Status 0x20 means p0f has not seen the host; distance -1 survives the signed decode."""
    assert decode_reply(reply(0x20)) is None
    info = decode_reply(reply(0x10, FakeHost(os_name="Linux").encode()))
    assert info is not None and info.distance == -1 and info.genre == "Linux"


# ------------------------------------------------------------------------------------------
# against the protocol-level server


@pytest.mark.parametrize(
    ("ip", "kind", "address"),
    [
        ("192.0.2.7", 4, bytes([192, 0, 2, 7]) + bytes(12)),
        ("2001:db8:1::25", 6, bytes.fromhex("20010db8000100000000000000000025")),
    ],
)
async def test_the_server_receives_the_address_and_the_answer_is_parsed(
    fake_p0f: FakeP0f, ip: str, kind: int, address: bytes
) -> None:
    """IPv4 and IPv6 queries reach the server intact (qpsmtpd packed IPv6 wrongly)."""
    fake_p0f.hosts[ip] = FakeHost(os_name="FreeBSD", os_flavor="9.x", link_type="Ethernet or modem")
    client = P0fClient(str(fake_p0f.path))
    try:
        info = await client.query(ipaddress.ip_address(ip))
    finally:
        await client.aclose()
    assert fake_p0f.queries == [(0x50304601, kind, address)]
    assert info is not None and info.genre == "FreeBSD 9.x" and info.link_type == "Ethernet or modem"


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("bad_magic", P0fProtocolError),
        ("bad_status", P0fProtocolError),
        ("short", P0fProtocolError),
        ("close", P0fProtocolError),
        ("silent", P0fUnavailableError),
    ],
)
async def test_faults_raise_p0f_errors(fake_p0f: FakeP0f, mode: str, error: type[Exception]) -> None:
    """Garbage, a cut reply, a closed connection and silence are errors, the last within the limit."""
    fake_p0f.hosts["192.0.2.7"] = FakeHost(os_name="Linux")
    fake_p0f.mode = mode
    client = P0fClient(str(fake_p0f.path), timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(error):
            await client.query(ipaddress.ip_address("192.0.2.7"))
    finally:
        await client.aclose()
    assert time.monotonic() - started < 2


async def test_no_match_is_none(fake_p0f: FakeP0f) -> None:
    """A host p0f has not seen gives None, not an error."""
    client = P0fClient(str(fake_p0f.path))
    try:
        assert await client.query(ipaddress.ip_address("198.51.100.9")) is None
    finally:
        await client.aclose()


@pytest.mark.parametrize("what", ["missing", "not a socket listener"])
async def test_an_absent_socket_is_unavailable(what: str) -> None:
    """No socket file, or a stale one nobody listens on: P0fUnavailableError."""
    directory = short_socket_dir()
    path = directory / "p0f.sock"
    if what != "missing":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()
    client = P0fClient(str(path))
    try:
        with pytest.raises(P0fUnavailableError, match="cannot connect"):
            await client.query(ipaddress.ip_address("192.0.2.7"))
    finally:
        await client.aclose()
        shutil.rmtree(directory)


async def test_one_connection_serves_concurrent_queries_in_order(fake_p0f: FakeP0f) -> None:
    """Twenty concurrent queries share one connection and each gets its own host's answer."""
    ips = [f"192.0.2.{n}" for n in range(1, 21)]
    for n, ip in enumerate(ips, 1):
        fake_p0f.hosts[ip] = FakeHost(os_name="Linux", os_flavor=f"{n}.x")
    client = P0fClient(str(fake_p0f.path))
    try:
        answers = await asyncio.gather(*(client.query(ipaddress.ip_address(ip)) for ip in ips))
    finally:
        await client.aclose()
    assert [a.os_flavor if a else None for a in answers] == [f"{n}.x" for n in range(1, 21)]
    assert fake_p0f.connections == 1


async def test_after_a_fault_the_next_query_uses_a_new_connection(fake_p0f: FakeP0f) -> None:
    """A timed-out query's late reply is never read as the next query's answer."""
    fake_p0f.hosts["192.0.2.7"] = FakeHost(os_name="Linux")
    fake_p0f.hosts["192.0.2.8"] = FakeHost(os_name="Windows")
    client = P0fClient(str(fake_p0f.path), timeout=0.2)
    try:
        fake_p0f.mode = "silent"
        with pytest.raises(P0fUnavailableError):
            await client.query(ipaddress.ip_address("192.0.2.7"))
        fake_p0f.mode = "normal"
        info = await client.query(ipaddress.ip_address("192.0.2.8"))
    finally:
        await client.aclose()
    assert info is not None and info.os_name == "Windows"
    assert fake_p0f.connections == 2


async def test_a_restarted_p0f_is_reconnected_transparently(fake_p0f: FakeP0f) -> None:
    """When p0f closed the kept connection (restart), the query is sent again on a new one."""
    fake_p0f.hosts["192.0.2.7"] = FakeHost(os_name="Linux")
    client = P0fClient(str(fake_p0f.path))
    try:
        assert await client.query(ipaddress.ip_address("192.0.2.7")) is not None
        await fake_p0f.stop()
        await fake_p0f.start()
        info = await client.query(ipaddress.ip_address("192.0.2.7"))
    finally:
        await client.aclose()
    assert info is not None and info.os_name == "Linux"
    assert fake_p0f.connections == 2


def test_the_reply_size_is_p0f_s() -> None:
    """232 bytes: 2 + 7 u32, one s16, two u8 and six 32-byte strings."""
    assert REPLY_SIZE == 4 * 9 + 2 + 2 + 6 * 32 == 232


# ------------------------------------------------------------------------------------------
# against a real p0f on the loopback interface


async def test_real_p0f_fingerprints_a_loopback_client(real_p0f: RealP0f) -> None:
    """p0f sees our TCP handshake from 127.0.4.2 and the client reads its verdict: Linux."""
    await real_p0f.fingerprint("127.0.4.2")
    client = P0fClient(str(real_p0f.socket), timeout=2)
    try:
        info = await client.query(ipaddress.ip_address("127.0.4.2"))
        unseen = await client.query(ipaddress.ip_address("127.0.4.250"))
    finally:
        await client.aclose()
    assert info is not None
    assert info.os_name == "Linux" and info.genre.startswith("Linux ")
    assert info.total_conn >= 1 and info.last_seen >= info.first_seen > 0
    assert unseen is None


async def test_real_p0f_answers_ipv6_queries(real_p0f: RealP0f) -> None:
    """An IPv6 query packed right finds ::1 after a connection over ::1; an unseen one is None."""
    await real_p0f.fingerprint("::1", server="::1")
    client = P0fClient(str(real_p0f.socket), timeout=2)
    try:
        seen = await client.query(ipaddress.ip_address("::1"))
        unseen = await client.query(ipaddress.ip_address("2001:db8::1"))
    finally:
        await client.aclose()
    assert seen is not None and seen.total_conn >= 1
    assert unseen is None

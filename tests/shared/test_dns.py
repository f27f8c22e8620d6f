"""The DNS service (mxward.shared.dns) against the real test DNS server on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import socket
import time
from typing import TYPE_CHECKING, Any

import pytest
from support.dns_fixtures import TEST_ZONE
from support.dnsserver import DnsServer, ThreadedDnsServer

from mxward.shared.clock import FrozenClock
from mxward.shared.dns import (
    DnsError,
    DnsSettings,
    DnsTempError,
    Resolver,
    parse_nameserver,
)

if TYPE_CHECKING:
    from pathlib import Path

ZEROS = "0." * 20  # the 20 zero nibbles of ::ffff:7f00:x before "0.0.0.0" (RFC 5782 section 5)
V6_LOOPBACK_REVERSE = "1." + "0." * 31 + "ip6.arpa"


def make_resolver(
    server: DnsServer | ThreadedDnsServer, clock: FrozenClock | None = None, **settings: Any
) -> Resolver:
    """A Resolver asking only ``server``, with short budgets unless ``settings`` says otherwise."""
    values: dict[str, Any] = {"timeout": 0.5, "lifetime": 1.0} | settings
    return Resolver(DnsSettings(nameservers=(server.nameserver,), **values), clock=clock or FrozenClock())


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[2001:DB8::1]", ("2001:db8::1", 53)),
        (" 10.0.0.1 ", ("10.0.0.1", 53)),
    ],
)
def test_parse_nameserver_accepts_address_with_optional_port(entry: str, expected: tuple[str, int]) -> None:
    """A nameserver entry is an IPv4 or IPv6 address with an optional port (brackets for IPv6)."""
    assert parse_nameserver(entry) == expected


@pytest.mark.parametrize(
    "entry",
    [
        "dns.example",
        "",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:dns",
        "[::1",
        "[::1]5353",
        "[127.0.0.1]:53",
        "::1]:53",
        "192.0.2.300",
    ],
)
def test_parse_nameserver_rejects_malformed_entries(entry: str) -> None:
    """A host name, a bad port or misplaced brackets raise ValueError naming the entry."""
    with pytest.raises(ValueError, match="dns nameserver"):
        parse_nameserver(entry)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"nameservers": ("resolver.example",)}, "not an IP address"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"timeout": -1.0}, "timeout must be a positive"),
        ({"timeout": math.nan}, "timeout must be a positive"),
        ({"lifetime": math.inf}, "lifetime must be a positive"),
        ({"timeout": 3.0, "lifetime": 2.0}, "lifetime .* must be at least timeout"),
        ({"cache_size": -1}, "cache_size"),
        ({"negative_ttl": -1.0}, "negative_ttl"),
        ({"max_ttl": math.inf}, "max_ttl"),
    ],
)
def test_settings_reject_invalid_values(settings: dict[str, Any], message: str) -> None:
    """Invalid [dns] settings raise ValueError with a message naming the setting."""
    with pytest.raises(ValueError, match=message):
        DnsSettings(**settings)


def test_settings_reject_one_string_as_nameservers() -> None:
    """A single string where a list of nameservers belongs is a type error, not a list of letters."""
    with pytest.raises(TypeError, match="list of addresses"):
        DnsSettings(nameservers="127.0.0.1")  # type: ignore[arg-type]


def test_settings_turn_a_nameserver_list_into_a_tuple() -> None:
    """A list of nameservers (as a TOML array arrives) is stored as a tuple, so settings stay hashable."""
    settings = DnsSettings(nameservers=["127.0.0.1", "[::1]:5353"])  # type: ignore[arg-type]
    assert settings.nameservers == ("127.0.0.1", "[::1]:5353")
    assert settings.nameserver_addresses() == (("127.0.0.1", 53), ("::1", 5353))
    assert hash(settings) == hash(DnsSettings(nameservers=("127.0.0.1", "[::1]:5353")))


def test_settings_defaults_are_the_documented_ones() -> None:
    """The defaults match the module docstring and docs/dns.md."""
    settings = DnsSettings()
    assert (
        settings.nameservers,
        settings.resolv_conf,
        settings.timeout,
        settings.lifetime,
        settings.cache_size,
        settings.negative_ttl,
        settings.max_ttl,
        settings.edns,
    ) == ((), "/etc/resolv.conf", 2.0, 5.0, 10000, 300.0, 86400.0, True)


def test_empty_nameservers_use_resolv_conf(tmp_path: Path) -> None:
    """Without nameservers the resolver takes them from resolv_conf, read when it is constructed."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\nnameserver ::1\n", encoding="utf-8")
    resolver = Resolver(DnsSettings(resolv_conf=str(resolv_conf)))
    assert resolver.nameservers == ("127.0.0.1:53", "[::1]:53")


def test_unusable_resolv_conf_raises_dns_error(tmp_path: Path) -> None:
    """A missing resolv.conf with no nameservers configured is a DnsError at construction."""
    with pytest.raises(DnsError, match="no nameservers configured"):
        Resolver(DnsSettings(resolv_conf=str(tmp_path / "missing.conf")))


def test_configured_nameservers_keep_their_ports() -> None:
    """Configured nameservers are used with their ports, IPv6 ones shown in brackets."""
    settings = DnsSettings(nameservers=("127.0.0.1:5353", "::1", "[::1]:5300"))
    assert Resolver(settings).nameservers == ("127.0.0.1:5353", "[::1]:53", "[::1]:5300")


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "zone", "expected"),
    [
        ("127.0.0.2", None, "2.0.0.127.in-addr.arpa"),
        (ipaddress.IPv4Address("192.0.2.10"), None, "10.2.0.192.in-addr.arpa"),
        ("::1", None, V6_LOOPBACK_REVERSE),
        ("127.0.0.2", "dnsbl.test", "2.0.0.127.dnsbl.test"),
        ("127.0.0.2", "dnsbl.test.", "2.0.0.127.dnsbl.test"),
        ("::FFFF:7F00:2", "dnsbl.test", f"2.0.0.0.0.0.f.7.f.f.f.f.{ZEROS}dnsbl.test"),
        (ipaddress.IPv6Address("2001:db8::1"), "dnsbl.test", "1." + "0." * 23 + "8.b.d.0.1.0.0.2.dnsbl.test"),
    ],
)
def test_reverse_name_builds_rfc5782_names(
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str | None, expected: str
) -> None:
    """IPv4 octets and IPv6 nibbles are reversed under the zone, or in-addr.arpa / ip6.arpa."""
    assert Resolver.reverse_name(ip, zone) == expected


def test_reverse_name_rejects_non_addresses() -> None:
    """Something that is not an IP address raises ValueError."""
    with pytest.raises(ValueError, match="not an IP address"):
        Resolver.reverse_name("mail.test.example")


# -- typed questions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args", "expected"),
    [
        ("a", ("mail.test.example",), ["127.0.0.2"]),
        ("a", ("alias.test.example",), ["127.0.0.2"]),
        ("a", ("MAIL.Test.Example.",), ["127.0.0.2"]),
        ("aaaa", ("mail.test.example",), ["::2"]),
        ("addresses", ("v6only.test.example",), ["2001:db8::25"]),
        ("addresses", ("nowhere.test.example",), []),
        ("ptr", ("127.0.0.2",), ["mail.test.example"]),
        ("ptr", ("127.0.0.8",), ["upper.test.example"]),
        ("ptr", (ipaddress.IPv4Address("127.0.0.5"),), ["multi-a.test.example", "multi-b.test.example"]),
        ("ptr", ("::1",), ["loopback.test.example"]),
        ("ptr", ("127.0.0.9",), []),
        ("txt", ("split.test.example",), ["part one, part two"]),
        ("txt", ("two.test.example",), ["first", "second"]),
        ("txt", ("utf8.test.example",), ["café"]),
        ("txt", ("badutf8.test.example",), ["\ufffdok"]),
        ("txt", ("mail.test.example",), []),
        ("mx", ("nullmx.test.example",), [(0, "")]),
        ("mx", ("mail.test.example",), []),
        ("dnsbl", ("dnsbl.test", "127.0.0.2"), ["127.0.0.2"]),
        ("dnsbl", ("dnsbl.test", "127.0.0.1"), []),
        ("dnsbl", ("dnsbl.test", "::FFFF:7F00:2"), ["127.0.0.2"]),
        ("dnsbl", ("dnsbl.test", "::FFFF:7F00:1"), []),
        ("dnsbl", ("dnsbl.test", "127.0.0.10"), ["127.0.0.2", "127.0.0.4"]),
        ("dnsbl_txt", ("dnsbl.test", "127.0.0.2"), ["Listed: RFC 5782 test entry 127.0.0.2"]),
        ("dnsbl_txt", ("dnsbl.test", "::ffff:127.0.0.2"), ["Listed: RFC 5782 test entry ::FFFF:7F00:2"]),
        ("dnsbl_txt", ("dnsbl.test", "127.0.0.1"), []),
    ],
)
async def test_typed_questions_return_zone_data(
    dns_server: DnsServer, method: str, args: tuple[Any, ...], expected: list[Any]
) -> None:
    """Each typed question returns the zone's records in its documented shape (order aside)."""
    result = await getattr(make_resolver(dns_server), method)(*args)
    assert sorted(result) == expected


async def test_mx_sorted_by_preference_then_host(dns_server: DnsServer) -> None:
    """MX records come back as (preference, host), lowest preference first, ties by host."""
    records = await make_resolver(dns_server).mx("test.example")
    assert records == [(10, "mx0.test.example"), (10, "mx1.test.example"), (20, "mx2.test.example")]


async def test_addresses_lists_ipv4_before_ipv6_asked_together(dns_server: DnsServer) -> None:
    """addresses() returns A then AAAA records, one query of each type."""
    assert await make_resolver(dns_server).addresses("mail.test.example") == ["127.0.0.2", "::2"]
    assert dns_server.queries[("mail.test.example", "A")] == 1
    assert dns_server.queries[("mail.test.example", "AAAA")] == 1


@pytest.mark.parametrize(
    ("name", "rdtype", "nxdomain"),
    [
        ("nowhere.test.example", "A", True),
        ("dangling.test.example", "A", True),
        ("mail.test.example", "TXT", False),
        ("sub.test.example", "A", False),
    ],
)
async def test_nxdomain_and_nodata_are_empty_answers(
    dns_server: DnsServer, name: str, rdtype: str, nxdomain: bool
) -> None:
    """NXDOMAIN and NODATA both give no records and are told apart by Answer.nxdomain."""
    answer = await make_resolver(dns_server).query(name, rdtype)
    assert (answer.records, answer.nxdomain) == ((), nxdomain)


@pytest.mark.parametrize("rdtype", ["BOGUS", "ANY", "AXFR"])
async def test_query_rejects_unknown_and_meta_types(dns_server: DnsServer, rdtype: str) -> None:
    """A record type dnspython does not know, or a meta type, raises ValueError before any query."""
    with pytest.raises(ValueError, match="DNS record type"):
        await make_resolver(dns_server).query("mail.test.example", rdtype)
    assert not dns_server.queries


@pytest.mark.parametrize("name", ["a..test.example", "x" * 64 + ".test.example", "a." * 128 + "example"])
async def test_invalid_name_raises_permanent_dns_error(dns_server: DnsServer, name: str) -> None:
    """A name that is not valid DNS syntax raises DnsError, not DnsTempError."""
    with pytest.raises(DnsError, match="invalid domain name") as caught:
        await make_resolver(dns_server).a(name)
    assert not isinstance(caught.value, DnsTempError)


# -- temporary failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "name", "reason"),
    [
        ("servfail", "mail.test.example", "servfail"),
        ("refuse", "mail.test.example", "refused"),
        ("drop", "mail.test.example", "timeout"),
        (None, "outside.invalid", "refused"),
    ],
)
async def test_resolver_trouble_raises_temp_error(
    dns_server: DnsServer, fault: str | None, name: str, reason: str
) -> None:
    """SERVFAIL, REFUSED and silence raise DnsTempError with their reason, never an empty answer."""
    if fault is not None:
        getattr(dns_server, fault)(name)
    resolver = make_resolver(dns_server, timeout=0.1, lifetime=0.2)
    with pytest.raises(DnsTempError) as caught:
        await resolver.a(name)
    assert caught.value.reason == reason
    assert isinstance(caught.value.__cause__, Exception)
    assert resolver.stats.temp_errors == 1


async def test_temp_errors_are_not_cached(dns_server: DnsServer) -> None:
    """After a SERVFAIL the next question goes to the server again and gets the answer."""
    resolver = make_resolver(dns_server)
    dns_server.servfail("mail.test.example")
    with pytest.raises(DnsTempError):
        await resolver.a("mail.test.example")
    dns_server.heal("mail.test.example")
    assert await resolver.a("mail.test.example") == ["127.0.0.2"]
    assert dns_server.queries[("mail.test.example", "A")] == 2


async def test_addresses_fails_when_a_question_fails(dns_server: DnsServer) -> None:
    """addresses() raises DnsTempError rather than return a partial list."""
    dns_server.servfail("mail.test.example")
    with pytest.raises(DnsTempError):
        await make_resolver(dns_server).addresses("mail.test.example")


async def test_lifetime_caps_one_question(dns_server: DnsServer) -> None:
    """A server slower than lifetime gives DnsTempError(timeout) after about lifetime, retries included."""
    dns_server.delay("mail.test.example", 5.0)
    resolver = make_resolver(dns_server, timeout=0.1, lifetime=0.3)
    started = time.monotonic()
    with pytest.raises(DnsTempError) as caught:
        await resolver.a("mail.test.example")
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 2.0
    assert dns_server.queries[("mail.test.example", "A")] >= 2  # retried within the lifetime


# -- cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "max_ttl", "advance", "queries"),
    [
        ("mail.test.example", 86400.0, 299.0, 1),
        ("mail.test.example", 86400.0, 301.0, 2),
        ("mail.test.example", 10.0, 9.0, 1),
        ("mail.test.example", 10.0, 11.0, 2),
        ("short.test.example", 86400.0, 29.0, 1),
        ("short.test.example", 86400.0, 31.0, 2),
    ],
)
async def test_positive_answers_cached_for_ttl_capped_by_max_ttl(
    dns_server: DnsServer, name: str, max_ttl: float, advance: float, queries: int
) -> None:
    """An answer is served from the cache until min(record TTL, max_ttl) has passed on the clock."""
    clock = FrozenClock()
    resolver = make_resolver(dns_server, clock, max_ttl=max_ttl)
    assert await resolver.a(name) == ["127.0.0.2"]
    clock.advance(advance)
    assert await resolver.a(name) == ["127.0.0.2"]
    assert dns_server.queries[(name, "A")] == queries
    assert resolver.stats.cache_hits == 2 - queries


@pytest.mark.parametrize(
    ("question", "negative_ttl", "advance", "queries"),
    [
        (("nowhere.test.example", "A"), 300.0, 59.0, 1),  # SOA minimum 60 < negative_ttl
        (("nowhere.test.example", "A"), 300.0, 61.0, 2),
        (("nowhere.test.example", "A"), 10.0, 9.0, 1),  # negative_ttl caps the SOA minimum
        (("nowhere.test.example", "A"), 10.0, 11.0, 2),
        (("mail.test.example", "TXT"), 300.0, 59.0, 1),  # NODATA is cached the same way
        (("mail.test.example", "TXT"), 300.0, 61.0, 2),
    ],
)
async def test_negative_answers_cached_for_soa_minimum_capped_by_negative_ttl(
    dns_server: DnsServer, question: tuple[str, str], negative_ttl: float, advance: float, queries: int
) -> None:
    """NXDOMAIN and NODATA are cached for min(SOA TTL, SOA minimum, negative_ttl)."""
    name, rdtype = question
    clock = FrozenClock()
    resolver = make_resolver(dns_server, clock, negative_ttl=negative_ttl)
    first = await resolver.query(name, rdtype)
    clock.advance(advance)
    assert await resolver.query(name, rdtype) == first
    assert first.ttl == min(60.0, negative_ttl)
    assert dns_server.queries[(name, rdtype)] == queries
    assert resolver.stats.negative_hits == 2 - queries


async def test_cache_size_evicts_least_recently_used(dns_server: DnsServer) -> None:
    """With cache_size entries cached, a new answer pushes out the one used longest ago."""
    resolver = make_resolver(dns_server, cache_size=2)
    for name in ("mail", "mx1", "mail", "mx2", "mail", "mx1"):
        await resolver.a(f"{name}.test.example")
    queries = dns_server.queries
    assert [queries[(f"{name}.test.example", "A")] for name in ("mail", "mx1", "mx2")] == [1, 2, 1]
    assert resolver.cache_entries == 2


async def test_cache_size_zero_turns_the_cache_off(dns_server: DnsServer) -> None:
    """cache_size = 0 sends every question to the server."""
    resolver = make_resolver(dns_server, cache_size=0)
    for _ in range(3):
        await resolver.a("mail.test.example")
    assert dns_server.queries[("mail.test.example", "A")] == 3


async def test_cache_key_ignores_case_and_trailing_dot(dns_server: DnsServer) -> None:
    """The same name in another case or with a trailing dot is a cache hit."""
    resolver = make_resolver(dns_server)
    await resolver.a("MAIL.Test.Example.")
    await resolver.a("mail.test.example")
    assert dns_server.queries[("mail.test.example", "A")] == 1


# -- in-flight deduplication ----------------------------------------------------------------


async def test_concurrent_identical_questions_send_one_query(dns_server: DnsServer) -> None:
    """Ten identical questions asked together share one query and its answer."""
    dns_server.delay("mail.test.example", 0.05)
    resolver = make_resolver(dns_server)
    results = await asyncio.gather(*(resolver.a("mail.test.example") for _ in range(10)))
    assert results == [["127.0.0.2"]] * 10
    assert dns_server.queries[("mail.test.example", "A")] == 1
    assert (resolver.stats.queries, resolver.stats.coalesced) == (1, 9)


async def test_concurrent_identical_questions_share_an_error(dns_server: DnsServer) -> None:
    """Waiters on one failing query all get DnsTempError, counted once."""
    dns_server.servfail("mail.test.example")
    resolver = make_resolver(dns_server)
    results = await asyncio.gather(
        *(resolver.a("mail.test.example") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(result, DnsTempError) for result in results)
    assert dns_server.queries[("mail.test.example", "A")] == 1
    assert resolver.stats.temp_errors == 1


async def test_cancelled_waiter_does_not_cancel_the_shared_query(dns_server: DnsServer) -> None:
    """Cancelling one waiter leaves the query running for the others, which get the answer."""
    dns_server.delay("mail.test.example", 0.05)
    resolver = make_resolver(dns_server)
    first = asyncio.create_task(resolver.a("mail.test.example"))
    second = asyncio.create_task(resolver.a("mail.test.example"))
    await asyncio.sleep(0)  # both waiters join the query in flight
    first.cancel()
    assert await second == ["127.0.0.2"]
    with pytest.raises(asyncio.CancelledError):
        await first
    assert dns_server.queries[("mail.test.example", "A")] == 1


async def test_query_finishes_and_is_cached_when_all_waiters_leave(dns_server: DnsServer) -> None:
    """A query whose only waiter was cancelled still completes and fills the cache."""
    dns_server.delay("mail.test.example", 0.05)
    resolver = make_resolver(dns_server)
    waiter = asyncio.create_task(resolver.a("mail.test.example"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await resolver.a("mail.test.example") == ["127.0.0.2"]
    assert dns_server.queries[("mail.test.example", "A")] == 1


# -- transport ------------------------------------------------------------------------------


@pytest.mark.parametrize(("edns", "tcp_queries"), [(False, 1), (True, 0)])
async def test_truncated_udp_answer_is_retried_over_tcp(
    dns_server: DnsServer, edns: bool, tcp_queries: int
) -> None:
    """An answer too big for 512 bytes comes over TCP without EDNS, over UDP with EDNS's 1232."""
    records = await make_resolver(dns_server, edns=edns).txt("big.test.example")
    assert len(records) == 5
    assert dns_server.tcp_queries[("big.test.example", "TXT")] == tcp_queries


def _ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_ipv6_nameserver_in_bracket_form() -> None:
    """A nameserver given as [::1]:port is asked over IPv6."""
    async with DnsServer([TEST_ZONE], host="::1") as server:
        assert server.nameserver == f"[::1]:{server.port}"
        assert await make_resolver(server).a("mail.test.example") == ["127.0.0.2"]


def test_threaded_server_serves_synchronous_callers() -> None:
    """The threaded server answers, and takes fault controls, from code outside its event loop."""
    with ThreadedDnsServer([TEST_ZONE]) as server:
        resolver = make_resolver(server)
        assert asyncio.run(resolver.a("mail.test.example")) == ["127.0.0.2"]
        server.servfail("mx1.test.example")
        with pytest.raises(DnsTempError):
            asyncio.run(resolver.a("mx1.test.example"))
        assert server.queries[("mail.test.example", "A")] == 1

"""Allow/deny list matchers: networks, domains and addresses, entry by entry."""

from __future__ import annotations

import ipaddress

import pytest

from mxward.shared.matchers import AddressList, DomainList
from mxward.shared.netutil import NetworkList, parse_ip

NETWORKS = ["10.0.0.0/8", "192.0.2.7", "198.51.100.128/25", "2001:db8::/32", "::1"]


@pytest.mark.parametrize(
    ("address", "listed"),
    [
        ("10.0.0.0", True),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("9.255.255.255", False),
        ("192.0.2.7", True),
        ("192.0.2.6", False),
        ("192.0.2.8", False),
        ("198.51.100.128", True),
        ("198.51.100.255", True),
        ("198.51.100.127", False),
        ("2001:db8::1", True),
        ("2001:db8:ffff:ffff::", True),
        ("2001:db9::", False),
        ("2001:db7:ffff::", False),
        ("::1", True),
        ("::2", False),
        ("::ffff:10.0.0.1", True),  # parse_ip makes an IPv4-mapped address plain IPv4
    ],
)
def test_network_list_membership_agrees_with_ipaddress(address: str, listed: bool) -> None:
    ip = parse_ip(address)
    networks = NetworkList(NETWORKS)
    assert (ip in networks) is listed
    same_family = [net for net in map(ipaddress.ip_network, NETWORKS) if net.version == ip.version]
    assert listed is any(ip in net for net in same_family)


def test_network_list_edges() -> None:
    assert parse_ip("192.0.2.1") not in NetworkList([])
    assert "192.0.2.1" not in NetworkList(["0.0.0.0/0"])  # a string is not an address
    assert parse_ip("203.0.113.9") in NetworkList(["0.0.0.0/0"])
    assert parse_ip("2001:db8::9") not in NetworkList(["0.0.0.0/0"])
    assert parse_ip("2001:db8::9") in NetworkList(["::/0"])
    assert NetworkList(["192.0.2.9/24"]).entries == ("192.0.2.0/24",)
    with pytest.raises(ValueError, match=r"'192\.0\.2\.300' is not an IP network"):
        NetworkList(["192.0.2.300"])


@pytest.mark.parametrize(
    ("name", "listed"),
    [
        ("example.com", True),
        ("MX1.Example.COM.", True),
        ("badexample.com", False),
        ("example.net", False),
        ("a.b.example.org", True),
        ("example.org", False),  # ".example.org": below it only
        ("mail7.dyn.test", True),
        ("mail.dyn.test", False),
        ("", False),
    ],
)
def test_domain_list(name: str, listed: bool) -> None:
    domains = DomainList(["example.com", ".example.org", r"/^mail\d+\.dyn\./"])
    assert domains.matches(name) is listed


ADDRESS_ENTRIES = [
    "postmaster@",
    "abuse@",
    "alice@example.com",
    "@example.net",
    "example.org",
    "/^bounce-\\d+@/",
]


@pytest.mark.parametrize(
    ("address", "listed"),
    [
        ("postmaster@example.com", True),
        ("<PostMaster@Other.Example>", True),
        ("postmaster", True),  # a local part alone (Postfix allows it without a domain)
        ("abuse@x.test", True),
        ("abusive@x.test", False),
        ("alice@example.com", True),
        ("Alice@EXAMPLE.com.", True),
        ("alice@example.net", True),  # @example.net: every local part
        ("bob@example.com", False),
        ("bob@example.net", True),
        ("bob@sub.example.net", False),  # @domain: not its subdomains
        ("bob@example.org", True),
        ("bob@sub.example.org", True),  # a bare domain: and its subdomains
        ("bounce-123@lists.test", True),
        ("bounce-x@lists.test", False),
        ("", False),
    ],
)
def test_address_list(address: str, listed: bool) -> None:
    assert AddressList(ADDRESS_ENTRIES).matches(address) is listed


@pytest.mark.parametrize(
    ("entries", "address", "listed"),
    [
        (["postmaster@"], "postmaster@example.com", True),
        (["postmaster@"], "alice@example.com", False),
        (["alice@example.com"], "alice@example.com", True),
        (["alice@example.com"], "alice@example.net", False),
        (["/^alice@/"], "alice@example.net", True),
        (["example.com"], "alice@mx.example.com", True),
        ([], "alice@example.com", False),
    ],
)
def test_address_list_of_one_kind(entries: list[str], address: str, listed: bool) -> None:
    """Each entry kind alone (the matcher skips the kinds a list does not have)."""
    assert AddressList(entries).matches(address) is listed

"""Small address helpers shared by the daemons and the checks: network lists and masking."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

__all__ = ["IPNetwork", "NetworkList", "mask_address", "network_text", "parse_ip"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """Parse a client address as Postfix sends it; IPv4-mapped IPv6 becomes plain IPv4.

    Postfix writes IPv6 clients without brackets or an ``IPv6:`` prefix, but other callers may
    not, so both are tolerated. Returns None for an unparsable value.
    """
    try:  # the common case, fast: a plain IPv4 address as Postfix sends it
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def mask_address(ip: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> IPNetwork:
    """The network of ``ip`` at the given prefix length (/24 and /64 group a sender's pool)."""
    if isinstance(ip, ipaddress.IPv4Address):
        mask = (0xFFFFFFFF << (32 - ipv4_prefix)) & 0xFFFFFFFF
        return ipaddress.IPv4Network((int(ip) & mask, ipv4_prefix))
    mask6 = ((1 << 128) - 1) ^ ((1 << (128 - ipv6_prefix)) - 1)
    return ipaddress.IPv6Network((int(ip) & mask6, ipv6_prefix))


def network_text(ip: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """``str(mask_address(...))``, computed without building a network object for IPv4."""
    if isinstance(ip, ipaddress.IPv4Address):
        n = int(ip) & ((0xFFFFFFFF << (32 - ipv4_prefix)) & 0xFFFFFFFF)
        return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}/{ipv4_prefix}"
    return str(mask_address(ip, ipv4_prefix, ipv6_prefix))


class NetworkList:
    """An immutable list of networks with a fast membership test.

    Entries are CIDR networks or single addresses (``192.0.2.0/24``, ``2001:db8::/32``,
    ``127.0.0.1``). A bad entry raises ValueError naming it.
    """

    __slots__ = ("_v4", "_v6", "entries")

    # Each network is kept as (mask, masked address) integers: one AND and one comparison per
    # network instead of ipaddress's own containment test (Python code, on every request).

    def __init__(self, entries: Iterable[str]) -> None:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        kept: list[str] = []
        for entry in entries:
            try:
                net = ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP network or address") from None
            (v4 if isinstance(net, ipaddress.IPv4Network) else v6).append(net)  # type: ignore[arg-type]
            kept.append(str(net))
        self._v4 = tuple((int(net.netmask), int(net.network_address)) for net in v4)
        self._v6 = tuple((int(net.netmask), int(net.network_address)) for net in v6)
        self.entries = tuple(kept)

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, ipaddress.IPv4Address):
            nets = self._v4
        elif isinstance(ip, ipaddress.IPv6Address):
            nets = self._v6
        else:
            return False
        if not nets:
            return False
        value = int(ip)
        for mask, network in nets:  # noqa: SIM110 - a plain loop: any() with a generator costs more here
            if value & mask == network:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __repr__(self) -> str:
        return f"NetworkList({list(self.entries)!r})"

"""Allow/deny list matchers for host names, domains and addresses, shared by the checks.

Entry syntax (the same everywhere in the configuration):

* ``example.com``: that domain and every name below it (``mx1.example.com``);
* ``.example.com``: only names below it, not the domain itself;
* ``/regex/``: a Python regular expression searched in the lower-cased value;
* for address lists also ``user@example.com`` (that address), ``user@`` (that local part in
  any domain) and ``@example.com`` (the domain only, not its subdomains).

Matching is case-insensitive. A bad regular expression raises ValueError naming the entry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["AddressList", "DomainList", "split_address"]


def split_address(address: str) -> tuple[str, str]:
    """``(local, domain)`` of an envelope address, lower-cased; no ``@`` gives an empty domain."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at:
        return domain.lower(), ""
    return local.lower(), domain.lower().rstrip(".")


def _regex(entry: str) -> re.Pattern[str]:
    try:
        return re.compile(entry[1:-1], re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"{entry!r} is not a valid regular expression: {exc}") from None


class DomainList:
    """Matches host or domain names against ``name``, ``.name`` and ``/regex/`` entries."""

    __slots__ = ("_exact", "_regexes", "_suffixes", "entries")

    def __init__(self, entries: Iterable[str]) -> None:
        exact: set[str] = set()
        suffixes: list[str] = []
        regexes: list[re.Pattern[str]] = []
        self.entries = tuple(entries)
        for raw in self.entries:
            entry = raw.strip().lower().rstrip(".")
            if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
                regexes.append(_regex(raw.strip()))
            elif entry.startswith("."):
                suffixes.append(entry)
            elif entry:
                exact.add(entry)
                suffixes.append("." + entry)
            else:
                raise ValueError(f"{raw!r}: empty domain entry")
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)
        self._regexes = tuple(regexes)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def matches(self, name: str) -> bool:
        if not name:
            return False
        name = name.lower().rstrip(".")
        if name in self._exact or name.endswith(self._suffixes):
            return True
        return any(rx.search(name) for rx in self._regexes)


class AddressList:
    """Matches envelope addresses: ``user@domain``, ``user@``, ``@domain``, domains, regexes."""

    __slots__ = ("_addresses", "_domains", "_exact_domains", "_locals", "_regexes", "entries")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        addresses: set[str] = set()
        locals_: set[str] = set()
        exact_domains: set[str] = set()
        domain_entries: list[str] = []
        regexes: list[re.Pattern[str]] = []
        for raw in self.entries:
            entry = raw.strip().lower()
            if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
                regexes.append(_regex(raw.strip()))
            elif entry.startswith("@"):
                exact_domains.add(entry[1:].rstrip("."))
            elif entry.endswith("@"):
                locals_.add(entry[:-1])
            elif "@" in entry:
                addresses.add(entry)
            elif entry:
                domain_entries.append(entry)
            else:
                raise ValueError(f"{raw!r}: empty address entry")
        self._addresses = frozenset(addresses)
        self._locals = frozenset(locals_)
        self._exact_domains = frozenset(exact_domains)
        self._domains = DomainList(domain_entries)
        self._regexes = tuple(regexes)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def matches(self, address: str) -> bool:
        local, domain = split_address(address)
        if local in self._locals or domain in self._exact_domains:
            return True
        # The common lists (postmaster@, abuse@) have local parts only: skip what is empty.
        if self._domains and self._domains.matches(domain):
            return True
        if not self._addresses and not self._regexes:
            return False
        full = f"{local}@{domain}" if domain else local
        return full in self._addresses or any(rx.search(full) for rx in self._regexes)


class TextList:
    """Names matched case-insensitively, exactly, plus ``/regex/`` entries searched in the text.

    For lists such as operating systems (``"Windows"``, ``"/^windows (xp|7)/"``). ``option``
    names the setting in error messages.
    """

    __slots__ = ("_exact", "_regexes", "entries")

    def __init__(self, entries: Iterable[str], option: str = "entries") -> None:
        self.entries = tuple(entries)
        exact: set[str] = set()
        regexes: list[re.Pattern[str]] = []
        for raw in self.entries:
            entry = raw.strip()
            if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
                try:
                    regexes.append(re.compile(entry[1:-1], re.IGNORECASE))
                except re.error as exc:
                    raise ValueError(f"{option}: {raw!r} is not a valid regular expression: {exc}") from None
            elif entry:
                exact.add(entry.casefold())
            else:
                raise ValueError(f"{option}: empty entry")
        self._exact = frozenset(exact)
        self._regexes = tuple(regexes)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def matches(self, text: str, *aliases: str) -> bool:
        """``text`` or one of its ``aliases`` is an exact entry, or a regex is found in ``text``."""
        if not text:
            return False
        if any(name.casefold() in self._exact for name in (text, *aliases) if name):
            return True
        return any(rx.search(text) for rx in self._regexes)

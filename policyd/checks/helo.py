"""helo: is the HELO/EHLO name the client gave believable?

Stage: helo (Postfix's ``helo_name``; with the default ``smtpd_delay_reject = yes`` it runs at
the first RCPT request, once per message).

What and why
    RFC 5321 section 4.1.1.1 asks a client to greet with its fully qualified host name, or an
    address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) when it has none. Real mail
    servers do; spam software often greets with our own name, ``localhost``, a bare IP, a
    made-up name or somebody else's address. The tests come in three sets, as in qpsmtpd:

    lenient (no DNS; false positives are rare)
        empty            the client never said HELO/EHLO (Postfix sends ``helo_name=""``)
        bad_name         the name is on the local ``bad_names`` list
        own_name         a foreign client claims our own name (``[mxward] hostname`` when it
                         has a dot, and ``own_names``) or our own address (``own_addresses``
                         and Postfix's ``server_address``) as a literal or bare IP
        localhost        ``localhost``, ``localhost.localdomain`` or ``*.localhost`` from a
                         client outside ``loopback_clients``
        forged_literal   an address literal that is not the client's address, or not a valid
                         address at all
        plain_ip         a bare IP address without brackets (RFC 5321 section 4.1.3)
    rfc (lenient plus DNS)
        not_fqdn         not a fully qualified host name (one label, or characters other
                         than letters, digits, "-" and "_"); address literals are exempt
        no_forward_dns   the name does not exist (NXDOMAIN; "no address" is not a failure)
        no_reverse_dns   the client address has no PTR record
    strict (rfc plus)
        address_literal  any address literal, even the client's own
        no_matching_dns  neither the forward nor the reverse DNS match (below)

    The tests run in the order above (cheap ones first) and the first failure decides; the
    DNS questions are only asked when a DNS test is on, for a name that is a valid host name.
    ``skip_tests`` turns single tests off.

Matches (facts, and the strict set's last test)
    forward match  an A (IPv4 client) or AAAA (IPv6 client) record of the HELO name is the
                   client address or in its /``forward_ipv4_prefix`` or
                   /``forward_ipv6_prefix`` network;
    reverse match  a PTR name of the client is the HELO name or shares its last
                   ``reverse_match_labels`` labels (same domain; there is no public suffix
                   list, so ``example.co.uk`` and ``other.co.uk`` match too at the default 2).
    In strict mode both matching scores ``scores.dns_match`` (a good sign, negative).

Results
    A failing test gives verdict fail with ``scores.<test>`` and a client-facing reason. When
    the test is listed in ``reject`` the check answers at once with ``reject_code``
    ``reject_dsn`` and that reason (a 4xx code defers instead), and the score counts too.
    Replies (the ``{helo}`` and ``{ip}`` parts filled in):
        empty            HELO/EHLO with your host name is required (RFC 5321 section 4.1.1.1)
        bad_name         I do not believe you are {helo} (or the entry's own reason)
        own_name         You are not me: {helo} is this server's own name or address
        localhost        You are not localhost: {helo} is only accepted from this host
        forged_literal   HELO address literal {helo} is not your address {ip}
                         (or: {helo} is not a valid address literal)
        plain_ip         A bare IP address is not a valid HELO name; use your host name or
                         [{ip}] (RFC 5321 section 4.1.3; [IPv6:{ip}] for IPv6)
        not_fqdn         HELO name {helo} is not a fully qualified host name (RFC 5321
                         section 4.1.1.1)
        no_forward_dns   HELO name {helo} does not exist in DNS
        no_reverse_dns   Your address {ip} has no reverse DNS (PTR) record
        address_literal  HELO with an address literal is not accepted here; use your host name
        no_matching_dns  HELO name {helo} does not match your address {ip} in DNS

Options ([checks.helo]), besides enabled/timeout/on_error/mode:
    policy                  string  "lenient"   test set: "lenient", "rfc" or "strict"
    skip_tests              list    []          tests not to run, by name (see above)
    reject                  list    []          tests answered at once instead of only scored
    reject_code             int     550         code of that answer; 4xx defers instead
    reject_dsn              string  "5.7.1"     enhanced status code ("4.7.1" with 4xx)
    bad_names               list    []          tables {pattern, reason}: pattern "name"
                                                (exact, case-insensitive), "/regex/"
                                                (searched), "!/regex/" (fails when the name
                                                does NOT match); exact names are checked
                                                first, then patterns in order; reason "" =
                                                the default text, "{helo}" is replaced
    own_names               list    []          our names besides ``[mxward] hostname``
    own_addresses           list    []          our addresses or networks besides Postfix's
                                                ``server_address``; a client in them is not
                                                foreign
    loopback_clients        list    ["127.0.0.1", "::1"]
                                                clients that may say localhost (and are not
                                                foreign for own_name)
    forward_ipv4_prefix     int     24          network of a forward match, IPv4 (32: exact)
    forward_ipv6_prefix     int     64          network of a forward match, IPv6 (128: exact)
    reverse_match_labels    int     2           trailing labels a PTR name must share with
                                                the HELO name; 0 = only the same name
    add_header              bool    false       PREPEND ``X-HELO: <name>`` (once per message)
    scores                  table               score per failing test:
                                                empty 3, bad_name 10, own_name 10,
                                                localhost 5, forged_literal 5, plain_ip 3,
                                                not_fqdn 2, no_forward_dns 2,
                                                no_reverse_dns 1, address_literal 1,
                                                no_matching_dns 1; and dns_match -1

Facts provided
    ``helo.name``: the name as given (``""`` when none); ``helo.test``: the failed test or
    ``""``; ``helo.forward_match`` / ``helo.reverse_match``: "yes", "no", or ``None`` when
    not looked up (lenient policy, a name that is not a host name) or the lookup failed.

Log
    ``test=<failed test>``, ``fwd=yes|no`` and ``rev=yes|no`` after DNS, ``dns=<which>:<reason>``
    when a lookup failed.

Failure behaviour
    Only NXDOMAIN (and a missing PTR) fails a DNS test. SERVFAIL, REFUSED or a timeout never
    fails the sender: the test that needed the answer is not decided, and when no other test
    failed the verdict is ERROR without a score (``on_error = "tempfail"`` would answer
    ``451 4.3.0``: the operator's explicit choice). A client without an address is skipped.
    Exempt clients (authenticated, ``[policyd.exempt] networks``) get no X-HELO header either.

Redis keys
    none.

RFCs: RFC 5321 sections 4.1.1.1 (HELO/EHLO), 4.1.3 (address literals), 2.3.5 (domain
names); RFC 1912 section 2.1; RFC 6761 section 6.3 (localhost).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import string
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from mxward.policyd.checks.fcrdns import check_reply, is_hostname, reply_action
from mxward.shared.dns import DnsTempError
from mxward.shared.netutil import IPAddress, NetworkList, mask_address, parse_ip
from mxward.shared.plugin import Check, LogValue, Result, Services, Stage, Transaction, Verdict

__all__ = ["POLICIES", "BadName", "HeloCheck", "HeloTest", "Options", "Scores"]

HeloTest = Literal[
    "empty",
    "bad_name",
    "own_name",
    "localhost",
    "forged_literal",
    "plain_ip",
    "not_fqdn",
    "address_literal",
    "no_forward_dns",
    "no_reverse_dns",
    "no_matching_dns",
]

_LENIENT: tuple[HeloTest, ...] = ("empty", "bad_name", "own_name", "localhost", "forged_literal", "plain_ip")
_RFC: tuple[HeloTest, ...] = (*_LENIENT, "not_fqdn", "no_forward_dns", "no_reverse_dns")
POLICIES: dict[str, tuple[HeloTest, ...]] = {
    "lenient": _LENIENT,
    "rfc": _RFC,
    "strict": (*_RFC, "address_literal", "no_matching_dns"),
}

_REASONS: dict[HeloTest, str] = {
    "empty": "HELO/EHLO with your host name is required (RFC 5321 section 4.1.1.1)",
    "bad_name": "I do not believe you are {helo}",
    "own_name": "You are not me: {helo} is this server's own name or address",
    "localhost": "You are not localhost: {helo} is only accepted from this host",
    "forged_literal": "HELO address literal {helo} is not your address {ip}",
    "plain_ip": "A bare IP address is not a valid HELO name; use your host name or [{literal}]"
    " (RFC 5321 section 4.1.3)",
    "not_fqdn": "HELO name {helo} is not a fully qualified host name (RFC 5321 section 4.1.1.1)",
    "address_literal": "HELO with an address literal is not accepted here; use your host name",
    "no_forward_dns": "HELO name {helo} does not exist in DNS",
    "no_reverse_dns": "Your address {ip} has no reverse DNS (PTR) record",
    "no_matching_dns": "HELO name {helo} does not match your address {ip} in DNS",
}
_BAD_LITERAL = "{helo} is not a valid address literal"
_HEADER_MAX = 200


@dataclass(frozen=True, kw_only=True)
class Scores:
    """``[checks.helo.scores]``: the score of each failing test, and of a strict DNS match."""

    empty: float = 3.0
    bad_name: float = 10.0
    own_name: float = 10.0
    localhost: float = 5.0
    forged_literal: float = 5.0
    plain_ip: float = 3.0
    not_fqdn: float = 2.0
    address_literal: float = 1.0
    no_forward_dns: float = 2.0
    no_reverse_dns: float = 1.0
    no_matching_dns: float = 1.0
    dns_match: float = -1.0


@dataclass(frozen=True, kw_only=True)
class BadName:
    """One ``bad_names`` entry: ``{ pattern = "...", reason = "..." }``."""

    pattern: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        pattern = self.pattern.strip()
        if not pattern:
            raise ValueError("bad_names: an entry needs a pattern")
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        if _is_regex(body):
            try:
                re.compile(body[1:-1])
            except re.error as exc:
                raise ValueError(f"bad_names: {pattern!r} is not a valid regular expression: {exc}") from None
        elif negated:
            raise ValueError(f'bad_names: {pattern!r}: only a "/regex/" can be negated with "!"')
        fields = {name for _, name, _, _ in string.Formatter().parse(self.reason) if name}
        if fields - {"helo"}:
            raise ValueError(f"bad_names: reason {self.reason!r}: only {{helo}} can be replaced")


def _is_regex(text: str) -> bool:
    return len(text) > 2 and text.startswith("/") and text.endswith("/")


@dataclass(frozen=True, kw_only=True)
class Options:
    policy: Literal["lenient", "rfc", "strict"] = "lenient"
    skip_tests: tuple[HeloTest, ...] = ()
    reject: tuple[HeloTest, ...] = ()
    reject_code: int = 550
    reject_dsn: str = "5.7.1"
    bad_names: tuple[BadName, ...] = ()
    own_names: tuple[str, ...] = ()
    own_addresses: tuple[str, ...] = ()
    loopback_clients: tuple[str, ...] = ("127.0.0.1", "::1")
    forward_ipv4_prefix: int = 24
    forward_ipv6_prefix: int = 64
    reverse_match_labels: int = 2
    add_header: bool = False
    scores: Scores = field(default_factory=Scores)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        known = POLICIES["strict"]
        for key in ("skip_tests", "reject"):
            unknown = [t for t in getattr(self, key) if t not in known]
            if unknown:
                raise ValueError(f"{key}: unknown test(s) {unknown} (tests: {', '.join(known)})")
        check_reply(self.reject_code, self.reject_dsn)
        if not 8 <= self.forward_ipv4_prefix <= 32 or not 16 <= self.forward_ipv6_prefix <= 128:
            raise ValueError("forward_ipv4_prefix must be 8..32 and forward_ipv6_prefix 16..128")
        if self.reverse_match_labels < 0:
            raise ValueError("reverse_match_labels must be 0 (same name only) or more")
        NetworkList(self.own_addresses)
        NetworkList(self.loopback_clients)
        for name in self.own_names:
            if not is_hostname(name):
                raise ValueError(f"own_names: {name!r} is not a fully qualified host name")


class _BadNameMatcher:
    """The compiled ``bad_names`` list."""

    def __init__(self, entries: tuple[BadName, ...]) -> None:
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], bool, str]] = []
        for entry in entries:
            pattern = entry.pattern.strip()
            negated = pattern.startswith("!")
            body = pattern[1:] if negated else pattern
            if _is_regex(body):
                self._patterns.append((re.compile(body[1:-1], re.IGNORECASE), negated, entry.reason))
            else:
                self._exact.setdefault(body.lower().removesuffix("."), entry.reason)

    def match(self, name: str) -> str | None:
        """The reason template of an entry that refuses ``name`` (``""``: default), or None.

        Exact names are looked up first, then the patterns in their order.
        """
        reason = self._exact.get(name.lower().removesuffix("."))
        if reason is not None:
            return reason
        for regex, negated, text in self._patterns:
            if (regex.search(name) is None) == negated:
                return text
        return None


@dataclass(frozen=True, slots=True)
class _Failure:
    test: HeloTest
    reason: str


@dataclass(frozen=True, slots=True)
class _Dns:
    """What DNS said: None means not asked, or the answer did not come (see ``errors``)."""

    exists: bool | None = None
    forward_match: bool | None = None
    ptr_names: tuple[str, ...] | None = None
    reverse_match: bool | None = None
    errors: tuple[str, ...] = ()


_LOCALHOST = ("localhost", "localhost.localdomain")


class HeloCheck(Check[Options]):
    name: ClassVar[str] = "helo"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.HELO})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = (
        "helo.name",
        "helo.test",
        "helo.forward_match",
        "helo.reverse_match",
    )
    timeout: ClassVar[float] = 5.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        skipped = set(options.skip_tests)
        self._tests = frozenset(t for t in POLICIES[options.policy] if t not in skipped)
        self._reject = frozenset(options.reject)
        self._bad_names = _BadNameMatcher(options.bad_names)
        own = {n.lower().removesuffix(".") for n in options.own_names}
        hostname = services.hostname.lower().removesuffix(".")
        if is_hostname(hostname):
            own.add(hostname)
        self._own_names = frozenset(own)
        self._own_networks = NetworkList(options.own_addresses)
        self._loopback = NetworkList(options.loopback_clients)
        self._forward_wanted = bool(self._tests & {"no_forward_dns", "no_matching_dns"})
        self._reverse_wanted = bool(self._tests & {"no_reverse_dns", "no_matching_dns"})

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        return (tx.client_address, tx.helo, tx.attrs.get("server_address", ""))

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        ip = tx.client_ip
        if ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        helo = tx.helo.strip()
        failure = self._static_failure(helo, ip, tx)
        if failure is not None:
            return self._fail(helo, ip, failure, _Dns())
        name = helo.lower().removesuffix(".")
        if not is_hostname(name) or not (self._forward_wanted or self._reverse_wanted):
            return self._pass(helo, _Dns())
        found = await self._lookups(name, ip)
        failure = self._dns_failure(found, helo, ip)
        if failure is not None:
            return self._fail(helo, ip, failure, found)
        if "no_matching_dns" in self._tests and not (found.forward_match or found.reverse_match):
            if found.forward_match is None or found.reverse_match is None:
                return self._undecided(helo, found)
            return self._fail(helo, ip, _Failure("no_matching_dns", _REASONS["no_matching_dns"]), found)
        if found.errors:
            return self._undecided(helo, found)
        score = 0.0
        if "no_matching_dns" in self._tests and found.forward_match and found.reverse_match:
            score = self.options.scores.dns_match
        return self._pass(helo, found, score)

    # -- the tests without DNS ---------------------------------------------------------------

    def _static_failure(self, helo: str, ip: IPAddress, tx: Transaction) -> _Failure | None:
        tests = self._tests
        if not helo:
            return _Failure("empty", _REASONS["empty"]) if "empty" in tests else None
        name = helo.lower().removesuffix(".")
        literal = helo.startswith("[") and helo.endswith("]")
        claimed = parse_ip(helo) if literal or _looks_like_ip(helo) else None
        if "bad_name" in tests:
            reason = self._bad_names.match(helo)
            if reason is not None:
                return _Failure("bad_name", reason or _REASONS["bad_name"])
        if "own_name" in tests and self._claims_us(name, claimed, ip, tx):
            return _Failure("own_name", _REASONS["own_name"])
        if "localhost" in tests and _is_localhost(name) and ip not in self._loopback:
            return _Failure("localhost", _REASONS["localhost"])
        if literal and "forged_literal" in tests:
            if claimed is None:
                return _Failure("forged_literal", _BAD_LITERAL)
            if claimed != ip:
                return _Failure("forged_literal", _REASONS["forged_literal"])
        if not literal and claimed is not None and "plain_ip" in tests:
            return _Failure("plain_ip", _REASONS["plain_ip"])
        if literal:
            if "address_literal" in tests:
                return _Failure("address_literal", _REASONS["address_literal"])
        elif "not_fqdn" in tests and not is_hostname(name):
            return _Failure("not_fqdn", _REASONS["not_fqdn"])
        return None

    def _claims_us(self, name: str, claimed: IPAddress | None, ip: IPAddress, tx: Transaction) -> bool:
        server = parse_ip(tx.attrs.get("server_address", ""))
        if ip in self._own_networks or ip in self._loopback or (server is not None and ip == server):
            return False
        if claimed is not None:
            return claimed in self._own_networks or claimed == server
        return name in self._own_names

    # -- the DNS tests -----------------------------------------------------------------------

    async def _lookups(self, name: str, ip: IPAddress) -> _Dns:
        dns = self.services.dns
        forward_ask = self._forward(name, ip) if self._forward_wanted else _nothing()
        reverse_ask = self._reverse(ip) if self._reverse_wanted else _nothing()
        if (not self._forward_wanted or dns.is_cached(name, "A" if ip.version == 4 else "AAAA")) and (
            not self._reverse_wanted or dns.is_cached(dns.reverse_name(ip), "PTR")
        ):
            forward, reverse = await forward_ask, await reverse_ask  # cached: no tasks needed
        else:
            forward, reverse = await asyncio.gather(forward_ask, reverse_ask)
        errors: list[str] = []
        exists = forward_match = None
        if isinstance(forward, DnsTempError):
            errors.append(f"forward:{forward.reason}")
        elif forward is not None:
            exists, forward_match = forward
        ptr_names: tuple[str, ...] | None = None
        reverse_match = None
        if isinstance(reverse, DnsTempError):
            errors.append(f"reverse:{reverse.reason}")
        elif reverse is not None:
            ptr_names = reverse
            reverse_match = any(self._same_domain(name, ptr) for ptr in ptr_names)
        return _Dns(exists, forward_match, ptr_names, reverse_match, tuple(errors))

    async def _forward(self, name: str, ip: IPAddress) -> tuple[bool, bool] | DnsTempError:
        """(exists, matches) of the HELO name's A or AAAA records, or the temporary error."""
        try:
            answer = await self.services.dns.query(name, "A" if ip.version == 4 else "AAAA")
        except DnsTempError as exc:
            return exc
        if answer.nxdomain:
            return (False, False)
        opts = self.options
        net = mask_address(ip, opts.forward_ipv4_prefix, opts.forward_ipv6_prefix)
        addresses = (parse_ip(record) for record in answer.records)
        return (True, any(a is not None and a in net for a in addresses))

    async def _reverse(self, ip: IPAddress) -> tuple[str, ...] | DnsTempError:
        try:
            return tuple(await self.services.dns.ptr(ip))
        except DnsTempError as exc:
            return exc

    def _same_domain(self, helo: str, ptr: str) -> bool:
        ptr = ptr.lower().removesuffix(".")
        if helo == ptr:
            return True
        labels = self.options.reverse_match_labels
        if labels == 0:
            return False
        ours, theirs = helo.split("."), ptr.split(".")
        return len(ours) >= labels and len(theirs) >= labels and ours[-labels:] == theirs[-labels:]

    def _dns_failure(self, found: _Dns, helo: str, ip: IPAddress) -> _Failure | None:
        if "no_forward_dns" in self._tests and found.exists is False:
            return _Failure("no_forward_dns", _REASONS["no_forward_dns"])
        if "no_reverse_dns" in self._tests and found.ptr_names == ():
            return _Failure("no_reverse_dns", _REASONS["no_reverse_dns"])
        return None

    # -- results -----------------------------------------------------------------------------

    def _facts(self, helo: str, test: str, found: _Dns) -> dict[str, LogValue]:
        return {
            "helo.name": helo,
            "helo.test": test,
            "helo.forward_match": _yes_no(found.forward_match),
            "helo.reverse_match": _yes_no(found.reverse_match),
        }

    def _log(self, found: _Dns) -> dict[str, LogValue]:
        log: dict[str, LogValue] = {}
        if found.forward_match is not None:
            log["fwd"] = _yes_no(found.forward_match)
        if found.reverse_match is not None:
            log["rev"] = _yes_no(found.reverse_match)
        if found.errors:
            log["dns"] = ",".join(found.errors)
        return log

    def _header(self, helo: str) -> str:
        if not (self.options.add_header and helo):
            return ""
        value = "".join(ch if ch.isascii() and ch.isprintable() else "?" for ch in helo)
        return f"X-HELO: {value[:_HEADER_MAX]}"

    def _pass(self, helo: str, found: _Dns, score: float = 0.0) -> Result:
        return Result(
            check=self.name,
            verdict=Verdict.PASS,
            score=score,
            log=self._log(found),
            facts=self._facts(helo, "", found),
            header=self._header(helo),
        )

    def _undecided(self, helo: str, found: _Dns) -> Result:
        return Result(
            check=self.name,
            verdict=Verdict.ERROR,
            log=self._log(found),
            facts=self._facts(helo, "", found),
            header=self._header(helo),
        )

    def _fail(self, helo: str, ip: IPAddress, failure: _Failure, found: _Dns) -> Result:
        test = failure.test
        literal = f"IPv6:{ip}" if ip.version == 6 else str(ip)
        reason = failure.reason.format(helo=helo, ip=ip, literal=literal)
        action = None
        if test in self._reject:
            action = reply_action(self.options.reject_code, self.options.reject_dsn, reason)
        return Result(
            check=self.name,
            verdict=Verdict.FAIL,
            score=getattr(self.options.scores, test),
            reason=reason,
            log={"test": test, **self._log(found)},
            facts=self._facts(helo, test, found),
            action=action,
            header=self._header(helo),
        )


async def _nothing() -> None:
    return None


def _yes_no(value: bool | None) -> str | None:
    return None if value is None else ("yes" if value else "no")


def _looks_like_ip(text: str) -> bool:
    """A bare IPv4 or IPv6 address (IPv6 with or without the ``IPv6:`` tag)."""
    candidate = text[5:] if text[:5].lower() == "ipv6:" else text
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _is_localhost(name: str) -> bool:
    return name in _LOCALHOST or name.endswith(".localhost")

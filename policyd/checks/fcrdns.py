"""fcrdns: forward-confirmed reverse DNS of the connecting client (RFC 8601 "iprev").

Stage: connect (facts for every later check; with Postfix's default ``smtpd_delay_reject =
yes`` it runs at the first RCPT request, once per message).

What and why
    The reverse DNS (PTR) of a mail server is set by whoever runs the address block; the
    forward DNS (A/AAAA) of the PTR name by whoever runs that domain. A real mail server has
    both, and they agree. The reverse DNS of a hijacked home PC belongs to its provider and
    is out of the spammer's control, and names a spammer publishes for his own blocks rarely
    resolve back. So a confirmed name is a good sign and a missing or unconfirmed one a bad
    sign; neither is proof, so the result goes into the score, not into a reply.

    The check asks our own resolver, not only Postfix: Postfix's ``client_name`` says
    "unknown" both when there is no PTR and when its lookup failed, so it cannot tell a
    permanent from a temporary failure. Postfix's ``client_name`` and
    ``reverse_client_name`` are compared with our result for the log only.

Method (RFC 8601 section 3, "iprev"; RFC 5451 section 3)
    1. PTR lookup of the client address (in-addr.arpa / ip6.arpa).
    2. The PTR names, sorted, that are syntactically host names with at least two labels,
       at most ``max_names`` of them, are looked up at the same time: A for an IPv4 client,
       AAAA for an IPv6 client. A name such as ``localhost`` is not looked up and cannot
       confirm anything.
    3. ``pass`` when a forward address equals the client address; the first such name (in
       sorted order) is the verified name. With ``network_pass`` a forward address in the
       client's /``ipv4_prefix`` or /``ipv6_prefix`` network passes too (qpsmtpd's "same /24"
       rule; off by default because iprev is an exact comparison).
    4. Otherwise ``temperror`` when a forward lookup failed temporarily (the result cannot be
       known), else ``fail``: PTR names exist but none resolves back to the client.
    No PTR (NXDOMAIN or no PTR record) is ``permerror``; a PTR lookup that fails
    temporarily (SERVFAIL, timeout) is ``temperror``.

Loopback clients
    No special case: 127.0.0.0/8 and ::1 are looked up like any other address (qpsmtpd passes
    loopback clients unconditionally). The usual PTR of 127.0.0.1 is the bare ``localhost``,
    which confirms nothing, so an unexempted 127.0.0.1 gets ``fail``. Local senders belong in
    ``[policyd.exempt] networks``, where no check runs for them at all.

Results
    pass (exact match)       verdict pass,  ``score_pass`` (a good sign: negative)
    pass (network_pass)      verdict pass,  ``score_network_pass``
    fail                     verdict fail,  ``score_fail``; answered at once if in ``reject``
    permerror                verdict fail,  ``score_permerror``; answered at once if in ``reject``
    temperror                verdict error, no score, never answered

Options ([checks.fcrdns]), besides enabled/timeout/on_error/mode:
    max_names           int       10      PTR names whose addresses are looked up (RFC 7208
                                          section 4.6.4 uses the same bound); names beyond it
                                          are ignored
    network_pass        bool      false   a forward address in the client's network counts
                                          as pass (with ``score_network_pass``)
    ipv4_prefix         int       24      network size for ``network_pass``, IPv4
    ipv6_prefix         int       64      network size for ``network_pass``, IPv6
    score_pass          float     -1.0    score when a PTR name resolves back exactly
    score_network_pass  float     0.0     score when only the network matched
    score_fail          float     1.0     score when PTR names exist but none resolves back
    score_permerror     float     1.0     score when the address has no PTR
    reject              list      []      iprev results answered at once instead of only
                                          scored: any of "fail", "permerror"
    reject_code         int       550     code of that answer; a 4xx code defers instead
    reject_dsn          string    "5.7.25" enhanced status code (RFC 7372: reverse DNS
                                          validation failed); "4.7.25" with a 4xx code
    reject_text         string    "Reverse DNS of {ip} is not forward-confirmed (iprev={result})"
                                          text of the answer; {ip} and {result} are replaced

Facts provided
    ``iprev.result``: pass | fail | permerror | temperror (RFC 8601 section 2.7.3);
    ``iprev.name``: the verified host name, ``""`` unless pass; ``iprev.policy``: the client
    address (RFC 8601's ``policy.iprev`` property), for Authentication-Results.

Log
    ``iprev=<result>``, ``name=`` (pass), ``ptr=`` (the first PTR name) and ``ptrs=`` (how
    many) otherwise, ``dns=ptr:<reason>`` or ``dns=forward:<reason>`` on temperror, and
    ``postfix=agree|differs`` comparing with Postfix's ``client_name`` and
    ``reverse_client_name`` (shown as ``postfix_name=`` and ``postfix_reverse=`` when they
    differ).

Failure behaviour
    SERVFAIL, REFUSED or a timeout of our resolver gives ``iprev=temperror``, verdict ERROR,
    no score and no reply: the sender is never punished for our DNS trouble. With
    ``on_error = "tempfail"`` the pipeline answers ``451 4.3.0`` instead (the operator's
    explicit choice). A client without an address is skipped.

Redis keys
    none.

RFCs: RFC 8601 section 3 (iprev) and 2.7.3 (results), RFC 5451, RFC 1912 section 2.1
(every host should have matching PTR and A records), RFC 7372 (5.7.25).
"""

from __future__ import annotations

import asyncio
import re
import string
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.shared.dns import DnsTempError
from mxward.shared.netutil import IPAddress, mask_address, parse_ip
from mxward.shared.plugin import Action, Check, LogValue, Result, Services, Stage, Transaction, Verdict

__all__ = ["FcrdnsCheck", "IprevResult", "Options", "is_hostname"]

IprevResult = Literal["pass", "fail", "permerror", "temperror"]

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)", re.IGNORECASE)


def is_hostname(name: str) -> bool:
    """True for a fully qualified host name: two or more labels, letters, digits, ``-``, ``_``.

    Underscores are tolerated (as Postfix does); a numeric top-level label is not a name.
    A single trailing dot is allowed.
    """
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(_LABEL.fullmatch(label) for label in labels)


@dataclass(frozen=True, kw_only=True)
class Options:
    max_names: int = 10
    network_pass: bool = False
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    score_pass: float = -1.0
    score_network_pass: float = 0.0
    score_fail: float = 1.0
    score_permerror: float = 1.0
    reject: tuple[Literal["fail", "permerror"], ...] = ()
    reject_code: int = 550
    reject_dsn: str = "5.7.25"
    reject_text: str = "Reverse DNS of {ip} is not forward-confirmed (iprev={result})"

    def __post_init__(self) -> None:
        if not 1 <= self.max_names <= 50:
            raise ValueError("max_names must be 1..50")
        if not 8 <= self.ipv4_prefix <= 32 or not 16 <= self.ipv6_prefix <= 128:
            raise ValueError("ipv4_prefix must be 8..32 and ipv6_prefix 16..128")
        unknown = [r for r in self.reject if r not in ("fail", "permerror")]
        if unknown:
            raise ValueError(f"reject: {unknown} cannot be answered (only fail and permerror can)")
        check_reply(self.reject_code, self.reject_dsn)
        fields = {name for _, name, _, _ in string.Formatter().parse(self.reject_text) if name}
        if fields - {"ip", "result"}:
            raise ValueError(f"reject_text: unknown placeholder(s) {sorted(fields - {'ip', 'result'})}")


def check_reply(code: int, dsn: str) -> None:
    """Raise ValueError unless ``code`` is 4xx/5xx and ``dsn`` an enhanced code of the same class."""
    if not 400 <= code <= 599:
        raise ValueError(f"reject_code {code} must be a 4xx (defer) or 5xx (reject) code")
    if not re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", dsn) or dsn[0] != str(code)[0]:
        raise ValueError(f"reject_dsn {dsn!r} must be an enhanced code {str(code)[0]}.x.y to go with {code}")


def reply_action(code: int, dsn: str, text: str) -> Action:
    """The forced answer: REJECT for a 5xx code, DEFER for a 4xx code."""
    if code >= 500:
        return Action.reject(text, code, dsn)
    return Action.defer(text, code, dsn)


@dataclass(frozen=True, slots=True)
class _Forward:
    """What the forward lookup of one PTR name showed (``error``: the DnsTempError reason)."""

    name: str
    match: Literal["exact", "network", "none", "temperror"]
    error: str = ""


class FcrdnsCheck(Check[Options]):
    name: ClassVar[str] = "fcrdns"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("iprev.result", "iprev.name", "iprev.policy")
    timeout: ClassVar[float] = 5.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._scores: dict[str, float] = {
            "exact": options.score_pass,
            "network": options.score_network_pass,
            "fail": options.score_fail,
            "permerror": options.score_permerror,
        }
        self._reject = frozenset(options.reject)

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        postfix = (tx.client_name, tx.reverse_client_name) if "client_name" in tx.attrs else None
        return (tx.client_address, postfix)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        ip = tx.client_ip
        if ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        try:
            names = sorted(set(await self.services.dns.ptr(ip)))
        except DnsTempError as exc:
            return self._temperror(ip, {"dns": f"ptr:{exc.reason}"})
        if not names:
            return self._failed(tx, ip, "permerror", names, f"Client address {ip} has no reverse DNS")
        candidates = [n for n in names if is_hostname(n)][: self.options.max_names]
        qtype = "A" if ip.version == 4 else "AAAA"
        if all(self.services.dns.is_cached(n, qtype) for n in candidates):
            forwards = [await self._forward(n, ip) for n in candidates]  # cached: no tasks needed
        else:
            forwards = list(await asyncio.gather(*(self._forward(n, ip) for n in candidates)))
        for wanted in ("exact", "network"):
            found = next((f for f in forwards if f.match == wanted), None)
            if found is not None:
                return self._passed(tx, ip, found, names)
        temp = next((f for f in forwards if f.match == "temperror"), None)
        if temp is not None:
            return self._temperror(ip, {"dns": f"forward:{temp.error}", "ptr": temp.name, "ptrs": len(names)})
        reason = f"Reverse DNS of {ip} ({names[0]}) does not resolve back to it"
        return self._failed(tx, ip, "fail", names, reason)

    async def _forward(self, name: str, ip: IPAddress) -> _Forward:
        dns = self.services.dns
        try:
            records = await (dns.a(name) if ip.version == 4 else dns.aaaa(name))
        except DnsTempError as exc:
            return _Forward(name, "temperror", exc.reason)
        addresses = [a for a in (parse_ip(r) for r in records) if a is not None]
        if ip in addresses:
            return _Forward(name, "exact")
        if self.options.network_pass:
            net = mask_address(ip, self.options.ipv4_prefix, self.options.ipv6_prefix)
            if any(a in net for a in addresses):
                return _Forward(name, "network")
        return _Forward(name, "none")

    # -- results ---------------------------------------------------------------------------

    def _facts(self, result: IprevResult, ip: IPAddress, name: str = "") -> dict[str, LogValue]:
        return {"iprev.result": result, "iprev.name": name, "iprev.policy": str(ip)}

    def _passed(self, tx: Transaction, ip: IPAddress, found: _Forward, names: list[str]) -> Result:
        log: dict[str, LogValue] = {"iprev": "pass", "name": found.name}
        if found.match == "network":
            log["match"] = "network"
        log.update(_postfix_comparison(tx, found.name, names))
        return Result(
            check=self.name,
            verdict=Verdict.PASS,
            score=self._scores[found.match],
            log=log,
            facts=self._facts("pass", ip, found.name),
        )

    def _failed(
        self, tx: Transaction, ip: IPAddress, result: Literal["fail", "permerror"], names: list[str], why: str
    ) -> Result:
        log: dict[str, LogValue] = {"iprev": result}
        if names:
            log["ptr"] = names[0]
            log["ptrs"] = len(names)
        log.update(_postfix_comparison(tx, "", names))
        action = None
        if result in self._reject:
            opts = self.options
            text = opts.reject_text.format(ip=ip, result=result)
            action = reply_action(opts.reject_code, opts.reject_dsn, text)
        return Result(
            check=self.name,
            verdict=Verdict.FAIL,
            score=self._scores[result],
            reason=why,
            log=log,
            facts=self._facts(result, ip),
            action=action,
        )

    def _temperror(self, ip: IPAddress, log: dict[str, LogValue]) -> Result:
        return Result(
            check=self.name,
            verdict=Verdict.ERROR,
            log={"iprev": "temperror", **log},
            facts=self._facts("temperror", ip),
        )


def _postfix_comparison(tx: Transaction, verified: str, names: list[str]) -> dict[str, LogValue]:
    """How Postfix's own FCrDNS (``client_name``, ``reverse_client_name``) compares, for the log."""
    if "client_name" not in tx.attrs:
        return {}
    postfix_name = tx.client_name.lower().removesuffix(".")
    postfix_reverse = tx.reverse_client_name.lower().removesuffix(".")
    ours = verified or "unknown"
    reverse_agrees = postfix_reverse in names if names else postfix_reverse == "unknown"
    if postfix_name == ours and reverse_agrees:
        return {"postfix": "agree"}
    return {"postfix": "differs", "postfix_name": postfix_name, "postfix_reverse": postfix_reverse}

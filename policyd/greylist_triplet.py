"""The greylist check's work per request (compiled: see setup.py).

:mod:`mxward.policyd.checks.greylist` holds the check's manual, options, Lua script and the
``mxward greylist`` commands; its :class:`~mxward.policyd.checks.greylist.GreylistCheck` hands
every request to a :class:`Triplets` built from its options. This module decides who is allowed
without greylisting, normalises the sender, builds the triplet's keys, runs the script and
turns its reply into the check's result. Compiled, that costs a fraction of the interpreted
check's CPU; a check class itself cannot be compiled (checks subclass
:class:`~mxward.shared.plugin.Check`).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from mxward.shared.matchers import AddressList, DomainList, TextList, split_address
from mxward.shared.netutil import NetworkList, network_text
from mxward.shared.plugin import Action, LogValue, Result, Stage, Transaction, Verdict
from mxward.shared.records import assemble

__all__ = ["Triplets", "normalise_sender"]

_BATV: Final = re.compile(r"^(?:prvs|msprvs\d?)=[^=@]*=|^btv1==[^=@]*==", re.IGNORECASE)
_DIGITS: Final = re.compile(r"\d+")
_NAME: Final = "greylist"


def normalise_sender(
    sender: str, *, delimiter: str = "+", strip_batv: bool = True, strip_verp: bool = True
) -> str:
    """The sender as the triplet keeps it (postgrey's normalisation)."""
    local, domain = split_address(sender)
    if not local and not domain:
        return ""
    if strip_batv and "=" in local:  # every BATV form has an "="
        local = _BATV.sub("", local)
    if delimiter:
        local = local.split(delimiter, 1)[0]
    if strip_verp:
        local = _DIGITS.sub("#", local)
    return f"{local}@{domain}" if domain else local


class Triplets:
    """What :class:`GreylistCheck` does for each recipient (see its manual)."""

    def __init__(
        self,
        *,
        options: Any,
        prefix: str,
        run: Callable[[Any, Sequence[str], Sequence[str | float]], Awaitable[Any]],
        script: Any,
        now: Callable[[], float],
        hostname: str,
        validate_tag: Callable[[str], object],
    ) -> None:
        self.options = options
        self._prefix = prefix
        self._run = run
        self._script = script
        self._now = now
        self._hostname = hostname
        self._validate_tag = validate_tag
        self._ipv4 = int(options.ipv4_prefix)
        self._ipv6 = int(options.ipv6_prefix)
        self._delimiter = str(options.recipient_delimiter)
        self._strip_batv = bool(options.strip_batv)
        self._strip_verp = bool(options.strip_verp)
        self._spf_pool = bool(options.spf_pool)
        self._skip_good_karma = bool(options.skip_good_karma)
        self._skip_dnswl = bool(options.skip_dnswl)
        self._add_header = bool(options.add_header)
        self._reply_text = str(options.reply_text)
        self._dsn = str(options.dsn)
        self._networks = NetworkList(options.allow_networks)
        self._hostnames = DomainList(options.allow_client_hostnames)
        self._recipients = AddressList(options.allow_recipients)
        self._sender_domains = DomainList(options.allow_sender_domains)
        self._countries = frozenset(c.upper() for c in options.skip_countries)
        self._os: TextList | None = TextList(options.only_os, "only_os") if options.only_os else None
        self._args: tuple[str, ...] = (
            str(int(options.delay)),
            str(int(options.retry_window)),
            str(int(options.max_age)),
            str(options.auto_allow_clients),
            str(int(options.auto_allow_interval)),
        )
        self._deferrals: dict[int, Action] = {}

    def normalise(self, sender: str) -> str:
        return normalise_sender(
            sender, delimiter=self._delimiter, strip_batv=self._strip_batv, strip_verp=self._strip_verp
        )

    def network(self, tx: Transaction) -> str:
        ip = tx.client_ip
        assert ip is not None
        return network_text(ip, self._ipv4, self._ipv6)

    def keys(self, net: str, sender: str, recipient: str) -> tuple[str, str]:
        """The triplet's key and its client's, as ``Namespace.key`` builds them."""
        if not net or "{" in net or "}" in net:
            self._validate_tag(net)  # raises ValueError with the reason
        head = self._prefix + "{" + net + "}:"
        return (head + "t:" + sender + "/" + recipient, head + "c")

    def deferral(self, seconds: int) -> Action:
        """The DEFER_IF_PERMIT action for a wait of ``seconds`` (made once per distinct wait)."""
        action = self._deferrals.get(seconds)
        if action is None:
            text = self._reply_text.format(seconds=max(seconds, 1))
            if len(self._deferrals) >= 4096:  # "early" waits count down: bound the memo
                self._deferrals.clear()
            action = Action.defer_if_permit(text, self._dsn)
            self._deferrals[seconds] = action
        return action

    def allowed(self, tx: Transaction) -> str:
        if tx.client_ip in self._networks:
            return "network"
        client_name: str = tx.client_name
        if self._hostnames and client_name != "unknown" and self._hostnames.matches(client_name):
            return "client_name"
        if self._recipients and self._recipients.matches(tx.recipient):
            return "recipient"
        if self._sender_domains and self._sender_domains.matches(split_address(tx.sender)[1]):
            return "sender_domain"
        facts = tx.facts
        if not facts:
            return "os" if self._os is not None else ""
        if self._skip_good_karma and facts.get("karma.good"):
            return "karma"
        if self._skip_dnswl and facts.get("dnswl.trusted"):
            return "dnswl"
        if self._countries and str(facts.get("geoip.country", "")).upper() in self._countries:
            return "country"
        if self._os is not None:
            genre = facts.get("p0f.genre")
            if not genre or not self._os.matches(str(genre), str(facts.get("p0f.os") or "")):
                return "os"
        return ""

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if tx.client_ip is None:
            return _result(Verdict.SKIP, {}, {"note": "no client address"})
        recipient: str = tx.recipient
        if not recipient:
            return _result(Verdict.SKIP, {}, {"note": "no recipient"})
        allowed = self.allowed(tx)
        if allowed:
            return _result(Verdict.SKIP, {"greylist.status": "allowed"}, {"allowed": allowed})
        sender = self.normalise(tx.sender)
        recipient = recipient.lower()
        facts = tx.facts
        pool = facts.get("spf.pass_domain") if self._spf_pool and facts else None
        net = "spf:" + str(pool).lower() if pool else self.network(tx)
        now = int(self._now())
        reply = await self._run(
            self._script, self.keys(net, sender, recipient), (str(now), *self._args, sender, recipient)
        )
        first = reply[0]
        status: str = first.decode() if isinstance(first, bytes) else str(first)
        value = int(reply[1])
        if status in ("new", "early"):
            action = self.deferral(value)
            return _result(
                Verdict.FAIL,
                {"greylist.status": status},
                {"status": status, "wait": value},
                reason=action.text,
                action=action,
            )
        if status == "awl":
            return _result(Verdict.PASS, {"greylist.status": "awl"}, {"status": "awl"})
        header = ""
        first_pass = int(reply[2]) == 0
        if first_pass and self._add_header:
            date = email.utils.formatdate(now, localtime=True)
            header = f"X-Greylist: delayed {value} seconds by mxward at {self._hostname}; {date}"
        return _result(
            Verdict.PASS,
            {"greylist.status": "pass", "greylist.delayed": value if first_pass else 0},
            {"status": "pass", "age": value},
            header=header,
        )


def _result(
    verdict: Verdict,
    facts: dict[str, LogValue],
    log: dict[str, LogValue],
    *,
    reason: str = "",
    action: Action | None = None,
    header: str = "",
) -> Result:
    """A result of this check (what Check.result makes, without Result's interpreted __init__)."""
    return assemble(
        Result,
        {
            "check": _NAME,
            "verdict": verdict,
            "score": 0.0,
            "reason": reason,
            "log": log,
            "facts": facts,
            "action": action,
            "header": header,
            "auth": (),
            "elapsed_ms": 0.0,
            "observed": False,
            "reused": False,
        },
    )

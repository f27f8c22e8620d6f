"""earlytalker: refuse clients that talk before the SMTP greeting or pipeline without leave.

Stage: none. This check has no per-request work: it configures Postfix, and Postfix does the
test. ``mxward postfix-config`` prints the main.cf and master.cf lines made from the options
below; the check itself never runs on a policy request (its ``stages`` are empty).

Why a policy server cannot do this
    A client that sends its EHLO before the ``220`` greeting, or a burst of MAIL/RCPT/DATA
    without waiting for each reply when PIPELINING was never offered (RFC 2920), is almost
    always spam software: real mail servers wait for their turn (RFC 5321 sections 3.1 and
    4.3.1: the server speaks first, and the client waits for each reply unless an extension
    such as PIPELINING, RFC 2920, was negotiated). qpsmtpd's earlytalker plugin watches its own
    socket for that. A Postfix policy server cannot: smtpd owns the socket, and the policy
    service only hears about the session when a restriction list asks, with the attributes
    of that stage (client, HELO, sender, recipient...). No attribute says "bytes arrived
    early", and the pre-greeting and pipelined bytes themselves are never sent. Pausing the
    policy answer would delay the reply to one command, not the greeting, and would still
    see nothing.

What Postfix does instead
    * postscreen(8) answers the public SMTP port before smtpd does. It sends the first line
      of a multi-line greeting (``220-``, the teaser ``greet_banner``), waits ``greet_wait``
      and logs ``PREGREET`` for a client that speaks in that time. ``greet_action`` decides
      what happens next: ``enforce`` lets the client go on talking to postscreen's own
      small SMTP engine and rejects every RCPT with ``550 5.5.1 Protocol error`` (its HELO,
      sender and recipient are logged); ``drop`` answers ``521 5.5.1 Protocol error`` and
      hangs up at once; ``ignore`` only logs. A client that stays silent passes, gets the
      rest of the greeting from smtpd and delivers in the same connection; its address is
      remembered for ``greet_ttl``, so its next connections are handed to smtpd at once.
      Clients in ``mynetworks``, in ``[policyd.exempt] networks`` and in
      ``exempt_networks`` skip the test (``postscreen_access_list``).
    * smtpd refuses unauthorised pipelining: ``smtpd_forbid_unauth_pipelining = yes``
      (Postfix 3.9, and 3.8.1, 3.7.6, 3.6.10, 3.5.20 and later patch levels; Debian 12 has
      3.7.11 with the default ``no``) answers ``554 5.5.0 Error: SMTP protocol
      synchronization`` and disconnects when a client sends commands ahead of time where
      that is not allowed (after HELO, or after DATA). ``reject_unauth_pipelining`` in
      ``smtpd_data_restrictions`` answers ``503 5.5.0`` at DATA for a session in which
      smtpd saw such pipelining; it works on older Postfix versions too, and when the
      disconnect is on it is a second line of defence.

Options ([checks.earlytalker]), besides enabled/timeout/on_error/mode:
    postscreen                bool      true        put postscreen(8) in front of smtpd on the
                                                    public port (master.cf lines) with the
                                                    pregreet test below. false: only the
                                                    smtpd pipelining settings are printed
    greet_action              string    "enforce"   "enforce" | "drop" | "ignore": what
                                                    postscreen does with a client that talks
                                                    before its turn (see above)
    greet_wait                duration  "6s"        how long postscreen waits for an early
                                                    talker (whole seconds, 1s..60s). Every
                                                    new client's greeting is delayed this long
    stress_greet_wait         duration  "2s"        the same under overload (Postfix's
                                                    ``stress``), at most greet_wait
    greet_banner              bool      true        send the ``220-`` teaser first: bots that
                                                    wait for any greeting line then speak
                                                    early. false: postscreen sends nothing
                                                    until greet_wait is over
    greet_banner_text         string    "$smtpd_banner"
                                                    text of the teaser line
    greet_ttl                 duration  "1d"        a client that passed is not tested again
                                                    for this long (postscreen cache)
    exempt_networks           list      []          client networks postscreen never tests,
                                                    besides mynetworks and
                                                    [policyd.exempt] networks (CIDR)
    forbid_unauth_pipelining  bool      true        smtpd_forbid_unauth_pipelining = yes:
                                                    554 5.5.0 and disconnect. false: the
                                                    parameter is not printed (for Postfix
                                                    versions without it; Postfix's own
                                                    default then applies)
    data_pipelining_check     bool      true        reject_unauth_pipelining in
                                                    smtpd_data_restrictions: 503 5.5.0 at DATA

    ``mode = "observe"`` prints the same set-up in a form that only logs: postscreen's
    ``greet_action = ignore`` (PREGREET lines, nobody refused), no disconnect, and
    ``warn_if_reject reject_unauth_pipelining`` (``reject_warning`` lines). With
    ``enabled = false`` nothing is printed. ``timeout`` and ``on_error`` have no effect.

Facts
    None: the policy service never learns about early talkers (see above). Postfix logs
    them: postscreen ``PREGREET <bytes> after <seconds> from [ADDR]:PORT`` and ``NOQUEUE:
    reject: RCPT from [ADDR]:PORT: 550 5.5.1 Protocol error``; smtpd ``improper command
    pipelining after <COMMAND> from ...``.

Failure behaviour
    Nothing can fail at request time: the check never runs. If the printed lines are not
    applied, Postfix simply does not test. postscreen needs the ``smtpd pass`` service in
    master.cf (and ``dnsblog``, ``tlsproxy`` when DNS lists or STARTTLS are used): without it
    every client gets ``421 4.3.2 All server ports are busy``, so apply the main.cf and
    master.cf lines together and run ``postfix reload``.

Redis keys
    none. postscreen keeps its own cache (``postscreen_cache_map``, by default
    ``btree:$data_directory/postscreen_cache``), one per MX host.

RFCs: RFC 5321 sections 3.1 and 4.3.1 (the client waits for the greeting), 4.5.3.2.1 (the
five minutes a client should wait for it); RFC 2920 (PIPELINING).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.shared.plugin import Check, Result, Stage, Transaction, Verdict
from mxward.shared.units import Duration, format_duration

__all__ = [
    "MASTER_CF_SERVICES",
    "EarlytalkerCheck",
    "MainCfSetting",
    "Options",
    "cidr_entries",
    "data_restriction",
    "main_cf_settings",
]

GreetAction = Literal["enforce", "drop", "ignore"]

_MAX_GREET_WAIT = 60.0


@dataclass(frozen=True, kw_only=True)
class Options:
    postscreen: bool = True
    greet_action: GreetAction = "enforce"
    greet_wait: Duration = 6.0
    stress_greet_wait: Duration = 2.0
    greet_banner: bool = True
    greet_banner_text: str = "$smtpd_banner"
    greet_ttl: Duration = 86400.0
    exempt_networks: tuple[str, ...] = ()
    forbid_unauth_pipelining: bool = True
    data_pipelining_check: bool = True

    def __post_init__(self) -> None:
        for name in ("greet_wait", "stress_greet_wait"):
            value = getattr(self, name)
            if value != int(value) or not 1 <= value <= _MAX_GREET_WAIT:
                raise ValueError(f"{name} must be whole seconds from 1s to 60s (Postfix's time syntax)")
        if self.stress_greet_wait > self.greet_wait:
            raise ValueError("stress_greet_wait must not be longer than greet_wait")
        if self.greet_ttl != int(self.greet_ttl) or self.greet_ttl < 1:
            raise ValueError("greet_ttl must be whole seconds, at least 1s")
        if self.greet_banner and not self.greet_banner_text.strip():
            raise ValueError("greet_banner_text is empty: set greet_banner = false to send no teaser")
        if not re.fullmatch(r"[\x20-\x7e]*", self.greet_banner_text):
            raise ValueError("greet_banner_text must be one line of printable ASCII")
        cidr_entries(self.exempt_networks)


def cidr_entries(networks: Iterable[str]) -> tuple[str, ...]:
    """Networks in CIDR form (``192.0.2.7`` becomes ``192.0.2.7/32``); ValueError names a bad one."""
    out: list[str] = []
    for entry in networks:
        try:
            out.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP network or address") from None
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class MainCfSetting:
    """One main.cf parameter with the comment that explains it."""

    name: str
    value: str
    comment: str = ""


# postscreen on the public port; smtpd behind it as a "pass" service. chroot "n": works on
# every installation (a chroot'ed service needs copies of system files in the queue directory).
MASTER_CF_SERVICES: tuple[str, ...] = (
    "smtp      inet  n       -       n       -       1       postscreen",
    "smtpd     pass  -       -       n       -       -       smtpd",
    "dnsblog   unix  -       -       n       -       0       dnsblog",
    "tlsproxy  unix  -       -       n       -       0       tlsproxy",
)


def _seconds(value: float) -> str:
    return f"{int(value)}s"


def _postscreen_settings(
    options: Options, exempt_networks: Iterable[str], *, observe: bool
) -> list[MainCfSetting]:
    networks = cidr_entries([*exempt_networks, *options.exempt_networks])
    access = "permit_mynetworks"
    if networks:
        access += ", cidr:{ " + ", ".join(f"{{{net} permit}}" for net in networks) + " }"
    action = "ignore" if observe else options.greet_action
    wait = _seconds(options.greet_wait)
    if options.stress_greet_wait != options.greet_wait:
        stress = int(options.stress_greet_wait)
        wait = f"${{stress?{{{stress}}}:{{{int(options.greet_wait)}}}}}s"
    return [
        MainCfSetting(
            "postscreen_access_list",
            access,
            "Never tested: mynetworks"
            + (" and the exempt networks (permit = straight to smtpd)." if networks else "."),
        ),
        MainCfSetting(
            "postscreen_greet_action",
            action,
            {
                "enforce": "A client that talks before its turn is refused at RCPT: 550 5.5.1.",
                "drop": "A client that talks before its turn gets 521 5.5.1 and is disconnected.",
                "ignore": "A client that talks before its turn is only logged (PREGREET).",
            }[action],
        ),
        MainCfSetting(
            "postscreen_greet_wait",
            wait,
            "How long to wait for an early talker (under stress: the shorter value). Every new "
            "client's greeting is delayed this long.",
        ),
        MainCfSetting(
            "postscreen_greet_banner",
            options.greet_banner_text if options.greet_banner else "",
            "The 220- teaser sent at once, to tempt bots into talking early (empty: none).",
        ),
        MainCfSetting(
            "postscreen_greet_ttl",
            format_duration(options.greet_ttl),
            "A client that passed goes straight to smtpd for this long (postscreen cache).",
        ),
    ]


def main_cf_settings(
    options: Options, *, exempt_networks: Iterable[str] = (), observe: bool = False
) -> list[MainCfSetting]:
    """The main.cf parameters for these options, in the order ``mxward postfix-config`` prints them.

    ``exempt_networks`` (``[policyd.exempt] networks``) are added to postscreen's access list;
    ``observe`` gives the log-only form of every test.
    """
    settings: list[MainCfSetting] = []
    if options.postscreen:
        settings += _postscreen_settings(options, exempt_networks, observe=observe)
    if options.forbid_unauth_pipelining:
        comment = "Commands sent ahead of time without PIPELINING: 554 5.5.0 and disconnect."
        if observe:
            comment = "Observe mode: no disconnect; smtpd still logs 'improper command pipelining'."
        settings.append(MainCfSetting("smtpd_forbid_unauth_pipelining", "no" if observe else "yes", comment))
    return settings


def data_restriction(options: Options, *, observe: bool = False) -> str:
    """The ``smtpd_data_restrictions`` entry for the DATA-time check, or ``""`` when it is off."""
    if not options.data_pipelining_check:
        return ""
    return "warn_if_reject reject_unauth_pipelining" if observe else "reject_unauth_pipelining"


class EarlytalkerCheck(Check[Options]):
    """Configuration-only check: Postfix tests, ``mxward postfix-config`` prints the settings."""

    name: ClassVar[str] = "earlytalker"
    stages: ClassVar[frozenset[Stage]] = frozenset()
    options_type: ClassVar[type[Any]] = Options

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        # Never called (no stages); answers honestly if someone calls it anyway.
        return self.result(Verdict.SKIP, note="tested by Postfix (postscreen, smtpd), not per request")

"""p0f: the client's operating system by passive TCP fingerprint, from a local p0f daemon.

Stage: connect (the client address is all it needs; with Postfix's default
``smtpd_delay_reject = yes`` it runs at the first RCPT request, once per message, so a block
is answered at RCPT as in qpsmtpd).

What and why
    p0f (``apt install p0f``) watches the MX's network interface and recognises the operating
    system of each client from its TCP handshake, without sending anything. Postfix never
    sees the handshake, but by the time it asks us about a client, p0f has fingerprinted the
    connection; the check asks p0f's API socket about the client address (p0f 3 protocol,
    IPv4 and IPv6). The answer becomes facts (greylisting may single out some systems, as
    qpsmtpd's greylisting can) and, by OS rules, a reject or a score: much spam comes from
    compromised desktop systems, while mail servers rarely run them.

    Run p0f on the interface Postfix listens on, with the API socket, as its own user, e.g.
    ``p0f -i eth0 -s /run/p0f.sock -u p0f -d 'tcp dst port 25'``. The socket must be
    reachable by the mxward user.

OS rules
    Entries of ``block`` and ``penalise`` are either an exact name, matched case-insensitively
    against the genre (``"Windows 7 or 8"``: OS name and flavour) or the OS name alone
    (``"Windows"``: every flavour), or ``/regex/``, searched case-insensitively in the genre.
    Rules apply only when p0f recognised the operating system. A ``block`` match is rejected
    with ``block_code`` ``block_dsn`` ``block_text``; otherwise a ``penalise`` match adds
    ``penalise_score`` (qpsmtpd's ``smite_os`` karma).

Options ([checks.p0f]), besides enabled/timeout/on_error/mode:
    socket          string    "/run/p0f.sock"  p0f's API socket (p0f -s)
    query_timeout   duration  "500ms"   time limit of one query, connecting included; then skip
    block           list      []        OS rules whose clients are rejected
    block_code      int       550       SMTP code of the reject
    block_dsn       string    "5.7.1"   enhanced status code of the reject
    block_text      string    "Mail from {genre} systems is not accepted here"
                                        client-facing text; {genre} is p0f's OS name and flavour
    penalise        list      []        OS rules whose clients get penalise_score
    penalise_score  float     1.0       score of a penalised OS
    add_header      bool      false     PREPEND one ``X-P0F: genre="Linux 2.2.x-3.x";
                                        link=Ethernet`` line (known fields only) to accepted mail

Facts provided (only what p0f knows)
    ``p0f.genre`` (``"Windows 7 or 8"``), ``p0f.os`` (``"Windows"``), ``p0f.flavor``
    (``"7 or 8"``), ``p0f.link`` (link type, ``"Ethernet or modem"``), ``p0f.distance``
    (network hops, int), ``p0f.uptime_min`` (int). Greylisting only matching systems, as
    qpsmtpd's greylisting ``p0f`` option does, reads these facts.

Verdicts
    pass: p0f knows the host and no rule matched; fail: a block or penalise rule matched;
    skip: no client address, p0f has not seen the host (no match), the socket is missing or
    refuses, p0f did not answer within query_timeout, or answered something invalid.

Failure behaviour
    Anything wrong on p0f's side is a skip with score 0 and the reason in the log (``note``,
    ``error``); the sender is never rejected or scored because p0f is absent or confused. The
    first failure after a working query, and the recovery, are also logged as a warning.

Redis keys: none.

References: p0f 3 README, section 4 "API access"; RFC 793 (the TCP handshake p0f reads).
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass
from typing import Any, ClassVar

from mxward.shared.headers import header_params
from mxward.shared.matchers import TextList
from mxward.shared.p0f import HostInfo, P0fClient, P0fError, P0fProtocolError
from mxward.shared.plugin import Action, Check, LogValue, Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

__all__ = ["Options", "OsRules", "P0fCheck"]

log = logging.getLogger("mxward.p0f")


class OsRules:
    """Exact OS names or genres (case-insensitive) and ``/regex/`` entries searched in the genre."""

    __slots__ = ("_names",)

    def __init__(self, entries: tuple[str, ...], option: str = "rules") -> None:
        self._names = TextList(entries, option)

    def __bool__(self) -> bool:
        return bool(self._names)

    def matches(self, host: HostInfo) -> bool:
        return self._names.matches(host.genre, host.os_name)


@dataclass(frozen=True, kw_only=True)
class Options:
    socket: str = "/run/p0f.sock"
    query_timeout: Duration = 0.5
    block: tuple[str, ...] = ()
    block_code: int = 550
    block_dsn: str = "5.7.1"
    block_text: str = "Mail from {genre} systems is not accepted here"
    penalise: tuple[str, ...] = ()
    penalise_score: float = 1.0
    add_header: bool = False

    def __post_init__(self) -> None:
        if not self.socket:
            raise ValueError("socket must name p0f's API socket (p0f -s PATH)")
        if not 0 < self.query_timeout <= 10:
            raise ValueError("query_timeout must be above 0 and at most 10s")
        if not 500 <= self.block_code <= 599:
            raise ValueError("block_code must be a 5xx SMTP code")
        if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", self.block_dsn):
            raise ValueError(f"block_dsn {self.block_dsn!r} must be an enhanced status code 5.x.y")
        fields = {name for _, name, _, _ in string.Formatter().parse(self.block_text) if name is not None}
        if fields - {"genre"}:
            raise ValueError(f"block_text: unknown placeholder(s) {sorted(fields - {'genre'})}")
        if not self.block_text.strip():
            raise ValueError("block_text must not be empty")
        OsRules(self.block, "block")
        OsRules(self.penalise, "penalise")


def _facts(host: HostInfo) -> dict[str, LogValue]:
    found: tuple[tuple[str, LogValue], ...] = (
        ("p0f.genre", host.genre),
        ("p0f.os", host.os_name),
        ("p0f.flavor", host.os_flavor),
        ("p0f.link", host.link_type),
        ("p0f.distance", host.distance if host.distance >= 0 else None),
        ("p0f.uptime_min", host.uptime_min or None),
    )
    return {key: value for key, value in found if value not in (None, "")}


class P0fCheck(Check[Options]):
    name: ClassVar[str] = "p0f"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = (
        "p0f.genre",
        "p0f.os",
        "p0f.flavor",
        "p0f.link",
        "p0f.distance",
        "p0f.uptime_min",
    )
    timeout: ClassVar[float] = 1.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._block = OsRules(options.block, "block")
        self._penalise = OsRules(options.penalise, "penalise")
        self.client = P0fClient(options.socket, timeout=options.query_timeout)
        self._failing = False

    async def aclose(self) -> None:
        await self.client.aclose()

    def _health(self, problem: str) -> None:
        """Log a warning when queries start failing and a note when they work again."""
        if problem and not self._failing:
            log.warning("p0f queries fail (%s); skipping the check until p0f answers", problem)
        elif not problem and self._failing:
            log.warning("p0f answers again at %s", self.options.socket)
        self._failing = bool(problem)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if tx.client_ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        try:
            host = await self.client.query(tx.client_ip)
        except P0fError as exc:
            self._health(str(exc))
            note = "bad reply" if isinstance(exc, P0fProtocolError) else "p0f unavailable"
            return self.result(Verdict.SKIP, note=note, error=str(exc))
        self._health("")
        if host is None:
            return self.result(Verdict.SKIP, note="no match")
        return self._judge(host)

    def _judge(self, host: HostInfo) -> Result:
        opts = self.options
        genre = host.genre
        header = ""
        if opts.add_header:
            header = header_params("X-P0F", (("genre", genre), ("link", host.link_type)))
        facts = _facts(host)
        shown = genre or "unknown"
        if self._block.matches(host):
            text = opts.block_text.format(genre=genre)
            return self.result(
                Verdict.FAIL,
                reason=text,
                facts=facts,
                action=Action.reject(text, opts.block_code, opts.block_dsn),
                header=header,
                rule="block",
                genre=shown,
                distance=host.distance,
            )
        if self._penalise.matches(host):
            return self.result(
                Verdict.FAIL,
                opts.penalise_score,
                f"client operating system {genre}",
                facts=facts,
                header=header,
                rule="penalise",
                genre=shown,
                distance=host.distance,
            )
        return self.result(Verdict.PASS, facts=facts, header=header, genre=shown, distance=host.distance)

"""spf: Sender Policy Framework (RFC 7208) for the MAIL FROM and HELO identities.

Stage: mail (computed once per message and reused for every recipient; with Postfix's
default ``smtpd_delay_reject = yes`` it runs at the first RCPT request).

What and why
    A domain publishes in DNS which hosts may send mail with its name in the envelope sender
    (``v=spf1 ip4:192.0.2.0/24 -all``). The client address is checked against the record of
    the MAIL FROM domain; for the null sender ``<>`` (bounces) against the record of the HELO
    name instead (RFC 7208 section 2.4). With ``check_helo = "always"`` the HELO identity is
    checked first for every message (section 2.3): a HELO ``fail`` decides, otherwise the MAIL
    FROM result counts. A HELO name or sender domain that is not a valid multi-label domain
    name (an address literal, a bare word) gives ``none`` without any DNS question
    (section 4.3).

    The evaluation is pyspf's (the reference implementation, also used by spf-engine),
    including the processing limits of section 4.6.4: at most 10 mechanisms and modifiers
    that cause DNS lookups and at most 2 lookups that find nothing ("void"), else
    ``permerror``. pyspf asks its DNS questions synchronously; mxward answers them from its
    resolver (the ``[dns]`` nameservers, timeouts and cache) without ever letting pyspf wait:
    pyspf runs on the event loop with the answers the resolver has cached, and a question
    that is not cached yet ends that pass. The questions are then asked of the resolver (the
    loop serves other requests meanwhile) and pyspf runs again, until a pass finds every
    answer. With a warm cache that is one pass of pure computation (tens of microseconds);
    no threads are involved. A question that fails (SERVFAIL, timeout) or an evaluation that
    runs out of ``lookup_time`` gives ``temperror``.

Results and actions
    Each result has an action and a score. The action is one of ``reject`` (``550 5.7.23``,
    for permerror ``550 5.7.24``, RFC 7372), ``defer`` (``DEFER_IF_PERMIT``: Postfix answers
    ``450 4.7.23``, for permerror and temperror ``4.7.24``, unless another restriction rejects)
    or ``score`` (no reply of its own: the score is added to the message's total, which the
    pipeline compares with ``[policyd.scoring] reject``). The score is added whatever the
    action, so karma sees a rejected SPF failure too. Defaults follow spf-engine: ``fail`` is
    rejected, everything else is scored; ``pass`` lowers the score.

    The reply text is ``reply_text`` with ``{result}``, ``{domain}``, ``{identity}``,
    ``{client}``, ``{sender}`` and ``{explanation}`` filled in. The explanation is the domain's
    own ``exp=`` text for ``fail`` (introduced as "The domain D explains:", section 6.2),
    else a sentence of ours. Text from DNS is made one printable line and bounded.

Headers
    ``header_type = "received-spf"`` (the default, as spf-engine): one ``Received-SPF:`` field
    (section 9.1) with the result, a comment, ``client-ip``, ``envelope-from`` (not for the
    null sender), ``helo``, ``receiver`` (our host name), ``identity``, and ``mechanism`` or
    ``problem`` when known. ``"authentication-results"``: one RFC 8601 field
    ``Authentication-Results: <authserv_id>; spf=<result> (<comment>) smtp.mailfrom=<domain>``
    (``smtp.helo=<name>`` for the HELO identity). ``"none"``: no header. Client-supplied
    values (sender, HELO, exp= text) are cut to a bounded length, non-ASCII and control
    characters become ``?``, and values are quoted (quoted-string, RFC 5322 / RFC 2045) unless
    they are a plain dot-atom or token. The service prepends the header once per message.

Options ([checks.spf]), besides enabled/timeout/on_error/mode:
    check_helo              string    "null-sender"
                                              "null-sender": the HELO identity only for the null
                                              sender; "always": HELO first for every message
    pass_score              float     -1.0    added on pass (negative: a good sign)
    fail_action             string    "reject"  reject | defer | score
    fail_score              float     5.0     added on fail
    softfail_action         string    "score"   reject | defer | score
    softfail_score          float     2.0     added on softfail
    neutral_action          string    "score"   reject | defer | score
    neutral_score           float     0.5     added on neutral (RFC 7208 8.2: like none)
    none_action             string    "score"   reject | defer | score
    none_score              float     0.5     added when the domain has no SPF record
    permerror_action        string    "score"   reject | defer | score (broken record)
    permerror_score         float     0.0     added on permerror
    temperror_action        string    "score"   defer | score; "defer" answers 4.7.24
    temperror_score         float     0.0     added on temperror (our DNS trouble: keep it 0)
    reject_not_pass_domains list      []      sender domains (and their subdomains) whose
                                              softfail, neutral, none and permerror are
                                              handled like fail (fail_action, fail_score)
    skip_networks           list      []      client networks not checked (backup MX,
                                              forwarders); nothing is hard-coded
    allow_domains           list      []      a client that passes SPF for one of these
                                              domains is not checked (a forwarding service,
                                              spf-engine's Domain_Whitelist)
    reply_text              string    "SPF {result}: {explanation}"
                                              text of a reject or defer reply
    header_type             string    "received-spf"
                                              received-spf | authentication-results | none
    authserv_id             string    ""      authserv-id of Authentication-Results; empty:
                                              [mxward] hostname
    lookup_time             duration  "8s"    budget for one whole evaluation (all its DNS
                                              questions); keep the check's timeout above it

Facts provided
    ``spf.result``: pass | fail | softfail | neutral | none | permerror | temperror;
    ``spf.domain``: the domain checked; ``spf.identity``: mailfrom | helo;
    ``spf.pass_domain``: the domain, set only on pass (greylisting's sender pool, DMARC).
    A skipped client (``skip_networks``, ``allow_domains``) gets no facts.

Log fields
    ``result``, ``identity``, ``domain``, ``mechanism`` (what matched), ``problem`` (errors),
    ``helo`` (the HELO result when ``check_helo = "always"``), ``handled_as`` (``fail``, for a
    ``reject_not_pass_domains`` sender), ``skipped`` (``network`` or ``allow_domains``).

Redis keys: none.

Failure behaviour
    DNS trouble (SERVFAIL, timeouts, running out of ``lookup_time``) is ``temperror``: verdict
    ERROR, score ``temperror_score`` (0), mail accepted unless ``temperror_action = "defer"``
    (or ``on_error = "tempfail"``, which answers ``451 4.3.0``). A broken record is the
    sender's problem (``permerror``, verdict FAIL) but accepted by default. When the pipeline
    cuts the check off (its ``timeout`` or the request deadline), the questions it was
    waiting for are abandoned with it.

RFCs: RFC 7208 (SPF: 2.3, 2.4 identities, 4.3 domain validity, 4.6.4 limits, 6.2 exp, 8 results,
9.1 Received-SPF), RFC 7372 (5.7.23, 5.7.24, 4.7.24), RFC 8601 (Authentication-Results), RFC 5322
(quoting).
"""

from __future__ import annotations

import asyncio
import math
import re
import string
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

import spf  # type: ignore[import-untyped]

from mxward.shared.aio import running_loop
from mxward.shared.dns import Answer, DnsError, DnsTempError, Resolver, normalize_domain
from mxward.shared.matchers import DomainList
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import Action, Check, IPAddress, Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

__all__ = ["RESULTS", "Evaluation", "Options", "SpfCheck", "spf_domain"]

RESULTS: Final = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

ActionWord = Literal["reject", "defer", "score"]

_PLACEHOLDERS: Final = frozenset({"result", "domain", "identity", "client", "sender", "explanation"})
_AUTHSERV_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


@dataclass(frozen=True, kw_only=True)
class Options:
    check_helo: Literal["null-sender", "always"] = "null-sender"
    pass_score: float = -1.0
    fail_action: ActionWord = "reject"
    fail_score: float = 5.0
    softfail_action: ActionWord = "score"
    softfail_score: float = 2.0
    neutral_action: ActionWord = "score"
    neutral_score: float = 0.5
    none_action: ActionWord = "score"
    none_score: float = 0.5
    permerror_action: ActionWord = "score"
    permerror_score: float = 0.0
    temperror_action: Literal["defer", "score"] = "score"
    temperror_score: float = 0.0
    reject_not_pass_domains: tuple[str, ...] = ()
    skip_networks: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()
    reply_text: str = "SPF {result}: {explanation}"
    header_type: Literal["received-spf", "authentication-results", "none"] = "received-spf"
    authserv_id: str = ""
    lookup_time: Duration = 8.0

    def __post_init__(self) -> None:
        for result in RESULTS:
            score = self.score(result)
            if not math.isfinite(score):
                raise ValueError(f"{result}_score must be a finite number, got {score!r}")
        if not (math.isfinite(self.lookup_time) and 0 < self.lookup_time <= 60):
            raise ValueError("lookup_time must be more than 0 and at most 60 seconds")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.reply_text) if name}
        except ValueError as exc:
            raise ValueError(f"reply_text: {exc}") from None
        if fields - _PLACEHOLDERS:
            raise ValueError(
                f"reply_text: unknown placeholder(s) {sorted(fields - _PLACEHOLDERS)}"
                f" (valid: {sorted(_PLACEHOLDERS)})"
            )
        if self.authserv_id and not _AUTHSERV_ID.fullmatch(self.authserv_id):
            raise ValueError(f"authserv_id {self.authserv_id!r} must be a host or domain name")
        NetworkList(self.skip_networks)
        DomainList(self.reject_not_pass_domains)
        for domain in self.allow_domains:
            if spf_domain(domain) is None:
                raise ValueError(f"allow_domains: {domain!r} is not a domain name")

    def action(self, result: str) -> str:
        """The configured action word for ``result`` (``pass`` is always ``score``)."""
        return str(getattr(self, f"{result}_action", "score"))

    def score(self, result: str) -> float:
        return float(getattr(self, f"{result}_score"))


# ------------------------------------------------------------------------------------------
# Identities


def spf_domain(name: str) -> str | None:
    """``name`` as SPF checks it (lower case, A-labels), or None if it is no valid FQDN.

    RFC 7208 section 4.3: a malformed name or a single label gives "none" without a lookup.
    """
    domain = normalize_domain(name)
    return domain if domain is not None and "." in domain else None


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity to check: ``mailfrom`` or ``helo``, its domain and the sender pyspf sees."""

    kind: Literal["mailfrom", "helo"]
    domain: str  # as given (sanitised later for display)
    valid: str | None  # the checkable domain, None when malformed
    sender: str  # local@valid for mailfrom, "" for helo (pyspf uses postmaster@helo)


def mailfrom_identity(sender: str) -> Identity:
    local, at, domain = sender.rpartition("@")
    if not at:
        return Identity("mailfrom", "", None, "")
    valid = spf_domain(domain) if local else None
    return Identity("mailfrom", domain, valid, f"{local}@{valid}" if valid else "")


def helo_identity(helo: str) -> Identity:
    return Identity("helo", helo, spf_domain(helo), "")


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """What one check_host() evaluation found."""

    result: str
    identity: str
    domain: str
    explanation: str = ""  # the domain's exp= text (fail only), else ""
    mechanism: str = ""
    problem: str = ""


# ------------------------------------------------------------------------------------------
# pyspf's DNS: questions from the evaluation thread, answered by the event loop's resolver


_PySpfAnswer = list[tuple[tuple[str, str], Any]]
_MAX_PASSES: Final = 128  # pyspf asks at most 10 lookup mechanisms, each up to 10 MX hosts


class _Lookups:
    """The DNS answers of one evaluation, for pyspf running on the event loop.

    pyspf asks synchronously (:meth:`lookup`). An answer fetched earlier for this evaluation,
    or one in the resolver's cache, is returned at once; any other question is noted in
    ``missing`` and answered with a TempError, which ends pyspf's pass. :meth:`fetch` then asks
    the noted questions of the resolver, concurrently, and the caller runs pyspf again. A
    question that failed (SERVFAIL, timeout) stays a TempError for the rest of the evaluation.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._answers: dict[tuple[str, str], _PySpfAnswer] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self.missing: dict[tuple[str, str], tuple[str, str]] = {}

    def lookup(self, name: str, qtype: str, timeout: float) -> _PySpfAnswer:
        if qtype not in ("A", "AAAA", "MX", "PTR", "TXT"):
            return []  # type SPF (99) is asked only in pyspf's "harsh" mode, which we do not use
        key = (name.rstrip(".").lower(), qtype)
        found = self._answers.get(key)
        if found is not None:
            return found
        reason = self._failed.get(key)
        if reason is not None:
            raise spf.TempError(f"DNS {reason}: {name}/{qtype}")
        try:
            answer = self._resolver.cached(name, qtype)
        except DnsError:
            answer = Answer(records=(), ttl=0.0)  # not valid DNS syntax: nothing there
        if answer is not None:
            found = self._answers[key] = _pyspf_answer(name, qtype, answer)
            return found
        self.missing[key] = (name, qtype)
        raise spf.TempError(f"DNS: {name}/{qtype} not cached yet")

    async def fetch(self) -> None:
        """Ask the resolver the questions the last pass missed."""
        missing = list(self.missing.items())  # kept until answered: give_up() needs them
        answers = await asyncio.gather(
            *(self._resolver.query(name, qtype) for _, (name, qtype) in missing), return_exceptions=True
        )
        for (key, (name, qtype)), answer in zip(missing, answers, strict=True):
            if isinstance(answer, DnsTempError):
                self._failed[key] = answer.reason
            elif isinstance(answer, DnsError):
                self._answers[key] = []
            elif isinstance(answer, BaseException):
                raise answer
            else:
                self._answers[key] = _pyspf_answer(name, qtype, answer)
        self.missing.clear()

    def give_up(self, reason: str) -> None:
        """Turn every missing question into a failure (out of time or passes)."""
        for key in self.missing:
            self._failed[key] = reason
        self.missing.clear()


def _pyspf_answer(name: str, qtype: str, answer: Answer) -> _PySpfAnswer:
    """pyspf's answer format: ``((name, type), value)`` per record."""
    key = (name, qtype)
    if qtype == "TXT":
        return [(key, (record.encode("utf-8"),)) for record in answer.records]
    if qtype == "MX":
        pairs = (record.partition(" ") for record in answer.records)
        return [(key, (int(preference), host)) for preference, _, host in pairs]
    return [(key, record) for record in answer.records]


class _DnsHook:
    """pyspf looks its DNS function up in a module global (``spf.DNSLookup``) at every question.

    It is replaced once by :meth:`dispatch`, which answers through the :class:`_Lookups` of the
    evaluation running now (set by :meth:`run` for the duration of one synchronous pass), and
    calls the function it replaced otherwise (another thread, or pyspf used outside a check),
    so other users of pyspf in this process keep their own DNS.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._previous: Callable[..., Any] | None = None

    def install(self) -> None:
        with self._lock:
            if self._previous is None:
                self._previous = spf.DNSLookup
                spf.DNSLookup = self.dispatch

    def dispatch(self, name: str, qtype: str, strict: object = True, timeout: float = 20.0) -> Any:
        lookups: _Lookups | None = getattr(self._local, "lookups", None)
        if lookups is not None:
            return lookups.lookup(name, qtype, timeout)
        assert self._previous is not None
        return self._previous(name, qtype, strict, timeout)

    def run(self, lookups: _Lookups, func: Callable[[], Evaluation]) -> Evaluation:
        """Call ``func`` in this thread with its DNS answered by ``lookups``."""
        self._local.lookups = lookups
        try:
            return func()
        finally:
            self._local.lookups = None


_HOOK = _DnsHook()


def _check_host(ip: str, identity: Identity, helo: str, receiver: str, budget: float) -> Evaluation:
    """check_host() for one identity, in the calling thread (its DNS goes through the hook)."""
    if identity.valid is None:
        return Evaluation(result="none", identity=identity.kind, domain=identity.domain)
    query = spf.query(
        i=ip,
        s=identity.sender,
        h=identity.valid if identity.kind == "helo" else helo,
        receiver=receiver,
        strict=True,
        timeout=budget,
        querytime=0,
    )
    result, _code, text = query.check()
    result = str(result)
    if result not in RESULTS:  # only pyspf's stricter modes give other words
        result = "permerror"
    explanation = ""
    if result == "fail" and text and text != spf.EXPLANATIONS.get("fail"):
        explanation = str(text)
    problem = ""
    if result in ("permerror", "temperror"):
        problem = str(getattr(query, "prob", "") or "")
        mechs = [str(m) for m in getattr(query, "mech", []) or []]
        if mechs:
            problem = f"{problem}: {' '.join(mechs)}"
    return Evaluation(
        result=result,
        identity=identity.kind,
        domain=identity.valid,
        explanation=explanation,
        mechanism=str(query.mechanism or "") if result not in ("permerror", "temperror") else "",
        problem=problem,
    )


# ------------------------------------------------------------------------------------------
# Header and text formatting


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")  # RFC 2045 token: no tspecials
_MAX_VALUE: Final = 256
_MAX_COMMENT: Final = 300
_MAX_PROBLEM: Final = 160
_MAX_EXPLANATION: Final = 200


def one_line(text: str, limit: int, *, ascii_only: bool = False) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    if not (text.isascii() and text.isprintable()):  # the common case needs no rewriting
        if ascii_only:
            text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
        else:
            text = "".join(ch if ch.isprintable() else " " for ch in text)
    if "  " in text or text[:1] == " " or text[-1:] == " ":
        text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def kv_value(text: str, limit: int = _MAX_VALUE) -> str:
    """A Received-SPF key-value value: dot-atom or quoted-string (RFC 7208 9.1)."""
    clean = one_line(text, limit, ascii_only=True)
    return clean if _DOT_ATOM.fullmatch(clean) else _quoted(clean)


def ar_value(text: str, limit: int = _MAX_VALUE) -> str:
    """An Authentication-Results property value: token or quoted-string (RFC 8601 2.2)."""
    clean = one_line(text, limit, ascii_only=True)
    return clean if _TOKEN.fullmatch(clean) else _quoted(clean)


def comment(text: str, limit: int = _MAX_COMMENT) -> str:
    """An RFC 5322 comment: parentheses and backslashes inside are quoted-pairs."""
    clean = one_line(text, limit, ascii_only=True)
    return "(" + re.sub(r"([()\\])", r"\\\1", clean) + ")"


def _describe(result: str, domain: str, client: str) -> str:
    """Our sentence for a result (the header comment, and the reply's default explanation)."""
    sentences = {
        "pass": "domain of {d} designates {c} as permitted sender",
        "fail": "domain of {d} does not designate {c} as permitted sender",
        "softfail": "domain of {d} discourages use of {c} as sender",
        "neutral": "{c} is neither permitted nor denied by domain of {d}",
        "none": "domain of {d} does not publish an SPF record",
        "permerror": "the SPF record of {d} has a permanent error",
        "temperror": "temporary error while checking the SPF record of {d}",
    }
    if not domain:
        return "no domain to check"
    return sentences[result].format(d=domain, c=client)


# ------------------------------------------------------------------------------------------
# The check


_REJECT_DSN: Final = {"permerror": "5.7.24"}
_DEFER_DSN: Final = {"permerror": "4.7.24", "temperror": "4.7.24"}
_VERDICTS: Final = {
    "pass": Verdict.PASS,
    "fail": Verdict.FAIL,
    "softfail": Verdict.FAIL,
    "permerror": Verdict.FAIL,
    "neutral": Verdict.SKIP,
    "none": Verdict.SKIP,
    "temperror": Verdict.ERROR,
}


class SpfCheck(Check[Options]):
    name: ClassVar[str] = "spf"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = ("spf.result", "spf.domain", "spf.identity", "spf.pass_domain")
    timeout: ClassVar[float] = 9.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._skip = NetworkList(options.skip_networks)
        self._not_pass_domains = DomainList(options.reject_not_pass_domains)
        self._allow = tuple(helo_identity(domain) for domain in options.allow_domains)
        self._receiver = one_line(services.hostname, 253, ascii_only=True) or "localhost"
        authserv = options.authserv_id or services.hostname
        self._authserv = authserv if _AUTHSERV_ID.fullmatch(authserv) else ar_value(authserv)
        _HOOK.install()

    # -- evaluation ------------------------------------------------------------------------

    async def evaluate(self, ip: IPAddress, sender: str, helo: str) -> tuple[Evaluation, str, str]:
        """Check the identities of one message: ``(evaluation, helo result, allowing domain)``.

        The HELO result is set only when ``check_helo = "always"`` checked it besides MAIL
        FROM; the allowing domain is the ``allow_domains`` entry the client passed, if any
        (then the evaluation is that domain's pass and nothing else was checked).
        """
        loop = running_loop()
        deadline = loop.time() + self.options.lookup_time
        lookups = _Lookups(self.services.dns)
        for passes in range(1, _MAX_PASSES + 1):
            work = _Plan(
                ip=str(ip),
                sender=sender,
                helo=helo,
                receiver=self._receiver,
                budget=self.options.lookup_time,
                allow=self._allow,
                helo_always=self.options.check_helo == "always",
            )
            evaluation = _HOOK.run(lookups, work.run)
            if not lookups.missing:
                break
            remaining = deadline - loop.time()
            if passes == _MAX_PASSES - 1:
                lookups.give_up("too many lookups")
            elif remaining <= 0:
                lookups.give_up("lookup time exceeded")
            else:
                try:
                    async with asyncio.timeout(remaining):
                        await lookups.fetch()
                except TimeoutError:
                    lookups.give_up(f"no answer in time (lookup_time {self.options.lookup_time:g}s)")
        return evaluation, work.helo_result, work.allowed_by

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        return (tx.client_address, tx.sender, tx.helo)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if tx.client_ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        if tx.client_ip in self._skip:
            return self.result(Verdict.SKIP, skipped="network")
        evaluation, helo_result, allowed_by = await self.evaluate(tx.client_ip, tx.sender, tx.helo)
        if allowed_by:
            return self.result(Verdict.SKIP, skipped="allow_domains", domain=allowed_by)
        return self.report(evaluation, tx, helo_result)

    # -- reporting ---------------------------------------------------------------------------

    def report(self, ev: Evaluation, tx: Transaction, helo_result: str = "") -> Result:
        """The result for an evaluation: action, score, reason, facts, log and header."""
        opts = self.options
        result = ev.result
        client = str(tx.client_ip)
        handled_as = result
        if (
            result in ("softfail", "neutral", "none", "permerror")
            and ev.identity == "mailfrom"
            and self._not_pass_domains.matches(ev.domain)
        ):
            handled_as = "fail"
        score = opts.score(handled_as)
        domain_text = one_line(ev.domain, _MAX_VALUE)
        explanation = _describe(result, domain_text, client)
        if ev.explanation:
            exp = one_line(ev.explanation, _MAX_EXPLANATION)
            explanation = f"The domain {domain_text} explains: {exp}"
        text = one_line(
            opts.reply_text.format(
                result=result,
                domain=domain_text,
                identity=ev.identity,
                client=client,
                sender=one_line(tx.sender, _MAX_VALUE) or "<>",
                explanation=explanation,
            ),
            400,
        )
        action = self._action(opts.action(handled_as), result, text)
        facts: dict[str, str] = {"spf.result": result, "spf.domain": ev.domain, "spf.identity": ev.identity}
        if result == "pass":
            facts["spf.pass_domain"] = ev.domain
        log: dict[str, str] = {"result": result, "identity": ev.identity, "domain": domain_text}
        if ev.mechanism:
            log["mechanism"] = one_line(ev.mechanism, _MAX_PROBLEM)
        if ev.problem:
            log["problem"] = one_line(ev.problem, _MAX_PROBLEM)
        if helo_result:
            log["helo"] = helo_result
        if handled_as != result:
            log["handled_as"] = handled_as
        return self.result(
            _VERDICTS[result],
            score,
            text if (score > 0 or action is not None) else "",
            facts=facts,
            action=action,
            header=self._header(ev, tx),
            **log,
        )

    @staticmethod
    def _action(word: str, result: str, text: str) -> Action | None:
        if word == "reject":
            return Action.reject(text, 550, _REJECT_DSN.get(result, "5.7.23"))
        if word == "defer":
            return Action.defer_if_permit(text, _DEFER_DSN.get(result, "4.7.23"))
        return None

    def _header(self, ev: Evaluation, tx: Transaction) -> str:
        kind = self.options.header_type
        if kind == "none":
            return ""
        client = str(tx.client_ip)
        note = _describe(ev.result, one_line(ev.domain, _MAX_VALUE, ascii_only=True), client)
        if kind == "authentication-results":
            prop = "smtp.mailfrom" if ev.identity == "mailfrom" else "smtp.helo"
            return (
                f"Authentication-Results: {self._authserv}; spf={ev.result} {comment(note)} "
                f"{prop}={ar_value(ev.domain)}"
            )
        pairs = [f"client-ip={kv_value(client)}"]
        if tx.sender:
            pairs.append(f"envelope-from={kv_value(tx.sender)}")
        if tx.helo:
            pairs.append(f"helo={kv_value(tx.helo)}")
        pairs.append(f"receiver={kv_value(self._receiver)}")
        pairs.append(f"identity={ev.identity}")
        if ev.mechanism:
            pairs.append(f"mechanism={kv_value(ev.mechanism, _MAX_PROBLEM)}")
        if ev.problem:
            pairs.append(f"problem={kv_value(ev.problem, _MAX_PROBLEM)}")
        return f"Received-SPF: {ev.result} {comment(f'{self._receiver}: {note}')} {'; '.join(pairs)}"


@dataclass(kw_only=True)
class _Plan:
    """The evaluations of one message: one synchronous pass (see :class:`_Lookups`)."""

    ip: str
    sender: str
    helo: str
    receiver: str
    budget: float
    allow: tuple[Identity, ...]
    helo_always: bool
    helo_result: str = ""
    allowed_by: str = ""

    def run(self) -> Evaluation:
        for identity in self.allow:
            allowed = _check_host(self.ip, identity, self.helo, self.receiver, self.budget)
            if allowed.result == "pass":
                self.allowed_by = allowed.domain
                return allowed
        helo = helo_identity(self.helo)
        if not self.sender:
            return _check_host(self.ip, helo, self.helo, self.receiver, self.budget)
        if self.helo_always:
            first = _check_host(self.ip, helo, self.helo, self.receiver, self.budget)
            self.helo_result = first.result
            if first.result == "fail":
                return first
        return _check_host(self.ip, mailfrom_identity(self.sender), self.helo, self.receiver, self.budget)
